//! Deployment logs: `<data>/logs/<deploymentId>.log`, append-only, one JSON frame a line, in
//! exactly the form `/ws/deployments/{id}` sends (SPEC §11), and a live fan-out to viewers.
//!
//! Each event is appended to the file before it is fanned out, so the file is the whole
//! truth: a viewer that falls behind the bounded live channel catches up from the file, and
//! the agent is never slowed by a viewer. Files are read a chunk at a time ([`LogReader`]),
//! never whole, so a viewer costs the same memory whatever the size of the log.
//!
//! A log is cut at `max_log_size`: the first line of output that would pass it is replaced
//! by a notice saying so, and later output lines (a build's or service's stdout and stderr)
//! are acknowledged but neither stored nor fanned out. Steps, system lines and the end frame
//! are still stored, so the deployment goes on and ends as usual. From the cut on, the `seq`s
//! in the file have gaps.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use prometheus_client::metrics::counter::Counter;
use sdp_config::ByteSize;
use serde::Deserialize;
use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio::sync::broadcast;

/// Live batches kept for slow viewers before they have to read the file.
const LIVE_BUFFER: usize = 128;

/// Every this many stored lines, one goes into a log's index.
const INDEX_EVERY: u64 = 64;

/// About how much of a file a reader takes at a time.
const READ_CHUNK: usize = 64 * 1024;

/// How the notice of a cut log begins.
const CUT_NOTICE: &str = "the log was cut here";

pub use sdp_api::Frame;

/// A line a build or a service printed: what a cut log drops.
fn is_output(frame: &Frame) -> bool {
    matches!(frame, Frame::Log { stream, .. } if stream == "stdout" || stream == "stderr")
}

fn is_cut_notice(frame: &Frame) -> bool {
    matches!(frame, Frame::Log { service: None, stream, line, .. }
        if stream == "system" && line.starts_with(CUT_NOTICE))
}

/// A stored frame, serialized once for every viewer: cloning its text is a reference count.
#[derive(Debug)]
pub struct Line {
    pub seq: u64,
    pub json: Utf8Bytes,
    pub end: bool,
}

struct Writer {
    /// The highest `seq` taken, stored or (past the cut) dropped: what is acknowledged.
    last_seq: u64,
    ended: bool,
    /// The `seq` and offset of every [`INDEX_EVERY`]th stored line: a viewer catching up
    /// seeks to the nearest one before the line it needs, not to the start of the file.
    index: Vec<(u64, u64)>,
    /// Lines stored.
    lines: u64,
    /// The file's length.
    len: u64,
    /// The log reached its cap and said so: output lines are dropped from here on.
    cut: bool,
    /// Loaded from a cut file after a restart: the agent resumes after the last line it had
    /// acknowledged, and lines dropped before the restart leave a gap, accepted once.
    resume_gap: bool,
    /// A plain file: appending a few lines lands in the page cache at once, so it is written
    /// in place rather than through the blocking pool, which would add a hop to every event.
    file: Option<std::fs::File>,
}

impl Writer {
    /// Counts a line of `bytes` (newline included) stored at the end of the file.
    fn stored(&mut self, seq: u64, bytes: u64) {
        if self.lines.is_multiple_of(INDEX_EVERY) {
            self.index.push((seq, self.len));
        }
        self.lines += 1;
        self.len += bytes;
    }

    /// Where to start reading for the lines from `seq` on.
    fn offset_before(&self, seq: u64) -> u64 {
        match self.index.partition_point(|(s, _)| *s <= seq) {
            0 => 0,
            i => self.index[i - 1].1,
        }
    }
}

struct Stream {
    writer: tokio::sync::Mutex<Writer>,
    /// Frames go out in the batches they were stored in: a viewer wakes once per batch, not
    /// once per line.
    live: broadcast::Sender<Arc<Vec<Line>>>,
}

pub struct Logs {
    dir: PathBuf,
    max_size: ByteSize,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    /// Lines written to any log, for `/metrics`.
    stored_lines: Counter,
}

