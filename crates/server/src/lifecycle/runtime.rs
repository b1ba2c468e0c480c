//! What agents report of sandboxes' instances after `ready` (runtime events): their output,
//! stored in the sandbox's runtime log, and their states, recorded in SQLite and routed.
//!
//! Each agent numbers a sandbox's runtime events (`seq`, one more per event, kept across its
//! restarts); the last one stored per (sandbox, agent) is in SQLite (`runtime_cursors`), so
//! that an event sent again after a reconnect, or after a restart of the control plane, is
//! acknowledged and dropped. Events are stored in order: after a gap nothing more is stored
//! and the agent is asked to send again from the first one missing; when no event of that
//! agent was stored yet, its first one is taken whatever its number. The file is written
//! before the cursor moves: a control plane that stops between the two stores the batch
//! again when the agent resends it, so a line may be doubled, never lost.
//!
//! Ordering with deployments: instance reports carry no deployment id. A report for a
//! service whose deployment is in progress (`deploying`) changes only the log, since the
//! deployment's outcome says what runs; and a report older (by the agent's clock) than the
//! outcome that recorded the service's instance is about the instance it replaced, and is
//! left out too (see `Db::record_runtime`).

use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{AgentName, InstanceReport, RuntimeBody, RuntimeEvent, SandboxId};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Lifecycle;
use crate::dispatch::RuntimeAnswer;
use crate::logs::Frame;

/// Pauses between tries of an append that fails (a full disk, an I/O error); then the agent
/// is asked to send the events again.
const APPEND_RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(500)];

/// A runtime event as a frame of the runtime log; its `seq` is the log's, given on storing.
fn frame_of(event: &RuntimeEvent) -> Frame {
    let ts = event.ts.format(&Rfc3339).unwrap_or_default();
    match &event.body {
        RuntimeBody::Log {
            service,
            stream,
            line,
        } => Frame::Log {
            seq: 0,
            ts,
            service: Some(service.to_string()),
            stream: stream.as_str().to_owned(),
            line: line.clone(),
        },
        RuntimeBody::Instance(report) => Frame::Instance {
            seq: 0,
            ts,
            service: report.service.to_string(),
            state: report.state.as_str().to_owned(),
            reason: report.reason.clone(),
            restarts: report.restarts,
        },
    }
}

impl Lifecycle {
    /// Stores a batch of `agent`'s runtime events, run by run of one sandbox; answers what
    /// to acknowledge and what to send again.
    pub(super) async fn ingest_runtime(
        self: &Arc<Self>,
        agent: &AgentName,
        events: Vec<RuntimeEvent>,
    ) -> RuntimeAnswer {
        let mut answer = RuntimeAnswer::default();
        let mut rest = events.as_slice();
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take_while(|e| e.sandbox == first.sandbox)
                .count();
            let (batch, tail) = rest.split_at(run);
            rest = tail;
            self.ingest_runtime_run(agent, batch, &mut answer).await;
        }
        answer
    }

    async fn ingest_runtime_run(
        &self,
        agent: &AgentName,
        batch: &[RuntimeEvent],
        answer: &mut RuntimeAnswer,
    ) {
        let sandbox = &batch[0].sandbox;
        let target = match self.db.runtime_target(sandbox, agent).await {
            Ok(Some(target)) if target.live => target,
            // An ended or unknown sandbox: nothing is kept of it; the agent may forget them.
            Ok(_) => {
                let last = batch.iter().map(|e| e.seq).max().unwrap_or(0);
                answer.acks.push((sandbox.clone(), last));
                return;
            }
            // Nothing acknowledged: the agent keeps them and sends them again.
            Err(e) => {
                tracing::error!(%sandbox, %agent, error = %e, "cannot read the sandbox of runtime events");
                return;
            }
        };
        let stored = target.last_seq;
        let mut expected = stored.map(|s| s + 1);
        let mut take: Vec<&RuntimeEvent> = Vec::new();
        let mut gap = false;
        for event in batch.iter().filter(|e| stored.is_none_or(|s| e.seq > s)) {
            if expected.is_some_and(|x| event.seq != x) {
                gap = true;
                break;
            }
            expected = Some(event.seq + 1);
            take.push(event);
        }
        let Some(last) = take.last().map(|e| e.seq) else {
            match (gap, stored) {
                (true, Some(s)) => {
                    tracing::warn!(%sandbox, %agent, expected = s + 1, "runtime events out of order; asking for the missing ones");
                    answer.resend.push((sandbox.clone(), s + 1));
                }
                // Every one stored before: sent again after a reconnect.
                (_, Some(s)) => answer.acks.push((sandbox.clone(), s)),
                (_, None) => {}
            }
            return;
        };
        let first = take[0].seq;
        let frames: Vec<Frame> = take.iter().map(|e| frame_of(e)).collect();
        if let Err(e) = self.append_runtime(sandbox, frames).await {
            tracing::error!(%sandbox, %agent, error = %e, "cannot write the runtime log; asking for the events again");
            answer.resend.push((sandbox.clone(), first));
            return;
        }
        let reports: Vec<(OffsetDateTime, &InstanceReport)> = take
            .iter()
            .filter_map(|e| match &e.body {
                RuntimeBody::Instance(report) => Some((e.ts, report)),
                RuntimeBody::Log { .. } => None,
            })
            .collect();
        match self
            .db
            .record_runtime(sandbox, &target.name, agent, last, &reports)
            .await
        {
            Ok(recorded) => {
                if recorded.routes_changed {
                    self.routes.request("an instance went down or came back");
                }
                answer.acks.push((sandbox.clone(), last));
            }
            // Not acknowledged: the agent keeps them (their lines may be stored twice).
            Err(e) => {
                tracing::error!(%sandbox, %agent, error = %e, "cannot record runtime events");
                return;
            }
        }
        if gap {
            tracing::warn!(%sandbox, %agent, expected = last + 1, "runtime events out of order; asking for the missing ones");
            answer.resend.push((sandbox.clone(), last + 1));
        }
    }

    /// Appends to a sandbox's runtime log, trying again after a failure.
    async fn append_runtime(
        &self,
        sandbox: &SandboxId,
        frames: Vec<Frame>,
    ) -> std::io::Result<u64> {
        let mut pauses = APPEND_RETRIES.iter();
        loop {
            match self
                .runtime_logs
                .append(sandbox.as_str(), frames.clone())
                .await
            {
                Ok(seq) => return Ok(seq),
                Err(e) => match pauses.next() {
                    Some(pause) => {
                        tracing::warn!(%sandbox, error = %e, "cannot write the runtime log; trying again");
                        tokio::time::sleep(*pause).await;
                    }
                    None => return Err(e),
                },
            }
        }
    }
}
