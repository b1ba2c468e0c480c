//! How the control plane and its agents reach each other, as two interfaces, so that neither
//! side knows the other's modules.
//!
//! - [`Dispatch`]: callers (the lifecycle, the API) send a job to an agent and wait for its
//!   answer. Today the hub in this process implements it over the agents' WebSockets; a
//!   control plane of several replicas could implement it over a shared bus (PostgreSQL
//!   `LISTEN/NOTIFY`, say), so no caller may assume that an agent's connection lives in its
//!   own process: every question about agents is asked here, and may wait.
//! - [`AgentReports`]: what agents say on their own (hello, events, runtime events, activity,
//!   wakes, gone), reported by the hub
//!   to whoever it was built with.
//!
//! [`call`] gives each job kind its own reply type ([`JobSpec`]): a caller gets that type or
//! a [`CallError`], and never sorts out an unexpected answer itself.

use std::time::Duration;

use sdp_protocol::{
    AgentName, Capability, DeploymentId, Event, Heartbeat, Hello, JobError, JobKind, JobOutput,
    JobSpec, MAX_FRAME_BYTES, ReplyError, Role, RuntimeEvent, SandboxId, SandboxName,
};

/// Which agent a job is for.
#[derive(Debug, Clone)]
pub enum Target {
    /// The least busy connected agent of a role.
    Any(Role),
    /// This agent, and no other.
    Agent(AgentName),
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no {0} agent is connected")]
    NoAgent(Role),
    #[error("agent {0} is not connected")]
    NotConnected(AgentName),
    #[error("agent {agent} did not answer within {}s", .after.as_secs_f32())]
    Timeout { agent: AgentName, after: Duration },
    #[error("agent {agent} disconnected before answering")]
    Disconnected { agent: AgentName },
    /// Refused before sending: the agent would drop the connection on reading it.
    #[error(
        "the {job} job for agent {agent} would be a frame of {bytes} bytes, over the limit of {MAX_FRAME_BYTES}; it was not sent"
    )]
    JobTooLarge {
        agent: AgentName,
        job: &'static str,
        bytes: usize,
    },
    #[error("the answer of agent {agent} was refused: {reason}")]
    BadReply {
        agent: AgentName,
        reason: ReplyError,
    },
    /// The agent answered with another job's answer.
    #[error("agent {agent} answered the {job} job with {got}")]
    WrongReply {
        agent: AgentName,
        job: &'static str,
        got: &'static str,
    },
    /// The agent tried and failed; its error says why, for the user.
    #[error("agent {agent}: {}", .error.message)]
    Failed { agent: AgentName, error: JobError },
}

/// Sends jobs to agents, wherever their connections are.
#[async_trait::async_trait]
pub trait Dispatch: Send + Sync {
    /// Sends `job` to `target` and waits for its answer, at most `timeout`: never longer,
    /// whatever the agent does. Returns who answered, and what.
    async fn send(
        &self,
        target: Target,
        job: JobKind,
        timeout: Duration,
    ) -> Result<(AgentName, JobOutput), CallError>;

    /// The connected agents of `role`, by name.
    async fn agents(&self, role: Role) -> Vec<AgentName>;

    async fn is_connected(&self, agent: &AgentName) -> bool;

    /// Every connected agent with its live figures, by name.
    async fn connected(&self) -> Vec<AgentSnapshot>;
}

/// What `/api/agents` shows of a connected agent.
pub struct AgentSnapshot {
    pub name: String,
    pub role: Role,
    pub version: String,
    pub host: String,
    pub capabilities: Vec<Capability>,
    pub last_seen: time::OffsetDateTime,
    pub load: u32,
    pub running: u32,
}

/// Sends a job of kind `J` and returns its typed answer.
pub async fn call<J: JobSpec>(
    dispatch: &dyn Dispatch,
    target: Target,
    job: J,
    timeout: Duration,
) -> Result<(AgentName, J::Reply), CallError> {
    let (agent, output) = dispatch.send(target, job.into(), timeout).await?;
    match output {
        JobOutput::Failed(error) => Err(CallError::Failed { agent, error }),
        output => match J::reply(output) {
            Ok(reply) => Ok((agent, reply)),
            Err(other) => Err(CallError::WrongReply {
                agent,
                job: J::NAME,
                got: output_name(&other),
            }),
        },
    }
}

fn output_name(output: &JobOutput) -> &'static str {
    match output {
        JobOutput::CredentialsAccepted => "credentials_accepted",
        JobOutput::Branches { .. } => "branches",
        JobOutput::Accepted => "accepted",
        JobOutput::TornDown => "torn_down",
        JobOutput::RoutesApplied => "routes_applied",
        JobOutput::Requests { .. } => "requests",
        JobOutput::Slept => "slept",
        JobOutput::Woken { .. } => "woken",
        JobOutput::Failed(_) => "failed",
    }
}

/// What the control plane answers a batch of events with.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventsAnswer {
    /// Per deployment, the `seq` up to which its events are stored (or dropped for good):
    /// the agent forgets them.
    pub acks: Vec<(DeploymentId, u64)>,
    /// Per deployment, the `seq` from which its events are needed again.
    pub resend: Vec<(DeploymentId, u64)>,
}

/// What the control plane answers a batch of runtime events with.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RuntimeAnswer {
    /// Per sandbox, the agent's `seq` up to which its runtime events are stored (or dropped
    /// for good: duplicates, events of an ended sandbox): the agent forgets them.
    pub acks: Vec<(SandboxId, u64)>,
    /// Per sandbox, the `seq` from which its runtime events are needed again.
    pub resend: Vec<(SandboxId, u64)>,
}

/// What agents say on their own, reported by the hub. The hub awaits each call before it
/// reads the agent's next frame, so they are quick: long work goes to tasks of the
/// implementation's own.
#[async_trait::async_trait]
pub trait AgentReports: Send + Sync {
    /// An agent connected and said hello (it is registered: jobs can reach it).
    async fn hello(&self, hello: &Hello);
    /// A batch of an agent's events, in the order they happened.
    async fn events(&self, agent: &AgentName, events: Vec<Event>) -> EventsAnswer;
    /// A batch of an agent's runtime events (sandboxes' instances after ready), in order.
    async fn runtime(&self, agent: &AgentName, events: Vec<RuntimeEvent>) -> RuntimeAnswer;
    /// A gateway agent's sandboxes that had requests since its last report: they are in use.
    async fn activity(&self, agent: &AgentName, sandboxes: Vec<SandboxName>);
    /// A gateway agent holds a request for `sandbox`, which sleeps: wake it.
    async fn wake(&self, agent: &AgentName, sandbox: SandboxName);
    /// An agent's connection ended, and no newer one of it replaced it.
    async fn gone(&self, agent: &AgentName, last_seen: time::OffsetDateTime, last: Heartbeat);
}
