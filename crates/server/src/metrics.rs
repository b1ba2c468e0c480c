//! What `GET /metrics` shows, in the Prometheus text format.
//!
//! Counters and histograms are updated where their event happens: a deployment's end, a
//! step's end with its duration, each stored log line, each login's outcome. Gauges that are
//! a state of the world are read when scraped: agents connected (from the hub), sandboxes by
//! state (from the database); open WebSocket viewers are counted by a guard each viewer
//! holds ([`Viewing`]), so that none of them can drift from what is.
//!
//! The endpoint needs no session: every label is a fixed word (a state, a step, a role, an
//! outcome, a kind of log), never a user, sandbox, branch, service or agent name, nor an id.
//! The types here take enums, not strings, so that nothing else can become a label.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sdp_protocol::Role;

use crate::db::{DeploymentState, EndedStep, SandboxState};

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Labels: fixed words only (see the module's documentation).
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Step durations run from nothing (a skipped build, `healthy`) to a long build, in seconds.
const STEP_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Which log a stored line or a viewer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// A deployment's log (`/ws/deployments/{id}`).
    Deployment,
    /// A sandbox's runtime log (`/ws/sandboxes/{id}/logs`).
    Runtime,
}

impl LogKind {
    fn as_str(self) -> &'static str {
        match self {
            LogKind::Deployment => "deployment",
            LogKind::Runtime => "runtime",
        }
    }
}

/// How a `POST /api/login` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    /// A session was made.
    Accepted,
    /// The git server refused the username and password (401).
    Refused,
    /// A limit refused it before any agent was asked (429).
    RateLimited,
    /// A username or password that cannot be one (400).
    Invalid,
    /// No agent could check it, or it did not answer in time, or we failed (5xx).
    Failed,
}

impl LoginOutcome {
    const ALL: [LoginOutcome; 5] = [
        LoginOutcome::Accepted,
        LoginOutcome::Refused,
        LoginOutcome::RateLimited,
        LoginOutcome::Invalid,
        LoginOutcome::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            LoginOutcome::Accepted => "accepted",
            LoginOutcome::Refused => "refused",
            LoginOutcome::RateLimited => "rate_limited",
            LoginOutcome::Invalid => "invalid",
            LoginOutcome::Failed => "failed",
        }
    }
}

/// What became of a push webhook's delivery, by its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryResult {
    /// Signed with the secret, and new: handled.
    Valid,
    /// Signed with the secret, and seen before: nothing triggered.
    Duplicate,
    /// A signature that does not match (401).
    Invalid,
    /// No signature (401).
    Missing,
}

impl DeliveryResult {
    const ALL: [DeliveryResult; 4] = [
        DeliveryResult::Valid,
        DeliveryResult::Duplicate,
        DeliveryResult::Invalid,
        DeliveryResult::Missing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryResult::Valid => "valid",
            DeliveryResult::Duplicate => "duplicate",
            DeliveryResult::Invalid => "invalid",
            DeliveryResult::Missing => "missing",
        }
    }
}

/// The world as one scrape reads it.
pub struct World {
    /// The role of each connected agent.
    pub agents: Vec<Role>,
    /// How many live sandboxes are in each state (states left out have none).
    pub sandboxes: Vec<(SandboxState, u64)>,
}

pub struct Metrics {
    registry: Registry,
    deployments: Family<Labels<1>, Counter>,
    steps: Family<Labels<2>, Histogram, fn() -> Histogram>,
    log_lines: Family<Labels<1>, Counter>,
    logins: Family<Labels<1>, Counter>,
    deliveries: Family<Labels<1>, Counter>,
    viewers: Family<Labels<1>, Gauge>,
    agents: Family<Labels<1>, Gauge>,
    sandboxes: Family<Labels<1>, Gauge>,
    /// One scrape at a time sets the gauges of the world and encodes them, so a slower one
    /// never shows what it read over what a later one did.
    scrape: tokio::sync::Mutex<()>,
}

