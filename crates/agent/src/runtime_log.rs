//! Sandboxes' runtime logs: what instances print, from their start, and how they fare
//! (`runtime` frames). Numbered per sandbox by the generic [`Queue`], with one difference
//! from deployments' events: the numbering outlives the agent. Each sandbox's last
//! acknowledged `seq`, and where each output source's acknowledged lines end, are kept in
//! `state/<sandbox_id>/runtime.json` (written aside and renamed), so that a restarted agent
//! goes on from the next `seq` and its followers re-read exactly what was not acknowledged.
//!
//! An output source is a file of the process runtime (`orders.stdout`) or a container's log
//! stream (`orders`); its position is a byte offset or a log timestamp in nanoseconds. Each
//! start of an instance is a new generation of its sources: positions of an older one never
//! apply to a new file or container.
//!
//! The window that remains: events the control plane stored but had not acknowledged when
//! the agent died take the same `seq`s again after the restart. Output lines are re-read in
//! the same order per source, so they match; but a state report in that window, or lines of
//! stdout and stderr re-read in another interleaving, may be dropped as duplicates or stored
//! twice under other `seq`s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sdp_protocol::{
    AgentMessage, DeploymentId, InstanceReport, LogStream, RuntimeBody, RuntimeEvent, SandboxId,
    ServiceName, escaped_len, escaped_pieces, split_escaped,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::events::{Outbox, Queue, Stream};
use crate::lines::MAX_LINE;

/// The file in a sandbox's state folder.
const SAVED: &str = "runtime.json";
/// The last lines of an instance kept for a crash report, each cut to `TAIL_LINE` bytes and
/// all together at most `TAIL_BYTES` (encoded): a crash report must fit well inside
/// [`crate::events::MAX_EVENT_BYTES`] whatever the service prints, or it would be left out.
const TAIL_LINES: usize = 20;
const TAIL_LINE: usize = 1024;
const TAIL_BYTES: usize = 16 * 1024;
/// Ends a line of the tail that was cut.
const CUT: &str = "…";

/// Where an output line ends in its source, carried with its event until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub source: String,
    pub generation: u64,
    pub at: u64,
}

/// Runtime events: numbered per sandbox.
pub struct RuntimeEvents;

impl Stream for RuntimeEvents {
    type Key = SandboxId;
    type Event = RuntimeEvent;
    type Body = RuntimeBody;
    type Tag = Option<Mark>;

    fn event(key: &SandboxId, seq: u64, ts: OffsetDateTime, body: RuntimeBody) -> RuntimeEvent {
        RuntimeEvent {
            sandbox: key.clone(),
            seq,
            ts,
            body,
        }
    }

    fn key(event: &RuntimeEvent) -> &SandboxId {
        &event.sandbox
    }

    /// Sandboxes share the agent's queue: one that prints without pause holds at most an
    /// eighth of it, and the others' lines go on.
    const KEY_SHARE: usize = 8;

    /// A state report never waits behind output, its own sandbox's or another's: the
    /// control plane routes by it.
    fn urgent(body: &RuntimeBody) -> bool {
        matches!(body, RuntimeBody::Instance(_))
    }

    fn seq(event: &RuntimeEvent) -> u64 {
        event.seq
    }

    /// A report stays a report, without its last lines: the control plane must learn of a
    /// crash whatever the instance printed before it.
    fn shrink(event: &mut RuntimeEvent, bytes: usize) {
        match &mut event.body {
            RuntimeBody::Instance(report) => {
                report.last_lines = vec![format!(
                    "(its last lines were left out: the report took {bytes} bytes)"
                )];
                if let Some(reason) = &mut report.reason {
                    reason.truncate(split_escaped(reason, MAX_LINE).0.len());
                }
            }
            RuntimeBody::Log { service, .. } => {
                event.body = RuntimeBody::Log {
                    service: service.clone(),
                    stream: LogStream::System,
                    line: format!(
                        "an event of {bytes} bytes was too large to send, and was left out"
                    ),
                };
            }
        }
    }

    fn frame(events: Vec<RuntimeEvent>) -> AgentMessage {
        AgentMessage::Runtime { events }
    }
}

/// A source's acknowledged position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    generation: u64,
    at: u64,
}

/// `runtime.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    acked_seq: u64,
    /// Each service's instance generation: bumped by every start.
    #[serde(default)]
    generations: BTreeMap<String, u64>,
    /// Each source's acknowledged position.
    #[serde(default)]
    cursors: BTreeMap<String, Cursor>,
}

pub struct RuntimeLog {
    queue: Queue<RuntimeEvents>,
    /// `<work_dir>/state`.
    state_dir: PathBuf,
    saved: Mutex<HashMap<SandboxId, Saved>>,
}

