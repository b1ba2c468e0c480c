//! The request and response types of SDP's JSON API (SPEC §4, §11), in one place for the
//! control plane that serves them, the CLI that sends them and the tests that check them.
//!
//! Requests that change something refuse unknown fields, so that a typo is an error rather
//! than a silent default.
//! Times are RFC 3339 strings; states are the lower-case words of SPEC §3.
//!
//! The types are also the schemas of the control plane's OpenAPI document (`ToSchema`). A
//! field the server always writes, even as null, is `required` there
//! (`#[schema(required = true)]`), so that a response without it breaks the document.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use sdp_protocol::{Branch, RouteDecision, RouteKind};

/// `POST /api/login`. (Unknown fields are ignored here, as they always were.)
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// No `:` and no control character.
    #[schema(example = "alice", min_length = 1, max_length = 256)]
    pub username: String,
    /// No NUL or line break.
    #[schema(format = Password, min_length = 1, max_length = 1024)]
    pub password: String,
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("password", &"[REDACTED]")
            .finish()
    }
}

/// The answer to a login: the session token (also set as a cookie) and until when it holds.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    pub token: String,
    pub user: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
}

impl fmt::Debug for LoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginResponse")
            .field("token", &"[REDACTED]")
            .field("user", &self.user)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// `GET /api/session`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    pub user: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// The sandbox router's URL (`gateway.public_url`): where a request that names its
    /// sandbox by header (`X-SDP-Sandbox`) goes.
    #[serde(default)]
    pub gateway_url: String,
}

/// `GET /api/health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the control plane answers.
    pub status: String,
    pub version: String,
    /// Agents connected now.
    pub agents: usize,
    /// `server`, or `dev` (`sdp dev`: any password is accepted).
    #[schema(example = "server")]
    pub mode: String,
}

/// A catalog service (`GET /api/services`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Service {
    pub name: String,
    pub repo: String,
    pub routes: Vec<String>,
    pub baseline: String,
    /// `service`, or `gateway`: the company's API gateway, which runs on the gateway agent
    /// and gets every request of a sandbox that selects it.
    pub kind: String,
}

/// An agent, connected or seen before (`GET /api/agents`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    pub name: String,
    pub role: String,
    pub version: String,
    pub host: String,
    pub connected: bool,
    #[schema(format = DateTime)]
    pub last_seen: String,
    pub running: u32,
    pub load: u32,
    pub capabilities: Vec<String>,
}

/// A service and the branch to deploy of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// A service of the catalog.
    #[schema(example = "orders")]
    pub service: String,
    /// A branch name by git's rules, not starting with `-`.
    #[schema(example = "feature/x", min_length = 1, max_length = 255)]
    pub branch: String,
    /// Redeploy the service whenever its branch moves (a push webhook, or polling). When
    /// absent: off for a new sandbox, unchanged for a redeploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<bool>,
}

/// `POST /api/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// A DNS label: lower-case letters, digits and `-`.
    #[schema(example = "demo", pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[schema(min_items = 1, max_items = 16)]
    pub services: Vec<Selection>,
    /// A duration like `8h`, at most 30 days; the server's `sandbox_ttl` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "8h")]
    pub ttl: Option<String>,
}

/// `POST /api/sandboxes/{id}/deploy`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Redeploy {
    #[schema(min_items = 1, max_items = 16)]
    pub services: Vec<Selection>,
}

