//! The agent's outboxes of numbered events: a generic bounded [`Queue`] over a [`Stream`],
//! used for deployments' events ([`Outbox`]) and sandboxes' runtime logs
//! ([`crate::runtime_log`]). Below, "deployment" stands for either's key.
//!
//! Each event gets the next `seq` of its deployment and stays here until the control plane
//! acknowledges it; after a reconnect every unacknowledged event is sent again, in order,
//! and the control plane drops the ones it already has. When the control plane could not
//! store some (`resend`), they go again on the same connection, from the `seq` it names.
//!
//! The outbox is bounded: when the control plane is away for long, whoever emits waits (a
//! build's output pipe fills and the build pauses) rather than the agent's memory growing
//! without end.
//!
//! Events are sized by their encoded bytes, never their raw length (JSON escapes a NUL as
//! `\u0000`): a log line over [`MAX_LINE`] encoded is cut into several events, any event is at
//! most [`MAX_EVENT_BYTES`], and a batch's frame at most the budget it is given.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use sdp_protocol::{
    AgentMessage, DeploymentId, Event, EventBody, LogStream, ServiceName, Step, StepState,
    encoded_len, escaped_len, escaped_pieces, split_escaped,
};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::lines::MAX_LINE;

/// Events kept unacknowledged at most, and their encoded bytes at most: whichever comes
/// first (100,000 lines of 8 KiB would be most of a gigabyte).
const CAPACITY: usize = 100_000;
const CAPACITY_BYTES: usize = 64 << 20;

/// Ended keys remembered, the latest: late events come from tasks that end with their
/// stream, so an id ended thousands of streams ago gets none, and the set stays bounded over
/// the agent's life.
const CLOSED_KEPT: usize = 4096;

/// The most one event takes encoded: far above a log line ([`MAX_LINE`] plus its fields) and
/// far below a frame, so that a batch always has room for at least one.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// One kind of numbered event stream: deployments' events, or sandboxes' runtime events.
/// The queue's rules (numbering, acknowledgement, resending, bounds) are the same for both.
pub trait Stream {
    /// What `seq` counts per: a deployment, a sandbox.
    type Key: Clone + Eq + Hash + Ord + std::fmt::Display;
    type Event: Clone + Serialize;
    type Body;
    /// Kept with each event until it is acknowledged, and handed back then: what the
    /// acknowledgement means beyond the `seq` (where a follower may resume).
    type Tag;
    fn event(key: &Self::Key, seq: u64, ts: OffsetDateTime, body: Self::Body) -> Self::Event;
    fn key(event: &Self::Event) -> &Self::Key;
    fn seq(event: &Self::Event) -> u64;
    /// Makes an event too large for a frame into a note that keeps its `seq`.
    fn shrink(event: &mut Self::Event, bytes: usize);
    /// The frame that carries a batch.
    fn frame(events: Vec<Self::Event>) -> AgentMessage;
    /// One key may hold at most this fraction (1/N) of the queue's bounds: with N > 1, one
    /// key that emits without pause (a sandbox's chatty instance) leaves room for the others.
    const KEY_SHARE: usize = 1;
    /// Whether `body` is queued whatever the bounds: rare events that must not wait behind a
    /// flood (an instance's new state). Each stays bounded in size.
    fn urgent(_body: &Self::Body) -> bool {
        false
    }
}

struct Queued<S: Stream> {
    event: S::Event,
    /// Its encoded length.
    bytes: usize,
    tag: S::Tag,
}

struct State<S: Stream> {
    queue: VecDeque<Queued<S>>,
    /// The encoded bytes of `queue`.
    bytes: usize,
    /// How many of `queue` were sent on the current connection.
    sent: usize,
    /// The last `seq` given, per key.
    last_seq: HashMap<S::Key, u64>,
    /// Keys whose stream has ended (a deployment's outcome, a sandbox's teardown): later
    /// events of theirs would be refused by the control plane, so they are not sent.
    closed: HashSet<S::Key>,
    /// `closed` in the order they ended, to forget the oldest.
    closed_order: VecDeque<S::Key>,
    /// Events and their encoded bytes queued, per key.
    held: HashMap<S::Key, (usize, usize)>,
}

