//! Sleep and wake: when sandboxes were last in use, which are idle, and the two transitions,
//! each with its audit row.

use sdp_protocol::{AgentName, SandboxId, SandboxName, ServiceOutcome};
use sqlx::Row;
use time::OffsetDateTime;

use super::{Audit, Db, SandboxState, insert_audit, parsed, parsed_opt, to_millis};

/// A sandbox put to sleep: its agent gets the `sleep` job.
pub struct Slept {
    pub name: SandboxName,
    /// Its micro agent, then the gateway agent of its own API gateway, if any.
    pub agents: Vec<AgentName>,
}

/// Whether a sandbox is for waking, and on which agent.
pub struct WakeTarget {
    pub name: SandboxName,
    pub state: SandboxState,
    /// Its micro agent, then the gateway agent of its own API gateway, if any: the gateway
    /// wakes once the services it routes to run.
    pub agents: Vec<AgentName>,
    /// A service of it sleeps (the sandbox itself, or one a redeploy of others left asleep).
    pub sleeping_services: bool,
}

fn agents(row: &sqlx::sqlite::SqliteRow) -> Result<Vec<AgentName>, sqlx::Error> {
    Ok([
        parsed_opt::<AgentName>(row, "agent")?,
        parsed_opt(row, "gateway_agent")?,
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// Idle: ready, last used at or before `?1`, and no deployment in progress. Over `s`.
macro_rules! idle {
    () => {
        "s.state = 'ready' AND s.last_active_at <= ?1
         AND NOT EXISTS (SELECT 1 FROM deployments d
                         WHERE d.sandbox_id = s.id AND d.state IN ('queued', 'running'))"
    };
}

impl Db {
    /// Records that the live sandboxes named in `names` were in use at `at` (their last use
    /// never goes back).
    pub async fn record_activity(
        &self,
        names: &[SandboxName],
        at: OffsetDateTime,
    ) -> Result<u64, sqlx::Error> {
        let mut tx = self.write().await?;
        let mut touched = 0;
        for name in names {
            touched += sqlx::query(
                "UPDATE sandboxes SET last_active_at = MAX(last_active_at, ?2)
                 WHERE name = ?1 AND state NOT IN ('expired', 'deleted')",
            )
            .bind(name.as_str())
            .bind(to_millis(at))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(touched)
    }

    /// Ready sandboxes last used at or before `before`, with no deployment in progress.
    pub async fn idle_sandboxes(
        &self,
        before: OffsetDateTime,
    ) -> Result<Vec<SandboxId>, sqlx::Error> {
        let rows = sqlx::query(concat!(
            "SELECT s.id FROM sandboxes s WHERE ",
            idle!(),
            " ORDER BY s.last_active_at"
        ))
        .bind(to_millis(before))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parsed(r, "id")).collect()
    }

    /// Puts a sandbox to sleep if it is still idle (checked again under the write lock):
    /// its state and its services' become `sleeping` (no upstream), with the audit row.
    /// `None` when it is not idle any more.
    pub async fn sleep_sandbox(
        &self,
        sandbox_id: &SandboxId,
        before: OffsetDateTime,
        at: OffsetDateTime,
        detail: &str,
    ) -> Result<Option<Slept>, sqlx::Error> {
        let mut tx = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE sandboxes AS s SET state = 'sleeping' WHERE s.id = ?2 AND ",
            idle!(),
            " RETURNING name, agent, gateway_agent"
        ))
        .bind(to_millis(before))
        .bind(sandbox_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let slept = Slept {
            name: parsed(&row, "name")?,
            agents: agents(&row)?,
        };
        // What has an instance sleeps; a failed service has none to stop.
        sqlx::query(
            "UPDATE sandbox_services SET state = 'sleeping', upstream = NULL, reason = NULL,
               last_lines = NULL
             WHERE sandbox_id = ?1 AND state IN ('running', 'unhealthy', 'crashed')",
        )
        .bind(sandbox_id.as_str())
        .execute(&mut *tx)
        .await?;
        let audit = Audit {
            actor: "sdp",
            action: "sleep",
            target: slept.name.as_str(),
            detail,
        };
        insert_audit(&mut tx, &audit, at).await?;
        tx.commit().await?;
        Ok(Some(slept))
    }

    /// What a wake of `sandbox_id` meets; `None` for an unknown sandbox.
    pub async fn wake_target(
        &self,
        sandbox_id: &SandboxId,
    ) -> Result<Option<WakeTarget>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT name, state, agent, gateway_agent, EXISTS (SELECT 1 FROM sandbox_services ss
                 WHERE ss.sandbox_id = s.id AND ss.state = 'sleeping') AS sleeping
             FROM sandboxes s WHERE id = ?1",
        )
        .bind(sandbox_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(WakeTarget {
                name: parsed(&r, "name")?,
                state: parsed(&r, "state")?,
                agents: agents(&r)?,
                sleeping_services: r.try_get("sleeping")?,
            })
        })
        .transpose()
    }

    /// Records a wake: each service the agent started again runs at its upstream, a sleeping
    /// sandbox is `ready`, and it was in use at `at`; with the audit row. False (nothing
    /// changed) when the sandbox is being deployed or has ended meanwhile: that decides.
    pub async fn wake_sandbox(
        &self,
        sandbox_id: &SandboxId,
        services: &[ServiceOutcome],
        at: OffsetDateTime,
        audit: &Audit<'_>,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.write().await?;
        let changed = sqlx::query(
            "UPDATE sandboxes SET state = CASE WHEN state = 'sleeping' THEN 'ready' ELSE state END,
               last_active_at = MAX(last_active_at, ?2)
             WHERE id = ?1 AND state IN ('sleeping', 'ready', 'failed')",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(at))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        for service in services {
            let state = match service.upstream {
                Some(_) => "running",
                None => "failed",
            };
            sqlx::query(
                "UPDATE sandbox_services SET state = ?3, upstream = ?4,
                   commit_sha = COALESCE(?5, commit_sha), reason = NULL, last_lines = NULL,
                   restarts = 0
                 WHERE sandbox_id = ?1 AND service = ?2 AND state NOT IN ('deploying', 'stopped')",
            )
            .bind(sandbox_id.as_str())
            .bind(service.service.as_str())
            .bind(state)
            .bind(&service.upstream)
            .bind(&service.commit)
            .execute(&mut *tx)
            .await?;
        }
        insert_audit(&mut tx, audit, at).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// An audit row on its own (a wake that failed: nothing else changed).
    pub async fn audit(&self, audit: &Audit<'_>, at: OffsetDateTime) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        insert_audit(&mut conn, audit, at).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing::temp_db;
    use crate::db::{Finish, Selection, ServiceState};
    use sdp_protocol::{DeploymentId, ServiceName};

    async fn ready_sandbox(db: &Db, name: &str, at: OffsetDateTime) -> SandboxId {
        let id = SandboxId::parse(format!("sbx_{:0>16}", name.len())).unwrap();
        let deployment = DeploymentId::parse(format!("dep_{:0>16}", name.len())).unwrap();
        let audit = Audit {
            actor: "alice",
            action: "create_sandbox",
            target: name,
            detail: "",
        };
        db.create_sandbox(
            &id,
            &SandboxName::parse(name).unwrap(),
            "alice",
            at + time::Duration::hours(1),
            &deployment,
            &[Selection {
                service: "orders".into(),
                branch: "main".into(),
                follow: None,
            }],
            at,
            &audit,
        )
        .await
        .unwrap();
        let instances = [crate::db::Instance {
            service: ServiceName::parse("orders").unwrap(),
            commit: None,
            upstream: Some("127.0.0.1:9".into()),
            since: at,
        }];
        let finish = Finish {
            ok: true,
            error: None,
            instances: &instances,
        };
        assert!(
            db.finish_deployment(&deployment, &finish, at)
                .await
                .unwrap()
                .is_some()
        );
        id
    }

    #[tokio::test]
    async fn an_idle_ready_sandbox_sleeps_once_and_activity_keeps_another_awake() {
        let (_dir, db) = temp_db().await;
        let t0 = OffsetDateTime::now_utc() - time::Duration::minutes(10);
        let idle = ready_sandbox(&db, "idle", t0).await;
        let busy = ready_sandbox(&db, "busy-one", t0).await;
        db.record_activity(
            &[SandboxName::parse("busy-one").unwrap()],
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        let before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        assert_eq!(db.idle_sandboxes(before).await.unwrap(), vec![idle.clone()]);
        let now = OffsetDateTime::now_utc();
        let slept = db.sleep_sandbox(&idle, before, now, "").await.unwrap();
        assert_eq!(slept.unwrap().name.as_str(), "idle");
        assert!(
            db.sleep_sandbox(&idle, before, now, "")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            db.sleep_sandbox(&busy, before, now, "")
                .await
                .unwrap()
                .is_none()
        );
        let row = db.sandbox(idle.as_str()).await.unwrap().unwrap();
        assert_eq!(row.state, SandboxState::Sleeping);
        assert_eq!(row.services[0].state, ServiceState::Sleeping);
        assert_eq!(row.services[0].upstream, None);
    }
}
