//! Processes a test starts: the `sdp` binary (or chromedriver), its output collected line by
//! line for assertions and for the failure report, and everything it started ended with it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::DEFAULT_LOG;

/// Runs `sdp` (the binary at `bin`) with `args` and, of the `SDP_*` variables, only those of
/// `env`; returns its exit status, stdout and stderr.
pub fn run_sdp(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    remove_sdp_variables(&mut cmd);
    cmd.envs(env.iter().copied());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Only what the test sets: no `SDP_*` variable of the developer's shell leaks in.
fn remove_sdp_variables(cmd: &mut Command) {
    for (key, _) in std::env::vars() {
        if key.starts_with("SDP_") {
            cmd.env_remove(key);
        }
    }
}

/// A running process whose output is collected line by line.
pub struct Proc {
    pub label: String,
    pub command: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(label: &str, mut cmd: Command) -> Proc {
        remove_sdp_variables(&mut cmd);
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", DEFAULT_LOG);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so that dropping it ends whatever it started too (git,
        // Chromium under chromedriver).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let command = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            label: label.to_owned(),
            command,
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a line satisfies `pred`, and returns it.
    pub fn wait_for_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before {what}\ncommand: {}\n{}",
                    self.label,
                    self.command,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged {what}\ncommand: {}\n{}",
                self.label,
                self.command,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the process with SIGKILL, as a crash or the OOM killer would: it gets no chance
    /// to tidy up. Processes it started in groups of their own live on.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every process whose working directory is under `dir`.
pub(crate) fn kill_processes_under(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A range of 50 ports nothing listens on now, so that tests running side by side do not
/// hand out the same ports.
pub(crate) fn free_port_range() -> String {
    loop {
        let base = 20_000 + (rand::random::<u16>() % 800) * 50;
        if (base..base + 50).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return format!("{base}-{}", base + 49);
        }
    }
}