impl RuntimeLog {
    pub fn new(state_dir: &Path) -> RuntimeLog {
        RuntimeLog {
            queue: Queue::default(),
            state_dir: state_dir.to_owned(),
            saved: Mutex::default(),
        }
    }

    fn path(&self, sandbox: &SandboxId) -> PathBuf {
        self.state_dir.join(sandbox.as_str()).join(SAVED)
    }

    /// Runs `f` on what is kept of `sandbox`, read from disk the first time, and writes it back
    /// when `f` says it changed. Of a sandbox torn down nothing is kept or written: a late
    /// line or acknowledgement must not bring back what `close` dropped.
    fn with_saved<T>(&self, sandbox: &SandboxId, f: impl FnOnce(&mut Saved) -> (T, bool)) -> T {
        let mut all = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if self.queue.is_closed(sandbox) {
            return f(&mut Saved::default()).0;
        }
        let saved = all.entry(sandbox.clone()).or_insert_with(|| {
            let saved: Saved = std::fs::read(self.path(sandbox))
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default();
            self.queue.continue_after(sandbox, saved.acked_seq);
            saved
        });
        let (value, changed) = f(saved);
        if changed {
            self.store(sandbox, saved);
        }
        value
    }

    /// Written aside and renamed, so that a crash leaves the old file or the new one. Only
    /// into a state folder that exists: a late acknowledgement must not bring back the folder
    /// of a sandbox torn down.
    fn store(&self, sandbox: &SandboxId, saved: &Saved) {
        let path = self.path(sandbox);
        if !path.parent().is_some_and(Path::is_dir) {
            return;
        }
        let aside = path.with_extension("json.new");
        let written = std::fs::write(&aside, serde_json::to_vec(saved).expect("serializes"))
            .and_then(|()| std::fs::rename(&aside, &path));
        if let Err(e) = written {
            tracing::warn!(%sandbox, path = %path.display(), error = %e, "cannot keep the runtime log's position");
        }
    }

    async fn push(&self, sandbox: &SandboxId, body: RuntimeBody, mark: Option<Mark>) {
        self.with_saved(sandbox, |_| ((), false));
        self.queue.push(sandbox, body, mark).await;
    }

    /// A line of `service`, cut like a deployment's log line when too long; `mark` says where
    /// it ended in its source (on the last piece).
    pub async fn log(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        stream: LogStream,
        line: String,
        mark: Option<Mark>,
    ) {
        let log = |line| RuntimeBody::Log {
            service: service.clone(),
            stream,
            line,
        };
        if escaped_len(&line) <= MAX_LINE {
            return self.push(sandbox, log(line), mark).await;
        }
        let pieces: Vec<String> = escaped_pieces(&line, MAX_LINE).map(str::to_owned).collect();
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let mark = if i == last { mark.clone() } else { None };
            self.push(sandbox, log(piece), mark).await;
        }
    }

    pub async fn system(&self, sandbox: &SandboxId, service: &ServiceName, line: String) {
        self.log(sandbox, service, LogStream::System, line, None)
            .await;
    }

    pub async fn report(&self, sandbox: &SandboxId, report: InstanceReport) {
        tracing::info!(%sandbox, service = %report.service, state = %report.state, reason = report.reason.as_deref().unwrap_or(""), "instance state");
        self.push(sandbox, RuntimeBody::Instance(report), None)
            .await;
    }

    /// A new instance of `service` starts: its sources start anew. Returns its generation.
    pub fn begin(&self, sandbox: &SandboxId, service: &ServiceName) -> u64 {
        self.with_saved(sandbox, |saved| {
            let generation = saved.generations.entry(service.to_string()).or_insert(0);
            *generation += 1;
            (*generation, true)
        })
    }

    /// The generation of `service`'s instance now.
    pub fn generation(&self, sandbox: &SandboxId, service: &ServiceName) -> u64 {
        self.with_saved(sandbox, |saved| {
            (
                saved
                    .generations
                    .get(service.as_str())
                    .copied()
                    .unwrap_or(0),
                false,
            )
        })
    }

    /// Where the acknowledged lines of `source` end, in its `generation`: where a follower
    /// resumes.
    pub fn acked_at(&self, sandbox: &SandboxId, source: &str, generation: u64) -> u64 {
        self.with_saved(sandbox, |saved| {
            let at = saved
                .cursors
                .get(source)
                .filter(|c| c.generation == generation)
                .map_or(0, |c| c.at);
            (at, false)
        })
    }

    /// `source` was emptied once all of it was acknowledged: it starts again at 0.
    pub fn rebase(&self, sandbox: &SandboxId, source: &str, generation: u64) {
        self.with_saved(sandbox, |saved| {
            saved
                .cursors
                .insert(source.to_owned(), Cursor { generation, at: 0 });
            ((), true)
        });
    }

    /// The control plane stored `sandbox`'s events up to `seq`.
    pub fn ack(&self, sandbox: &SandboxId, seq: u64) {
        let marks = self.queue.ack(sandbox, seq);
        self.with_saved(sandbox, |saved| {
            saved.acked_seq = saved.acked_seq.max(seq);
            for Mark {
                source,
                generation,
                at,
            } in marks.into_iter().flatten()
            {
                let current = saved.cursors.entry(source).or_default();
                if generation >= current.generation {
                    *current = Cursor { generation, at };
                }
            }
            ((), true)
        });
    }

    pub fn resend(&self, sandbox: &SandboxId, from_seq: u64) {
        self.queue.resend(sandbox, from_seq);
    }

    pub fn rewind(&self) {
        self.queue.rewind();
    }

    #[cfg(test)]
    pub fn next_batch(&self, max_events: usize, max_bytes: usize) -> Vec<RuntimeEvent> {
        self.queue.next_batch(max_events, max_bytes)
    }

    /// The queue the connection's writer sends from.
    pub fn queue(&self) -> &Queue<RuntimeEvents> {
        &self.queue
    }

    pub async fn wait(&self) {
        self.queue.wait().await;
    }

    /// The sandbox is torn down: nothing more of it is sent or kept.
    pub fn close(&self, sandbox: &SandboxId) {
        self.queue.close(sandbox);
        self.queue.discard(sandbox);
        self.saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox);
    }
}