/// A bounded queue of unacknowledged events of one [`Stream`].
pub struct Queue<S: Stream> {
    state: Mutex<State<S>>,
    /// Woken when an event is queued.
    queued: Notify,
    /// Woken when events are acknowledged.
    freed: Notify,
}

impl<S: Stream> Default for Queue<S> {
    fn default() -> Self {
        Queue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                sent: 0,
                last_seq: HashMap::new(),
                closed: HashSet::new(),
                closed_order: VecDeque::new(),
                held: HashMap::new(),
            }),
            queued: Notify::new(),
            freed: Notify::new(),
        }
    }
}

impl<S: Stream> Queue<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<S>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `body` as the next event of `key`, waiting for room; nothing when `key` was
    /// closed.
    pub async fn push(&self, key: &S::Key, body: S::Body, tag: S::Tag) {
        let mut item = Some((body, tag));
        loop {
            let freed = self.freed.notified();
            {
                let mut state = self.lock();
                if state.closed.contains(key) {
                    return;
                }
                let (events, bytes) = state.held.get(key).copied().unwrap_or_default();
                let urgent = item.as_ref().is_some_and(|(body, _)| S::urgent(body));
                let room = state.queue.len() < CAPACITY
                    && state.bytes < CAPACITY_BYTES
                    && events < CAPACITY / S::KEY_SHARE
                    && bytes < CAPACITY_BYTES / S::KEY_SHARE;
                if urgent || room {
                    let (body, tag) = item.take().expect("queued once");
                    let seq = state.last_seq.entry(key.clone()).or_insert(0);
                    *seq += 1;
                    let mut event = S::event(key, *seq, OffsetDateTime::now_utc(), body);
                    let mut bytes = encoded_len(&event);
                    if bytes > MAX_EVENT_BYTES {
                        tracing::error!(
                            key = %key,
                            seq = S::seq(&event),
                            bytes,
                            "an event too large for a frame is replaced by a note"
                        );
                        S::shrink(&mut event, bytes);
                        bytes = encoded_len(&event);
                    }
                    state.bytes += bytes;
                    let held = state.held.entry(key.clone()).or_default();
                    held.0 += 1;
                    held.1 += bytes;
                    state.queue.push_back(Queued { event, bytes, tag });
                    drop(state);
                    self.queued.notify_one();
                    return;
                }
            }
            freed.await;
        }
    }

    /// `key`'s events go on from `seq + 1`, unless it has events here already: its numbering
    /// was kept elsewhere (on disk) across the agent's restart.
    pub fn continue_after(&self, key: &S::Key, seq: u64) {
        let mut state = self.lock();
        if !state.closed.contains(key) {
            state.last_seq.entry(key.clone()).or_insert(seq);
        }
    }

    /// No more events of `key`.
    pub fn close(&self, key: &S::Key) {
        let mut state = self.lock();
        state.last_seq.remove(key);
        if state.closed.insert(key.clone()) {
            state.closed_order.push_back(key.clone());
        }
        if state.closed_order.len() > CLOSED_KEPT
            && let Some(oldest) = state.closed_order.pop_front()
        {
            state.closed.remove(&oldest);
        }
    }

    /// Whether `key` was closed (lately: see [`CLOSED_KEPT`]).
    pub fn is_closed(&self, key: &S::Key) -> bool {
        self.lock().closed.contains(key)
    }

    /// Forgets `key`'s queued events: nobody wants them any more.
    pub fn discard(&self, key: &S::Key) {
        self.take_acked(|k, _| k == key);
    }

    /// The next events to send on this connection: at most `max_events`, and as many as a
    /// frame of at most `max_bytes` holds (at least one, whose frame is at most
    /// [`MAX_EVENT_BYTES`] and a few bytes).
    pub fn next_batch(&self, max_events: usize, max_bytes: usize) -> Vec<S::Event> {
        let mut state = self.lock();
        let mut batch = Vec::new();
        let mut bytes = encoded_len(&S::frame(Vec::new()));
        while batch.len() < max_events {
            let Some(next) = state.queue.get(state.sent) else {
                break;
            };
            // With the comma before it.
            let more = next.bytes + 1;
            if !batch.is_empty() && bytes + more > max_bytes {
                break;
            }
            bytes += more;
            batch.push(next.event.clone());
            state.sent += 1;
        }
        batch
    }

    /// Waits until an event is queued.
    pub async fn wait(&self) {
        self.queued.notified().await;
    }

    /// The control plane stored `key`'s events up to `seq`: they are forgotten, and their tags
    /// handed back, oldest first.
    pub fn ack(&self, key: &S::Key, seq: u64) -> Vec<S::Tag> {
        self.take_acked(|k, s| k == key && s <= seq)
    }

    fn take_acked(&self, acked: impl Fn(&S::Key, u64) -> bool) -> Vec<S::Tag> {
        let mut state = self.lock();
        let sent = state.sent;
        let mut tags = Vec::new();
        let mut removed_sent = 0;
        let mut removed_bytes = 0;
        let queue = std::mem::take(&mut state.queue);
        for (index, queued) in queue.into_iter().enumerate() {
            let key = S::key(&queued.event);
            if acked(key, S::seq(&queued.event)) {
                removed_bytes += queued.bytes;
                if let Some(held) = state.held.get_mut(key) {
                    held.0 -= 1;
                    held.1 -= queued.bytes;
                    if held.0 == 0 {
                        state.held.remove(key);
                    }
                }
                if index < sent {
                    removed_sent += 1;
                }
                tags.push(queued.tag);
            } else {
                state.queue.push_back(queued);
            }
        }
        state.sent -= removed_sent;
        state.bytes -= removed_bytes;
        if !tags.is_empty() {
            drop(state);
            self.freed.notify_waiters();
        }
        tags
    }

    /// A new connection: everything unacknowledged goes out again.
    pub fn rewind(&self) {
        self.lock().sent = 0;
        self.queued.notify_one();
    }

    /// The control plane could not store `key`'s events from `from_seq` on: they go out
    /// again on this connection, and so do the events of other keys queued after the first of
    /// them (the control plane drops what it already has). Events it asks for that it had
    /// acknowledged are gone; the rest go again all the same.
    pub fn resend(&self, key: &S::Key, from_seq: u64) {
        let mut state = self.lock();
        let first = state
            .queue
            .iter()
            .position(|q| S::key(&q.event) == key && S::seq(&q.event) >= from_seq);
        let Some(first) = first else {
            // Nothing of it from there is queued: all acknowledged, or not emitted yet.
            tracing::warn!(%key, from_seq, "the control plane asks for events the agent no longer holds");
            return;
        };
        let seq = S::seq(&state.queue[first].event);
        if seq != from_seq {
            tracing::warn!(%key, from_seq, resending_from = seq, "the control plane asks for events it acknowledged; sending those the agent still holds");
        }
        // Not sent yet on this connection: they go in their turn anyway.
        if first < state.sent {
            state.sent = first;
            drop(state);
            self.queued.notify_one();
        }
    }

    /// Keys with events not yet acknowledged.
    pub fn pending(&self) -> Vec<S::Key> {
        let state = self.lock();
        let mut list: Vec<S::Key> = state
            .queue
            .iter()
            .map(|q| S::key(&q.event).clone())
            .collect();
        list.sort();
        list.dedup();
        list
    }
}

