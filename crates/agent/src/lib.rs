//! The SDP agent (`sdp agent --role micro|gateway`).
//!
//! An agent always dials out to the control plane's `/ws/agent`, presents the agent token in
//! the handshake, says `hello`, then answers jobs and sends heartbeats. When the connection
//! is lost it reconnects with exponential backoff and jitter, for as long as it runs.
//!
//! A micro agent also watches the instances it runs after they are healthy
//! ([`supervise`]), and sends what they print and how they fare as each sandbox's runtime log
//! ([`runtime_log`]) in `runtime` frames beside the deployments' events.

pub mod askpass;
mod config;
mod deploy;
mod events;
mod gateway;
mod gateway_routes;
mod git;
mod group;
mod health;
mod isolation;
mod lines;
mod runtime;
mod runtime_log;
mod shared_builds;
mod supervise;
mod tls;
mod unpack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sdp_protocol::{
    AgentMessage, AgentName, Capability, DeployJob, DeploymentId, FrameError, Heartbeat, Hello,
    Job, JobError, JobErrorCode, JobKind, JobOutput, ListBranches, MAX_FRAME_BYTES,
    PROTOCOL_VERSION, ProbeCredentials, Reply, Requests, Role, SandboxId, ServerMessage, Sleep,
    Teardown, WakeJob, decode_server_frame, encode,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

pub use config::{
    AgentConfig, DockerConfig, GatewayConfig, Runtime, parse_bytes, parse_port_range,
};
use deploy::Deployer;
use events::{Outbox, Queue, Stream};
use gateway::Gateway;
use gateway_routes::GatewayRoutesFiles;
pub use git::Git;
use runtime::{DockerLimits, DockerRuntime, ImageArchive, ImageError, ProcessRuntime};
use runtime_log::RuntimeLog;
use supervise::Supervisor;

/// How long to wait for the TCP and WebSocket handshake, and then for `welcome`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Replies waiting to be written; a full queue makes finished jobs wait, not pile up.
const OUTBOX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the gateway agent cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

pub struct Agent {
    config: AgentConfig,
    name: AgentName,
    /// Bound by [`Agent::bind_router`].
    router_listener: Option<tokio::net::TcpListener>,
    /// Gateway agents with `metrics_listen`: bound before running, as the router's is.
    metrics_listener: Option<tokio::net::TcpListener>,
    worker: Arc<Worker>,
    in_flight: Arc<AtomicU32>,
    /// Micro agents of the Docker runtime: what [`Agent::load_image`] asks.
    docker: Option<Arc<DockerRuntime>>,
    /// TLS for a `wss://` control plane.
    connector: Option<tokio_tungstenite::Connector>,
}

/// What jobs run with; shared by the tasks of all jobs.
struct Worker {
    git: Git,
    /// Micro agents only.
    deployer: Option<Arc<Deployer>>,
    /// Gateway agents only.
    gateway: Option<Arc<Gateway>>,
    events: Arc<Outbox>,
    /// Sandboxes' runtime logs (micro agents; empty on gateway agents).
    runtime_log: Arc<RuntimeLog>,
    /// Deployments running here, by sandbox id, so that a teardown can stop its deployment
    /// and never another's: a new sandbox may take an ended one's name at once.
    active: Mutex<HashMap<SandboxId, Running>>,
}

struct Running {
    deployment: DeploymentId,
    cancel: CancellationToken,
    done: tokio::sync::watch::Receiver<bool>,
}

/// How a connection ended.
enum End {
    Shutdown,
    /// Lost after `welcome`: the next attempt starts with a short delay again.
    Lost(String),
    /// Never got to `welcome`.
    Failed(String),
}

impl Agent {
    /// `askpass` is the program git runs for credentials: the `sdp` binary.
    pub async fn new(config: AgentConfig, askpass: PathBuf) -> Result<Self, AgentError> {
        config.validate().map_err(AgentError::Config)?;
        let name = match &config.name {
            Some(name) => name.clone(),
            // The host name alone would collide between a micro and a gateway agent on one
            // host.
            None => AgentName::parse(format!("{}-{}", hostname(), config.role)).map_err(|e| {
                AgentError::Config(format!("set `name`: the host name is not usable ({e})"))
            })?,
        };
        let layout = isolation::Layout::new(&config.work_dir).map_err(|e| {
            AgentError::Config(format!(
                "cannot resolve `work_dir` {}: {e}",
                config.work_dir.display()
            ))
        })?;
        let users =
            isolation::UserCode::from_config(config.run_as.as_deref(), config.allow_root_builds)
                .map_err(AgentError::Config)?;
        layout.prepare(&users).map_err(AgentError::Config)?;
        let git = Git::new(
            askpass,
            layout.git_home.clone(),
            layout.mirrors.clone(),
            config.git_timeout.get(),
            config.max_git_jobs,
            config.allow_local_repos,
        );
        let events = Arc::new(Outbox::default());
        let runtime_log = Arc::new(RuntimeLog::new(&layout.state));
        let mut docker = None;
        // Both roles deploy: micro agents the sandboxes' services, gateway agents the
        // sandboxes' own API gateways (`kind = "gateway"`).
        let ports = parse_port_range(&config.port_range).map_err(AgentError::Config)?;
        let runtime: Option<Arc<dyn runtime::Runtime>> = match config.runtime {
            Runtime::Process => Some(Arc::new(ProcessRuntime::new(
                &layout.run,
                users.clone(),
                ports,
                &config.advertise_host,
            ))),
            Runtime::Docker => {
                let limits = DockerLimits {
                    memory_bytes: parse_bytes(&config.docker.memory).map_err(AgentError::Config)?,
                    cpus: config.docker.cpus,
                    pids: config.docker.pids as i64,
                };
                // Published where the gateway reaches them: the advertised address when it
                // is one, else every address.
                let publish_ip = match config.advertise_host.parse::<std::net::IpAddr>() {
                    Ok(ip) => ip.to_string(),
                    Err(_) => "0.0.0.0".to_owned(),
                };
                let archive = config
                    .docker
                    .image_archive
                    .as_deref()
                    .map(ImageArchive::open)
                    .transpose()
                    .map_err(AgentError::Config)?;
                match DockerRuntime::new(
                    name.as_str(),
                    &config.docker.image,
                    limits,
                    ports,
                    &publish_ip,
                    users.owner(),
                    archive,
                ) {
                    Ok(runtime) => {
                        let runtime = Arc::new(runtime);
                        docker = Some(runtime.clone());
                        Some(runtime)
                    }
                    // A gateway agent routes whether or not its host has Docker; without
                    // it, it only cannot run sandboxes' own gateways.
                    Err(e) if config.role == Role::Gateway => {
                        tracing::warn!(error = %e, "no Docker Engine: this gateway agent routes, but cannot run sandboxes' own API gateways (`runtime = \"process\"` runs them without Docker)");
                        None
                    }
                    Err(e) => return Err(AgentError::Config(e.to_string())),
                }
            }
            Runtime::Kubernetes => {
                let kubernetes = config.kubernetes.clone().unwrap_or_default();
                // Its name is a label of every object it makes.
                let label_value = name.as_str().len() <= 63
                    && name.as_str().ends_with(|c: char| c.is_ascii_alphanumeric());
                if !label_value {
                    return Err(AgentError::Config(format!(
                        "the agent's name {:?} is not a Kubernetes label value (at most 63 characters, ending with a letter or digit): set `name`",
                        name.as_str()
                    )));
                }
                let setup = runtime::KubernetesSetup {
                    config: &kubernetes,
                    agent: name.as_str(),
                    ports,
                    advertise_host: &config.advertise_host,
                    layout: layout.clone(),
                    users: users.clone(),
                    health_timeout: config.health_timeout.get(),
                };
                let runtime = runtime::KubernetesRuntime::new(setup)
                    .await
                    .map_err(|e| AgentError::Config(e.to_string()))?;
                Some(Arc::new(runtime))
            }
        };
        // Only where user code runs as another user: the store must be out of its reach.
        let mut shared = if config.share_builds && users.is_separate() {
            Some(
                shared_builds::SharedBuilds::open(&layout.builds).map_err(|e| {
                    AgentError::Config(format!("cannot prepare {}: {e}", layout.builds.display()))
                })?,
            )
        } else {
            None
        };
        let deployer = runtime.map(|runtime| {
            let gateway_routes = (config.role == Role::Gateway)
                .then(|| Arc::new(GatewayRoutesFiles::new(users.clone())));
            Arc::new(Deployer {
                git: git.clone(),
                supervisor: Arc::new(Supervisor::new(
                    runtime,
                    runtime_log.clone(),
                    layout.clone(),
                    &config.advertise_host,
                    config.health_timeout.get(),
                )),
                outbox: events.clone(),
                layout: layout.clone(),
                users,
                build_timeout: config.build_timeout.get(),
                health_timeout: config.health_timeout.get(),
                gateway_routes,
                builds: Arc::new(tokio::sync::Semaphore::new(config.max_builds)),
                max_builds: config.max_builds,
                shared: shared.take(),
                build_runtime: match config.runtime {
                    // Pods run what the agent built on its host, as processes do.
                    Runtime::Process | Runtime::Kubernetes => "process".to_owned(),
                    Runtime::Docker => format!("docker:{}", config.docker.image),
                },
            })
        });
        let gateway = match (&config.gateway, config.role) {
            (Some(gateway), Role::Gateway) => Some(Arc::new(Gateway::new(gateway, &layout.root))),
            _ => None,
        };
        let connector = match url::Url::parse(&config.server) {
            Ok(url) if url.scheme() == "wss" => {
                Some(tls::connector(config.ca_file.as_deref()).map_err(AgentError::Config)?)
            }
            _ => None,
        };
        Ok(Self {
            connector,
            config,
            name,
            router_listener: None,
            metrics_listener: None,
            worker: Arc::new(Worker {
                git,
                deployer,
                gateway,
                events,
                runtime_log,
                active: Mutex::default(),
            }),
            in_flight: Arc::default(),
            docker,
        })
    }

