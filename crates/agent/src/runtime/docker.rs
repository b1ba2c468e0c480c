//! The Docker runtime: each instance is a container of the configured image, with the
//! checkout bind-mounted read-only at `/src` as its working directory, `sh -c <run>` as its
//! command, the service's port published on a host port of `port_range`, resource limits,
//! the labels `sdp.sandbox` (the sandbox's id), `sdp.sandbox_name` (for people),
//! `sdp.service`, `sdp.deployment` and `sdp.agent`, on one network per sandbox. Everything is
//! found again by label, so a restarted agent loses nothing; nothing is ever found by a
//! sandbox's name, which a new sandbox may carry the moment the old one has ended. A
//! container's engine restart policy follows the service's (`unless-stopped` for
//! `on-failure`, `no` for `never`), so that an engine restart brings it back; crashes after
//! that are the agent's supervisor's (`crate::supervise`).
//!
//! Deploy hosts have no registry: with `image_archive`, an engine that lacks the image gets
//! it from that tarball (`docker save`'s format, loaded as `docker load` does), at the agent's
//! start and again before a container is created without it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, NetworkCreateRequest, PortBinding, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ImportImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use sdp_protocol::{DeploymentId, LogStream, ReloadSignal, RestartPolicy, SandboxId, ServiceName};

use super::{Exit, Instance, Output, Ports, Runtime, RuntimeError, StartRequest};
use crate::lines::Splitter;
use crate::runtime_log::InstanceOutput;

/// The sandbox's id: what its containers and network are found by.
pub const LABEL_SANDBOX: &str = "sdp.sandbox";
/// The sandbox's name, for people reading `docker ps`; never used to find anything.
pub const LABEL_SANDBOX_NAME: &str = "sdp.sandbox_name";
pub const LABEL_SERVICE: &str = "sdp.service";
pub const LABEL_DEPLOYMENT: &str = "sdp.deployment";
/// The agent that started it: agents sharing an engine never touch each other's containers.
pub const LABEL_AGENT: &str = "sdp.agent";

pub struct DockerRuntime {
    docker: Docker,
    agent: String,
    image: String,
    memory: i64,
    nano_cpus: i64,
    pids: i64,
    /// Host ports, on the address they are published on.
    ports: Ports,
    publish_ip: String,
    /// The host port of each container started by this run, to free it on removal.
    published: Mutex<HashMap<String, u16>>,
    /// `uid:gid` that containers run as: user code's user, who owns the checkouts.
    user: String,
    /// Where `image` comes from when the engine lacks it.
    archive: Option<ImageArchive>,
    /// One load at a time: deploys that find the image missing together load it once.
    loading: tokio::sync::Mutex<()>,
    /// One network created at a time: a sandbox's services start side by side, and two
    /// creations of one name would both succeed and leave neither usable.
    creating_network: tokio::sync::Mutex<()>,
}

/// `docker.image_archive`, checked at start: an absolute path to a file the agent can read.
#[derive(Debug, Clone)]
pub struct ImageArchive(PathBuf);

impl ImageArchive {
    /// Fails, naming the path, when it is not a file that opens for reading; a relative path
    /// is taken from the current directory, once.
    pub fn open(path: &Path) -> Result<ImageArchive, String> {
        let absolute = std::path::absolute(path)
            .map_err(|e| format!("`docker.image_archive` {}: {e}", path.display()))?;
        let refuse = |why: String| {
            if absolute == path {
                format!("`docker.image_archive` {}: {why}", path.display())
            } else {
                format!(
                    "`docker.image_archive` {} ({}): {why}",
                    path.display(),
                    absolute.display()
                )
            }
        };
        let meta = std::fs::metadata(&absolute).map_err(|e| refuse(e.to_string()))?;
        if !meta.is_file() {
            return Err(refuse("not a file (a tarball of `docker save`)".into()));
        }
        std::fs::File::open(&absolute).map_err(|e| refuse(format!("cannot read it: {e}")))?;
        Ok(ImageArchive(absolute))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Why the engine has no usable image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The engine could not be asked: it may answer later.
    #[error("cannot ask the Docker Engine for image {image}: {reason}")]
    Engine { image: String, reason: String },
    /// The archive did not give the engine the image: the configuration is wrong.
    #[error("{0}")]
    Archive(String),
}

impl From<ImageError> for RuntimeError {
    fn from(e: ImageError) -> Self {
        RuntimeError(e.to_string())
    }
}

fn err(context: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError(format!("{context}: {e}"))
}

/// A sandbox id is `sbx_` and 16 hex digits, and a service name holds no `_` (a DNS label),
/// so `_` keeps every triple apart; the agent's name comes last, as agents sharing an engine
/// never share a container.
fn container_name(agent: &str, sandbox: &SandboxId, service: &str) -> String {
    format!("sdp_{sandbox}_{service}_{agent}")
}

fn network_name(agent: &str, sandbox: &SandboxId) -> String {
    format!("sdp_{sandbox}_{agent}")
}

/// Whether a Docker error is the engine saying "no such thing" or "already there".
fn status_is(e: &bollard::errors::Error, codes: &[u16]) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code, .. } if codes.contains(status_code))
}

