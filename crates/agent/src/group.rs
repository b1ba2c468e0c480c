//! Ends a child's whole process group when the work it belongs to is dropped (a teardown
//! cancels a deployment mid-build, a timeout ends a git call): killing only the child would
//! leave its own children (the compiler, git-remote-http) running.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Kills process group `pid` on drop, unless [`GroupGuard::disarm`]ed once the child ended.
pub struct GroupGuard(Option<i32>);

impl GroupGuard {
    /// `pid` leads its own group (the child was spawned with `process_group(0)`).
    pub fn new(pid: Option<u32>) -> GroupGuard {
        GroupGuard(pid.and_then(|p| i32::try_from(p).ok()))
    }

    pub fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