/// What a reader needs of a line.
#[derive(Deserialize)]
struct Head {
    seq: u64,
    #[serde(rename = "type")]
    kind: String,
}

impl Logs {
    /// Logs under `dir`, each cut past `max_size`; every line stored counts in
    /// `stored_lines`.
    pub fn new(dir: PathBuf, max_size: ByteSize, stored_lines: Counter) -> std::io::Result<Logs> {
        std::fs::create_dir_all(&dir)?;
        Ok(Logs {
            dir,
            max_size,
            streams: Mutex::default(),
            stored_lines,
        })
    }

    pub fn path(&self, deployment: &str) -> PathBuf {
        self.dir.join(format!("{deployment}.log"))
    }

    fn stream(&self, deployment: &str) -> Arc<Stream> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .entry(deployment.to_owned())
            .or_insert_with(|| {
                Arc::new(Stream {
                    writer: tokio::sync::Mutex::new(Writer {
                        last_seq: 0,
                        ended: false,
                        index: Vec::new(),
                        lines: 0,
                        len: 0,
                        cut: false,
                        resume_gap: false,
                        file: None,
                    }),
                    live: broadcast::channel(LIVE_BUFFER).0,
                })
            })
            .clone()
    }

    /// The last `seq` the log holds (or dropped past its cut): the agent's next event is the
    /// one after.
    pub async fn last_seq(&self, deployment: &str) -> std::io::Result<u64> {
        let stream = self.stream(deployment);
        let mut writer = stream.writer.lock().await;
        self.open(deployment, &mut writer).await?;
        let last = writer.last_seq;
        if writer.ended {
            drop(writer);
            self.forget_if(deployment, &stream);
        }
        Ok(last)
    }

    /// Closes what is open of a deployment's log (its file, its live channel, once its
    /// viewers are gone), for a log that will take nothing more.
    pub fn forget(&self, deployment: &str) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.remove(deployment);
    }

    /// Drops the entry of `deployment` when it is still `stream`.
    fn forget_if(&self, deployment: &str, stream: &Arc<Stream>) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if streams
            .get(deployment)
            .is_some_and(|s| Arc::ptr_eq(s, stream))
        {
            streams.remove(deployment);
        }
    }

    /// Opens the file on first use, learning from it where the log stands (after a restart).
    async fn open(&self, deployment: &str, writer: &mut Writer) -> std::io::Result<()> {
        if writer.file.is_some() {
            return Ok(());
        }
        let path = self.path(deployment);
        // Learn the index from the file itself, a chunk at a time, and cut off whatever a
        // crash left after the last whole, in-order line, so that new lines never glue onto
        // it. The `seq`s go up by one, except past the cut.
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                let file_len = file.metadata().await?.len();
                let mut reader = BufReader::with_capacity(READ_CHUNK, file);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = reader.read_until(b'\n', &mut line).await?;
                    if n == 0 || line.last() != Some(&b'\n') {
                        break;
                    }
                    let Ok(frame) = serde_json::from_slice::<Frame>(&line[..n - 1]) else {
                        break;
                    };
                    let seq = frame.seq();
                    let in_order =
                        seq == writer.last_seq + 1 || (writer.cut && seq > writer.last_seq);
                    if !in_order {
                        break;
                    }
                    writer.cut |= is_cut_notice(&frame);
                    writer.ended = matches!(frame, Frame::End { .. });
                    writer.last_seq = seq;
                    writer.stored(seq, n as u64);
                }
                if writer.len < file_len {
                    tracing::warn!(%deployment, kept = writer.len, dropped = file_len - writer.len, "log file ended in a broken line; cut it off");
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(writer.len)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        writer.resume_gap = writer.cut && !writer.ended;
        writer.file = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?,
        );
        Ok(())
    }

    fn cut_notice(&self) -> String {
        format!(
            "{CUT_NOTICE}: it reached max_log_size ({}); later output lines are dropped, while steps and the end are still recorded",
            self.max_size
        )
    }

    async fn write(stream: &Stream, writer: &mut Writer, frame: &Frame) -> std::io::Result<()> {
        let json = serde_json::to_string(frame).expect("frames serialize");
        let len = writer.len;
        let file = writer.file.as_mut().expect("opened before writing");
        if let Err(e) = file.write_all(format!("{json}\n").as_bytes()) {
            // Leave no half line behind for the next one to glue onto.
            let _ = file.set_len(len);
            if let Frame::End { .. } = frame {
                // The deployment has ended all the same (its row says how): later events of
                // it are acknowledged and dropped, and live viewers hear the end.
                writer.ended = true;
                let _ = stream.live.send(Arc::new(vec![Line {
                    seq: frame.seq(),
                    json: json.into(),
                    end: true,
                }]));
            }
            return Err(e);
        }
        writer.stored(frame.seq(), json.len() as u64 + 1);
        writer.last_seq = frame.seq();
        let end = matches!(frame, Frame::End { .. });
        writer.ended = end;
        // No viewer is fine; a slow one lags and reads the file.
        let _ = stream.live.send(Arc::new(vec![Line {
            seq: frame.seq(),
            json: json.into(),
            end,
        }]));
        Ok(())
    }

    /// Appends a run of one deployment's events, whose `seq`s the agent chose, in one write.
    /// Returns the `seq` up to which the log now holds them, or dropped them past its cap (to
    /// acknowledge), and which of `frames` were stored now (the others were stored before,
    /// or dropped, or the log has ended, or an earlier event is missing).
    pub async fn append_agent(
        &self,
        deployment: &str,
        frames: &[Frame],
    ) -> std::io::Result<(Option<u64>, Vec<usize>)> {
        let stream = self.stream(deployment);
        let mut writer = stream.writer.lock().await;
        self.open(deployment, &mut writer).await?;
        let mut buffer = String::new();
        let mut staged = Vec::new();
        let mut ack = None;
        let mut next = writer.last_seq + 1;
        // Changed on the writer only once the write succeeded.
        let mut cut = writer.cut;
        let mut resume_gap = writer.resume_gap;
        for (i, frame) in frames.iter().enumerate() {
            let seq = frame.seq();
            // Stored before (sent again after a reconnect), or the log has ended and the
            // event is dropped: either way the agent may forget it.
            if seq < next || writer.ended {
                ack = Some(ack.unwrap_or(0).max(seq));
                continue;
            }
            if seq != next {
                if !resume_gap {
                    tracing::warn!(%deployment, seq, expected = next, "event out of order; waiting for the missing ones");
                    break;
                }
                tracing::info!(%deployment, seq, expected = next, "a cut log resumes after lines dropped before the restart");
            }
            resume_gap = false;
            next = seq + 1;
            if is_output(frame) && cut {
                continue;
            }
            let mut json = serde_json::to_string(frame).expect("frames serialize");
            let size = writer.len + (buffer.len() + json.len() + 1) as u64;
            if let Frame::Log { ts, .. } = frame
                && is_output(frame)
                && size > self.max_size.get()
            {
                cut = true;
                tracing::info!(%deployment, seq, max_log_size = %self.max_size, "deployment log cut");
                let notice = Frame::Log {
                    seq,
                    ts: ts.clone(),
                    service: None,
                    stream: "system".into(),
                    line: self.cut_notice(),
                };
                json = serde_json::to_string(&notice).expect("frames serialize");
            }
            buffer.push_str(&json);
            buffer.push('\n');
            staged.push((i, seq, json));
        }
        let taken = next - 1;
        if writer.ended {
            // Events of an ended log (an agent's outcome after a teardown cancelled its
            // deployment): acknowledged, and the stream, with the file it opened, is not kept.
            drop(writer);
            self.forget_if(deployment, &stream);
            return Ok((ack, Vec::new()));
        }
        if taken == writer.last_seq {
            return Ok((ack, Vec::new()));
        }
        if !staged.is_empty() {
            let len = writer.len;
            let file = writer.file.as_mut().expect("opened before writing");
            if let Err(e) = file.write_all(buffer.as_bytes()) {
                let _ = file.set_len(len);
                return Err(e);
            }
        }
        for (_, seq, json) in &staged {
            writer.stored(*seq, json.len() as u64 + 1);
        }
        self.stored_lines.inc_by(staged.len() as u64);
        writer.last_seq = taken;
        writer.cut = cut;
        writer.resume_gap = resume_gap;
        let stored = staged.iter().map(|(i, ..)| *i).collect();
        let lines: Vec<Line> = staged
            .into_iter()
            .map(|(_, seq, json)| Line {
                seq,
                json: json.into(),
                end: false,
            })
            .collect();
        if !lines.is_empty() {
            // No viewer is fine; a slow one lags and reads the file.
            let _ = stream.live.send(Arc::new(lines));
        }
        Ok((Some(taken), stored))
    }

    /// Appends a frame of the control plane's own, with the next `seq`; `None` if the log
    /// has already ended. These are never dropped, cut or not: there are a few per
    /// deployment, and they say how it ended.
    pub async fn append_own(
        &self,
        deployment: &str,
        make: impl FnOnce(u64) -> Frame,
    ) -> std::io::Result<Option<u64>> {
        let stream = self.stream(deployment);
        let mut writer = stream.writer.lock().await;
        self.open(deployment, &mut writer).await?;
        if writer.ended {
            // Opened again for nothing (a deployment failing after its sandbox's end had
            // cancelled it): not kept, or its file would stay open for good.
            drop(writer);
            self.forget_if(deployment, &stream);
            return Ok(None);
        }
        let frame = make(writer.last_seq + 1);
        Self::write(&stream, &mut writer, &frame).await?;
        self.stored_lines.inc();
        let seq = frame.seq();
        if writer.ended {
            drop(writer);
            // Ended logs are only read from now on; the live channel closes with the stream
            // once its viewers are gone.
            self.forget_if(deployment, &stream);
        }
        Ok(Some(seq))
    }

    /// The live frames of a deployment from now on. Subscribe before reading the file, so
    /// that nothing falls between the two.
    pub fn subscribe(&self, deployment: &str) -> broadcast::Receiver<Arc<Vec<Line>>> {
        self.stream(deployment).live.subscribe()
    }

    /// A reader of the stored frames with `seq >= from`, as they are now.
    pub async fn reader(&self, deployment: &str, from: u64) -> std::io::Result<LogReader> {
        let active = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(deployment)
            .cloned();
        let (start, end) = match active {
            Some(stream) => {
                let mut writer = stream.writer.lock().await;
                self.open(deployment, &mut writer).await?;
                // Up to the length now: a line being appended meanwhile is not read half.
                let range = (from <= writer.last_seq)
                    .then(|| (writer.offset_before(from), Some(writer.len)));
                let ended = writer.ended;
                drop(writer);
                if ended {
                    // A viewer's subscription made this entry for a log that had ended: the
                    // file it opened is not kept.
                    self.forget_if(deployment, &stream);
                }
                match range {
                    Some(range) => range,
                    None => return Ok(LogReader::empty(from)),
                }
            }
            // An ended log, or one not written since a restart: read to its end.
            None => (0, None),
        };
        let mut file = match tokio::fs::File::open(self.path(deployment)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LogReader::empty(from));
            }
            Err(e) => return Err(e),
        };
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start)).await?;
        }
        let limit = end.map_or(u64::MAX, |end| end - start);
        Ok(LogReader::of_files(vec![(file, limit)], from))
    }
}