fn step_histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let deployments = Family::<Labels<1>, Counter>::default();
        registry.register(
            "sdp_deployments",
            "Deployments that ended, by final state (ready, failed, cancelled)",
            deployments.clone(),
        );
        let steps: Family<Labels<2>, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(step_histogram);
        registry.register_with_unit(
            "sdp_deployment_step_duration",
            "How long each step of a deployment took when it ended, by step and how it ended (done, failed, skipped)",
            Unit::Seconds,
            steps.clone(),
        );
        let log_lines = Family::<Labels<1>, Counter>::default();
        registry.register(
            "sdp_log_lines_stored",
            "Lines stored in deployment logs and runtime logs; rate() gives lines per second",
            log_lines.clone(),
        );
        let logins = Family::<Labels<1>, Counter>::default();
        registry.register(
            "sdp_logins",
            "Login attempts by outcome (accepted, refused, rate_limited, invalid, failed)",
            logins.clone(),
        );
        let viewers = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "sdp_websocket_viewers",
            "Open WebSocket viewers of deployment logs and runtime logs",
            viewers.clone(),
        );
        let agents = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "sdp_agents_connected",
            "Agents connected to the control plane, by role",
            agents.clone(),
        );
        let sandboxes = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "sdp_sandboxes",
            "Live sandboxes by state (ended ones are history, not counted)",
            sandboxes.clone(),
        );
        // Every series there can be starts at zero: a query over one that was never written
        // gives 0, not nothing.
        for state in DeploymentState::ALL.iter().filter(|s| !s.in_progress()) {
            deployments.get_or_create_owned(&[("state", state.as_str())]);
        }
        for kind in [LogKind::Deployment, LogKind::Runtime] {
            log_lines.get_or_create_owned(&[("log", kind.as_str())]);
            viewers.get_or_create_owned(&[("log", kind.as_str())]);
        }
        for outcome in LoginOutcome::ALL {
            logins.get_or_create_owned(&[("outcome", outcome.as_str())]);
        }
        let deliveries = Family::<Labels<1>, Counter>::default();
        registry.register(
            "sdp_webhook_deliveries",
            "Push webhook deliveries by result (valid, duplicate, invalid, missing signature)",
            deliveries.clone(),
        );
        for result in DeliveryResult::ALL {
            deliveries.get_or_create_owned(&[("result", result.as_str())]);
        }
        Self {
            registry,
            deployments,
            steps,
            log_lines,
            logins,
            deliveries,
            viewers,
            agents,
            sandboxes,
            scrape: tokio::sync::Mutex::new(()),
        }
    }
}

impl Metrics {
    /// A deployment ended in `state` (ready, failed or cancelled).
    pub fn deployment_ended(&self, state: DeploymentState) {
        self.deployments
            .get_or_create(&[("state", state.as_str())])
            .inc();
    }

    /// Steps of a deployment ended.
    pub fn steps_ended(&self, steps: &[EndedStep]) {
        for ended in steps {
            self.steps
                .get_or_create(&[
                    ("step", ended.step.as_str()),
                    ("state", ended.state.as_str()),
                ])
                .observe(ended.seconds);
        }
    }

    /// The counter of lines stored in logs of `kind`, for the log store to increment.
    pub fn stored_lines(&self, kind: LogKind) -> Counter {
        self.log_lines
            .get_or_create_owned(&[("log", kind.as_str())])
    }

    pub fn login(&self, outcome: LoginOutcome) {
        self.logins
            .get_or_create(&[("outcome", outcome.as_str())])
            .inc();
    }

    pub fn delivery(&self, result: DeliveryResult) {
        self.deliveries
            .get_or_create(&[("result", result.as_str())])
            .inc();
    }