pub struct DockerLimits {
    pub memory_bytes: i64,
    pub cpus: f64,
    pub pids: i64,
}

impl DockerRuntime {
    pub fn new(
        agent: &str,
        image: &str,
        limits: DockerLimits,
        ports: (u16, u16),
        publish_ip: &str,
        user: (u32, u32),
        archive: Option<ImageArchive>,
    ) -> Result<DockerRuntime, RuntimeError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| err("cannot reach the Docker Engine", e))?;
        Ok(DockerRuntime {
            docker,
            agent: agent.to_owned(),
            image: image.to_owned(),
            memory: limits.memory_bytes,
            nano_cpus: (limits.cpus * 1e9) as i64,
            pids: limits.pids,
            ports: Ports::new(ports, publish_ip),
            publish_ip: publish_ip.to_owned(),
            published: Mutex::default(),
            user: format!("{}:{}", user.0, user.1),
            archive,
            loading: tokio::sync::Mutex::default(),
            creating_network: tokio::sync::Mutex::default(),
        })
    }

    /// Makes sure the engine has the image when there is an archive to load it from: loads
    /// it when the engine lacks it, and fails, naming the archive and the image, when the
    /// engine still lacks it afterwards. Without an archive the engine is left to say what
    /// it lacks when a container is created.
    pub async fn ensure_image(&self) -> Result<(), ImageError> {
        let Some(archive) = &self.archive else {
            return Ok(());
        };
        let _loading = self.loading.lock().await;
        if self.has_image().await? {
            return Ok(());
        }
        let archive = archive.path();
        tracing::info!(image = %self.image, archive = %archive.display(), "the engine lacks the image: loading the archive");
        let loaded = self.load(archive).await?;
        if !self.has_image().await? {
            let held = if loaded.is_empty() {
                "no tagged image".to_owned()
            } else {
                loaded.join(", ")
            };
            return Err(ImageError::Archive(format!(
                "loaded `docker.image_archive` {}, but the engine still has no image {}: the archive holds {held}; set `docker.image` to one of them, or save {} into the archive",
                archive.display(),
                self.image,
                self.image
            )));
        }
        tracing::info!(image = %self.image, archive = %archive.display(), loaded = %loaded.join(", "), "image loaded");
        Ok(())
    }

    async fn has_image(&self) -> Result<bool, ImageError> {
        match self.docker.inspect_image(&self.image).await {
            Ok(_) => Ok(true),
            Err(e) if status_is(&e, &[404]) => Ok(false),
            Err(e) => Err(ImageError::Engine {
                image: self.image.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Streams `archive` to the engine's load endpoint; returns the tags it says it loaded.
    async fn load(&self, archive: &Path) -> Result<Vec<String>, ImageError> {
        let refused = |why: String| {
            ImageError::Archive(format!(
                "cannot load `docker.image_archive` {} (for image {}): {why}",
                archive.display(),
                self.image
            ))
        };
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| refused(e.to_string()))?;
        let options = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut replies =
            self.docker
                .import_image_stream(options, tokio_util::io::ReaderStream::new(file), None);
        let mut loaded = Vec::new();
        while let Some(reply) = replies.next().await {
            let reply = reply.map_err(|e| refused(e.to_string()))?;
            if let Some(tag) = reply
                .stream
                .as_deref()
                .and_then(|line| line.trim().strip_prefix("Loaded image: "))
            {
                loaded.push(tag.to_owned());
            }
        }
        Ok(loaded)
    }

    /// This agent's containers (running or not) carrying all of `labels`.
    async fn containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<(String, HashMap<String, String>)>, RuntimeError> {
        let mut labels = labels.to_vec();
        labels.push(format!("{LABEL_AGENT}={}", self.agent));
        let filters = HashMap::from([("label".to_owned(), labels)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| err("cannot list containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| Some((c.id?, c.labels.unwrap_or_default())))
            .collect())
    }

    async fn remove(&self, labels: &[String]) -> Result<(), RuntimeError> {
        for (id, found) in self.containers(labels).await? {
            let options = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            match self.docker.remove_container(&id, Some(options)).await {
                Ok(()) => {}
                Err(e) if status_is(&e, &[404, 409]) => {}
                Err(e) => return Err(err("cannot remove a container", e)),
            }
            let sandbox = found
                .get(LABEL_SANDBOX)
                .and_then(|s| SandboxId::parse(s.as_str()).ok());
            if let (Some(sandbox), Some(service)) = (sandbox, found.get(LABEL_SERVICE)) {
                let port = self
                    .published
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&container_name(&self.agent, &sandbox, service));
                if let Some(port) = port {
                    self.release(port);
                }
            }
        }
        Ok(())
    }

    async fn ensure_network(
        &self,
        sandbox: &SandboxId,
        sandbox_name: &str,
    ) -> Result<(), RuntimeError> {
        // The engine accepts a second network of the same name, and then refuses to attach
        // containers to either: look before creating, one creation at a time.
        let _turn = self.creating_network.lock().await;
        match self
            .docker
            .inspect_network(
                &network_name(&self.agent, sandbox),
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if status_is(&e, &[404]) => {}
            Err(e) => return Err(err("cannot look up the sandbox's network", e)),
        }
        let request = NetworkCreateRequest {
            name: network_name(&self.agent, sandbox),
            labels: Some(HashMap::from([
                (LABEL_SANDBOX.to_owned(), sandbox.to_string()),
                (LABEL_SANDBOX_NAME.to_owned(), sandbox_name.to_owned()),
                (LABEL_AGENT.to_owned(), self.agent.clone()),
            ])),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            Err(e) if status_is(&e, &[409]) => Ok(()),
            Err(e) => Err(err("cannot create the sandbox's network", e)),
        }
    }

    /// Follows a container's output into `out`, from where the runtime log's
    /// acknowledgements end: the engine's `since` is in whole seconds, so lines of that
    /// second already acknowledged are skipped by their timestamps.
    fn follow_logs(
        &self,
        name: String,
        out: InstanceOutput,
        lines: tokio::sync::watch::Sender<u64>,
    ) {
        let docker = self.docker.clone();
        tokio::spawn(async move {
            let source = out.service.to_string();
            let acked = out.acked_at(&source);
            let since = i32::try_from(acked / 1_000_000_000).unwrap_or(0);
            let options = LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .timestamps(true)
                .since(since)
                .build();
            let mut stream = docker.logs(&name, Some(options));
            let (mut out_lines, mut err_lines) = (Splitter::default(), Splitter::default());
            let mut last = acked;
            while let Some(Ok(chunk)) = stream.next().await {
                let (splitter, stream, message) = match chunk {
                    bollard::container::LogOutput::StdErr { message } => {
                        (&mut err_lines, LogStream::Stderr, message)
                    }
                    bollard::container::LogOutput::StdOut { message }
                    | bollard::container::LogOutput::Console { message } => {
                        (&mut out_lines, LogStream::Stdout, message)
                    }
                    bollard::container::LogOutput::StdIn { .. } => continue,
                };
                let (at, text) = timestamped(&message);
                if at != 0 && at <= acked {
                    continue;
                }
                last = last.max(at);
                for line in splitter.push(text) {
                    out.line(stream, &source, line, last).await;
                    lines.send_modify(|n| *n += 1);
                }
            }
            for (splitter, stream) in [
                (out_lines, LogStream::Stdout),
                (err_lines, LogStream::Stderr),
            ] {
                if let Some(line) = splitter.finish() {
                    out.line(stream, &source, line, last).await;
                }
            }
        });
    }

    /// The end of container `name`, through the engine's wait.
    fn exit(&self, name: String) -> Exit {
        let docker = self.docker.clone();
        Box::pin(async move {
            let mut wait = docker.wait_container(&name, None);
            match wait.next().await {
                Some(Ok(r)) => exit_reason(r.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    exit_reason(code)
                }
                Some(Err(e)) => format!("the engine lost it: {e}"),
                None => "the engine lost it".to_owned(),
            }
        })
    }
}

/// An engine's exit code: above 128, killed by signal `code - 128` (`init` passes it on).
pub(super) fn exit_reason(code: i64) -> String {
    let signal = (code > 128)
        .then(|| i32::try_from(code - 128).ok())
        .flatten()
        .and_then(|n| nix::sys::signal::Signal::try_from(n).ok());
    match signal {
        Some(signal) => format!("killed by {}", signal.as_str()),
        None => format!("exit code {code}"),
    }
}

/// A log entry's timestamp (nanoseconds after the epoch; 0 when it has none) and its text.
fn timestamped(message: &[u8]) -> (u64, &[u8]) {
    let Some(space) = message.iter().position(|b| *b == b' ') else {
        return (0, message);
    };
    let parsed = std::str::from_utf8(&message[..space]).ok().and_then(|ts| {
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()
    });
    match parsed {
        Some(ts) => (
            u64::try_from(ts.unix_timestamp_nanos()).unwrap_or(0),
            &message[space + 1..],
        ),
        None => (0, message),
    }
}

#[async_trait::async_trait]
impl Runtime for DockerRuntime {
    async fn start(&self, req: StartRequest) -> Result<Instance, RuntimeError> {
        let (sandbox, service) = (&req.sandbox_id, req.service.as_str());
        let name = container_name(&self.agent, sandbox, service);
        self.ensure_image().await?;
        self.ensure_network(sandbox, req.sandbox.as_str()).await?;
        self.stop_service(sandbox, &req.service).await?;
        // Freed if creating or starting the container fails, or this future is dropped
        // before the port is recorded in `published`.
        let lease = self.ports.lease()?;
        let host_port = lease.port();
        let container_port = format!("{}/tcp", req.port);
        let mut env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("PORT={}", req.port));
        let labels = HashMap::from([
            (LABEL_SANDBOX.to_owned(), sandbox.to_string()),
            (LABEL_SANDBOX_NAME.to_owned(), req.sandbox.to_string()),
            (LABEL_SERVICE.to_owned(), service.to_owned()),
            (LABEL_DEPLOYMENT.to_owned(), req.deployment.to_string()),
            (LABEL_AGENT.to_owned(), self.agent.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(vec!["sh".into(), "-c".into(), req.run.clone()]),
            user: Some(self.user.clone()),
            working_dir: Some("/src".into()),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![container_port.clone()]),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{}:/src:ro", req.checkout.display())]),
                port_bindings: Some(HashMap::from([(
                    container_port,
                    Some(vec![PortBinding {
                        host_ip: Some(self.publish_ip.clone()),
                        host_port: Some(host_port.to_string()),
                    }]),
                )])),
                memory: Some(self.memory),
                nano_cpus: Some(self.nano_cpus),
                pids_limit: Some(self.pids),
                network_mode: Some(network_name(&self.agent, sandbox)),
                init: Some(true),
                cap_drop: Some(vec!["ALL".into()]),
                // Back after the engine restarts, under `on-failure`; the agent's supervisor
                // handles crashes itself.
                restart_policy: Some(bollard::models::RestartPolicy {
                    name: Some(match req.restart {
                        RestartPolicy::OnFailure => RestartPolicyNameEnum::UNLESS_STOPPED,
                        RestartPolicy::Never => RestartPolicyNameEnum::NO,
                    }),
                    maximum_retry_count: None,
                }),
                security_opt: Some(vec!["no-new-privileges".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = self.docker.create_container(Some(options), body).await;
        if let Err(e) = created {
            return Err(err(&format!("cannot create container {name}"), e));
        }
        if let Err(e) = self.docker.start_container(&name, None).await {
            return Err(err(&format!("cannot start container {name}"), e));
        }
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), lease.keep());
        let generation = req.output.log.begin(sandbox, &req.service);
        let out = req
            .output
            .of(sandbox, &req.service, &req.deployment, generation);
        let (lines, output_lines) = tokio::sync::watch::channel(0);
        self.follow_logs(name.clone(), out, lines);
        let health = crate::health::origin(&self.health_host(), host_port);
        Ok(Instance {
            host_port,
            health,
            output_lines: Some(output_lines),
            exit: self.exit(name),
            upstream: None,
            changes: None,
        })
    }

    async fn adopt(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        deployment: &DeploymentId,
        output: Output,
    ) -> Result<Option<Instance>, RuntimeError> {
        let name = container_name(&self.agent, sandbox, service.as_str());
        let inspected = match self
            .docker
            .inspect_container(
                &name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(c) => c,
            Err(e) if status_is(&e, &[404]) => return Ok(None),
            Err(e) => return Err(err("cannot inspect a container", e)),
        };
        let running = inspected
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        let host_port = inspected
            .host_config
            .and_then(|h| h.port_bindings)
            .and_then(|b| b.into_values().flatten().flatten().next())
            .and_then(|b| b.host_port?.parse::<u16>().ok());
        let (true, Some(host_port)) = (running, host_port) else {
            return Ok(None);
        };
        self.ports.claim(host_port);
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), host_port);
        let generation = output.log.generation(sandbox, service);
        let (lines, output_lines) = tokio::sync::watch::channel(0);
        self.follow_logs(
            name.clone(),
            output.of(sandbox, service, deployment, generation),
            lines,
        );
        let health = crate::health::origin(&self.health_host(), host_port);
        Ok(Some(Instance {
            host_port,
            health,
            output_lines: Some(output_lines),
            exit: self.exit(name),
            upstream: None,
            changes: None,
        }))
    }

    async fn stop_service(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
    ) -> Result<(), RuntimeError> {
        self.remove(&[
            format!("{LABEL_SANDBOX}={sandbox}"),
            format!("{LABEL_SERVICE}={service}"),
        ])
        .await
    }

    async fn signal(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        signal: ReloadSignal,
    ) -> Result<(), RuntimeError> {
        // The engine signals the container's first process: the service, where the image's
        // `sh -c` runs a single command in its place (busybox and alpine do).
        let found = self
            .containers(&[
                format!("{LABEL_SANDBOX}={sandbox}"),
                format!("{LABEL_SERVICE}={service}"),
            ])
            .await?;
        if found.is_empty() {
            return Err(RuntimeError(format!("{service} has no container")));
        }
        for (id, _) in found {
            let options = bollard::query_parameters::KillContainerOptionsBuilder::default()
                .signal(&format!("SIG{}", signal.as_str()))
                .build();
            self.docker
                .kill_container(&id, Some(options))
                .await
                .map_err(|e| err("cannot signal the container", e))?;
        }
        Ok(())
    }

    async fn stop_sandbox(&self, sandbox: &SandboxId) -> Result<(), RuntimeError> {
        self.remove(&[format!("{LABEL_SANDBOX}={sandbox}")]).await?;
        // By label, so that networks named by an older version go too.
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_SANDBOX}={sandbox}"),
                format!("{LABEL_AGENT}={}", self.agent),
            ],
        )]);
        let options = bollard::query_parameters::ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|e| err("cannot list the sandbox's networks", e))?;
        for network in networks {
            let Some(id) = network.id else { continue };
            match self.docker.remove_network(&id).await {
                Ok(()) => {}
                Err(e) if status_is(&e, &[404]) => {}
                Err(e) => return Err(err("cannot remove the sandbox's network", e)),
            }
        }
        Ok(())
    }

    async fn sandboxes(&self) -> Result<Vec<SandboxId>, RuntimeError> {
        let mut ids: Vec<SandboxId> = self
            .containers(&[LABEL_SANDBOX.to_owned()])
            .await?
            .into_iter()
            .filter_map(|(_, labels)| SandboxId::parse(labels.get(LABEL_SANDBOX)?.as_str()).ok())
            .collect();
        // A network outlives a deployment that failed before its first container started.
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                LABEL_SANDBOX.to_owned(),
                format!("{LABEL_AGENT}={}", self.agent),
            ],
        )]);
        let options = bollard::query_parameters::ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|e| err("cannot list networks", e))?;
        ids.extend(
            networks
                .into_iter()
                .filter_map(|n| SandboxId::parse(n.labels?.get(LABEL_SANDBOX)?.as_str()).ok()),
        );
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

impl DockerRuntime {
    /// Where published ports are reached from this host.
    fn health_host(&self) -> String {
        match self.publish_ip.as_str() {
            "0.0.0.0" => "127.0.0.1".to_owned(),
            ip => ip.to_owned(),
        }
    }

    fn release(&self, port: u16) {
        self.ports.release(port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> SandboxId {
        SandboxId::parse(format!("sbx_{n:016x}")).unwrap()
    }

    #[test]
    fn container_names_of_different_sandboxes_and_services_never_collide() {
        assert_eq!(
            container_name("agent", &id(1), "orders"),
            "sdp_sbx_0000000000000001_orders_agent"
        );
        assert_ne!(
            container_name("agent", &id(1), "orders"),
            container_name("agent", &id(2), "orders")
        );
        assert_ne!(network_name("agent", &id(1)), network_name("agent", &id(2)));
        assert_ne!(
            container_name("x", &id(1), "orders"),
            container_name("y", &id(1), "orders")
        );
    }
}
