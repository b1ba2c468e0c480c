//! Sleep and wake (SPEC §3 Instance): a `ready` sandbox with no use for `idle_after` sleeps
//! (its instances stopped, its builds kept), and a request through the router, or a person
//! (`POST /api/sandboxes/{id}/wake`), wakes it without a fetch or a build.
//!
//! Use is the last of: a routed request (the gateway agents' `activity`, every 5 s), the end
//! of a deployment, a wake. An extend is not use: it is about how long the sandbox lives, and
//! sleeping costs its owner one slow first request.
//!
//! Order matters both ways. To sleep, the state changes first (one transaction with the
//! services and the audit row), then the gateways get a table that says the sandbox sleeps,
//! and only then is the agent told to stop the instances: a request meanwhile is held, never
//! sent to an instance being stopped. To wake, the agent starts the instances and answers
//! where they are; those are recorded with the state (`ready`), then the table goes out, which
//! releases the held requests.
//!
//! One transition at a time per sandbox: a sleep and a wake of one sandbox take the same lock,
//! so a wake that comes while the agent is still stopping instances starts them after it,
//! never before. Wakes asked for while one runs join it (the router asks every 5 s while it
//! holds requests, and a person may ask as well): one `wake` job at a time per sandbox. A
//! failed wake leaves the sandbox sleeping, with an audit row saying why; the router's next
//! ask tries again. A sleep job that fails is logged and the sandbox sleeps anyway: its
//! wake starts the instances whatever became of them.

use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{AgentName, SandboxId, SandboxName, Sleep, WakeJob};
use time::OffsetDateTime;

use super::Lifecycle;
use crate::db::{Audit, SandboxState, Slept};
use crate::dispatch::{Target, call};

/// Stopping a sandbox's instances: as long as a teardown may take.
const SLEEP_TIMEOUT: Duration = super::TEARDOWN_TIMEOUT;

/// Who wakes a sandbox for a request through the router, in the audit trail.
pub(super) const ROUTER: &str = "router";

