//! `/metrics`, scraped and parsed as Prometheus would (`prometheus-parse`): the control
//! plane's after one deployment (in-process, with scripted agents), and the gateway agent's
//! after requests through the real router (end to end).

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use prometheus_parse::{Sample, Scrape, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use sdp_testkit::{InProcessEnv, TestEnv, USER};

use crate::SDP;

/// The Prometheus text format, version 0.0.4.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4";

/// `url`'s metrics: the text, and what the parser makes of it.
async fn scrape(http: &reqwest::Client, url: &str) -> (String, Scrape) {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(content_type.starts_with(TEXT_FORMAT), "{content_type}");
    let text = response.text().await.unwrap();
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    (text, parsed)
}

/// The sample of `name` with exactly `labels`.
fn sample<'s>(scrape: &'s Scrape, name: &str, labels: &[(&str, &str)]) -> &'s Sample {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .unwrap_or_else(|| {
            let names: Vec<String> = scrape
                .samples
                .iter()
                .map(|s| format!("{} {:?}", s.metric, *s.labels))
                .collect();
            panic!("no {name} {labels:?} among\n{}", names.join("\n"))
        })
}

/// The value of a counter, a gauge, or a histogram's `_count` or `_sum`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{name} {labels:?} is not a number: {other:?}"),
    }
}

/// Waits until `check` holds of the metrics at `url`.
async fn eventually(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (text, scraped) = scrape(http, url).await;
        if check(&scraped) {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_one_deployment_the_control_plane_counts_it_its_steps_logins_agents_sandboxes_and_viewers()
 {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let url = format!("{}/metrics", env.url);
    let refused = env.login_as(USER, "not the password").await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "metered", &["orders@main"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");

    // No session needed.
    let (text, m) = scrape(&env.http, &url).await;
    assert_eq!(
        value(&m, "sdp_deployments_total", &[("state", "ready")]),
        1.0
    );
    assert_eq!(
        value(&m, "sdp_deployments_total", &[("state", "failed")]),
        0.0
    );
    assert_eq!(
        value(&m, "sdp_deployments_total", &[("state", "cancelled")]),
        0.0
    );
    let steps = "sdp_deployment_step_duration_seconds";
    for step in ["fetching", "building", "starting", "healthy", "routing"] {
        let labels = [("step", step), ("state", "done")];
        assert_eq!(value(&m, &format!("{steps}_count"), &labels), 1.0, "{step}");
        let Value::Histogram(buckets) = &sample(&m, steps, &labels).value else {
            panic!("{steps} is not a histogram");
        };
        let all = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
        assert_eq!(all.count, 1.0, "{step}: {buckets:?}");
    }
    // The scripted agent pauses between steps: what it took is in the sum.
    assert!(
        value(
            &m,
            &format!("{steps}_sum"),
            &[("step", "fetching"), ("state", "done")]
        ) > 0.0
    );
    assert_eq!(value(&m, "sdp_agents_connected", &[("role", "micro")]), 1.0);
    assert_eq!(
        value(&m, "sdp_agents_connected", &[("role", "gateway")]),
        1.0
    );
    assert_eq!(value(&m, "sdp_sandboxes", &[("state", "ready")]), 1.0);
    assert_eq!(value(&m, "sdp_sandboxes", &[("state", "deploying")]), 0.0);
    assert_eq!(
        value(&m, "sdp_logins_total", &[("outcome", "accepted")]),
        1.0
    );
    assert_eq!(
        value(&m, "sdp_logins_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(
        value(&m, "sdp_logins_total", &[("outcome", "rate_limited")]),
        0.0
    );
    assert!(value(&m, "sdp_log_lines_stored_total", &[("log", "deployment")]) > 0.0);
    assert_eq!(
        value(&m, "sdp_websocket_viewers", &[("log", "runtime")]),
        0.0
    );
    // Aggregates only: no user, sandbox or deployment is named.
    for private in [
        USER,
        "metered",
        sandbox["id"].as_str().unwrap(),
        deployment["id"].as_str().unwrap(),
        "micro-0",
    ] {
        assert!(!text.contains(private), "{private} in\n{text}");
    }

    // A runtime log viewer counts while it is open, and no longer once it has left.
    let ws = format!(
        "{}/ws/sandboxes/metered/logs",
        env.url.replacen("http://", "ws://", 1)
    );
    let mut req = ws.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut viewer, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    eventually(&env.http, &url, "one runtime log viewer", |m| {
        value(m, "sdp_websocket_viewers", &[("log", "runtime")]) == 1.0
    })
    .await;
    viewer.send(Message::Close(None)).await.unwrap();
    eventually(&env.http, &url, "no runtime log viewer", |m| {
        value(m, "sdp_websocket_viewers", &[("log", "runtime")]) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_agent_counts_requests_by_target_and_status_class_and_times_its_upstreams() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(false)
        .start()
        .await;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.start_gateway_with(&format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n"));
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let token = env.login().await;
    let (_, deployment) = env.deploy(&token, "feat", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");

    let router = env.router_url();
    let send = |path: &str, sandbox: Option<&str>| {
        let mut req = env.http.get(format!("{router}{path}"));
        if let Some(name) = sandbox {
            req = req.header("X-SDP-Sandbox", name);
        }
        req.send()
    };
    let to_sandbox = send("/orders/1", Some("feat")).await.unwrap();
    assert_eq!(to_sandbox.status(), 200);
    assert_eq!(to_sandbox.headers()["x-sdp-route"], "sandbox");
    let to_baseline = send("/orders/1", None).await.unwrap();
    assert_eq!(to_baseline.status(), 200);
    assert_eq!(to_baseline.headers()["x-sdp-route"], "baseline");
    assert_eq!(
        send("/orders/1", Some("nobody")).await.unwrap().status(),
        404
    );
    assert_eq!(send("/nowhere", None).await.unwrap().status(), 404);

    let (text, m) = scrape(&env.http, &metrics).await;
    let requests = "sdp_router_requests_total";
    for (target, status, count) in [
        ("sandbox", "2xx", 1.0),
        ("baseline", "2xx", 1.0),
        ("router", "4xx", 2.0),
        ("sandbox", "5xx", 0.0),
        ("router", "2xx", 0.0),
    ] {
        let labels = [("target", target), ("status", status)];
        assert_eq!(value(&m, requests, &labels), count, "{labels:?}\n{text}");
    }
    let latency = "sdp_router_upstream_latency_seconds";
    for target in ["sandbox", "baseline"] {
        assert_eq!(
            value(&m, &format!("{latency}_count"), &[("target", target)]),
            1.0
        );
        assert!(value(&m, &format!("{latency}_sum"), &[("target", target)]) > 0.0);
    }
    assert!(!text.contains("feat") && !text.contains("nobody"), "{text}");

    // The metrics listener serves nothing else.
    let other = env
        .http
        .get(format!("http://127.0.0.1:{metrics_port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);

    // The control plane counted the real agent's steps.
    let (_, m) = scrape(&env.http, &format!("{}/metrics", env.url)).await;
    assert_eq!(
        value(&m, "sdp_deployments_total", &[("state", "ready")]),
        1.0
    );
    for step in ["fetching", "building", "starting", "healthy", "routing"] {
        let labels = [("step", step), ("state", "done")];
        let count = value(&m, "sdp_deployment_step_duration_seconds_count", &labels);
        assert_eq!(count, 1.0, "{step}");
    }
}
