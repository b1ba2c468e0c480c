//! Deployment logs: `<data>/logs/<deploymentId>.log`, append-only, one JSON frame a line, in
//! exactly the form `/ws/deployments/{id}` sends (SPEC §11), and a live fan-out to viewers.
//!
//! Each event is appended to the file before it is fanned out, so the file is the whole
//! truth: a viewer that falls behind the bounded live channel catches up from the file, and
//! the agent is never slowed by a viewer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};
use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio::sync::broadcast;

/// Live batches kept for slow viewers before they have to read the file.
const LIVE_BUFFER: usize = 128;

/// One line of a log file and one frame of the WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    Log {
        seq: u64,
        ts: String,
        service: Option<String>,
        stream: String,
        line: String,
    },
    Step {
        seq: u64,
        ts: String,
        service: Option<String>,
        step: String,
        state: String,
    },
    /// The last frame: the deployment's final state.
    End {
        seq: u64,
        ts: String,
        state: String,
        error: Option<String>,
    },
}

impl Frame {
    pub fn seq(&self) -> u64 {
        match self {
            Frame::Log { seq, .. } | Frame::Step { seq, .. } | Frame::End { seq, .. } => *seq,
        }
    }
}

/// A stored frame, serialized once for every viewer: cloning its text is a reference count.
#[derive(Debug)]
pub struct Line {
    pub seq: u64,
    pub json: Utf8Bytes,
    pub end: bool,
}

struct Writer {
    last_seq: u64,
    ended: bool,
    /// Where each line starts: the line of `seq` n at `offsets[n - 1]`. A viewer catching up
    /// reads from there, not the whole file again.
    offsets: Vec<u64>,
    /// The file's length.
    len: u64,
    /// A plain file: appending a few lines lands in the page cache at once, so it is written
    /// in place rather than through the blocking pool, which would add a hop to every event.
    file: Option<std::fs::File>,
}

struct Stream {
    writer: tokio::sync::Mutex<Writer>,
    /// Frames go out in the batches they were stored in: a viewer wakes once per batch, not
    /// once per line.
    live: broadcast::Sender<Arc<Vec<Line>>>,
}

pub struct Logs {
    dir: PathBuf,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
}

/// How an end frame's line starts: the frame's tag is serialized first.
const END_PREFIX: &str = "{\"type\":\"end\"";

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
    #[serde(rename = "type")]
    kind: String,
}

