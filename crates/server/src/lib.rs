//! The SDP control plane (`sdp server`): the HTTP JSON API, the WebSocket hub the agents dial
//! into, sessions, and persistence in SQLite under `data_dir`.
//!
//! [`Server::bind`] binds the listener (port 0 in tests) and opens the database, so callers
//! learn the address before serving; [`Server::run`] serves until the token is cancelled.

pub mod api;
mod config;
mod db;
mod dispatch;
mod error;
mod http;
mod hub;
mod lifecycle;
mod limiter;
mod logs;
mod metrics;
mod runtime_logs;
mod sessions;
mod ui;

use std::net::SocketAddr;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Cidr, GatewayConfig, GitConfig, ServerConfig, ServiceConfig, WebhooksConfig};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the data directory {dir}: {source}")]
    DataDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database under {dir}: {source}")]
    Database {
        dir: std::path::PathBuf,
        source: sqlx::Error,
    },
    #[error("cannot create the log directory {dir}: {source}")]
    Logs {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

pub struct Server {
    listener: TcpListener,
    state: api::AppState,
    shutdown: CancellationToken,
}

impl Server {
    /// Checks the configuration, opens the database and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        Self::bind_with(config, false).await
    }

    /// As [`Server::bind`]; `dev_mode` tells the dashboard that any password is accepted.
    pub async fn bind_with(mut config: ServerConfig, dev_mode: bool) -> Result<Self, ServerError> {
        config.validate().map_err(ServerError::Config)?;
        let probe = config.git.probe_repo.as_str();
        let asks_password = probe.starts_with("https://") || probe.starts_with("http://");
        if !dev_mode && !asks_password {
            // A local or ssh repository asks git for no password, so every login would pass.
            return Err(ServerError::Config(format!(
                "`git.probe_repo` must be an http:// or https:// URL of the git server, not {probe:?}: logins are checked by the password it asks for"
            )));
        }
        // A relative `data_dir` is taken against the working directory once, here, and
        // resolved whole (`..`, links): nothing later depends on the working directory.
        let data_dir_error = |source| ServerError::DataDir {
            dir: config.data_dir.clone(),
            source,
        };
        let data_dir = std::path::absolute(&config.data_dir).map_err(data_dir_error)?;
        std::fs::create_dir_all(&data_dir).map_err(data_dir_error)?;
        // The logs hold build output, the database sessions and the audit trail: the
        // control plane's alone, whoever else (user code) runs on its host.
        std::fs::set_permissions(
            &data_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(data_dir_error)?;
        config.data_dir = data_dir.canonicalize().map_err(data_dir_error)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let public_url = match &config.public_url {
            Some(url) => config::parse_http_url(url).map_err(ServerError::Config)?,
            None => {
                config::parse_http_url(&format!("http://{addr}")).map_err(ServerError::Config)?
            }
        };
        let db = db::Db::open(&config.data_dir)
            .await
            .map_err(|source| ServerError::Database {
                dir: config.data_dir.clone(),
                source,
            })?;
        let shutdown = CancellationToken::new();
        let logs_dir = config.data_dir.join("logs");
        let state = api::AppState::new(config, public_url, db, shutdown.clone(), dev_mode)
            .map_err(|source| ServerError::Logs {
                dir: logs_dir,
                source,
            })?;
        Ok(Self {
            listener,
            state,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The URL users reach this server at (`public_url`, or the bound address).
    pub fn public_url(&self) -> String {
        self.state
            .public_url
            .as_str()
            .trim_end_matches('/')
            .to_owned()
    }

    /// Serves until `stop` is cancelled, then closes agent connections and the database.
    pub async fn run(self, stop: CancellationToken) -> Result<(), ServerError> {
        let Server {
            listener,
            state,
            shutdown,
        } = self;
        tracing::info!(addr = %listener.local_addr().map_err(ServerError::Serve)?, public_url = %state.public_url, data_dir = %state.config.data_dir.display(), "listening");
        state.lifecycle.start_background().await;
        let sweeper = tokio::spawn(sweep_sessions(state.clone(), shutdown.clone()));
        let app = api::router(state.clone());
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            stopping.cancel();
        });
        let timeouts = http::Timeouts {
            header: state.config.http_header_timeout.get(),
            write: state.config.http_write_timeout.get(),
        };
        http::serve(listener, app, timeouts, shutdown.clone()).await;
        shutdown.cancel();
        let _ = sweeper.await;
        // The agents' connections end first: what they report on their way out may start
        // lifecycle tasks, which end next (their calls to agents fail at once now), and
        // both before the database closes.
        state.connections.close();
        if tokio::time::timeout(Duration::from_secs(5), state.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("agent connections did not end within 5s");
        }
        state.lifecycle.shutdown(Duration::from_secs(5)).await;
        state.db.close().await;
        tracing::info!("server stopped");
        Ok(())
    }
}

/// How long the row of an expired session is kept, so that its holder is told "expired"
/// rather than "not valid".
const EXPIRED_SESSION_GRACE: time::Duration = time::Duration::hours(1);

/// Ends expired sessions: their passwords are wiped from memory at once, their rows go after
/// [`EXPIRED_SESSION_GRACE`]. (Requests check the expiry themselves; this only cleans up.)
async fn sweep_sessions(state: api::AppState, shutdown: CancellationToken) {
    let period = (state.config.session_ttl.get() / 4)
        .clamp(Duration::from_millis(200), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = OffsetDateTime::now_utc();
        let wiped = state.vault.remove_expired(now);
        if wiped > 0 {
            tracing::info!(
                count = wiped,
                "expired sessions ended; their passwords are wiped"
            );
        }
        if let Err(e) = state
            .db
            .delete_expired_sessions(now - EXPIRED_SESSION_GRACE)
            .await
        {
            tracing::error!(error = %e, "cannot sweep expired sessions");
        }
    }
}