    /// Micro agents of the Docker runtime with `docker.image_archive`: loads the image from
    /// the archive when the engine lacks it, before the agent runs. An archive that does not
    /// give the engine the image is a configuration error; an engine that does not answer
    /// is not (it may be starting too), and deploys load the image when they find it missing.
    pub async fn load_image(&self) -> Result<(), AgentError> {
        let Some(docker) = &self.docker else {
            return Ok(());
        };
        match docker.ensure_image().await {
            Ok(()) => Ok(()),
            Err(ImageError::Archive(e)) => Err(AgentError::Config(e)),
            Err(e @ ImageError::Engine { .. }) => {
                tracing::warn!(error = %e, "the image is not checked at start; deploys load it when they find it missing");
                Ok(())
            }
        }
    }

    pub fn name(&self) -> &AgentName {
        &self.name
    }

    /// Gateway agents: routes on `listener` instead of binding `gateway.listen`, for a caller
    /// that needs the address before the agent exists (`sdp dev`).
    pub fn use_router_listener(&mut self, listener: tokio::net::TcpListener) {
        self.router_listener = Some(listener);
    }

    /// Gateway agents: serves the router's metrics on `listener` instead of binding
    /// `gateway.metrics_listen`, for a caller that prints the address (`sdp dev`).
    pub fn use_metrics_listener(&mut self, listener: tokio::net::TcpListener) {
        self.metrics_listener = Some(listener);
    }

