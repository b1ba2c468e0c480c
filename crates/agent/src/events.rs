//! The agent's outbox of deployment events.
//!
//! Each event gets the next `seq` of its deployment and stays here until the control plane
//! acknowledges it; after a reconnect every unacknowledged event is sent again, in order,
//! and the control plane drops the ones it already has. The outbox is bounded: when the
//! control plane is away for long, whoever emits waits (a build's output pipe fills and the
//! build pauses) rather than the agent's memory growing without end.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use sdp_protocol::{Event, EventBody, LogStream, ServiceName, Step, StepState};
use time::OffsetDateTime;
use tokio::sync::Notify;

/// Events kept unacknowledged at most.
const CAPACITY: usize = 100_000;

#[derive(Default)]
struct State {
    queue: VecDeque<Event>,
    /// How many of `queue` were sent on the current connection.
    sent: usize,
    next_seq: HashMap<String, u64>,
    /// Deployments whose outcome was emitted: later events of theirs (a service's output)
    /// would be refused by the control plane, so they are not sent.
    closed: HashSet<String>,
}

#[derive(Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// Woken when an event is queued.
    queued: Notify,
    /// Woken when events are acknowledged.
    freed: Notify,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn emit(&self, deployment: &str, body: EventBody) {
        loop {
            let freed = self.freed.notified();
            {
                let mut state = self.lock();
                if state.closed.contains(deployment) {
                    return;
                }
                if state.queue.len() < CAPACITY {
                    let seq = state.next_seq.entry(deployment.to_owned()).or_insert(0);
                    *seq += 1;
                    let event = Event {
                        deployment: deployment.to_owned(),
                        seq: *seq,
                        ts: OffsetDateTime::now_utc(),
                        body,
                    };
                    state.queue.push_back(event);
                    drop(state);
                    self.queued.notify_one();
                    return;
                }
            }
            freed.await;
        }
    }

    pub async fn log(
        &self,
        deployment: &str,
        service: Option<&ServiceName>,
        stream: LogStream,
        line: String,
    ) {
        self.emit(
            deployment,
            EventBody::Log {
                service: service.cloned(),
                stream,
                line,
            },
        )
        .await;
    }

    pub async fn system(&self, deployment: &str, service: Option<&ServiceName>, line: String) {
        self.log(deployment, service, LogStream::System, line).await;
    }

    pub async fn step(
        &self,
        deployment: &str,
        service: &ServiceName,
        step: Step,
        state: StepState,
    ) {
        self.emit(
            deployment,
            EventBody::Step {
                service: Some(service.clone()),
                step,
                state,
            },
        )
        .await;
    }

    /// No more events of `deployment` after its outcome.
    pub fn close(&self, deployment: &str) {
        let mut state = self.lock();
        state.next_seq.remove(deployment);
        state.closed.insert(deployment.to_owned());
    }

    /// The next events to send on this connection: at most `max_events`, and no more once
    /// their lines add up to `max_bytes`.
    pub fn next_batch(&self, max_events: usize, max_bytes: usize) -> Vec<Event> {
        let mut state = self.lock();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < max_events && bytes < max_bytes {
            let Some(event) = state.queue.get(state.sent).cloned() else {
                break;
            };
            bytes += 128
                + match &event.body {
                    EventBody::Log { line, .. } => line.len(),
                    _ => 256,
                };
            state.sent += 1;
            batch.push(event);
        }
        batch
    }

    /// Waits until an event is queued.
    pub async fn wait(&self) {
        self.queued.notified().await;
    }

    /// The control plane stored `deployment`'s events up to `seq`.
    pub fn ack(&self, deployment: &str, seq: u64) {
        let mut state = self.lock();
        let before = state.queue.len();
        let mut removed_sent = 0;
        let sent = state.sent;
        let mut index = 0;
        state.queue.retain(|e| {
            let keep = !(e.deployment == deployment && e.seq <= seq);
            if !keep && index < sent {
                removed_sent += 1;
            }
            index += 1;
            keep
        });
        state.sent -= removed_sent;
        if state.queue.len() < before {
            drop(state);
            self.freed.notify_waiters();
        }
    }

    /// A new connection: everything unacknowledged goes out again.
    pub fn rewind(&self) {
        self.lock().sent = 0;
        self.queued.notify_one();
    }

    /// Deployments with events not yet acknowledged.
    pub fn pending_deployments(&self) -> Vec<String> {
        let state = self.lock();
        let mut list: Vec<String> = state.queue.iter().map(|e| e.deployment.clone()).collect();
        list.sort();
        list.dedup();
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_numbered_per_deployment_and_resent_until_acknowledged() {
        let outbox = Outbox::default();
        for d in ["a", "b", "a"] {
            outbox.system(d, None, "x".into()).await;
        }
        let seqs: Vec<(String, u64)> = outbox
            .next_batch(2, usize::MAX)
            .into_iter()
            .chain(outbox.next_batch(10, usize::MAX))
            .map(|e| (e.deployment, e.seq))
            .collect();
        assert_eq!(seqs, [("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]);
        outbox.ack("a", 1);
        assert!(outbox.next_batch(10, usize::MAX).is_empty());
        outbox.rewind();
        let resent: Vec<(String, u64)> = outbox
            .next_batch(10, usize::MAX)
            .into_iter()
            .map(|e| (e.deployment, e.seq))
            .collect();
        assert_eq!(resent, [("b".into(), 1), ("a".into(), 2)]);
        assert_eq!(outbox.pending_deployments(), ["a", "b"]);
    }
}
