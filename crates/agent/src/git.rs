//! The real `git` CLI, run hermetically, with the user's credentials handed over the only
//! safe way.
//!
//! The password reaches git through `GIT_ASKPASS` (the `sdp` binary in askpass mode) and the
//! child's environment: never argv (`/proc/*/cmdline` is world-readable), never the URL (git
//! writes it into config and error messages), never a file. git runs as the agent, never as
//! user code's `run_as` user, so user code cannot read that environment.
//!
//! git reads nothing user code could have written: `HOME` is the agent's own, global and
//! system config are off, hooks, fsmonitor and credential helpers are switched off on the
//! command line, and only http, https and ssh may be used. Repositories live as bare mirrors
//! that only the agent can reach (`<work_dir>/git/mirrors`); a sandbox's working tree is
//! written from a mirror by `git archive`, unpacked by user code's user, and has no `.git`.
//! Every use of a mirror starts with a fetch under the requesting user's own credentials, so
//! a user without access to a repository is refused even when its objects are on disk.
//!
//! Every call has a timeout and is killed with its whole process group when it runs out, and
//! at most `max_git_jobs` git processes run at once: more wait in a queue, for a while.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sdp_protocol::{Branch, BranchName, Credentials, JobError, JobErrorCode, RepoUrl};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::Semaphore;

use crate::askpass;
use crate::group::GroupGuard;
use crate::isolation::UserCode;
use crate::unpack::{self, UnpackError};

