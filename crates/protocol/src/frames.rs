//! The frames of `/ws/agent`: what an agent says ([`AgentMessage`]) and what the control plane
//! says ([`ServerMessage`]). Each is one JSON text frame with a `type` field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::sizing::split_escaped;
use crate::{
    AgentName, BranchName, Credentials, DeploymentId, RepoUrl, RouteDecision, RouteTable,
    SandboxId, SandboxName, ServiceName,
};

/// Bumped on any change an older peer would misread. The agent states it in `hello`; the
/// control plane refuses an agent that speaks another version. 3: replies may come in parts
/// (`more`), which an older control plane would take for the whole answer. 4: agents key
/// sandboxes by id (`sandbox_id` in deploy and teardown jobs, ids in `hello`), and the
/// control plane asks for events again with `resend`. 5: agents watch instances after
/// `ready` and report them in `runtime` frames (a sandbox's runtime log and its instances'
/// states), acknowledged with `runtime_ack`; deploy jobs say how to watch each service.
/// 6: gateway agents take deploy jobs (a sandbox's own API gateway, with `gateway` in its
/// spec, continuing the log after `after_seq`), and a deploy job may supersede one in
/// progress (`supersedes`), which an older agent would refuse as still running.
pub const PROTOCOL_VERSION: u32 = 6;

/// No frame in either direction may be larger than this. Senders size what they put in a
/// frame by its encoded bytes ([`crate::encoded_len`]), so they never reach it.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Frames an agent sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The first frame on every connection.
    Hello(Hello),
    Heartbeat(Heartbeat),
    Reply(Reply),
    /// Events in the order they happened, of one or more deployments. Batched so that a
    /// flood of log lines costs few frames and few acknowledgements.
    Events {
        events: Vec<Event>,
    },
    /// Events of sandboxes' runtime logs, in the order they happened: what instances print,
    /// and how they fare, after they started.
    Runtime {
        events: Vec<RuntimeEvent>,
    },
    /// Gateway agents: the sandboxes that had requests routed to them since the last report
    /// (sent every few seconds while there are any): what keeps a sandbox awake.
    Activity {
        sandboxes: Vec<SandboxName>,
    },
    /// Gateway agents: a request names `sandbox`, which sleeps: the router holds it until the
    /// sandbox runs again (a route table without `sleeping`), or gives up.
    Wake {
        sandbox: SandboxName,
    },
    /// The agent could not read a frame of the control plane.
    Error(ProtocolError),
}

/// Frames the control plane sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The answer to `hello`: the agent is registered.
    Welcome(Welcome),
    /// The answer to an agent's heartbeat, so that both sides notice a dead peer.
    Heartbeat,
    Job(Job),
    /// Events up to and including `seq` of `deployment` are stored; the agent may forget them.
    Ack {
        deployment: DeploymentId,
        seq: u64,
    },
    /// The control plane could not store `deployment`'s events from `from_seq` on: the agent
    /// sends them again, from there, on this connection.
    Resend {
        deployment: DeploymentId,
        from_seq: u64,
    },
    /// Runtime events of `sandbox` up to and including `seq` are stored.
    RuntimeAck {
        sandbox: SandboxId,
        seq: u64,
    },
    /// The control plane could not store `sandbox`'s runtime events from `from_seq` on: the
    /// agent sends them again, from there, on this connection.
    RuntimeResend {
        sandbox: SandboxId,
        from_seq: u64,
    },
    /// The control plane could not read a frame of the agent, or refuses it.
    Error(ProtocolError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Fetches, builds and runs services.
    Micro,
    /// Runs the sandbox router.
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Micro => "micro",
            Role::Gateway => "gateway",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent can do. Unknown capabilities of a newer agent are kept as `unknown`, so an
/// older control plane still reads its `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Git,
    RuntimeDocker,
    RuntimeProcess,
    RuntimeKubernetes,
    Router,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub name: AgentName,
    pub role: Role,
    /// The agent's build version, e.g. `0.1.0`.
    pub version: String,
    pub host: String,
    pub capabilities: Vec<Capability>,
    /// Deployments in progress on this agent (after a reconnect).
    #[serde(default)]
    pub deployments: Vec<DeploymentId>,
    /// Sandboxes this agent holds something of (instances, checkouts), found at start by
    /// label, pid file or folder.
    #[serde(default)]
    pub sandboxes: Vec<SandboxId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Jobs in progress.
    pub load: u32,
    /// Service instances running.
    pub running: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    /// How often the agent should send a heartbeat.
    pub heartbeat_interval_ms: u64,
}

