//! Following branches: who follows what, the commits that wait for their owner's login, the
//! redeploy a push starts (superseding a deployment in progress), and the delivery log.

use sdp_protocol::{BranchName, DeploymentId, SandboxId, SandboxName, ServiceName};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;

use super::deployments::insert_deployment;
use super::{Audit, Db, Selection, WriteError, from_millis, insert_audit, parsed, to_millis};

/// A live sandbox whose service follows a branch.
pub struct Follower {
    pub sandbox_id: SandboxId,
    pub sandbox: SandboxName,
    pub owner: String,
    pub service: ServiceName,
    pub branch: BranchName,
    /// The commit its instance runs, if any.
    pub commit: Option<String>,
    /// The newest tip a push or a poll named.
    pub seen: Option<String>,
    /// A deployment of the sandbox is in progress.
    pub deploying: bool,
}

fn follower_from(r: &SqliteRow) -> Result<Follower, sqlx::Error> {
    Ok(Follower {
        sandbox_id: parsed(r, "sandbox_id")?,
        sandbox: parsed(r, "name")?,
        owner: r.try_get("owner")?,
        service: parsed(r, "service")?,
        branch: parsed(r, "branch")?,
        commit: r.try_get("commit_sha")?,
        seen: r.try_get("seen_commit")?,
        deploying: r.try_get("deploying")?,
    })
}

const FOLLOWERS: &str =
    "SELECT ss.sandbox_id, s.name, s.owner, ss.service, ss.branch, ss.commit_sha, ss.seen_commit,
       EXISTS (SELECT 1 FROM deployments d WHERE d.sandbox_id = ss.sandbox_id
                 AND d.state IN ('queued', 'running')) AS deploying
     FROM sandbox_services ss JOIN sandboxes s ON s.id = ss.sandbox_id
     WHERE ss.follow = 1 AND s.state NOT IN ('expired', 'deleted')";

/// A row of the delivery log to write.
pub struct NewDelivery<'a> {
    pub source: &'a str,
    pub delivery_id: Option<&'a str>,
    pub event: Option<&'a str>,
    pub repository: Option<&'a str>,
    /// JSON array of names.
    pub services: &'a str,
    /// JSON array of `{branch, commit, change}`.
    pub refs: &'a str,
    pub signature: &'a str,
    pub outcome: &'a str,
}

pub struct DeliveryRow {
    pub id: i64,
    pub source: String,
    pub received_at: OffsetDateTime,
    pub delivery_id: Option<String>,
    pub event: Option<String>,
    pub repository: Option<String>,
    pub services: String,
    pub refs: String,
    pub signature: String,
    pub outcome: String,
}

/// What a follow-redeploy did: its deployment, and the one it superseded.
pub struct FollowRedeploy {
    pub superseded: Option<DeploymentId>,
}

