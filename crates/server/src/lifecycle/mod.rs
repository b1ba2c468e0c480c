//! The lifecycle of sandboxes and deployments, owned here alone: create, redeploy, delete and
//! expiry, what agents report (hello, events, outcomes, going away), routing and teardown,
//! one code path each.
//!
//! It reaches agents only through [`Dispatch`], and hears them through [`AgentReports`]
//! (implemented in `events.rs`): it knows nothing of WebSockets. Every task it starts is on
//! its own tracker, and [`Lifecycle::shutdown`] waits for them before the database closes.
//!
//! A deployment's log is written by the agent (its events carry the agent's `seq`) until the
//! agent's `outcome`; only then does the control plane append frames of its own (the end
//! frame), so the two never race for a `seq`. A deployment that fails before reaching an agent
//! is logged by the control plane alone.

mod events;
mod follow;
mod routes;
mod runtime;
mod sleep;

use std::sync::{Arc, Weak};
use std::time::Duration;

use sdp_protocol::{
    AgentName, Credentials, DeployJob, DeploymentId, Role, SandboxId, SandboxName, ServiceName,
    ServiceSpec, Step, StepState, Teardown,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use follow::{repo_key, short};
pub use routes::{RoutePublisher, RouteSource};

use crate::config::ServiceConfig;
use crate::db::{
    Audit, Db, DeploymentState, Ending, Finish, Instance, Placement, SandboxRow, Selection,
    WriteError,
};
use crate::dispatch::{CallError, Dispatch, Target, call};
use crate::logs::{Frame, Logs};
use crate::metrics::Metrics;
use crate::runtime_logs::RuntimeLogs;
use crate::sessions::PasswordVault;

/// Stopping containers can take a while; longer than a git call.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// How the lifecycle is tuned.
pub struct Settings {
    /// How long to wait for an agent to take a job.
    pub job_timeout: Duration,
    /// How long an agent may be gone before its deployments fail.
    pub agent_timeout: Duration,
    /// Given to services as `SDP_GATEWAY_URL`.
    pub gateway_url: String,
    /// A sandbox unused this long sleeps; `None`: never.
    pub idle_after: Option<Duration>,
    /// How long a micro agent has to wake a sandbox.
    pub wake_timeout: Duration,
    /// The catalog's API gateways (`kind = "gateway"`), which run on the gateway agent.
    pub gateway_services: std::collections::HashSet<sdp_protocol::ServiceName>,
    pub follow: FollowSettings,
}

/// How followed branches are redeployed.
pub struct FollowSettings {
    /// The catalog, whose entries a follow-redeploy deploys.
    pub catalog: Vec<ServiceConfig>,
    /// Pushes to one service this close together are one redeploy.
    pub debounce: Duration,
    /// How often followed branches are polled; `None`: never.
    pub poll_interval: Option<Duration>,
}

pub struct Lifecycle {
    /// Itself, for the tasks it starts from `&self` (what agents report).
    me: Weak<Lifecycle>,
    db: Db,
    logs: Logs,
    /// Sandboxes' runtime logs (service output after ready).
    runtime_logs: RuntimeLogs,
    dispatch: Arc<dyn Dispatch>,
    routes: RoutePublisher,
    settings: Settings,
    /// Deployments' ends and steps' durations, counted as they happen.
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
    /// Per agent, how many times its connection has ended: a watch for its return belongs to
    /// one absence, and a later absence starts its own.
    absences: std::sync::Mutex<std::collections::HashMap<AgentName, u64>>,
    /// Sandboxes being woken: a wake asked for meanwhile joins the one in progress.
    waking: std::sync::Mutex<std::collections::HashSet<SandboxId>>,
    /// Per sandbox being put to sleep or woken, the lock that keeps those one at a time.
    transitions:
        std::sync::Mutex<std::collections::HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    /// Deployments that select the sandbox's own API gateway, whose micro agent has yet to
    /// bring up the other services: the gateway's half waits here, credentials included (in
    /// memory only), until then.
    gateway_halves: std::sync::Mutex<std::collections::HashMap<DeploymentId, GatewayHalf>>,
    /// Deployments whose gateway half was sent: an outcome of the micro agent repeated after
    /// a reconnect starts nothing again.
    gateway_sent: std::sync::Mutex<std::collections::HashSet<DeploymentId>>,
    /// The passwords of live sessions: a follow-redeploy uses its owner's.
    vault: Arc<PasswordVault>,
    /// Follow-redeploys waiting out the debounce, by sandbox and service: the newest commit.
    follows: std::sync::Mutex<std::collections::HashMap<(SandboxId, ServiceName), String>>,
    /// The control plane is stopping: what is interrupted then is resumed at the next start,
    /// not failed.
    shutdown: CancellationToken,
}

/// The half of a deployment that runs on the gateway agent: the sandbox's own API gateway.
/// It follows the micro agent's half, in the same log (from the next `seq`), so that the
/// gateway starts with routes to the services just deployed.
pub(crate) struct GatewayHalf {
    sandbox_id: SandboxId,
    sandbox: SandboxName,
    /// The gateway agent that runs the sandbox's gateway already, if any.
    agent: Option<AgentName>,
    credentials: Credentials,
    spec: ServiceSpec,
}

/// A deployment requested: the services, their branches, and whose credentials fetch them.
pub struct Request<'a> {
    pub requested_by: &'a str,
    pub specs: Vec<ServiceSpec>,
    pub credentials: Credentials,
    /// `service@branch …`, for the audit trail.
    pub detail: &'a str,
    /// The services whose following the request sets (the others keep theirs).
    pub follow: std::collections::BTreeMap<ServiceName, bool>,
}