    /// Gateway agents: binds the router's listener, and the metrics listener when there is
    /// one, so that a taken port is an error before anything runs. Returns where the router
    /// listens.
    pub async fn bind_router(&mut self) -> Result<Option<std::net::SocketAddr>, AgentError> {
        let Some(gateway) = &self.worker.gateway else {
            return Ok(None);
        };
        if self.metrics_listener.is_none() {
            self.metrics_listener = gateway
                .bind_metrics()
                .await
                .map_err(|(addr, source)| AgentError::Listen { addr, source })?;
        }
        if self.router_listener.is_none() {
            let listener = gateway.bind().await.map_err(|source| AgentError::Listen {
                addr: self
                    .config
                    .gateway
                    .as_ref()
                    .map_or(([0, 0, 0, 0], 0).into(), |g| g.listen),
                source,
            })?;
            self.router_listener = Some(listener);
        }
        Ok(self
            .router_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok()))
    }

    /// Connects, serves, and reconnects until `shutdown` is cancelled. A gateway agent routes
    /// all along, by the last table it has, whether the control plane is there or not.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        self.bind_router().await?;
        if let (Some(gateway), Some(listener)) =
            (self.worker.gateway.clone(), self.router_listener.take())
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { gateway.serve(listener, shutdown).await });
        }
        if let (Some(gateway), Some(listener)) =
            (self.worker.gateway.clone(), self.metrics_listener.take())
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { gateway.serve_metrics(listener, shutdown).await });
        }
        // Before the first hello: instances an earlier run started are watched again, and
        // their output followed from where the control plane's acknowledgements end.
        let supervisor = self.worker.deployer.as_ref().map(|d| d.supervisor.clone());
        if let Some(supervisor) = &supervisor {
            supervisor.recover().await;
        }
        let mut attempt: u32 = 0;
        loop {
            let end = self.connection(&shutdown).await;
            let reason = match end {
                End::Shutdown => {
                    if let Some(supervisor) = &supervisor {
                        supervisor.stop().await;
                    }
                    tracing::info!(agent = %self.name, "agent stopped");
                    return Ok(());
                }
                End::Lost(reason) => {
                    attempt = 0;
                    reason
                }
                End::Failed(reason) => reason,
            };
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            tracing::warn!(agent = %self.name, %reason, retry_in_ms = delay.as_millis() as u64, "not connected to the control plane");
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(supervisor) = &supervisor {
                        supervisor.stop().await;
                    }
                    return Ok(());
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn hello(&self) -> Hello {
        let mut capabilities = vec![Capability::Git];
        match self.config.role {
            Role::Micro => capabilities.push(match self.config.runtime {
                Runtime::Docker => Capability::RuntimeDocker,
                Runtime::Process => Capability::RuntimeProcess,
                Runtime::Kubernetes => Capability::RuntimeKubernetes,
            }),
            Role::Gateway => capabilities.push(Capability::Router),
        }
        // Gateway agents run the sandboxes' own API gateways too, given a runtime.
        if self.config.role == Role::Gateway && self.worker.deployer.is_some() {
            capabilities.push(match self.config.runtime {
                Runtime::Docker => Capability::RuntimeDocker,
                Runtime::Process => Capability::RuntimeProcess,
                Runtime::Kubernetes => Capability::RuntimeKubernetes,
            });
        }
        Hello {
            protocol: PROTOCOL_VERSION,
            name: self.name.clone(),
            role: self.config.role,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            host: hostname(),
            capabilities,
            deployments: self.worker.in_progress(),
            sandboxes: self.worker.sandboxes().await,
        }
    }

    async fn connection(&self, shutdown: &CancellationToken) -> End {
        let mut request = match self.config.server.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return End::Failed(format!("bad server URL: {e}")),
        };
        let bearer = format!("Bearer {}", self.config.token.expose());
        let Ok(mut auth) = HeaderValue::from_str(&bearer) else {
            return End::Failed("the agent token holds characters a header cannot carry".into());
        };
        auth.set_sensitive(true);
        request.headers_mut().insert("authorization", auth);

        let limits = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        // `true`: TCP_NODELAY, so that small event frames are not held back by Nagle.
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(limits),
            true,
            self.connector.clone(),
        );
        let socket = tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect) => match r {
                Err(_) => return End::Failed("the control plane did not answer in time".into()),
                Ok(Err(tungstenite::Error::Http(response))) if response.status() == 401 => {
                    return End::Failed("the control plane refused the agent token (401); check `token`".into());
                }
                Ok(Err(e)) => {
                    let why = tls::explain(&e).unwrap_or_else(|| e.to_string());
                    return End::Failed(format!("cannot connect to {}: {why}", self.config.server));
                }
                Ok(Ok((socket, _))) => socket,
            },
        };
        let (mut sink, mut stream) = socket.split();

        let hello = encode(&AgentMessage::Hello(self.hello().await));
        if let Err(e) = send(&mut sink, Message::Text(hello.into())).await {
            return End::Failed(format!("cannot send hello: {e}"));
        }
        let interval = match tokio::time::timeout(HANDSHAKE_TIMEOUT, welcome(&mut stream)).await {
            Ok(Ok(interval)) => interval,
            Ok(Err(reason)) => return End::Failed(reason),
            Err(_) => return End::Failed("no welcome from the control plane".into()),
        };
        tracing::info!(agent = %self.name, role = %self.config.role, server = %self.config.server, "connected to the control plane");
        if let Some(gateway) = &self.worker.gateway {
            gateway.connected();
        }

        // The control plane answers every heartbeat; three intervals of silence mean it is
        // gone even if TCP has not noticed.
        let silence_limit = interval * 3;
        let mut last_heard = tokio::time::Instant::now();
        let mut beat = tokio::time::interval(interval);
        let (outbox, replies) = mpsc::channel::<AgentMessage>(OUTBOX);
        let connection_done = CancellationToken::new();
        let _stop_jobs = connection_done.clone().drop_guard();
        if let Some(gateway) = &self.worker.gateway {
            // The router's wakes and activity, on this connection only.
            tokio::spawn(
                gateway
                    .clone()
                    .report(outbox.clone(), connection_done.clone()),
            );
        }
        let events = self.worker.events.clone();
        // Whatever the control plane has not acknowledged goes out again on this connection.
        events.rewind();
        let runtime_log = self.worker.runtime_log.clone();
        runtime_log.rewind();
        // Reading and writing run apart, so that a flood of events going out never keeps the
        // acknowledgements coming in from being read.
        let stop_writing = CancellationToken::new();
        let writer = tokio::spawn(write_frames(
            sink,
            replies,
            events,
            runtime_log,
            stop_writing.clone(),
        ));
        let end = loop {
            let answer = tokio::select! {
                _ = shutdown.cancelled() => break End::Shutdown,
                _ = stop_writing.cancelled() => break End::Lost(String::new()),
                _ = beat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        break End::Lost("the control plane fell silent".into());
                    }
                    AgentMessage::Heartbeat(Heartbeat {
                        load: self.in_flight.load(Ordering::Relaxed),
                        running: u32::try_from(self.worker.lock_active().len()).unwrap_or(u32::MAX),
                    })
                }
                frame = stream.next() => {
                    let frame = match frame {
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) => break End::Lost(format!("connection failed: {e}")),
                        None => break End::Lost("the control plane closed the connection".into()),
                    };
                    last_heard = tokio::time::Instant::now();
                    match frame {
                        Message::Text(text) => match decode_server_frame(&text) {
                            Ok(msg) => match self.handle(msg, &outbox, &connection_done) {
                                Some(answer) => answer,
                                None => continue,
                            },
                            Err(e) => {
                                tracing::warn!(error = %e, "unreadable frame from the control plane");
                                AgentMessage::Error(e.to_protocol_error())
                            }
                        },
                        Message::Binary(_) => AgentMessage::Error(FrameError::Binary.to_protocol_error()),
                        Message::Close(_) => break End::Lost("the control plane closed the connection".into()),
                        _ => continue,
                    }
                }
            };
            if tokio::time::timeout(HANDSHAKE_TIMEOUT, outbox.send(answer))
                .await
                .is_err()
            {
                break End::Lost("the control plane stopped reading".into());
            }
        };
        stop_writing.cancel();
        let write_error = writer.await.unwrap_or_default();
        match end {
            End::Lost(reason) if reason.is_empty() => End::Lost(write_error),
            end => end,
        }
    }

    /// Handles one frame of the control plane; jobs run in their own tasks and reply through
    /// `outbox`.
    fn handle(
        &self,
        msg: ServerMessage,
        outbox: &mpsc::Sender<AgentMessage>,
        connection_done: &CancellationToken,
    ) -> Option<AgentMessage> {
        match msg {
            ServerMessage::Job(job) => {
                self.spawn_job(job, outbox.clone(), connection_done.clone());
                None
            }
            ServerMessage::Ack { deployment, seq } => {
                self.worker.events.ack(&deployment, seq);
                None
            }
            ServerMessage::Resend {
                deployment,
                from_seq,
            } => {
                tracing::info!(%deployment, from_seq, "the control plane asks for events again");
                self.worker.events.resend(&deployment, from_seq);
                None
            }
            ServerMessage::RuntimeAck { sandbox, seq } => {
                self.worker.runtime_log.ack(&sandbox, seq);
                None
            }
            ServerMessage::RuntimeResend { sandbox, from_seq } => {
                tracing::info!(%sandbox, from_seq, "the control plane asks for runtime events again");
                self.worker.runtime_log.resend(&sandbox, from_seq);
                None
            }
            ServerMessage::Heartbeat | ServerMessage::Welcome(_) => None,
            ServerMessage::Error(e) => {
                tracing::warn!(code = %e.code, message = %e.message, "the control plane reported a protocol error");
                None
            }
        }
    }

    fn spawn_job(&self, job: Job, outbox: mpsc::Sender<AgentMessage>, done: CancellationToken) {
        let worker = self.worker.clone();
        let in_flight = self.in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let Job { id, job } = job;
            let name = job.name();
            tracing::debug!(%id, job = name, "job started");
            let run = worker.run_job(job);
            let output = tokio::select! {
                // The reply could not reach anyone once the connection is gone.
                _ = done.cancelled() => None,
                output = run => Some(output),
            };
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Some(output) = output {
                tracing::debug!(%id, job = name, ok = !matches!(output, JobOutput::Failed(_)), "job finished");
                let _ = outbox
                    .send(AgentMessage::Reply(Reply::new(id, output)))
                    .await;
            }
        });
    }
}