/// Ties a reply to its job; unique per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: RequestId,
    pub job: JobKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum JobKind {
    ProbeCredentials(ProbeCredentials),
    ListBranches(ListBranches),
    Deploy(DeployJob),
    Teardown(Teardown),
    Routes(RouteTable),
    Requests(Requests),
    Sleep(Sleep),
    Wake(WakeJob),
}

impl JobKind {
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::ProbeCredentials(_) => ProbeCredentials::NAME,
            JobKind::ListBranches(_) => ListBranches::NAME,
            JobKind::Deploy(_) => DeployJob::NAME,
            JobKind::Teardown(_) => Teardown::NAME,
            JobKind::Routes(_) => RouteTable::NAME,
            JobKind::Requests(_) => Requests::NAME,
            JobKind::Sleep(_) => Sleep::NAME,
            JobKind::Wake(_) => WakeJob::NAME,
        }
    }
}

/// A kind of job and the answer it is owed: a caller sends a `JobSpec` and gets its `Reply`
/// or a typed failure, never a [`JobOutput`] to sort out.
pub trait JobSpec: Into<JobKind> + Send + 'static {
    type Reply: Send + 'static;
    const NAME: &'static str;
    /// The answer of this job in `output`, or `output` back when it answers another job.
    /// (`failed` is every job's possible answer, handled before this is asked.)
    fn reply(output: JobOutput) -> Result<Self::Reply, JobOutput>;
}

macro_rules! job_spec {
    ($job:ty, $variant:ident, $name:literal, $reply:ty, $output:pat => $value:expr) => {
        impl From<$job> for JobKind {
            fn from(job: $job) -> JobKind {
                JobKind::$variant(job)
            }
        }

        impl JobSpec for $job {
            type Reply = $reply;
            const NAME: &'static str = $name;
            fn reply(output: JobOutput) -> Result<$reply, JobOutput> {
                match output {
                    $output => Ok($value),
                    other => Err(other),
                }
            }
        }
    };
}

/// Does the git server accept these credentials for `repo`? (`git ls-remote`)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeCredentials {
    pub repo: RepoUrl,
    pub credentials: Credentials,
}
job_spec!(ProbeCredentials, ProbeCredentials, "probe_credentials", (), JobOutput::CredentialsAccepted => ());

/// The branches of `repo` and their tip commits. (`git ls-remote --heads`)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListBranches {
    pub repo: RepoUrl,
    pub credentials: Credentials,
}
job_spec!(ListBranches, ListBranches, "list_branches", Vec<Branch>, JobOutput::Branches { branches } => branches);

/// Bring a sandbox's services to the given branches. Answered at once with `accepted`;
/// progress follows as events of `deployment`, ending with an `outcome` event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployJob {
    pub deployment: DeploymentId,
    /// What the agent keys everything of the sandbox by.
    pub sandbox_id: SandboxId,
    /// For people and for services (`SDP_SANDBOX`); never a key.
    pub sandbox: SandboxName,
    pub credentials: Credentials,
    /// Given to services as `SDP_GATEWAY_URL`.
    pub gateway_url: String,
    pub services: Vec<ServiceSpec>,
    /// A deployment of this sandbox that this one replaces (a newer commit of a followed
    /// branch): the agent cancels it, if it runs it still, and starts this one once it has
    /// stopped. Any other deployment of the sandbox in progress refuses the job, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<DeploymentId>,
    /// The deployment's log holds events up to this `seq` already (another agent's: the
    /// micro agent deploys a sandbox's services, then the gateway agent its gateway), so
    /// this agent's go on from the next.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub after_seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