/// `POST /api/sandboxes/{id}/extend`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Extend {
    /// A duration like `8h`, at most 30 days: the sandbox expires this long from now.
    #[schema(example = "8h")]
    pub ttl: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub owner: String,
    /// `deploying`, `ready`, `failed`, `sleeping`, `expired` or `deleted`. A `sleeping`
    /// sandbox's instances are stopped until a request or `POST …/wake` wakes it.
    pub state: String,
    pub url: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// A live sandbox that expires within the hour: extend it, or it is deleted.
    pub expires_soon: bool,
    pub services: Vec<SandboxService>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxService {
    pub service: String,
    pub branch: String,
    #[schema(required = true)]
    pub commit: Option<String>,
    /// `deploying`, `running`, `unhealthy`, `crashed`, `sleeping`, `failed` or `stopped`.
    /// An instance being restarted shows as `crashed` (or `unhealthy`, when that is why it
    /// restarts), with `restarts` counting up.
    pub state: String,
    /// `host:port` of its instance, while one runs.
    #[schema(required = true)]
    pub upstream: Option<String>,
    /// Why it is `crashed` or `unhealthy` (`exit code 2`, `/healthz gave status 500`).
    #[serde(default)]
    #[schema(required = true)]
    pub reason: Option<String>,
    /// Restarts of its instance since it was deployed.
    #[serde(default)]
    #[schema(required = true)]
    pub restarts: u32,
    /// Its instance's last lines before it crashed, oldest first.
    #[serde(default)]
    #[schema(required = true)]
    pub last_lines: Vec<String>,
    /// Redeployed whenever its branch moves, with its owner's credentials.
    #[serde(default)]
    #[schema(required = true)]
    pub follow: bool,
    /// A new commit of its followed branch that waits to be deployed, and why.
    #[serde(default)]
    #[schema(required = true)]
    pub pending: Option<PendingCommit>,
}

/// A commit of a followed branch not deployed yet: shown as "new commit abc123 waiting: log
/// in to deploy it". The owner's next login deploys it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PendingCommit {
    pub commit: String,
    /// `log in to deploy it`: the control plane holds no credentials of the owner.
    pub reason: String,
}

/// `PATCH /api/sandboxes/{id}/services/{service}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServicePatch {
    /// Follow the service's branch (redeploy it when it moves), or stop.
    pub follow: bool,
}

/// A ref a delivery named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryRef {
    pub branch: String,
    /// The new tip; null for a deleted branch.
    #[schema(required = true)]
    pub commit: Option<String>,
    /// `update`, `add` or `delete`.
    pub change: String,
}

/// One entry of the delivery log (`GET /api/hooks/deliveries`): a webhook delivery or a
/// polling trigger, what it named, and what it did or why nothing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    pub id: String,
    /// `webhook` or `poll`.
    pub source: String,
    #[schema(format = DateTime)]
    pub received_at: String,
    /// `X-Request-Id` (Bitbucket Server) or `X-Hook-UUID` (Cloud).
    #[schema(required = true)]
    pub delivery_id: Option<String>,
    /// `X-Event-Key`: `repo:refs_changed`, `repo:push`, …
    #[schema(required = true)]
    pub event: Option<String>,
    /// The repository (host and path) when the catalog has it; null otherwise, or when the
    /// delivery was refused before it was read.
    #[schema(required = true)]
    pub repository: Option<String>,
    /// The catalog services of that repository.
    pub services: Vec<String>,
    pub refs: Vec<DeliveryRef>,
    /// `valid`, `invalid`, `missing`, or `none` for a poll.
    pub signature: String,
    /// What it triggered, or why nothing: `redeploying orders in demo`, `no sandbox follows
    /// orders@x`, `orders in demo waits for alice's login`, `duplicate delivery`, …
    pub outcome: String,
}

/// One entry of `GET /api/sandboxes/{id}/history`: a row of the audit trail about the
/// sandbox (deploys, deletes, and its instances' crashes, restarts and health failures).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    #[schema(format = DateTime)]
    pub at: String,
    /// Who: a user, `sdp` (expiry, sleep), `router` (a wake for a request), or
    /// `agent:<name>` (what an agent reported).
    pub actor: String,
    /// `create_sandbox`, `redeploy`, `delete_sandbox`, `expire`, `extend_sandbox`,
    /// `instance_crashed`, `instance_restarting`, `instance_restarted`, `instance_unhealthy`,
    /// `sleep`, `wake`, `wake_failed`.
    pub action: String,
    pub detail: String,
}

