//! Sandboxes and their services.

use sdp_protocol::{AgentName, DeploymentId, SandboxId, SandboxName, ServiceName};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;

use super::deployments::insert_deployment;
use super::{
    Audit, Db, Ending, ListQuery, Listing, SandboxState, ServiceState, from_millis, insert_audit,
    parsed, parsed_opt, to_millis,
};

pub struct SandboxRow {
    pub id: SandboxId,
    pub name: SandboxName,
    pub owner: String,
    pub state: SandboxState,
    /// The micro agent that runs it; its redeploys go there too.
    pub agent: Option<AgentName>,
    /// The gateway agent that runs its own API gateway, if it selects one.
    pub gateway_agent: Option<AgentName>,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub services: Vec<SandboxServiceRow>,
}

pub struct SandboxServiceRow {
    pub service: String,
    pub branch: String,
    pub commit: Option<String>,
    pub state: ServiceState,
    pub upstream: Option<String>,
    /// Why it is crashed or unhealthy.
    pub reason: Option<String>,
    /// Its instance's last lines before it crashed, oldest first.
    pub last_lines: Vec<String>,
    /// Restarts of its instance since it was deployed.
    pub restarts: u32,
    /// Redeployed when its branch moves.
    pub follow: bool,
    /// A commit of its followed branch that waits to be deployed, and why.
    pub pending: Option<(String, String)>,
}

/// A live sandbox's service as the route table needs it.
pub struct LiveService {
    pub sandbox: SandboxName,
    /// The sandbox sleeps: the router holds its requests and asks for a wake.
    pub sleeping: bool,
    pub service: Option<String>,
    pub upstream: Option<String>,
    pub state: Option<ServiceState>,
}

/// A (service, branch) pair of a request, and whether the service follows its branch from
/// now on (`None`: as it did).
pub struct Selection {
    pub service: String,
    pub branch: String,
    pub follow: Option<bool>,
}

/// What an agent runs of a service: where, and at which commit; no upstream when it runs
/// nothing of it.
pub struct Instance {
    pub service: ServiceName,
    pub commit: Option<String>,
    pub upstream: Option<String>,
    /// When its agent reported it (the agent's clock): instance reports from before are
    /// about the instance it replaced.
    pub since: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("a live sandbox already has this name")]
    NameTaken,
    #[error("a deployment of this sandbox is in progress")]
    Busy,
    #[error("the sandbox has ended")]
    Ended,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn sandbox_from(row: &SqliteRow) -> Result<SandboxRow, sqlx::Error> {
    Ok(SandboxRow {
        id: parsed(row, "id")?,
        name: parsed(row, "name")?,
        owner: row.try_get("owner")?,
        state: parsed(row, "state")?,
        agent: parsed_opt(row, "agent")?,
        gateway_agent: parsed_opt(row, "gateway_agent")?,
        created_at: from_millis(row.try_get("created_at")?),
        expires_at: from_millis(row.try_get("expires_at")?),
        services: Vec::new(),
    })
}