/// An instance's last lines, for the report of its crash.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: &str) {
        let line = match split_escaped(line, TAIL_LINE - CUT.len()) {
            (whole, "") => whole.to_owned(),
            (head, _) => format!("{head}{CUT}"),
        };
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.push_back(line);
        let mut bytes: usize = lines.iter().map(|l| escaped_len(l)).sum();
        while lines.len() > TAIL_LINES || bytes > TAIL_BYTES {
            let oldest = lines.pop_front().expect("not empty");
            bytes -= escaped_len(&oldest);
        }
    }

    pub fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect()
    }
}

/// Where one instance's output goes: its sandbox's runtime log from its start, its
/// deployment's log too until the outcome, and its tail.
#[derive(Clone)]
pub struct InstanceOutput {
    pub log: Arc<RuntimeLog>,
    pub sandbox: SandboxId,
    pub service: ServiceName,
    pub generation: u64,
    pub deployment: Option<(Arc<Outbox>, DeploymentId)>,
    pub tail: Tail,
}

impl InstanceOutput {
    /// `source`'s line, which ends at `at` in it.
    pub async fn line(&self, stream: LogStream, source: &str, line: String, at: u64) {
        self.tail.push(&line);
        if let Some((outbox, deployment)) = &self.deployment {
            outbox
                .log(deployment, Some(&self.service), stream, line.clone())
                .await;
        }
        let mark = Mark {
            source: source.to_owned(),
            generation: self.generation,
            at,
        };
        self.log
            .log(&self.sandbox, &self.service, stream, line, Some(mark))
            .await;
    }

    /// Where `source`'s acknowledged lines end.
    pub fn acked_at(&self, source: &str) -> u64 {
        self.log.acked_at(&self.sandbox, source, self.generation)
    }

