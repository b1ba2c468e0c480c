//! The command line client (SPEC §10): `sdp login`, `deploy`, `ls`, `status`, `logs`,
//! `extend`, `rm`, `agents`, `open`, `logout` and `completion`, on `sdp_client`.
//!
//! Every command ends in a [`Failure`] with the exit status the spec gives it: 1 for a failed
//! deployment or a refused request, 2 for bad usage, 3 when the person must log in, 4 when
//! the server cannot be reached. The session comes from `SDP_SERVER`/`SDP_TOKEN` when set,
//! else from the file `sdp login` wrote ([`sdp_client::Store`]).

mod commands;
mod follow;
pub mod output;

use std::io::IsTerminal;

use sdp_client::{Client, ClientError, Store, StoredSession};

pub use commands::{ClientCommand, run};

/// Exit statuses (SPEC §10).
pub const FAILED: u8 = 1;
pub const USAGE: u8 = 2;
pub const AUTH: u8 = 3;
pub const UNREACHABLE: u8 = 4;

/// Why a command did not succeed: a one-line message, a hint where one helps, and the exit
/// status.
#[derive(Debug)]
pub struct Failure {
    pub status: u8,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(status: u8, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            hint: None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(USAGE, message)
    }

    pub fn usage_of(e: impl std::fmt::Display) -> Failure {
        Failure::usage(e.to_string())
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Failure {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let message = e.to_string();
        match &e {
            ClientError::Unreachable { url, .. } => Failure::new(UNREACHABLE, message).hint(
                format!("is the SDP server running at {url}? `sdp login --server URL` or SDP_SERVER chooses another"),
            ),
            ClientError::Api { status: 401, code, .. } => {
                let hint = match code.as_str() {
                    "reauth_required" => "log in again: the server restarted (`sdp login`)",
                    "invalid_credentials" => "check the username and password you use for Bitbucket",
                    _ => "log in again with `sdp login`",
                };
                Failure::new(AUTH, message).hint(hint)
            }
            ClientError::Api { code, .. } => {
                let hint = match code.as_str() {
                    "not_owner" => Some("choose another name for a sandbox of your own"),
                    "deployment_in_progress" => {
                        Some("`sdp logs NAME -f` follows it; deploy again once it has ended")
                    }
                    "too_many_logins" => Some("wait a minute before you try again"),
                    "no_agent" => Some("`sdp agents` shows which deploy hosts are connected"),
                    "repo_access_denied" => {
                        Some("your Bitbucket account cannot read this repository")
                    }
                    _ => None,
                };
                let failure = Failure::new(FAILED, message);
                match hint {
                    Some(hint) => failure.hint(hint),
                    None => failure,
                }
            }
            ClientError::BadUrl { .. } => Failure::usage(message),
            ClientError::Protocol { .. } | ClientError::Tls(_) => Failure::new(FAILED, message),
        }
    }
}

impl From<sdp_client::StoreError> for Failure {
    fn from(e: sdp_client::StoreError) -> Failure {
        Failure::new(FAILED, e.to_string())
    }
}

/// Where the session comes from: the environment, else the file of `sdp login`.
pub struct Session {
    pub client: Client,
    /// The user, when known without asking the server (from the file).
    pub user: Option<String>,
    store: Store,
}

impl Session {
    /// The session every command but `login` and `completion` needs.
    pub fn open() -> Result<Session, Failure> {
        let store = Store::locate()?;
        let stored = store.load()?;
        let server = env("SDP_SERVER").or_else(|| stored.as_ref().map(|s| s.server.clone()));
        let Some(server) = server else {
            return Err(Failure::new(AUTH, "not logged in to any SDP server")
                .hint("run `sdp login --server URL`, or set SDP_SERVER and SDP_TOKEN"));
        };
        // A stored token is only sent to the server it was issued by.
        let from_file = stored.as_ref().filter(|s| same_server(&s.server, &server));
        let token = env("SDP_TOKEN").or_else(|| from_file.map(|s| s.token.clone()));
        let user = if env("SDP_TOKEN").is_some() {
            None
        } else {
            from_file.map(|s| s.user.clone())
        };
        let client = Client::new(&server, token)?;
        if client.token().is_none() {
            return Err(
                Failure::new(AUTH, format!("not logged in to {}", client.server()))
                    .hint(format!("run `sdp login --server {}`", client.server())),
            );
        }
        Ok(Session {
            client,
            user,
            store,
        })
    }

    /// Who the session is: from the file, else from the server.
    pub async fn user(&mut self) -> Result<String, Failure> {
        if let Some(user) = &self.user {
            return Ok(user.clone());
        }
        let info = self.client.session().await?;
        self.user = Some(info.user.clone());
        Ok(info.user)
    }

    /// Runs `call`; when the server answers `reauth_required` (it restarted and no longer
    /// holds the password) and a person is at the terminal, asks for the password, logs in
    /// again and runs `call` once more.
    pub async fn with_reauth<T, F, Fut>(&mut self, mut call: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        match call(self.client.clone()).await {
            Err(e) if e.code() == Some("reauth_required") && std::io::stdin().is_terminal() => {
                eprintln!("The server restarted and needs your password again.");
                let user = self.user().await?;
                let password = output::ask_password(&user)?;
                let answer =
                    output::spin("logging in", self.client.login(&user, &password)).await?;
                self.client.set_token(Some(answer.token.clone()));
                // Only a session of the file is renewed; one from SDP_TOKEN is the caller's.
                if env("SDP_TOKEN").is_none() {
                    self.store.save(&StoredSession {
                        server: self.client.server().to_owned(),
                        user: answer.user,
                        token: answer.token,
                        expires_at: answer.expires_at,
                    })?;
                }
                Ok(call(self.client.clone()).await?)
            }
            other => Ok(other?),
        }
    }
}

/// A variable of the environment, when set and not empty.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn same_server(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}
