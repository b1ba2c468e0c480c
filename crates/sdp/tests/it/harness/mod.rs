//! The integration-test harness: a real git server with Basic auth, and the real `sdp` binary
//! started as a server and as agents, on port 0, in a temporary directory per test.
//!
//! When a test fails, dropping the [`TestEnv`] prints every process's command line and log,
//! so a red test says why without a rerun.

pub mod baseline;
pub mod git_server;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub use baseline::{Baseline, TlsBaseline};
pub use git_server::GitServer;

pub const AGENT_TOKEN: &str = "test-agent-token-0123456789";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "correct horse battery staple";
/// Sandboxes are `<name>.sdp.test` on the router (`.test` never resolves outside).
pub const BASE_DOMAIN: &str = "sdp.test";

/// The log level of the processes a test starts: ours at debug.
pub const DEFAULT_LOG: &str = "info,sdp=debug,sdp_server=debug,sdp_agent=debug";

pub fn sdp_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sdp")
}

/// Runs `sdp` with `args` and, of the `SDP_*` variables, only those of `env`; returns its
/// exit status, stdout and stderr.
pub fn run_sdp(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(sdp_bin());
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("SDP_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `sdp` process whose output is collected line by line.
pub struct Proc {
    pub label: String,
    pub command: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(label: &str, mut cmd: Command) -> Proc {
        // Only what the test sets: no SDP_* variable of the developer's shell leaks in.
        for (key, _) in std::env::vars() {
            if key.starts_with("SDP_") {
                cmd.env_remove(key);
            }
        }
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", DEFAULT_LOG);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so that dropping it ends whatever it started too (git,
        // Chromium under chromedriver).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let command = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            label: label.to_owned(),
            command,
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a line satisfies `pred`, and returns it.
    pub fn wait_for_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before {what}\ncommand: {}\n{}",
                    self.label,
                    self.command,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged {what}\ncommand: {}\n{}",
                self.label,
                self.command,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Knobs of a test environment.
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
    /// Agents get `work_dir = "./agent-<name>"`, relative to the test's directory, where
    /// they are started.
    pub relative_work_dir: bool,
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
            micro_agents: 1,
            gateway: true,
            runtime: "process",
            log: DEFAULT_LOG,
            agent_extra: "",
            relative_work_dir: false,
        }
    }
}

/// Typed requests to one SDP server.
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str) -> Api {
        Api {
            url: url.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    pub async fn post_json(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        let mut req = self.http.post(format!("{}{path}", self.url)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn login_as(&self, user: &str, password: &str) -> Reply {
        self.post_json(
            "/api/login",
            None,
            json!({"username": user, "password": password}),
        )
        .await
    }

    /// A service instance's answer to `GET /` at `upstream` (`host:port`).
    pub async fn answer(&self, upstream: &str) -> String {
        self.http
            .get(format!("http://{upstream}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `POST /api/sandboxes` with `SERVICE@BRANCH` selections.
    pub async fn create_sandbox(&self, token: &str, name: &str, selections: &[&str]) -> Reply {
        self.post_json(
            "/api/sandboxes",
            Some(token),
            json!({"name": name, "services": selection_list(selections)}),
        )
        .await
    }

    /// `POST /api/sandboxes/{name}/deploy`.
    pub async fn redeploy(&self, token: &str, name: &str, selections: &[&str]) -> Reply {
        self.post_json(
            &format!("/api/sandboxes/{name}/deploy"),
            Some(token),
            json!({"services": selection_list(selections)}),
        )
        .await
    }

    /// `POST /api/sandboxes/{name}/deploy`, then waits for that deployment to end.
    pub async fn redeploy_and_wait(&self, token: &str, name: &str, selections: &[&str]) -> Value {
        let reply = self.redeploy(token, name, selections).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let id = reply.json()["deployment"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.wait_deployment(token, &id).await
    }

    /// Waits until deployment `id` ends, and returns it.
    pub async fn wait_deployment(&self, token: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let reply = self
                .get(&format!("/api/deployments/{id}"), Some(token))
                .await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let d = reply.json();
            if !matches!(d["state"].as_str(), Some("queued" | "running")) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "deployment {id} never ended: {d}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a sandbox and waits for its first deployment; returns (sandbox, deployment).
    pub async fn deploy(&self, token: &str, name: &str, selections: &[&str]) -> (Value, Value) {
        let reply = self.create_sandbox(token, name, selections).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let id = reply.json()["deployment"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let deployment = self.wait_deployment(token, &id).await;
        let sandbox = self
            .get(&format!("/api/sandboxes/{name}"), Some(token))
            .await
            .json();
        (sandbox, deployment)
    }

    /// Every frame of `/ws/deployments/{id}?from=`, until the server closes.
    pub async fn log_frames(&self, token: &str, id: &str, from: u64) -> Vec<Value> {
        let url = format!(
            "{}/ws/deployments/{id}?from={from}",
            self.url.replacen("http://", "ws://", 1)
        );
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut frames = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(120), socket.next())
                .await
                .expect("a frame or the close within 120s");
            match next {
                Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(_))) | None => return frames,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("log socket failed after {frames:?}: {e}"),
            }
        }
    }

    /// `GET /api/services/{service}/branches` as sorted (name, commit) pairs.
    pub async fn branches(&self, service: &str, token: &str) -> Vec<(String, String)> {
        let reply = self
            .get(&format!("/api/services/{service}/branches"), Some(token))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let mut pairs: Vec<(String, String)> = reply
            .json()
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {}", reply.body))
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_owned(),
                    b["commit"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        pairs.sort();
        pairs
    }
}

pub struct TestEnv {
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
    /// A git server with repositories `probe` and `orders`, the control plane, and
    /// `opts.micro_agents` micro agents, all connected.
    pub async fn start(opts: Options) -> TestEnv {
        let mut env = TestEnv::without_agents(opts.clone()).await;
        if opts.gateway {
            env.start_gateway();
        }
        for i in 0..opts.micro_agents {
            // Agents of docker tests share one engine: their names scope their containers.
            let name = match opts.runtime {
                "docker" => format!("dock-{:08x}-{i}", rand::random::<u32>()),
                _ => format!("micro-{i}"),
            };
            env.start_agent(&name, "micro", AGENT_TOKEN);
            env.micro.push(name);
        }
        env.wait_for_agents(opts.micro_agents).await;
        env
    }

    pub async fn without_agents(opts: Options) -> TestEnv {
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
        git.create_repo_with(
            "orders",
            &["main", "feature/x", "release/1.0", "broken", "unhealthy"],
            |branch| git_server::go_service("orders", branch),
        );
        git.create_repo_with("billing", &["main", "feature/y"], |branch| {
            git_server::go_service("billing", branch)
        });
        git.create_repo("payments", &["main"]);
        git.create_repo("stuck", &["main"]);
        for name in ["chatty", "steady"] {
            git.create_repo_with(name, &["main"], |_| {
                vec![("emit.py".into(), git_server::STEADY_EMITTER.into())]
            });
        }
        let tls_baseline = TlsBaseline::start(dir.path()).await;
        let gateway_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut env = TestEnv {
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

    fn server_config(&self, listen: &str) -> String {
        let o = &self.opts;
        let service = |name: &str, build: &str, run: &str| {
            // The two Go services fall back to the local baseline; the others to a port
            // where nothing listens.
            let baseline = match name {
                "orders" | "billing" => self.baseline.url(),
                "secure" => format!("https://localhost:{}", self.tls_baseline.addr.port()),
                "untrusted" => format!("https://{}", self.tls_baseline.addr),
                _ => "http://127.0.0.1:9".to_owned(),
            };
            format!(
                "[[services]]\nname = \"{name}\"\nrepo = \"{}\"\nbuild = \"{build}\"\nrun = \"{run}\"\nport = 8080\nhealth = \"/healthz\"\nroutes = [\"/{name}\"]\nbaseline = \"{baseline}\"\nenv = {{ GREETING = \"hi\" }}\n\n",
                self.git.url(name)
            )
        };
        format!(
            "listen = \"{listen}\"\ndata_dir = \"{}\"\nsession_ttl = \"{}\"\nsandbox_ttl = \"{}\"\njob_timeout = \"{}\"\nagent_timeout = \"{}\"\n\n[git]\nprobe_repo = \"{}\"\n\n[gateway]\nbase_domain = \"{BASE_DOMAIN}\"\npublic_url = \"{}\"\n\n{}{}{}{}{}{}{}{}{}",
            self.server_data_dir().display(),
            o.session_ttl,
            o.sandbox_ttl,
            o.job_timeout,
            o.agent_timeout,
            self.git.url("probe"),
            self.router_url(),
            // Real Go services; the echo shows the build's output in the log.
            service(
                "orders",
                "echo building $SDP_SERVICE && CGO_ENABLED=0 go build -o .sdp/bin/app .",
                "./.sdp/bin/app",
            ),
            service(
                "billing",
                "CGO_ENABLED=0 go build -o .sdp/bin/app .",
                "./.sdp/bin/app",
            ),
            service("payments", "true", "true"),
            service("stuck", "true", "true"),
            // For the log pipeline benchmark: a build that prints as fast as it can, and one
            // that prints 10,000 lines a second for 5 seconds.
            service(
                "chatty",
                "seq -f 'line %g of the chatty build' 1 100000",
                "true",
            ),
            service("steady", "python3 emit.py 10000 5", "true"),
            // Never deployed: their baselines are the HTTPS one.
            service("secure", "true", "true"),
            service("untrusted", "true", "true"),
            // A branch's own script, for the isolation tests' hostile builds (the test
            // creates the repository).
            service("hostile", "sh hostile.sh", "true"),
        )
    }

    /// Starts (or restarts) the control plane on `listen`.
    pub fn start_server(&mut self, listen: &str) {
        self.start_server_with(listen, "", "");
    }

    /// Starts the control plane on `listen` with `keys` (top-level `key = value` lines)
    /// before the harness's own config and `tables` (say `[[services]]`) after it.
    pub fn start_server_with(&mut self, listen: &str, keys: &str, tables: &str) {
        let path = self.dir.path().join("server.toml");
        let config = format!("{keys}\n{}\n{tables}", self.server_config(listen));
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(sdp_bin());
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
    pub fn start_gateway(&mut self) {
        let proc = self.spawn_agent("gateway", "gateway", AGENT_TOKEN, None);
        let mut proc = proc;
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

    /// Starts micro agent `name` as the unprivileged [`RUN_AS`] user instead of root, as a
    /// plain user would run `sdp agent` (builds then run as that user too).
    pub fn start_unprivileged_agent(&mut self, name: &str) {
        let work_dir = self.agent_work_dir(name);
        std::fs::create_dir_all(&work_dir).unwrap();
        let user = nix::unistd::User::from_name(RUN_AS).unwrap().unwrap();
        std::os::unix::fs::chown(&work_dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .unwrap();
        let proc = self.spawn_agent(name, "micro", AGENT_TOKEN, Some(RUN_AS));
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
        } else if self.opts.runtime == "docker" {
            format!(
                "\n[docker]\nimage = \"{}\"\nmemory = \"256m\"\ncpus = 0.5\npids = 128\n",
                docker_image()
            )
        } else {
            String::new()
        };
        let extra = if role == "micro" {
            self.opts.agent_extra
        } else {
            ""
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
                self.opts.runtime,
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
                    sdp_bin(),
                ]);
                cmd
            }
            None => Command::new(sdp_bin()),
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

    pub async fn health(&self) -> Value {
        self.http
            .get(format!("{}/api/health", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until exactly `n` agents are connected, besides the gateway agent when it runs.
    pub async fn wait_for_agents(&self, n: usize) {
        let n = n + usize::from(self.gateway.is_some());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = self.health().await;
            if health["agents"].as_u64() == Some(n as u64) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} connected agents, health says {health}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Logs in as the test user and returns the session token.
    pub async fn login(&self) -> String {
        let reply = self.login_as(USER, PASSWORD).await;
        assert_eq!(reply.status, 200, "login failed: {}", reply.body);
        reply.json()["token"].as_str().unwrap().to_owned()
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

    /// The server database's journal mode, read as `count_rows` reads.
    pub fn journal_mode(&self) -> String {
        self.sqlite("PRAGMA journal_mode")
    }

    /// Rows in a table of the server's database, read by Python's sqlite3 next to the
    /// running server (WAL mode allows it).
    pub fn count_rows(&self, table: &str) -> u64 {
        self.sqlite(&format!("SELECT COUNT(*) FROM {table}"))
            .parse()
            .unwrap()
    }

    /// The audit trail's actions, oldest first, joined by commas.
    pub fn audit_actions(&self) -> String {
        self.sqlite("SELECT group_concat(action, ',') FROM (SELECT action FROM audit ORDER BY id)")
    }

    fn sqlite(&self, query: &str) -> String {
        let db = self.server_data_dir().join("sdp.db");
        let out = Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True); print(c.execute(sys.argv[2]).fetchone()[0])",
            ])
            .arg(&db)
            .arg(query)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// The image docker tests run services in, made offline: Debian's static busybox in an
/// otherwise empty root filesystem, imported once per machine. When no engine answers, docker
/// tests are skipped, except in CI (`CI=true`), where that is a failure.
pub fn docker_image() -> &'static str {
    const TAG: &str = "sdp-test/busybox:1";
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    READY.get_or_init(|| {
        let present = Command::new("docker")
            .args(["image", "inspect", TAG])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
        for applet in [
            "sh", "ls", "cat", "echo", "env", "sleep", "wget", "ps", "id",
        ] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        std::fs::create_dir_all(root.path().join("tmp")).unwrap();
        let script = format!(
            "tar -C '{}' -c . | docker import - {TAG}",
            root.path().display()
        );
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    TAG
}

/// Whether docker tests can run; in CI a missing engine fails the test instead.
pub fn docker_available() -> bool {
    let answers = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !answers {
        assert!(
            std::env::var("CI").is_err(),
            "no Docker Engine answers, and docker tests may not be skipped in CI"
        );
        eprintln!("skipping: no Docker Engine answers");
    }
    answers
}

/// Kills every process whose working directory is under `dir`.
fn kill_processes_under(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The unprivileged user that test agents run user code as, when the tests run as root (as
/// they do in CI). Created on first use and shared by the tests; `scripts/test.sh` removes it
/// at the end.
pub const RUN_AS: &str = "sdp-it-run";

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Creates [`RUN_AS`] unless it exists; tests in parallel processes take turns (`flock`),
/// since `useradd` refuses to run while another holds `/etc/passwd`.
pub fn ensure_run_as_user() {
    let script = format!(
        "id -u {RUN_AS} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin {RUN_AS}"
    );
    let out = Command::new("flock")
        .args(["/tmp/sdp-it-useradd.lock", "sh", "-c", &script])
        .output()
        .expect("flock runs");
    assert!(
        out.status.success(),
        "cannot create the user {RUN_AS}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `run_as` line of a test agent's config: [`RUN_AS`] as root, nothing otherwise.
fn run_as_line() -> String {
    if running_as_root() {
        ensure_run_as_user();
        format!("run_as = \"{RUN_AS}\"\n")
    } else {
        String::new()
    }
}

/// `uid:gid` that user code runs as in the tests.
pub fn run_as_ids() -> String {
    let user = if running_as_root() {
        ensure_run_as_user();
        nix::unistd::User::from_name(RUN_AS).unwrap().unwrap()
    } else {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
    };
    format!("{}:{}", user.uid, user.gid)
}

/// Removes the containers and networks agent `name` left.
fn docker_cleanup(name: &str) {
    let script = format!(
        "docker ps -aq --filter label=sdp.agent={name} | xargs -r docker rm -f >/dev/null; \
         docker network ls -q --filter label=sdp.agent={name} | xargs -r docker network rm >/dev/null"
    );
    let _ = Command::new("sh").args(["-c", &script]).status();
}

/// What `docker inspect` says of `what`, as JSON.
pub fn docker_inspect(what: &str) -> Option<Value> {
    let out = Command::new("docker")
        .args(["inspect", what])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list.get(0).cloned()
}

/// The state of step `name` in a deployment from `GET /api/deployments/{id}`.
pub fn step_state(deployment: &Value, name: &str) -> String {
    deployment["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["step"] == name))
        .and_then(|s| s["state"].as_str())
        .unwrap_or_else(|| panic!("no step {name} in {deployment}"))
        .to_owned()
}

/// Polls `check` until it holds, for at most 30 s.
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn selection_list(selections: &[&str]) -> Value {
    selections
        .iter()
        .map(|s| {
            let (service, branch) = s.split_once('@').unwrap();
            json!({"service": service, "branch": branch})
        })
        .collect()
}

/// A range of 50 ports nothing listens on now, so that tests running side by side do not
/// hand out the same ports.
fn free_port_range() -> String {
    loop {
        let base = 20_000 + (rand::random::<u16>() % 800) * 50;
        if (base..base + 50).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return format!("{base}-{}", base + 49);
        }
    }
}

/// A response read whole, for assertions that print it.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub async fn from(resp: reqwest::Response) -> Reply {
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts the error shape of SPEC §11 and returns the code.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {}", self.body));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty(),
            "an error needs a message: {}",
            self.body
        );
        code.to_owned()
    }
}

/// A fake agent for faults a real one cannot be made to show: it connects and says hello,
/// then does only what the test tells it.
pub struct FakeAgent {
    pub sink: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Message,
    >,
    pub stream: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
}

impl FakeAgent {
    pub async fn connect(env: &TestEnv, name: &str) -> FakeAgent {
        match FakeAgent::try_connect(env, name, "fake-host").await {
            Ok(fake) => fake,
            Err(answer) => panic!("no welcome: {answer}"),
        }
    }

    /// Says hello as a micro agent on `host`; the server's answer when it is not `welcome`.
    pub async fn try_connect(env: &TestEnv, name: &str, host: &str) -> Result<FakeAgent, Value> {
        FakeAgent::try_connect_as(env, name, host, "micro").await
    }

    /// A fake agent of `role` (`micro` or `gateway`).
    pub async fn connect_as(env: &TestEnv, name: &str, role: &str) -> FakeAgent {
        match FakeAgent::try_connect_as(env, name, "fake-host", role).await {
            Ok(fake) => fake,
            Err(answer) => panic!("no welcome: {answer}"),
        }
    }

    async fn try_connect_as(
        env: &TestEnv,
        name: &str,
        host: &str,
        role: &str,
    ) -> Result<FakeAgent, Value> {
        let mut req = env.ws_url().into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {AGENT_TOKEN}").parse().unwrap(),
        );
        let (socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let (mut sink, mut stream) = socket.split();
        let hello = json!({"type": "hello", "protocol": sdp_protocol::PROTOCOL_VERSION, "name": name, "role": role,
            "version": "fake", "host": host, "capabilities": ["git"]});
        sink.send(Message::Text(hello.to_string().into()))
            .await
            .unwrap();
        let answer = next_json(&mut stream).await;
        if answer["type"] != "welcome" {
            return Err(answer);
        }
        Ok(FakeAgent { sink, stream })
    }

    pub async fn send_text(&mut self, text: &str) {
        self.sink
            .send(Message::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    pub async fn next_json(&mut self) -> Value {
        next_json(&mut self.stream).await
    }

    /// The next job frame whose job is `name`; other frames are skipped.
    pub async fn next_job(&mut self, name: &str) -> Value {
        loop {
            let frame = self.next_json().await;
            if frame["type"] == "job" && frame["job"]["name"] == name {
                return frame;
            }
        }
    }

    pub async fn reply(&mut self, job: &Value, output: Value) {
        let reply = json!({"type": "reply", "id": job["id"], "output": output});
        self.send_text(&reply.to_string()).await;
    }
}

pub async fn next_json<S>(stream: &mut S) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        // Generous: a frame may wait for a build, which a cold Go cache makes slow.
        let frame = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a frame within 60s")
            .expect("the connection is open")
            .expect("a frame");
        if let Message::Text(t) = frame {
            return serde_json::from_str(&t).unwrap();
        }
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

/// Agents and servers with configuration the standard ones lack (TLS, trusted proxies,
/// limits, extra catalog services).
impl TestEnv {
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
        let mut cmd = Command::new(sdp_bin());
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

    /// Restarts the control plane on its address with `keys` (top-level `key = value` lines)
    /// before the harness's own config and `tables` (say `[[services]]`) after it.
    pub fn restart_server_with(&mut self, keys: &str, tables: &str) {
        let listen = self.url.trim_start_matches("http://").to_owned();
        self.stop_server();
        self.start_server_with(&listen, keys, tables);
    }
}
