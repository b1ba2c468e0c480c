//! Sandboxes' runtime logs (SPEC §3: service output after `ready`):
//! `<data>/runtime/<sandboxId>.log`, one JSON frame a line in the form `/ws/sandboxes/{id}/logs`
//! sends (the deployment log's `log` frames, and `instance` frames for state changes), with a
//! live fan-out to viewers.
//!
//! Unlike a deployment's log, a runtime log has no end while its sandbox lives, so it is
//! bounded by rotation, not cut: once the file would pass `max_runtime_log_size` it is
//! renamed `<sandboxId>.log.1` (replacing the one before) and a new file begins, so at most
//! about twice that is kept. Frames are numbered here (`seq`, one more per frame, across
//! rotation and restarts: a new run learns the last from the files' last lines); the agent's
//! own `seq` only decides what is a duplicate (see `lifecycle/runtime.rs`). Both files go when
//! the sandbox ends, and live viewers are told with an `end` frame.
//!
//! Readers go through both files in order ([`LogReader`]), scanning from the start of the
//! older one: with the size bounded, no index is kept.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use sdp_config::ByteSize;
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::logs::{Frame, FrameLog, Line, LogReader};

/// Live batches kept for slow viewers before they have to read the files.
const LIVE_BUFFER: usize = 128;

/// Sandboxes whose logs were removed, remembered at most: a write or a reader that found the
/// sandbox live a moment before it ended must not bring its file back (and hold it open).
/// Anything later finds the sandbox ended in SQLite and never gets here.
const REMOVED_KEPT: usize = 4096;

/// How much of a file's end is read to find its last line: more than the longest line (log
/// lines are cut at 8 KiB encoded by the agent).
const TAIL: u64 = 64 * 1024;

struct Writer {
    file: Option<std::fs::File>,
    /// The log was removed while this stream was in use: it takes nothing more.
    removed: bool,
    /// The current file's length.
    len: u64,
    /// The `seq` of the last frame stored.
    last_seq: u64,
}

struct Stream {
    writer: tokio::sync::Mutex<Writer>,
    live: broadcast::Sender<Arc<Vec<Line>>>,
}

pub struct RuntimeLogs {
    dir: PathBuf,
    max_size: ByteSize,
    streams: Mutex<Streams>,
    /// Lines written to any runtime log, for `/metrics`.
    stored_lines: Counter,
}

#[derive(Default)]
struct Streams {
    live: HashMap<String, Arc<Stream>>,
    /// Removed lately: the state its sandbox ended in and its last `seq`, oldest first.
    removed: HashMap<String, (String, u64)>,
    removed_order: VecDeque<String>,
}

impl Streams {
    fn forget(&mut self, sandbox: &str, state: &str, last_seq: u64) {
        if self
            .removed
            .insert(sandbox.to_owned(), (state.to_owned(), last_seq))
            .is_none()
        {
            self.removed_order.push_back(sandbox.to_owned());
        }
        while self.removed_order.len() > REMOVED_KEPT {
            if let Some(oldest) = self.removed_order.pop_front() {
                self.removed.remove(&oldest);
            }
        }
    }
}

/// The frame that tells viewers a sandbox's log is over.
fn end_line(state: &str, seq: u64) -> Line {
    let end = Frame::End {
        seq,
        ts: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        state: state.to_owned(),
        error: None,
    };
    Line {
        seq,
        json: serde_json::to_string(&end)
            .expect("frames serialize")
            .into(),
        end: true,
    }
}

#[derive(Deserialize)]
struct Head {
    seq: u64,
}

/// The length of the file's whole lines and the `seq` of the last one; a broken last line (a
/// crash mid-write) is cut off when `repair`, so that the next line does not glue onto it.
fn last_line(path: &Path, repair: bool) -> std::io::Result<(u64, Option<u64>)> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(repair)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, None)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let Some(end) = tail.iter().rposition(|b| *b == b'\n') else {
        if repair && start == 0 && len > 0 {
            file.set_len(0)?;
        }
        return Ok((if start == 0 { 0 } else { len }, None));
    };
    let whole = start + end as u64 + 1;
    if repair && whole < len {
        tracing::warn!(path = %path.display(), dropped = len - whole, "runtime log ended in a broken line; cut it off");
        file.set_len(whole)?;
    }
    let begin = tail[..end]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let seq = serde_json::from_slice::<Head>(&tail[begin..end])
        .ok()
        .map(|h| h.seq);
    Ok((whole, seq))
}

