//! The process runtime: each instance is `sh -c <run>` in its own process group, as user
//! code's user, with `PORT` a free port of `port_range`, supervised by the agent. A pid file
//! per instance under `<work_dir>/run/<sandbox_id>/` lets a restarted agent find, report and
//! stop what it started; it records the process's start time too, so that a pid the kernel
//! has since given to another process is never signalled. Its output goes to files beside
//! the pid file, which the agent follows (`output.rs`): the instance never writes to the
//! agent, so it outlives the agent's restarts.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sdp_protocol::{DeploymentId, LogStream, ReloadSignal, SandboxId, ServiceName};
use serde::{Deserialize, Serialize};

use tokio_util::sync::CancellationToken;

use super::output;
use super::{Exit, Instance, Output, Ports, Runtime, RuntimeError, StartRequest};
use crate::isolation::UserCode;
use crate::runtime_log::InstanceOutput;

/// How long an instance has to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct PidFile {
    pid: i32,
    port: u16,
    deployment: DeploymentId,
    /// When the process started, in clock ticks after boot (field 22 of `/proc/<pid>/stat`).
    #[serde(default)]
    start_time: Option<u64>,
    /// The boot it started in: after a reboot no pid of the file is ours.
    #[serde(default)]
    boot_id: Option<String>,
}

/// What a pid file's pid is now.
#[derive(Debug, PartialEq, Eq)]
enum Leader {
    /// The process the file names, still running.
    Alive,
    /// No process has the pid: the leader ended, though members of its group may still run
    /// (the kernel hands the number to no one while that group exists).
    Ended,
    /// Another process has the pid now (or the host rebooted): the group is gone, and the pid
    /// must not be signalled.
    Reused,
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

impl PidFile {
    fn leader(&self) -> Leader {
        if let (Some(recorded), Some(now)) = (&self.boot_id, boot_id())
            && *recorded != now
        {
            return Leader::Reused;
        }
        match (start_time(self.pid), self.start_time) {
            (None, _) => Leader::Ended,
            (Some(now), Some(recorded)) if now != recorded => Leader::Reused,
            (Some(_), _) => Leader::Alive,
        }
    }

    /// Whether anything of the instance may still run: its leader, or its group.
    fn alive(&self) -> bool {
        match self.leader() {
            Leader::Alive => true,
            Leader::Ended => killpg(Pid::from_raw(self.pid), None).is_ok(),
            Leader::Reused => false,
        }
    }
}

pub struct ProcessRuntime {
    run_dir: PathBuf,
    users: UserCode,
    ports: Ports,
    /// Base environment: what services may see of the agent's own (PATH and the like).
    base_env: BTreeMap<String, String>,
    /// Instances whose output files this agent follows: cancelling the token ends the
    /// followers.
    followed: Mutex<HashMap<(SandboxId, ServiceName), CancellationToken>>,
    /// The port this runtime holds for each instance it started or took up. Only these are
    /// freed when a pid file goes: a dead instance of an earlier run may name a port that
    /// was handed out again since, to an instance that still runs.
    held: Mutex<HashMap<(SandboxId, ServiceName), u16>>,
}

/// A runtime dropped (the agent stops) follows nothing any more; its instances run on.
impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        for stop in self
            .followed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            stop.cancel();
        }
    }
}

fn err(message: impl Into<String>) -> RuntimeError {
    RuntimeError(message.into())
}

impl ProcessRuntime {
    pub fn new(
        run_dir: &Path,
        users: UserCode,
        ports: (u16, u16),
        bind_host: &str,
    ) -> ProcessRuntime {
        let mut base_env = BTreeMap::new();
        for key in ["PATH", "TMPDIR", "LANG", "TZ"] {
            if let Ok(v) = std::env::var(key) {
                base_env.insert(key.to_owned(), v);
            }
        }
        ProcessRuntime {
            run_dir: run_dir.to_owned(),
            users,
            ports: Ports::new(ports, bind_host),
            base_env,
            followed: Mutex::default(),
            held: Mutex::default(),
        }
    }

    fn output_path(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        stream: LogStream,
    ) -> PathBuf {
        self.run_dir
            .join(sandbox.as_str())
            .join(format!("{service}.{}.log", stream.as_str()))
    }

