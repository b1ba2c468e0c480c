//! The real `git` CLI, with the user's credentials handed over the only safe way.
//!
//! The password reaches git through `GIT_ASKPASS` (the `sdp` binary in askpass mode) and the
//! child's environment: never argv (`/proc/*/cmdline` is world-readable), never the URL (git
//! writes it into `.git/config` and error messages), never a file. Credential helpers and
//! terminal prompts are off, so nothing else answers or stores. Every call has a timeout and
//! is killed with its whole process group when it runs out.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sdp_protocol::{Branch, BranchName, Credentials, JobError, JobErrorCode, RepoUrl};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::askpass;
use crate::group::GroupGuard;

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

/// Output kept from a git command; more is cut off.
const MAX_OUTPUT: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct Git {
    /// The askpass program: the `sdp` binary.
    pub askpass: PathBuf,
    /// `HOME` for git: a folder of the agent's, so no user's global config applies.
    pub home: PathBuf,
    pub timeout: Duration,
}

struct Output {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Git {
    /// git with a clean environment; `credentials` only for commands that talk to the
    /// server, so that local ones (checkout, clean, rev-parse) never carry the password.
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
        cmd.env("HOME", &self.home)
            .env("LC_ALL", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "credential.helper")
            .env("GIT_CONFIG_VALUE_0", "")
            .env("GIT_ASKPASS", &self.askpass)
            .stdin(Stdio::null())
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

    async fn run(&self, credentials: &Credentials, args: &[OsString]) -> Result<Output, JobError> {
        self.run_in(None, Some(credentials), args).await
    }

    async fn run_in(
        &self,
        dir: Option<&Path>,
        credentials: Option<&Credentials>,
        args: &[OsString],
    ) -> Result<Output, JobError> {
        std::fs::create_dir_all(&self.home).map_err(|e| JobError {
            code: JobErrorCode::Failed,
            message: format!("cannot create the agent's git home: {e}"),
        })?;
        let mut cmd = self.command(credentials);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
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
                // git leaves helpers (git-remote-https) behind; end the whole group.
                group.kill();
                Err(JobError {
                    code: JobErrorCode::Timeout,
                    message: format!("git did not finish within {}s", self.timeout.as_secs()),
                })
            }
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
    /// Brings `checkout` to the tip of `branch` of `repo`: clones it the first time, fetches
    /// after that, and returns the tip's commit. The working tree is not touched: see
    /// [`Git::switch`].
    pub async fn fetch(
        &self,
        repo: &RepoUrl,
        branch: &BranchName,
        checkout: &Path,
        credentials: &Credentials,
    ) -> Result<String, JobError> {
        let git_dir = checkout.join(".git");
        if !git_dir.exists() {
            if let Some(parent) = checkout.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| failed(format!("cannot create {}: {e}", parent.display())))?;
            }
            let _ = std::fs::remove_dir_all(checkout);
            let args: Vec<OsString> = vec![
                "clone".into(),
                "--quiet".into(),
                "--no-checkout".into(),
                "--".into(),
                repo.as_str().into(),
                checkout.into(),
            ];
            self.expect_success(None, Some(credentials), &args).await?;
        }
        let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        let args: Vec<OsString> = vec![
            "fetch".into(),
            "--quiet".into(),
            "--prune".into(),
            "--".into(),
            "origin".into(),
            refspec.into(),
        ];
        self.expect_success(Some(checkout), Some(credentials), &args)
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
            format!("refs/remotes/origin/{branch}^{{commit}}").into(),
        ];
        let out = self.expect_success(Some(checkout), None, &args).await?;
        let commit = out.stdout.trim().to_owned();
        if commit.len() < 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(failed(format!(
                "git gave no commit for {branch}: {commit:?}"
            )));
        }
        Ok(commit)
    }

    /// Puts the working tree of `checkout` at `commit`, with nothing else in it.
    pub async fn switch(&self, checkout: &Path, commit: &str) -> Result<(), JobError> {
        let checkout_args: Vec<OsString> = vec![
            "checkout".into(),
            "--quiet".into(),
            "--force".into(),
            "--detach".into(),
            commit.into(),
        ];
        self.expect_success(Some(checkout), None, &checkout_args)
            .await?;
        let clean: Vec<OsString> = vec!["clean".into(), "-ffdxq".into()];
        self.expect_success(Some(checkout), None, &clean).await?;
        Ok(())
    }

    async fn expect_success(
        &self,
        dir: Option<&Path>,
        credentials: Option<&Credentials>,
        args: &[OsString],
    ) -> Result<Output, JobError> {
        let out = self.run_in(dir, credentials, args).await?;
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

    #[test]
    fn a_printed_password_is_masked() {
        let creds = Credentials {
            username: sdp_protocol::Username::parse("u").unwrap(),
            password: sdp_protocol::Password::parse("pa55".into()).unwrap(),
        };
        assert_eq!(mask("x pa55 y", &creds), "x ******** y");
    }
}
