//! The user that test agents run user code as.

use std::process::Command;

/// The unprivileged user that test agents run user code as, when the tests run as root (as
/// they do in CI). Created on first use and shared by the tests; `scripts/test.sh` removes it
/// at the end.
pub const RUN_AS: &str = "sdp-it-run";

pub(crate) fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The user an agent runs as when a test runs one without root ([`crate::TestEnv::start_unprivileged_agent`]):
/// not [`RUN_AS`], whose hostile builds in other tests running meanwhile would otherwise read
/// that agent's environment (its token) in `/proc`, as user code of the agent's own user may.
pub const PLAIN_AGENT: &str = "sdp-it-plain";

/// Creates [`RUN_AS`] unless it exists.
pub fn ensure_run_as_user() {
    ensure_user(RUN_AS);
}

/// Creates the system user `name` unless it exists; tests in parallel processes take turns
/// (`flock`), since `useradd` refuses to run while another holds `/etc/passwd`.
pub fn ensure_user(name: &str) {
    let script = format!(
        "id -u {name} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin {name}"
    );
    let out = Command::new("flock")
        .args(["/tmp/sdp-it-useradd.lock", "sh", "-c", &script])
        .output()
        .expect("flock runs");
    assert!(
        out.status.success(),
        "cannot create the user {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `run_as` line of a test agent's config: [`RUN_AS`] as root, nothing otherwise.
pub fn run_as_line() -> String {
    if running_as_root() {
        ensure_run_as_user();
        format!("run_as = \"{RUN_AS}\"\n")
    } else {
        String::new()
    }
}

/// `uid:gid` that user code runs as in the tests.
pub fn run_as_ids() -> String {
    let user = if running_as_root() {
        ensure_run_as_user();
        nix::unistd::User::from_name(RUN_AS).unwrap().unwrap()
    } else {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap()
    };
    format!("{}:{}", user.uid, user.gid)
}
