//! The steps of a deployment, each with its start and end; `service` is '' for steps of the
//! whole deployment (routing).

use sdp_protocol::{DeploymentId, Step, StepState};
use sqlx::Row;
use time::OffsetDateTime;

use super::{Db, from_millis, parsed, to_millis};

/// A step that ended, and how long it took (by the clock that recorded its start and end:
/// the agent's for a service's steps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndedStep {
    pub step: Step,
    pub state: StepState,
    pub seconds: f64,
}

impl EndedStep {
    fn new(step: Step, state: StepState, started_ms: i64, ended_ms: i64) -> Self {
        Self {
            step,
            state,
            // Clocks may disagree (an agent's start, the control plane's end): never below 0.
            seconds: (ended_ms - started_ms).max(0) as f64 / 1000.0,
        }
    }
}

/// The steps an `UPDATE … RETURNING step, state, started_at` ended at `at`.
pub(super) fn ended_steps(
    rows: &[sqlx::sqlite::SqliteRow],
    at: i64,
) -> Result<Vec<EndedStep>, sqlx::Error> {
    rows.iter()
        .map(|r| {
            Ok(EndedStep::new(
                parsed(r, "step")?,
                parsed(r, "state")?,
                r.try_get("started_at")?,
                at,
            ))
        })
        .collect()
}

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
    /// of that service ends now, the new one starts, and ends too unless running. Returns
    /// the steps that ended by it, each once: a step that had ended before and is recorded
    /// again (its state corrected) is not among them.
    pub async fn record_step(
        &self,
        deployment_id: &DeploymentId,
        service: Option<&str>,
        step: Step,
        state: StepState,
        at: OffsetDateTime,
    ) -> Result<Vec<EndedStep>, sqlx::Error> {
        let at = to_millis(at);
        let service = service.unwrap_or("");
        let mut tx = self.write().await?;
        let closed = sqlx::query(
            "UPDATE deployment_steps SET ended_at = ?3,
               state = CASE WHEN state = 'running' THEN 'done' ELSE state END
             WHERE deployment_id = ?1 AND service = ?2 AND ended_at IS NULL
             RETURNING step, state, started_at",
        )
        .bind(deployment_id.as_str())
        .bind(service)
        .bind(at)
        .fetch_all(&mut *tx)
        .await?;
        let mut ended_now = ended_steps(&closed, at)?;
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM deployment_steps
                            WHERE deployment_id = ?1 AND service = ?2 AND step = ?3)",
        )
        .bind(deployment_id.as_str())
        .bind(service)
        .bind(step.as_str())
        .fetch_one(&mut *tx)
        .await?;
        // The step just closed and recorded again ends in the state it is recorded with (or
        // starts over, when running again).
        if let Some(i) = ended_now.iter().position(|e| e.step == step) {
            if state == StepState::Running {
                ended_now.remove(i);
            } else {
                ended_now[i].state = state;
            }
        } else if !known && state != StepState::Running {
            ended_now.push(EndedStep::new(step, state, at, at));
        }
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
        tx.commit().await?;
        Ok(ended_now)
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