impl Logs {
    pub fn new(dir: PathBuf) -> std::io::Result<Logs> {
        std::fs::create_dir_all(&dir)?;
        Ok(Logs {
            dir,
            streams: Mutex::default(),
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
                        offsets: Vec::new(),
                        len: 0,
                        file: None,
                    }),
                    live: broadcast::channel(LIVE_BUFFER).0,
                })
            })
            .clone()
    }

    /// Opens the file on first use, learning from it where the log stands (after a restart).
    async fn open(&self, deployment: &str, writer: &mut Writer) -> std::io::Result<()> {
        if writer.file.is_some() {
            return Ok(());
        }
        let path = self.path(deployment);
        // Learn each line's offset from the file itself, and cut off whatever a crash left
        // after the last whole, in-order line, so that new lines never glue onto it.
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut at = 0usize;
        while let Some(newline) = bytes[at..].iter().position(|b| *b == b'\n') {
            let line = &bytes[at..at + newline];
            let Ok(head) = serde_json::from_slice::<SeqOnly>(line) else {
                break;
            };
            if head.seq != writer.last_seq + 1 {
                break;
            }
            writer.offsets.push(at as u64);
            writer.last_seq = head.seq;
            writer.ended = head.kind == "end";
            at += newline + 1;
        }
        writer.len = at as u64;
        if at < bytes.len() {
            tracing::warn!(%deployment, kept = at, dropped = bytes.len() - at, "log file ended in a broken line; cut it off");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(writer.len)?;
        }
        writer.file = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?,
        );
        Ok(())
    }

    async fn write(stream: &Stream, writer: &mut Writer, frame: &Frame) -> std::io::Result<()> {
        let json = serde_json::to_string(frame).expect("frames serialize");
        let len = writer.len;
        let file = writer.file.as_mut().expect("opened before writing");
        if let Err(e) = file.write_all(format!("{json}\n").as_bytes()) {
            // Leave no half line behind for the next one to glue onto.
            let _ = file.set_len(len);
            return Err(e);
        }
        writer.offsets.push(writer.len);
        writer.len += json.len() as u64 + 1;
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
    /// Returns the `seq` up to which the log now holds them (to acknowledge), and which of
    /// `frames` were stored now (the others were stored before, or the log has ended, or an
    /// earlier event is missing).
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
        for (i, frame) in frames.iter().enumerate() {
            let seq = frame.seq();
            // Stored before (sent again after a reconnect), or the log has ended and the
            // event is dropped: either way the agent may forget it.
            if seq < next || writer.ended {
                ack = Some(ack.unwrap_or(0).max(seq));
                continue;
            }
            if seq != next {
                tracing::warn!(%deployment, seq, expected = next, "event out of order; waiting for the missing ones");
                break;
            }
            let json = serde_json::to_string(frame).expect("frames serialize");
            buffer.push_str(&json);
            buffer.push('\n');
            staged.push((i, json));
            next += 1;
        }
        if staged.is_empty() {
            return Ok((ack, Vec::new()));
        }
        let len = writer.len;
        let file = writer.file.as_mut().expect("opened before writing");
        if let Err(e) = file.write_all(buffer.as_bytes()) {
            let _ = file.set_len(len);
            return Err(e);
        }
        for (_, json) in &staged {
            let at = writer.len;
            writer.offsets.push(at);
            writer.len += json.len() as u64 + 1;
        }
        writer.last_seq = next - 1;
        let stored = staged.iter().map(|(i, _)| *i).collect();
        let lines = staged
            .into_iter()
            .map(|(i, json)| Line {
                seq: frames[i].seq(),
                json: json.into(),
                end: false,
            })
            .collect();
        // No viewer is fine; a slow one lags and reads the file.
        let _ = stream.live.send(Arc::new(lines));
        Ok((Some(writer.last_seq), stored))
    }

    /// Appends a frame of the control plane's own, with the next `seq`; `None` if the log
    /// has already ended.
    pub async fn append_own(
        &self,
        deployment: &str,
        make: impl FnOnce(u64) -> Frame,
    ) -> std::io::Result<Option<u64>> {
        let stream = self.stream(deployment);
        let mut writer = stream.writer.lock().await;
        self.open(deployment, &mut writer).await?;
        if writer.ended {
            return Ok(None);
        }
        let frame = make(writer.last_seq + 1);
        Self::write(&stream, &mut writer, &frame).await?;
        let seq = frame.seq();
        if writer.ended {
            drop(writer);
            // Ended logs are only read from now on; the live channel closes with the stream
            // once its viewers are gone.
            self.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(deployment);
        }
        Ok(Some(seq))
    }

    /// The live frames of a deployment from now on. Subscribe before reading the file, so
    /// that nothing falls between the two.
    pub fn subscribe(&self, deployment: &str) -> broadcast::Receiver<Arc<Vec<Line>>> {
        self.stream(deployment).live.subscribe()
    }

    /// The stored frames with `seq >= from`.
    pub async fn read_from(&self, deployment: &str, from: u64) -> std::io::Result<Vec<Line>> {
        let path = self.path(deployment);
        let active = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(deployment)
            .cloned();
        let Some(stream) = active else {
            // An ended log (or one not written since a restart): read whole, once per viewer.
            return read_lines(&path, from).await;
        };
        let (start, end) = {
            let mut writer = stream.writer.lock().await;
            self.open(deployment, &mut writer).await?;
            let from = from.max(1);
            match writer.offsets.get((from - 1) as usize) {
                Some(start) if from <= writer.last_seq => (*start, writer.len),
                _ => return Ok(Vec::new()),
            }
        };
        let mut file = tokio::fs::File::open(&path).await?;
        file.seek(std::io::SeekFrom::Start(start)).await?;
        let mut bytes = vec![0; (end - start) as usize];
        file.read_exact(&mut bytes).await?;
        let first = from.max(1);
        let out = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .zip(first..)
            .map(|(raw, seq)| {
                let json = String::from_utf8_lossy(raw).into_owned();
                Line {
                    seq,
                    end: json.starts_with(END_PREFIX),
                    json: json.into(),
                }
            })
            .collect();
        Ok(out)
    }
}