impl RuntimeLogs {
    /// Runtime logs under `dir`, each rotated past `max_size`; every line stored counts in
    /// `stored_lines`.
    pub fn new(
        dir: PathBuf,
        max_size: ByteSize,
        stored_lines: Counter,
    ) -> std::io::Result<RuntimeLogs> {
        std::fs::create_dir_all(&dir)?;
        Ok(RuntimeLogs {
            dir,
            max_size,
            streams: Mutex::default(),
            stored_lines,
        })
    }

    pub fn path(&self, sandbox: &str) -> PathBuf {
        self.dir.join(format!("{sandbox}.log"))
    }

    pub fn rotated_path(&self, sandbox: &str) -> PathBuf {
        self.dir.join(format!("{sandbox}.log.1"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sandbox's stream; none once its log was removed.
    fn stream(&self, sandbox: &str) -> Option<Arc<Stream>> {
        let mut streams = self.lock();
        if streams.removed.contains_key(sandbox) {
            return None;
        }
        let stream = streams
            .live
            .entry(sandbox.to_owned())
            .or_insert_with(|| {
                Arc::new(Stream {
                    writer: tokio::sync::Mutex::new(Writer {
                        file: None,
                        removed: false,
                        len: 0,
                        last_seq: 0,
                    }),
                    live: broadcast::channel(LIVE_BUFFER).0,
                })
            })
            .clone();
        Some(stream)
    }

    /// Opens the current file on first use, learning the last `seq` from it (or, when it is
    /// empty, from the rotated one).
    fn open(&self, sandbox: &str, writer: &mut Writer) -> std::io::Result<()> {
        if writer.file.is_some() {
            return Ok(());
        }
        let path = self.path(sandbox);
        let (len, last) = last_line(&path, true)?;
        let last = match last {
            Some(seq) => Some(seq),
            None => last_line(&self.rotated_path(sandbox), false)?.1,
        };
        writer.len = len;
        writer.last_seq = last.unwrap_or(0);
        writer.file = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?,
        );
        Ok(())
    }

    /// Stores `frames` (their `seq`s are assigned here, in order), rotating the file
    /// whenever the next line would take it past its size (so a file never passes it),
    /// then fans them out. Returns the last `seq` stored.
    /// (Nothing is stored of a sandbox whose log was removed: it has ended.)
    pub async fn append(&self, sandbox: &str, frames: Vec<Frame>) -> std::io::Result<u64> {
        let Some(stream) = self.stream(sandbox) else {
            return Ok(0);
        };
        let mut writer = stream.writer.lock().await;
        if writer.removed {
            return Ok(0);
        }
        self.open(sandbox, &mut writer)?;
        let mut buffer = String::new();
        let mut lines = Vec::with_capacity(frames.len());
        let mut seq = writer.last_seq;
        for frame in frames {
            seq += 1;
            let json = serde_json::to_string(&frame.renumbered(seq)).expect("frames serialize");
            let size = writer.len + (buffer.len() + json.len() + 1) as u64;
            if size > self.max_size.get() && writer.len + buffer.len() as u64 > 0 {
                let stored = (seq - 1) - writer.last_seq;
                self.write(sandbox, &mut writer, &buffer, stored)?;
                // Stored: a failure further on numbers on after them.
                writer.last_seq = seq - 1;
                buffer.clear();
                self.rotate(sandbox, &mut writer)?;
            }
            buffer.push_str(&json);
            buffer.push('\n');
            lines.push(Line {
                seq,
                json: json.into(),
                end: false,
            });
        }
        if lines.is_empty() {
            return Ok(writer.last_seq);
        }
        let stored = seq - writer.last_seq;
        self.write(sandbox, &mut writer, &buffer, stored)?;
        writer.last_seq = seq;
        // No viewer is fine; a slow one lags and reads the files.
        let _ = stream.live.send(Arc::new(lines));
        Ok(seq)
    }

    /// Appends whole lines (`lines` of them) to the current file, or nothing.
    fn write(
        &self,
        sandbox: &str,
        writer: &mut Writer,
        text: &str,
        lines: u64,
    ) -> std::io::Result<()> {
        let len = writer.len;
        let file = writer.file.as_mut().expect("opened before writing");
        if let Err(e) = file.write_all(text.as_bytes()) {
            // Leave no half line behind for the next one to glue onto.
            let _ = file.set_len(len);
            tracing::warn!(%sandbox, error = %e, "cannot write the runtime log");
            return Err(e);
        }
        writer.len += text.len() as u64;
        self.stored_lines.inc_by(lines);
        Ok(())
    }

    /// The current file becomes the rotated one (the one before goes), and a new one begins.
    /// Readers that opened the old files keep reading them; new readers open both under the
    /// writer's lock, so they see no hole.
    fn rotate(&self, sandbox: &str, writer: &mut Writer) -> std::io::Result<()> {
        std::fs::rename(self.path(sandbox), self.rotated_path(sandbox))?;
        writer.file = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(self.path(sandbox))?,
        );
        writer.len = 0;
        tracing::debug!(%sandbox, max_runtime_log_size = %self.max_size, "runtime log rotated");
        Ok(())
    }

    /// Deletes a sandbox's runtime log (its sandbox ended), and tells live viewers with an
    /// `end` frame in `state`.
    pub async fn remove(&self, sandbox: &str, state: &str) -> std::io::Result<()> {
        let stream = {
            let mut streams = self.lock();
            streams.forget(sandbox, state, 0);
            streams.live.remove(sandbox)
        };
        let mut last_seq = 0;
        let guard = match &stream {
            Some(stream) => {
                let mut writer = stream.writer.lock().await;
                writer.file = None;
                writer.removed = true;
                last_seq = writer.last_seq;
                Some(writer)
            }
            None => None,
        };
        self.lock().forget(sandbox, state, last_seq);
        for path in [self.path(sandbox), self.rotated_path(sandbox)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        drop(guard);
        if let Some(stream) = stream {
            let _ = stream
                .live
                .send(Arc::new(vec![end_line(state, last_seq + 1)]));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl FrameLog for RuntimeLogs {
    async fn reader(&self, sandbox: &str, from: u64) -> std::io::Result<LogReader> {
        let Some(stream) = self.stream(sandbox) else {
            return Ok(LogReader::of_files(Vec::new(), from));
        };
        let mut writer = stream.writer.lock().await;
        if writer.removed {
            return Ok(LogReader::of_files(Vec::new(), from));
        }
        self.open(sandbox, &mut writer)?;
        if from > writer.last_seq {
            return Ok(LogReader::of_files(Vec::new(), from));
        }
        // Both opened under the writer's lock: a rotation cannot fall between them.
        let mut files = Vec::new();
        match tokio::fs::File::open(self.rotated_path(sandbox)).await {
            Ok(file) => files.push((file, u64::MAX)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        files.push((tokio::fs::File::open(self.path(sandbox)).await?, writer.len));
        Ok(LogReader::of_files(files, from))
    }

    fn subscribe(&self, sandbox: &str) -> broadcast::Receiver<Arc<Vec<Line>>> {
        if let Some(stream) = self.stream(sandbox) {
            return stream.live.subscribe();
        }
        // Removed: the viewer hears that it is over.
        let (state, last_seq) = self
            .lock()
            .removed
            .get(sandbox)
            .cloned()
            .unwrap_or_else(|| ("deleted".to_owned(), 0));
        let (sender, receiver) = broadcast::channel(1);
        let _ = sender.send(Arc::new(vec![end_line(&state, last_seq + 1)]));
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Frame {
        Frame::Log {
            seq: 0,
            ts: "2026-11-26T12:00:00Z".into(),
            service: Some("orders".into()),
            stream: "stdout".into(),
            line: format!("line {n} {}", "x".repeat(100)),
        }
    }

    async fn seqs(logs: &RuntimeLogs, sandbox: &str, from: u64) -> Vec<u64> {
        let mut reader = logs.reader(sandbox, from).await.unwrap();
        let mut all = Vec::new();
        loop {
            let batch = reader.next_batch().await.unwrap();
            if batch.is_empty() {
                return all;
            }
            all.extend(batch.iter().map(|l| l.seq));
        }
    }

    #[tokio::test]
    async fn a_flooded_runtime_log_rotates_keeps_at_most_two_files_and_numbers_on() {
        let dir = tempfile::tempdir().unwrap();
        let cap = ByteSize::kib(64);
        let logs = RuntimeLogs::new(dir.path().to_owned(), cap, Counter::default()).unwrap();
        for run in 0..100 {
            let frames = (0..50).map(|i| log(run * 50 + i)).collect();
            logs.append("s", frames).await.unwrap();
        }
        let current = std::fs::metadata(logs.path("s")).unwrap().len();
        let rotated = std::fs::metadata(logs.rotated_path("s")).unwrap().len();
        assert!(
            current <= cap.get() && rotated <= cap.get(),
            "{current} {rotated}"
        );
        let kept = seqs(&logs, "s", 1).await;
        assert_eq!(*kept.last().unwrap(), 5000);
        // What is kept has no hole, from the first line of the rotated file on.
        assert_eq!(kept, (kept[0]..=5000).collect::<Vec<_>>());
        assert!(kept[0] > 1, "the oldest lines are gone");

        // A new run numbers on from the files.
        let again = RuntimeLogs::new(dir.path().to_owned(), cap, Counter::default()).unwrap();
        assert_eq!(again.append("s", vec![log(0)]).await.unwrap(), 5001);
        assert_eq!(seqs(&again, "s", 5000).await, [5000, 5001]);
    }

    #[tokio::test]
    async fn a_removed_runtime_log_leaves_no_file_and_ends_its_viewers() {
        let dir = tempfile::tempdir().unwrap();
        let logs =
            RuntimeLogs::new(dir.path().to_owned(), ByteSize::kib(64), Counter::default()).unwrap();
        logs.append("s", vec![log(1), log(2)]).await.unwrap();
        let mut live = logs.subscribe("s");
        logs.remove("s", "deleted").await.unwrap();
        assert!(!logs.path("s").exists());
        let end = live.try_recv().unwrap();
        assert!(end[0].end && end[0].seq == 3, "{:?}", end[0]);

        // Events ingested, or a viewer let in, just before the sandbox ended: they bring no
        // file back, hold none open, and a late viewer hears the end.
        assert_eq!(logs.append("s", vec![log(3)]).await.unwrap(), 0);
        assert!(seqs(&logs, "s", 1).await.is_empty());
        assert!(!logs.path("s").exists());
        assert!(logs.lock().live.is_empty());
        let late = logs.subscribe("s").try_recv().unwrap();
        assert!(late[0].end && late[0].seq == 3, "{:?}", late[0]);
    }

    #[tokio::test]
    async fn a_broken_last_line_is_cut_off_and_numbering_goes_on_after_the_last_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let logs =
            RuntimeLogs::new(dir.path().to_owned(), ByteSize::kib(64), Counter::default()).unwrap();
        logs.append("s", vec![log(1), log(2)]).await.unwrap();
        let mut text = std::fs::read_to_string(logs.path("s")).unwrap();
        text.push_str("{\"type\":\"log\",\"seq\":3,\"ts");
        std::fs::write(logs.path("s"), text).unwrap();
        let again =
            RuntimeLogs::new(dir.path().to_owned(), ByteSize::kib(64), Counter::default()).unwrap();
        assert_eq!(again.append("s", vec![log(3)]).await.unwrap(), 3);
        assert_eq!(seqs(&again, "s", 1).await, [1, 2, 3]);
    }
}
