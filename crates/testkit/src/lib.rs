//! The test kit of SDP's integration tests (`crates/sdp/tests/it`), in two tiers:
//!
//! - [`TestEnv`]: the real `sdp` binary started as a server and as agents, on port 0, in a
//!   temporary directory per test, against a real git server with Basic auth
//!   ([`git_server`]), local baselines ([`baseline`]) and, for the docker runtime, the real
//!   Docker Engine ([`docker`]). For what crosses processes: agents, git, builds, the router,
//!   TLS, the command line, isolation. Its builder starts only what a test asks for: the git
//!   repositories it uses, a gateway agent or not, how many micro agents.
//! - [`InProcessEnv`]: the control plane in the test's own process ([`sdp_server::Server`] on
//!   port 0), with scripted fake agents ([`fake_agent`]) over the real WebSocket. For the HTTP
//!   API, validation, sessions, limits, the agent protocol and the deployment state machine:
//!   no Go, no Docker, no git, no process to start.
//!
//! Both hand out the same typed client ([`client::Api`], by `Deref`) and read the server's
//! SQLite file the same way ([`database`]). When a test fails, dropping its environment
//! prints every process's command line and log (or the in-process server's log and what the
//! fake agents were sent), so a red test says why without a rerun.
//!
//! Only the `sdp` crate's own tests know where its binary is (`env!("CARGO_BIN_EXE_sdp")`):
//! they hand that path to [`TestEnv::builder`] and [`run_sdp`].

/// The control plane's knobs, which both tiers' builders (`opts: Options`) set alike.
#[macro_export]
#[doc(hidden)]
macro_rules! server_knobs {
    () => {
        pub fn session_ttl(mut self, ttl: &'static str) -> Self {
            self.opts.session_ttl = ttl;
            self
        }

        pub fn sandbox_ttl(mut self, ttl: &'static str) -> Self {
            self.opts.sandbox_ttl = ttl;
            self
        }

        pub fn job_timeout(mut self, timeout: &'static str) -> Self {
            self.opts.job_timeout = timeout;
            self
        }

        pub fn agent_timeout(mut self, timeout: &'static str) -> Self {
            self.opts.agent_timeout = timeout;
            self
        }

        /// The server's `idle_after`: a sandbox unused this long sleeps ("0": never).
        pub fn idle_after(mut self, idle: &'static str) -> Self {
            self.opts.idle_after = Some(idle);
            self
        }

        /// The server's `wake_timeout`.
        pub fn wake_timeout(mut self, timeout: &'static str) -> Self {
            self.opts.wake_timeout = Some(timeout);
            self
        }

        /// The server's `[webhooks]`: the secret of `POST /api/hooks/bitbucket` (the kit's
        /// `WEBHOOK_SECRET`), how often followed branches are polled
        /// ("0": never) and how long pushes are gathered before a redeploy.
        pub fn webhooks(mut self, poll_interval: &'static str, debounce: &'static str) -> Self {
            self.opts.webhooks = Some(format!(
                "[webhooks]\nsecret = \"{}\"\npoll_interval = \"{poll_interval}\"\ndebounce = \"{debounce}\"\n",
                $crate::WEBHOOK_SECRET
            ));
            self
        }
    };
}

pub mod baseline;
mod catalog;
pub mod client;
pub mod database;
pub mod docker;
pub mod env;
pub mod fake_agent;
pub mod git_server;
pub mod in_process;
pub mod kubernetes;
pub mod process;
pub mod proxy;
pub mod shop;
pub mod users;

pub use baseline::{Baseline, TlsBaseline};
pub use client::{Api, Reply, cloud_push, eventually, server_push, step_state, wait_until};
pub use docker::{docker_available, docker_cleanup, docker_image, docker_inspect};
pub use env::{EnvBuilder, Options, TestEnv, files_containing};
pub use fake_agent::{Deploys, FakeAgent, Script, ScriptedAgent, Wakes};
pub use git_server::GitServer;
pub use in_process::{InProcessBuilder, InProcessEnv};
pub use process::{Proc, run_sdp};
pub use proxy::CutProxy;
pub use shop::{SHOP_BUILD, SHOP_REVISION_FILE, SHOP_SERVICES, shop_revision_source};
pub use users::{PLAIN_AGENT, RUN_AS, ensure_run_as_user, run_as_ids, run_as_line};

/// The secret of the test servers' push webhooks (see `webhooks` of the builders).
pub const WEBHOOK_SECRET: &str = "test-webhook-secret";

/// `sha256=<hex>` of `body` under [`WEBHOOK_SECRET`]: the `X-Hub-Signature` Bitbucket sends.
pub fn webhook_signature(body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The token every test agent and server share.
pub const AGENT_TOKEN: &str = "test-agent-token-0123456789";
/// The user the git server (and the fake agents) know from the start.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "correct horse battery staple";
/// Sandboxes are `<name>.sdp.test` on the router (`.test` never resolves outside).
pub const BASE_DOMAIN: &str = "sdp.test";

/// The log level of the processes a test starts (and of the in-process server): ours at
/// debug.
pub const DEFAULT_LOG: &str = "info,sdp=debug,sdp_server=debug,sdp_agent=debug";
