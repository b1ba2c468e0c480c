//! Queries of sandboxes, deployments and their steps.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};
use time::OffsetDateTime;

use super::{Db, from_millis, to_millis};

pub struct SandboxRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub state: String,
    pub agent: Option<String>,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub services: Vec<SandboxServiceRow>,
}

pub struct SandboxServiceRow {
    pub service: String,
    pub branch: String,
    pub commit: Option<String>,
    pub state: String,
    pub upstream: Option<String>,
}

pub struct DeploymentRow {
    pub id: String,
    pub sandbox_id: String,
    pub requested_by: String,
    pub state: String,
    pub error: Option<String>,
    pub agent: Option<String>,
    pub created_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
    pub services: Vec<DeploymentServiceRow>,
}

pub struct DeploymentServiceRow {
    pub service: String,
    pub branch: String,
    pub commit: Option<String>,
    pub step: String,
    pub state: String,
}

/// A (service, branch) pair of a request.
pub struct Selection {
    pub service: String,
    pub branch: String,
}

/// Filters and page of a listing, newest first.
pub struct ListQuery {
    pub owner: Option<String>,
    pub state: Option<String>,
    pub limit: u32,
    /// `(created_at, id)` of the last item of the previous page.
    pub after: Option<(i64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("a live sandbox already has this name")]
    NameTaken,
    #[error("a deployment of this sandbox is in progress")]
    Busy,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn sandbox_from(row: &SqliteRow) -> SandboxRow {
    SandboxRow {
        id: row.get("id"),
        name: row.get("name"),
        owner: row.get("owner"),
        state: row.get("state"),
        agent: row.get("agent"),
        created_at: from_millis(row.get("created_at")),
        expires_at: from_millis(row.get("expires_at")),
        services: Vec::new(),
    }
}

fn deployment_from(row: &SqliteRow) -> DeploymentRow {
    DeploymentRow {
        id: row.get("id"),
        sandbox_id: row.get("sandbox_id"),
        requested_by: row.get("requested_by"),
        state: row.get("state"),
        error: row.get("error"),
        agent: row.get("agent"),
        created_at: from_millis(row.get("created_at")),
        finished_at: row.get::<Option<i64>, _>("finished_at").map(from_millis),
        services: Vec::new(),
    }
}

async fn insert_deployment(
    tx: &mut Transaction<'_, Sqlite>,
    deployment_id: &str,
    sandbox_id: &str,
    requested_by: &str,
    selections: &[Selection],
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO deployments (id, sandbox_id, requested_by, state, created_at) VALUES (?1, ?2, ?3, 'queued', ?4)",
    )
    .bind(deployment_id)
    .bind(sandbox_id)
    .bind(requested_by)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    for s in selections {
        sqlx::query(
            "INSERT INTO deployment_services (deployment_id, service, branch, step, state) VALUES (?1, ?2, ?3, 'queued', 'running')",
        )
        .bind(deployment_id)
        .bind(&s.service)
        .bind(&s.branch)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            // A service already there keeps its branch until its new instance runs: if the
            // redeploy fails before, its previous instance still runs that branch.
            "INSERT INTO sandbox_services (sandbox_id, service, branch, state) VALUES (?1, ?2, ?3, 'deploying')
             ON CONFLICT (sandbox_id, service) DO UPDATE SET state = 'deploying'",
        )
        .bind(sandbox_id)
        .bind(&s.service)
        .bind(&s.branch)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Db {
    /// Creates a sandbox and its first deployment, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_sandbox(
        &self,
        sandbox_id: &str,
        name: &str,
        owner: &str,
        expires_at: OffsetDateTime,
        deployment_id: &str,
        selections: &[Selection],
        now: OffsetDateTime,
    ) -> Result<(), WriteError> {
        let now = to_millis(now);
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO sandboxes (id, name, owner, state, created_at, expires_at) VALUES (?1, ?2, ?3, 'deploying', ?4, ?5)",
        )
        .bind(sandbox_id)
        .bind(name)
        .bind(owner)
        .bind(now)
        .bind(to_millis(expires_at))
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(WriteError::NameTaken),
            other => other?,
        };
        insert_deployment(&mut tx, deployment_id, sandbox_id, owner, selections, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts a new deployment of an existing sandbox, unless one is in progress (`queued` or
    /// `running`: the states in which a deployment blocks another of the same sandbox).
    pub async fn create_redeploy(
        &self,
        sandbox_id: &str,
        requested_by: &str,
        deployment_id: &str,
        selections: &[Selection],
        now: OffsetDateTime,
    ) -> Result<(), WriteError> {
        let now = to_millis(now);
        // IMMEDIATE: take the write lock before reading, so that two racing redeploys queue
        // here instead of one failing on a stale snapshot.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments WHERE sandbox_id = ?1 AND state IN ('queued', 'running')",
        )
        .bind(sandbox_id)
        .fetch_one(&mut *tx)
        .await?;
        if busy > 0 {
            return Err(WriteError::Busy);
        }
        sqlx::query("UPDATE sandboxes SET state = 'deploying' WHERE id = ?1")
            .bind(sandbox_id)
            .execute(&mut *tx)
            .await?;
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
            Err(e) if is_unique_violation(&e) => return Err(WriteError::Busy),
            other => other?,
        }
        tx.commit().await?;
        Ok(())
    }

    /// A sandbox by id, or by name among the live ones (else the newest of that name).
    pub async fn sandbox(&self, key: &str) -> Result<Option<SandboxRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT * FROM sandboxes WHERE id = ?1 OR name = ?1
             ORDER BY id = ?1 DESC, state IN ('expired', 'deleted') ASC, created_at DESC LIMIT 1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut sandbox = sandbox_from(&row);
        sandbox.services = self.sandbox_services(&sandbox.id).await?;
        Ok(Some(sandbox))
    }

    async fn sandbox_services(&self, id: &str) -> Result<Vec<SandboxServiceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT service, branch, commit_sha, state, upstream FROM sandbox_services WHERE sandbox_id = ?1 ORDER BY service",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| SandboxServiceRow {
                service: r.get("service"),
                branch: r.get("branch"),
                commit: r.get("commit_sha"),
                state: r.get("state"),
                upstream: r.get("upstream"),
            })
            .collect())
    }

    pub async fn list_sandboxes(&self, q: &ListQuery) -> Result<Vec<SandboxRow>, sqlx::Error> {
        let (after_t, after_id) = q.after.clone().unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(
            "SELECT * FROM sandboxes
             WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR state = ?2)
               AND (created_at < ?3 OR (created_at = ?3 AND id < ?4) OR ?5)
             ORDER BY created_at DESC, id DESC LIMIT ?6",
        )
        .bind(&q.owner)
        .bind(&q.state)
        .bind(after_t)
        .bind(&after_id)
        .bind(q.after.is_none())
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut sandbox = sandbox_from(row);
            sandbox.services = self.sandbox_services(&sandbox.id).await?;
            out.push(sandbox);
        }
        Ok(out)
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM deployments WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut d = deployment_from(&row);
        d.services = self.deployment_services(&d.id).await?;
        Ok(Some(d))
    }

    async fn deployment_services(
        &self,
        id: &str,
    ) -> Result<Vec<DeploymentServiceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT service, branch, commit_sha, step, state FROM deployment_services WHERE deployment_id = ?1 ORDER BY service",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| DeploymentServiceRow {
                service: r.get("service"),
                branch: r.get("branch"),
                commit: r.get("commit_sha"),
                step: r.get("step"),
                state: r.get("state"),
            })
            .collect())
    }

    /// Deployments, newest first; `owner` filters on who requested them.
    pub async fn list_deployments(&self, q: &ListQuery) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        let (after_t, after_id) = q.after.clone().unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(
            "SELECT * FROM deployments
             WHERE (?1 IS NULL OR requested_by = ?1) AND (?2 IS NULL OR state = ?2)
               AND (created_at < ?3 OR (created_at = ?3 AND id < ?4) OR ?5)
             ORDER BY created_at DESC, id DESC LIMIT ?6",
        )
        .bind(&q.owner)
        .bind(&q.state)
        .bind(after_t)
        .bind(&after_id)
        .bind(q.after.is_none())
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut d = deployment_from(row);
            d.services = self.deployment_services(&d.id).await?;
            out.push(d);
        }
        Ok(out)
    }

    /// Records that `agent` took the deployment; false when it is no longer queued (the
    /// sandbox ended meanwhile), so that the caller undoes the agent's work.
    pub async fn set_deployment_running(
        &self,
        deployment_id: &str,
        sandbox_id: &str,
        agent: &str,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let taken = sqlx::query(
            "UPDATE deployments SET state = 'running', agent = ?2 WHERE id = ?1 AND state = 'queued'",
        )
        .bind(deployment_id)
        .bind(agent)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        sqlx::query(
            "UPDATE sandboxes SET agent = ?2 WHERE id = ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(sandbox_id)
        .bind(agent)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(taken)
    }

    /// Deployments still queued: after a restart of the control plane none of them will
    /// reach an agent.
    pub async fn queued_deployments(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT id FROM deployments WHERE state = 'queued'")
            .fetch_all(&self.pool)
            .await
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
    pub async fn agents_with_running_deployments(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT agent FROM deployments WHERE state = 'running' AND agent IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Records a step change of a service (`service` is '' for the whole deployment): the
    /// open step of that service ends now, the new one starts, and ends too unless running.
    pub async fn record_step(
        &self,
        deployment_id: &str,
        service: &str,
        step: &str,
        state: &str,
        at: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        let at = to_millis(at);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE deployment_steps SET ended_at = ?3,
               state = CASE WHEN state = 'running' THEN 'done' ELSE state END
             WHERE deployment_id = ?1 AND service = ?2 AND ended_at IS NULL",
        )
        .bind(deployment_id)
        .bind(service)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let ended = (state != "running").then_some(at);
        sqlx::query(
            "INSERT INTO deployment_steps (deployment_id, service, step, state, started_at, ended_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (deployment_id, service, step) DO UPDATE SET state = excluded.state,
               ended_at = excluded.ended_at",
        )
        .bind(deployment_id)
        .bind(service)
        .bind(step)
        .bind(state)
        .bind(at)
        .bind(ended)
        .execute(&mut *tx)
        .await?;
        if !service.is_empty() {
            sqlx::query(
                "UPDATE deployment_services SET step = ?3, state = ?4 WHERE deployment_id = ?1 AND service = ?2",
            )
            .bind(deployment_id)
            .bind(service)
            .bind(step)
            .bind(state)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Steps of a deployment as (service, step, state, started, ended), in order of start.
    pub async fn steps(
        &self,
        deployment_id: &str,
    ) -> Result<
        Vec<(
            String,
            String,
            String,
            OffsetDateTime,
            Option<OffsetDateTime>,
        )>,
        sqlx::Error,
    > {
        let rows = sqlx::query(
            "SELECT service, step, state, started_at, ended_at FROM deployment_steps
             WHERE deployment_id = ?1 ORDER BY started_at, rowid",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("service"),
                    r.get("step"),
                    r.get("state"),
                    from_millis(r.get("started_at")),
                    r.get::<Option<i64>, _>("ended_at").map(from_millis),
                )
            })
            .collect())
    }

    /// Ends a deployment and brings its sandbox's services up to date.
    pub async fn finish_deployment(
        &self,
        deployment_id: &str,
        ok: bool,
        error: Option<&str>,
        outcomes: &[(String, Option<String>, Option<String>)],
        at: OffsetDateTime,
    ) -> Result<bool, sqlx::Error> {
        let at = to_millis(at);
        let state = if ok { "ready" } else { "failed" };
        let mut tx = self.pool.begin().await?;
        let sandbox_id: Option<String> = sqlx::query_scalar(
            "UPDATE deployments SET state = ?2, error = ?3, finished_at = ?4
             WHERE id = ?1 AND state IN ('queued', 'running') RETURNING sandbox_id",
        )
        .bind(deployment_id)
        .bind(state)
        .bind(error)
        .bind(at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(sandbox_id) = sandbox_id else {
            // Already finished (or cancelled): nothing to do twice.
            return Ok(false);
        };
        sqlx::query(
            "UPDATE deployment_steps SET ended_at = ?2,
               state = CASE WHEN state = 'running' THEN ?3 ELSE state END
             WHERE deployment_id = ?1 AND ended_at IS NULL",
        )
        .bind(deployment_id)
        .bind(at)
        .bind(if ok { "done" } else { "failed" })
        .execute(&mut *tx)
        .await?;
        store_outcomes(&mut tx, deployment_id, &sandbox_id, outcomes).await?;
        if !ok {
            // The services of this deployment that have no outcome: those never started
            // before still have no instance; the others still run their previous one.
            sqlx::query(
                "UPDATE sandbox_services SET state = CASE WHEN upstream IS NULL THEN 'failed' ELSE 'running' END
                 WHERE sandbox_id = ?1 AND state = 'deploying'",
            )
            .bind(&sandbox_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE sandboxes SET state = ?2 WHERE id = ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(&sandbox_id)
        .bind(state)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Running deployments whose routing step has begun, and not ended: after a restart of
    /// the control plane, their routing starts again.
    pub async fn deployments_in_routing(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT d.id FROM deployments d JOIN deployment_steps s ON s.deployment_id = d.id
             WHERE d.state = 'running' AND s.step = 'routing' AND s.state = 'running'",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Whether the deployment's routing step was recorded already.
    pub async fn routing_begun(&self, deployment_id: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM deployment_steps WHERE deployment_id = ?1 AND step = 'routing')",
        )
        .bind(deployment_id)
        .fetch_one(&self.pool)
        .await
    }

    /// The deployment of a sandbox in progress, if any.
    pub async fn latest_active_deployment(
        &self,
        sandbox_id: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT id FROM deployments WHERE sandbox_id = ?1 AND state IN ('queued', 'running')
             ORDER BY created_at DESC LIMIT 1",
        )
        .bind(sandbox_id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Deployments in progress on `agent`.
    /// Deployments still in the hands of `agent`: those whose routing has begun are done
    /// with it (its outcome is stored) and are the control plane's alone.
    pub async fn active_deployments_on(&self, agent: &str) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT id FROM deployments d WHERE agent = ?1 AND state IN ('queued', 'running')
               AND NOT EXISTS (SELECT 1 FROM deployment_steps s
                               WHERE s.deployment_id = d.id AND s.step = 'routing')",
        )
        .bind(agent)
        .fetch_all(&self.pool)
        .await
    }

    /// Ends a sandbox (`deleted` or `expired`); its services are stopped.
    pub async fn end_sandbox(
        &self,
        sandbox_id: &str,
        state: &str,
        at: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE sandboxes SET state = ?2, ended_at = ?3 WHERE id = ?1")
            .bind(sandbox_id)
            .bind(state)
            .bind(to_millis(at))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE sandbox_services SET state = 'stopped', upstream = NULL WHERE sandbox_id = ?1",
        )
        .bind(sandbox_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE deployments SET state = 'cancelled', error = 'the sandbox was ended', finished_at = ?2
             WHERE sandbox_id = ?1 AND state IN ('queued', 'running')")
        .bind(sandbox_id)
        .bind(to_millis(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    pub async fn extend_sandbox(
        &self,
        sandbox_id: &str,
        expires_at: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE sandboxes SET expires_at = ?2 WHERE id = ?1")
            .bind(sandbox_id)
            .bind(to_millis(expires_at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live sandboxes whose expiry has passed.
    pub async fn expired_sandboxes(&self, now: OffsetDateTime) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT id FROM sandboxes WHERE expires_at <= ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(to_millis(now))
        .fetch_all(&self.pool)
        .await
    }

    /// Names of the live sandboxes, for an agent to tell what it may keep.
    pub async fn live_sandbox_names(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT name FROM sandboxes WHERE state NOT IN ('expired', 'deleted')")
            .fetch_all(&self.pool)
            .await
    }

    /// Every live sandbox with each of its services' upstream; a sandbox with no service row
    /// comes once with `None`s.
    pub async fn live_upstreams(
        &self,
    ) -> Result<Vec<(String, Option<String>, Option<String>)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT s.name, ss.service, ss.upstream FROM sandboxes s
               LEFT JOIN sandbox_services ss ON ss.sandbox_id = s.id AND ss.upstream IS NOT NULL
             WHERE s.state NOT IN ('expired', 'deleted') ORDER BY s.name",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// What a deployment's agent reported of each service, recorded before routing so that
    /// the route table holds the new upstreams. Nothing changes once the deployment ended.
    pub async fn record_outcomes(
        &self,
        deployment_id: &str,
        outcomes: &[(String, Option<String>, Option<String>)],
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let sandbox_id: Option<String> = sqlx::query_scalar(
            "SELECT sandbox_id FROM deployments WHERE id = ?1 AND state IN ('queued', 'running')",
        )
        .bind(deployment_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(sandbox_id) = sandbox_id else {
            return Ok(());
        };
        store_outcomes(&mut tx, deployment_id, &sandbox_id, outcomes).await?;
        tx.commit().await
    }
}

/// Each service's commit and upstream, on the deployment and on its sandbox.
async fn store_outcomes(
    tx: &mut sqlx::SqliteConnection,
    deployment_id: &str,
    sandbox_id: &str,
    outcomes: &[(String, Option<String>, Option<String>)],
) -> Result<(), sqlx::Error> {
    for (service, commit, upstream) in outcomes {
        sqlx::query(
            "UPDATE deployment_services SET commit_sha = COALESCE(?3, commit_sha) WHERE deployment_id = ?1 AND service = ?2",
        )
        .bind(deployment_id)
        .bind(service)
        .bind(commit)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sandbox_services SET commit_sha = COALESCE(?3, commit_sha), upstream = ?4,
               state = CASE WHEN ?4 IS NULL THEN 'failed' ELSE 'running' END,
               branch = COALESCE((SELECT branch FROM deployment_services
                                   WHERE deployment_id = ?5 AND service = ?2), branch)
             WHERE sandbox_id = ?1 AND service = ?2",
        )
        .bind(sandbox_id)
        .bind(service)
        .bind(commit)
        .bind(upstream)
        .bind(deployment_id)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