/// The sandbox's services as its instances now are: each reported instance is recorded
/// (running at its upstream, or failed when it has none).
pub(super) async fn record_instances(
    tx: &mut sqlx::SqliteConnection,
    sandbox_id: &SandboxId,
    deployment_id: &DeploymentId,
    instances: &[Instance],
) -> Result<(), sqlx::Error> {
    for instance in instances {
        let state = match instance.upstream {
            Some(_) => ServiceState::Running,
            None => ServiceState::Failed,
        };
        sqlx::query(
            "UPDATE deployment_services SET commit_sha = COALESCE(?3, commit_sha) WHERE deployment_id = ?1 AND service = ?2",
        )
        .bind(deployment_id.as_str())
        .bind(instance.service.as_str())
        .bind(&instance.commit)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sandbox_services SET commit_sha = COALESCE(?3, commit_sha), upstream = ?4, state = ?6,
               reason = NULL, last_lines = NULL, restarts = 0, reported_at = ?7,
               branch = COALESCE((SELECT branch FROM deployment_services
                                   WHERE deployment_id = ?5 AND service = ?2), branch)
             WHERE sandbox_id = ?1 AND service = ?2",
        )
        .bind(sandbox_id.as_str())
        .bind(instance.service.as_str())
        .bind(&instance.commit)
        .bind(&instance.upstream)
        .bind(deployment_id.as_str())
        .bind(state.as_str())
        .bind(to_millis(instance.since))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

impl Db {
    /// Creates a sandbox and its first deployment, with the audit row, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_sandbox(
        &self,
        sandbox_id: &SandboxId,
        name: &SandboxName,
        owner: &str,
        expires_at: OffsetDateTime,
        deployment_id: &DeploymentId,
        selections: &[Selection],
        now: OffsetDateTime,
        audit: &Audit<'_>,
    ) -> Result<(), WriteError> {
        let mut tx = self.write().await?;
        let inserted = sqlx::query(
            "INSERT INTO sandboxes (id, name, owner, state, created_at, expires_at, last_active_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5)",
        )
        .bind(sandbox_id.as_str())
        .bind(name.as_str())
        .bind(owner)
        .bind(SandboxState::Deploying.as_str())
        .bind(to_millis(now))
        .bind(to_millis(expires_at))
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(WriteError::NameTaken),
            other => other?,
        };
        insert_deployment(&mut tx, deployment_id, sandbox_id, owner, selections, now).await?;
        insert_audit(&mut tx, audit, now).await?;
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
        let mut sandbox = sandbox_from(&row)?;
        sandbox.services = self.sandbox_services(&sandbox.id).await?;
        Ok(Some(sandbox))
    }

    async fn sandbox_services(
        &self,
        id: &SandboxId,
    ) -> Result<Vec<SandboxServiceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT service, branch, commit_sha, state, upstream, reason, last_lines, restarts, follow,
               pending_commit, pending_reason
             FROM sandbox_services WHERE sandbox_id = ?1 ORDER BY service",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SandboxServiceRow {
                    service: r.try_get("service")?,
                    branch: r.try_get("branch")?,
                    commit: r.try_get("commit_sha")?,
                    state: parsed(r, "state")?,
                    upstream: r.try_get("upstream")?,
                    reason: r.try_get("reason")?,
                    last_lines: r
                        .try_get::<Option<String>, _>("last_lines")?
                        .and_then(|json| serde_json::from_str(&json).ok())
                        .unwrap_or_default(),
                    restarts: u32::try_from(r.try_get::<i64, _>("restarts")?).unwrap_or(0),
                    follow: r.try_get("follow")?,
                    pending: r
                        .try_get::<Option<String>, _>("pending_commit")?
                        .zip(r.try_get::<Option<String>, _>("pending_reason")?),
                })
            })
            .collect()
    }

    pub async fn list_sandboxes(&self, q: &ListQuery) -> Result<Vec<SandboxRow>, sqlx::Error> {
        let rows = self.page(Listing::Sandboxes, q).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut sandbox = sandbox_from(row)?;
            sandbox.services = self.sandbox_services(&sandbox.id).await?;
            out.push(sandbox);
        }
        Ok(out)
    }

    /// Ends a live sandbox (deleted or expired), with its audit row: its services are
    /// stopped and a deployment in progress is cancelled. Returns the cancelled deployment
    /// and the agents that run something of the sandbox (its micro agent, and the gateway
    /// agent of its own API gateway), or `Ended` when it had ended already.
    pub async fn end_sandbox(
        &self,
        sandbox_id: &SandboxId,
        ending: Ending,
        at: OffsetDateTime,
        audit: &Audit<'_>,
    ) -> Result<(Option<DeploymentId>, Vec<AgentName>), WriteError> {
        let mut tx = self.write().await?;
        let row = sqlx::query(
            "UPDATE sandboxes SET state = ?2, ended_at = ?3
             WHERE id = ?1 AND state NOT IN ('expired', 'deleted') RETURNING agent, gateway_agent",
        )
        .bind(sandbox_id.as_str())
        .bind(ending.state().as_str())
        .bind(to_millis(at))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(WriteError::Ended);
        };
        let agents = [
            parsed_opt::<AgentName>(&row, "agent")?,
            parsed_opt(&row, "gateway_agent")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        sqlx::query(
            "UPDATE sandbox_services SET state = 'stopped', upstream = NULL WHERE sandbox_id = ?1",
        )
        .bind(sandbox_id.as_str())
        .execute(&mut *tx)
        .await?;
        let cancelled = sqlx::query(
            "UPDATE deployments SET state = 'cancelled', error = ?3, finished_at = ?2
             WHERE sandbox_id = ?1 AND state IN ('queued', 'running') RETURNING id",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(at))
        .bind(format!("the sandbox was {}", ending.state()))
        .fetch_optional(&mut *tx)
        .await?;
        let cancelled = cancelled.map(|r| parsed(&r, "id")).transpose()?;
        insert_audit(&mut tx, audit, at).await?;
        tx.commit().await?;
        Ok((cancelled, agents))
    }

    /// Sets a live sandbox's expiry, with its audit row.
    pub async fn extend_sandbox(
        &self,
        sandbox_id: &SandboxId,
        expires_at: OffsetDateTime,
        audit: &Audit<'_>,
    ) -> Result<(), WriteError> {
        let mut tx = self.write().await?;
        let changed = sqlx::query(
            "UPDATE sandboxes SET expires_at = ?2 WHERE id = ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(expires_at))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Err(WriteError::Ended);
        }
        insert_audit(&mut tx, audit, OffsetDateTime::now_utc()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Live sandboxes whose expiry has passed.
    pub async fn expired_sandboxes(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<SandboxId>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id FROM sandboxes WHERE expires_at <= ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(to_millis(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parsed(r, "id")).collect()
    }

    /// Ids of the live sandboxes, for an agent to tell what it may keep.
    pub async fn live_sandbox_ids(&self) -> Result<Vec<SandboxId>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT id FROM sandboxes WHERE state NOT IN ('expired', 'deleted')")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| parsed(r, "id")).collect()
    }

    /// How many live sandboxes are in each state (states with none are left out).
    pub async fn live_sandbox_counts(&self) -> Result<Vec<(SandboxState, u64)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM sandboxes
             WHERE state NOT IN ('expired', 'deleted') GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((parsed(r, "state")?, r.try_get::<i64, _>("n")?.max(0) as u64)))
            .collect()
    }

    /// Every live sandbox with each of its services that has an upstream or is down; a
    /// sandbox with none comes once with `None`s.
    pub async fn live_upstreams(&self) -> Result<Vec<LiveService>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT s.name, ss.service, ss.upstream, ss.state, s.state = 'sleeping' AS sleeping FROM sandboxes s
               LEFT JOIN sandbox_services ss ON ss.sandbox_id = s.id
                 AND (ss.upstream IS NOT NULL OR ss.state IN ('unhealthy', 'crashed', 'sleeping'))
             WHERE s.state NOT IN ('expired', 'deleted') ORDER BY s.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LiveService {
                    sandbox: parsed(r, "name")?,
                    sleeping: r.try_get("sleeping")?,
                    service: r.try_get(1)?,
                    upstream: r.try_get(2)?,
                    state: parsed_opt(r, "state")?,
                })
            })
            .collect()
    }
}