job_spec!(DeployJob, Deploy, "deploy", (), JobOutput::Accepted => ());

/// Stop and remove everything of a sandbox on this agent (a deployment of it in progress
/// first), and delete its checkouts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Teardown {
    pub sandbox_id: SandboxId,
}
job_spec!(Teardown, Teardown, "teardown", (), JobOutput::TornDown => ());

// Gateway agents: route by this table from now on. Answered with `routes_applied` once new
// requests use it.
job_spec!(RouteTable, Routes, "routes", (), JobOutput::RoutesApplied => ());

/// Gateway agents: the router's last decisions for `sandbox`, newest first. (The router
/// knows sandboxes by the name in their host name.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Requests {
    pub sandbox: SandboxName,
}
job_spec!(Requests, Requests, "requests", Vec<RouteDecision>, JobOutput::Requests { requests } => requests);

/// Micro agents: stop every instance of a sandbox and keep its builds, so that a wake starts
/// them again with no fetch and no build. Answered with `slept` once they are stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sleep {
    pub sandbox_id: SandboxId,
}
job_spec!(Sleep, Sleep, "sleep", (), JobOutput::Slept => ());

/// Micro agents: start a sleeping sandbox's instances again from the builds kept, and answer
/// once each is healthy, with where each runs now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WakeJob {
    pub sandbox_id: SandboxId,
}
job_spec!(WakeJob, Wake, "wake", Vec<ServiceOutcome>, JobOutput::Woken { services } => services);

/// One service to deploy: its catalog entry and the branch chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub service: ServiceName,
    pub repo: RepoUrl,
    pub branch: BranchName,
    pub build: String,
    pub run: String,
    pub port: u16,
    pub health: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What the agent does when the instance dies, or stays unhealthy, after it was healthy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How often `health` is checked after the instance was healthy; three failures in a row
    /// make it `unhealthy`.
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    /// Set for the company's API gateway (`kind = "gateway"`), which the gateway agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<crate::GatewaySpec>,
}

fn default_health_interval_ms() -> u64 {
    10_000
}

/// A catalog service's `restart` (SPEC §9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restarted with exponential backoff, until it fails too often in a window.
    #[default]
    OnFailure,
    /// Left `crashed` (or `unhealthy`) for the user to look at.
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// An agent's answer to a job, or one part of it ([`Reply::into_frames`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub id: RequestId,
    pub output: JobOutput,
    /// More parts of this answer follow: a list too long for one frame is sent as several
    /// replies with the same `id`, each holding a part, and `more: false` on the last.
    #[serde(default)]
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum JobOutput {
    CredentialsAccepted,
    Branches {
        branches: Vec<Branch>,
    },
    /// A deploy job was taken; its events follow.
    Accepted,
    TornDown,
    RoutesApplied,
    Slept,
    Woken {
        services: Vec<ServiceOutcome>,
    },
    Requests {
        requests: Vec<RouteDecision>,
    },
    Failed(JobError),
}

/// A branch of a repository and the commit at its tip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Branch {
    /// Without `refs/heads/`: `feature/x`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "feature/x"))]
    pub name: BranchName,
    #[cfg_attr(
        feature = "openapi",
        schema(example = "8f2c1d0e9b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d")
    )]
    pub commit: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: JobErrorCode,
    /// Written for the user; never holds a credential.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorCode {
    /// The git server refused the credentials.
    AuthFailed,
    /// The repository does not exist or cannot be reached.
    RepoUnreachable,
    /// The command did not finish in time.
    Timeout,
    /// Anything else git or the agent failed at.
    Failed,
    /// The agent cannot do this job (wrong role, older version).
    Unsupported,
}

