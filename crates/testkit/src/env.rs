//! The end-to-end tier: the real `sdp` binary started as a server and as agents, on port 0, in
//! a temporary directory per test, against a real git server with Basic auth.
//!
//! ```ignore
//! let env = TestEnv::builder(SDP).repos(&["orders"]).gateway(true).start().await;
//! ```
//!
//! When a test fails, dropping the [`TestEnv`] prints every process's command line and log.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::baseline::{Baseline, TlsBaseline};
use crate::catalog::{Upstreams, server_toml};
use crate::client::Api;
use crate::database::Database;
use crate::docker::{docker_cleanup, docker_image};
use crate::git_server::GitServer;
use crate::process::{Proc, free_port_range, kill_processes_under};
use crate::users::{PLAIN_AGENT, ensure_user, run_as_line};
use crate::{AGENT_TOKEN, DEFAULT_LOG, PASSWORD, USER};

/// Knobs of a test environment (the in-process tier reads the server's among them).
#[derive(Clone)]
pub struct Options {
    pub session_ttl: &'static str,
    pub job_timeout: &'static str,
    pub agent_timeout: &'static str,
    pub git_timeout: &'static str,
    pub health_timeout: &'static str,
    /// The router's wait for an upstream's response head.
    pub upstream_timeout: &'static str,
    pub sandbox_ttl: &'static str,
    /// The server's `idle_after` and `wake_timeout`, when not its defaults (2h, 60s).
    pub idle_after: Option<&'static str>,
    pub wake_timeout: Option<&'static str>,
    pub micro_agents: usize,
    /// Whether `start` starts a gateway agent (named `gateway`), as deployments need one to
    /// become ready.
    pub gateway: bool,
    /// `process`, or `docker` (with the test image, see [`docker_image`]).
    pub runtime: &'static str,
    /// `RUST_LOG` of the server and agents.
    pub log: &'static str,
    /// More lines of the micro agents' config files.
    pub agent_extra: &'static str,
    /// The docker runtime's `[docker] image`: the kit's own ([`docker_image`]) when `None`.
    pub docker_image: Option<String>,
    /// More lines of the micro agents' `[docker]` table (`image_archive = …`).
    pub docker_extra: String,
    /// Agents get `work_dir = "./agent-<name>"`, relative to the test's directory, where
    /// they are started.
    pub relative_work_dir: bool,
    /// Only these services of the kit's catalog; all of them when `None`.
    pub catalog: Option<&'static [&'static str]>,
    /// The server's `[webhooks]` table, when a test sets one.
    pub webhooks: Option<String>,
    /// The micro agents' `[kubernetes]` table (kubernetes runtime; see
    /// [`crate::kubernetes::agent_table`]).
    pub kubernetes: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            session_ttl: "1h",
            job_timeout: "10s",
            agent_timeout: "10s",
            git_timeout: "20s",
            health_timeout: "20s",
            upstream_timeout: "10s",
            sandbox_ttl: "1h",
            idle_after: None,
            wake_timeout: None,
            micro_agents: 1,
            gateway: false,
            runtime: "process",
            log: DEFAULT_LOG,
            agent_extra: "",
            docker_image: None,
            docker_extra: String::new(),
            relative_work_dir: false,
            catalog: None,
            webhooks: None,
            kubernetes: None,
        }
    }
}

/// What a [`TestEnv`] starts: by default the git server with only the `probe` repository,
/// the control plane and one micro agent; no gateway agent.
#[must_use]
pub struct EnvBuilder {
    bin: String,
    repos: Vec<String>,
    opts: Options,
}

impl EnvBuilder {
    /// Repositories of the catalog to create on the git server besides `probe` (see
    /// [`GitServer::create_catalog_repo`]): only those the test deploys or lists.
    pub fn repos(mut self, names: &[&str]) -> Self {
        self.repos.extend(names.iter().map(|n| (*n).to_owned()));
        self
    }

    /// A gateway agent named `gateway` on [`TestEnv::gateway_port`]: deployments need one to
    /// become ready.
    pub fn gateway(mut self, on: bool) -> Self {
        self.opts.gateway = on;
        self
    }

