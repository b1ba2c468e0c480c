//! The in-process tier: the control plane ([`sdp_server::Server`]) on port 0 in the test's own
//! process, with the configuration the end-to-end tier gives it, and scripted fake agents
//! ([`ScriptedAgent`]) over the real WebSocket. For the HTTP API, sessions, validation,
//! limits, the agent protocol and the deployment state machine: no binary, no git, no Go, no
//! Docker.
//!
//! ```ignore
//! let env = InProcessEnv::builder().gateway(true).start().await;
//! let token = env.login().await;  // a scripted micro agent accepts the test user
//! ```
//!
//! The server logs into a buffer of the test process (one process per test under nextest),
//! which a failing test prints with what the fake agents were sent.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sdp_server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Upstreams, server_toml};
use crate::client::Api;
use crate::database::Database;
use crate::env::Options;
use crate::fake_agent::{Script, ScriptedAgent};
use crate::{AGENT_TOKEN, DEFAULT_LOG};

/// What an [`InProcessEnv`] starts: by default the server and one scripted micro agent
/// (`micro-0`) that accepts the test user; no gateway agent.
#[must_use]
pub struct InProcessBuilder {
    opts: Options,
    keys: String,
}

impl InProcessBuilder {
    /// How many scripted micro agents to connect (`micro-0`, …).
    pub fn micro_agents(mut self, n: usize) -> Self {
        self.opts.micro_agents = n;
        self
    }

    /// A scripted gateway agent named `gateway` that applies every route table: deployments
    /// need one to become ready.
    pub fn gateway(mut self, on: bool) -> Self {
        self.opts.gateway = on;
        self
    }

    /// No agent at all.
    pub fn no_agents(self) -> Self {
        self.gateway(false).micro_agents(0)
    }

    /// Only these services of the kit's catalog (as [`crate::EnvBuilder::catalog`]; the API
    /// gateways `api-gateway` and `edge` are there only when named).
    pub fn catalog(mut self, services: &'static [&'static str]) -> Self {
        self.opts.catalog = Some(services);
        self
    }

    crate::server_knobs!();

    /// Top-level `key = value` lines of the server's config, before the kit's own.
    pub fn server_keys(mut self, keys: &str) -> Self {
        self.keys.push_str(keys);
        self.keys.push('\n');
        self
    }

    /// Starts the server, then the scripted agents asked for, and waits until they are
    /// connected.
    pub async fn start(self) -> InProcessEnv {
        capture_logs();
        let dir = tempfile::tempdir().unwrap();
        let mut env = InProcessEnv {
            dir,
            api: Api::new(""),
            script: Arc::new(Script::default()),
            agents: Vec::new(),
            gateway: None,
            opts: self.opts,
            server: None,
            log_from: LOG.lock().unwrap().len(),
        };
        env.start_server_with("127.0.0.1:0", &self.keys, "").await;
        if env.opts.gateway {
            env.gateway = Some(ScriptedAgent::spawn(
                env.ws_url(),
                "gateway",
                "gateway",
                env.script.clone(),
            ));
        }
        for i in 0..env.opts.micro_agents {
            env.connect_micro(&format!("micro-{i}"));
        }
        env.wait_for_agents(env.opts.micro_agents).await;
        env
    }
}

/// A control plane served by a task of the test's runtime.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), sdp_server::ServerError>>,
}

pub struct InProcessEnv {
    pub dir: tempfile::TempDir,
    pub api: Api,
    /// What the scripted agents know (users, branches, how deployments go) and were sent.
    pub script: Arc<Script>,
    /// The scripted micro agents; dropping one disconnects it.
    pub agents: Vec<ScriptedAgent>,
    /// The scripted gateway agent.
    pub gateway: Option<ScriptedAgent>,
    pub opts: Options,
    server: Option<Running>,
    /// Where this test's part of the captured log begins.
    log_from: usize,
}

impl std::ops::Deref for InProcessEnv {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for InProcessEnv {
    fn drop(&mut self) {
        if let Some(running) = self.server.take() {
            running.stop.cancel();
        }
        if std::thread::panicking() {
            eprintln!(
                "==== in-process test environment in {} ====\n---- server ----\n{}\n---- fake agents ----\n{}",
                self.dir.path().display(),
                self.server_log(),
                self.script.transcript()
            );
        }
    }
}

/// The catalog's repositories and baselines: names that never resolve, since nothing of the
/// in-process tier reaches them (the fake agents answer for git).
fn upstreams() -> Upstreams {
    Upstreams {
        git: "http://git.sdp.test".to_owned(),
        baseline: "http://baseline.sdp.test".to_owned(),
        tls_baseline: "tls-baseline.sdp.test:443".to_owned(),
        router: "http://127.0.0.1:9".to_owned(),
    }
}

impl InProcessEnv {
    pub fn builder() -> InProcessBuilder {
        InProcessBuilder {
            opts: Options::default(),
            keys: String::new(),
        }
    }

