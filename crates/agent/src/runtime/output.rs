//! Where a process instance's output goes: a file per stream under `<work_dir>/run/<sandbox
//! id>/`, which the instance holds open itself. Its output then never depends on the agent: an
//! agent that stops, restarts or is upgraded leaves its instances printing, where with pipes
//! they died of SIGPIPE at their next line. (The folder is the agent's alone; user code has
//! only its open file.)
//!
//! The agent follows each file into log lines ([`follow`]) and keeps it bounded: once it has
//! read past [`MAX_OUTPUT_FILE`], it empties the file. The instance writes with `O_APPEND`, so
//! its next line lands at the new start; what it wrote between the follower's last read and
//! the emptying is lost, a few lines at most. A file nobody reads fast enough (its lines wait
//! for room in the agent's outbox, or the instance prints faster than they are read) is
//! emptied all the same once it passes [`HARD_CAP`], unread lines and all: the instance's
//! output never fills the disk.
//!
//! Each line also goes to the sandbox's runtime log with the offset where it ends, and the
//! follower starts at the offset the control plane acknowledged last: after the agent's
//! restart it re-reads exactly what was not acknowledged. For that, a file with such a
//! follower is emptied only once all it held is acknowledged (else the offsets kept would
//! point into other lines); the hard cap still empties it whatever was acknowledged.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use sdp_protocol::LogStream;

use crate::lines::Splitter;
use crate::runtime_log::InstanceOutput;

/// The most an output file holds before it is emptied.
pub const MAX_OUTPUT_FILE: u64 = 8 << 20;
/// The most an output file holds however far behind its follower is.
pub const HARD_CAP: u64 = 4 * MAX_OUTPUT_FILE;
/// How often the hard cap is checked.
const CAP_CHECK: Duration = Duration::from_millis(500);

/// How often a file is read while its instance prints, and while it is quiet.
const BUSY_POLL: Duration = Duration::from_millis(20);
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Quiet this long, a file is read at the idle pace.
const QUIET_AFTER: Duration = Duration::from_secs(1);

/// A new, empty output file for an instance, opened for appending: what the instance gets as
/// its stdout or stderr.
pub fn create(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Follows the output file at `path` until `stop`, then reads what is left and ends. Each
/// line goes to `sink` as a line of its stream (none: the file is only kept bounded), from
/// where the sink's acknowledged lines end; `lines` counts them.
pub async fn follow(
    path: PathBuf,
    sink: Option<(InstanceOutput, LogStream)>,
    lines: Option<watch::Sender<u64>>,
    stop: CancellationToken,
) {
    tokio::spawn(cap(path.clone(), stop.clone()));
    let source = sink
        .as_ref()
        .map(|(out, stream)| format!("{}.{}", out.service, stream.as_str()))
        .unwrap_or_default();
    let mut file = None;
    let mut offset = 0u64;
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_output = tokio::time::Instant::now();
    loop {
        let stopping = stop.is_cancelled();
        if file.is_none() {
            file = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .await
                .ok();
            if let (Some(f), Some((out, _))) = (file.as_mut(), &sink) {
                (offset, splitter) = resume(f, out.acked_at(&source)).await;
            }
        }
        if let Some(f) = file.as_mut() {
            // Emptied behind the follower's back (the hard cap): start again at the top.
            if f.metadata().await.is_ok_and(|m| m.len() < offset) {
                offset = 0;
                splitter.rebase(0);
                let _ = f.seek(SeekFrom::Start(0)).await;
            }
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                offset += n as u64;
                last_output = tokio::time::Instant::now();
                for (line, at) in splitter.push_at(&buf[..n]) {
                    emit(&sink, &source, &lines, line, at).await;
                }
            }
            // Read to its end: what it held is in log lines now (and acknowledged, when they
            // go to a runtime log).
            let done_with = sink
                .as_ref()
                .is_none_or(|(out, _)| out.acked_at(&source) >= offset);
            if offset >= MAX_OUTPUT_FILE && done_with && f.set_len(0).await.is_ok() {
                offset = 0;
                splitter.rebase(0);
                let _ = f.seek(SeekFrom::Start(0)).await;
                if let Some((out, _)) = &sink {
                    out.rebase(&source);
                }
            }
        }
        if stopping {
            if let Some((line, at)) = splitter.finish_at() {
                emit(&sink, &source, &lines, line, at).await;
            }
            return;
        }
        let pause = if last_output.elapsed() < QUIET_AFTER {
            BUSY_POLL
        } else {
            IDLE_POLL
        };
        tokio::select! {
            // One last read after the stop, for what was written just before it.
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Positions `file` at `acked` (at 0 when the file is shorter: it was emptied since), with a
/// splitter that knows whether a `\r` came just before.
async fn resume(file: &mut tokio::fs::File, acked: u64) -> (u64, Splitter) {
    let len = file.metadata().await.map_or(0, |m| m.len());
    let at = if acked <= len { acked } else { 0 };
    let mut after_cr = false;
    if at > 0 && file.seek(SeekFrom::Start(at - 1)).await.is_ok() {
        let mut byte = [0u8; 1];
        after_cr = file.read_exact(&mut byte).await.is_ok() && byte[0] == b'\r';
    }
    let _ = file.seek(SeekFrom::Start(at)).await;
    (at, Splitter::resumed(at, after_cr))
}

/// Empties the file at `path` whenever it passes [`HARD_CAP`], until `stop`.
async fn cap(path: PathBuf, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CAP_CHECK) => {}
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > HARD_CAP)
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path)
        {
            tracing::warn!(path = %path.display(), "an instance's output outran its follower; emptied");
            let _ = f.set_len(0);
        }
    }
}

