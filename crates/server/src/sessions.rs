//! Sessions: a random 256-bit token for the client, only its SHA-256 in the database, and the
//! user's password in this process's memory alone, for the session's life (SPEC §4.1).

use std::collections::HashMap;
use std::sync::Mutex;

use sdp_protocol::{Credentials, Password, Username};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The cookie that carries the token for browsers.
pub const COOKIE_NAME: &str = "sdp_session";

const TOKEN_PREFIX: &str = "sdp_";

/// A new session token and the hash under which it is stored.
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let hash = hash_token(&token);
    (token, hash)
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `raw` could be one of our tokens; anything else is refused before any lookup.
pub fn looks_like_token(raw: &str) -> bool {
    raw.strip_prefix(TOKEN_PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

struct Live {
    credentials: Credentials,
    expires_at: OffsetDateTime,
}

/// The passwords of live sessions, by token hash. A `Password` wipes its memory when dropped,
/// so removing an entry is wiping the password.
#[derive(Default)]
pub struct PasswordVault {
    live: Mutex<HashMap<String, Live>>,
}

impl PasswordVault {
    pub fn insert(
        &self,
        token_hash: String,
        username: Username,
        password: Password,
        expires_at: OffsetDateTime,
    ) {
        let credentials = Credentials { username, password };
        self.lock().insert(
            token_hash,
            Live {
                credentials,
                expires_at,
            },
        );
    }

    /// The credentials of a live session; `None` after a restart of the control plane, when
    /// the user has to log in again.
    pub fn credentials(&self, token_hash: &str, now: OffsetDateTime) -> Option<Credentials> {
        self.lock()
            .get(token_hash)
            .filter(|live| live.expires_at > now)
            .map(|live| live.credentials.clone())
    }

    /// The credentials of `username`'s live session that lasts longest, if any: what a
    /// follow-redeploy of their sandbox uses, as they are not there to ask.
    pub fn credentials_of(&self, username: &str, now: OffsetDateTime) -> Option<Credentials> {
        self.lock()
            .values()
            .filter(|live| live.expires_at > now && live.credentials.username.as_str() == username)
            .max_by_key(|live| live.expires_at)
            .map(|live| live.credentials.clone())
    }

    pub fn remove(&self, token_hash: &str) {
        self.lock().remove(token_hash);
    }

    /// Drops every password whose session has expired by `now`.
    pub fn remove_expired(&self, now: OffsetDateTime) -> usize {
        let mut live = self.lock();
        let before = live.len();
        live.retain(|_, l| l.expires_at > now);
        before - live.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_256_random_bits_and_only_their_hash_is_kept() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(looks_like_token(&a));
        assert_eq!(ha.len(), 64);
        assert!(!ha.contains(&a[4..]));
        assert_eq!(hash_token(&a), ha);
        assert!(!looks_like_token("sdp_xyz"));
        assert!(!looks_like_token(&a[1..]));
    }

    #[test]
    fn an_expired_session_has_no_password_left() {
        let vault = PasswordVault::default();
        let now = OffsetDateTime::now_utc();
        vault.insert(
            "h".into(),
            Username::parse("alice").unwrap(),
            Password::parse("pw".into()).unwrap(),
            now + time::Duration::seconds(1),
        );
        assert!(vault.credentials("h", now).is_some());
        assert!(
            vault
                .credentials("h", now + time::Duration::seconds(2))
                .is_none()
        );
        assert_eq!(vault.remove_expired(now + time::Duration::seconds(2)), 1);
        assert!(vault.credentials("h", now).is_none());
    }

    #[test]
    fn a_users_credentials_are_found_only_while_one_of_their_sessions_lives() {
        let vault = PasswordVault::default();
        let now = OffsetDateTime::now_utc();
        let alice = Username::parse("alice").unwrap();
        vault.insert(
            "a1".into(),
            alice.clone(),
            Password::parse("old".into()).unwrap(),
            now + time::Duration::seconds(1),
        );
        vault.insert(
            "a2".into(),
            alice,
            Password::parse("new".into()).unwrap(),
            now + time::Duration::seconds(10),
        );
        let found = vault.credentials_of("alice", now).unwrap();
        assert_eq!(found.password.expose(), "new");
        assert!(vault.credentials_of("bob", now).is_none());
        vault.remove("a2");
        assert!(
            vault
                .credentials_of("alice", now + time::Duration::seconds(2))
                .is_none()
        );
    }
}