    /// Follows the output files of an instance this agent did not start (a previous run of
    /// it did), only to keep them bounded: their lines belong to no deployment any more.
    fn keep_bounded(&self, sandbox: &SandboxId, service: &ServiceName) {
        let mut followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        let key = (sandbox.clone(), service.clone());
        if followed.contains_key(&key) {
            return;
        }
        let stop = CancellationToken::new();
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            tokio::spawn(output::follow(
                self.output_path(sandbox, service, stream),
                None,
                None,
                stop.clone(),
            ));
        }
        followed.insert(key, stop);
    }

    /// Follows an instance's output files into `out` (after one last read of whoever followed
    /// them before). Returns the count of lines read.
    fn follow_files(&self, out: InstanceOutput) -> tokio::sync::watch::Receiver<u64> {
        let (sandbox, service) = (out.sandbox.clone(), out.service.clone());
        self.unfollow(&sandbox, &service);
        let stop = CancellationToken::new();
        let (lines, output_lines) = tokio::sync::watch::channel(0);
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            tokio::spawn(output::follow(
                self.output_path(&sandbox, &service, stream),
                Some((out.clone(), stream)),
                Some(lines.clone()),
                stop.clone(),
            ));
        }
        self.followed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sandbox, service), stop);
        output_lines
    }

    /// Stops following an instance's output, after one last read.
    fn unfollow(&self, sandbox: &SandboxId, service: &ServiceName) {
        if let Some(stop) = self
            .followed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(sandbox.clone(), service.clone()))
        {
            stop.cancel();
        }
    }

    fn pid_path(&self, sandbox: &SandboxId, service: &ServiceName) -> PathBuf {
        self.run_dir
            .join(sandbox.as_str())
            .join(format!("{service}.pid.json"))
    }

    /// Ends the process group `pid` leads: SIGTERM, then SIGKILL after the grace.
    async fn end_group(pid: i32) {
        let group = Pid::from_raw(pid);
        if killpg(group, Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        // Most services end at once on SIGTERM: looked at soon, then less often.
        let mut poll = Duration::from_millis(5);
        while tokio::time::Instant::now() < deadline {
            // Not `killpg(group, 0)`, which a zombie still answers: an orphaned member that
            // ended waits for init to reap it, and that can take seconds.
            if group_members(pid).is_empty() {
                return;
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
    }

    fn hold(&self, sandbox: &SandboxId, service: &ServiceName, port: u16) {
        self.ports.claim(port);
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sandbox.clone(), service.clone()), port);
    }

    /// Frees `port` if this runtime holds it for the instance.
    fn free(&self, sandbox: &SandboxId, service: &ServiceName, port: u16) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let key = (sandbox.clone(), service.clone());
        if held.get(&key) == Some(&port) {
            held.remove(&key);
            self.ports.release(port);
        }
    }

    async fn stop_by_file(&self, sandbox: &SandboxId, service: &ServiceName) {
        let path = self.pid_path(sandbox, service);
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(pid_file) = serde_json::from_str::<PidFile>(&text)
        {
            if pid_file.leader() == Leader::Reused {
                tracing::info!(
                    pid = pid_file.pid,
                    "an instance's pid belongs to another process now: not signalling it"
                );
            } else {
                Self::end_group(pid_file.pid).await;
            }
            self.free(sandbox, service, pid_file.port);
        }
        let _ = std::fs::remove_file(path);
    }
}

/// The live processes of process group `pgid`, found in `/proc`. Zombies are left out: a
/// process that has ended but is not reaped yet (an orphan waits for init, which may take
/// its time) can neither take a signal nor serve.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the command name (which may hold spaces): state, ppid, pgrp.
                    let mut after_name = stat[stat.rfind(')')? + 1..].split_whitespace();
                    let state = after_name.next()?;
                    let pgrp = after_name.nth(1)?.parse::<i32>().ok()?;
                    Some(state != "Z" && pgrp == pgid)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The services with a pid file in `dir`.
fn pid_files(dir: &Path) -> Vec<ServiceName> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|f| {
            let name = f.file_name().to_string_lossy().into_owned();
            ServiceName::parse(name.strip_suffix(".pid.json")?).ok()
        })
        .collect()
}