/// Something an agent reports about a deployment. `seq` grows by one per deployment without
/// gaps, which is how the control plane drops duplicates after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub deployment: DeploymentId,
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    Log {
        service: Option<ServiceName>,
        stream: LogStream,
        line: String,
    },
    Step {
        service: Option<ServiceName>,
        step: Step,
        state: StepState,
    },
    /// The agent's last event of a deployment: every service healthy, or the first failure.
    Outcome {
        ok: bool,
        error: Option<String>,
        services: Vec<ServiceOutcome>,
    },
}

/// Something an agent reports about a sandbox's instances after they started: their output
/// and their state. `seq` grows by one per sandbox without gaps, across the agent's restarts
/// (the agent keeps the last acknowledged `seq` on disk), which is how the control plane drops
/// duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEvent {
    pub sandbox: SandboxId,
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    #[serde(flatten)]
    pub body: RuntimeBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuntimeBody {
    /// A line an instance printed (`stdout`, `stderr`), or the agent's note about it
    /// (`system`: a restart, a health check that failed).
    Log {
        service: ServiceName,
        stream: LogStream,
        line: String,
    },
    /// An instance's state changed.
    Instance(InstanceReport),
}

/// An instance's new state, and what explains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub service: ServiceName,
    pub state: InstanceState,
    /// Why, for people: `exit code 1`, `killed by SIGKILL`, `/healthz gave status 500`.
    #[serde(default)]
    pub reason: Option<String>,
    /// The instance's last lines before it crashed, oldest first.
    #[serde(default)]
    pub last_lines: Vec<String>,
    /// `host:port` where the gateway reaches it, when `running` (a restart may move it).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Restarts of this instance since it was deployed.
    #[serde(default)]
    pub restarts: u32,
    /// `crashed` for good: it failed too often in a row, and its agent stopped restarting it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gave_up: bool,
}

/// How an instance fares after it was healthy (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Healthy and serving, at `upstream`.
    Running,
    /// Running, but its health check failed three times in a row.
    Unhealthy,
    /// It ended by itself; a restart may follow (see `restarting`).
    Crashed,
    /// Being started again after a crash, or after it stayed unhealthy.
    Restarting,
    /// Stopped on purpose, its build kept (a sleeping sandbox).
    Sleeping,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Running => "running",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Crashed => "crashed",
            InstanceState::Restarting => "restarting",
            InstanceState::Sleeping => "sleeping",
        }
    }

    /// Whether requests can reach it.
    pub fn serves(self) -> bool {
        self == InstanceState::Running
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service's result on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOutcome {
    pub service: ServiceName,
    pub commit: Option<String>,
    /// `host:port` where the gateway reaches the instance.
    pub upstream: Option<String>,
}

/// The steps of a service's deployment (SPEC §3), in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Queued,
    Fetching,
    Building,
    Starting,
    Healthy,
    Routing,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Queued => "queued",
            Step::Fetching => "fetching",
            Step::Building => "building",
            Step::Starting => "starting",
            Step::Healthy => "healthy",
            Step::Routing => "routing",
        }
    }
}

/// A word that names no step or step state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a step or step state")]
pub struct UnknownStep(String);

impl std::str::FromStr for Step {
    type Err = UnknownStep;
    fn from_str(s: &str) -> Result<Self, UnknownStep> {
        [
            Step::Queued,
            Step::Fetching,
            Step::Building,
            Step::Starting,
            Step::Healthy,
            Step::Routing,
        ]
        .into_iter()
        .find(|step| step.as_str() == s)
        .ok_or_else(|| UnknownStep(s.chars().take(40).collect()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    System,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }
}

/// A step event says a step began (`running`), was skipped (`skipped`, e.g. no rebuild of an
/// unchanged commit), was reached for good (`done`, for `healthy`) or failed (`failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Running,
    Skipped,
    Done,
    Failed,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Running => "running",
            StepState::Skipped => "skipped",
            StepState::Done => "done",
            StepState::Failed => "failed",
        }
    }
}

