//! Bearer tokens: `tsr_<id>_<secret>`, the secret 256 random bits made here. The store keeps only
//! a SHA-256 of the id and secret: a slow password hash (argon2) exists for secrets a person
//! chooses, which can be guessed; a 256-bit random secret cannot, so one SHA-256 is as safe and
//! lets 10,000 agents join in seconds instead of minutes (docs/security.md). Hashes written by
//! earlier versions are argon2; they still verify (slowly, once per token: a verified token is
//! remembered by its SHA-256).

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
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

/// The secret both halves of a remote GPU attachment prove to each other: derived from the
/// controller's key and the replica's key (its attempt included), so the store never holds it
/// and each attempt has its own.
pub fn attachment_secret(key: &[u8], replica_key: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"tessera-remote-gpu:");
    mac.update(replica_key.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// How long a standby's word for a client holds: long enough for a forwarded request to reach
/// the leader, short enough that one overheard is soon worthless.
pub const FORWARDED_PROOF_SECS: u64 = 60;

/// A standby's proof that it sent a request of `client` on at `unix_secs` (the leader checks
/// it with [`forwarded_client`]): `SECS.HMAC` under the pool's key, which only controllers
/// of the pool hold.
pub fn forwarded_proof(key: &[u8], client: &str, unix_secs: u64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("tessera-forwarded:{client}:{unix_secs}").as_bytes());
    format!("{unix_secs}.{}", hex::encode(mac.finalize().into_bytes()))
}

/// The client a forwarded request names, when `proof` shows a controller of the pool sent it
/// within [`FORWARDED_PROOF_SECS`] of `now_secs`; `None` for anyone else's claim.
pub fn forwarded_client(
    key: &[u8],
    client: &str,
    proof: &str,
    now_secs: u64,
) -> Option<std::net::IpAddr> {
    let ip: std::net::IpAddr = client.parse().ok()?;
    let (secs, _) = proof.split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    if secs.abs_diff(now_secs) > FORWARDED_PROOF_SECS {
        return None;
    }
    let expected = forwarded_proof(key, client, secs);
    same_secret(expected.as_bytes(), proof.as_bytes()).then_some(ip)
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The prefix of the hashes this version writes.
const SHA256_PREFIX: &str = "sha256$";

/// What the store keeps of token `id`'s `secret`. The id is hashed too, so a hash copied onto
/// another token's record does not verify.
fn secret_hash(id: &str, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"tessera-token\0");
    h.update(id.as_bytes());
    h.update(b"\0");
    h.update(secret.as_bytes());
    format!("{SHA256_PREFIX}{}", hex::encode(h.finalize()))
}

/// Makes a new random token and its hash (microseconds: no blocking thread needed).
pub fn new_token() -> NewToken {
    let id = random_hex(6);
    let secret = random_hex(32);
    NewToken {
        hash: secret_hash(&id, &secret),
        text: format!("tsr_{id}_{secret}"),
        id,
    }
}

fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("tsr_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && secret.len() == 64).then_some((id, secret))
}

/// What checking a token without a slow hash found.
#[derive(Debug, PartialEq, Eq)]
pub enum Quick {
    /// Decided: who it is, or `None` when it is unknown, malformed, wrong or revoked.
    Known(Option<Principal>),
    /// Its stored hash is an earlier version's argon2: use [`TokenCache::authenticate`] on a
    /// blocking thread.
    Slow,
}

/// Tokens whose argon2 hash (an earlier version's) was verified, by the SHA-256 of their text.
#[derive(Default)]
pub struct TokenCache {
    verified: Mutex<HashMap<[u8; 32], String>>,
}

impl TokenCache {
    /// Checks `token` without argon2: every token this version made, and earlier tokens verified
    /// before.
    pub fn quick(&self, token: &str, state: &std::sync::Mutex<State>) -> Quick {
        let Some((id, secret)) = split(token) else {
            return Quick::Known(None);
        };
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rec) = s.tokens.get(id) else {
            return Quick::Known(None);
        };
        if let Some(stored) = rec.hash.strip_prefix(SHA256_PREFIX) {
            let given = secret_hash(id, secret);
            let ok = same_secret(stored.as_bytes(), &given.as_bytes()[SHA256_PREFIX.len()..]);
            return Quick::Known(if ok { principal(&s, id) } else { None });
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .is_some_and(|v| v == id);
        if known {
            Quick::Known(principal(&s, id))
        } else {
            Quick::Slow
        }
    }