/// What every child of the agent (git, builds) may see of the agent's environment: where
/// programs are, and how to reach servers through a corporate proxy or CA.
pub const BASE_PASS_THROUGH: &[&str] = &[
    "PATH",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// git's own on top of [`BASE_PASS_THROUGH`]. Nothing else leaks in.
const GIT_PASS_THROUGH: &[&str] = &["GIT_SSL_CAINFO"];

/// Config given on the command line of every git call (through `GIT_CONFIG_*`), where it wins
/// over the repository's: no credential helper stores or answers, and nothing runs a command
/// of anyone's choosing (hooks, fsmonitor) or in the background (auto gc, maintenance).
const HERMETIC_CONFIG: &[(&str, &str)] = &[
    ("credential.helper", ""),
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("core.attributesFile", "/dev/null"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
    ("tar.umask", "022"),
];

/// Attributes of every mirror, which win over those of the repository's own files: `git
/// archive` writes every file of the commit as it is, none left out or rewritten.
const MIRROR_ATTRIBUTES: &str = "* -export-ignore -export-subst\n";

/// What git runs for ssh remotes.
const SSH_COMMAND: &str = "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=none -o IdentityAgent=none";

/// Calls that may wait for a git slot, per slot; more are refused at once.
const QUEUE_PER_SLOT: usize = 4;

/// Takes one off a count of waiting calls when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Output kept from a git command; more is cut off.
const MAX_OUTPUT: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct Git {
    /// The askpass program: the `sdp` binary.
    pub askpass: PathBuf,
    /// `HOME` for git: a folder of the agent's that user code cannot write.
    pub home: PathBuf,
    /// The bare mirrors, one per repository.
    pub mirrors: PathBuf,
    pub timeout: Duration,
    /// Whether local repositories (paths, `file://`) may be used: `sdp dev` only.
    pub allow_local: bool,
    /// One permit per git process that may run.
    slots: Arc<Semaphore>,
    max_jobs: usize,
    /// Calls waiting for a slot.
    waiting: Arc<AtomicUsize>,
    /// One lock per mirror, so that fetches into it take turns.
    mirror_locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

struct Output {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Git {
    pub fn new(
        askpass: PathBuf,
        home: PathBuf,
        mirrors: PathBuf,
        timeout: Duration,
        max_jobs: usize,
        allow_local: bool,
    ) -> Git {
        Git {
            askpass,
            home,
            mirrors,
            timeout,
            allow_local,
            slots: Arc::new(Semaphore::new(max_jobs)),
            max_jobs,
            waiting: Arc::default(),
            mirror_locks: Arc::default(),
        }
    }

    /// git with a clean, hermetic environment; `credentials` only for commands that talk to
    /// the server, so that local ones never carry the password.
    fn command(&self, credentials: Option<&Credentials>) -> Command {
        let mut cmd = Command::new("git");
        cmd.env_clear();
        for key in BASE_PASS_THROUGH.iter().chain(GIT_PASS_THROUGH) {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        let protocols = if self.allow_local {
            "http:https:ssh:file"
        } else {
            "http:https:ssh"
        };
        cmd.env("HOME", &self.home)
            .env("LC_ALL", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_ALLOW_PROTOCOL", protocols)
            // ssh with nothing of the host's: no config, no key, no agent. SDP holds no ssh key
            // of its users, and the agent's own (root's) must never fetch for them.
            .env("GIT_SSH_COMMAND", SSH_COMMAND)
            .env("GIT_ASKPASS", &self.askpass)
            .env("GIT_CONFIG_COUNT", HERMETIC_CONFIG.len().to_string());
        for (i, (key, value)) in HERMETIC_CONFIG.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), key)
                .env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(credentials) = credentials {
            cmd.env(askpass::MODE_VAR, "1")
                .env(askpass::USERNAME_VAR, credentials.username.as_str())
                .env(askpass::PASSWORD_VAR, credentials.password.expose());
        }
        cmd
    }

    /// Waits for a free git slot, as long as a git command may run at most (`git_timeout`):
    /// a job queued longer than that would outlive any caller waiting for it. A queue already
    /// [`QUEUE_PER_SLOT`] times as long as the slots refuses at once, so a flood of jobs costs
    /// neither memory nor waiting tasks without end.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, JobError> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        if waiting >= self.max_jobs * QUEUE_PER_SLOT {
            return Err(JobError {
                code: JobErrorCode::Timeout,
                message: format!(
                    "the agent is busy: {} git commands are running and {waiting} more are waiting; try again shortly",
                    self.max_jobs
                ),
            });
        }
        match tokio::time::timeout(self.timeout, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(failed("the agent's git queue is closed".into())),
            Err(_) => Err(JobError {
                code: JobErrorCode::Timeout,
                message: format!(
                    "the agent is busy: {} git commands are running and this one waited {}s for its turn",
                    self.max_jobs,
                    self.timeout.as_secs()
                ),
            }),
        }
    }

    async fn run(&self, credentials: &Credentials, args: &[OsString]) -> Result<Output, JobError> {
        self.run_in(None, Some(credentials), args).await
    }

    async fn run_in(
        &self,
        git_dir: Option<&Path>,
        credentials: Option<&Credentials>,
        args: &[OsString],
    ) -> Result<Output, JobError> {
        std::fs::create_dir_all(&self.home).map_err(|e| JobError {
            code: JobErrorCode::Failed,
            message: format!("cannot create the agent's git home: {e}"),
        })?;
        let _slot = self.slot().await?;
        let mut cmd = self.command(credentials);
        if let Some(git_dir) = git_dir {
            cmd.arg("--git-dir").arg(git_dir);
        }
        cmd.args(args);
        let mut child = cmd.spawn().map_err(|e| JobError {
            code: JobErrorCode::Failed,
            message: format!("cannot run git: {e}"),
        })?;
        let mut group = GroupGuard::new(child.id());
        let mut stdout = child.stdout.take().expect("piped").take(MAX_OUTPUT as u64);
        let mut stderr = child.stderr.take().expect("piped").take(MAX_OUTPUT as u64);
        let work = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let (a, b, status) = tokio::join!(
                stdout.read_to_end(&mut out),
                stderr.read_to_end(&mut err),
                child.wait()
            );
            a.and(b)?;
            Ok::<_, std::io::Error>((status?, out, err))
        };
        let result = tokio::time::timeout(self.timeout, work).await;
        if result.is_ok() {
            group.disarm();
        }
        match result {
            Ok(Ok((status, out, err))) => Ok(Output {
                status,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr: match credentials {
                    Some(c) => mask(&String::from_utf8_lossy(&err), c),
                    None => String::from_utf8_lossy(&err).into_owned(),
                },
            }),
            Ok(Err(e)) => Err(JobError {
                code: JobErrorCode::Failed,
                message: format!("git failed to run: {e}"),
            }),
            Err(_) => {
                // git leaves helpers (git-remote-https) behind; end the whole group, and wait
                // for git itself, so that its slot is free only once it is gone.
                group.kill();
                let _ = child.wait().await;
                Err(self.timed_out())
            }
        }
    }

    fn timed_out(&self) -> JobError {
        JobError {
            code: JobErrorCode::Timeout,
            message: format!("git did not finish within {}s", self.timeout.as_secs()),
        }
    }

    /// Checks that the git server accepts `credentials` for `repo`.
    pub async fn probe(&self, repo: &RepoUrl, credentials: &Credentials) -> Result<(), JobError> {
        let args: Vec<OsString> = vec![
            "ls-remote".into(),
            "--".into(),
            repo.as_str().into(),
            "HEAD".into(),
        ];
        let out = self.run(credentials, &args).await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(classify(&out))
        }
    }

    /// The branches of `repo` with their tip commits, as `git ls-remote --heads` says.
    pub async fn branches(
        &self,
        repo: &RepoUrl,
        credentials: &Credentials,
    ) -> Result<Vec<Branch>, JobError> {
        let args: Vec<OsString> = vec![
            "ls-remote".into(),
            "--heads".into(),
            "--".into(),
            repo.as_str().into(),
        ];
        let out = self.run(credentials, &args).await?;
        if !out.status.success() {
            return Err(classify(&out));
        }
        Ok(parse_heads(&out.stdout))
    }
}