/// Why a child ended, as people read it.
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(signal) => match Signal::try_from(signal) {
            Ok(signal) => format!("killed by {}", signal.as_str()),
            Err(_) => format!("killed by signal {signal}"),
        },
        None => status.to_string(),
    }
}

/// The end of process `pid`, which is not the agent's child (an earlier run of the agent
/// started it), through a pidfd: its exit status cannot be read.
fn pidfd_exit(pid: i32) -> Option<Exit> {
    let pid = rustix::process::Pid::from_raw(pid)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).ok()?;
    // Deprecated for fds whose owner may close them behind tokio's back; this one is owned
    // here and lives as long as its registration, and the replacement needs `unsafe`, which
    // the workspace forbids.
    #[allow(deprecated)]
    let fd = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE).ok()?;
    Some(Box::pin(async move {
        let _ = fd.readable().await;
        "it ended (an earlier run of the agent started it: its exit status is unknown)".to_owned()
    }))
}

#[async_trait::async_trait]
impl Runtime for ProcessRuntime {
    async fn start(&self, req: StartRequest) -> Result<Instance, RuntimeError> {
        // No container maps the catalog's port here: the service listens on `PORT` itself.
        // Freed on every way out before the pid file records it.
        let lease = self.ports.lease()?;
        let port = lease.port();
        tracing::debug!(sandbox = %req.sandbox, sandbox_id = %req.sandbox_id, service = %req.service, port, catalog_port = req.port, "starting a process");
        if let Err(e) = self.users.create_dir(&req.home) {
            return Err(err(format!("cannot create {}: {e}", req.home.display())));
        }
        let dir = self.run_dir.join(req.sandbox_id.as_str());
        let files = std::fs::create_dir_all(&dir).and_then(|()| {
            Ok((
                output::create(&self.output_path(
                    &req.sandbox_id,
                    &req.service,
                    LogStream::Stdout,
                ))?,
                output::create(&self.output_path(
                    &req.sandbox_id,
                    &req.service,
                    LogStream::Stderr,
                ))?,
            ))
        });
        let (stdout, stderr) = match files {
            Ok(files) => files,
            Err(e) => {
                return Err(err(format!(
                    "cannot create the output files in {}: {e}",
                    dir.display()
                )));
            }
        };
        let mut cmd = self.users.command("sh");
        cmd.arg("-c")
            .arg(&req.run)
            .current_dir(&req.checkout)
            .env_clear()
            .envs(&self.base_env)
            .env("HOME", &req.home)
            .envs(&req.env)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Err(err(format!("cannot start {}: {e}", req.service)));
            }
        };
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| err("the service exited at once"))?;
        let path = self.pid_path(&req.sandbox_id, &req.service);
        let pid_file = PidFile {
            pid,
            port,
            deployment: req.deployment.clone(),
            start_time: start_time(pid),
            boot_id: boot_id(),
        };
        if let Err(e) = std::fs::write(&path, serde_json::to_vec(&pid_file).expect("serializes")) {
            // Nothing could find this instance to stop it, and its port is about to be
            // handed out again: it goes now.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(err(format!("cannot write {}: {e}", path.display())));
        }
        self.hold(&req.sandbox_id, &req.service, lease.keep());
        let generation = req.output.log.begin(&req.sandbox_id, &req.service);
        let out = req
            .output
            .of(&req.sandbox_id, &req.service, &req.deployment, generation);
        let output_lines = self.follow_files(out);
        let (exited, exit) = tokio::sync::oneshot::channel();
        let (deployment_log, deployment, service) = (
            req.output.deployment.clone(),
            req.deployment.clone(),
            req.service.clone(),
        );
        tokio::spawn(async move {
            let reason = match child.wait().await {
                Ok(status) => describe(status),
                Err(e) => format!("its end could not be read: {e}"),
            };
            if let Some(outbox) = deployment_log {
                outbox
                    .system(
                        &deployment,
                        Some(&service),
                        format!("{service} exited: {reason}"),
                    )
                    .await;
            }
            let _ = exited.send(reason);
        });
        let exit: Exit = Box::pin(async move {
            exit.await
                .unwrap_or_else(|_| "its end could not be read".to_owned())
        });
        Ok(Instance {
            host_port: port,
            health: crate::health::origin("127.0.0.1", port),
            // Read from its files a moment after it is written.
            output_lines: Some(output_lines),
            exit,
            upstream: None,
            changes: None,
        })
    }

    async fn adopt(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        deployment: &DeploymentId,
        output: Output,
    ) -> Result<Option<Instance>, RuntimeError> {
        let path = self.pid_path(sandbox, service);
        let Some(pid_file) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<PidFile>(&text).ok())
        else {
            return Ok(None);
        };
        if pid_file.leader() != Leader::Alive {
            return Ok(None);
        }
        let Some(exit) = pidfd_exit(pid_file.pid) else {
            return Ok(None);
        };
        self.hold(sandbox, service, pid_file.port);
        let generation = output.log.generation(sandbox, service);
        let output_lines = self.follow_files(output.of(sandbox, service, deployment, generation));
        tracing::info!(%sandbox, %service, pid = pid_file.pid, port = pid_file.port, "took up an instance an earlier run started");
        Ok(Some(Instance {
            host_port: pid_file.port,
            health: crate::health::origin("127.0.0.1", pid_file.port),
            output_lines: Some(output_lines),
            exit,
            upstream: None,
            changes: None,
        }))
    }

    async fn stop_service(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
    ) -> Result<(), RuntimeError> {
        self.stop_by_file(sandbox, service).await;
        self.unfollow(sandbox, service);
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let _ = std::fs::remove_file(self.output_path(sandbox, service, stream));
        }
        Ok(())
    }

    async fn signal(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        signal: ReloadSignal,
    ) -> Result<(), RuntimeError> {
        let path = self.pid_path(sandbox, service);
        let pid_file = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<PidFile>(&text).ok())
            .ok_or_else(|| err(format!("{service} does not run")))?;
        if pid_file.leader() != Leader::Alive {
            return Err(err(format!("{service} does not run")));
        }
        let signal = match signal {
            ReloadSignal::Hup => Signal::SIGHUP,
            ReloadSignal::Usr1 => Signal::SIGUSR1,
            ReloadSignal::Usr2 => Signal::SIGUSR2,
        };
        // The leader is the `sh -c` the instance was started with. A shell that runs the
        // service as its child (dash does) would die of the signal: the members of its group
        // get it instead, or the leader alone when the shell ran the service in its place.
        let members = group_members(pid_file.pid);
        let targets: Vec<i32> = match members.iter().any(|&pid| pid != pid_file.pid) {
            true => members
                .into_iter()
                .filter(|&pid| pid != pid_file.pid)
                .collect(),
            false => vec![pid_file.pid],
        };
        for pid in targets {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
        Ok(())
    }

    async fn stop_sandbox(&self, sandbox: &SandboxId) -> Result<(), RuntimeError> {
        let dir = self.run_dir.join(sandbox.as_str());
        for service in pid_files(&dir) {
            self.stop_by_file(sandbox, &service).await;
        }
        self.followed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _), stop| {
                if s == sandbox {
                    stop.cancel();
                }
                s != sandbox
            });
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    async fn sandboxes(&self) -> Result<Vec<SandboxId>, RuntimeError> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.run_dir) else {
            return Ok(found);
        };
        for entry in entries.flatten() {
            let Ok(id) = SandboxId::parse(entry.file_name().to_string_lossy().into_owned()) else {
                continue;
            };
            let files: Vec<(ServiceName, PidFile, bool)> = pid_files(&entry.path())
                .into_iter()
                .filter_map(|service| {
                    let text = std::fs::read_to_string(self.pid_path(&id, &service)).ok()?;
                    let pid_file = serde_json::from_str::<PidFile>(&text).ok()?;
                    let alive = pid_file.alive();
                    Some((service, pid_file, alive))
                })
                .collect();
            // Ports of instances that run (a previous run may have started them) stay
            // taken, and instances still print: their files are kept bounded.
            for (service, pid_file, _) in files.iter().filter(|(_, _, alive)| *alive) {
                self.hold(&id, service, pid_file.port);
                self.keep_bounded(&id, service);
            }
            if files.iter().any(|(_, _, alive)| *alive) {
                found.push(id);
            } else {
                let _ = std::fs::remove_dir_all(entry.path());
                for (service, pid_file, _) in &files {
                    self.free(&id, service, pid_file.port);
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sdp_protocol::{RestartPolicy, SandboxName};

    use super::*;
    use crate::runtime_log::{RuntimeLog, Tail};

    fn id(n: u64) -> SandboxId {
        SandboxId::parse(format!("sbx_{n:016x}")).unwrap()
    }

    fn orders() -> ServiceName {
        ServiceName::parse("orders").unwrap()
    }

    fn runtime(work: &Path) -> ProcessRuntime {
        ProcessRuntime::new(
            &work.join("run"),
            UserCode::default(),
            (20000, 60000),
            "127.0.0.1",
        )
    }

    fn request(work: &Path, sandbox: &SandboxId, run: &str) -> StartRequest {
        let checkout = work.join("checkout");
        std::fs::create_dir_all(&checkout).unwrap();
        StartRequest {
            sandbox_id: sandbox.clone(),
            sandbox: SandboxName::parse("pay-42").unwrap(),
            service: orders(),
            deployment: DeploymentId::parse("dep_0000000000000001").unwrap(),
            checkout,
            home: work.join("home"),
            run: run.into(),
            port: 8080,
            health: "/healthz".into(),
            env: BTreeMap::new(),
            restart: RestartPolicy::Never,
            output: Output {
                log: Arc::new(RuntimeLog::new(&work.join("state"))),
                deployment: None,
                tail: Tail::default(),
            },
        }
    }

    /// Whether a process whose command line holds `marker` runs (zombies hold none).
    fn running(marker: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
    }

    #[tokio::test]
    async fn a_service_that_exits_at_once_gives_its_port_back_when_its_files_are_cleared() {
        let work = tempfile::tempdir().unwrap();
        let runtime = runtime(work.path());
        let instance = runtime
            .start(request(work.path(), &id(1), "exit 0"))
            .await
            .unwrap();
        assert_eq!(runtime.ports.taken(), [instance.host_port]);
        instance.exit.await;
        // An agent's hello clears what runs no more.
        assert!(runtime.sandboxes().await.unwrap().is_empty());
        assert!(runtime.ports.taken().is_empty());
        runtime.stop_sandbox(&id(1)).await.unwrap();
        assert!(runtime.ports.taken().is_empty());
    }

    #[tokio::test]
    async fn a_dead_instance_of_an_earlier_run_never_frees_a_port_handed_out_again() {
        let work = tempfile::tempdir().unwrap();
        let runtime = runtime(work.path());
        let live = runtime
            .start(request(work.path(), &id(2), "exec sleep 60"))
            .await
            .unwrap();
        // An earlier run's instance, long gone, had the same port.
        std::fs::create_dir_all(work.path().join("run").join(id(1).as_str())).unwrap();
        let pid_file = PidFile {
            pid: i32::MAX,
            port: live.host_port,
            deployment: DeploymentId::parse("dep_0000000000000001").unwrap(),
            start_time: Some(1),
            boot_id: boot_id(),
        };
        let path = runtime.pid_path(&id(1), &orders());
        std::fs::write(&path, serde_json::to_vec(&pid_file).unwrap()).unwrap();
        assert_eq!(runtime.sandboxes().await.unwrap(), [id(2)]);
        assert!(!path.exists());
        assert_eq!(runtime.ports.taken(), [live.host_port]);
        runtime.stop_sandbox(&id(2)).await.unwrap();
        assert!(runtime.ports.taken().is_empty());
    }

    #[tokio::test]
    async fn an_instance_whose_pid_file_cannot_be_written_is_ended_and_frees_its_port() {
        let work = tempfile::tempdir().unwrap();
        let runtime = runtime(work.path());
        // A folder where the pid file goes makes writing it fail.
        std::fs::create_dir_all(runtime.pid_path(&id(3), &orders())).unwrap();
        let marker = "sleep 61.2345";
        let started = runtime
            .start(request(work.path(), &id(3), &format!("exec {marker}")))
            .await;
        assert!(started.is_err());
        assert!(runtime.ports.taken().is_empty());
        assert!(!running(marker), "the instance still runs");
    }
}