impl Worker {
    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Running>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deployments in progress or with events not yet acknowledged.
    fn in_progress(&self) -> Vec<DeploymentId> {
        let mut list: Vec<DeploymentId> = self
            .lock_active()
            .values()
            .map(|r| r.deployment.clone())
            .collect();
        list.extend(self.events.pending_deployments());
        list.sort();
        list.dedup();
        list
    }

    /// Every sandbox this agent holds anything of: instances, and folders (checkouts, home,
    /// state). The control plane tears down those it no longer has, so that a sandbox deleted
    /// while the agent was away leaves nothing behind here.
    async fn sandboxes(&self) -> Vec<SandboxId> {
        match &self.deployer {
            Some(d) => d.sandboxes().await,
            None => Vec::new(),
        }
    }

    async fn run_job(self: &Arc<Self>, job: JobKind) -> JobOutput {
        match job {
            JobKind::ProbeCredentials(ProbeCredentials { repo, credentials }) => {
                match self.git.probe(&repo, &credentials).await {
                    Ok(()) => JobOutput::CredentialsAccepted,
                    Err(e) => JobOutput::Failed(e),
                }
            }
            JobKind::ListBranches(ListBranches { repo, credentials }) => {
                match self.git.branches(&repo, &credentials).await {
                    Ok(branches) => JobOutput::Branches { branches },
                    Err(e) => JobOutput::Failed(e),
                }
            }
            JobKind::Deploy(job) => self.start_deploy(job),
            JobKind::Teardown(Teardown { sandbox_id }) => self.teardown(sandbox_id).await,
            JobKind::Routes(table) => match &self.gateway {
                Some(gateway) => {
                    let applied = gateway.install(&table);
                    // The sandboxes' own gateways follow the table the router uses.
                    if applied == JobOutput::RoutesApplied
                        && let Some(deployer) = &self.deployer
                        && let Some(files) = &deployer.gateway_routes
                    {
                        files.apply(&table, &deployer.supervisor).await;
                    }
                    applied
                }
                None => unsupported("only gateway agents route"),
            },
            JobKind::Requests(Requests { sandbox }) => match &self.gateway {
                Some(gateway) => gateway.requests(&sandbox),
                None => unsupported("only gateway agents route"),
            },
            JobKind::Sleep(Sleep { sandbox_id }) => self.sleep(sandbox_id).await,
            JobKind::Wake(WakeJob { sandbox_id }) => self.wake(sandbox_id).await,
        }
    }