    /// The principal behind `token`, or `None` when it is unknown, malformed, wrong or revoked.
    /// An earlier version's argon2 hash is verified here, outside the state lock.
    pub fn authenticate(&self, token: &str, state: &std::sync::Mutex<State>) -> Option<Principal> {
        if let Quick::Known(p) = self.quick(token, state) {
            return p;
        }
        let (id, secret) = split(token)?;
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
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, id.to_string());
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

    fn ana() -> Principal {
        Principal::User {
            name: "ana".into(),
            role: Role::Member,
        }
    }

    #[test]
    fn only_a_controller_of_the_pool_may_name_a_forwarded_requests_client_and_only_briefly() {
        let key = b"the pool's key";
        let proof = forwarded_proof(key, "10.0.0.7", 1_000);
        let ip: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(forwarded_client(key, "10.0.0.7", &proof, 1_030), Some(ip));
        // Another key, another client, a late or altered proof, or no address: not believed.
        assert_eq!(
            forwarded_client(b"another key", "10.0.0.7", &proof, 1_000),
            None
        );
        assert_eq!(forwarded_client(key, "10.0.0.8", &proof, 1_000), None);
        assert_eq!(forwarded_client(key, "10.0.0.7", &proof, 1_061), None);
        let shifted = proof.replacen("1000.", "1001.", 1);
        assert_eq!(forwarded_client(key, "10.0.0.7", &shifted, 1_000), None);
        assert_eq!(forwarded_client(key, "10.0.0.7", "garbage", 1_000), None);
        let named = forwarded_proof(key, "not an address", 1_000);
        assert_eq!(forwarded_client(key, "not an address", &named, 1_000), None);
    }

    /// A state where user ana holds token `id` with stored hash `hash`.
    fn holding(id: &str, hash: &str) -> Mutex<State> {
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
            id.to_string(),
            TokenRecord {
                id: id.to_string(),
                kind: TokenKind::User,
                subject: "ana".into(),
                description: String::new(),
                hash: hash.to_string(),
                created_ms: 0,
                revoked: false,
                uses_left: None,
                expires_ms: None,
            },
        );
        Mutex::new(state)
    }

    #[test]
    fn a_token_verifies_only_with_its_secret_and_not_after_revocation() {
        let t = new_token();
        assert!(t.text.starts_with("tsr_"));
        assert!(!t.hash.contains(&t.text[17..]), "the secret is not stored");
        let state = holding(&t.id, &t.hash);
        let cache = TokenCache::default();
        assert_eq!(cache.quick(&t.text, &state), Quick::Known(Some(ana())));
        assert_eq!(cache.authenticate(&t.text, &state), Some(ana()));
        let mut forged = t.text.clone();
        forged.pop();
        forged.push(if t.text.ends_with('0') { '1' } else { '0' });
        assert_eq!(cache.quick(&forged, &state), Quick::Known(None));
        assert_eq!(cache.authenticate(&forged, &state), None);
        assert_eq!(cache.authenticate("Bearer nonsense", &state), None);
        state.lock().unwrap().tokens.get_mut(&t.id).unwrap().revoked = true;
        assert_eq!(cache.authenticate(&t.text, &state), None);
    }

    #[test]
    fn a_hash_copied_onto_another_tokens_record_does_not_verify() {
        let mine = new_token();
        let theirs = new_token();
        // The record of `theirs` carries the hash of `mine`: neither token opens it.
        let state = holding(&theirs.id, &mine.hash);
        let cache = TokenCache::default();
        assert_eq!(cache.authenticate(&theirs.text, &state), None);
        let mine_under_their_id = format!("tsr_{}_{}", theirs.id, &mine.text[17..]);
        assert_eq!(cache.authenticate(&mine_under_their_id, &state), None);
    }

    #[test]
    fn an_earlier_versions_argon2_hash_still_verifies_once_slowly() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let t = new_token();
        let secret = &t.text[17..];
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let old = Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .unwrap()
            .to_string();
        let state = holding(&t.id, &old);
        let cache = TokenCache::default();
        assert_eq!(cache.quick(&t.text, &state), Quick::Slow);
        let mut forged = t.text.clone();
        forged.pop();
        forged.push(if t.text.ends_with('0') { '1' } else { '0' });
        assert_eq!(cache.authenticate(&forged, &state), None);
        assert_eq!(cache.authenticate(&t.text, &state), Some(ana()));
        assert_eq!(cache.quick(&t.text, &state), Quick::Known(Some(ana())));
        assert_eq!(cache.quick(&forged, &state), Quick::Slow);
    }
}
