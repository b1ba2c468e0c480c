//! Deployments: one per request to bring a sandbox's services to branches.

use sdp_protocol::{AgentName, DeploymentId, SandboxId, Step, StepState};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};
use time::OffsetDateTime;

use super::sandboxes::{is_unique_violation, record_instances};
use super::steps::{EndedStep, ended_steps};
use super::{
    Audit, Db, DeploymentState, Instance, ListQuery, Listing, Selection, WriteError, from_millis,
    insert_audit, parsed, parsed_opt, to_millis,
};

pub struct DeploymentRow {
    pub id: DeploymentId,
    pub sandbox_id: SandboxId,
    pub requested_by: String,
    pub state: DeploymentState,
    pub error: Option<String>,
    pub agent: Option<AgentName>,
    pub created_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
    pub services: Vec<DeploymentServiceRow>,
}

pub struct DeploymentServiceRow {
    pub service: String,
    pub branch: String,
    pub commit: Option<String>,
    /// The step it is at, and how that step stands.
    pub step: Step,
    pub state: StepState,
}

/// How a deployment ends.
pub struct Finish<'a> {
    pub ok: bool,
    pub error: Option<&'a str>,
    /// What its agent reported of each service (a failed deployment's services that came up
    /// before the failure have new instances).
    pub instances: &'a [Instance],
}

/// Which of a sandbox's agents an agent is: the micro agent that runs its services, or the
/// gateway agent that runs its own API gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Micro,
    Gateway,
}

/// Where an agent's outcome lands: its sandbox, and its deployment's state.
pub struct OutcomeTarget {
    pub sandbox_id: SandboxId,
    pub deployment: DeploymentState,
}

fn deployment_from(row: &SqliteRow) -> Result<DeploymentRow, sqlx::Error> {
    Ok(DeploymentRow {
        id: parsed(row, "id")?,
        sandbox_id: parsed(row, "sandbox_id")?,
        requested_by: row.try_get("requested_by")?,
        state: parsed(row, "state")?,
        error: row.try_get("error")?,
        agent: parsed_opt(row, "agent")?,
        created_at: from_millis(row.try_get("created_at")?),
        finished_at: row
            .try_get::<Option<i64>, _>("finished_at")?
            .map(from_millis),
        services: Vec::new(),
    })
}

pub(super) async fn insert_deployment(
    tx: &mut Transaction<'_, Sqlite>,
    deployment_id: &DeploymentId,
    sandbox_id: &SandboxId,
    requested_by: &str,
    selections: &[Selection],
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO deployments (id, sandbox_id, requested_by, state, created_at) VALUES (?1, ?2, ?3, 'queued', ?4)",
    )
    .bind(deployment_id.as_str())
    .bind(sandbox_id.as_str())
    .bind(requested_by)
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    for s in selections {
        sqlx::query(
            "INSERT INTO deployment_services (deployment_id, service, branch, step, state) VALUES (?1, ?2, ?3, 'queued', 'running')",
        )
        .bind(deployment_id.as_str())
        .bind(&s.service)
        .bind(&s.branch)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            // A service already there keeps its branch until its new instance runs: if the
            // redeploy fails before, its previous instance still runs that branch. Whatever
            // commit of it waited is deployed now: the agent fetches the branch's tip.
            "INSERT INTO sandbox_services (sandbox_id, service, branch, state, follow) VALUES (?1, ?2, ?3, 'deploying', COALESCE(?4, 0))
             ON CONFLICT (sandbox_id, service) DO UPDATE SET state = 'deploying',
               follow = COALESCE(?4, follow), pending_commit = NULL, pending_reason = NULL",
        )
        .bind(sandbox_id.as_str())
        .bind(&s.service)
        .bind(&s.branch)
        .bind(s.follow)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn ids(rows: Vec<SqliteRow>) -> Result<Vec<DeploymentId>, sqlx::Error> {
    rows.iter().map(|r| parsed(r, "id")).collect()
}