    /// Takes a deploy job: it runs in its own task; its progress goes out as events. A job
    /// that supersedes the deployment of its sandbox running here cancels it, and runs once
    /// it has stopped (the sandbox's lock keeps the two apart too).
    fn start_deploy(self: &Arc<Self>, job: DeployJob) -> JobOutput {
        let Some(deployer) = self.deployer.clone() else {
            return unsupported(
                "this agent has no runtime to run services: its Docker Engine was not reachable at start",
            );
        };
        let mut active = self.lock_active();
        let previous = match active.get(&job.sandbox_id) {
            Some(running) if job.supersedes.as_ref() == Some(&running.deployment) => {
                tracing::info!(deployment = %job.deployment, superseded = %running.deployment, "deployment superseded");
                running.cancel.cancel();
                Some(running.done.clone())
            }
            Some(running) => {
                return JobOutput::Failed(JobError {
                    code: JobErrorCode::Failed,
                    message: format!(
                        "deployment {} of this sandbox is still running here",
                        running.deployment
                    ),
                });
            }
            None => None,
        };
        let cancel = CancellationToken::new();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let sandbox_id = job.sandbox_id.clone();
        let deployment = job.deployment.clone();
        active.insert(
            sandbox_id.clone(),
            Running {
                deployment: deployment.clone(),
                cancel: cancel.clone(),
                done,
            },
        );
        drop(active);
        tracing::info!(%deployment, sandbox = %job.sandbox, %sandbox_id, "deployment taken");
        let worker = self.clone();
        tokio::spawn(async move {
            if let Some(mut stopped) = previous {
                let _ = stopped.wait_for(|d| *d).await;
            }
            deployer.run(job, cancel).await;
            let mut active = worker.lock_active();
            // A deployment that superseded this one holds the entry by now.
            if active
                .get(&sandbox_id)
                .is_some_and(|r| r.deployment == deployment)
            {
                active.remove(&sandbox_id);
            }
            drop(active);
            let _ = done_tx.send(true);
        });
        JobOutput::Accepted
    }

