//! The steps of a deployment, each with its start and end; `service` is '' for steps of the
//! whole deployment (routing).

use sdp_protocol::{DeploymentId, Step, StepState};
use sqlx::Row;
use time::OffsetDateTime;

use super::{Db, from_millis, parsed, to_millis};

pub struct StepRow {
    /// `None` for a step of the whole deployment.
    pub service: Option<String>,
    pub step: Step,
    pub state: StepState,
    pub started_at: OffsetDateTime,
    pub ended_at: Option<OffsetDateTime>,
}

impl Db {
    /// Records a step change of a service (`None`: of the whole deployment): the open step
    /// of that service ends now, the new one starts, and ends too unless running.
    pub async fn record_step(
        &self,
        deployment_id: &DeploymentId,
        service: Option<&str>,
        step: Step,
        state: StepState,
        at: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        let at = to_millis(at);
        let service = service.unwrap_or("");
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE deployment_steps SET ended_at = ?3,
               state = CASE WHEN state = 'running' THEN 'done' ELSE state END
             WHERE deployment_id = ?1 AND service = ?2 AND ended_at IS NULL",
        )
        .bind(deployment_id.as_str())
        .bind(service)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let ended = (state != StepState::Running).then_some(at);
        sqlx::query(
            "INSERT INTO deployment_steps (deployment_id, service, step, state, started_at, ended_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (deployment_id, service, step) DO UPDATE SET state = excluded.state,
               ended_at = excluded.ended_at",
        )
        .bind(deployment_id.as_str())
        .bind(service)
        .bind(step.as_str())
        .bind(state.as_str())
        .bind(at)
        .bind(ended)
        .execute(&mut *tx)
        .await?;
        if !service.is_empty() {
            sqlx::query(
                "UPDATE deployment_services SET step = ?3, state = ?4 WHERE deployment_id = ?1 AND service = ?2",
            )
            .bind(deployment_id.as_str())
            .bind(service)
            .bind(step.as_str())
            .bind(state.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Steps of a deployment, in order of start.
    pub async fn steps(&self, deployment_id: &str) -> Result<Vec<StepRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT service, step, state, started_at, ended_at FROM deployment_steps
             WHERE deployment_id = ?1 ORDER BY started_at, rowid",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StepRow {
                    service: Some(r.try_get::<String, _>("service")?).filter(|s| !s.is_empty()),
                    step: parsed(r, "step")?,
                    state: parsed(r, "state")?,
                    started_at: from_millis(r.try_get("started_at")?),
                    ended_at: r.try_get::<Option<i64>, _>("ended_at")?.map(from_millis),
                })
            })
            .collect()
    }
}
