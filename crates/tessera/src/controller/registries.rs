//! Registry logins of projects: the admin stores a username and password (or token) for a
//! registry, and the agents of nodes that run the project's image jobs are given them with the
//! replica's assignment, for that image's registry only. A password is written to the store and
//! sent to agents, and nowhere else: no answer, event, log line or audit entry shows it back.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use serde::{Deserialize, Serialize};

use super::ops::parse_body;
use super::{ApiError, Caller, S, audit};
use crate::agent::image::Credentials;
use crate::state::State;

/// One project's login to one registry, as stored.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryLogin {
    pub project: String,
    /// `host[:port]`, as an image reference names it (`docker.io` for Docker Hub).
    pub registry: String,
    pub username: String,
    pub password: String,
    pub updated_ms: u64,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegistryLogin({} at {} as {}, <hidden>)",
            self.project, self.registry, self.username
        )
    }
}

/// What the API shows of a login.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginView {
    pub registry: String,
    pub username: String,
    pub updated_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub username: String,
    pub password: String,
}

/// The registry an image reference names, as the pull resolves it.
pub fn registry_of(image: &str) -> Option<String> {
    let r: oci_client::Reference = image.parse().ok()?;
    Some(r.resolve_registry().to_string())
}

/// A registry as the admin names it (`host[:port]`), in the form pulls resolve to.
fn check_registry(text: &str) -> Result<String, ApiError> {
    let ok = !text.is_empty()
        && text.len() <= 253
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        && !text.starts_with(['.', '-', ':']);
    match ok
        .then(|| registry_of(&format!("{text}/probe:1")))
        .flatten()
    {
        Some(r) => Ok(r),
        None => Err(ApiError::bad(format!(
            "registry {text:?}: give a registry's host and port as images name it, e.g. \
             registry.example.com:5000 or docker.io"
        ))),
    }
}

/// The login a project's image job uses: the project's own for the image's registry, else its
/// nearest ancestor's.
pub fn login_for(s: &State, project: &str, image: &str) -> Option<Credentials> {
    let registry = registry_of(image)?;
    let mut at = Some(project.to_string());
    while let Some(p) = at {
        if let Some(l) = s.registry_logins.get(&(p.clone(), registry.clone())) {
            return Some(Credentials {
                username: l.username.clone(),
                password: l.password.clone(),
            });
        }
        at = s.projects.get(&p).and_then(|x| x.parent.clone());
    }
    None
}

/// `GET /v1/projects/{name}/registries`: the project's logins, without their passwords.
pub async fn list(
    AxState(ctl): S,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<Vec<LoginView>>, ApiError> {
    caller.admin()?;
    ctl.store.read(|s| {
        if !s.projects.contains_key(&project) {
            return Err(ApiError::not_found(format!("no project {project}")));
        }
        Ok(Json(
            s.registry_logins
                .values()
                .filter(|l| l.project == project)
                .map(|l| LoginView {
                    registry: l.registry.clone(),
                    username: l.username.clone(),
                    updated_ms: l.updated_ms,
                })
                .collect(),
        ))
    })
}

/// `PUT /v1/projects/{name}/registries/{registry}`: stores (or replaces) a login.
pub async fn put(
    AxState(ctl): S,
    caller: Caller,
    Path((project, registry)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<LoginView>, ApiError> {
    let admin = caller.admin()?.to_string();
    let b: LoginBody = parse_body(&body)?;
    let registry = check_registry(&registry)?;
    if b.username.is_empty() || b.username.len() > 256 || b.username.contains(char::is_control) {
        return Err(ApiError::bad(
            "username: give the registry's user name (1 to 256 printable characters)",
        ));
    }
    if b.password.is_empty() || b.password.len() > 8192 || b.password.contains('\0') {
        return Err(ApiError::bad(
            "password: give the password or access token (1 to 8192 bytes, no NUL)",
        ));
    }
    let view = ctl
        .store
        .write(move |c, s| -> Result<LoginView, ApiError> {
            if !s.projects.contains_key(&project) {
                return Err(ApiError::not_found(format!("no project {project}")));
            }
            let now = c.now_ms;
            let login = RegistryLogin {
                project: project.clone(),
                registry: registry.clone(),
                username: b.username,
                password: b.password,
                updated_ms: now,
            };
            c.put_registry_login(&login)?;
            let what = format!("login to {registry} as {}", login.username);
            audit::record(
                c,
                now,
                &admin,
                "registry-login",
                Some(&project),
                None,
                &what,
            )?;
            let view = LoginView {
                registry: registry.clone(),
                username: login.username.clone(),
                updated_ms: now,
            };
            s.registry_logins.insert((project, registry), login);
            Ok(view)
        })
        .await?;
    Ok(Json(view))
}

/// `DELETE /v1/projects/{name}/registries/{registry}`.
pub async fn delete(
    AxState(ctl): S,
    caller: Caller,
    Path((project, registry)): Path<(String, String)>,
) -> Result<axum::http::StatusCode, ApiError> {
    let admin = caller.admin()?.to_string();
    let registry = check_registry(&registry)?;
    ctl.store
        .write(move |c, s| -> Result<(), ApiError> {
            let key = (project.clone(), registry.clone());
            if s.registry_logins.remove(&key).is_none() {
                return Err(ApiError::not_found(format!(
                    "project {project} has no login to {registry}"
                )));
            }
            c.delete_registry_login(&project, &registry)?;
            let what = format!("login to {registry} removed");
            audit::record(
                c,
                c.now_ms,
                &admin,
                "registry-logout",
                Some(&project),
                None,
                &what,
            )?;
            Ok(())
        })
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_named_as_pulls_resolve_them_and_bad_names_are_refused() {
        assert_eq!(check_registry("127.0.0.1:5000").unwrap(), "127.0.0.1:5000");
        assert_eq!(check_registry("docker.io").unwrap(), "index.docker.io");
        assert_eq!(registry_of("busybox:1").unwrap(), "index.docker.io");
        assert_eq!(
            registry_of(
                "registry.example.com:5000/team/x@sha256:"
                    .to_string()
                    .as_str()
            ),
            None
        );
        for bad in ["", "a b", "-x", "host/path", "x\u{0}"] {
            assert!(check_registry(bad).is_err(), "{bad:?}");
        }
        let login = RegistryLogin {
            project: "p".into(),
            registry: "r".into(),
            username: "u".into(),
            password: "hunter2".into(),
            updated_ms: 0,
        };
        assert!(!format!("{login:?}").contains("hunter2"));
    }
}