    /// A sleep or a wake waits for no deployment: one in progress is refused clearly.
    fn deploying(&self, sandbox: &SandboxId) -> Option<JobOutput> {
        let active = self.lock_active();
        let running = active.get(sandbox)?;
        Some(JobOutput::Failed(JobError {
            code: JobErrorCode::Failed,
            message: format!(
                "deployment {} of this sandbox is still running here",
                running.deployment
            ),
        }))
    }

    async fn sleep(&self, sandbox: SandboxId) -> JobOutput {
        let Some(deployer) = self.deployer.clone() else {
            return unsupported("only micro agents run sandboxes");
        };
        if let Some(refused) = self.deploying(&sandbox) {
            return refused;
        }
        // In a task of its own: a connection lost meanwhile must not leave it half done.
        let supervisor = deployer.supervisor.clone();
        let slept = tokio::spawn(async move { supervisor.sleep(&sandbox).await })
            .await
            .unwrap_or_else(|e| Err(format!("the sleep failed: {e}")));
        match slept {
            Ok(()) => JobOutput::Slept,
            Err(message) => JobOutput::Failed(JobError {
                code: JobErrorCode::Failed,
                message,
            }),
        }
    }

    async fn wake(&self, sandbox: SandboxId) -> JobOutput {
        let Some(deployer) = self.deployer.clone() else {
            return unsupported("only micro agents run sandboxes");
        };
        if let Some(refused) = self.deploying(&sandbox) {
            return refused;
        }
        let supervisor = deployer.supervisor.clone();
        let woken = tokio::spawn(async move { supervisor.wake(&sandbox).await })
            .await
            .unwrap_or_else(|e| Err(format!("the wake failed: {e}")));
        match woken {
            Ok(services) => JobOutput::Woken { services },
            Err(message) => JobOutput::Failed(JobError {
                code: JobErrorCode::Failed,
                message,
            }),
        }
    }