    pub fn server_data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    pub fn ws_url(&self) -> String {
        format!("{}/ws/agent", self.url.replacen("http://", "ws://", 1))
    }

    /// The clone URL the catalog gives repository `name`.
    pub fn repo_url(&self, name: &str) -> String {
        upstreams().repo(name)
    }

    /// What the catalog's `orders` and `billing` fall back to.
    pub fn baseline_url(&self) -> String {
        upstreams().baseline
    }

    /// Starts (or restarts) the control plane on `listen`.
    pub async fn start_server(&mut self, listen: &str) {
        self.start_server_with(listen, "", "").await;
    }

    /// Starts the control plane on `listen` with `keys` (top-level `key = value` lines)
    /// before the kit's own config and `tables` (say `[[services]]`) after it. The config is
    /// read from a file as `sdp server` reads it: unknown keys are errors.
    pub async fn start_server_with(&mut self, listen: &str, keys: &str, tables: &str) {
        let path = self.dir.path().join("server.toml");
        let toml = server_toml(
            listen,
            &self.server_data_dir(),
            &self.opts,
            &upstreams(),
            keys,
            tables,
        );
        std::fs::write(&path, toml).unwrap();
        let env = [("SDP_AGENT_TOKEN".to_owned(), AGENT_TOKEN.to_owned())];
        let config: ServerConfig = sdp_config::load(Some(path.as_path()), env)
            .unwrap_or_else(|e| panic!("the kit's server config: {e}"))
            .config;
        let server = Server::bind(config)
            .await
            .unwrap_or_else(|e| panic!("the server does not start: {e}"));
        self.api.url = format!("http://{}", server.local_addr());
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        self.server = Some(Running { stop, task });
    }

    /// Stops the control plane as SIGTERM stops `sdp server`, and waits until it has.
    pub async fn stop_server(&mut self) {
        if let Some(Running { stop, task }) = self.server.take() {
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the server stops within 15s")
                .expect("the server task does not panic")
                .expect("the server stops without an error");
        }
    }

    /// Restarts the control plane on its address with `keys` and `tables` (see
    /// [`InProcessEnv::start_server_with`]).
    pub async fn restart_server_with(&mut self, keys: &str, tables: &str) {
        let listen = self.url.trim_start_matches("http://").to_owned();
        self.stop_server().await;
        self.start_server_with(&listen, keys, tables).await;
    }

    /// Connects another scripted micro agent, `name`; not waited for.
    pub fn connect_micro(&mut self, name: &str) {
        let agent = ScriptedAgent::spawn(self.ws_url(), name, "micro", self.script.clone());
        self.agents.push(agent);
    }

    /// Waits until exactly `n` agents are connected, besides the gateway agent when there is
    /// one.
    pub async fn wait_for_agents(&self, n: usize) {
        self.api
            .wait_for_connected_agents(n + usize::from(self.gateway.is_some()))
            .await;
    }

    /// What the server logged since this environment started, a JSON object a line.
    pub fn server_log(&self) -> String {
        let log = LOG.lock().unwrap();
        String::from_utf8_lossy(&log[self.log_from.min(log.len())..]).into_owned()
    }

    /// The server's database.
    pub fn database(&self) -> Database {
        Database::in_data_dir(&self.server_data_dir())
    }

    pub fn journal_mode(&self) -> String {
        self.database().journal_mode()
    }

    /// Rows in a table of the server's database.
    pub fn count_rows(&self, table: &str) -> u64 {
        self.database().count_rows(table)
    }

    /// The audit trail's actions, oldest first, joined by commas.
    pub fn audit_actions(&self) -> String {
        self.database().audit_actions()
    }
}

/// Everything the test process logs, as `sdp --log-format json` writes it.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the process's `tracing` output to [`LOG`], once per process.
fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(tracing_subscriber::EnvFilter::new(DEFAULT_LOG))
        .with_writer(|| LogWriter)
        .try_init();
}
