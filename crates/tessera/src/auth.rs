//! Bearer tokens: `tsr_<id>_<secret>`. The store keeps only an argon2 hash of the secret; a
//! verified token is remembered (by its SHA-256) so that argon2's deliberate cost is paid once per
//! token, not once per request.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};

use crate::state::{Role, State, TokenKind};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    User {
        name: String,
        role: Role,
    },
    /// An agent, by its node's name.
    Agent {
        node: String,
    },
    /// A join token: may only register a new agent.
    Join {
        token_id: String,
    },
}

/// A new token: its id and the full text shown once to its owner.
pub struct NewToken {
    pub id: String,
    pub text: String,
    pub hash: String,
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system's random source");
    hex::encode(buf)
}

/// A fresh random secret (for agent callbacks).
pub fn random_secret() -> String {
    random_hex(32)
}

/// The secret the controller shows node `node`'s agent when it calls it (for logs): derived from
/// the controller's own key, so the store never holds it (a copy of the store opens no agent).
pub fn callback_secret(key: &[u8], node: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"tessera-callback:");
    mac.update(node.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Makes a new random token and its hash.
pub fn new_token() -> NewToken {
    let id = random_hex(6);
    let secret = random_hex(32);
    let salt = SaltString::encode_b64(&random_hex(16).into_bytes()[..16]).expect("16-byte salt");
    let hash = Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("argon2 with default parameters")
        .to_string();
    NewToken {
        text: format!("tsr_{id}_{secret}"),
        id,
        hash,
    }
}

fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("tsr_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && secret.len() == 64).then_some((id, secret))
}

/// Verified tokens by the SHA-256 of their text.
#[derive(Default)]
pub struct TokenCache {
    verified: Mutex<HashMap<[u8; 32], String>>,
}

impl TokenCache {
    /// The principal behind `token` when it was verified before: no argon2, so callers need no
    /// blocking thread. `None` means "not known to be valid" (use [`TokenCache::authenticate`]).
    pub fn cached(&self, token: &str, state: &std::sync::Mutex<State>) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let id = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned()?;
        principal(&state.lock().unwrap_or_else(|e| e.into_inner()), &id)
    }

    /// The principal behind `token`, or `None` when it is unknown, malformed or revoked.
    /// argon2 runs outside the state lock.
    pub fn authenticate(&self, token: &str, state: &std::sync::Mutex<State>) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned();
        let (id, secret) = split(token)?;
        if cached.is_none() {
            let hash = {
                let s = state.lock().unwrap_or_else(|e| e.into_inner());
                let rec = s.tokens.get(id)?;
                if !rec.usable(crate::controller::now_ms()) {
                    return None;
                }
                rec.hash.clone()
            };
            let parsed = PasswordHash::new(&hash).ok()?;
            Argon2::default()
                .verify_password(secret.as_bytes(), &parsed)
                .ok()?;
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(digest, id.to_string());
        }
        principal(&state.lock().unwrap_or_else(|e| e.into_inner()), id)
    }
}

/// Who holds token `id`, unless it is revoked (checked on every request, so a revocation takes
/// effect at once even for cached tokens).
fn principal(s: &State, id: &str) -> Option<Principal> {
    let rec = s.tokens.get(id)?;
    if !rec.usable(crate::controller::now_ms()) {
        return None;
    }
    match rec.kind {
        TokenKind::User => {
            let user = s.users.get(&rec.subject)?;
            Some(Principal::User {
                name: user.name.clone(),
                role: user.role,
            })
        }
        TokenKind::Agent => Some(Principal::Agent {
            node: rec.subject.clone(),
        }),
        TokenKind::Join => Some(Principal::Join {
            token_id: rec.id.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{TokenRecord, User};

    #[test]
    fn a_token_verifies_only_with_its_secret_and_not_after_revocation() {
        let t = new_token();
        assert!(t.text.starts_with("tsr_"));
        assert!(!t.hash.contains(&t.text[17..]), "the secret is not stored");
        let mut state = State::default();
        state.users.insert(
            "ana".into(),
            User {
                name: "ana".into(),
                role: Role::Member,
                created_ms: 0,
                uid: None,
            },
        );
        state.tokens.insert(
            t.id.clone(),
            TokenRecord {
                id: t.id.clone(),
                kind: TokenKind::User,
                subject: "ana".into(),
                description: String::new(),
                hash: t.hash.clone(),
                created_ms: 0,
                revoked: false,
                uses_left: None,
                expires_ms: None,
            },
        );
        let state = Mutex::new(state);
        let cache = TokenCache::default();
        assert_eq!(
            cache.authenticate(&t.text, &state),
            Some(Principal::User {
                name: "ana".into(),
                role: Role::Member
            })
        );
        let mut forged = t.text.clone();
        forged.pop();
        forged.push(if t.text.ends_with('0') { '1' } else { '0' });
        assert_eq!(cache.authenticate(&forged, &state), None);
        assert_eq!(cache.authenticate("Bearer nonsense", &state), None);
        state.lock().unwrap().tokens.get_mut(&t.id).unwrap().revoked = true;
        assert_eq!(cache.authenticate(&t.text, &state), None);
    }
}
