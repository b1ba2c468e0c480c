//! The router's metrics, for the gateway agent's `/metrics` (Prometheus text): requests by
//! target and status class, and the upstream latency by target.
//!
//! The hot path adds a few relaxed atomic increments to a request, in its serving thread's
//! own shard (no lock, no allocation, no cache line shared with another thread); a scrape
//! adds the shards up. Labels are fixed words: a target and a status class, never a sandbox,
//! service or host.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use sdp_protocol::RouteKind;

/// Where a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Sent to a sandbox's instance (its status is the instance's, or 502/504 when the
    /// instance failed or was too slow).
    Sandbox,
    /// Sent to a service's baseline (likewise).
    Baseline,
    /// Answered by the router itself, no upstream asked: unknown sandbox, no route, no
    /// baseline, instance down, still waking, a path that cannot be forwarded.
    Router,
}

impl Target {
    const ALL: [Target; 3] = [Target::Sandbox, Target::Baseline, Target::Router];

    fn as_str(self) -> &'static str {
        match self {
            Target::Sandbox => "sandbox",
            Target::Baseline => "baseline",
            Target::Router => "router",
        }
    }
}

impl From<RouteKind> for Target {
    fn from(kind: RouteKind) -> Self {
        match kind {
            RouteKind::Sandbox | RouteKind::Gateway => Target::Sandbox,
            RouteKind::Baseline => Target::Baseline,
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of the latency buckets, in seconds: from a loopback instance to the upstream
/// timeout's default.
const LATENCY_BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// [`LATENCY_BOUNDS`] in nanoseconds, which the hot path compares with.
const LATENCY_BOUNDS_NS: [u64; 16] = {
    let mut ns = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        ns[i] = (LATENCY_BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// The latency of one target: a count per bucket (the last one past every bound), not
/// cumulative, and the sum.
#[derive(Debug, Default)]
struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

/// One serving thread's counts, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    /// By [`Target`], then status class.
    requests: [[AtomicU64; CLASSES.len()]; Target::ALL.len()],
    /// By [`Target::Sandbox`] and [`Target::Baseline`]: the router's own answers have none.
    latency: [Latency; 2],
}

#[derive(Debug)]
pub(crate) struct Metrics {
    shards: Box<[Shard]>,
}

impl Metrics {
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            shards: (0..threads.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    fn shard(&self, thread: usize) -> &Shard {
        &self.shards[thread % self.shards.len()]
    }

    /// A request answered on `thread`.
    pub(crate) fn request(&self, thread: usize, target: Target, status: StatusCode) {
        // A status past 599 is not HTTP's; it counts with the server errors.
        let class = usize::from(status.as_u16() / 100).clamp(1, CLASSES.len()) - 1;
        self.shard(thread).requests[target as usize][class].fetch_add(1, Ordering::Relaxed);
    }

    /// An upstream's response head came `elapsed` after its request was sent.
    pub(crate) fn upstream_latency(&self, thread: usize, kind: RouteKind, elapsed: Duration) {
        let latency = &self.shard(thread).latency[Target::from(kind) as usize];
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NS
            .iter()
            .position(|bound| ns <= *bound)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        latency.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        latency.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn requests(&self, target: Target, class: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.requests[target as usize][class].load(Ordering::Relaxed))
            .sum()
    }

    /// The buckets (bound, count), the count and the sum in seconds of a target's latency.
    fn latency(&self, target: Target) -> (Vec<(f64, u64)>, u64, f64) {
        let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .chain(std::iter::once(&f64::INFINITY))
            .map(|bound| (*bound, 0))
            .collect();
        let mut sum_ns = 0u64;
        for shard in &self.shards {
            let latency = &shard.latency[target as usize];
            for (total, count) in buckets.iter_mut().zip(&latency.buckets) {
                total.1 += count.load(Ordering::Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(latency.sum_ns.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        (buckets, count, sum_ns as f64 / 1e9)
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut requests = encoder.encode_descriptor(
            "sdp_router_requests",
            "Requests answered by the router, by target (sandbox, baseline, or the router's own answer) and status class",
            None,
            MetricType::Counter,
        )?;
        for target in Target::ALL {
            for (class, name) in CLASSES.iter().enumerate() {
                let labels = [("target", target.as_str()), ("status", *name)];
                requests
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&self.requests(target, class), None)?;
            }
        }
        let unit = Unit::Seconds;
        let mut latency = encoder.encode_descriptor(
            "sdp_router_upstream_latency",
            "Time from sending a request upstream to its response head, by target",
            Some(&unit),
            MetricType::Histogram,
        )?;
        for target in [Target::Sandbox, Target::Baseline] {
            let (buckets, count, sum) = self.latency(target);
            latency
                .encode_family(&[("target", target.as_str())])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// The answer of the metrics listener: the metrics at `GET /metrics`, a JSON error
/// otherwise.
pub(crate) fn answer(
    registry: &prometheus_client::registry::Registry,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if path != "/metrics" {
        let error =
            r#"{"error":{"code":"not_found","message":"this listener serves /metrics only"}}"#;
        (StatusCode::NOT_FOUND, "application/json", error.to_owned())
    } else if method != Method::GET && method != Method::HEAD {
        let error = r#"{"error":{"code":"method_not_allowed","message":"/metrics takes GET"}}"#;
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            error.to_owned(),
        )
    } else {
        (
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            encode(registry),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The metrics of `registry` as Prometheus text.
pub(crate) fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    prometheus_text::encode(&mut text, registry).expect("writing to a String does not fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: Metrics) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(metrics));
        encode(&registry)
    }

    #[test]
    fn requests_add_up_across_threads_by_target_and_status_class() {
        let metrics = Metrics::new(2);
        metrics.request(0, Target::Sandbox, StatusCode::OK);
        metrics.request(1, Target::Sandbox, StatusCode::CREATED);
        metrics.request(1, Target::Router, StatusCode::NOT_FOUND);
        metrics.request(0, Target::Baseline, StatusCode::SWITCHING_PROTOCOLS);
        let text = text(metrics);
        for line in [
            "sdp_router_requests_total{target=\"sandbox\",status=\"2xx\"} 2",
            "sdp_router_requests_total{target=\"router\",status=\"4xx\"} 1",
            "sdp_router_requests_total{target=\"baseline\",status=\"1xx\"} 1",
            "sdp_router_requests_total{target=\"baseline\",status=\"5xx\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn a_latency_lands_in_the_first_bucket_that_holds_it_and_in_the_sum() {
        let metrics = Metrics::new(1);
        metrics.upstream_latency(0, RouteKind::Baseline, Duration::from_millis(3));
        metrics.upstream_latency(0, RouteKind::Baseline, Duration::from_secs(100));
        let text = text(metrics);
        let series = "sdp_router_upstream_latency_seconds";
        for line in [
            format!("{series}_bucket{{target=\"baseline\",le=\"0.0025\"}} 0"),
            format!("{series}_bucket{{target=\"baseline\",le=\"0.005\"}} 1"),
            format!("{series}_bucket{{target=\"baseline\",le=\"60\"}} 1"),
            format!("{series}_bucket{{target=\"baseline\",le=\"+Inf\"}} 2"),
            format!("{series}_count{{target=\"baseline\"}} 2"),
            format!("{series}_sum{{target=\"baseline\"}} 100.003"),
            format!("{series}_count{{target=\"sandbox\"}} 0"),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
