//! What agents report: hello (and the reconcile that follows), events, and going away.

use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{
    AgentName, DeploymentId, Event, EventBody, Heartbeat, Hello, Role, RuntimeEvent, SandboxName,
    StepState,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Lifecycle;
use crate::db::{Instance, Placement};
use crate::dispatch::{AgentReports, EventsAnswer, RuntimeAnswer};
use crate::logs::Frame;

/// Tries of a log append that fails (a full disk, an I/O error), and the pause after each.
const APPEND_RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(500)];

/// An agent's event as a frame of the log.
fn frame_of(agent: &AgentName, event: &Event) -> Frame {
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

#[async_trait::async_trait]
impl AgentReports for Lifecycle {
    async fn hello(&self, hello: &Hello) {
        if let Err(e) = self
            .db
            .agent_connected(
                &hello.name,
                hello.role,
                &hello.version,
                &hello.host,
                OffsetDateTime::now_utc(),
            )
            .await
        {
            tracing::error!(agent = %hello.name, error = %e, "cannot record agent");
        }
        if hello.role == Role::Gateway {
            // A gateway that just started (or whose control plane did) gets the table now.
            self.routes.request("a gateway agent connected");
        }
        if let Some(this) = self.me.upgrade() {
            let hello = hello.clone();
            self.spawn(async move { this.reconcile(hello).await });
        }
    }

    async fn events(&self, agent: &AgentName, events: Vec<Event>) -> EventsAnswer {
        match self.me.upgrade() {
            Some(this) => this.ingest(agent, events).await,
            // Stopping: nothing is acknowledged, the agent sends it again to the next run.
            None => EventsAnswer::default(),
        }
    }

    async fn runtime(&self, agent: &AgentName, events: Vec<RuntimeEvent>) -> RuntimeAnswer {
        match self.me.upgrade() {
            Some(this) => this.ingest_runtime(agent, events).await,
            None => RuntimeAnswer::default(),
        }
    }

    async fn activity(&self, agent: &AgentName, sandboxes: Vec<SandboxName>) {
        self.record_activity(agent, &sandboxes).await;
    }

    async fn wake(&self, agent: &AgentName, sandbox: SandboxName) {
        if let Some(this) = self.me.upgrade() {
            this.wake_for_router(agent, &sandbox).await;
        }
    }

    async fn gone(&self, agent: &AgentName, last_seen: OffsetDateTime, last: Heartbeat) {
        if let Err(e) = self
            .db
            .agent_disconnected(agent, last_seen, last.running)
            .await
        {
            tracing::error!(%agent, error = %e, "cannot record agent disconnect");
        }
        if let Some(this) = self.me.upgrade() {
            this.watch_absence(agent.clone());
        }
    }
}

impl Lifecycle {
    /// After a hello: deployments recorded as running on the agent but unknown to it were
    /// lost with its previous run and fail; what it holds of sandboxes that have ended (by
    /// id: a name may have been reused since) is removed.
    async fn reconcile(self: Arc<Self>, hello: Hello) {
        let agent = &hello.name;
        match self.db.active_deployments_on(agent).await {
            Ok(active) => {
                for deployment in active.iter().filter(|d| !hello.deployments.contains(d)) {
                    self.fail(deployment, &format!("agent {agent} restarted and lost it"))
                        .await;
                }
            }
            Err(e) => tracing::error!(%agent, error = %e, "cannot read the agent's deployments"),
        }
        let live = match self.db.live_sandbox_ids().await {
            Ok(live) => live,
            Err(e) => {
                tracing::error!(%agent, error = %e, "cannot read live sandboxes");
                return;
            }
        };
        for sandbox_id in hello.sandboxes.iter().filter(|s| !live.contains(s)) {
            tracing::info!(%agent, %sandbox_id, "removing what an agent holds of a sandbox that ended");
            self.teardown(sandbox_id, agent).await;
        }
    }

    /// Stores a batch of `agent`'s events: the log lines first, then what they change in
    /// SQLite. Answers what to acknowledge (per deployment, the `seq` its log now holds), and
    /// from which `seq` events are needed again (after a gap).
    async fn ingest(self: &Arc<Self>, agent: &AgentName, events: Vec<Event>) -> EventsAnswer {
        let mut answer = EventsAnswer::default();
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
            let frames: Vec<Frame> = batch.iter().map(|e| frame_of(agent, e)).collect();
            let (ack, stored) = match self.append(&deployment, &frames).await {
                Ok(result) => result,
                Err(e) => {
                    // Retried, and still failing: the deployment fails for it, visibly, and
                    // its events are let go, so that the agent is not wedged on them.
                    let reason = format!("its log could not be stored on the control plane: {e}");
                    if self.fail(&deployment, &reason).await {
                        self.let_go(agent, &deployment, batch, &mut answer).await;
                    }
                    // Otherwise the database failed too: nothing is acknowledged, and the
                    // agent keeps the events until they can be stored.
                    continue;
                }
            };
            let acked = ack.unwrap_or(0);
            if batch.iter().any(|e| e.seq > acked) {
                if !self.in_progress(&deployment).await {
                    // A gap in the log of a deployment that has ended: its log was closed
                    // without the events before these (they could not be stored), and the
                    // agent no longer holds them. Asking for them again would never end.
                    self.let_go(agent, &deployment, batch, &mut answer).await;
                    continue;
                }
                // An event is missing before these: the agent sends again from the first one
                // the log does not hold.
                match self.logs.last_seq(deployment.as_str()).await {
                    Ok(last) => answer.resend.push((deployment.clone(), last + 1)),
                    Err(e) => {
                        tracing::error!(%deployment, error = %e, "cannot read the deployment log")
                    }
                }
            }
            for (i, event) in batch.iter().enumerate() {
                if stored.contains(&i) {
                    self.apply(agent, &deployment, event).await;
                } else if event.seq <= acked && matches!(event.body, EventBody::Outcome { .. }) {
                    // Stored before, or dropped from an ended log, but perhaps not applied
                    // (a crash between the file and SQLite, or a deployment ended before its
                    // outcome came): applying an outcome twice changes nothing.
                    self.apply(agent, &deployment, event).await;
                }
            }
            if let Some(seq) = ack {
                answer.acks.push((deployment, seq));
            }
        }
        answer
    }

    /// Whether a deployment is still queued or running (not ended, and known).
    async fn in_progress(&self, deployment: &DeploymentId) -> bool {
        match self.db.outcome_target(deployment).await {
            Ok(Some(target)) => target.deployment.in_progress(),
            Ok(None) => false,
            // Unsure: keep its events, and ask for what is missing.
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot read the deployment");
                true
            }
        }
    }

    /// Acknowledges a run of events of a deployment whose log is closed without storing
    /// them, so that the agent forgets them; an outcome among them still counts (it says
    /// what runs).
    async fn let_go(
        self: &Arc<Self>,
        agent: &AgentName,
        deployment: &DeploymentId,
        batch: &[Event],
        answer: &mut EventsAnswer,
    ) {
        self.logs.forget(deployment.as_str());
        let last = batch.iter().map(|e| e.seq).max().unwrap_or(0);
        answer.acks.push((deployment.clone(), last));
        for event in batch {
            if let EventBody::Outcome { .. } = event.body {
                self.apply(agent, deployment, event).await;
            }
        }
    }

    /// Appends to a deployment's log, trying again after a failure.
    async fn append(
        &self,
        deployment: &DeploymentId,
        frames: &[Frame],
    ) -> std::io::Result<(Option<u64>, Vec<usize>)> {
        let mut pauses = APPEND_RETRIES.iter();
        loop {
            match self.logs.append_agent(deployment.as_str(), frames).await {
                Ok(result) => return Ok(result),
                Err(e) => match pauses.next() {
                    Some(pause) => {
                        tracing::warn!(%deployment, error = %e, "cannot write the deployment log; trying again");
                        tokio::time::sleep(*pause).await;
                    }
                    None => {
                        tracing::error!(%deployment, error = %e, "cannot write the deployment log");
                        return Err(e);
                    }
                },
            }
        }
    }

    /// What a stored event changes in SQLite.
    async fn apply(self: &Arc<Self>, agent: &AgentName, deployment: &DeploymentId, event: &Event) {
        match &event.body {
            EventBody::Log { .. } => {}
            EventBody::Step {
                service,
                step,
                state,
            } => {
                let service = service.as_ref().map(|s| s.as_str());
                match self
                    .db
                    .record_step(deployment, service, *step, *state, event.ts)
                    .await
                {
                    Ok(ended) => self.metrics.steps_ended(&ended),
                    Err(e) => tracing::error!(%deployment, error = %e, "cannot record a step"),
                }
            }
            EventBody::Outcome {
                ok,
                error,
                services,
            } => {
                let instances: Vec<Instance> = services
                    .iter()
                    .map(|s| Instance {
                        service: s.service.clone(),
                        commit: s.commit.clone(),
                        upstream: s.upstream.clone(),
                        since: event.ts,
                    })
                    .collect();
                let target = match self.db.outcome_target(deployment).await {
                    Ok(Some(target)) => target,
                    Ok(None) => {
                        tracing::warn!(%agent, %deployment, "outcome of an unknown deployment dropped");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(%deployment, error = %e, "cannot read the deployment");
                        return;
                    }
                };
                // The gateway agent reports the sandbox's own API gateway; the micro agent
                // every other service.
                let placement = if services
                    .iter()
                    .any(|s| self.settings.gateway_services.contains(&s.service))
                {
                    Placement::Gateway
                } else {
                    Placement::Micro
                };
                if !target.deployment.in_progress() {
                    // Ended (cancelled, superseded): its gateway's half never goes.
                    self.gateway_halves
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(deployment);
                    return self
                        .apply_late_outcome(
                            agent,
                            placement,
                            &target.sandbox_id,
                            deployment,
                            &instances,
                        )
                        .await;
                }
                if *ok {
                    // An outcome sent again (after a reconnect) routes nothing twice.
                    if matches!(self.db.routing_begun(deployment).await, Ok(true)) {
                        return;
                    }
                    if placement == Placement::Micro && self.selects_a_gateway(deployment).await {
                        return self.micro_half_done(agent, deployment, &instances).await;
                    }
                    if let Err(e) = self
                        .db
                        .record_outcome(deployment, agent, placement, &instances)
                        .await
                    {
                        tracing::error!(%deployment, error = %e, "cannot record the services' upstreams");
                    }
                    // From here the deployment is the control plane's: its agent may go and
                    // come back without failing it.
                    self.routing_step(deployment, StepState::Running).await;
                    // Waiting for the gateways here would hold up this agent's other events.
                    let (this, deployment) = (self.clone(), deployment.clone());
                    self.spawn(async move { this.route(&deployment).await });
                } else {
                    let finish = crate::db::Finish {
                        ok: false,
                        error: error.as_deref(),
                        instances: &instances,
                    };
                    self.finish(deployment, &finish).await;
                    // Services that came up before the failure have new upstreams.
                    self.routes.request("a deployment failed");
                }
            }
        }
    }

    /// Whether a deployment selects the sandbox's own API gateway.
    async fn selects_a_gateway(&self, deployment: &DeploymentId) -> bool {
        match self.db.deployment(deployment.as_str()).await {
            Ok(Some(d)) => d.services.iter().any(|s| {
                sdp_protocol::ServiceName::parse(s.service.as_str())
                    .is_ok_and(|name| self.settings.gateway_services.contains(&name))
            }),
            Ok(None) => false,
            Err(e) => {
                tracing::error!(%deployment, error = %e, "cannot read the deployment");
                false
            }
        }
    }

    /// The micro agent brought up every service of a deployment that selects the sandbox's
    /// gateway: their upstreams are recorded and routed (so that the gateway agent's table,
    /// from which it writes the gateway's routes, holds them), then the gateway's half goes
    /// to the gateway agent.
    async fn micro_half_done(
        self: &Arc<Self>,
        agent: &AgentName,
        deployment: &DeploymentId,
        instances: &[Instance],
    ) {
        let record = async {
            if let Err(e) = self
                .db
                .record_outcome(deployment, agent, Placement::Micro, instances)
                .await
            {
                tracing::error!(%deployment, error = %e, "cannot record the services' upstreams");
            }
        };
        let half = self
            .gateway_halves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(deployment);
        let Some(half) = half else {
            let sent = self
                .gateway_sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(deployment);
            let handed_on = matches!(
                self.db.deployment(deployment.as_str()).await,
                Ok(Some(d)) if d.agent.as_ref() != Some(agent)
            );
            if sent || handed_on {
                // The outcome again, after a reconnect: the gateway's half runs already.
                return;
            }
            record.await;
            self.fail(
                deployment,
                "the control plane restarted before the sandbox's gateway was deployed, and no longer holds the credentials to fetch it; deploy again",
            )
            .await;
            self.routes.request("a deployment failed");
            return;
        };
        record.await;
        let (this, deployment) = (self.clone(), deployment.clone());
        self.spawn(async move {
            if let Err(reason) = this
                .routes
                .publish("the services of a sandbox's gateway are up")
                .await
            {
                this.fail(&deployment, &reason).await;
                return;
            }
            this.deploy_gateway(&deployment, half, None).await;
        });
    }
}