/// How often idle sandboxes are looked for: a quarter of `idle_after`, from a tenth of a
/// second to half a minute.
fn sleep_tick(idle_after: Duration) -> Duration {
    (idle_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

impl Lifecycle {
    /// The gateway agents' report of the sandboxes that had requests: they are in use now.
    pub(super) async fn record_activity(&self, agent: &AgentName, sandboxes: &[SandboxName]) {
        if sandboxes.is_empty() {
            return;
        }
        match self
            .db
            .record_activity(sandboxes, OffsetDateTime::now_utc())
            .await
        {
            Ok(n) => {
                tracing::debug!(%agent, sandboxes = sandboxes.len(), live = n, "activity recorded")
            }
            Err(e) => tracing::error!(%agent, error = %e, "cannot record activity"),
        }
    }

    /// A gateway holds a request for `name`: wakes that live sandbox if it sleeps.
    pub(super) async fn wake_for_router(self: &Arc<Self>, agent: &AgentName, name: &SandboxName) {
        match self.db.sandbox(name.as_str()).await {
            Ok(Some(sandbox)) if !sandbox.state.has_ended() => self.wake(&sandbox.id, ROUTER),
            Ok(_) => {
                tracing::debug!(%agent, sandbox = %name, "wake asked for a sandbox that is not live")
            }
            Err(e) => {
                tracing::error!(%agent, sandbox = %name, error = %e, "cannot read a sandbox to wake")
            }
        }
    }

    /// Wakes a sandbox in the background if it sleeps (or a redeploy left some of its
    /// services asleep); `actor` is who asked, for the audit trail. A wake in progress is
    /// joined; a sandbox that is awake is left as it is.
    pub fn wake(self: &Arc<Self>, sandbox_id: &SandboxId, actor: &str) {
        {
            let mut waking = self.waking.lock().unwrap_or_else(|e| e.into_inner());
            if !waking.insert(sandbox_id.clone()) {
                tracing::debug!(%sandbox_id, actor, "wake joined the one in progress");
                return;
            }
        }
        let (this, sandbox_id, actor) = (self.clone(), sandbox_id.clone(), actor.to_owned());
        self.spawn(async move {
            this.run_wake(&sandbox_id, &actor).await;
            this.waking
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sandbox_id);
        });
    }

    async fn run_wake(&self, sandbox_id: &SandboxId, actor: &str) {
        let _transition = self.transition(sandbox_id).await;
        let target = match self.db.wake_target(sandbox_id).await {
            Ok(Some(target)) => target,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(%sandbox_id, error = %e, "cannot read a sandbox to wake");
                return;
            }
        };
        let wanted = match target.state {
            SandboxState::Sleeping => true,
            SandboxState::Ready | SandboxState::Failed => target.sleeping_services,
            _ => false,
        };
        if !wanted {
            tracing::debug!(%sandbox_id, state = %target.state, "nothing of the sandbox sleeps");
            return;
        }
        let name = target.name;
        tracing::info!(sandbox = %name, %sandbox_id, actor, "waking the sandbox");
        // The micro agent first: a sandbox's own gateway starts once what it routes to runs.
        let mut result = match target.agents.is_empty() {
            true => Err("no agent runs it".to_owned()),
            false => Ok(Vec::new()),
        };
        for agent in &target.agents {
            let Ok(woken) = &mut result else { break };
            match call(
                self.dispatch.as_ref(),
                Target::Agent(agent.clone()),
                WakeJob {
                    sandbox_id: sandbox_id.clone(),
                },
                self.settings.wake_timeout,
            )
            .await
            {
                Ok((_, services)) => woken.extend(services),
                Err(e) => result = Err(e.to_string()),
            }
        }
        let now = OffsetDateTime::now_utc();
        let services = match result {
            Ok(services) => services,
            Err(reason) => {
                tracing::warn!(sandbox = %name, %sandbox_id, %reason, "the sandbox did not wake");
                let audit = Audit {
                    actor,
                    action: "wake_failed",
                    target: name.as_str(),
                    detail: &reason,
                };
                if let Err(e) = self.db.audit(&audit, now).await {
                    tracing::error!(sandbox = %name, error = %e, "cannot record a failed wake");
                }
                return;
            }
        };
        let detail = services
            .iter()
            .map(|s| match &s.upstream {
                Some(upstream) => format!("{} at {upstream}", s.service),
                None => format!("{} did not start", s.service),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let audit = Audit {
            actor,
            action: "wake",
            target: name.as_str(),
            detail: &detail,
        };
        match self
            .db
            .wake_sandbox(sandbox_id, &services, now, &audit)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Redeployed or ended meanwhile: that decides what runs.
                tracing::info!(sandbox = %name, "woken after a redeploy or its end; the routes follow that");
                return;
            }
            Err(e) => {
                tracing::error!(sandbox = %name, error = %e, "cannot record a wake");
                return;
            }
        }
        match self.routes.publish("a sandbox woke").await {
            Ok(generation) => {
                tracing::info!(sandbox = %name, %generation, "the sandbox woke; its requests go on")
            }
            Err(e) => tracing::warn!(sandbox = %name, error = %e, "route table not published"),
        }
    }

    /// Puts idle sandboxes to sleep, every [`sleep_tick`]; not started when `idle_after` is
    /// zero.
    pub(super) async fn sleep_loop(self: Arc<Self>, idle_after: Duration) {
        let mut tick = tokio::time::interval(sleep_tick(idle_after));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let before = OffsetDateTime::now_utc() - idle_after;
            let idle = match self.db.idle_sandboxes(before).await {
                Ok(idle) => idle,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read idle sandboxes");
                    continue;
                }
            };
            for sandbox_id in idle {
                let this = self.clone();
                // Each on its own: a slow agent holds up no other sandbox's sleep.
                self.spawn(async move { this.sleep(&sandbox_id, before, idle_after).await });
            }
        }
    }

    async fn sleep(&self, sandbox_id: &SandboxId, before: OffsetDateTime, idle_after: Duration) {
        let _transition = self.transition(sandbox_id).await;
        let detail = format!(
            "no routed request for {}",
            sdp_config::ConfigDuration::from(idle_after)
        );
        let slept = match self
            .db
            .sleep_sandbox(sandbox_id, before, OffsetDateTime::now_utc(), &detail)
            .await
        {
            Ok(Some(slept)) => slept,
            // In use, redeployed, woken or ended since it was found idle.
            Ok(None) => return,
            Err(e) => {
                tracing::error!(%sandbox_id, error = %e, "cannot put a sandbox to sleep");
                return;
            }
        };
        let Slept { name, agents } = slept;
        tracing::info!(sandbox = %name, %sandbox_id, "the sandbox sleeps: {detail}");
        // The routes first: from here its requests are held, not sent to stopping instances.
        if let Err(e) = self.routes.publish("a sandbox sleeps").await {
            tracing::warn!(sandbox = %name, error = %e, "route table not published");
        }
        for agent in agents {
            let job = Sleep {
                sandbox_id: sandbox_id.clone(),
            };
            match call(
                self.dispatch.as_ref(),
                Target::Agent(agent.clone()),
                job,
                SLEEP_TIMEOUT,
            )
            .await
            {
                Ok(_) => {
                    tracing::info!(sandbox = %name, %agent, "the sandbox's instances are stopped")
                }
                Err(e) => {
                    tracing::warn!(sandbox = %name, %agent, error = %e, "the sleep job failed; the sandbox sleeps anyway and its wake starts what it needs")
                }
            }
        }
    }

    /// The lock of one sandbox's sleep or wake, held for the whole transition.
    async fn transition(&self, sandbox_id: &SandboxId) -> Transition<'_> {
        let lock = self
            .transitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sandbox_id.clone())
            .or_default()
            .clone();
        Transition {
            guard: Some(lock.lock_owned().await),
            lifecycle: self,
        }
    }
}

/// A transition's lock; the sandbox's entry goes when nobody holds or waits for it.
struct Transition<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    lifecycle: &'a Lifecycle,
}

impl Drop for Transition<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.lifecycle
            .transitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, lock| Arc::strong_count(lock) > 1);
    }
}
