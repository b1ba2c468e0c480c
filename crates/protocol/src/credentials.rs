//! The user's Bitbucket credentials as they travel with a job.
//!
//! The password lives in a [`SecretString`]: `Debug` prints `[REDACTED]` and the memory is
//! wiped on drop. It is serialized only into a job frame, the one place it must go.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Username;

/// A password as typed at login: not empty, at most 1024 bytes, and free of the characters
/// that would cut it short on its way to git (NUL, CR, LF).
#[derive(Clone)]
pub struct Password(SecretString);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPassword {
    #[error("the password is empty")]
    Empty,
    #[error("the password is longer than 1024 bytes")]
    TooLong,
    #[error("the password cannot contain line breaks or NUL characters")]
    ForbiddenCharacter,
}

impl Password {
    pub fn parse(value: String) -> Result<Self, InvalidPassword> {
        let secret = SecretString::from(value);
        let raw = secret.expose_secret();
        if raw.is_empty() {
            return Err(InvalidPassword::Empty);
        }
        if raw.len() > 1024 {
            return Err(InvalidPassword::TooLong);
        }
        if raw.contains(['\0', '\n', '\r']) {
            return Err(InvalidPassword::ForbiddenCharacter);
        }
        Ok(Self(secret))
    }

    /// The only way to read the password; every caller is a place it is allowed to go.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Serialize for Password {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Password::parse(raw).map_err(serde::de::Error::custom)
    }
}

/// What git needs to authenticate as the user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub username: Username,
    pub password: Password,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let creds = Credentials {
            username: Username::parse("alice").unwrap(),
            password: Password::parse("hunter2-canary".into()).unwrap(),
        };
        let shown = format!("{creds:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[REDACTED]"), "{shown}");
    }

    #[test]
    fn passwords_that_would_be_cut_short_are_refused() {
        assert_eq!(
            Password::parse(String::new()).unwrap_err(),
            InvalidPassword::Empty
        );
        assert_eq!(
            Password::parse("a\nb".into()).unwrap_err(),
            InvalidPassword::ForbiddenCharacter
        );
        assert_eq!(
            Password::parse("x".repeat(1025)).unwrap_err(),
            InvalidPassword::TooLong
        );
        assert!(Password::parse("pä ss:word!".into()).is_ok());
    }
}