impl std::str::FromStr for StepState {
    type Err = UnknownStep;
    fn from_str(s: &str) -> Result<Self, UnknownStep> {
        [
            StepState::Running,
            StepState::Skipped,
            StepState::Done,
            StepState::Failed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| UnknownStep(s.chars().take(40).collect()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolError {
    pub code: String,
    pub message: String,
}

/// Why a frame could not be read, or not be sent. Each is reported, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    #[error("binary frames are not part of the protocol; send JSON text frames")]
    Binary,
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The frame to send back to the peer that sent the bad one.
    pub fn to_protocol_error(&self) -> ProtocolError {
        let code = match self {
            FrameError::TooLarge(_) => "frame_too_large",
            FrameError::Binary => "binary_frame",
            FrameError::Malformed(_) => "malformed_frame",
        };
        ProtocolError {
            code: code.to_owned(),
            message: self.to_string(),
        }
    }
}

/// The longest description of a malformed frame, encoded: serde's messages may quote the
/// frame, and the error goes back to the peer in a frame of its own.
const MAX_ERROR_BYTES: usize = 1024;

fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, FrameError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(text.len()));
    }
    serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        FrameError::Malformed(split_escaped(&message, MAX_ERROR_BYTES).0.to_owned())
    })
}

pub fn decode_agent_frame(text: &str) -> Result<AgentMessage, FrameError> {
    decode(text)
}

pub fn decode_server_frame(text: &str) -> Result<ServerMessage, FrameError> {
    decode(text)
}

/// Encodes a frame. Our own types always serialize, so this cannot fail. For a frame whose
/// content is not bounded by construction, use [`encode_frame`].
pub fn encode<T: Serialize>(msg: &T) -> String {
    serde_json::to_string(msg).expect("protocol types serialize to JSON")
}