    /// How many micro agents to start (`micro-0`, …; `dock-…` with the docker runtime).
    pub fn micro_agents(mut self, n: usize) -> Self {
        self.opts.micro_agents = n;
        self
    }

    /// No agent at all: the server alone (and the git server).
    pub fn no_agents(self) -> Self {
        self.gateway(false).micro_agents(0)
    }

    /// `process` (the default), or `docker`, with the test image.
    pub fn runtime(mut self, runtime: &'static str) -> Self {
        self.opts.runtime = runtime;
        self
    }

    /// The kubernetes runtime for the micro agents, with this `[kubernetes]` table; the
    /// gateway agent keeps the process runtime.
    pub fn kubernetes(mut self, table: String) -> Self {
        self.opts.runtime = "kubernetes";
        self.opts.kubernetes = Some(table);
        self
    }

    crate::server_knobs!();

    pub fn git_timeout(mut self, timeout: &'static str) -> Self {
        self.opts.git_timeout = timeout;
        self
    }

    pub fn health_timeout(mut self, timeout: &'static str) -> Self {
        self.opts.health_timeout = timeout;
        self
    }

    /// The router's wait for an upstream's response head.
    pub fn upstream_timeout(mut self, timeout: &'static str) -> Self {
        self.opts.upstream_timeout = timeout;
        self
    }

    /// `RUST_LOG` of the server and agents.
    pub fn log(mut self, log: &'static str) -> Self {
        self.opts.log = log;
        self
    }

    /// More lines of the micro agents' config files.
    pub fn agent_extra(mut self, toml: &'static str) -> Self {
        self.opts.agent_extra = toml;
        self
    }

    /// The docker runtime's `[docker] image`, instead of the kit's own.
    pub fn docker_image(mut self, image: &str) -> Self {
        self.opts.docker_image = Some(image.to_owned());
        self
    }

    /// More lines of the micro agents' `[docker]` table (docker runtime).
    pub fn docker_extra(mut self, toml: &str) -> Self {
        self.opts.docker_extra = toml.to_owned();
        self
    }

    /// Agents get `work_dir = "./agent-<name>"`, relative to the test's directory, where
    /// they are started.
    pub fn relative_work_dir(mut self) -> Self {
        self.opts.relative_work_dir = true;
        self
    }

    /// Configures the control plane with only these services of the kit's catalog, for a test
    /// that must not meet the ones made to fail (`stuck`'s git server never answers; `secure`,
    /// `untrusted` and `hostile` have no repository until a test creates it). The API gateways
    /// (`api-gateway`, `edge`: `kind = "gateway"`, repository `api-gateway`) and the realistic
    /// Go service ([`crate::SHOP_SERVICES`]) are in the catalog only when named here.
    pub fn catalog(mut self, services: &'static [&'static str]) -> Self {
        self.opts.catalog = Some(services);
        self
    }

    /// Starts the git server with its repositories, the control plane, then the agents asked
    /// for, and waits until they are all connected.
    pub async fn start(self) -> TestEnv {
        let EnvBuilder { bin, repos, opts } = self;
        let mut env = TestEnv::server_only(bin, &repos, opts.clone()).await;
        if opts.gateway {
            env.start_gateway();
        }
        for i in 0..opts.micro_agents {
            // Agents of docker tests share one engine: their names scope their containers.
            let name = match opts.runtime {
                "docker" => format!("dock-{:08x}-{i}", rand::random::<u32>()),
                // Their names are labels of the objects they make in the one test cluster.
                "kubernetes" => format!("kube-{:08x}-{i}", rand::random::<u32>()),
                _ => format!("micro-{i}"),
            };
            env.start_agent(&name, "micro", AGENT_TOKEN);
            env.micro.push(name);
        }
        env.wait_for_agents(opts.micro_agents).await;
        env
    }
}

pub struct TestEnv {
    /// The `sdp` binary under test.
    pub bin: String,
    /// Names of the micro agents `start` started.
    pub micro: Vec<String>,
    pub dir: tempfile::TempDir,
    pub git: GitServer,
    pub server: Option<Proc>,
    pub agents: Vec<Proc>,
    /// The gateway agent, apart from `agents` so that tests can drop the others.
    pub gateway: Option<Proc>,
    /// Chosen before the server starts: the sandboxes' URLs and `SDP_GATEWAY_URL` hold it.
    pub gateway_port: u16,
    /// What the catalog's `orders` and `billing` fall back to.
    pub baseline: Baseline,
    /// What `secure` falls back to (`https://localhost:<port>`); `untrusted` names the same
    /// server by an address its certificate does not cover.
    pub tls_baseline: TlsBaseline,
    pub api: Api,
    pub opts: Options,
}