pub(crate) fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 8]>()))
}

fn new_sandbox_id() -> SandboxId {
    SandboxId::parse(new_id("sbx")).expect("sbx_ and 16 hex digits")
}

fn new_deployment_id() -> DeploymentId {
    DeploymentId::parse(new_id("dep")).expect("dep_ and 16 hex digits")
}

fn selections(request: &Request<'_>) -> Vec<Selection> {
    request
        .specs
        .iter()
        .map(|s| Selection {
            service: s.service.to_string(),
            branch: s.branch.to_string(),
            follow: request.follow.get(&s.service).copied(),
        })
        .collect()
}

/// A deploy job being sent: what is recorded of whoever takes it.
struct Scheduling {
    deployment: DeploymentId,
    sandbox_id: SandboxId,
    /// The agent it must go to, if the sandbox has one already.
    agent: Option<AgentName>,
}

/// A scheduled deployment: where it goes and what it carries.
struct Scheduled {
    deployment: DeploymentId,
    sandbox_id: SandboxId,
    sandbox: SandboxName,
    /// The agent that runs the sandbox already, if any.
    agent: Option<AgentName>,
    /// The gateway agent that runs the sandbox's own API gateway already, if any.
    gateway_agent: Option<AgentName>,
    credentials: Credentials,
    specs: Vec<ServiceSpec>,
    /// The deployment in progress this one replaces (see `follow.rs`).
    supersedes: Option<DeploymentId>,
}

