//! Integration tests, in one binary so that everything links once, on the test kit
//! (`crates/testkit`) in two tiers: the real `sdp` binary against a real git server with Basic
//! auth (`sdp_testkit::TestEnv`), and the control plane in this process with scripted fake
//! agents (`sdp_testkit::InProcessEnv`) for the API and the deployment state machine.

mod access;
mod agents;
mod branches;
mod browser;
mod browser_pages;
mod browser_sandbox_view;
mod canary;
mod cli;
mod client;
mod compose;
mod deploy;
mod dev_smoke;
mod docker;
mod exhaustion;
mod follow;
mod frames;
mod gateway_service;
mod input;
mod isolation;
mod kubernetes;
mod lifecycle;
mod limits;
mod login;
mod metrics;
mod offline_images;
mod openapi;
mod router;
mod runtime;
mod runtime_log;
mod shared_builds;
mod ship;
mod shop;
mod sleep;
mod static_build;
mod supervision;
mod tls;

/// The binary under test, which the kit's end-to-end tier runs.
const SDP: &str = env!("CARGO_BIN_EXE_sdp");

/// Runs `sdp` with `args` and, of the `SDP_*` variables, only those of `env`; returns its
/// exit status, stdout and stderr.
fn run_sdp(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    sdp_testkit::run_sdp(SDP, args, env)
}