    pub fn rebase(&self, source: &str) {
        self.log.rebase(&self.sandbox, source, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> SandboxId {
        SandboxId::parse(format!("sbx_{n:016x}")).unwrap()
    }

    fn lines(log: &RuntimeLog) -> Vec<(u64, String)> {
        log.next_batch(1000, usize::MAX)
            .into_iter()
            .filter_map(|e| match e.body {
                RuntimeBody::Log { line, .. } => Some((e.seq, line)),
                RuntimeBody::Instance(_) => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_sandbox_that_floods_waits_for_room_while_others_and_state_reports_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(RuntimeLog::new(dir.path()));
        let service = ServiceName::parse("orders").unwrap();
        // Nothing is sent or acknowledged: the flooding sandbox fills its share and waits.
        let pushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flood = {
            let (log, service, pushed) = (log.clone(), service.clone(), pushed.clone());
            tokio::spawn(async move {
                loop {
                    log.system(&id(1), &service, "x".repeat(8000)).await;
                    pushed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        let count = || pushed.load(std::sync::atomic::Ordering::Relaxed);
        let mut waited = false;
        for _ in 0..200 {
            let before = count();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if before > 0 && count() == before {
                waited = true;
                break;
            }
        }
        assert!(waited, "the flood never waited for room");
        let quick = std::time::Duration::from_secs(5);
        tokio::time::timeout(quick, log.system(&id(2), &service, "hello".into()))
            .await
            .expect("another sandbox's line waited behind the flood");
        let report = InstanceReport {
            service: service.clone(),
            state: sdp_protocol::InstanceState::Crashed,
            reason: Some("exit code 1".into()),
            last_lines: Vec::new(),
            upstream: None,
            restarts: 0,
            gave_up: false,
        };
        tokio::time::timeout(quick, log.report(&id(1), report))
            .await
            .expect("the flooding sandbox's own crash report waited");
        flood.abort();
    }

    #[test]
    fn the_tail_keeps_the_last_lines_cut_short_and_bounded_in_total() {
        let tail = Tail::default();
        tail.push("first");
        tail.push(&"é".repeat(160_000));
        let lines = tail.lines();
        assert_eq!(lines[0], "first");
        assert!(lines[1].ends_with(CUT) && escaped_len(&lines[1]) <= TAIL_LINE);
        for i in 0..100 {
            tail.push(&format!("{i}{}", "\0".repeat(TAIL_LINE)));
        }
        let lines = tail.lines();
        assert!(lines.len() <= TAIL_LINES);
        assert!(lines.iter().map(|l| escaped_len(l)).sum::<usize>() <= TAIL_BYTES);
        assert!(lines.last().unwrap().starts_with("99"));
    }

    #[tokio::test]
    async fn a_crash_report_too_large_to_send_stays_a_report_without_its_last_lines() {
        let state = tempfile::tempdir().unwrap();
        let sandbox = id(1);
        let log = RuntimeLog::new(state.path());
        let report = InstanceReport {
            service: ServiceName::parse("orders").unwrap(),
            state: sdp_protocol::InstanceState::Crashed,
            reason: Some("exit code 2".into()),
            last_lines: vec!["\0".repeat(MAX_LINE); 20],
            upstream: None,
            restarts: 3,
            gave_up: true,
        };
        log.report(&sandbox, report.clone()).await;
        let events = log.next_batch(10, usize::MAX);
        assert!(sdp_protocol::encoded_len(&events[0]) <= crate::events::MAX_EVENT_BYTES);
        let RuntimeBody::Instance(sent) = &events[0].body else {
            panic!("not a report: {:?}", events[0].body)
        };
        assert_eq!(sent.last_lines.len(), 1);
        assert!(sent.last_lines[0].contains("left out"));
        let without_lines = InstanceReport {
            last_lines: sent.last_lines.clone(),
            ..report
        };
        assert_eq!(*sent, without_lines);
    }

    #[tokio::test]
    async fn a_sandbox_torn_down_takes_nothing_more_and_writes_nothing() {
        let state = tempfile::tempdir().unwrap();
        let sandbox = id(1);
        let folder = state.path().join(sandbox.as_str());
        std::fs::create_dir_all(&folder).unwrap();
        let service = ServiceName::parse("orders").unwrap();
        let log = RuntimeLog::new(state.path());
        log.system(&sandbox, &service, "before".into()).await;
        log.close(&sandbox);
        // Late: a follower's last line, the control plane's acknowledgement, a start.
        log.system(&sandbox, &service, "late".into()).await;
        log.ack(&sandbox, 1);
        log.begin(&sandbox, &service);
        assert!(log.next_batch(10, usize::MAX).is_empty());
        assert!(log.saved.lock().unwrap().is_empty());
        assert!(!folder.join(SAVED).exists());
        assert!(log.queue.pending().is_empty());
    }

    #[tokio::test]
    async fn the_numbering_and_the_acknowledged_positions_outlive_the_agent() {
        let state = tempfile::tempdir().unwrap();
        let sandbox = id(1);
        std::fs::create_dir_all(state.path().join(sandbox.as_str())).unwrap();
        let service = ServiceName::parse("orders").unwrap();
        let log = RuntimeLog::new(state.path());
        let generation = log.begin(&sandbox, &service);
        for (i, line) in ["a", "b", "c"].into_iter().enumerate() {
            let mark = Mark {
                source: "orders.stdout".into(),
                generation,
                at: 2 * (i as u64 + 1),
            };
            log.log(
                &sandbox,
                &service,
                LogStream::Stdout,
                line.into(),
                Some(mark),
            )
            .await;
        }
        assert_eq!(lines(&log).len(), 3);
        log.ack(&sandbox, 2);
        drop(log);

        let again = RuntimeLog::new(state.path());
        assert_eq!(again.generation(&sandbox, &service), generation);
        assert_eq!(again.acked_at(&sandbox, "orders.stdout", generation), 4);
        assert_eq!(again.acked_at(&sandbox, "orders.stdout", generation + 1), 0);
        again.system(&sandbox, &service, "after".into()).await;
        assert_eq!(lines(&again), [(3, "after".to_owned())]);
    }
}
