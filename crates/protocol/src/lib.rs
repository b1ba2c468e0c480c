//! The language the SDP control plane and its agents speak, and the validated names in it.
//!
//! This crate does no IO: it defines types, their JSON encoding and their validation, so that
//! the server, the agents and the tests agree on one definition. Every frame is a JSON text
//! frame; [`decode_agent_frame`] and [`decode_server_frame`] turn bad input into a
//! [`FrameError`] the receiver reports to its peer instead of panicking.

mod credentials;
mod frames;
mod gateway;
mod names;
mod replies;
mod routes;
mod sizing;

pub use credentials::{Credentials, InvalidPassword, Password};
pub use frames::{
    AgentMessage, Branch, Capability, DeployJob, Event, EventBody, FrameError, Heartbeat, Hello,
    InstanceReport, InstanceState, Job, JobError, JobErrorCode, JobKind, JobOutput, JobSpec,
    ListBranches, LogStream, MAX_FRAME_BYTES, PROTOCOL_VERSION, ProbeCredentials, ProtocolError,
    Reply, RequestId, Requests, RestartPolicy, Role, RuntimeBody, RuntimeEvent, ServerMessage,
    ServiceOutcome, ServiceSpec, Sleep, Step, StepState, Teardown, UnknownStep, WakeJob, Welcome,
    decode_agent_frame, decode_server_frame, encode, encode_frame,
};
pub use gateway::{CheckoutPath, GatewaySpec, InvalidGatewaySetting, Reload, ReloadSignal};
pub use names::{
    AgentName, BranchName, DeploymentId, InvalidName, RepoUrl, SandboxId, SandboxName, ServiceName,
    Username,
};
pub use replies::{MAX_REPLY_BYTES, ReplyAssembly, ReplyError};
pub use routes::{
    GatewayRoute, GatewayRoutes, RouteDecision, RouteKind, RouteTable, SandboxRoutes, ServiceRoutes,
};
pub use sizing::{encoded_len, escaped_char_len, escaped_len, escaped_pieces, split_escaped};