/// Deployments' events: numbered per deployment, ended by the outcome.
pub struct Deployments;

impl Stream for Deployments {
    type Key = DeploymentId;
    type Event = Event;
    type Body = EventBody;
    type Tag = ();

    fn event(key: &DeploymentId, seq: u64, ts: OffsetDateTime, body: EventBody) -> Event {
        Event {
            deployment: key.clone(),
            seq,
            ts,
            body,
        }
    }

    fn key(event: &Event) -> &DeploymentId {
        &event.deployment
    }

    fn seq(event: &Event) -> u64 {
        event.seq
    }

    fn shrink(event: &mut Event, bytes: usize) {
        event.body = oversize(&event.body, bytes);
    }

    fn frame(events: Vec<Event>) -> AgentMessage {
        AgentMessage::Events { events }
    }
}

/// The outbox of deployments' events.
pub type Outbox = Queue<Deployments>;

impl Queue<Deployments> {
    pub async fn emit(&self, deployment: &DeploymentId, body: EventBody) {
        self.push(deployment, bounded(body), ()).await;
    }

    /// A line that would take more than [`MAX_LINE`] encoded (a system line quoting a
    /// command's output, a masked line) goes out as several events.
    pub async fn log(
        &self,
        deployment: &DeploymentId,
        service: Option<&ServiceName>,
        stream: LogStream,
        line: String,
    ) {
        let log = |line| EventBody::Log {
            service: service.cloned(),
            stream,
            line,
        };
        if escaped_len(&line) <= MAX_LINE {
            return self.emit(deployment, log(line)).await;
        }
        for piece in escaped_pieces(&line, MAX_LINE) {
            self.emit(deployment, log(piece.to_owned())).await;
        }
    }

