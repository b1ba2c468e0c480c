//! Unpacking a tar stream into a folder of user code's: the stream comes from the agent (`git
//! archive` of a mirror, `tar` of a shared build), which may read what user code may not, and
//! is unpacked by `tar` run as user code's user, so that what lands in the folder is never
//! more than that user may write (a link in the folder is that user's to follow, not root's).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::group::GroupGuard;
use crate::isolation::UserCode;

/// The most of each side's error output that is kept.
const MAX_ERROR_OUTPUT: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The producer (git archive, tar) failed; its last line of error output.
    #[error("{0}")]
    Producer(String),
    /// The unpacking tar failed; its last line of error output.
    #[error("{0}")]
    Unpack(String),
    /// A program could not be started or waited for.
    #[error("{0}")]
    Run(String),
    #[error("timed out")]
    TimedOut,
}

/// Runs `producer` (its stdout a tar stream; the caller sets its program, arguments and
/// environment) into `tar -x` as `users` in `dest`, for at most `timeout`. Both run in process
/// groups of their own, ended with the work if it is dropped or times out.
pub async fn into_folder(
    mut producer: Command,
    dest: &Path,
    users: &UserCode,
    timeout: Duration,
) -> Result<(), UnpackError> {
    producer
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut producer = producer
        .spawn()
        .map_err(|e| UnpackError::Run(format!("cannot start: {e}")))?;
    let mut producer_group = GroupGuard::new(producer.id());
    let tar_input: Stdio = producer
        .stdout
        .take()
        .expect("piped")
        .try_into()
        .map_err(|e| UnpackError::Run(format!("cannot connect to tar: {e}")))?;
    let mut tar = users.command("tar");
    tar.args(["-x", "-f", "-", "--no-same-owner", "-C"])
        .arg(dest)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("LC_ALL", "C")
        .stdin(tar_input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut tar = tar
        .spawn()
        .map_err(|e| UnpackError::Run(format!("cannot run tar: {e}")))?;
    let mut tar_group = GroupGuard::new(tar.id());
    let mut producer_err = producer
        .stderr
        .take()
        .expect("piped")
        .take(MAX_ERROR_OUTPUT);
    let mut tar_err = tar.stderr.take().expect("piped").take(MAX_ERROR_OUTPUT);
    let work = async {
        let (mut p, mut t) = (Vec::new(), Vec::new());
        let (_, _, producer_status, tar_status) = tokio::join!(
            producer_err.read_to_end(&mut p),
            tar_err.read_to_end(&mut t),
            producer.wait(),
            tar.wait()
        );
        Ok::<_, std::io::Error>((producer_status?, tar_status?, p, t))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok((producer_status, tar_status, p, t))) => {
            producer_group.disarm();
            tar_group.disarm();
            if !producer_status.success() {
                return Err(UnpackError::Producer(last_line(&p)));
            }
            if !tar_status.success() {
                return Err(UnpackError::Unpack(last_line(&t)));
            }
            Ok(())
        }
        Ok(Err(e)) => Err(UnpackError::Run(format!("cannot wait: {e}"))),
        Err(_) => {
            producer_group.kill();
            tar_group.kill();
            let _ = tokio::join!(producer.wait(), tar.wait());
            Err(UnpackError::TimedOut)
        }
    }
}

/// The last line of error output that says something, at most 400 characters.
pub fn last_line(output: &[u8]) -> String {
    String::from_utf8_lossy(output)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no reason given")
        .chars()
        .take(400)
        .collect()
}