/// A log that viewers follow: its stored frames from a `seq` on, then the live ones.
/// Deployment logs and sandboxes' runtime logs both are, so one WebSocket loop serves both.
#[async_trait::async_trait]
pub trait FrameLog: Send + Sync {
    async fn reader(&self, id: &str, from: u64) -> std::io::Result<LogReader>;
    /// The live frames from now on; subscribe before reading, so nothing falls between.
    fn subscribe(&self, id: &str) -> broadcast::Receiver<Arc<Vec<Line>>>;
}

#[async_trait::async_trait]
impl FrameLog for Logs {
    async fn reader(&self, id: &str, from: u64) -> std::io::Result<LogReader> {
        Logs::reader(self, id, from).await
    }

    fn subscribe(&self, id: &str) -> broadcast::Receiver<Arc<Vec<Line>>> {
        Logs::subscribe(self, id)
    }
}

/// Reads a log's stored frames from a `seq` on, about [`READ_CHUNK`] at a time.
pub struct LogReader {
    /// `None` once read to the end.
    lines: Option<tokio::io::Take<BufReader<tokio::fs::File>>>,
    /// Files to read after this one, in order (a rotated log: the older file first).
    then: Vec<tokio::io::Take<BufReader<tokio::fs::File>>>,
    from: u64,
    buf: Vec<u8>,
}