impl Db {
    /// Live sandboxes whose `service` follows `branch`.
    pub async fn followers(
        &self,
        service: &ServiceName,
        branch: &BranchName,
    ) -> Result<Vec<Follower>, sqlx::Error> {
        let sql = format!("{FOLLOWERS} AND ss.service = ?1 AND ss.branch = ?2 ORDER BY s.name");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(service.as_str())
            .bind(branch.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(follower_from).collect()
    }

    /// Every followed service of a live sandbox, for polling.
    pub async fn all_followers(&self) -> Result<Vec<Follower>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(FOLLOWERS.to_owned()))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(follower_from).collect()
    }

    /// Records the tip a push or poll named for every follower of `service@branch`.
    pub async fn saw_tip(
        &self,
        service: &ServiceName,
        branch: &BranchName,
        commit: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE sandbox_services SET seen_commit = ?3
             WHERE service = ?1 AND branch = ?2 AND follow = 1",
        )
        .bind(service.as_str())
        .bind(branch.as_str())
        .bind(commit)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a commit that waits to be deployed (for its owner's login), and why.
    pub async fn set_pending(
        &self,
        sandbox_id: &SandboxId,
        service: &ServiceName,
        commit: &str,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE sandbox_services SET pending_commit = ?3, pending_reason = ?4
             WHERE sandbox_id = ?1 AND service = ?2 AND follow = 1",
        )
        .bind(sandbox_id.as_str())
        .bind(service.as_str())
        .bind(commit)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The commits waiting for `owner`'s login: `(sandbox, service, commit)`.
    pub async fn pending_of(
        &self,
        owner: &str,
    ) -> Result<Vec<(SandboxId, ServiceName, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT ss.sandbox_id, ss.service, ss.pending_commit FROM sandbox_services ss
               JOIN sandboxes s ON s.id = ss.sandbox_id
             WHERE s.owner = ?1 AND s.state NOT IN ('expired', 'deleted')
               AND ss.follow = 1 AND ss.pending_commit IS NOT NULL",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parsed(r, "sandbox_id")?,
                    parsed(r, "service")?,
                    r.try_get("pending_commit")?,
                ))
            })
            .collect()
    }

    /// Turns following on or off for a service of a live sandbox, with its audit row; off
    /// forgets a waiting commit. `Ok(false)`: the sandbox has no such service.
    pub async fn set_follow(
        &self,
        sandbox_id: &SandboxId,
        service: &str,
        follow: bool,
        audit: &Audit<'_>,
    ) -> Result<bool, WriteError> {
        let mut tx = self.write().await?;
        let live = sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM sandboxes WHERE id = ?1 AND state NOT IN ('expired', 'deleted')",
        )
        .bind(sandbox_id.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if live == 0 {
            return Err(WriteError::Ended);
        }
        let changed = sqlx::query(
            "UPDATE sandbox_services SET follow = ?3,
               pending_commit = CASE WHEN ?3 THEN pending_commit END,
               pending_reason = CASE WHEN ?3 THEN pending_reason END
             WHERE sandbox_id = ?1 AND service = ?2",
        )
        .bind(sandbox_id.as_str())
        .bind(service)
        .bind(follow)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit, OffsetDateTime::now_utc()).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Starts a deployment of `service@branch` for a push, with its audit row. A deployment
    /// of the sandbox in progress is cancelled with `reason` and its services are deployed
    /// again with this one, so that nothing it was bringing is lost.
    #[allow(clippy::too_many_arguments)]
    pub async fn follow_redeploy(
        &self,
        sandbox_id: &SandboxId,
        requested_by: &str,
        deployment_id: &DeploymentId,
        service: &ServiceName,
        branch: &BranchName,
        reason: &str,
        now: OffsetDateTime,
        audit: &Audit<'_>,
    ) -> Result<(FollowRedeploy, Vec<Selection>), WriteError> {
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
        let superseded = sqlx::query(
            "UPDATE deployments SET state = 'cancelled', error = ?2, finished_at = ?3
             WHERE sandbox_id = ?1 AND state IN ('queued', 'running') RETURNING id",
        )
        .bind(sandbox_id.as_str())
        .bind(reason)
        .bind(to_millis(now))
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| parsed::<DeploymentId>(&r, "id"))
        .transpose()?;
        let mut selections = Vec::new();
        if let Some(old) = &superseded {
            sqlx::query(
                "UPDATE deployment_steps SET ended_at = ?2,
                   state = CASE WHEN state = 'running' THEN 'failed' ELSE state END
                 WHERE deployment_id = ?1 AND ended_at IS NULL",
            )
            .bind(old.as_str())
            .bind(to_millis(now))
            .execute(&mut *tx)
            .await?;
            let rows = sqlx::query(
                "SELECT service, branch FROM deployment_services WHERE deployment_id = ?1 ORDER BY service",
            )
            .bind(old.as_str())
            .fetch_all(&mut *tx)
            .await?;
            for r in &rows {
                selections.push(Selection {
                    service: r.try_get("service")?,
                    branch: r.try_get("branch")?,
                    follow: None,
                });
            }
        }
        if !selections.iter().any(|s| s.service == service.as_str()) {
            selections.push(Selection {
                service: service.to_string(),
                branch: branch.to_string(),
                follow: None,
            });
        }
        insert_deployment(
            &mut tx,
            deployment_id,
            sandbox_id,
            requested_by,
            &selections,
            now,
        )
        .await?;
        insert_audit(&mut tx, audit, now).await?;
        tx.commit().await?;
        Ok((FollowRedeploy { superseded }, selections))
    }

    /// Records a delivery; says whether a valid delivery of the same id came before (then
    /// this one is a replay, and triggers nothing). One transaction: two copies arriving at
    /// once are told apart.
    pub async fn record_delivery(&self, d: &NewDelivery<'_>) -> Result<(i64, bool), sqlx::Error> {
        let mut tx = self.write().await?;
        let duplicate = match d.delivery_id {
            Some(id) if d.signature == "valid" => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM deliveries WHERE delivery_id = ?1 AND signature = 'valid'",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
                > 0,
            _ => false,
        };
        let id = sqlx::query_scalar::<_, i64>(
            "INSERT INTO deliveries (source, received_at, delivery_id, event, repository, services, refs, signature, outcome)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
        )
        .bind(d.source)
        .bind(to_millis(OffsetDateTime::now_utc()))
        .bind(d.delivery_id)
        .bind(d.event)
        .bind(d.repository)
        .bind(d.services)
        .bind(d.refs)
        .bind(d.signature)
        .bind(d.outcome)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((id, duplicate))
    }

    /// Completes a delivery's row once it is handled: what it named and what it did.
    pub async fn finish_delivery(
        &self,
        id: i64,
        repository: Option<&str>,
        services: &str,
        refs: &str,
        outcome: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE deliveries SET repository = ?2, services = ?3, refs = ?4, outcome = ?5 WHERE id = ?1",
        )
        .bind(id)
        .bind(repository)
        .bind(services)
        .bind(refs)
        .bind(outcome)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delivery(&self, id: i64) -> Result<Option<DeliveryRow>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM deliveries WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(delivery_from).transpose()
    }

    /// Deliveries, newest first, after `(received_at, id)` of the previous page.
    pub async fn list_deliveries(
        &self,
        limit: u32,
        after: Option<(i64, i64)>,
    ) -> Result<Vec<DeliveryRow>, sqlx::Error> {
        let (t, id) = after.unwrap_or((i64::MAX, i64::MAX));
        let rows = sqlx::query(
            "SELECT * FROM deliveries WHERE received_at < ?1 OR (received_at = ?1 AND id < ?2)
             ORDER BY received_at DESC, id DESC LIMIT ?3",
        )
        .bind(t)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from).collect()
    }

    /// Deletes deliveries received before `before`; returns how many.
    pub async fn prune_deliveries(&self, before: OffsetDateTime) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query("DELETE FROM deliveries WHERE received_at < ?1")
            .bind(to_millis(before))
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

fn delivery_from(r: &SqliteRow) -> Result<DeliveryRow, sqlx::Error> {
    Ok(DeliveryRow {
        id: r.try_get("id")?,
        source: r.try_get("source")?,
        received_at: from_millis(r.try_get("received_at")?),
        delivery_id: r.try_get("delivery_id")?,
        event: r.try_get("event")?,
        repository: r.try_get("repository")?,
        services: r.try_get("services")?,
        refs: r.try_get("refs")?,
        signature: r.try_get("signature")?,
        outcome: r.try_get("outcome")?,
    })
}