    async fn teardown(&self, sandbox: SandboxId) -> JobOutput {
        let Some(deployer) = self.deployer.clone() else {
            return unsupported("only micro agents run sandboxes");
        };
        // A deployment of this sandbox in progress stops first; one of another sandbox of the
        // same name runs on.
        let running = self
            .lock_active()
            .get(&sandbox)
            .map(|r| (r.cancel.clone(), r.done.clone()));
        if let Some((cancel, mut done)) = running {
            cancel.cancel();
            let _ = done.wait_for(|d| *d).await;
        }
        if let Some(files) = &deployer.gateway_routes {
            files.forget(&sandbox);
        }
        match deployer.teardown(&sandbox).await {
            Ok(()) => {
                tracing::info!(sandbox_id = %sandbox, "sandbox torn down");
                JobOutput::TornDown
            }
            Err(message) => JobOutput::Failed(JobError {
                code: JobErrorCode::Failed,
                message,
            }),
        }
    }
}

fn unsupported(message: &str) -> JobOutput {
    JobOutput::Failed(JobError {
        code: JobErrorCode::Unsupported,
        message: message.to_owned(),
    })
}

/// Events sent in one frame at most, and the most its frame takes encoded: far below the
/// 1 MiB limit, and room for the largest single event.
const BATCH_EVENTS: usize = 512;
const BATCH_BYTES: usize = 256 * 1024;
const _: () = assert!(events::MAX_EVENT_BYTES < BATCH_BYTES && BATCH_BYTES < MAX_FRAME_BYTES);

/// The next batch of `queue`'s unsent events, as its frame.
fn next_frame<S: Stream>(queue: &Queue<S>) -> Option<String> {
    let batch = queue.next_batch(BATCH_EVENTS, BATCH_BYTES);
    (!batch.is_empty()).then(|| encode(&S::frame(batch)))
}

/// Writes the connection's frames: replies and heartbeats first, then batches of unsent
/// deployment and runtime events in turn; when stopped, closes the socket. A failed write
/// stops the reader too, through `stop`, and is returned as the reason.
async fn write_frames<S>(
    mut sink: S,
    mut replies: mpsc::Receiver<AgentMessage>,
    events: Arc<Outbox>,
    runtime_log: Arc<RuntimeLog>,
    stop: CancellationToken,
) -> String
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let result: Result<(), String> = async {
        loop {
            while let Ok(msg) = replies.try_recv() {
                send_message(&mut sink, msg).await?;
            }
            let frames = [next_frame(&*events), next_frame(runtime_log.queue())];
            if frames.iter().any(Option::is_some) {
                for frame in frames.into_iter().flatten() {
                    send(&mut sink, Message::Text(frame.into())).await?;
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = send(&mut sink, Message::Close(None)).await;
                    return Ok(());
                }
                Some(msg) = replies.recv() => {
                    send_message(&mut sink, msg).await?;
                }
                _ = events.wait() => {}
                _ = runtime_log.wait() => {}
            }
        }
    }
    .await;
    match result {
        Ok(()) => String::new(),
        Err(e) => {
            stop.cancel();
            format!("cannot send: {e}")
        }
    }
}

/// Writes a message: a reply as the frames that carry it (a long list in parts, each within the
/// frame limit), anything else as one frame.
async fn send_message<S>(sink: &mut S, msg: AgentMessage) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let frames = match msg {
        AgentMessage::Reply(reply) => reply.into_frames(),
        // Heartbeats and protocol errors: short by construction.
        msg => vec![encode(&msg)],
    };
    for frame in frames {
        send(sink, Message::Text(frame.into())).await?;
    }
    Ok(())
}

/// Writes one frame, giving up after [`HANDSHAKE_TIMEOUT`]: a control plane that stops
/// reading must not stall the agent's connection loop.
async fn send<S>(sink: &mut S, msg: Message) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the control plane stopped reading".to_owned()),
    }
}

/// Waits for `welcome` and returns the heartbeat interval it asks for.
async fn welcome<S>(stream: &mut S) -> Result<Duration, String>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    while let Some(frame) = stream.next().await {
        let text = match frame {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        return match decode_server_frame(&text) {
            Ok(ServerMessage::Welcome(w)) => {
                Ok(Duration::from_millis(w.heartbeat_interval_ms.max(100)))
            }
            Ok(ServerMessage::Error(e)) => Err(format!(
                "the control plane refused the agent: {} ({})",
                e.message, e.code
            )),
            Ok(_) => Err("the control plane did not answer hello with welcome".into()),
            Err(e) => Err(format!("unreadable answer to hello: {e}")),
        };
    }
    Err("the control plane closed the connection after hello".into())
}