    pub async fn system(
        &self,
        deployment: &DeploymentId,
        service: Option<&ServiceName>,
        line: String,
    ) {
        self.log(deployment, service, LogStream::System, line).await;
    }

    pub async fn step(
        &self,
        deployment: &DeploymentId,
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

    /// Deployments with events not yet acknowledged.
    pub fn pending_deployments(&self) -> Vec<DeploymentId> {
        self.pending()
    }
}

/// An outcome's error quotes whatever failed: it is cut like a log line.
fn bounded(body: EventBody) -> EventBody {
    match body {
        EventBody::Outcome {
            ok,
            error: Some(error),
            services,
        } if escaped_len(&error) > MAX_LINE => EventBody::Outcome {
            ok,
            error: Some(split_escaped(&error, MAX_LINE).0.to_owned()),
            services,
        },
        body => body,
    }
}

/// What is sent instead of an event too large for a frame (an outcome of thousands of
/// services): it keeps its `seq`, so that nothing after it is held up, and says what happened.
fn oversize(body: &EventBody, bytes: usize) -> EventBody {
    match body {
        EventBody::Outcome { .. } => EventBody::Outcome {
            ok: false,
            error: Some(format!(
                "the agent's outcome took {bytes} bytes, too many to report; see the agent's log"
            )),
            services: Vec::new(),
        },
        EventBody::Log { service, .. } | EventBody::Step { service, .. } => EventBody::Log {
            service: service.clone(),
            stream: LogStream::System,
            line: format!("an event of {bytes} bytes was too large to send, and was left out"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(n: u64) -> DeploymentId {
        DeploymentId::parse(format!("dep_{n:016x}")).unwrap()
    }

    /// `(deployment, seq)` of each event of `batch`.
    fn seqs(batch: Vec<Event>) -> Vec<(DeploymentId, u64)> {
        batch.into_iter().map(|e| (e.deployment, e.seq)).collect()
    }

    #[tokio::test]
    async fn events_are_numbered_per_deployment_and_resent_until_acknowledged() {
        let outbox = Outbox::default();
        let (a, b) = (dep(0xa), dep(0xb));
        for d in [&a, &b, &a] {
            outbox.system(d, None, "x".into()).await;
        }
        let mut sent = outbox.next_batch(2, usize::MAX);
        sent.extend(outbox.next_batch(10, usize::MAX));
        assert_eq!(seqs(sent), [(a.clone(), 1), (b.clone(), 1), (a.clone(), 2)]);
        outbox.ack(&a, 1);
        assert!(outbox.next_batch(10, usize::MAX).is_empty());
        outbox.rewind();
        assert_eq!(
            seqs(outbox.next_batch(10, usize::MAX)),
            [(b.clone(), 1), (a.clone(), 2)]
        );
        assert_eq!(outbox.pending_deployments(), [a, b]);
    }

    #[tokio::test]
    async fn resend_sends_again_from_the_seq_asked_for_on_the_same_connection() {
        let outbox = Outbox::default();
        let (a, b) = (dep(0xa), dep(0xb));
        for d in [&a, &a, &b, &a, &b] {
            outbox.system(d, None, "x".into()).await;
        }
        assert_eq!(outbox.next_batch(10, usize::MAX).len(), 5);
        outbox.ack(&a, 1);
        outbox.resend(&a, 2);
        // From a's second event on, with b's events after it: the control plane drops those
        // it already has.
        assert_eq!(
            seqs(outbox.next_batch(10, usize::MAX)),
            [
                (a.clone(), 2),
                (b.clone(), 1),
                (a.clone(), 3),
                (b.clone(), 2)
            ]
        );
        assert!(outbox.next_batch(10, usize::MAX).is_empty());
        outbox.resend(&b, 2);
        assert_eq!(seqs(outbox.next_batch(10, usize::MAX)), [(b.clone(), 2)]);
    }

    #[tokio::test]
    async fn resend_wakes_the_writer_and_leaves_unsent_events_in_their_turn() {
        use futures_util::FutureExt;
        let outbox = Outbox::default();
        let (a, b) = (dep(0xa), dep(0xb));
        for d in [&a, &b, &a] {
            outbox.system(d, None, "x".into()).await;
        }
        // The writer has sent a's first event and waits for more.
        assert_eq!(seqs(outbox.next_batch(1, usize::MAX)), [(a.clone(), 1)]);
        let _ = outbox.wait().now_or_never();
        outbox.resend(&a, 1);
        assert!(
            outbox.wait().now_or_never().is_some(),
            "the writer is woken"
        );
        // Asking for events not sent yet changes nothing: they go once, in their turn.
        outbox.resend(&a, 2);
        assert_eq!(
            seqs(outbox.next_batch(10, usize::MAX)),
            [(a.clone(), 1), (b.clone(), 1), (a.clone(), 2)]
        );
        assert!(outbox.next_batch(10, usize::MAX).is_empty());
    }

    #[tokio::test]
    async fn resend_of_acknowledged_or_unknown_events_sends_what_is_still_held() {
        let outbox = Outbox::default();
        let (a, b) = (dep(0xa), dep(0xb));
        for d in [&a, &a, &a, &b] {
            outbox.system(d, None, "x".into()).await;
        }
        assert_eq!(outbox.next_batch(10, usize::MAX).len(), 4);
        outbox.ack(&a, 2);
        // a's first two are gone: what is held of it goes again, from its third.
        outbox.resend(&a, 1);
        assert_eq!(
            seqs(outbox.next_batch(10, usize::MAX)),
            [(a.clone(), 3), (b.clone(), 1)]
        );
        // Nothing of a deployment the agent does not know, nor past its last event.
        outbox.resend(&dep(0xc), 1);
        outbox.resend(&a, 4);
        assert!(outbox.next_batch(10, usize::MAX).is_empty());
    }

    #[tokio::test]
    async fn unacknowledged_events_are_bounded_by_their_bytes_and_an_ack_makes_room() {
        use futures_util::FutureExt;
        let outbox = Outbox::default();
        let d = dep(0xd);
        // Long lines reach the byte bound long before the count of events.
        let line = "x".repeat(MAX_LINE - 100);
        let mut emitted = 0u64;
        while outbox.lock().bytes < CAPACITY_BYTES {
            outbox.system(&d, None, line.clone()).await;
            emitted += 1;
        }
        assert!(emitted < CAPACITY as u64 / 10, "{emitted}");
        let mut blocked = Box::pin(outbox.system(&d, None, line.clone()));
        assert!(
            (&mut blocked).now_or_never().is_none(),
            "the outbox is full"
        );
        outbox.ack(&d, emitted);
        assert!(
            blocked.now_or_never().is_some(),
            "room again once acknowledged"
        );
        assert!(outbox.lock().bytes < MAX_EVENT_BYTES);
    }

    #[tokio::test]
    async fn a_batch_is_sized_by_its_encoded_frame_whatever_its_lines_hold() {
        let outbox = Outbox::default();
        let d = dep(0xd);
        // Lines of NUL and ESC take six bytes per byte once encoded.
        for i in 0..200 {
            let byte = if i % 2 == 0 { '\0' } else { '\u{1b}' };
            let line = byte.to_string().repeat(MAX_LINE / 6);
            outbox.log(&d, None, LogStream::Stdout, line).await;
        }
        let budget = 64 * 1024;
        let mut sent = 0;
        loop {
            let batch = outbox.next_batch(512, budget);
            if batch.is_empty() {
                break;
            }
            sent += batch.len();
            let frame = sdp_protocol::encode(&AgentMessage::Events { events: batch });
            assert!(frame.len() <= budget, "a frame of {} bytes", frame.len());
        }
        assert_eq!(sent, 200);
    }

    #[tokio::test]
    async fn a_line_too_long_for_one_event_is_cut_into_several() {
        let outbox = Outbox::default();
        let d = dep(0xd);
        let line = format!("git said: {}", "\0".repeat(3 * MAX_LINE));
        outbox.system(&d, None, line.clone()).await;
        let events = outbox.next_batch(100, usize::MAX);
        assert!(events.len() > 3, "{} events", events.len());
        let mut joined = String::new();
        for event in events {
            let EventBody::Log { line, .. } = event.body else {
                panic!("not a line")
            };
            assert!(escaped_len(&line) <= MAX_LINE);
            joined.push_str(&line);
        }
        assert_eq!(joined, line);
    }

    #[tokio::test]
    async fn a_closed_deployment_takes_no_more_events_and_only_the_latest_closed_are_kept() {
        let outbox = Outbox::default();
        let d = dep(0xd);
        outbox.system(&d, None, "before".into()).await;
        outbox.close(&d);
        outbox.system(&d, None, "late".into()).await;
        outbox.continue_after(&d, 7);
        assert_eq!(seqs(outbox.next_batch(10, usize::MAX)), [(d.clone(), 1)]);
        assert!(outbox.lock().last_seq.is_empty());
        for n in 0..CLOSED_KEPT as u64 + 10 {
            outbox.close(&dep(0x1000 + n));
        }
        assert_eq!(outbox.lock().closed.len(), CLOSED_KEPT);
        assert!(!outbox.is_closed(&d), "the oldest are forgotten");
        assert!(outbox.is_closed(&dep(0x1000 + CLOSED_KEPT as u64 + 9)));
    }

    #[tokio::test]
    async fn an_event_too_large_for_a_frame_is_replaced_by_a_note_keeping_its_seq() {
        let outbox = Outbox::default();
        let d = dep(0xd);
        outbox.system(&d, None, "before".into()).await;
        let service = ServiceName::parse("orders").unwrap();
        let outcome = EventBody::Outcome {
            ok: true,
            error: Some("\0".repeat(10 * MAX_LINE)),
            services: (0..100)
                .map(|_| sdp_protocol::ServiceOutcome {
                    service: service.clone(),
                    commit: None,
                    upstream: Some("x".repeat(1000)),
                })
                .collect(),
        };
        outbox.emit(&d, outcome).await;
        let events = outbox.next_batch(10, usize::MAX);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].seq, 2);
        assert!(encoded_len(&events[1]) <= MAX_EVENT_BYTES);
        let EventBody::Outcome {
            ok,
            error,
            services,
        } = &events[1].body
        else {
            panic!("not an outcome")
        };
        assert!(!ok && services.is_empty());
        assert!(error.as_deref().unwrap().contains("too many to report"));
    }
}