async fn read_lines(path: &Path, from: u64) -> std::io::Result<Vec<Line>> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut lines = BufReader::new(file).lines();
    let mut out = Vec::new();
    while let Some(json) = lines.next_line().await? {
        // A line cut short by a crash mid-write is skipped, not fatal.
        let Ok(head) = serde_json::from_str::<SeqOnly>(&json) else {
            continue;
        };
        if head.seq >= from {
            out.push(Line {
                seq: head.seq,
                end: head.kind == "end",
                json: json.into(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(seq: u64) -> Frame {
        Frame::Log {
            seq,
            ts: "2026-11-26T12:00:00Z".into(),
            service: Some("orders".into()),
            stream: "stdout".into(),
            line: format!("line {seq}"),
        }
    }

    #[tokio::test]
    async fn a_log_is_read_back_from_any_seq_and_knows_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_owned()).unwrap();
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
        let end = logs
            .append_own("d", |seq| Frame::End {
                seq,
                ts: "2026-11-26T12:00:01Z".into(),
                state: "ready".into(),
                error: None,
            })
            .await
            .unwrap();
        assert_eq!(end, Some(5));

        let seqs = |lines: Vec<Line>| lines.iter().map(|l| (l.seq, l.end)).collect::<Vec<_>>();
        assert_eq!(
            seqs(logs.read_from("d", 3).await.unwrap()),
            [(3, false), (4, false), (5, true)]
        );
        // A new server reads the file alone.
        let again = Logs::new(dir.path().to_owned()).unwrap();
        assert_eq!(seqs(again.read_from("d", 5).await.unwrap()), [(5, true)]);
        let line: Frame =
            serde_json::from_str(&again.read_from("d", 2).await.unwrap()[0].json).unwrap();
        assert_eq!(line, log(2));
    }

    #[tokio::test]
    async fn a_broken_last_line_is_cut_off_before_new_lines_are_appended() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_owned()).unwrap();
        logs.append_agent("c", &[log(1), log(2)]).await.unwrap();
        let path = logs.path("c");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"type\":\"log\",\"seq\":3,\"ts\":\"2026");
        std::fs::write(&path, text).unwrap();

        let restarted = Logs::new(dir.path().to_owned()).unwrap();
        let (ack, stored) = restarted.append_agent("c", &[log(3)]).await.unwrap();
        assert_eq!((ack, stored), (Some(3), vec![0]));
        let lines = restarted.read_from("c", 1).await.unwrap();
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
        for line in &lines {
            serde_json::from_str::<Frame>(&line.json).unwrap();
        }
    }

    #[tokio::test]
    async fn a_running_log_is_read_from_its_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::new(dir.path().to_owned()).unwrap();
        let frames: Vec<Frame> = (1..=50).map(log).collect();
        logs.append_agent("r", &frames[..20]).await.unwrap();
        logs.append_agent("r", &frames[20..]).await.unwrap();
        let tail = logs.read_from("r", 42).await.unwrap();
        assert_eq!(
            tail.iter().map(|l| l.seq).collect::<Vec<_>>(),
            (42..=50).collect::<Vec<_>>()
        );
        let frame: Frame = serde_json::from_str(&tail[0].json).unwrap();
        assert_eq!(frame, log(42));
        assert!(logs.read_from("r", 51).await.unwrap().is_empty());
    }
}