/// Encodes a frame, refusing one over [`MAX_FRAME_BYTES`]: the peer would drop the connection
/// on reading it.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<String, FrameError> {
    let text = encode(msg);
    if text.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(text.len()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Password, Username};

    fn creds() -> Credentials {
        Credentials {
            username: Username::parse("alice").unwrap(),
            password: Password::parse("s3cret".into()).unwrap(),
        }
    }

    fn repo() -> RepoUrl {
        RepoUrl::parse("https://git.example.com/scm/shop/orders.git").unwrap()
    }

    fn dep() -> DeploymentId {
        DeploymentId::parse("dep_0123456789abcdef").unwrap()
    }

    fn sbx() -> SandboxId {
        SandboxId::parse("sbx_fedcba9876543210").unwrap()
    }

    fn ts() -> OffsetDateTime {
        time::macros::datetime!(2026-11-26 12:00:00 UTC)
    }

    #[test]
    fn agent_frames_encode_as_documented() {
        let frames = [
            AgentMessage::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                name: AgentName::parse("deploy-1").unwrap(),
                role: Role::Micro,
                version: "0.1.0".into(),
                host: "deploy-host".into(),
                capabilities: vec![Capability::Git, Capability::RuntimeProcess],
                deployments: vec![dep()],
                sandboxes: vec![sbx()],
            }),
            AgentMessage::Heartbeat(Heartbeat {
                load: 2,
                running: 3,
            }),
            AgentMessage::Reply(Reply {
                id: RequestId(7),
                more: false,
                output: JobOutput::CredentialsAccepted,
            }),
            AgentMessage::Reply(Reply {
                id: RequestId(8),
                more: false,
                output: JobOutput::Branches {
                    branches: vec![Branch {
                        name: BranchName::parse("feature/x").unwrap(),
                        commit: "0123456789abcdef0123456789abcdef01234567".into(),
                    }],
                },
            }),
            AgentMessage::Reply(Reply {
                id: RequestId(9),
                more: false,
                output: JobOutput::Failed(JobError {
                    code: JobErrorCode::AuthFailed,
                    message: "the git server refused the credentials".into(),
                }),
            }),
            AgentMessage::Events {
                events: vec![
                    Event {
                        deployment: dep(),
                        seq: 1,
                        ts: ts(),
                        body: EventBody::Log {
                            service: Some(ServiceName::parse("orders").unwrap()),
                            stream: LogStream::Stdout,
                            line: "listening on :8080".into(),
                        },
                    },
                    Event {
                        deployment: dep(),
                        seq: 2,
                        ts: ts(),
                        body: EventBody::Step {
                            service: Some(ServiceName::parse("orders").unwrap()),
                            step: Step::Building,
                            state: StepState::Running,
                        },
                    },
                    Event {
                        deployment: dep(),
                        seq: 3,
                        ts: ts(),
                        body: EventBody::Outcome {
                            ok: true,
                            error: None,
                            services: vec![ServiceOutcome {
                                service: ServiceName::parse("orders").unwrap(),
                                commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
                                upstream: Some("127.0.0.1:20001".into()),
                            }],
                        },
                    },
                ],
            },
            AgentMessage::Reply(Reply {
                id: RequestId(10),
                more: false,
                output: JobOutput::Accepted,
            }),
            AgentMessage::Reply(Reply {
                id: RequestId(11),
                more: false,
                output: JobOutput::TornDown,
            }),
            AgentMessage::Reply(Reply {
                id: RequestId(12),
                more: false,
                output: JobOutput::RoutesApplied,
            }),
            AgentMessage::Reply(Reply {
                id: RequestId(13),
                more: false,
                output: JobOutput::Requests {
                    requests: vec![crate::RouteDecision {
                        time: ts(),
                        method: "GET".into(),
                        path: "/orders/1".into(),
                        service: Some(ServiceName::parse("orders").unwrap()),
                        route: crate::RouteKind::Sandbox,
                        upstream: Some("127.0.0.1:20001".into()),
                        status: 200,
                        duration_ms: 1.5,
                    }],
                },
            }),
            // A part of a branch list too long for one frame: more parts follow.
            AgentMessage::Reply(Reply {
                id: RequestId(14),
                more: true,
                output: JobOutput::Branches {
                    branches: vec![Branch {
                        name: BranchName::parse("feature/y").unwrap(),
                        commit: "89abcdef0123456789abcdef0123456789abcdef".into(),
                    }],
                },
            }),
            AgentMessage::Runtime {
                events: vec![
                    RuntimeEvent {
                        sandbox: sbx(),
                        seq: 1,
                        ts: ts(),
                        body: RuntimeBody::Log {
                            service: ServiceName::parse("orders").unwrap(),
                            stream: LogStream::Stderr,
                            line: "panic: nil map".into(),
                        },
                    },
                    RuntimeEvent {
                        sandbox: sbx(),
                        seq: 2,
                        ts: ts(),
                        body: RuntimeBody::Instance(InstanceReport {
                            service: ServiceName::parse("orders").unwrap(),
                            state: InstanceState::Crashed,
                            reason: Some("exit code 2".into()),
                            last_lines: vec!["panic: nil map".into()],
                            upstream: None,
                            restarts: 0,
                            gave_up: false,
                        }),
                    },
                    RuntimeEvent {
                        sandbox: sbx(),
                        seq: 3,
                        ts: ts(),
                        body: RuntimeBody::Instance(InstanceReport {
                            service: ServiceName::parse("orders").unwrap(),
                            state: InstanceState::Running,
                            reason: None,
                            last_lines: Vec::new(),
                            upstream: Some("127.0.0.1:20002".into()),
                            restarts: 1,
                            gave_up: false,
                        }),
                    },
                ],
            },
            AgentMessage::Activity {
                sandboxes: vec![SandboxName::parse("pay-42").unwrap()],
            },
            AgentMessage::Wake {
                sandbox: SandboxName::parse("pay-42").unwrap(),
            },
            AgentMessage::Reply(Reply {
                id: RequestId(15),
                more: false,
                output: JobOutput::Slept,
            }),
            AgentMessage::Reply(Reply {
                id: RequestId(16),
                more: false,
                output: JobOutput::Woken {
                    services: vec![ServiceOutcome {
                        service: ServiceName::parse("orders").unwrap(),
                        commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
                        upstream: Some("127.0.0.1:20003".into()),
                    }],
                },
            }),
            AgentMessage::Error(ProtocolError {
                code: "malformed_frame".into(),
                message: "expected value at line 1 column 1".into(),
            }),
        ];
        let encoded: Vec<String> = frames.iter().map(encode).collect();
        insta::assert_snapshot!(encoded.join("\n"));
        for text in &encoded {
            let back = decode_agent_frame(text).expect("round trip");
            assert_eq!(&encode(&back), text);
        }
    }

    #[test]
    fn server_frames_encode_as_documented() {
        let frames = [
            ServerMessage::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                heartbeat_interval_ms: 5000,
            }),
            ServerMessage::Heartbeat,
            ServerMessage::Job(Job {
                id: RequestId(1),
                job: JobKind::ProbeCredentials(ProbeCredentials {
                    repo: repo(),
                    credentials: creds(),
                }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(2),
                job: JobKind::ListBranches(ListBranches {
                    repo: repo(),
                    credentials: creds(),
                }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(3),
                job: JobKind::Deploy(DeployJob {
                    deployment: dep(),
                    sandbox_id: sbx(),
                    sandbox: SandboxName::parse("pay-42").unwrap(),
                    credentials: creds(),
                    gateway_url: "http://127.0.0.1:8081".into(),
                    services: vec![ServiceSpec {
                        service: ServiceName::parse("orders").unwrap(),
                        repo: repo(),
                        branch: BranchName::parse("feature/x").unwrap(),
                        build: "go build -o .sdp/bin/app ./cmd/orders".into(),
                        run: "./.sdp/bin/app".into(),
                        port: 8080,
                        health: "/healthz".into(),
                        env: BTreeMap::from([("LOG_LEVEL".into(), "debug".into())]),
                        restart: RestartPolicy::Never,
                        health_interval_ms: 2000,
                        gateway: None,
                    }],
                    supersedes: Some(DeploymentId::parse("dep_00000000000000ff").unwrap()),
                    after_seq: 0,
                }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(13),
                job: JobKind::Deploy(DeployJob {
                    deployment: dep(),
                    sandbox_id: sbx(),
                    sandbox: SandboxName::parse("pay-42").unwrap(),
                    credentials: creds(),
                    gateway_url: "http://127.0.0.1:8081".into(),
                    services: vec![ServiceSpec {
                        service: ServiceName::parse("api-gateway").unwrap(),
                        repo: repo(),
                        branch: BranchName::parse("feature/auth").unwrap(),
                        build: "go build -o .sdp/bin/gw ./cmd/gateway".into(),
                        run: "./.sdp/bin/gw".into(),
                        port: 8080,
                        health: "/healthz".into(),
                        env: BTreeMap::new(),
                        restart: RestartPolicy::OnFailure,
                        health_interval_ms: 10000,
                        gateway: Some(crate::GatewaySpec {
                            routes_file: crate::CheckoutPath::parse("config/routes.json").unwrap(),
                            routes_template: None,
                            reload: crate::Reload::parse("signal:HUP").unwrap(),
                        }),
                    }],
                    supersedes: None,
                    after_seq: 12,
                }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(4),
                job: JobKind::Teardown(Teardown { sandbox_id: sbx() }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(5),
                job: JobKind::Routes(RouteTable {
                    generation: 7,
                    base_domain: "sandbox.example.com".into(),
                    services: vec![crate::ServiceRoutes {
                        service: ServiceName::parse("orders").unwrap(),
                        routes: vec!["/orders".into()],
                        baseline: "https://orders.apps.ocp.example.com".into(),
                    }],
                    sandboxes: vec![crate::SandboxRoutes {
                        sandbox: SandboxName::parse("pay-42").unwrap(),
                        upstreams: BTreeMap::from([(
                            ServiceName::parse("orders").unwrap(),
                            "127.0.0.1:20001".into(),
                        )]),
                        down: BTreeMap::from([(
                            ServiceName::parse("payments").unwrap(),
                            InstanceState::Crashed,
                        )]),
                        sleeping: false,
                        gateway: None,
                    }],
                    wake_timeout_ms: 60_000,
                }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(6),
                job: JobKind::Requests(Requests {
                    sandbox: SandboxName::parse("pay-42").unwrap(),
                }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(7),
                job: JobKind::Sleep(Sleep { sandbox_id: sbx() }),
            }),
            ServerMessage::Job(Job {
                id: RequestId(8),
                job: JobKind::Wake(WakeJob { sandbox_id: sbx() }),
            }),
            ServerMessage::Ack {
                deployment: dep(),
                seq: 42,
            },
            ServerMessage::Resend {
                deployment: dep(),
                from_seq: 43,
            },
            ServerMessage::RuntimeAck {
                sandbox: sbx(),
                seq: 9,
            },
            ServerMessage::RuntimeResend {
                sandbox: sbx(),
                from_seq: 10,
            },
            ServerMessage::Error(ProtocolError {
                code: "protocol_version".into(),
                message: "this control plane speaks protocol 1".into(),
            }),
        ];
        let encoded: Vec<String> = frames.iter().map(encode).collect();
        insta::assert_snapshot!(encoded.join("\n"));
        for text in &encoded {
            let back = decode_server_frame(text).expect("round trip");
            assert_eq!(&encode(&back), text);
        }
    }

    #[test]
    fn malformed_and_unknown_frames_are_errors_not_panics() {
        let long = format!("\"{}\"", "x".repeat(MAX_FRAME_BYTES));
        for bad in [
            "",
            "not json",
            "{}",
            "[]",
            "{\"type\":\"launch_missiles\"}",
            "{\"type\":\"hello\"}",
            "{\"type\":\"hello\",\"protocol\":1,\"name\":\"-bad\",\"role\":\"micro\",\"version\":\"1\",\"host\":\"h\",\"capabilities\":[]}",
            "{\"type\":\"reply\",\"id\":-1,\"output\":{\"outcome\":\"credentials_accepted\"}}",
            long.as_str(),
        ] {
            let err = decode_agent_frame(bad).expect_err(bad);
            let reported = err.to_protocol_error();
            assert!(!reported.message.is_empty());
        }
        assert!(matches!(
            decode_server_frame(&long),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_it_is_sent() {
        // Under the limit by its raw length, over it once each NUL is written as `\u0000`.
        let message = "\0".repeat(MAX_FRAME_BYTES / 2);
        let frame = ServerMessage::Error(ProtocolError {
            code: "x".into(),
            message,
        });
        assert!(matches!(
            encode_frame(&frame),
            Err(FrameError::TooLarge(n)) if n > 3 * MAX_FRAME_BYTES
        ));
        assert!(encode_frame(&ServerMessage::Heartbeat).is_ok());
    }

    #[test]
    fn the_description_of_a_malformed_frame_stays_short_whatever_it_quotes() {
        let frame = format!(r#"{{"type":"{}"}}"#, "\\u0000".repeat(100_000));
        let Err(FrameError::Malformed(message)) = decode_agent_frame(&frame) else {
            panic!("not malformed")
        };
        assert!(crate::escaped_len(&message) <= MAX_ERROR_BYTES, "{message}");
        assert!(message.starts_with("unknown variant"), "{message}");
    }

    #[test]
    fn a_newer_agents_unknown_capability_is_still_read() {
        let text = r#"{"type":"hello","protocol":1,"name":"a","role":"gateway","version":"9","host":"h","capabilities":["git","teleport"]}"#;
        let AgentMessage::Hello(hello) = decode_agent_frame(text).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!(
            hello.capabilities,
            vec![Capability::Git, Capability::Unknown]
        );
    }
}