    /// A viewer of a log of `kind` opened; it is counted until the guard is dropped.
    pub fn viewing(&self, kind: LogKind) -> Viewing {
        let gauge = self.viewers.get_or_create_owned(&[("log", kind.as_str())]);
        gauge.inc();
        Viewing(gauge)
    }

    /// Every metric, with the gauges of the world read by `read`, in the Prometheus text
    /// format. Scrapes take turns: see [`Metrics::scrape`]'s field.
    pub async fn encode<E>(
        &self,
        read: impl std::future::Future<Output = Result<World, E>>,
    ) -> Result<String, E> {
        let _turn = self.scrape.lock().await;
        let world = read.await?;
        for role in [Role::Micro, Role::Gateway] {
            let connected = world.agents.iter().filter(|r| **r == role).count();
            self.agents
                .get_or_create(&[("role", role.as_str())])
                .set(i64::try_from(connected).unwrap_or(i64::MAX));
        }
        for state in SandboxState::ALL.iter().filter(|s| !s.has_ended()) {
            let count = world
                .sandboxes
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            self.sandboxes
                .get_or_create(&[("state", state.as_str())])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        Ok(text)
    }
}

/// An open viewer, counted in `sdp_websocket_viewers` for as long as it lives.
pub struct Viewing(Gauge);

impl Drop for Viewing {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use sdp_protocol::{Step, StepState};

    use super::*;

    async fn scrape(metrics: &Metrics) -> String {
        let world = World {
            agents: vec![Role::Micro, Role::Micro, Role::Gateway],
            sandboxes: vec![(SandboxState::Ready, 2), (SandboxState::Deleted, 7)],
        };
        metrics
            .encode(async { Ok::<_, std::convert::Infallible>(world) })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn every_series_is_there_from_the_start_and_the_world_is_read_when_scraped() {
        let metrics = Metrics::default();
        let text = scrape(&metrics).await;
        for line in [
            "sdp_deployments_total{state=\"ready\"} 0",
            "sdp_deployments_total{state=\"cancelled\"} 0",
            "sdp_logins_total{outcome=\"rate_limited\"} 0",
            "sdp_log_lines_stored_total{log=\"runtime\"} 0",
            "sdp_websocket_viewers{log=\"deployment\"} 0",
            "sdp_agents_connected{role=\"micro\"} 2",
            "sdp_agents_connected{role=\"gateway\"} 1",
            "sdp_sandboxes{state=\"ready\"} 2",
            "sdp_sandboxes{state=\"sleeping\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            !text.contains("deleted"),
            "ended sandboxes are not counted:\n{text}"
        );
        assert!(!text.contains("state=\"queued\""), "{text}");
    }

    #[tokio::test]
    async fn a_viewer_counts_until_its_guard_is_dropped() {
        let metrics = Metrics::default();
        let first = metrics.viewing(LogKind::Runtime);
        let second = metrics.viewing(LogKind::Runtime);
        drop(first);
        let text = scrape(&metrics).await;
        assert!(
            text.contains("sdp_websocket_viewers{log=\"runtime\"} 1\n"),
            "{text}"
        );
        drop(second);
        let text = scrape(&metrics).await;
        assert!(
            text.contains("sdp_websocket_viewers{log=\"runtime\"} 0\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_step_is_observed_under_its_step_and_how_it_ended() {
        let metrics = Metrics::default();
        metrics.steps_ended(&[EndedStep {
            step: Step::Building,
            state: StepState::Done,
            seconds: 3.0,
        }]);
        let text = scrape(&metrics).await;
        let series = "sdp_deployment_step_duration_seconds";
        for line in [
            format!("{series}_bucket{{step=\"building\",state=\"done\",le=\"2.5\"}} 0"),
            format!("{series}_bucket{{step=\"building\",state=\"done\",le=\"5\"}} 1"),
            format!("{series}_count{{step=\"building\",state=\"done\"}} 1"),
            format!("{series}_sum{{step=\"building\",state=\"done\"}} 3.0"),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
