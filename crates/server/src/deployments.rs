//! Deployments on the control plane's side: scheduling on a micro agent, storing the events
//! the agent reports, ending deployments, tearing sandboxes down, and expiry.
//!
//! A deployment's log is written by the agent (its events carry the agent's `seq`) until the
//! agent's `outcome`; only then does the control plane append frames of its own (the end
//! frame), so the two never race for a `seq`. A deployment that fails before reaching an agent
//! is logged by the control plane alone.

use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{
    Credentials, DeployJob, Event, EventBody, JobKind, JobOutput, Role, SandboxName, ServiceSpec,
    Step, StepState,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::db::Db;
use crate::hub::{CallError, Hub};
use crate::logs::{Frame, Logs};
use crate::routes::Routes;

pub struct Deployments {
    pub db: Db,
    pub logs: Logs,
    pub hub: Arc<Hub>,
    /// How long to wait for an agent to take a job.
    pub job_timeout: Duration,
    /// How long an agent may be gone before its deployments fail.
    pub agent_timeout: Duration,
    /// Given to services as `SDP_GATEWAY_URL`.
    pub gateway_url: String,
    pub routes: Arc<Routes>,
    /// The control plane is stopping: what is interrupted then is resumed at the next start,
    /// not failed.
    pub shutdown: tokio_util::sync::CancellationToken,
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Whether `id` is one of ours (`dep_` and 16 hex digits).
pub fn is_deployment_id(id: &str) -> bool {
    id.strip_prefix("dep_")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An agent's event as a frame of the log.
fn frame_of(agent: &str, event: &Event) -> Frame {
    let seq = event.seq;
    let ts = event.ts.format(&Rfc3339).unwrap_or_default();
    match &event.body {
        EventBody::Log {
            service,
            stream,
            line,
        } => Frame::Log {
            seq,
            ts,
            service: service.as_ref().map(ToString::to_string),
            stream: stream.as_str().to_owned(),
            line: line.clone(),
        },
        EventBody::Step {
            service,
            step,
            state,
        } => Frame::Step {
            seq,
            ts,
            service: service.as_ref().map(ToString::to_string),
            step: step.as_str().to_owned(),
            state: state.as_str().to_owned(),
        },
        EventBody::Outcome { ok, error, .. } => Frame::Log {
            seq,
            ts,
            service: None,
            stream: "system".into(),
            line: match (ok, error) {
                (true, _) => format!("agent {agent}: every service is healthy"),
                (false, Some(e)) => format!("agent {agent}: {e}"),
                (false, None) => format!("agent {agent}: the deployment failed"),
            },
        },
    }
}

impl Deployments {
    /// Sends a deploy job to `agent` (or the least busy micro agent) and records who runs it;
    /// fails the deployment at once when no agent can take it.
    pub async fn schedule(
        &self,
        deployment: String,
        sandbox_id: String,
        sandbox: SandboxName,
        agent: Option<String>,
        credentials: Credentials,
        services: Vec<ServiceSpec>,
    ) {
        let sandbox_name = sandbox.clone();
        let job = JobKind::Deploy(DeployJob {
            deployment: deployment.clone(),
            sandbox,
            credentials,
            gateway_url: self.gateway_url.clone(),
            services,
        });
        let result = match &agent {
            Some(name) => self.hub.call_agent(name, job, self.job_timeout).await,
            None => self.hub.call(Role::Micro, job, self.job_timeout).await,
        };
        let reason = match result {
            Ok((agent, JobOutput::Accepted)) => {
                match self
                    .db
                    .set_deployment_running(&deployment, &sandbox_id, &agent)
                    .await
                {
                    Ok(true) => tracing::info!(%deployment, %agent, "deployment started"),
                    Ok(false) => {
                        // The sandbox ended while the job was on its way: undo it.
                        tracing::info!(%deployment, %agent, "deployment taken after its sandbox ended; removing it");
                        self.remove_on_agent(&sandbox_name, &agent).await;
                    }
                    Err(e) => {
                        tracing::error!(%deployment, error = %e, "cannot record the deployment's agent")
                    }
                }
                return;
            }
            Ok((agent, JobOutput::Failed(e))) => {
                format!("agent {agent} refused the deployment: {}", e.message)
            }
            Ok((agent, other)) => format!("agent {agent} answered the deploy job with {other:?}"),
            Err(CallError::NoAgent(_) | CallError::NotConnected(_)) => match agent {
                Some(name) => format!(
                    "agent {name}, which runs this sandbox, is not connected; start it again or delete the sandbox"
                ),
                None => "no micro agent is connected to run it; start `sdp agent --role micro`"
                    .to_owned(),
            },
            Err(e) => e.to_string(),
        };
        self.fail(&deployment, &reason).await;
    }

    /// Ends a deployment as failed, with a system line and the end frame saying why.
    pub async fn fail(&self, deployment: &str, reason: &str) {
        tracing::warn!(%deployment, %reason, "deployment failed");
        let line = format!("deployment failed: {reason}");
        if let Err(e) = self
            .logs
            .append_own(deployment, |seq| Frame::Log {
                seq,
                ts: now_rfc3339(),
                service: None,
                stream: "system".into(),
                line,
            })
            .await
        {
            tracing::error!(%deployment, error = %e, "cannot write the deployment log");
        }
        self.finish(deployment, false, Some(reason.to_owned()), &[])
            .await;
    }

    async fn finish(
        &self,
        deployment: &str,
        ok: bool,
        error: Option<String>,
        outcomes: &[(String, Option<String>, Option<String>)],
    ) {
        let now = OffsetDateTime::now_utc();
        match self
            .db
            .finish_deployment(deployment, ok, error.as_deref(), outcomes, now)
            .await
        {
            Ok(true) => {
                let state = if ok { "ready" } else { "failed" };
                self.end_log(deployment, state, error).await;
            }
            // Ended before (cancelled by a delete, say): its log has its end frame.
            Ok(false) => {}
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot record the end of a deployment")
            }
        }
    }

    /// A deployment's `routing` step: every service is healthy; the gateways get the new
    /// table, and the deployment is ready once they have applied it. The step was recorded
    /// as running before (see [`Deployments::apply`]).
    async fn route(&self, deployment: &str) {
        match self.db.deployment(deployment).await {
            Ok(Some(d)) if d.state == "running" => {}
            // Ended meanwhile (its sandbox was deleted).
            Ok(_) => return,
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot read the deployment");
                return;
            }
        }
        match self.routes.publish().await {
            Ok(()) => {
                self.routing_step(deployment, StepState::Done).await;
                self.finish(deployment, true, None, &[]).await;
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

    async fn routing_step(&self, deployment: &str, state: StepState) {
        let now = OffsetDateTime::now_utc();
        if let Err(e) = self
            .db
            .record_step(deployment, "", Step::Routing.as_str(), state.as_str(), now)
            .await
        {
            tracing::error!(%deployment, error = %e, "cannot record a step");
        }
        if let Err(e) = self
            .logs
            .append_own(deployment, |seq| Frame::Step {
                seq,
                ts: now.format(&Rfc3339).unwrap_or_default(),
                service: None,
                step: Step::Routing.as_str().to_owned(),
                state: state.as_str().to_owned(),
            })
            .await
        {
            tracing::error!(%deployment, error = %e, "cannot write the deployment log");
        }
    }

    async fn end_log(&self, deployment: &str, state: &str, error: Option<String>) {
        let state = state.to_owned();
        if let Err(e) = self
            .logs
            .append_own(deployment, |seq| Frame::End {
                seq,
                ts: now_rfc3339(),
                state,
                error,
            })
            .await
        {
            tracing::error!(%deployment, error = %e, "cannot write the end of the deployment log");
        }
    }

    /// Stores a batch of `agent`'s events: the log lines first, then what they change in
    /// SQLite. Returns what to acknowledge (per deployment, the `seq` its log now holds), and
    /// whether an event could not be stored (a gap, or a failed write): the connection is
    /// then closed, so that the agent sends everything unacknowledged again.
    pub async fn ingest(
        self: &Arc<Self>,
        agent: &str,
        events: Vec<Event>,
    ) -> (Vec<(String, u64)>, bool) {
        let mut acks = Vec::new();
        let mut missing = false;
        let mut rest = events.as_slice();
        while let Some(first) = rest.first() {
            // A run of consecutive events of one deployment is written at once.
            let run = rest
                .iter()
                .take_while(|e| e.deployment == first.deployment)
                .count();
            let (batch, tail) = rest.split_at(run);
            rest = tail;
            let deployment = first.deployment.clone();
            if !is_deployment_id(&deployment) {
                // It becomes a file name: never let an agent choose a path.
                tracing::warn!(%agent, "events of a malformed deployment id dropped");
                continue;
            }
            let frames: Vec<Frame> = batch.iter().map(|e| frame_of(agent, e)).collect();
            let (ack, stored) = match self.logs.append_agent(&deployment, &frames).await {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!(%deployment, error = %e, "cannot write the deployment log");
                    missing = true;
                    continue;
                }
            };
            let acked = ack.unwrap_or(0);
            if batch.iter().any(|e| e.seq > acked) {
                missing = true;
            }
            for (i, event) in batch.iter().enumerate() {
                if stored.contains(&i) {
                    self.apply(&deployment, event).await;
                } else if event.seq <= acked && matches!(event.body, EventBody::Outcome { .. }) {
                    // Stored before, but perhaps not applied (a crash between the file and
                    // SQLite): ending a deployment twice changes nothing.
                    self.apply(&deployment, event).await;
                }
            }
            if let Some(seq) = ack {
                acks.push((deployment, seq));
            }
        }
        (acks, missing)
    }

    /// What a stored event changes in SQLite.
    async fn apply(self: &Arc<Self>, deployment: &str, event: &Event) {
        match &event.body {
            EventBody::Log { .. } => {}
            EventBody::Step {
                service,
                step,
                state,
            } => {
                let service = service.as_ref().map(|s| s.to_string()).unwrap_or_default();
                if let Err(e) = self
                    .db
                    .record_step(
                        deployment,
                        &service,
                        step.as_str(),
                        state.as_str(),
                        event.ts,
                    )
                    .await
                {
                    tracing::error!(%deployment, error = %e, "cannot record a step");
                }
            }
            EventBody::Outcome {
                ok,
                error,
                services,
            } => {
                let outcomes: Vec<_> = services
                    .iter()
                    .map(|s| (s.service.to_string(), s.commit.clone(), s.upstream.clone()))
                    .collect();
                let this = self.clone();
                let deployment = deployment.to_owned();
                if *ok {
                    // An outcome sent again (after a reconnect) routes nothing twice.
                    if matches!(self.db.routing_begun(&deployment).await, Ok(true)) {
                        return;
                    }
                    if let Err(e) = self.db.record_outcomes(&deployment, &outcomes).await {
                        tracing::error!(%deployment, error = %e, "cannot record the services' upstreams");
                    }
                    // From here the deployment is the control plane's: its agent may go and
                    // come back without failing it.
                    self.routing_step(&deployment, StepState::Running).await;
                    // Waiting for the gateways here would hold up this agent's other events.
                    tokio::spawn(async move { this.route(&deployment).await });
                } else {
                    self.finish(&deployment, false, error.clone(), &outcomes)
                        .await;
                    // Services that came up before the failure have new upstreams.
                    tokio::spawn(
                        async move { this.routes.publish_logged("a deployment failed").await },
                    );
                }
            }
        }
    }

    /// After a restart of the control plane: queued deployments never reached an agent and
    /// fail; the agents of running ones get the usual time to come back.
    pub async fn recover(self: &Arc<Self>) {
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
                    self.agent_disconnected(agent);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read running deployments"),
        }
        match self.db.deployments_in_routing().await {
            Ok(routing) if !routing.is_empty() => {
                let this = self.clone();
                tokio::spawn(async move {
                    this.wait_for_a_gateway().await;
                    for deployment in routing {
                        let this = this.clone();
                        tokio::spawn(async move { this.route(&deployment).await });
                    }
                });
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read deployments being routed"),
        }
    }

    /// Until a gateway agent is connected, for as long as agents get to come back
    /// (`agent_timeout`). Just after a restart none is yet: routing at once would fail every
    /// deployment that was being routed. One check a tenth of a second, once per restart.
    async fn wait_for_a_gateway(&self) {
        let deadline = tokio::time::Instant::now() + self.agent_timeout;
        while self.hub.names_of(Role::Gateway).is_empty() && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An agent said hello: deployments recorded as running there but unknown to it were lost
    /// with its previous run.
    pub async fn agent_connected(&self, agent: &str, in_progress: &[String]) {
        match self.db.active_deployments_on(agent).await {
            Ok(active) => {
                for deployment in active.iter().filter(|d| !in_progress.contains(d)) {
                    self.fail(deployment, &format!("agent {agent} restarted and lost it"))
                        .await;
                }
            }
            Err(e) => tracing::error!(%agent, error = %e, "cannot read the agent's deployments"),
        }
    }

    /// An agent's connection ended: if it is not back within the heartbeat timeout, its
    /// deployments in progress fail.
    pub fn agent_disconnected(self: &Arc<Self>, agent: String) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.agent_timeout).await;
            if this.hub.is_connected(&agent) {
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

    /// Records a sandbox ended (`deleted` or `expired`): a deployment in progress is
    /// cancelled, with an end frame that says why.
    /// Ends a sandbox and its deployment in progress, and returns the agent that runs it as
    /// recorded once it has ended: a deploy job taken meanwhile has recorded its agent by
    /// then (or sees the sandbox ended and removes itself), so no agent is left running it
    /// without a teardown.
    pub async fn end_sandbox(&self, sandbox_id: &str, state: &str) -> Option<String> {
        if let Ok(Some(latest)) = self.db.latest_active_deployment(sandbox_id).await {
            self.end_log(
                &latest,
                "cancelled",
                Some(format!("the sandbox was {state}")),
            )
            .await;
        }
        if let Err(e) = self
            .db
            .end_sandbox(sandbox_id, state, OffsetDateTime::now_utc())
            .await
        {
            tracing::error!(sandbox = %sandbox_id, error = %e, "cannot record the end of a sandbox");
        }
        match self.db.sandbox(sandbox_id).await {
            Ok(Some(row)) => row.agent,
            _ => None,
        }
    }

    /// Stops and removes everything of a sandbox on its agent. An agent that is not
    /// connected removes it when it comes back (it reports what it runs in its hello).
    pub async fn remove_on_agent(&self, name: &SandboxName, agent: &str) {
        let job = JobKind::Teardown {
            sandbox: name.clone(),
        };
        match self.hub.call_agent(agent, job, TEARDOWN_TIMEOUT).await {
            Ok((_, JobOutput::TornDown)) => {
                tracing::info!(sandbox = %name, %agent, "sandbox removed from its agent");
            }
            Ok((_, other)) => {
                tracing::warn!(sandbox = %name, %agent, ?other, "teardown failed; the agent removes leftovers when it reconnects");
            }
            Err(e) => {
                tracing::warn!(sandbox = %name, %agent, error = %e, "teardown not done now; the agent removes leftovers when it reconnects");
            }
        }
    }

    /// Tears down the sandboxes whose expiry has passed, every few seconds.
    pub async fn sweep_expired(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
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
                let Ok(Some(sandbox)) = self.db.sandbox(&id).await else {
                    continue;
                };
                let Ok(name) = SandboxName::parse(sandbox.name.clone()) else {
                    continue;
                };
                tracing::info!(sandbox = %name, "sandbox expired");
                let _ = self.db.audit("sdp", "expire", name.as_str(), "").await;
                let agent = self.end_sandbox(&id, "expired").await.or(sandbox.agent);
                // Routes go first: no request reaches an instance being stopped.
                self.routes.publish_logged("a sandbox expired").await;
                if let Some(agent) = &agent {
                    self.remove_on_agent(&name, agent).await;
                }
            }
        }
    }
}

/// Stopping containers can take a while; longer than a git call.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);
