//! The `sdp` binary doubles as git's askpass helper.
//!
//! git runs `$GIT_ASKPASS "<prompt>"` and reads the answer from its stdout. The agent sets
//! [`MODE_VAR`] and the credentials in git's environment only, so the helper learns them from
//! its own environment, inherited from git: the password is in no argv and no file.

use std::io::Write;

/// Set in git's environment to switch `sdp` into askpass mode.
pub const MODE_VAR: &str = "SDP_ASKPASS_MODE";
pub const USERNAME_VAR: &str = "SDP_ASKPASS_USERNAME";
pub const PASSWORD_VAR: &str = "SDP_ASKPASS_PASSWORD";

/// When this process was started as git's askpass helper, answers git's prompt and returns
/// the exit status to end with; otherwise `None`. Call it first thing in `main`.
pub fn answer_if_asked() -> Option<i32> {
    std::env::var_os(MODE_VAR)?;
    let prompt = std::env::args().nth(1).unwrap_or_default();
    let var = if prompt.starts_with("Username") {
        USERNAME_VAR
    } else if prompt.starts_with("Password") {
        PASSWORD_VAR
    } else {
        // A question we have no answer for (e.g. a host key): refusing makes git fail fast.
        return Some(1);
    };
    let Ok(answer) = std::env::var(var) else {
        return Some(1);
    };
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{answer}").and_then(|()| out.flush());
    Some(if written.is_ok() { 0 } else { 1 })
}
