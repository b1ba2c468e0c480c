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

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lines::{LineSink, Splitter};

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
/// line goes to `sink` (none: the file is only kept bounded), and `lines` counts them.
pub async fn follow(
    path: PathBuf,
    sink: Option<LineSink>,
    lines: Option<watch::Sender<u64>>,
    stop: CancellationToken,
) {
    tokio::spawn(cap(path.clone(), stop.clone()));
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
        }
        if let Some(f) = file.as_mut() {
            // Emptied behind the follower's back (it was not): start again at the top.
            if f.metadata().await.is_ok_and(|m| m.len() < offset) {
                offset = 0;
                let _ = f.seek(SeekFrom::Start(0)).await;
            }
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                offset += n as u64;
                last_output = tokio::time::Instant::now();
                for line in splitter.push(&buf[..n]) {
                    emit(&sink, &lines, line).await;
                }
            }
            // Read to its end: what it held is in log lines now.
            if offset >= MAX_OUTPUT_FILE && f.set_len(0).await.is_ok() {
                offset = 0;
                let _ = f.seek(SeekFrom::Start(0)).await;
            }
        }
        if stopping {
            if let Some(line) = splitter.finish() {
                emit(&sink, &lines, line).await;
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

async fn emit(sink: &Option<LineSink>, lines: &Option<watch::Sender<u64>>, line: String) {
    if let Some(sink) = sink {
        sink.emit(line).await;
    }
    if let Some(lines) = lines {
        lines.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use sdp_protocol::{DeploymentId, LogStream, ServiceName};

    use super::*;
    use crate::events::Outbox;

    fn sink(outbox: &Arc<Outbox>, deployment: &DeploymentId) -> LineSink {
        LineSink {
            outbox: outbox.clone(),
            deployment: deployment.clone(),
            service: ServiceName::parse("orders").unwrap(),
            stream: LogStream::Stdout,
            mask: None,
        }
    }

    fn logged(outbox: &Outbox) -> Vec<String> {
        outbox
            .next_batch(10_000, usize::MAX)
            .into_iter()
            .filter_map(|e| match e.body {
                sdp_protocol::EventBody::Log { line, .. } => Some(line),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn lines_written_to_the_file_are_followed_until_the_stop_and_the_last_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.stdout.log");
        let mut writer = create(&path).unwrap();
        let outbox = Arc::new(Outbox::default());
        let deployment = DeploymentId::parse("dep_0123456789abcdef").unwrap();
        let (count, mut counted) = watch::channel(0);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow(
            path.clone(),
            Some(sink(&outbox, &deployment)),
            Some(count),
            stop.clone(),
        ));
        writeln!(writer, "one").unwrap();
        write!(writer, "two\nthr").unwrap();
        counted.wait_for(|n| *n == 2).await.unwrap();
        write!(writer, "ee, unfinished").unwrap();
        stop.cancel();
        follower.await.unwrap();
        assert_eq!(logged(&outbox), ["one", "two", "three, unfinished"]);
    }

    #[tokio::test]
    async fn a_file_nobody_reads_is_emptied_past_the_hard_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flood.stdout.log");
        let mut writer = create(&path).unwrap();
        // More than the outbox holds: once it is full, the follower waits for room that never
        // comes (nothing sends or acknowledges here).
        let outbox = Arc::new(Outbox::default());
        let deployment = DeploymentId::parse("dep_0123456789abcdef").unwrap();
        let huge = format!("{}\n", "x".repeat(60 * 1024));
        for _ in 0..2000 {
            writer.write_all(huge.as_bytes()).unwrap();
        }
        assert!(2000 * huge.len() as u64 > HARD_CAP);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow(
            path.clone(),
            Some(sink(&outbox, &deployment)),
            None,
            stop.clone(),
        ));
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