impl std::ops::Deref for TestEnv {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Service instances run in process groups of their own and outlive the agent: end
        // whatever still works in this test's directory.
        kill_processes_under(self.dir.path());
        if self.opts.runtime == "docker" {
            // Containers outlive the agent that started them: remove this test's own.
            for name in &self.micro {
                docker_cleanup(name);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "==== test environment in {} ====",
                self.dir.path().display()
            );
            for p in self
                .server
                .iter()
                .chain(self.gateway.iter())
                .chain(self.agents.iter())
            {
                eprintln!(
                    "---- {} ----\ncommand: {}\n{}",
                    p.label,
                    p.command,
                    p.log_text()
                );
            }
        }
    }
}

impl TestEnv {
    /// A builder of an environment running the `sdp` binary at `bin`
    /// (`env!("CARGO_BIN_EXE_sdp")` in the `sdp` crate's tests).
    pub fn builder(bin: &str) -> EnvBuilder {
        EnvBuilder {
            bin: bin.to_owned(),
            repos: Vec::new(),
            opts: Options::default(),
        }
    }

    /// The git server with `probe` and `repos`, and the control plane; no agent.
    async fn server_only(bin: String, repos: &[String], opts: Options) -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        // User code runs as another user, who must reach the agents' folders in here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let git = GitServer::start(&dir.path().join("git")).await;
        git.add_user(USER, PASSWORD);
        git.create_repo("probe", &["main"]);
        for name in repos {
            git.create_catalog_repo(name);
        }
        let tls_baseline = TlsBaseline::start(dir.path()).await;
        let gateway_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut env = TestEnv {
            bin,
            micro: Vec::new(),
            dir,
            git,
            server: None,
            agents: Vec::new(),
            gateway: None,
            gateway_port,
            baseline: Baseline::start().await,
            tls_baseline,
            api: Api::new(""),
            opts,
        };
        env.start_server("127.0.0.1:0");
        env
    }

    pub fn server_data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    pub fn agent_work_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{name}"))
    }

    /// Starts (or restarts) the control plane on `listen`.
    pub fn start_server(&mut self, listen: &str) {
        self.start_server_with(listen, "", "");
    }

    /// Starts the control plane on `listen` with `keys` (top-level `key = value` lines)
    /// before the kit's own config and `tables` (say `[[services]]`) after it.
    pub fn start_server_with(&mut self, listen: &str, keys: &str, tables: &str) {
        let path = self.dir.path().join("server.toml");
        let upstreams = Upstreams {
            git: format!("http://{}", self.git.addr),
            baseline: self.baseline.url(),
            tls_baseline: self.tls_baseline.addr.to_string(),
            router: self.router_url(),
        };
        let config = server_toml(
            listen,
            &self.server_data_dir(),
            &self.opts,
            &upstreams,
            keys,
            tables,
        );
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--log-format", "json", "server", "--config"])
            .arg(&path)
            .env("SDP_AGENT_TOKEN", AGENT_TOKEN)
            .env("RUST_LOG", self.opts.log);
        let mut proc = Proc::spawn("server", cmd);
        let line = proc.wait_for_line("listening", |l| l.contains("\"listening\""));
        let v: Value = serde_json::from_str(&line).unwrap();
        self.api.url = format!("http://{}", v["addr"].as_str().unwrap());
        self.server = Some(proc);
    }

    /// Restarts the control plane on its address with `keys` (top-level `key = value` lines)
    /// before the kit's own config and `tables` (say `[[services]]`) after it.
    pub fn restart_server_with(&mut self, keys: &str, tables: &str) {
        let listen = self.url.trim_start_matches("http://").to_owned();
        self.stop_server();
        self.start_server_with(&listen, keys, tables);
    }

    pub fn stop_server(&mut self) {
        if let Some(mut p) = self.server.take() {
            p.stop();
            // Keep its log for the failure report.
            self.agents.push(p);
        }
    }

    pub fn ws_url(&self) -> String {
        format!("{}/ws/agent", self.url.replacen("http://", "ws://", 1))
    }

    /// The sandbox router's URL.
    pub fn router_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    /// Starts (or restarts) the gateway agent `gateway` on [`TestEnv::gateway_port`], and
    /// waits until its router listens.
    /// `GET path` through the router, for sandbox `sandbox` (by `X-SDP-Sandbox`).
    pub async fn through_router(&self, sandbox: &str, path: &str) -> crate::Reply {
        let reply = reqwest::Client::new()
            .get(format!("{}{path}", self.router_url()))
            .header("X-SDP-Sandbox", sandbox)
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        crate::Reply::from(reply).await
    }

    pub fn start_gateway(&mut self) {
        let mut proc = self.spawn_agent("gateway", "gateway", AGENT_TOKEN, None);
        proc.wait_for_line("the router listening", |l| l.contains("router listening"));
        self.gateway = Some(proc);
    }

    /// Stops the gateway agent, keeping its log for a failure report.
    pub fn stop_gateway(&mut self) {
        if let Some(mut p) = self.gateway.take() {
            p.stop();
            self.agents.push(p);
        }
    }

    pub fn start_agent(&mut self, name: &str, role: &str, token: &str) {
        let proc = self.spawn_agent(name, role, token, None);
        self.agents.push(proc);
    }

    /// Starts micro agent `name` as the unprivileged [`PLAIN_AGENT`] user instead of root, as
    /// a plain user would run `sdp agent` (builds then run as that user too).
    pub fn start_unprivileged_agent(&mut self, name: &str) {
        let work_dir = self.agent_work_dir(name);
        std::fs::create_dir_all(&work_dir).unwrap();
        ensure_user(PLAIN_AGENT);
        let user = nix::unistd::User::from_name(PLAIN_AGENT).unwrap().unwrap();
        std::os::unix::fs::chown(&work_dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .unwrap();
        let proc = self.spawn_agent(name, "micro", AGENT_TOKEN, Some(PLAIN_AGENT));
        self.agents.push(proc);
    }

    fn spawn_agent(&mut self, name: &str, role: &str, token: &str, user: Option<&str>) -> Proc {
        let path = self.dir.path().join(format!("agent-{name}.toml"));
        let gateway = if name == "gateway" {
            format!(
                "\n[gateway]\nlisten = \"127.0.0.1:{}\"\nconnect_timeout = \"1s\"\nupstream_timeout = \"{}\"\n",
                self.gateway_port, self.opts.upstream_timeout
            )
        } else if role == "gateway" {
            "\n[gateway]\nlisten = \"127.0.0.1:0\"\n".to_owned()
        } else {
            String::new()
        };
        // Gateway agents run sandboxes' own API gateways in the same runtime.
        let docker = if self.opts.runtime == "docker" {
            format!(
                "\n[docker]\nimage = \"{}\"\nmemory = \"256m\"\ncpus = 0.5\npids = 128\n{}\n",
                self.opts
                    .docker_image
                    .as_deref()
                    .unwrap_or_else(|| docker_image()),
                // The micro agents' own lines (an image archive, say): the gateway agent's
                // table has the image alone.
                if role == "micro" {
                    self.opts.docker_extra.as_str()
                } else {
                    ""
                }
            )
        } else {
            String::new()
        };
        let kubernetes = match (&self.opts.kubernetes, role) {
            (Some(table), "micro") => format!("\n{table}"),
            _ => String::new(),
        };
        let gateway = format!("{docker}{kubernetes}{gateway}");
        let extra = if role == "micro" {
            self.opts.agent_extra
        } else {
            ""
        };
        // Kubernetes runs micro agents' instances only: the gateway agent's own are processes.
        let runtime = match (self.opts.runtime, role) {
            ("kubernetes", "gateway") => "process",
            (runtime, _) => runtime,
        };
        std::fs::write(
            &path,
            format!(
                "server = \"{}\"\nrole = \"{role}\"\nname = \"{name}\"\nwork_dir = \"{}\"\nruntime = \"{}\"\ngit_timeout = \"{}\"\nhealth_timeout = \"{}\"\nport_range = \"{}\"\n{}{extra}\n{gateway}",
                self.ws_url(),
                if self.opts.relative_work_dir {
                    format!("./agent-{name}")
                } else {
                    self.agent_work_dir(name).display().to_string()
                },
                runtime,
                self.opts.git_timeout,
                self.opts.health_timeout,
                free_port_range(),
                if user.is_some() {
                    String::new()
                } else {
                    run_as_line()
                },
            ),
        )
        .unwrap();
        let mut cmd = match user {
            Some(user) => {
                let mut cmd = Command::new("setpriv");
                cmd.args([
                    &format!("--reuid={user}"),
                    &format!("--regid={user}"),
                    "--clear-groups",
                    &self.bin,
                ]);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["--log-format", "json", "agent", "--config"])
            .arg(&path)
            .current_dir(self.dir.path())
            .env("SDP_TOKEN", token)
            .env("RUST_LOG", self.opts.log)
            // The trust store of https upstreams: the test CA only.
            .env("SSL_CERT_FILE", &self.tls_baseline.ca_file);
        Proc::spawn(&format!("agent {name}"), cmd)
    }

    /// Starts agent `name` of `role` that dials `server`, with `extra` TOML after its keys
    /// (`ca_file = …`, a `[gateway]` table). It trusts the same certificates as the standard
    /// agents (`SSL_CERT_FILE` is the HTTPS baseline's test CA). Not waited for.
    pub fn spawn_agent_with(&self, name: &str, role: &str, server: &str, extra: &str) -> Proc {
        let path = self.dir.path().join(format!("agent-{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "server = \"{server}\"\nrole = \"{role}\"\nname = \"{name}\"\nwork_dir = \"{}\"\nruntime = \"process\"\ngit_timeout = \"{}\"\nhealth_timeout = \"{}\"\nport_range = \"{}\"\n{}{extra}",
                self.agent_work_dir(name).display(),
                self.opts.git_timeout,
                self.opts.health_timeout,
                free_port_range(),
                run_as_line(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--log-format", "json", "agent", "--config"])
            .arg(&path)
            .env("SDP_TOKEN", AGENT_TOKEN)
            .env("RUST_LOG", self.opts.log)
            .env("SSL_CERT_FILE", &self.tls_baseline.ca_file);
        Proc::spawn(&format!("agent {name}"), cmd)
    }

    /// Starts the gateway agent `gateway` on [`TestEnv::gateway_port`] with `extra` TOML in
    /// its `[gateway]` table, and waits until it routes by the control plane's table.
    pub fn start_gateway_with(&mut self, extra: &str) {
        let table = format!(
            "\n[gateway]\nlisten = \"127.0.0.1:{}\"\nconnect_timeout = \"1s\"\nupstream_timeout = \"{}\"\n{extra}",
            self.gateway_port, self.opts.upstream_timeout
        );
        let mut proc = self.spawn_agent_with("gateway", "gateway", &self.ws_url(), &table);
        proc.wait_for_line("a route table applied", |l| {
            l.contains("route table applied")
        });
        self.gateway = Some(proc);
    }

    /// Waits until exactly `n` agents are connected, besides the gateway agent when it runs.
    pub async fn wait_for_agents(&self, n: usize) {
        self.api
            .wait_for_connected_agents(n + usize::from(self.gateway.is_some()))
            .await;
    }

    /// Asserts that `secret` is in no file under the test's directory and in no log of the
    /// processes it started.
    pub fn assert_secret_nowhere(&self, secret: &str) {
        let files = files_containing(self.dir.path(), secret.as_bytes());
        assert!(files.is_empty(), "the secret is in {files:?}");
        for proc in self.server.iter().chain(self.agents.iter()) {
            assert!(
                !proc.log_text().contains(secret),
                "the secret is in the log of {}",
                proc.label
            );
        }
    }

    /// The server's database.
    pub fn database(&self) -> Database {
        Database::in_data_dir(&self.server_data_dir())
    }

    /// The server database's journal mode.
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

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.file_type() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path);
            }
        }
    }
    found
}