impl Lifecycle {
    /// Built inside `Arc::new_cyclic`: `me` is the Arc being built, which the hub (the
    /// `dispatch` here) reports to as well.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: Weak<Lifecycle>,
        db: Db,
        logs: Logs,
        runtime_logs: RuntimeLogs,
        dispatch: Arc<dyn Dispatch>,
        source: impl FnOnce(Arc<dyn Dispatch>) -> RouteSource,
        settings: Settings,
        metrics: Arc<Metrics>,
        vault: Arc<PasswordVault>,
        shutdown: CancellationToken,
    ) -> Self {
        let tasks = TaskTracker::new();
        let routes = RoutePublisher::start(source(dispatch.clone()), &tasks, shutdown.clone());
        Self {
            me,
            db,
            logs,
            runtime_logs,
            dispatch,
            routes,
            settings,
            metrics,
            tasks,
            absences: std::sync::Mutex::default(),
            waking: std::sync::Mutex::default(),
            transitions: std::sync::Mutex::default(),
            gateway_halves: std::sync::Mutex::default(),
            gateway_sent: std::sync::Mutex::default(),
            vault,
            follows: std::sync::Mutex::default(),
            shutdown,
        }
    }

    pub fn logs(&self) -> &Logs {
        &self.logs
    }

    pub fn runtime_logs(&self) -> &RuntimeLogs {
        &self.runtime_logs
    }

    /// Runs `work` as one of the lifecycle's own tasks.
    fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// Creates a sandbox and its first deployment, and schedules it.
    pub async fn create(
        self: &Arc<Self>,
        name: SandboxName,
        expires_at: OffsetDateTime,
        request: Request<'_>,
    ) -> Result<(SandboxId, DeploymentId), WriteError> {
        let now = OffsetDateTime::now_utc();
        let (sandbox_id, deployment) = (new_sandbox_id(), new_deployment_id());
        let audit = Audit {
            actor: request.requested_by,
            action: "create_sandbox",
            target: name.as_str(),
            detail: request.detail,
        };
        self.db
            .create_sandbox(
                &sandbox_id,
                &name,
                request.requested_by,
                expires_at,
                &deployment,
                &selections(&request),
                now,
                &audit,
            )
            .await?;
        tracing::info!(sandbox = %name, %sandbox_id, %deployment, user = request.requested_by, "sandbox created");
        self.start(Scheduled {
            deployment: deployment.clone(),
            sandbox_id: sandbox_id.clone(),
            sandbox: name,
            agent: None,
            gateway_agent: None,
            credentials: request.credentials,
            specs: request.specs,
            supersedes: None,
        });
        Ok((sandbox_id, deployment))
    }

    /// Starts a new deployment of a live sandbox, on the agent that runs it.
    pub async fn redeploy(
        self: &Arc<Self>,
        sandbox: &SandboxRow,
        request: Request<'_>,
    ) -> Result<DeploymentId, WriteError> {
        let deployment = new_deployment_id();
        let audit = Audit {
            actor: request.requested_by,
            action: "redeploy",
            target: sandbox.name.as_str(),
            detail: request.detail,
        };
        self.db
            .create_redeploy(
                &sandbox.id,
                request.requested_by,
                &deployment,
                &selections(&request),
                OffsetDateTime::now_utc(),
                &audit,
            )
            .await?;
        self.start(Scheduled {
            deployment: deployment.clone(),
            sandbox_id: sandbox.id.clone(),
            sandbox: sandbox.name.clone(),
            agent: sandbox.agent.clone(),
            gateway_agent: sandbox.gateway_agent.clone(),
            credentials: request.credentials,
            specs: request.specs,
            supersedes: None,
        });
        Ok(deployment)
    }

    fn start(self: &Arc<Self>, scheduled: Scheduled) {
        // A new sandbox is known to the router at once: requests naming it reach the
        // baseline until its own services are up, instead of a 404.
        self.routes.request("a deployment started");
        let this = self.clone();
        self.spawn(async move { this.schedule(scheduled).await });
    }

    /// Sends a deploy job to the sandbox's agent (or the least busy micro agent) and records
    /// who runs it; fails the deployment at once when no agent can take it. The sandbox's own
    /// API gateway, if the deployment selects it, waits for the micro agent's outcome
    /// (`gateway_half`); a deployment of the gateway alone goes to the gateway agent at once.
    async fn schedule(&self, s: Scheduled) {
        let (gateway, micro): (Vec<ServiceSpec>, Vec<ServiceSpec>) =
            s.specs.into_iter().partition(|spec| spec.gateway.is_some());
        let gateway = gateway.into_iter().next().map(|spec| GatewayHalf {
            sandbox_id: s.sandbox_id.clone(),
            sandbox: s.sandbox.clone(),
            agent: s.gateway_agent.clone(),
            credentials: s.credentials.clone(),
            spec,
        });
        if micro.is_empty()
            && let Some(half) = gateway
        {
            return self.deploy_gateway(&s.deployment, half, s.supersedes).await;
        }
        if let Some(half) = gateway {
            self.gateway_halves
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(s.deployment.clone(), half);
        }
        let job = DeployJob {
            deployment: s.deployment.clone(),
            sandbox_id: s.sandbox_id.clone(),
            sandbox: s.sandbox.clone(),
            credentials: s.credentials,
            gateway_url: self.settings.gateway_url.clone(),
            services: micro,
            supersedes: s.supersedes,
            after_seq: 0,
        };
        self.send_deploy(job, s.agent, Placement::Micro).await;
    }

    /// The gateway's half of a deployment: on the sandbox's gateway agent, or the least busy
    /// one, its events following the log's last `seq`.
    /// A deployment of the gateway alone may replace one in progress (`supersedes`), which the
    /// gateway agent then stops first.
    async fn deploy_gateway(
        &self,
        deployment: &DeploymentId,
        half: GatewayHalf,
        supersedes: Option<DeploymentId>,
    ) {
        self.gateway_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(deployment.clone());
        let after_seq = match self.logs.last_seq(deployment.as_str()).await {
            Ok(seq) => seq,
            Err(e) => {
                self.fail(deployment, &format!("its log cannot be read: {e}"))
                    .await;
                return;
            }
        };
        let job = DeployJob {
            deployment: deployment.clone(),
            sandbox_id: half.sandbox_id,
            sandbox: half.sandbox,
            credentials: half.credentials,
            gateway_url: self.settings.gateway_url.clone(),
            services: vec![half.spec],
            supersedes,
            after_seq,
        };
        self.send_deploy(job, half.agent, Placement::Gateway).await;
    }

    /// Sends a deploy job to `agent`, or the least busy agent of the placement's role.
    async fn send_deploy(&self, job: DeployJob, agent: Option<AgentName>, placement: Placement) {
        let role = match placement {
            Placement::Micro => Role::Micro,
            Placement::Gateway => Role::Gateway,
        };
        let s = Scheduling {
            deployment: job.deployment.clone(),
            sandbox_id: job.sandbox_id.clone(),
            agent,
        };
        let target = match &s.agent {
            Some(agent) => Target::Agent(agent.clone()),
            None => Target::Any(role),
        };
        let result = call(
            self.dispatch.as_ref(),
            target,
            job,
            self.settings.job_timeout,
        )
        .await;
        let reason = match result {
            Ok((agent, ())) => {
                tracing::info!(deployment = %s.deployment, %agent, %role, "deployment started");
                self.took(&s.deployment, &s.sandbox_id, &agent, placement)
                    .await;
                return;
            }
            // The job may have reached the agent, and the agent may be running it: its
            // teardown and later deployments must go there.
            Err(
                ref e @ (CallError::Timeout { ref agent, .. }
                | CallError::Disconnected { ref agent }
                | CallError::BadReply { ref agent, .. }),
            ) => {
                self.took(&s.deployment, &s.sandbox_id, agent, placement)
                    .await;
                if self.shutdown.is_cancelled() {
                    // Cut off by our own shutdown: the next start settles it (`start_background`).
                    tracing::info!(deployment = %s.deployment, error = %e, "deploy job interrupted by the shutdown");
                    return;
                }
                e.to_string()
            }
            Err(CallError::Failed { agent, error }) => {
                format!("agent {agent} refused the deployment: {}", error.message)
            }
            Err(CallError::NoAgent(_) | CallError::NotConnected(_)) => match s.agent {
                Some(name) => format!(
                    "agent {name}, which runs this sandbox, is not connected; start it again or delete the sandbox"
                ),
                None => format!(
                    "no {role} agent is connected to run it; start `sdp agent --role {role}`"
                ),
            },
            Err(e) => e.to_string(),
        };
        self.fail(&s.deployment, &reason).await;
    }

    /// Records that `agent` has, or may have, taken a deployment; if its sandbox ended
    /// meanwhile, what the agent started of it is removed.
    async fn took(
        &self,
        deployment: &DeploymentId,
        sandbox_id: &SandboxId,
        agent: &AgentName,
        placement: Placement,
    ) {
        match self
            .db
            .record_agent(deployment, sandbox_id, agent, placement)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(%deployment, %agent, "deployment taken after its sandbox ended; removing it");
                self.teardown(sandbox_id, agent).await;
            }
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot record the deployment's agent")
            }
        }
    }

    /// Ends a deployment as failed, with a system line and the end frame saying why; says
    /// whether its end is recorded.
    async fn fail(&self, deployment: &DeploymentId, reason: &str) -> bool {
        tracing::warn!(%deployment, %reason, "deployment failed");
        let line = format!("deployment failed: {reason}");
        self.append_own(deployment, |seq| Frame::Log {
            seq,
            ts: now_rfc3339(),
            service: None,
            stream: "system".into(),
            line,
        })
        .await;
        let finish = Finish {
            ok: false,
            error: Some(reason),
            instances: &[],
        };
        self.finish(deployment, &finish).await
    }

    /// Records the end of a deployment in progress, then its log's end frame; nothing when it
    /// had ended already. Says whether it has ended, now or before.
    async fn finish(&self, deployment: &DeploymentId, finish: &Finish<'_>) -> bool {
        // Its credentials are not kept past its end.
        self.gateway_halves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(deployment);
        match self
            .db
            .finish_deployment(deployment, finish, OffsetDateTime::now_utc())
            .await
        {
            Ok(Some(steps)) => {
                let state = if finish.ok {
                    DeploymentState::Ready
                } else {
                    DeploymentState::Failed
                };
                self.metrics.steps_ended(&steps);
                self.metrics.deployment_ended(state);
                self.end_log(deployment, state.as_str(), finish.error.map(str::to_owned))
                    .await;
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot record the end of a deployment");
                false
            }
        }
    }

    async fn append_own(&self, deployment: &DeploymentId, make: impl FnOnce(u64) -> Frame) {
        if let Err(e) = self.logs.append_own(deployment.as_str(), make).await {
            tracing::error!(%deployment, error = %e, "cannot write the deployment log");
        }
    }

    async fn end_log(&self, deployment: &DeploymentId, state: &str, error: Option<String>) {
        let state = state.to_owned();
        self.append_own(deployment, |seq| Frame::End {
            seq,
            ts: now_rfc3339(),
            state,
            error,
        })
        .await;
    }

    /// A deployment's `routing` step: every service is healthy; the gateways get the new
    /// table, and the deployment is ready once they have applied it. The step was recorded
    /// as running before (see `events.rs`).
    async fn route(&self, deployment: &DeploymentId) {
        let sandbox_id = match self.db.deployment(deployment.as_str()).await {
            Ok(Some(d)) if d.state.in_progress() => d.sandbox_id,
            // Ended meanwhile (its sandbox was deleted).
            Ok(_) => return,
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot read the deployment");
                return;
            }
        };
        match self.routes.publish("a deployment is routed").await {
            Ok(generation) => {
                self.append_own(deployment, |seq| Frame::Log {
                    seq,
                    ts: now_rfc3339(),
                    service: None,
                    stream: "system".into(),
                    line: format!("the gateways applied route table generation {generation}"),
                })
                .await;
                self.routing_step(deployment, StepState::Done).await;
                let finish = Finish {
                    ok: true,
                    error: None,
                    instances: &[],
                };
                self.finish(deployment, &finish).await;
                // A redeploy of some services of a sleeping sandbox leaves the others asleep:
                // the sandbox is ready, so they wake now (nothing happens when none sleeps).
                if let Some(this) = self.me.upgrade() {
                    this.wake(&sandbox_id, "sdp");
                }
            }
            // The gateways were cut off by our own shutdown: the deployment stays in routing,
            // and the next start resumes it (see `recover`).
            Err(reason) if self.shutdown.is_cancelled() => {
                tracing::info!(%deployment, reason, "routing interrupted by the shutdown");
            }
            Err(reason) => {
                self.routing_step(deployment, StepState::Failed).await;
                self.fail(deployment, &reason).await;
            }
        }
    }

    async fn routing_step(&self, deployment: &DeploymentId, state: StepState) {
        let now = OffsetDateTime::now_utc();
        match self
            .db
            .record_step(deployment, None, Step::Routing, state, now)
            .await
        {
            Ok(ended) => self.metrics.steps_ended(&ended),
            Err(e) => tracing::error!(%deployment, error = %e, "cannot record a step"),
        }
        self.append_own(deployment, |seq| Frame::Step {
            seq,
            ts: now.format(&Rfc3339).unwrap_or_default(),
            service: None,
            step: Step::Routing.as_str().to_owned(),
            state: state.as_str().to_owned(),
        })
        .await;
    }

    /// Ends a live sandbox, deleted by `actor` or expired: one flow for both. The change and
    /// its audit row are recorded at once, a deployment in progress is cancelled (its log
    /// ends saying why); then, in the background, the routes drop the sandbox and its agent
    /// removes everything of it.
    pub async fn end(
        self: &Arc<Self>,
        sandbox: &SandboxRow,
        ending: Ending,
        actor: &str,
    ) -> Result<(), WriteError> {
        let action = match ending {
            Ending::Deleted => "delete_sandbox",
            Ending::Expired => "expire",
        };
        let audit = Audit {
            actor,
            action,
            target: sandbox.name.as_str(),
            detail: "",
        };
        let now = OffsetDateTime::now_utc();
        // The agent as recorded once the sandbox has ended: a deploy job taken meanwhile has
        // recorded its agent by then (or sees the sandbox ended and removes itself), so no
        // agent is left running it without a teardown.
        let (cancelled, agents) = self
            .db
            .end_sandbox(&sandbox.id, ending, now, &audit)
            .await?;
        tracing::info!(sandbox = %sandbox.name, sandbox_id = %sandbox.id, state = %ending.state(), "sandbox ended");
        if let Some(deployment) = cancelled {
            self.metrics.deployment_ended(DeploymentState::Cancelled);
            self.end_log(
                &deployment,
                "cancelled",
                Some(format!("the sandbox was {}", ending.state())),
            )
            .await;
        }
        // Nothing of its instances' output is kept once it has ended.
        if let Err(e) = self
            .runtime_logs
            .remove(sandbox.id.as_str(), ending.state().as_str())
            .await
        {
            tracing::error!(sandbox_id = %sandbox.id, error = %e, "cannot delete the runtime log");
        }
        let this = self.clone();
        let sandbox_id = sandbox.id.clone();
        self.spawn(async move {
            // Routes go first: no request reaches an instance being stopped.
            if let Err(e) = this.routes.publish("a sandbox ended").await {
                tracing::warn!(%sandbox_id, error = %e, "route table not published");
            }
            for agent in agents {
                this.teardown(&sandbox_id, &agent).await;
            }
        });
        Ok(())
    }

    /// Sets a live sandbox's expiry, with its audit row.
    pub async fn extend(
        &self,
        sandbox: &SandboxRow,
        expires_at: OffsetDateTime,
        actor: &str,
        ttl: &str,
    ) -> Result<(), WriteError> {
        let audit = Audit {
            actor,
            action: "extend_sandbox",
            target: sandbox.name.as_str(),
            detail: ttl,
        };
        self.db
            .extend_sandbox(&sandbox.id, expires_at, &audit)
            .await
    }

    /// Stops and removes everything of a sandbox on its agent. An agent that is not
    /// connected removes it when it comes back (it reports what it holds in its hello).
    async fn teardown(&self, sandbox_id: &SandboxId, agent: &AgentName) {
        let job = Teardown {
            sandbox_id: sandbox_id.clone(),
        };
        match call(
            self.dispatch.as_ref(),
            Target::Agent(agent.clone()),
            job,
            TEARDOWN_TIMEOUT,
        )
        .await
        {
            Ok(_) => tracing::info!(%sandbox_id, %agent, "sandbox removed from its agent"),
            Err(e) => {
                tracing::warn!(%sandbox_id, %agent, error = %e, "teardown not done now; the agent removes leftovers when it reconnects")
            }
        }
    }

    /// After a restart of the control plane: queued deployments never reached an agent and
    /// fail; the agents of running ones get the usual time to come back; deployments that
    /// were being routed are routed again once a gateway is back. Then expiry starts, sleep
    /// unless `idle_after` is zero, polling of followed branches when `poll_interval` is set,
    /// and the pruning of the delivery log.
    pub async fn start_background(self: &Arc<Self>) {
        match self.db.queued_deployments().await {
            Ok(queued) => {
                for deployment in queued {
                    self.fail(
                        &deployment,
                        "the control plane restarted before an agent took it",
                    )
                    .await;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read queued deployments"),
        }
        match self.db.agents_with_running_deployments().await {
            Ok(agents) => {
                for agent in agents {
                    self.watch_absence(agent);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read running deployments"),
        }
        match self.db.deployments_in_routing().await {
            Ok(routing) if !routing.is_empty() => {
                let this = self.clone();
                self.spawn(async move {
                    this.wait_for_a_gateway().await;
                    for deployment in routing {
                        this.route(&deployment).await;
                    }
                });
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read deployments being routed"),
        }
        let this = self.clone();
        self.spawn(async move { this.expire_loop().await });
        if let Some(idle_after) = self.settings.idle_after {
            let this = self.clone();
            self.spawn(async move { this.sleep_loop(idle_after).await });
        }
        if let Some(every) = self.settings.follow.poll_interval {
            let this = self.clone();
            self.spawn(async move { this.poll_loop(every).await });
        }
        let this = self.clone();
        self.spawn(async move { this.prune_loop().await });
    }

    /// Until a gateway agent is connected, for as long as agents get to come back
    /// (`agent_timeout`). Just after a restart none is yet: routing at once would fail every
    /// deployment that was being routed. One check a tenth of a second, once per restart.
    async fn wait_for_a_gateway(&self) {
        let deadline = tokio::time::Instant::now() + self.settings.agent_timeout;
        while self.dispatch.agents(Role::Gateway).await.is_empty()
            && tokio::time::Instant::now() < deadline
            && !self.shutdown.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An agent is gone: if it is not back within the heartbeat timeout, its deployments in
    /// progress fail.
    fn watch_absence(self: &Arc<Self>, agent: AgentName) {
        let absence = {
            let mut absences = self.absences.lock().unwrap_or_else(|e| e.into_inner());
            let n = absences.entry(agent.clone()).or_default();
            *n += 1;
            *n
        };
        let this = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = this.shutdown.cancelled() => return,
                _ = tokio::time::sleep(this.settings.agent_timeout) => {}
            }
            let latest = this
                .absences
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&agent)
                .copied();
            // Back and gone again since: that absence has its own full timeout.
            if latest != Some(absence) || this.dispatch.is_connected(&agent).await {
                return;
            }
            match this.db.active_deployments_on(&agent).await {
                Ok(active) => {
                    for deployment in active {
                        this.fail(&deployment, &format!("agent {agent} went offline"))
                            .await;
                    }
                }
                Err(e) => {
                    tracing::error!(%agent, error = %e, "cannot read the agent's deployments")
                }
            }
        });
    }

    /// Ends the sandboxes whose expiry has passed, every few seconds.
    async fn expire_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let expired = match self.db.expired_sandboxes(OffsetDateTime::now_utc()).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read expired sandboxes");
                    continue;
                }
            };
            for id in expired {
                let Ok(Some(sandbox)) = self.db.sandbox(id.as_str()).await else {
                    continue;
                };
                tracing::info!(sandbox = %sandbox.name, "sandbox expired");
                match self.end(&sandbox, Ending::Expired, "sdp").await {
                    // Deleted meanwhile.
                    Ok(()) | Err(WriteError::Ended) => {}
                    Err(e) => {
                        tracing::error!(sandbox = %sandbox.name, error = %e, "cannot end an expired sandbox")
                    }
                }
            }
        }
    }

    /// Records what an agent runs after an outcome that came after its deployment ended: the
    /// instances are what serves now, so the routes follow them; if the sandbox has ended,
    /// they are removed instead.
    async fn apply_late_outcome(
        self: &Arc<Self>,
        agent: &AgentName,
        placement: Placement,
        sandbox_id: &SandboxId,
        deployment: &DeploymentId,
        instances: &[Instance],
    ) {
        match self
            .db
            .record_outcome(deployment, agent, placement, instances)
            .await
        {
            Ok(true) => {
                tracing::info!(%deployment, "a late outcome recorded: the routes follow what runs");
                self.routes.request("a late outcome");
            }
            Ok(false) => {
                tracing::info!(%deployment, %sandbox_id, "a late outcome of an ended sandbox: removing what it started");
                // Not here: the agent's answer comes on the connection whose events this is.
                let (this, agent, sandbox_id) = (self.clone(), agent.clone(), sandbox_id.clone());
                self.spawn(async move { this.teardown(&sandbox_id, &agent).await });
            }
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot record a late outcome")
            }
        }
    }

    /// Stops the lifecycle's tasks and waits for them (a task that is stuck past `limit` is
    /// left, and said so), so that the database can close.
    pub async fn shutdown(&self, limit: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(limit, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tasks.len(),
                "lifecycle tasks did not end within {limit:?}"
            );
        }
    }
}
