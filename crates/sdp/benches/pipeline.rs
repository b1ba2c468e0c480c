//! Benchmarks of the deploy pipeline, with the real binary, git server and Go toolchain of the
//! integration tests (their test kit, `sdp-testkit`). Run with
//! `cargo bench -p sdp --bench pipeline`; it prints figures, it asserts nothing about speed.
//!
//! 1. Platform overhead of a deploy: a deployment's total time minus its fetching, building
//!    and starting steps (starting runs from the instance's start until its health check
//!    passes). What is left is SDP's own: the API, scheduling, the job, events and the end.
//! 2. The log pipeline: a build's lines travel agent -> control plane (file, then fan-out) ->
//!    1 or 100 WebSocket viewers. `chatty` prints 100,000 lines as fast as it can (throughput;
//!    its latency is mostly queueing behind the flood); `steady` prints 10,000 lines a second
//!    for 5 s (latency at that rate). Lines per second per viewer, latency from the agent's
//!    emission (`ts`) to receipt, and a check that every viewer got every `seq` once, in order.

use std::time::Duration;

use futures_util::StreamExt;
use sdp_testkit::TestEnv;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn parse(ts: &str) -> OffsetDateTime {
    OffsetDateTime::parse(ts, &Rfc3339).expect("RFC 3339")
}

fn ms(d: time::Duration) -> f64 {
    d.as_seconds_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn deploy_overhead(env: &TestEnv, token: &str, runs: usize) {
    let mut overheads = Vec::new();
    let mut totals = Vec::new();
    for i in 0..runs {
        let (_, d) = env
            .deploy(token, &format!("bench-{i}"), &["orders@main"])
            .await;
        assert_eq!(d["state"], "ready", "{d}");
        let total =
            parse(d["finished_at"].as_str().unwrap()) - parse(d["created_at"].as_str().unwrap());
        let mut steps = time::Duration::ZERO;
        for s in d["steps"].as_array().unwrap() {
            if let Some(end) = s["ended_at"].as_str() {
                steps += parse(end) - parse(s["started_at"].as_str().unwrap());
            }
        }
        overheads.push(ms(total - steps));
        totals.push(ms(total));
    }
    overheads.sort_by(f64::total_cmp);
    totals.sort_by(f64::total_cmp);
    println!(
        "deploy overhead over {runs} deploys of a Go service (process runtime): p50 {:.1} ms, max {:.1} ms (total p50 {:.0} ms)",
        percentile(&overheads, 0.5),
        overheads.last().unwrap(),
        percentile(&totals, 0.5),
    );
}

/// What a viewer keeps of a frame: parsed without building a JSON tree, so that 100 viewers
/// in this process take as little of the machine's two cores as possible from the server.
#[derive(serde::Deserialize)]
struct Seen<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    seq: u64,
    ts: &'a str,
    stream: Option<&'a str>,
}

/// One viewer: (seq, emitted, received, is a build line, is the end) of every frame.
async fn view(
    url: String,
    token: String,
) -> Vec<(u64, OffsetDateTime, OffsetDateTime, bool, bool)> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut frames = Vec::new();
    while let Some(Ok(msg)) = socket.next().await {
        if let Message::Text(t) = msg {
            let received = OffsetDateTime::now_utc();
            let seen: Seen = serde_json::from_str(&t).unwrap();
            let build = seen.kind == "log" && seen.stream == Some("stdout");
            frames.push((
                seen.seq,
                parse(seen.ts),
                received,
                build,
                seen.kind == "end",
            ));
        }
    }
    frames
}

/// Deploys `service` (whose build prints the lines) and measures what `viewers` viewers get.
async fn log_pipeline(env: &TestEnv, token: &str, service: &str, viewers: usize, round: usize) {
    let name = format!("{service}-{viewers}-{round}");
    let reply = env
        .create_sandbox(token, &name, &[&format!("{service}@main")])
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!(
        "{}/ws/deployments/{id}?from=1",
        env.url.replacen("http://", "ws://", 1)
    );
    let tasks: Vec<_> = (0..viewers)
        .map(|_| tokio::spawn(view(url.clone(), token.to_owned())))
        .collect();
    let mut latencies = Vec::new();
    let mut lines = 0usize;
    let mut rates = Vec::new();
    for task in tasks {
        let frames = task.await.unwrap();
        let seqs: Vec<u64> = frames.iter().map(|f| f.0).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "a viewer lost or doubled a frame"
        );
        assert!(frames.last().unwrap().4, "the last frame is the end");
        let build: Vec<_> = frames.iter().filter(|f| f.3).collect();
        lines = build.len();
        let (first, last) = (build.first().unwrap().1, build.last().unwrap().2);
        rates.push(lines as f64 / (last - first).as_seconds_f64());
        latencies.extend(build.iter().map(|f| ms(f.2 - f.1)));
    }
    latencies.sort_by(f64::total_cmp);
    rates.sort_by(f64::total_cmp);
    println!(
        "log pipeline, {service}, {viewers:>3} viewer(s): {lines} build lines to each, none lost or doubled; {:.0} lines/s per viewer (slowest {:.0}); emission to receipt p50 {:.1} ms, p99 {:.1} ms",
        percentile(&rates, 0.5),
        rates[0],
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
}

#[tokio::main]
async fn main() {
    let env = TestEnv::builder(env!("CARGO_BIN_EXE_sdp"))
        .repos(&["orders", "chatty", "steady"])
        .gateway(true)
        .log("warn,sdp_server=info")
        .job_timeout("60s")
        .start()
        .await;
    let token = env.login().await;
    // The first build fills the Go cache; it is not counted.
    let (_, warm) = env.deploy(&token, "warmup", &["orders@main"]).await;
    assert_eq!(warm["state"], "ready", "{warm}");

    // `cargo bench -p sdp --bench pipeline -- steady` runs only what names it.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |what: &str| only.is_empty() || only.iter().any(|o| what.contains(o.as_str()));
    if wanted("overhead") {
        deploy_overhead(&env, &token, 10).await;
    }
    let mut round = 0;
    for service in ["chatty", "steady"] {
        for viewers in [1, 100] {
            if !wanted(&format!("{service}-{viewers}")) {
                continue;
            }
            log_pipeline(&env, &token, service, viewers, round).await;
            round += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}
