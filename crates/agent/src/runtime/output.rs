//! Where a process instance's output goes: a file per stream under `<work_dir>/run/<sandbox
//! id>/`, which the instance holds open itself. Its output then never depends on the agent: an
//! agent that stops, restarts or is upgraded leaves its instances printing, where with pipes
//! they died of SIGPIPE at their next line. (The folder is the agent's alone; user code has
//! only its open file.)
//!
//! The agent follows each file into log lines ([`follow`]) and keeps it bounded: once it has
//! read past [`MAX_OUTPUT_FILE`], it empties the file. The instance writes with `O_APPEND`, so
//! its next line lands at the new start; what it wrote between the follower's last read and
//! the emptying is lost, a few lines at most.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lines::{LineSink, Splitter};

/// The most an output file holds before it is emptied.
pub const MAX_OUTPUT_FILE: u64 = 8 << 20;

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
