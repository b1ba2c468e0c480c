//! Instances after ready: each service's state as its agent reports it, with the audit row of
//! every crash and restart, and where each agent's runtime events of a sandbox stand.

use sdp_protocol::{AgentName, InstanceReport, InstanceState, SandboxId, SandboxName};
use sqlx::Row;
use time::OffsetDateTime;

use super::{Audit, Db, ServiceState, insert_audit, parsed, to_millis};

/// Where an agent's runtime events of a sandbox land.
pub struct RuntimeTarget {
    pub name: SandboxName,
    /// Not ended: its events are stored.
    pub live: bool,
    /// The agent's last event stored, if any.
    pub last_seq: Option<u64>,
}

/// What a batch of instance reports changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RuntimeRecorded {
    /// Reports that changed a service (the others were stale or met a deployment).
    pub applied: usize,
    /// A service's upstream or down-ness changed: the route table is out of date.
    pub routes_changed: bool,
}

/// A service's row as a report finds it.
struct Current {
    state: ServiceState,
    upstream: Option<String>,
    reported_at: Option<i64>,
}

/// What the router does with a service: sends to its upstream, answers 503, or neither.
fn routing(state: ServiceState, upstream: &Option<String>) -> (bool, Option<String>) {
    (
        state.is_down(),
        upstream.clone().filter(|_| !state.is_down()),
    )
}

/// A report's new state. `restarting` is shown as what made the restart necessary (crashed
/// or unhealthy), with the restart count: SPEC §11 lists no `restarting` state.
fn new_state(current: ServiceState, reported: InstanceState) -> ServiceState {
    match reported {
        InstanceState::Running => ServiceState::Running,
        InstanceState::Unhealthy => ServiceState::Unhealthy,
        InstanceState::Crashed => ServiceState::Crashed,
        InstanceState::Restarting => match current {
            ServiceState::Unhealthy => ServiceState::Unhealthy,
            _ => ServiceState::Crashed,
        },
        InstanceState::Sleeping => ServiceState::Sleeping,
    }
}

/// The audit row of a change, if it is one people look for in the sandbox's history.
fn audit_of(
    current: ServiceState,
    report: &InstanceReport,
    upstream: Option<&str>,
) -> Option<(&'static str, String)> {
    let service = &report.service;
    let reason = report.reason.as_deref().unwrap_or("no reason given");
    match report.state {
        InstanceState::Running
            if matches!(current, ServiceState::Crashed | ServiceState::Unhealthy) =>
        {
            Some((
                "instance_restarted",
                format!(
                    "{service}: running again at {} after {} restart(s)",
                    upstream.unwrap_or("its previous address"),
                    report.restarts
                ),
            ))
        }
        InstanceState::Running | InstanceState::Sleeping => None,
        InstanceState::Unhealthy if current == ServiceState::Unhealthy => None,
        InstanceState::Unhealthy => Some(("instance_unhealthy", format!("{service}: {reason}"))),
        InstanceState::Crashed if report.gave_up => {
            Some(("instance_gave_up", format!("{service}: {reason}")))
        }
        InstanceState::Crashed => Some(("instance_crashed", format!("{service}: {reason}"))),
        InstanceState::Restarting => Some((
            "instance_restarting",
            format!("{service}: restart {} ({reason})", report.restarts.max(1)),
        )),
    }
}