impl Db {
    /// Starts a new deployment of a live sandbox, with its audit row, unless one is in
    /// progress (`queued` or `running`).
    pub async fn create_redeploy(
        &self,
        sandbox_id: &SandboxId,
        requested_by: &str,
        deployment_id: &DeploymentId,
        selections: &[Selection],
        now: OffsetDateTime,
        audit: &Audit<'_>,
    ) -> Result<(), WriteError> {
        let mut tx = self.write().await?;
        let live = sqlx::query(
            "UPDATE sandboxes SET state = 'deploying' WHERE id = ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(sandbox_id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if live == 0 {
            return Err(WriteError::Ended);
        }
        match insert_deployment(
            &mut tx,
            deployment_id,
            sandbox_id,
            requested_by,
            selections,
            now,
        )
        .await
        {
            // The index `deployments_one_active_per_sandbox`.
            Err(e) if is_unique_violation(&e) => return Err(WriteError::Busy),
            other => other?,
        }
        insert_audit(&mut tx, audit, now).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM deployments WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut d = deployment_from(&row)?;
        d.services = self.deployment_services(&d.id).await?;
        Ok(Some(d))
    }

    async fn deployment_services(
        &self,
        id: &DeploymentId,
    ) -> Result<Vec<DeploymentServiceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT service, branch, commit_sha, step, state FROM deployment_services WHERE deployment_id = ?1 ORDER BY service",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeploymentServiceRow {
                    service: r.try_get("service")?,
                    branch: r.try_get("branch")?,
                    commit: r.try_get("commit_sha")?,
                    step: parsed(r, "step")?,
                    state: parsed(r, "state")?,
                })
            })
            .collect()
    }

    /// Deployments, newest first; `owner` filters on who requested them.
    pub async fn list_deployments(&self, q: &ListQuery) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        let rows = self.page(Listing::Deployments, q).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut d = deployment_from(row)?;
            d.services = self.deployment_services(&d.id).await?;
            out.push(d);
        }
        Ok(out)
    }

    /// Records that `agent` has (or may have) taken the deployment: it runs the sandbox from
    /// now on, so its redeploys and its teardown go there. The deployment becomes `running`
    /// if it was still `queued` (its outcome may have come first). Returns whether the
    /// sandbox is still live; if not, the caller undoes the agent's work.
    pub async fn record_agent(
        &self,
        deployment_id: &DeploymentId,
        sandbox_id: &SandboxId,
        agent: &AgentName,
        placement: Placement,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE deployments SET agent = ?2,
               state = CASE WHEN state = 'queued' THEN 'running' ELSE state END
             WHERE id = ?1",
        )
        .bind(deployment_id.as_str())
        .bind(agent.as_str())
        .execute(&mut *tx)
        .await?;
        let live = sqlx::query(match placement {
            Placement::Micro => {
                "UPDATE sandboxes SET agent = ?2 WHERE id = ?1 AND state NOT IN ('expired', 'deleted')"
            }
            Placement::Gateway => {
                "UPDATE sandboxes SET gateway_agent = ?2 WHERE id = ?1 AND state NOT IN ('expired', 'deleted')"
            }
        })
        .bind(sandbox_id.as_str())
        .bind(agent.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(live)
    }

    /// Deployments still queued: after a restart of the control plane none of them will
    /// reach an agent.
    pub async fn queued_deployments(&self) -> Result<Vec<DeploymentId>, sqlx::Error> {
        ids(
            sqlx::query("SELECT id FROM deployments WHERE state = 'queued'")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// How many deployments are queued or running.
    pub async fn active_deployments(&self) -> Result<u64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments WHERE state IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Agents with deployments in progress.
    pub async fn agents_with_running_deployments(&self) -> Result<Vec<AgentName>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT agent FROM deployments WHERE state = 'running' AND agent IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parsed(r, "agent")).collect()
    }

    /// Ends a deployment in progress and brings its sandbox's services up to date; returns
    /// the steps this ended (those still open), or `None` when it had ended already
    /// (finishing twice changes nothing).
    pub async fn finish_deployment(
        &self,
        deployment_id: &DeploymentId,
        finish: &Finish<'_>,
        at: OffsetDateTime,
    ) -> Result<Option<Vec<EndedStep>>, sqlx::Error> {
        let state = if finish.ok {
            DeploymentState::Ready
        } else {
            DeploymentState::Failed
        };
        let mut tx = self.write().await?;
        let row = sqlx::query(
            "UPDATE deployments SET state = ?2, error = ?3, finished_at = ?4
             WHERE id = ?1 AND state IN ('queued', 'running') RETURNING sandbox_id",
        )
        .bind(deployment_id.as_str())
        .bind(state.as_str())
        .bind(finish.error)
        .bind(to_millis(at))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let sandbox_id: SandboxId = parsed(&row, "sandbox_id")?;
        let closed = sqlx::query(
            "UPDATE deployment_steps SET ended_at = ?2,
               state = CASE WHEN state = 'running' THEN ?3 ELSE state END
             WHERE deployment_id = ?1 AND ended_at IS NULL
             RETURNING step, state, started_at",
        )
        .bind(deployment_id.as_str())
        .bind(to_millis(at))
        .bind(if finish.ok { "done" } else { "failed" })
        .fetch_all(&mut *tx)
        .await?;
        let ended = ended_steps(&closed, to_millis(at))?;
        record_instances(&mut tx, &sandbox_id, deployment_id, finish.instances).await?;
        if !finish.ok {
            // The services of this deployment that have no outcome: those never started
            // before still have no instance; the others still run their previous one.
            sqlx::query(
                "UPDATE sandbox_services SET state = CASE WHEN upstream IS NULL THEN 'failed' ELSE 'running' END
                 WHERE sandbox_id = ?1 AND state = 'deploying'",
            )
            .bind(sandbox_id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        // The end of a deployment counts as use: a sandbox just deployed does not sleep
        // before anyone could try it.
        sqlx::query(
            "UPDATE sandboxes SET state = ?2, last_active_at = MAX(last_active_at, ?3)
             WHERE id = ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(sandbox_id.as_str())
        .bind(state.as_str())
        .bind(to_millis(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(ended))
    }

    /// Running deployments whose routing step has begun, and not ended: after a restart of
    /// the control plane, their routing starts again.
    pub async fn deployments_in_routing(&self) -> Result<Vec<DeploymentId>, sqlx::Error> {
        ids(sqlx::query(
            "SELECT d.id FROM deployments d JOIN deployment_steps s ON s.deployment_id = d.id
             WHERE d.state = 'running' AND s.step = 'routing' AND s.state = 'running'",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Whether the deployment's routing step was recorded already.
    pub async fn routing_begun(&self, deployment_id: &DeploymentId) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM deployment_steps WHERE deployment_id = ?1 AND step = 'routing')",
        )
        .bind(deployment_id.as_str())
        .fetch_one(&self.pool)
        .await
    }

    /// Deployments still in the hands of `agent`: those whose routing has begun are done
    /// with it (its outcome is stored) and are the control plane's alone.
    pub async fn active_deployments_on(
        &self,
        agent: &AgentName,
    ) -> Result<Vec<DeploymentId>, sqlx::Error> {
        ids(sqlx::query(
            "SELECT id FROM deployments d WHERE agent = ?1 AND state IN ('queued', 'running')
               AND NOT EXISTS (SELECT 1 FROM deployment_steps s
                               WHERE s.deployment_id = d.id AND s.step = 'routing')",
        )
        .bind(agent.as_str())
        .fetch_all(&self.pool)
        .await?)
    }

    /// The states an agent's outcome for `deployment_id` meets.
    pub async fn outcome_target(
        &self,
        deployment_id: &DeploymentId,
    ) -> Result<Option<OutcomeTarget>, sqlx::Error> {
        let row = sqlx::query("SELECT sandbox_id, state FROM deployments WHERE id = ?1")
            .bind(deployment_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(OutcomeTarget {
                sandbox_id: parsed(&r, "sandbox_id")?,
                deployment: parsed(&r, "state")?,
            })
        })
        .transpose()
    }

    /// What a deployment's agent reported of each service, recorded before routing so that
    /// the route table holds the new upstreams. When the deployment has ended meanwhile (it
    /// failed when its agent fell silent, say) the instances are recorded all the same, as
    /// long as the sandbox lives: they are what runs. Returns whether anything was recorded.
    pub async fn record_outcome(
        &self,
        deployment_id: &DeploymentId,
        agent: &AgentName,
        placement: Placement,
        instances: &[Instance],
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.write().await?;
        let row = sqlx::query(
            "SELECT d.sandbox_id FROM deployments d JOIN sandboxes s ON s.id = d.sandbox_id
             WHERE d.id = ?1 AND s.state NOT IN ('expired', 'deleted')",
        )
        .bind(deployment_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let sandbox_id: SandboxId = parsed(&row, "sandbox_id")?;
        record_instances(&mut tx, &sandbox_id, deployment_id, instances).await?;
        // What runs of the sandbox runs there: its teardown and redeploys go to that agent.
        sqlx::query(match placement {
            Placement::Micro => "UPDATE sandboxes SET agent = ?2 WHERE id = ?1",
            Placement::Gateway => "UPDATE sandboxes SET gateway_agent = ?2 WHERE id = ?1",
        })
        .bind(sandbox_id.as_str())
        .bind(agent.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use sdp_protocol::{SandboxName, ServiceName};

    use super::*;
    use crate::db::testing::temp_db;
    use crate::db::{Ending, SandboxState, ServiceState};

    const AUDIT: Audit<'static> = Audit {
        actor: "alice",
        action: "test",
        target: "x",
        detail: "",
    };

    fn sbx(n: u8) -> SandboxId {
        SandboxId::parse(format!("sbx_{n:016x}")).unwrap()
    }

    fn dep(n: u8) -> DeploymentId {
        DeploymentId::parse(format!("dep_{n:016x}")).unwrap()
    }

    fn orders() -> Vec<Selection> {
        vec![Selection {
            service: "orders".into(),
            branch: "main".into(),
            follow: None,
        }]
    }

    async fn create(db: &Db, sandbox: u8, name: &str, deployment: u8) -> Result<(), WriteError> {
        let now = OffsetDateTime::now_utc();
        db.create_sandbox(
            &sbx(sandbox),
            &SandboxName::parse(name).unwrap(),
            "alice",
            now + time::Duration::hours(1),
            &dep(deployment),
            &orders(),
            now,
            &AUDIT,
        )
        .await
    }

    async fn audit_rows(db: &Db) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM audit")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_sandbox_has_at_most_one_deployment_in_progress_however_requests_race() {
        let (_dir, db) = temp_db().await;
        create(&db, 1, "pay", 1).await.unwrap();
        let now = OffsetDateTime::now_utc();
        let attempts = (2..10).map(|n| {
            let db = db.clone();
            async move {
                db.create_redeploy(&sbx(1), "alice", &dep(n), &orders(), now, &AUDIT)
                    .await
            }
        });
        let results = futures_util::future::join_all(attempts).await;
        assert!(
            results.iter().all(|r| matches!(r, Err(WriteError::Busy))),
            "every redeploy waits for the first deployment"
        );
        assert_eq!(db.active_deployments().await.unwrap(), 1);
        // Only the accepted change has an audit row.
        assert_eq!(audit_rows(&db).await, 1);
        let ok = Finish {
            ok: true,
            error: None,
            instances: &[],
        };
        assert!(
            db.finish_deployment(&dep(1), &ok, now)
                .await
                .unwrap()
                .is_some()
        );
        db.create_redeploy(&sbx(1), "alice", &dep(20), &orders(), now, &AUDIT)
            .await
            .unwrap();
        assert_eq!(db.active_deployments().await.unwrap(), 1);
        assert_eq!(audit_rows(&db).await, 2);
    }

    #[tokio::test]
    async fn each_step_ends_once_with_how_it_ended_and_how_long_it_took() {
        let (_dir, db) = temp_db().await;
        create(&db, 1, "pay", 1).await.unwrap();
        let t0 = OffsetDateTime::now_utc();
        let at = |ms: i64| t0 + time::Duration::milliseconds(ms);
        let step = |step, state, ms| {
            let db = db.clone();
            async move {
                db.record_step(&dep(1), Some("orders"), step, state, at(ms))
                    .await
                    .unwrap()
            }
        };
        let ended = |step, state, seconds| EndedStep {
            step,
            state,
            seconds,
        };
        assert_eq!(step(Step::Fetching, StepState::Running, 0).await, []);
        assert_eq!(
            step(Step::Building, StepState::Running, 1500).await,
            [ended(Step::Fetching, StepState::Done, 1.5)]
        );
        // A step that fails ends in that state, once.
        assert_eq!(
            step(Step::Building, StepState::Failed, 4000).await,
            [ended(Step::Building, StepState::Failed, 2.5)]
        );
        assert_eq!(step(Step::Building, StepState::Failed, 5000).await, []);
        // A step recorded ended at once (skipped, healthy) took no time.
        assert_eq!(
            step(Step::Healthy, StepState::Done, 6000).await,
            [ended(Step::Healthy, StepState::Done, 0.0)]
        );
        // What is still open when the deployment ends, ends with it.
        step(Step::Starting, StepState::Running, 7000).await;
        let failed = Finish {
            ok: false,
            error: Some("gone"),
            instances: &[],
        };
        let closed = db
            .finish_deployment(&dep(1), &failed, at(7250))
            .await
            .unwrap();
        assert_eq!(
            closed,
            Some(vec![ended(Step::Starting, StepState::Failed, 0.25)])
        );
    }

    #[tokio::test]
    async fn finishing_a_deployment_twice_changes_nothing_the_second_time() {
        let (_dir, db) = temp_db().await;
        create(&db, 1, "pay", 1).await.unwrap();
        let now = OffsetDateTime::now_utc();
        let instances = [Instance {
            service: ServiceName::parse("orders").unwrap(),
            commit: Some("abc".into()),
            upstream: Some("127.0.0.1:20001".into()),
            since: OffsetDateTime::now_utc(),
        }];
        let failed = Finish {
            ok: false,
            error: Some("first"),
            instances: &instances,
        };
        assert!(
            db.finish_deployment(&dep(1), &failed, now)
                .await
                .unwrap()
                .is_some()
        );
        let again = Finish {
            ok: true,
            error: None,
            instances: &[],
        };
        assert!(
            db.finish_deployment(&dep(1), &again, now)
                .await
                .unwrap()
                .is_none()
        );
        let row = db.deployment(dep(1).as_str()).await.unwrap().unwrap();
        assert_eq!(row.state, DeploymentState::Failed);
        assert_eq!(row.error.as_deref(), Some("first"));
        let sandbox = db.sandbox(sbx(1).as_str()).await.unwrap().unwrap();
        assert_eq!(sandbox.state, SandboxState::Failed);
        assert_eq!(sandbox.services[0].state, ServiceState::Running);
        assert_eq!(
            sandbox.services[0].upstream.as_deref(),
            Some("127.0.0.1:20001")
        );
    }

    #[tokio::test]
    async fn an_ended_sandbox_frees_its_name_takes_no_deployment_and_ends_once() {
        let (_dir, db) = temp_db().await;
        create(&db, 1, "pay", 1).await.unwrap();
        assert!(matches!(
            create(&db, 2, "pay", 2).await,
            Err(WriteError::NameTaken)
        ));
        let now = OffsetDateTime::now_utc();
        let (cancelled, _) = db
            .end_sandbox(&sbx(1), Ending::Deleted, now, &AUDIT)
            .await
            .unwrap();
        assert_eq!(cancelled, Some(dep(1)));
        assert!(matches!(
            db.end_sandbox(&sbx(1), Ending::Expired, now, &AUDIT).await,
            Err(WriteError::Ended)
        ));
        assert!(matches!(
            db.create_redeploy(&sbx(1), "alice", &dep(3), &orders(), now, &AUDIT)
                .await,
            Err(WriteError::Ended)
        ));
        create(&db, 2, "pay", 2).await.unwrap();
        assert_eq!(db.live_sandbox_ids().await.unwrap(), vec![sbx(2)]);
        // A late outcome of the ended sandbox's deployment records nothing.
        let instances = [Instance {
            service: ServiceName::parse("orders").unwrap(),
            commit: None,
            upstream: Some("127.0.0.1:1".into()),
            since: OffsetDateTime::now_utc(),
        }];
        let agent = AgentName::parse("micro-0").unwrap();
        assert!(
            !db.record_outcome(&dep(1), &agent, Placement::Micro, &instances)
                .await
                .unwrap()
        );
        // The two creations and the delete; nothing of what was refused.
        assert_eq!(audit_rows(&db).await, 3);
    }
}
