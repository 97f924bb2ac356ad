//! Users, tokens, and who the caller is.

use super::*;

/// The most nodes one join token may join.
pub const MAX_JOIN_USES: u32 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    pub name: String,
    pub role: Role,
    /// The user's uid on the nodes (their replicas run as it).
    #[serde(default)]
    pub uid: Option<u32>,
}

/// The least uid a user may be mapped to: below are the system's accounts (root among them).
pub const MIN_USER_UID: u32 = 1000;

pub async fn list_users(AxState(ctl): S, caller: Caller) -> Result<Json<Vec<User>>, ApiError> {
    caller.admin()?;
    Ok(Json(
        ctl.store.read(|s| s.users.values().cloned().collect()),
    ))
}

pub async fn create_user(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<User>), ApiError> {
    let admin = caller.admin()?.to_string();
    let b: UserBody = parse_body(&body)?;
    check_name("name", &b.name)?;
    if let Some(uid) = b.uid
        && !(MIN_USER_UID..u32::MAX - 1).contains(&uid)
    {
        return Err(ApiError::bad(format!(
            "uid {uid}: give the user's own uid on the nodes, {MIN_USER_UID} or more (not a \
             system account)"
        ))
        .with_field("uid"));
    }
    let user = ctl
        .store
        .write(move |c, s| -> Result<User, ApiError> {
            if s.users.contains_key(&b.name) {
                return Err(ApiError::conflict(format!("user {} exists", b.name)));
            }
            let u = User {
                name: b.name,
                role: b.role,
                created_ms: c.now_ms,
                uid: b.uid,
            };
            c.put_user(&u)?;
            let what = format!("user {} as {:?}", u.name, u.role).to_lowercase();
            crate::controller::audit::record(
                c,
                c.now_ms,
                &admin,
                "user-create",
                None,
                None,
                &what,
            )?;
            s.users.insert(u.name.clone(), u.clone());
            Ok(u)
        })
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(user)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// `user` (default) or `join`.
    pub kind: Option<TokenKind>,
    /// The user the token is for (admins only; default: the caller).
    pub user: Option<String>,
    pub description: Option<String>,
    /// Join tokens: how many nodes it may join (default 1).
    pub uses: Option<u32>,
    /// Join tokens: how long it works, e.g. `1h` (default), `7d`.
    pub expires_in: Option<String>,
}

pub async fn create_token(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<TokenView>), ApiError> {
    let (me, role) = caller.user()?;
    let b: TokenBody = if body.is_empty() {
        TokenBody {
            kind: None,
            user: None,
            description: None,
            uses: None,
            expires_in: None,
        }
    } else {
        parse_body(&body)?
    };
    let kind = b.kind.unwrap_or(TokenKind::User);
    if kind == TokenKind::Agent {
        return Err(ApiError::bad(
            "kind agent: agents get their credential when they join; create a join token",
        ));
    }
    let subject = b.user.clone().unwrap_or_else(|| me.to_string());
    if (kind == TokenKind::Join || subject != me) && role != Role::Admin {
        return Err(ApiError::forbidden(
            "only an admin can create join tokens or tokens for other users",
        ));
    }
    let description = b.description.unwrap_or_default();
    if description.len() > 200 {
        return Err(ApiError::bad("description: at most 200 characters"));
    }
    if kind != TokenKind::Join && (b.uses.is_some() || b.expires_in.is_some()) {
        return Err(ApiError::bad(
            "uses, expires_in: only join tokens are limited this way; leave them out",
        ));
    }
    let uses = b.uses.unwrap_or(1);
    if !(1..=MAX_JOIN_USES).contains(&uses) {
        return Err(ApiError::bad(format!(
            "uses {uses}: a join token joins 1 to {MAX_JOIN_USES} nodes"
        )));
    }
    let ttl = match &b.expires_in {
        None => std::time::Duration::from_secs(3600),
        Some(t) => crate::units::parse_duration("expires_in", t)
            .map_err(|e| ApiError::bad(format!("{e:#}")))?,
    };
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(365 * 86_400) {
        return Err(ApiError::bad(
            "expires_in: give a duration from 1s to 365d, e.g. 1h",
        ));
    }
    let expires_ms = now_ms() + ttl.as_millis() as u64;
    let t = crate::auth::new_token();
    let creator = me.to_string();
    let view = ctl
        .store
        .write(move |c, s| -> Result<TokenView, ApiError> {
            if kind == TokenKind::User && !s.users.contains_key(&subject) {
                return Err(ApiError::bad(format!(
                    "user {subject}: no such user; create it first"
                )));
            }
            let t = issue_token(c, s, kind, &subject, &description, t)?;
            if kind == TokenKind::Join {
                crate::controller::limit_join_token(c, s, &t.id, uses, Some(expires_ms))?;
            }
            let what = format!("{kind:?} token {} for {subject}", t.id).to_lowercase();
            crate::controller::audit::record(
                c,
                c.now_ms,
                &creator,
                "token-create",
                None,
                None,
                &what,
            )?;
            let rec = s
                .tokens
                .get(&t.id)
                .ok_or_else(|| ApiError::internal("the token just issued is missing"))?;
            Ok(TokenView {
                id: rec.id.clone(),
                kind,
                subject: rec.subject.clone(),
                description: rec.description.clone(),
                created_ms: rec.created_ms,
                revoked: false,
                uses_left: rec.uses_left,
                expires_ms: rec.expires_ms,
                token: Some(t.text),
            })
        })
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(view)))
}

pub async fn list_tokens(
    AxState(ctl): S,
    caller: Caller,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let (me, role) = caller.user()?;
    Ok(Json(ctl.store.read(|s| {
        s.tokens
            .values()
            .filter(|t| role == Role::Admin || (t.kind == TokenKind::User && t.subject == me))
            .map(|t| TokenView {
                id: t.id.clone(),
                kind: t.kind,
                subject: t.subject.clone(),
                description: t.description.clone(),
                created_ms: t.created_ms,
                revoked: t.revoked,
                uses_left: t.uses_left,
                expires_ms: t.expires_ms,
                token: None,
            })
            .collect()
    })))
}

pub async fn revoke_token(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let (me, role) = caller.user()?;
    let (me, admin) = (me.to_string(), role == Role::Admin);
    ctl.store
        .write(move |c, s| -> Result<(), ApiError> {
            let mut t = s
                .tokens
                .get(&id)
                .cloned()
                .filter(|t| admin || (t.kind == TokenKind::User && t.subject == me))
                .ok_or_else(|| {
                    ApiError::not_found(format!("no token {id} of yours; see `tessera token list`"))
                })?;
            t.revoked = true;
            c.put_token(&t)?;
            let what = format!("token {id} of {}", t.subject);
            crate::controller::audit::record(c, c.now_ms, &me, "token-revoke", None, None, &what)?;
            s.tokens.insert(id, t);
            Ok(())
        })
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

pub async fn pool(AxState(ctl): S, caller: Caller) -> Result<Json<PoolView>, ApiError> {
    caller.user()?;
    let nodes = ctl.store.read(|s| s.nodes.len());
    Ok(Json(PoolView {
        policy: ctl.config.policy.name().to_string(),
        nodes,
    }))
}

pub async fn whoami(AxState(ctl): S, caller: Caller) -> Result<Json<WhoAmI>, ApiError> {
    let (user, role) = caller.user()?;
    Ok(Json(WhoAmI {
        user: user.to_string(),
        role,
        projects: ctl.store.read(|s| s.visible_projects(user, role)),
    }))
}