impl Db {
    /// The sandbox `agent`'s runtime events are about, and the last of them stored; `None`
    /// for an unknown sandbox.
    pub async fn runtime_target(
        &self,
        sandbox_id: &SandboxId,
        agent: &AgentName,
    ) -> Result<Option<RuntimeTarget>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT s.name, s.state, c.seq FROM sandboxes s
               LEFT JOIN runtime_cursors c ON c.sandbox_id = s.id AND c.agent = ?2
             WHERE s.id = ?1",
        )
        .bind(sandbox_id.as_str())
        .bind(agent.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let state: super::SandboxState = parsed(&r, "state")?;
            Ok(RuntimeTarget {
                name: parsed(&r, "name")?,
                live: !state.has_ended(),
                last_seq: r
                    .try_get::<Option<i64>, _>("seq")?
                    .map(|s| u64::try_from(s).unwrap_or(0)),
            })
        })
        .transpose()
    }

    /// Records that `agent`'s runtime events of a sandbox are stored up to `seq`, and what
    /// its instance reports among them (each with the agent's time) change, with an audit
    /// row for each crash, restart and health failure, in one transaction.
    ///
    /// A report is left out when its service is being deployed (the deployment's outcome
    /// says what runs; the report is about the instance it replaces), when the sandbox has
    /// ended, when it is older than the instance the last deployment recorded, when the
    /// sandbox sleeps (but for `sleeping` reports), and when it says `sleeping` of a sandbox
    /// that does not sleep.
    pub async fn record_runtime(
        &self,
        sandbox_id: &SandboxId,
        sandbox: &SandboxName,
        agent: &AgentName,
        seq: u64,
        reports: &[(OffsetDateTime, &InstanceReport)],
    ) -> Result<RuntimeRecorded, sqlx::Error> {
        let mut tx = self.write().await?;
        let mut recorded = RuntimeRecorded::default();
        sqlx::query(
            "INSERT INTO runtime_cursors (sandbox_id, agent, seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (sandbox_id, agent) DO UPDATE SET seq = MAX(seq, excluded.seq)",
        )
        .bind(sandbox_id.as_str())
        .bind(agent.as_str())
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        let actor = format!("agent:{agent}");
        for (at, report) in reports {
            let row = sqlx::query(
                "SELECT ss.state, ss.upstream, ss.reported_at, s.state AS sandbox_state FROM sandbox_services ss
                   JOIN sandboxes s ON s.id = ss.sandbox_id
                 WHERE ss.sandbox_id = ?1 AND ss.service = ?2 AND s.state NOT IN ('expired', 'deleted')",
            )
            .bind(sandbox_id.as_str())
            .bind(report.service.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue };
            let current = Current {
                state: parsed(&row, "state")?,
                upstream: row.try_get("upstream")?,
                reported_at: row.try_get("reported_at")?,
            };
            let at_ms = to_millis(*at);
            let sandbox_state: super::SandboxState = parsed(&row, "sandbox_state")?;
            // Sleep and wake are the control plane's decisions: while a sandbox sleeps its
            // wake's answer says what runs, and a `sleeping` report of an awake sandbox is
            // from a sleep a wake has undone since.
            let asleep = sandbox_state == super::SandboxState::Sleeping;
            if asleep != (report.state == InstanceState::Sleeping) {
                tracing::debug!(%sandbox_id, service = %report.service, state = %report.state, sandbox_state = %sandbox_state, "instance report left out: the sandbox's sleep or wake decides");
                continue;
            }
            if matches!(
                current.state,
                ServiceState::Deploying | ServiceState::Stopped
            ) || current.reported_at.is_some_and(|since| at_ms < since)
            {
                tracing::debug!(%sandbox_id, service = %report.service, state = %report.state, "instance report left out: a deployment replaced that instance");
                continue;
            }
            let state = new_state(current.state, report.state);
            let upstream = match report.state {
                InstanceState::Running => report.upstream.clone().or(current.upstream.clone()),
                // Still running, and still where it was, but not routed.
                InstanceState::Unhealthy => current.upstream.clone(),
                InstanceState::Crashed | InstanceState::Restarting | InstanceState::Sleeping => {
                    None
                }
            };
            let (reason, last_lines) = match report.state {
                InstanceState::Running | InstanceState::Sleeping => (None, None),
                _ => (
                    report.reason.clone(),
                    (!report.last_lines.is_empty())
                        .then(|| serde_json::to_string(&report.last_lines).unwrap_or_default()),
                ),
            };
            sqlx::query(
                "UPDATE sandbox_services SET state = ?3, upstream = ?4, reason = COALESCE(?5, CASE WHEN ?3 IN ('crashed', 'unhealthy') THEN reason END),
                   last_lines = COALESCE(?6, CASE WHEN ?3 IN ('crashed', 'unhealthy') THEN last_lines END),
                   restarts = ?7, reported_at = ?8
                 WHERE sandbox_id = ?1 AND service = ?2",
            )
            .bind(sandbox_id.as_str())
            .bind(report.service.as_str())
            .bind(state.as_str())
            .bind(&upstream)
            .bind(&reason)
            .bind(&last_lines)
            .bind(i64::from(report.restarts))
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
            recorded.applied += 1;
            recorded.routes_changed |=
                routing(current.state, &current.upstream) != routing(state, &upstream);
            if let Some((action, detail)) = audit_of(current.state, report, upstream.as_deref()) {
                let audit = Audit {
                    actor: &actor,
                    action,
                    target: sandbox.as_str(),
                    detail: &detail,
                };
                // The control plane's clock, as every other row of the trail.
                insert_audit(&mut tx, &audit, OffsetDateTime::now_utc()).await?;
            }
        }
        tx.commit().await?;
        Ok(recorded)
    }
}

/// A row of a sandbox's history (the audit trail).
pub struct HistoryRow {
    pub at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

impl Db {
    /// The audit rows of a sandbox's life, oldest first: rows name a sandbox by its name,
    /// which a later sandbox may take, so only those within its lifetime are its own.
    pub async fn sandbox_history(
        &self,
        sandbox_id: &SandboxId,
        limit: u32,
    ) -> Result<Vec<HistoryRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT a.at, a.actor, a.action, a.detail FROM audit a JOIN sandboxes s ON s.id = ?1
             WHERE a.target = s.name AND a.at >= s.created_at AND a.at <= COALESCE(s.ended_at, a.at)
             ORDER BY a.id DESC LIMIT ?2",
        )
        .bind(sandbox_id.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(HistoryRow {
                    at: super::from_millis(r.try_get("at")?),
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        out.reverse();
        Ok(out)
    }
}