impl LogReader {
    fn empty(from: u64) -> Self {
        LogReader {
            lines: None,
            then: Vec::new(),
            from,
            buf: Vec::new(),
        }
    }

    /// A reader of open files, one after the other, each up to its length as given (so a
    /// line being appended meanwhile is not read half).
    pub(crate) fn of_files(files: Vec<(tokio::fs::File, u64)>, from: u64) -> Self {
        let mut files: Vec<_> = files
            .into_iter()
            .map(|(file, len)| BufReader::with_capacity(READ_CHUNK, file).take(len))
            .collect();
        files.reverse();
        LogReader {
            lines: files.pop(),
            then: files,
            from,
            buf: Vec::new(),
        }
    }

    /// The next frames, in order; none at the end.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<Line>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(reader) = &mut self.lines {
            if bytes >= READ_CHUNK && !out.is_empty() {
                break;
            }
            self.buf.clear();
            let n = reader.read_until(b'\n', &mut self.buf).await?;
            if n == 0 {
                self.lines = self.then.pop();
                continue;
            }
            bytes += n;
            // A line cut short by a crash mid-write is skipped, not fatal.
            let Some(raw) = self.buf.strip_suffix(b"\n") else {
                continue;
            };
            let Ok(head) = serde_json::from_slice::<Head>(raw) else {
                continue;
            };
            if head.seq < self.from {
                continue;
            }
            out.push(Line {
                seq: head.seq,
                end: head.kind == "end",
                json: String::from_utf8_lossy(raw).into_owned().into(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: ByteSize = ByteSize::mib(64);

    fn log(seq: u64) -> Frame {
        Frame::Log {
            seq,
            ts: "2026-11-26T12:00:00Z".into(),
            service: Some("orders".into()),
            stream: "stdout".into(),
            line: format!("line {seq}"),
        }
    }

    fn step(seq: u64) -> Frame {
        Frame::Step {
            seq,
            ts: "2026-11-26T12:00:00Z".into(),
            service: Some("orders".into()),
            step: "building".into(),
            state: "done".into(),
        }
    }

    fn end(seq: u64) -> Frame {
        Frame::End {
            seq,
            ts: "2026-11-26T12:00:01Z".into(),
            state: "ready".into(),
            error: None,
        }
    }

    /// Every stored frame from `from` on, read batch by batch.
    async fn read(logs: &Logs, deployment: &str, from: u64) -> Vec<Line> {
        let mut reader = logs.reader(deployment, from).await.unwrap();
        let mut all = Vec::new();
        loop {
            let batch = reader.next_batch().await.unwrap();
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }

    fn seqs(lines: &[Line]) -> Vec<u64> {
        lines.iter().map(|l| l.seq).collect()
    }

    #[tokio::test]
    async fn a_log_is_read_back_from_any_seq_and_knows_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_owned(), CAP, Counter::default()).unwrap();
        let (ack, stored) = logs
            .append_agent("d", &[log(1), log(2), log(3)])
            .await
            .unwrap();
        assert_eq!((ack, stored), (Some(3), vec![0, 1, 2]));
        // Sent again after a reconnect, with one new: only the new one is stored.
        let (ack, stored) = logs
            .append_agent("d", &[log(2), log(3), log(4)])
            .await
            .unwrap();
        assert_eq!((ack, stored), (Some(4), vec![2]));
        // A gap is not stored and not acknowledged.
        let (ack, stored) = logs.append_agent("d", &[log(6)]).await.unwrap();
        assert_eq!((ack, stored), (None, vec![]));
        let seq = logs.append_own("d", end).await.unwrap();
        assert_eq!(seq, Some(5));

        let ends = |lines: Vec<Line>| lines.iter().map(|l| (l.seq, l.end)).collect::<Vec<_>>();
        assert_eq!(
            ends(read(&logs, "d", 3).await),
            [(3, false), (4, false), (5, true)]
        );
        // A new server reads the file alone.
        let again = Logs::new(dir.path().to_owned(), CAP, Counter::default()).unwrap();
        assert_eq!(ends(read(&again, "d", 5).await), [(5, true)]);
        let line: Frame = serde_json::from_str(&read(&again, "d", 2).await[0].json).unwrap();
        assert_eq!(line, log(2));
    }

    #[tokio::test]
    async fn an_ended_log_written_to_again_keeps_no_file_open() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_owned(), CAP, Counter::default()).unwrap();
        assert_eq!(logs.append_own("d", end).await.unwrap(), Some(1));
        // A deployment failing after its sandbox's end cancelled it, a gap asked about: the
        // log takes nothing, and is not kept open for it.
        assert_eq!(logs.append_own("d", end).await.unwrap(), None);
        assert_eq!(logs.last_seq("d").await.unwrap(), 1);
        assert_eq!(
            logs.append_agent("d", &[log(2)]).await.unwrap(),
            (Some(2), vec![])
        );
        assert!(
            logs.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty(),
            "an ended log is still open"
        );
    }