/// Exponential backoff with jitter: attempt 0 waits about 250 ms, doubling up to 30 s, each
/// delay drawn between half and all of its cap so that agents restarted together spread out.
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    let half = cap / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// The host name, from the kernel.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::tests::{deployer, id};

    fn worker(work_dir: &std::path::Path) -> Arc<Worker> {
        let deployer = deployer(work_dir);
        Arc::new(Worker {
            git: deployer.git.clone(),
            events: deployer.outbox.clone(),
            runtime_log: deployer.supervisor.log.clone(),
            deployer: Some(Arc::new(deployer)),
            gateway: None,
            active: Mutex::default(),
        })
    }

    /// A deployment in progress of `sandbox`, as [`Worker::start_deploy`] records it, that
    /// ends when cancelled. Returns its cancellation token.
    fn deploying(worker: &Worker, sandbox: &SandboxId, deployment: u64) -> CancellationToken {
        let cancel = CancellationToken::new();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let deployment = DeploymentId::parse(format!("dep_{deployment:016x}")).unwrap();
        worker.lock_active().insert(
            sandbox.clone(),
            Running {
                deployment,
                cancel: cancel.clone(),
                done,
            },
        );
        let cancelled = cancel.clone();
        tokio::spawn(async move {
            cancelled.cancelled().await;
            let _ = done_tx.send(true);
        });
        cancel
    }

    #[tokio::test]
    async fn a_teardown_stops_only_the_deployment_of_its_own_sandbox_id() {
        let work = tempfile::tempdir().unwrap();
        let worker = worker(work.path());
        let layout = &worker.deployer.as_ref().unwrap().layout;
        // `rm x` and `deploy x` at once: the new sandbox x is deploying while the old one,
        // of the same name, is torn down.
        let (old, new) = (id(0xa), id(0xb));
        let old_deploy = deploying(&worker, &old, 1);
        let new_deploy = deploying(&worker, &new, 2);
        for sandbox in [&old, &new] {
            std::fs::create_dir_all(layout.checkouts_of(sandbox).join("orders")).unwrap();
        }

        assert_eq!(worker.teardown(old.clone()).await, JobOutput::TornDown);

        assert!(old_deploy.is_cancelled());
        assert!(
            !new_deploy.is_cancelled(),
            "the new sandbox's deployment was cancelled"
        );
        assert!(!layout.checkouts_of(&old).exists());
        assert!(layout.checkouts_of(&new).join("orders").is_dir());
    }

    fn dep(n: u64) -> DeploymentId {
        DeploymentId::parse(format!("dep_{n:016x}")).unwrap()
    }

    /// A deploy job of nothing for `sandbox`, superseding `supersedes` if given.
    fn job(sandbox: &SandboxId, deployment: u64, supersedes: Option<u64>) -> DeployJob {
        DeployJob {
            deployment: dep(deployment),
            sandbox_id: sandbox.clone(),
            sandbox: sdp_protocol::SandboxName::parse("pay").unwrap(),
            credentials: sdp_protocol::Credentials {
                username: sdp_protocol::Username::parse("alice").unwrap(),
                password: sdp_protocol::Password::parse("pw".into()).unwrap(),
            },
            gateway_url: "http://127.0.0.1:9".into(),
            services: Vec::new(),
            supersedes: supersedes.map(dep),
            after_seq: 0,
        }
    }

    #[tokio::test]
    async fn a_deploy_job_cancels_the_running_deployment_it_supersedes_and_no_other() {
        let work = tempfile::tempdir().unwrap();
        let worker = worker(work.path());
        let sandbox = id(0xa);
        let running = deploying(&worker, &sandbox, 1);
        // One deployment at a time: a job that names no deployment, or another one, is
        // refused and stops nothing.
        for refused in [job(&sandbox, 2, None), job(&sandbox, 3, Some(9))] {
            assert!(
                matches!(worker.start_deploy(refused), JobOutput::Failed(_)),
                "taken while another deployment runs"
            );
        }
        assert!(!running.is_cancelled());

        assert_eq!(
            worker.start_deploy(job(&sandbox, 4, Some(1))),
            JobOutput::Accepted
        );
        assert!(running.is_cancelled());
        // The new deployment holds the sandbox from now on.
        let holder = || {
            worker
                .lock_active()
                .get(&sandbox)
                .map(|r| r.deployment.clone())
        };
        assert_eq!(holder(), Some(dep(4)));
    }

    #[tokio::test]
    async fn the_hello_lists_every_sandbox_with_folders_left_here() {
        let work = tempfile::tempdir().unwrap();
        let worker = worker(work.path());
        let layout = &worker.deployer.as_ref().unwrap().layout;
        assert!(worker.sandboxes().await.is_empty());
        // Deleted while the agent was away: nothing runs, its checkout and home are left.
        std::fs::create_dir_all(layout.checkouts_of(&id(7)).join("orders")).unwrap();
        std::fs::create_dir_all(layout.home_of(&id(7))).unwrap();
        std::fs::create_dir_all(layout.home_of(&id(5))).unwrap();
        assert_eq!(worker.sandboxes().await, [id(5), id(7)]);
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_up_to_a_cap() {
        for attempt in 0..40 {
            let cap = BACKOFF_FIRST
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_MAX);
            let d = backoff(attempt);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }
}