async fn emit(
    sink: &Option<(InstanceOutput, LogStream)>,
    source: &str,
    lines: &Option<watch::Sender<u64>>,
    line: String,
    at: u64,
) {
    if let Some((out, stream)) = sink {
        out.line(*stream, source, line, at).await;
    }
    if let Some(lines) = lines {
        lines.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use sdp_protocol::{RuntimeBody, SandboxId, ServiceName};

    use super::*;
    use crate::runtime_log::{RuntimeLog, Tail};

    fn sink(log: &Arc<RuntimeLog>) -> Option<(InstanceOutput, LogStream)> {
        let out = InstanceOutput {
            log: log.clone(),
            sandbox: SandboxId::parse("sbx_0123456789abcdef").unwrap(),
            service: ServiceName::parse("orders").unwrap(),
            generation: 1,
            deployment: None,
            tail: Tail::default(),
        };
        Some((out, LogStream::Stdout))
    }

    fn logged(log: &RuntimeLog) -> Vec<String> {
        log.next_batch(10_000, usize::MAX)
            .into_iter()
            .filter_map(|e| match e.body {
                RuntimeBody::Log { line, .. } => Some(line),
                RuntimeBody::Instance(_) => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn lines_written_to_the_file_are_followed_until_the_stop_and_the_last_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.stdout.log");
        let mut writer = create(&path).unwrap();
        let log = Arc::new(RuntimeLog::new(dir.path()));
        let (count, mut counted) = watch::channel(0);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow(path.clone(), sink(&log), Some(count), stop.clone()));
        writeln!(writer, "one").unwrap();
        write!(writer, "two\nthr").unwrap();
        counted.wait_for(|n| *n == 2).await.unwrap();
        write!(writer, "ee, unfinished").unwrap();
        stop.cancel();
        follower.await.unwrap();
        assert_eq!(logged(&log), ["one", "two", "three, unfinished"]);
    }

    #[tokio::test]
    async fn a_file_nobody_reads_is_emptied_past_the_hard_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flood.stdout.log");
        let mut writer = create(&path).unwrap();
        // More than the outbox holds: once it is full, the follower waits for room that never
        // comes (nothing sends or acknowledges here).
        let log = Arc::new(RuntimeLog::new(dir.path()));
        let huge = format!("{}\n", "x".repeat(60 * 1024));
        for _ in 0..2000 {
            writer.write_all(huge.as_bytes()).unwrap();
        }
        assert!(2000 * huge.len() as u64 > HARD_CAP);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow(path.clone(), sink(&log), None, stop.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&path).unwrap().len() > HARD_CAP {
            assert!(tokio::time::Instant::now() < deadline, "never emptied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        follower.abort();
    }

    #[tokio::test]
    async fn a_file_is_emptied_once_read_past_its_bound_and_the_instance_writes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chatty.stdout.log");
        let mut writer = create(&path).unwrap();
        let (count, mut counted) = watch::channel(0);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow(path.clone(), None, Some(count), stop.clone()));
        let line = format!("{}\n", "x".repeat(1023));
        let lines = 2 * MAX_OUTPUT_FILE / 1024;
        for _ in 0..lines {
            writer.write_all(line.as_bytes()).unwrap();
        }
        counted.wait_for(|n| *n == lines).await.unwrap();
        // Read to the end and past the bound: the follower has emptied it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(std::fs::metadata(&path).unwrap().len() < MAX_OUTPUT_FILE);
        writeln!(writer, "after").unwrap();
        counted.wait_for(|n| *n == lines + 1).await.unwrap();
        stop.cancel();
        follower.await.unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < MAX_OUTPUT_FILE);
    }
}