    #[tokio::test]
    async fn a_broken_last_line_is_cut_off_before_new_lines_are_appended() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_owned(), CAP, Counter::default()).unwrap();
        logs.append_agent("c", &[log(1), log(2)]).await.unwrap();
        let path = logs.path("c");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"type\":\"log\",\"seq\":3,\"ts\":\"2026");
        std::fs::write(&path, text).unwrap();

        let restarted = Logs::new(dir.path().to_owned(), CAP, Counter::default()).unwrap();
        let (ack, stored) = restarted.append_agent("c", &[log(3)]).await.unwrap();
        assert_eq!((ack, stored), (Some(3), vec![0]));
        let lines = read(&restarted, "c", 1).await;
        assert_eq!(seqs(&lines), [1, 2, 3]);
        for line in &lines {
            serde_json::from_str::<Frame>(&line.json).unwrap();
        }
    }

    #[tokio::test]
    async fn a_running_log_is_read_from_its_index_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_owned(), CAP, Counter::default()).unwrap();
        let frames: Vec<Frame> = (1..=5000).map(log).collect();
        for run in frames.chunks(700) {
            logs.append_agent("r", run).await.unwrap();
        }
        let tail = read(&logs, "r", 4242).await;
        assert_eq!(seqs(&tail), (4242..=5000).collect::<Vec<_>>());
        let frame: Frame = serde_json::from_str(&tail[0].json).unwrap();
        assert_eq!(frame, log(4242));
        assert!(read(&logs, "r", 5001).await.is_empty());

        // The file is well over one chunk; each batch holds about one.
        let mut reader = logs.reader("r", 1).await.unwrap();
        let mut batches = 0;
        loop {
            let batch = reader.next_batch().await.unwrap();
            if batch.is_empty() {
                break;
            }
            let bytes: usize = batch.iter().map(|l| l.json.len() + 1).sum();
            assert!(bytes < READ_CHUNK + 1024, "{bytes}");
            batches += 1;
        }
        assert!(batches > 3, "{batches}");
    }

    #[tokio::test]
    async fn past_its_cap_a_log_keeps_a_notice_its_steps_and_its_end_and_acknowledges_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let cap = ByteSize::kib(64);
        let logs = Logs::new(dir.path().to_owned(), cap, Counter::default()).unwrap();
        let mut live = logs.subscribe("x");
        // About 130 bytes a line: the cap falls within the first thousand lines.
        let mut frames: Vec<Frame> = (1..=3000).map(log).collect();
        frames[1999] = step(2000);
        for run in frames.chunks(512) {
            let (ack, _) = logs.append_agent("x", run).await.unwrap();
            assert_eq!(ack, Some(run.last().unwrap().seq()));
        }
        assert_eq!(logs.append_own("x", end).await.unwrap(), Some(3001));

        let size = std::fs::metadata(logs.path("x")).unwrap().len();
        assert!(size > cap.get() - 1024 && size < cap.get() + 1024, "{size}");
        let lines = read(&logs, "x", 1).await;
        let frames: Vec<Frame> = lines
            .iter()
            .map(|l| serde_json::from_str(&l.json).unwrap())
            .collect();
        let notices: Vec<&Frame> = frames.iter().filter(|f| is_cut_notice(f)).collect();
        assert_eq!(notices.len(), 1, "{notices:?}");
        let Frame::Log {
            line, seq: cut_at, ..
        } = notices[0]
        else {
            unreachable!()
        };
        assert!(line.contains("64KiB"), "{line}");
        // Before the notice every line; after it, only the step and the end.
        let after: Vec<u64> = seqs(&lines).into_iter().filter(|s| s > cut_at).collect();
        assert_eq!(after, [2000, 3001]);
        assert_eq!(
            seqs(&lines[..lines.len() - 2]),
            (1..=*cut_at).collect::<Vec<_>>()
        );
        assert!(lines.last().unwrap().end);
        // A viewer reading from a dropped line goes on from the next one stored.
        assert_eq!(seqs(&read(&logs, "x", cut_at + 1).await), [2000, 3001]);

        // Viewers saw the same, never a dropped line.
        let mut seen = Vec::new();
        while let Ok(batch) = live.try_recv() {
            seen.extend(batch.iter().map(|l| l.seq));
        }
        assert_eq!(seen, seqs(&lines));
    }

    #[tokio::test]
    async fn a_cut_log_resumes_after_a_restart_past_the_lines_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cap = ByteSize::kib(64);
        let logs = Logs::new(dir.path().to_owned(), cap, Counter::default()).unwrap();
        let frames: Vec<Frame> = (1..=1500).map(log).collect();
        let (ack, _) = logs.append_agent("y", &frames).await.unwrap();
        assert_eq!(ack, Some(1500));
        let size = std::fs::metadata(logs.path("y")).unwrap().len();

        // The agent forgot everything up to 1500; the new server's file ends before that.
        let restarted = Logs::new(dir.path().to_owned(), cap, Counter::default()).unwrap();
        let (ack, stored) = restarted
            .append_agent("y", &[log(1501), step(1502)])
            .await
            .unwrap();
        assert_eq!((ack, stored), (Some(1502), vec![1]));
        // Once only: a later gap is a missing event again.
        let (ack, _) = restarted.append_agent("y", &[step(1504)]).await.unwrap();
        assert_eq!(ack, None);
        // Still cut: no second notice, no output line.
        restarted.append_agent("y", &[log(1503)]).await.unwrap();
        let grown = std::fs::metadata(restarted.path("y")).unwrap().len() - size;
        assert!(grown < 200, "{grown}");
        let lines = read(&restarted, "y", 1).await;
        assert_eq!(lines.last().unwrap().seq, 1502);
    }
}
