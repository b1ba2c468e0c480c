//! Where the command line keeps its session: `$XDG_CONFIG_HOME/sdp/session.json` (else
//! `~/.config/sdp/session.json`), a file only its owner can read (0600, in a 0700 folder).
//! It holds the server's URL, the user and the session token; never a password.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "session.json";

#[derive(Clone, Serialize, Deserialize)]
pub struct StoredSession {
    pub server: String,
    pub user: String,
    pub token: String,
    pub expires_at: String,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("server", &self.server)
            .field("user", &self.user)
            .field("token", &"[REDACTED]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot find a config directory: set XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a session file of sdp ({reason}); remove it and log in again")]
    Corrupt { path: PathBuf, reason: String },
}

/// The session file.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// The file under the user's config directory, from `XDG_CONFIG_HOME` (when absolute,
    /// as the XDG spec requires) or `HOME`.
    pub fn locate() -> Result<Store, StoreError> {
        let from_xdg = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        let dir = match from_xdg {
            Some(dir) => dir,
            None => std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .ok_or(StoreError::NoConfigDir)?
                .join(".config"),
        };
        Ok(Store::at(dir.join("sdp").join(FILE)))
    }

    pub fn at(path: PathBuf) -> Store {
        Store { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<Option<StoredSession>, StoreError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    what: "read",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Writes `session` whole: a new file of mode 0600 renamed over the old one, so that no
    /// moment exists when the token is in a file others could read, or half written.
    pub fn save(&self, session: &StoredSession) -> Result<(), StoreError> {
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { what, path, source }
        };
        let dir = self.path.parent().expect("the file is in a folder");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create", dir))?;
        let tmp = dir.join(format!(".{FILE}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        // The mode given at creation is cut by the umask; this one is not.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("set the mode of", &tmp))?;
        let text = serde_json::to_vec_pretty(session).expect("a session serializes");
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("replace", &self.path))
    }

    /// Removes the file; false when there was none.
    pub fn remove(&self) -> Result<bool, StoreError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Io {
                what: "remove",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_file_is_for_its_owner_only_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::at(dir.path().join("cfg").join("sdp").join(FILE));
        assert!(store.load().unwrap().is_none());
        let session = StoredSession {
            server: "http://127.0.0.1:8080".into(),
            user: "alice".into(),
            token: "sdp_secret".into(),
            expires_at: "2026-12-01T12:00:00Z".into(),
        };
        store.save(&session).unwrap();
        store.save(&session).unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(store.path().parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(store.load().unwrap().unwrap().token, "sdp_secret");
        assert!(!format!("{session:?}").contains("sdp_secret"));
        assert!(store.remove().unwrap());
        assert!(!store.remove().unwrap());
    }
}