/// The answer to a create or a redeploy (202): the sandbox and its new deployment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub sandbox: Sandbox,
    #[schema(required = true)]
    pub deployment: Option<Deployment>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    pub id: String,
    pub sandbox_id: String,
    pub requested_by: String,
    /// `queued`, `running`, `ready`, `failed` or `cancelled`.
    pub state: String,
    #[schema(required = true)]
    pub error: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    #[schema(required = true)]
    pub finished_at: Option<String>,
    /// The micro agent that ran it.
    #[schema(required = true)]
    pub agent: Option<String>,
    pub services: Vec<DeploymentService>,
    /// Every step with its start and end, in order (only in `GET /api/deployments/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepInfo>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeploymentService {
    pub service: String,
    pub branch: String,
    #[schema(required = true)]
    pub commit: Option<String>,
    pub step: String,
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepInfo {
    /// Null for a step of the whole deployment (`routing`).
    #[schema(required = true)]
    pub service: Option<String>,
    pub step: String,
    pub state: String,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    #[schema(required = true)]
    pub ended_at: Option<String>,
}

/// The query of a listing: filters, and the page to read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only this user's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Only those in this state (one of a sandbox's, or of a deployment's, states).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// 1 to 200; 50 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// One page of a listing, newest first; `next` reads the following one, until it is null.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[schema(required = true)]
    pub next: Option<String>,
}

/// A frame of a log: one line of the control plane's log files, one text frame of
/// `/ws/deployments/{id}` and `/ws/sandboxes/{id}/logs`. `seq` numbers a log's frames from 1
/// without gaps, so a viewer that lost its connection asks for `?from=<last seq + 1>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    Log {
        seq: u64,
        #[schema(format = DateTime)]
        ts: String,
        #[schema(required = true)]
        service: Option<String>,
        stream: String,
        line: String,
    },
    Step {
        seq: u64,
        #[schema(format = DateTime)]
        ts: String,
        #[schema(required = true)]
        service: Option<String>,
        step: String,
        state: String,
    },
    /// An instance's new state (runtime logs only): `running`, `unhealthy`, `crashed`,
    /// `restarting` or `sleeping`, as its agent reported it.
    Instance {
        seq: u64,
        #[schema(format = DateTime)]
        ts: String,
        service: String,
        state: String,
        #[schema(required = true)]
        reason: Option<String>,
        restarts: u32,
    },
    /// The last frame: the deployment's final state (or, in a runtime log's live stream,
    /// the sandbox's end).
    End {
        seq: u64,
        #[schema(format = DateTime)]
        ts: String,
        state: String,
        #[schema(required = true)]
        error: Option<String>,
    },
}

impl Frame {
    pub fn seq(&self) -> u64 {
        match self {
            Frame::Log { seq, .. }
            | Frame::Step { seq, .. }
            | Frame::Instance { seq, .. }
            | Frame::End { seq, .. } => *seq,
        }
    }

    /// The frame numbered `to` (a runtime log numbers its frames as it stores them).
    pub fn renumbered(mut self, to: u64) -> Frame {
        match &mut self {
            Frame::Log { seq, .. }
            | Frame::Step { seq, .. }
            | Frame::Instance { seq, .. }
            | Frame::End { seq, .. } => *seq = to,
        }
        self
    }
}

/// Every error's body: `{"error": {"code": "...", "message": "..."}}`, a stable `code` for
/// programs and a `message` for people.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_an_unknown_field_is_refused() {
        let typo = r#"{"name":"x","services":[],"tll":"2h"}"#;
        assert!(serde_json::from_str::<CreateSandbox>(typo).is_err());
        let ok = r#"{"name":"x","services":[{"service":"orders","branch":"main"}]}"#;
        let req: CreateSandbox = serde_json::from_str(ok).unwrap();
        assert_eq!(req.ttl, None);
        assert_eq!(req.services[0].follow, None);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let login = LoginRequest {
            username: "alice".into(),
            password: "s3cret".into(),
        };
        let answer = LoginResponse {
            token: "sdp_token".into(),
            user: "alice".into(),
            expires_at: "2026-12-01T00:00:00Z".into(),
        };
        let shown = format!("{login:?} {answer:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("sdp_token"),
            "{shown}"
        );
    }

    #[test]
    fn an_empty_query_encodes_as_nothing() {
        assert_eq!(serde_json::to_string(&ListParams::default()).unwrap(), "{}");
    }
}