impl Git {
    /// The mirror of `repo`: named by a hash of its URL, so that no URL can name a path.
    fn mirror_of(&self, repo: &RepoUrl) -> PathBuf {
        let digest = Sha256::digest(repo.as_str().as_bytes());
        let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.mirrors.join(format!("{name}.git"))
    }

    fn mirror_lock(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.mirror_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(mirror.to_owned())
            .or_default()
            .clone()
    }

    /// Fetches the tip of `branch` of `repo` into its mirror with `credentials` (cloning it
    /// the first time) and returns the tip's commit. The fetch runs every time, so that the
    /// server checks this user's access before anything of the mirror is used for them.
    pub async fn fetch(
        &self,
        repo: &RepoUrl,
        branch: &BranchName,
        credentials: &Credentials,
    ) -> Result<String, JobError> {
        let mirror = self.mirror_of(repo);
        let lock = self.mirror_lock(&mirror);
        let _turn = lock.lock().await;
        if !mirror.join("HEAD").exists() {
            let _ = std::fs::remove_dir_all(&mirror);
            let args: Vec<OsString> = vec!["init".into(), "--quiet".into(), "--bare".into()];
            self.expect_success(Some(&mirror), None, &args).await?;
            let info = mirror.join("info");
            std::fs::create_dir_all(&info)
                .and_then(|()| std::fs::write(info.join("attributes"), MIRROR_ATTRIBUTES))
                .map_err(|e| failed(format!("cannot prepare the mirror of {repo}: {e}")))?;
        }
        // A flat ref per branch (a hash of its name): `a` and `a/b` never clash in a mirror
        // that outlives the branches of the repository.
        let digest = Sha256::digest(branch.as_str().as_bytes());
        let reference = format!(
            "refs/sdp/{}",
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let refspec = format!("+refs/heads/{branch}:{reference}");
        let args: Vec<OsString> = vec![
            "fetch".into(),
            "--quiet".into(),
            "--no-tags".into(),
            "--".into(),
            repo.as_str().into(),
            refspec.into(),
        ];
        self.expect_success(Some(&mirror), Some(credentials), &args)
            .await
            .map_err(|mut e| {
                if e.message.contains("couldn't find remote ref") {
                    e.code = JobErrorCode::Failed;
                    e.message = format!("branch {branch} does not exist in {repo}");
                }
                e
            })?;
        let args: Vec<OsString> = vec![
            "rev-parse".into(),
            "--verify".into(),
            "--quiet".into(),
            format!("{reference}^{{commit}}").into(),
        ];
        let out = self.expect_success(Some(&mirror), None, &args).await?;
        let commit = out.stdout.trim().to_owned();
        if commit.len() < 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(failed(format!(
                "git gave no commit for {branch}: {commit:?}"
            )));
        }
        Ok(commit)
    }

    /// Writes the files of `commit` (fetched from `repo` by [`Git::fetch`]) into the empty
    /// folder `dest`: `git archive` reads the mirror as the agent, and `tar`, run as user
    /// code's user, unpacks into `dest`, so that what it writes is no more than that user may.
    pub async fn export(
        &self,
        repo: &RepoUrl,
        commit: &str,
        dest: &Path,
        users: &UserCode,
    ) -> Result<(), JobError> {
        let mirror = self.mirror_of(repo);
        let _slot = self.slot().await?;
        let mut archive = self.command(None);
        archive
            .arg("--git-dir")
            .arg(&mirror)
            .args(["archive", "--format=tar", commit]);
        match unpack::into_folder(archive, dest, users, self.timeout).await {
            Ok(()) => Ok(()),
            Err(UnpackError::Producer(reason)) => {
                Err(failed(format!("git archive of {commit} failed: {reason}")))
            }
            Err(UnpackError::Unpack(reason)) => {
                Err(failed(format!("cannot unpack {commit}: {reason}")))
            }
            Err(UnpackError::Run(reason)) => Err(failed(format!("git archive: {reason}"))),
            Err(UnpackError::TimedOut) => Err(self.timed_out()),
        }
    }

