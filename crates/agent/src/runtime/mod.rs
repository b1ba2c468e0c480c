//! Where services run. Three runtimes keep one contract: the Docker Engine (containers),
//! plain supervised process groups (hosts without Docker, and `sdp dev`), and Kubernetes
//! (pods, which the kubelet restarts itself: such instances tell their changes).

mod docker;
mod kubernetes;
mod output;
mod ports;
mod process;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use sdp_protocol::{
    DeploymentId, ReloadSignal, RestartPolicy, SandboxId, SandboxName, ServiceName,
};

pub use docker::{DockerLimits, DockerRuntime, ImageArchive, ImageError};
pub use kubernetes::{KubernetesRuntime, KubernetesSetup};
pub(crate) use ports::Ports;
pub use process::ProcessRuntime;

use crate::events::Outbox;
use crate::runtime_log::{InstanceOutput, RuntimeLog, Tail};

/// Where an instance's output goes.
#[derive(Clone)]
pub struct Output {
    /// The sandbox's runtime log, from the instance's start.
    pub log: Arc<RuntimeLog>,
    /// The deployment's log, when a deployment starts it (until its outcome).
    pub deployment: Option<Arc<Outbox>>,
    /// Its last lines.
    pub tail: Tail,
}

impl Output {
    /// For instance `service` of `sandbox`, of its `generation`.
    pub(crate) fn of(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        deployment: &DeploymentId,
        generation: u64,
    ) -> InstanceOutput {
        InstanceOutput {
            log: self.log.clone(),
            sandbox: sandbox.clone(),
            service: service.clone(),
            generation,
            deployment: self.deployment.clone().map(|o| (o, deployment.clone())),
            tail: self.tail.clone(),
        }
    }
}

/// Resolves when an instance has ended, with why (`exit code 1`, `killed by SIGKILL`).
pub type Exit = Pin<Box<dyn Future<Output = String> + Send>>;

/// What a runtime needs to start one service instance.
pub struct StartRequest {
    /// What the instance is keyed by: its name, labels and pid file.
    pub sandbox_id: SandboxId,
    /// For people only (a label); never a key.
    pub sandbox: SandboxName,
    pub service: ServiceName,
    pub deployment: DeploymentId,
    /// The checkout: `/src` in a container, the working directory of a process.
    pub checkout: PathBuf,
    /// `HOME` of the sandbox's user code (process runtime; a container has its own).
    pub home: PathBuf,
    /// The catalog's `run`, through `sh -c`.
    pub run: String,
    /// The port the service listens on inside a container.
    pub port: u16,
    /// The catalog's health path (a pod's readiness probe).
    pub health: String,
    /// `PORT` is added by the runtime.
    pub env: BTreeMap<String, String>,
    /// What brings it back (the Docker Engine's own policy follows it, for engine restarts).
    pub restart: RestartPolicy,
    pub output: Output,
}

/// A started instance.
pub struct Instance {
    /// The host port the gateway reaches it on.
    pub host_port: u16,
    /// Where the agent checks its health: `http://host:port` where the port is published
    /// ([`crate::health::origin`]), or `https://host` of an OpenShift Route.
    pub health: String,
    /// Where the gateway reaches it, when not `advertise_host:host_port` (a pod's IP).
    pub upstream: Option<String>,
    /// Counts the output lines that reached the deployment's log, for runtimes whose output
    /// arrives late (Docker's log stream); `None` where it is immediate.
    pub output_lines: Option<tokio::sync::watch::Receiver<u64>>,
    /// Its end: for good, where the runtime restarts instances itself.
    pub exit: Exit,
    /// For a runtime that restarts instances itself (the kubelet): what happens to it.
    pub changes: Option<tokio::sync::mpsc::Receiver<Change>>,
}

/// Where an instance serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Where the agent checks its health (an origin, as [`Instance::health`]).
    pub health: String,
    /// Where the gateway reaches it.
    pub upstream: String,
}

/// What a runtime that restarts instances itself saw happen to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Not serving yet, and why (being scheduled, fetching its checkout).
    Waiting(String),
    /// It cannot start as it is (an image that cannot be pulled, a checkout not fetched);
    /// the runtime goes on trying.
    Failing(String),
    /// It ended, why; the runtime starts it again.
    Ended(String),
    /// It serves (again), there.
    Serving(Address),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(pub String);

#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// Starts an instance; a previous instance of the same service must be stopped first.
    async fn start(&self, req: StartRequest) -> Result<Instance, RuntimeError>;
    /// Takes up the instance of `service` in `sandbox` that runs already (an earlier run of
    /// the agent started it): follows its output from where the runtime log's
    /// acknowledgements end. `None` when it does not run.
    async fn adopt(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        deployment: &DeploymentId,
        output: Output,
    ) -> Result<Option<Instance>, RuntimeError>;
    /// Stops and removes the instance of `service` in sandbox `sandbox`, if there is one.
    async fn stop_service(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
    ) -> Result<(), RuntimeError>;
    /// Sends `signal` to the instance of `service` in `sandbox` (a gateway's reload): to the
    /// service itself, never to a shell that only waits for it.
    async fn signal(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        signal: ReloadSignal,
    ) -> Result<(), RuntimeError>;
    /// Stops and removes every instance of sandbox `sandbox`, and nothing of another id.
    async fn stop_sandbox(&self, sandbox: &SandboxId) -> Result<(), RuntimeError>;
    /// The sandboxes something runs of, found from the runtime itself (labels, pid files).
    async fn sandboxes(&self) -> Result<Vec<SandboxId>, RuntimeError>;
}