    async fn expect_success(
        &self,
        git_dir: Option<&Path>,
        credentials: Option<&Credentials>,
        args: &[OsString],
    ) -> Result<Output, JobError> {
        let out = self.run_in(git_dir, credentials, args).await?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(classify(&out))
        }
    }
}

fn failed(message: String) -> JobError {
    JobError {
        code: JobErrorCode::Failed,
        message,
    }
}

/// Parses `<sha>\trefs/heads/<name>` lines. A branch whose name git allows but we do not
/// (one starting with `-`) is left out rather than offered for a deploy that would be refused.
fn parse_heads(stdout: &str) -> Vec<Branch> {
    stdout
        .lines()
        .filter_map(|line| {
            let (commit, reference) = line.split_once('\t')?;
            let name = reference.strip_prefix("refs/heads/")?;
            match BranchName::parse(name) {
                Ok(name) => Some(Branch {
                    name,
                    commit: commit.to_owned(),
                }),
                Err(e) => {
                    tracing::debug!(error = %e, "branch left out");
                    None
                }
            }
        })
        .collect()
}

/// Reads git's complaint and names the failure for the user.
fn classify(out: &Output) -> JobError {
    let stderr = out.stderr.as_str();
    let lower = stderr.to_lowercase();
    let summary = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("git failed without saying why")
        .chars()
        .take(400)
        .collect::<String>();
    let code = if lower.contains("askpass") {
        // git could not run our askpass helper: a fault of this host, not the password.
        JobErrorCode::Failed
    } else if lower.contains("authentication failed")
        || lower.contains("could not read username")
        || lower.contains("could not read password")
        || lower.contains("invalid username or password")
    {
        JobErrorCode::AuthFailed
    } else if lower.contains("not found")
        || lower.contains("does not appear to be a git repository")
        || lower.contains("could not resolve host")
        || lower.contains("failed to connect")
        || lower.contains("couldn't connect")
        || lower.contains("connection refused")
        || lower.contains("unable to access")
    {
        JobErrorCode::RepoUnreachable
    } else {
        JobErrorCode::Failed
    };
    JobError {
        code,
        message: summary,
    }
}

/// Replaces the password wherever a command printed it.
pub fn mask(text: &str, credentials: &Credentials) -> String {
    let secret = credentials.password.expose();
    if secret.is_empty() || !text.contains(secret) {
        return text.to_owned();
    }
    text.replace(secret, "********")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_and_option_like_names_left_out() {
        let out = "aaa\trefs/heads/main\nbbb\trefs/heads/feature/x\nccc\trefs/heads/-evil\nddd\trefs/tags/v1\n";
        let names: Vec<_> = parse_heads(out)
            .into_iter()
            .map(|b| format!("{}={}", b.name, b.commit))
            .collect();
        assert_eq!(names, vec!["main=aaa", "feature/x=bbb"]);
    }

    #[tokio::test]
    async fn a_full_git_queue_refuses_at_once_and_a_freed_slot_serves_the_next() {
        use futures_util::FutureExt;
        let git = Git::new(
            "askpass".into(),
            "home".into(),
            "mirrors".into(),
            Duration::from_secs(600),
            1,
            false,
        );
        let held = git.slot().await.unwrap();
        let mut queued: Vec<_> = (0..QUEUE_PER_SLOT).map(|_| Box::pin(git.slot())).collect();
        for call in &mut queued {
            assert!(call.now_or_never().is_none(), "waits for the held slot");
        }
        let refused = git.slot().now_or_never().expect("answers at once");
        assert_eq!(refused.unwrap_err().code, JobErrorCode::Timeout);
        drop(held);
        assert!(queued[0].as_mut().await.is_ok());
    }

    #[test]
    fn a_printed_password_is_masked() {
        let creds = Credentials {
            username: sdp_protocol::Username::parse("u").unwrap(),
            password: sdp_protocol::Password::parse("pa55".into()).unwrap(),
        };
        assert_eq!(mask("x pa55 y", &creds), "x ******** y");
    }
}
