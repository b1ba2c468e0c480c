//! The sandbox router end to end: the real `sdp` gateway agent routing to a real Go service
//! deployed in a sandbox and to a local baseline server, fed by the real control plane. What
//! the control plane decides alone (no gateway agent) runs in-process, with scripted agents.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use sdp_testkit::{AGENT_TOKEN, BASE_DOMAIN, FakeAgent, InProcessEnv, Reply, TestEnv, wait_until};

use crate::SDP;

/// A client that resolves `<sandbox>.sdp.test` to the router, as wildcard DNS would.
fn client(env: &TestEnv, sandboxes: &[&str]) -> reqwest::Client {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], env.gateway_port));
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
    for name in sandboxes {
        builder = builder.resolve(&format!("{name}.{BASE_DOMAIN}"), addr);
    }
    builder.build().unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    Reply::from(req.send().await.unwrap()).await
}

fn route(reply: &Reply) -> &str {
    reply
        .headers
        .get("x-sdp-route")
        .map_or("<none>", |v| v.to_str().unwrap())
}

/// What the baseline was sent: a header's values, by lower-case name.
fn seen(reply: &Reply, name: &str) -> Vec<String> {
    reply.json()["headers"][name]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

async fn requests(env: &TestEnv, token: &str, sandbox: &str) -> Vec<Value> {
    let reply = env
        .get(&format!("/api/sandboxes/{sandbox}/requests"), Some(token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_gets_its_services_by_host_header_or_baggage_and_the_baseline_the_rest() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .upstream_timeout("2s")
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "feat", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let url = format!("http://feat.{BASE_DOMAIN}:{}", env.gateway_port);
    assert_eq!(sandbox["url"], url.as_str());
    let http = client(&env, &["feat"]);
    let router = env.router_url();
    let in_sandbox = "orders on feature/x in feat\n";

    // Each way of naming the sandbox reaches its instance.
    let by_host = send(http.get(format!("{url}/orders/1"))).await;
    assert_eq!((by_host.status, by_host.body.as_str()), (200, in_sandbox));
    assert_eq!(route(&by_host), "sandbox");
    let by_header = send(
        http.get(format!("{router}/orders/1"))
            .header("X-SDP-Sandbox", "feat"),
    )
    .await;
    assert_eq!(
        (by_header.status, by_header.body.as_str()),
        (200, in_sandbox)
    );
    assert_eq!(route(&by_header), "sandbox");
    let by_baggage = send(
        http.get(format!("{router}/orders/1"))
            .header("baggage", "userId=7, sdp-sandbox=feat;ttl=1"),
    )
    .await;
    assert_eq!(
        (by_baggage.status, by_baggage.body.as_str()),
        (200, in_sandbox)
    );
    assert_eq!(route(&by_baggage), "sandbox");
    // The Host wins over the header.
    let both = send(
        http.get(format!("{url}/orders/1"))
            .header("X-SDP-Sandbox", "someone-else"),
    )
    .await;
    assert_eq!(both.body, in_sandbox);

    // A service the sandbox does not run goes to the baseline, with the sandbox passed on
    // and the forwarding fields set; hop-by-hop fields stay behind.
    let billing = send(
        http.get(format!("{url}/billing/invoices?page=2"))
            .header("baggage", "sdp-sandbox=feat")
            .header("Connection", "X-Hop")
            .header("X-Hop", "private")
            .header("X-Forwarded-For", "203.0.113.7")
            .header("X-End-To-End", "kept"),
    )
    .await;
    assert_eq!(billing.status, 200, "{}", billing.body);
    assert_eq!(route(&billing), "baseline");
    let seen_by_baseline = billing.json();
    assert_eq!(seen_by_baseline["from"], "baseline");
    assert_eq!(seen_by_baseline["path"], "/billing/invoices");
    assert_eq!(seen_by_baseline["query"], "page=2");
    assert_eq!(seen(&billing, "x-sdp-sandbox"), ["feat"]);
    assert_eq!(seen(&billing, "baggage"), ["sdp-sandbox=feat"]);
    // The test's gateway trusts no proxy: the client's claim is replaced by its address.
    assert_eq!(seen(&billing, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen(&billing, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        seen(&billing, "x-forwarded-host"),
        [format!("feat.{BASE_DOMAIN}:{}", env.gateway_port)]
    );
    assert_eq!(seen(&billing, "host"), [env.baseline.addr.to_string()]);
    assert_eq!(seen(&billing, "x-end-to-end"), ["kept"]);
    assert!(seen(&billing, "x-hop").is_empty(), "{seen_by_baseline}");

    // No sandbox named: plain baseline routing.
    let plain = send(http.get(format!("{router}/orders/1"))).await;
    assert_eq!(plain.status, 200);
    assert_eq!(route(&plain), "baseline");
    assert_eq!(plain.json()["path"], "/orders/1");
    assert!(seen(&plain, "x-sdp-sandbox").is_empty());

    // A sandbox the router does not know, by header or by Host.
    let unknown = send(
        http.get(format!("{router}/orders/1"))
            .header("X-SDP-Sandbox", "nope"),
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert_eq!(unknown.error_code(), "unknown_sandbox");
    assert!(unknown.body.contains("\\\"nope\\\""), "{}", unknown.body);
    let unknown_host = send(client(&env, &["ghost"]).get(format!(
        "http://ghost.{BASE_DOMAIN}:{}/orders",
        env.gateway_port
    )))
    .await;
    assert_eq!(unknown_host.error_code(), "unknown_sandbox");

    // Nothing routes this path.
    let nothing = send(http.get(format!("{router}/nothing/here"))).await;
    assert_eq!(nothing.status, 404);
    assert_eq!(nothing.error_code(), "no_route");
    let prefix_only = send(http.get(format!("{router}/ordersx"))).await;
    assert_eq!(prefix_only.error_code(), "no_route");

    // A baseline where nothing listens: 502 naming it.
    let down = send(http.get(format!("{router}/payments/1"))).await;
    assert_eq!(down.status, 502, "{}", down.body);
    assert_eq!(down.error_code(), "upstream_unreachable");
    assert!(down.body.contains("http://127.0.0.1:9"), "{}", down.body);

    // An https baseline: its certificate checked against the trusted ones.
    let secure = send(http.get(format!("{router}/secure/x"))).await;
    assert_eq!(secure.status, 200, "{}", secure.body);
    assert_eq!(secure.json()["from"], "tls baseline");
    assert_eq!(secure.json()["path"], "/secure/x");
    assert_eq!(
        secure.json()["host"],
        format!("localhost:{}", env.tls_baseline.addr.port())
    );
    let untrusted = send(http.get(format!("{router}/untrusted/x"))).await;
    assert_eq!(untrusted.status, 502, "{}", untrusted.body);
    assert!(untrusted.body.contains("TLS"), "{}", untrusted.body);

    // An instance slower than the upstream timeout: 504 naming it.
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    let slow = send(http.get(format!("{url}/orders/slow?ms=4000"))).await;
    assert_eq!(slow.status, 504, "{}", slow.body);
    assert_eq!(slow.error_code(), "upstream_timeout");
    assert!(slow.body.contains(upstream), "{}", slow.body);

    // Upstream connections are kept alive and reused. Not always exactly one: on a loaded
    // machine a pooled connection can miss the short wait for it to be ready and be replaced,
    // and the client may spread its requests over connections the router serves on
    // different threads, each with its own pool. Without reuse, there would be ten.
    let mut remotes = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let seen = send(http.get(format!("{url}/orders/headers"))).await;
        remotes.insert(seen.json()["remote"].as_str().unwrap().to_owned());
    }
    assert!(
        remotes.len() <= 3,
        "upstream connections reused expected: {remotes:?}"
    );

    // The routing key travels on: the instance calls the gateway with the header it was
    // given (the router added it, the request named the sandbox by Host), and stays inside.
    let nested = send(http.get(format!("{url}/orders/call?path=/orders/headers"))).await;
    assert_eq!(nested.status, 200, "{}", nested.body);
    assert_eq!(nested.headers["x-inner-route"], "sandbox");
    assert_eq!(nested.json()["from"], "orders on feature/x");
    assert_eq!(nested.json()["headers"]["X-Sdp-Sandbox"][0], "feat");
    let out = send(http.get(format!("{url}/orders/call?path=/billing/x"))).await;
    assert_eq!(out.headers["x-inner-route"], "baseline");
    assert_eq!(out.json()["headers"]["x-sdp-sandbox"][0], "feat");

    // The inspector shows this sandbox's decisions, newest answer first (an outer call after
    // the inner one it waited for), without query strings.
    let decisions = requests(&env, &token, "feat").await;
    let paths: Vec<&str> = decisions
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths[..2], ["/orders/call", "/billing/x"], "{decisions:?}");
    let inner = &decisions[1];
    assert_eq!(inner["route"], "baseline");
    assert_eq!(inner["service"], "billing");
    assert_eq!(inner["upstream"], env.baseline.url().as_str());
    let timed_out = decisions
        .iter()
        .find(|d| d["path"] == "/orders/slow")
        .expect("the slow request is listed");
    assert_eq!(timed_out["status"], 504);
    assert_eq!(timed_out["route"], "sandbox");
    assert_eq!(timed_out["upstream"], upstream);
    assert!(timed_out["duration_ms"].as_f64().unwrap() >= 2000.0);
    let first = decisions.last().unwrap();
    assert_eq!(
        (
            first["method"].as_str(),
            first["path"].as_str(),
            first["status"].as_u64()
        ),
        (Some("GET"), Some("/orders/1"), Some(200))
    );
    assert!(first["time"].as_str().unwrap().contains('T'));
    assert!(
        decisions
            .iter()
            .all(|d| d["path"] != "/billing/invoices?page=2")
    );
    // Requests that named no sandbox are in no sandbox's list.
    assert!(decisions.iter().all(|d| d["path"] != "/payments/1"));
    let unknown = env.get("/api/sandboxes/nope/requests", Some(&token)).await;
    assert_eq!(unknown.status, 404);
}

/// What the baseline is sent for `GET /billing/x` through a gateway whose
/// `trusted_proxies` is `trusted`, the request carrying `X-Forwarded-*` fields as a proxy in
/// front would (or as a client pretending to be one).
async fn forwarded_through_gateway_trusting(trusted: &str) -> (TestEnv, Reply, Reply) {
    let mut env = TestEnv::builder(SDP).no_agents().start().await;
    env.start_gateway_with(&format!("trusted_proxies = {trusted}\n"));
    let http = client(&env, &[]);
    let router = env.router_url();
    let claimed = send(
        http.get(format!("{router}/billing/x"))
            .header("X-Forwarded-For", "203.0.113.7")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "shop.example.com")
            .header("X-Forwarded-Port", "443")
            .header("X-Forwarded-Prefix", "/admin")
            .header("Forwarded", "for=203.0.113.7;proto=https")
            .header("X-Real-IP", "203.0.113.7"),
    )
    .await;
    assert_eq!(claimed.status, 200, "{}", claimed.body);
    let plain = send(http.get(format!("{router}/billing/x"))).await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    (env, claimed, plain)
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_fields_from_a_peer_not_trusted_are_replaced_by_what_the_router_sees_or_dropped()
{
    // Loopback, the test's only address, is left out of the list.
    let (env, claimed, plain) = forwarded_through_gateway_trusting(r#"["10.0.0.0/8"]"#).await;
    let host = format!("127.0.0.1:{}", env.gateway_port);
    for reply in [&claimed, &plain] {
        assert_eq!(seen(reply, "x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(seen(reply, "x-forwarded-proto"), ["http"]);
        assert_eq!(seen(reply, "x-forwarded-host"), [host.as_str()]);
        // Every other claim about the client is dropped too.
        for name in [
            "x-forwarded-port",
            "x-forwarded-prefix",
            "forwarded",
            "x-real-ip",
        ] {
            assert!(seen(reply, name).is_empty(), "{name}: {}", reply.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_fields_from_a_trusted_proxy_are_kept_with_the_peer_appended() {
    let (env, claimed, plain) =
        forwarded_through_gateway_trusting(r#"["10.0.0.0/8", "127.0.0.1/32"]"#).await;
    assert_eq!(
        seen(&claimed, "x-forwarded-for"),
        ["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(seen(&claimed, "x-forwarded-proto"), ["https"]);
    assert_eq!(seen(&claimed, "x-forwarded-host"), ["shop.example.com"]);
    assert_eq!(seen(&claimed, "x-forwarded-port"), ["443"]);
    assert_eq!(seen(&claimed, "x-real-ip"), ["203.0.113.7"]);
    // A request the proxy sent none with gets the router's own.
    assert_eq!(seen(&plain, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen(&plain, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        seen(&plain, "x-forwarded-host"),
        [format!("127.0.0.1:{}", env.gateway_port)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_through_both_ways_websockets_pass_and_a_route_change_drops_nothing() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders", "billing"])
        .gateway(true)
        .upstream_timeout("60s")
        .start()
        .await;
    let token = env.login().await;
    let (_, deployment) = env.deploy(&token, "big", &["orders@main"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let http = client(&env, &["big"]);
    let url = format!("http://big.{BASE_DOMAIN}:{}", env.gateway_port);

    // 50 MB up and 50 MB down.
    const SIZE: usize = 50 << 20;
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    let digest = hex(&Sha256::digest(&body));
    let up = send(http.post(format!("{url}/orders/upload")).body(body)).await;
    assert_eq!(up.status, 200, "{}", up.body);
    assert_eq!(up.body.trim(), format!("{SIZE} {digest}"));
    let mut down = http
        .get(format!("{url}/orders/download?mb=50"))
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), 200);
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    while let Some(chunk) = down.chunk().await.unwrap() {
        received += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(received, SIZE);
    let expected: Vec<u8> = (0..SIZE).map(|i| ((i % (1 << 20)) % 251) as u8).collect();
    assert_eq!(hex(&hasher.finalize()), hex(&Sha256::digest(&expected)));
    // Streamed, not held: the router's process never held a body's worth of memory.
    let peak = peak_rss_kib(env.gateway.as_ref().unwrap().pid());
    assert!(peak < 40 * 1024, "the gateway agent peaked at {peak} KiB");

    // A WebSocket through the router, to the baseline's echo.
    let mut request = format!("ws://127.0.0.1:{}/billing/ws", env.gateway_port)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("x-sdp-sandbox", "big".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["x-sdp-route"], "baseline");
    for text in ["hello", "through the router"] {
        socket.send(Message::Text(text.into())).await.unwrap();
        let answer = socket.next().await.unwrap().unwrap();
        assert_eq!(
            answer.into_text().unwrap().as_str(),
            format!("baseline echo: {text}")
        );
    }
    socket.close(None).await.unwrap();

    // Any upgrade, to the sandbox's own instance: the protocol it switched to, then bytes
    // both ways.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", env.gateway_port))
        .await
        .unwrap();
    raw.write_all(
        b"GET /orders/upgrade HTTP/1.1\r\nHost: big.sdp.test\r\nConnection: Upgrade\r\nUpgrade: h2c, echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        raw.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo\r\n"), "{head}");
    assert!(head.contains("x-sdp-route: sandbox\r\n"), "{head}");
    for text in [&b"ping"[..], b"through the router, both ways"] {
        raw.write_all(text).await.unwrap();
        let mut back = vec![0u8; text.len()];
        raw.read_exact(&mut back).await.unwrap();
        assert_eq!(back, text);
    }

    // A request in flight while its own route changes finishes on the table it started
    // with: it went to the baseline, and still comes back from there after the sandbox
    // started running that service.
    let slow = {
        let http = http.clone();
        let url = url.clone();
        tokio::spawn(async move { send(http.get(format!("{url}/billing/slow?ms=30000"))).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let redeployed = env
        .redeploy_and_wait(&token, "big", &["billing@feature/y"])
        .await;
    assert_eq!(redeployed["state"], "ready", "{redeployed}");
    let now = send(http.get(format!("{url}/billing/1"))).await;
    assert_eq!(now.body, "billing on feature/y in big\n");
    assert!(
        !slow.is_finished(),
        "the redeploy took {:?}: too long to test anything",
        started.elapsed()
    );
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "{}", slow.body);
    assert_eq!(slow.json()["from"], "baseline");
    assert_eq!(route(&slow), "baseline");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_redeploy_keeps_routes_which_go_before_instances_at_teardown_and_outlive_restarts()
{
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    for name in ["keep", "drop"] {
        let (_, d) = env.deploy(&token, name, &["orders@feature/x"]).await;
        assert_eq!(d["state"], "ready", "{d}");
    }
    let http = client(&env, &["keep", "drop"]);
    let port = env.gateway_port;
    let get = |name: &str| http.get(format!("http://{name}.{BASE_DOMAIN}:{port}/orders"));
    assert_eq!(
        send(get("drop")).await.body,
        "orders on feature/x in drop\n"
    );

    // A redeploy that fails to build leaves the running instance, and its route, as they
    // were: the sandbox still shows the service running its previous branch and commit.
    let before = env.get("/api/sandboxes/keep", Some(&token)).await.json();
    let failed = env
        .redeploy_and_wait(&token, "keep", &["orders@broken"])
        .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let still = send(get("keep")).await;
    assert_eq!(still.body, "orders on feature/x in keep\n");
    assert_eq!(route(&still), "sandbox");
    let after = env.get("/api/sandboxes/keep", Some(&token)).await.json();
    let (was, is) = (&before["services"][0], &after["services"][0]);
    assert_eq!(is["state"], "running", "{after}");
    assert_eq!(is["branch"], "feature/x", "{after}");
    assert_eq!(is["commit"], was["commit"], "{after}");
    assert_eq!(is["upstream"], was["upstream"], "{after}");

    // Teardown: the router forgets the sandbox before its instance is stopped.
    let reply = env
        .http
        .delete(format!("{}/api/sandboxes/drop", env.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    let mut gone = send(get("drop")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while gone.status != 404 {
        assert!(Instant::now() < deadline, "still routed: {}", gone.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
        gone = send(get("drop")).await;
    }
    assert_eq!(gone.error_code(), "unknown_sandbox");
    let micro = &env.agents[0];
    wait_until("the instance is torn down", || {
        micro.log_text().contains("sandbox torn down")
    })
    .await;
    let gateway_log = env.gateway.as_ref().unwrap().log_text();
    let unrouted = last_time_of(&gateway_log, "route table applied");
    let stopped = last_time_of(&micro.log_text(), "sandbox torn down");
    assert!(
        unrouted < stopped,
        "routes removed at {unrouted}, instance stopped at {stopped}"
    );

    // The control plane stops: the router keeps routing by the last table.
    env.stop_server();
    assert_eq!(
        send(get("keep")).await.body,
        "orders on feature/x in keep\n"
    );
    // The gateway agent restarts too: it routes by the table it saved.
    env.stop_gateway();
    env.start_gateway();
    let after = send(get("keep")).await;
    assert_eq!(after.body, "orders on feature/x in keep\n");
    assert_eq!(route(&after), "sandbox");
    assert_eq!(send(get("drop")).await.error_code(), "unknown_sandbox");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_gateway_agent_a_deployment_fails_at_routing_saying_so() {
    let env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "lost", &["orders@main"]).await;
    assert_eq!(deployment["state"], "failed", "{deployment}");
    assert!(
        deployment["error"]
            .as_str()
            .unwrap()
            .contains("no gateway agent is connected"),
        "{deployment}"
    );
    assert_eq!(routing_step(&deployment)["state"], "failed", "{deployment}");
    assert_eq!(sandbox["state"], "failed");
    let inspector = env.get("/api/sandboxes/lost/requests", Some(&token)).await;
    assert_eq!(inspector.status, 503, "{}", inspector.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_waiting_for_its_gateway_survives_its_micro_agent_restarting() {
    let Held {
        mut env,
        token,
        mut gateway,
        id,
        routing,
    } = Held::deploy("held").await;
    let d = env
        .get(&format!("/api/deployments/{id}"), Some(&token))
        .await
        .json();
    assert_eq!(d["state"], "running", "{d}");

    // The micro agent restarts while the gateway holds the table: the deployment is past its
    // agent, and must not fail for it.
    env.agents[0].stop();
    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    let micro = env.agents.last().unwrap();
    wait_until("the micro agent is back", || {
        micro.log_text().contains("connected to the control plane")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = env
        .get(&format!("/api/deployments/{id}"), Some(&token))
        .await
        .json();
    assert_eq!(d["state"], "running", "{d}");

    gateway
        .reply(&routing, json!({"outcome": "routes_applied"}))
        .await;
    let d = env.wait_deployment(&token, &id).await;
    assert_eq!(d["state"], "ready", "{d}");
    assert_eq!(routing_step(&d)["state"], "done", "{d}");
}

/// A deployment's `routing` step.
fn routing_step(deployment: &Value) -> &Value {
    deployment["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "routing")
        .unwrap_or_else(|| panic!("no routing step: {deployment}"))
}

/// A deployment of `orders@main` held at `routing`: its gateway is a fake one that applied
/// every table until the one that routes the new instance, which it leaves unanswered.
struct Held {
    env: TestEnv,
    token: String,
    gateway: FakeAgent,
    /// The deployment's id.
    id: String,
    /// The unanswered `routes` job.
    routing: Value,
}

impl Held {
    async fn deploy(sandbox: &str) -> Held {
        let env = TestEnv::builder(SDP)
            .repos(&["orders"])
            .job_timeout("60s")
            .agent_timeout("60s")
            .start()
            .await;
        let token = env.login().await;
        let mut gateway = FakeAgent::connect_as(&env, "slow-gateway", "gateway").await;
        let reply = env.create_sandbox(&token, sandbox, &["orders@main"]).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let id = reply.json()["deployment"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        // Tables come as the gateway connects, as the sandbox is created, then with its
        // instance's upstream.
        let routing = loop {
            let job = gateway.next_job("routes").await;
            let routed = job["job"]["sandboxes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["sandbox"] == sandbox)
                .cloned();
            if routed.is_some_and(|s| s["upstreams"]["orders"].is_string()) {
                break job;
            }
            gateway
                .reply(&job, json!({"outcome": "routes_applied"}))
                .await;
        };
        Held {
            env,
            token,
            gateway,
            id,
            routing,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_cut_short_by_a_control_plane_restart_resumes_once_a_gateway_is_back() {
    // The table with the new instance is never answered: the control plane stops first.
    let Held {
        mut env,
        gateway,
        id,
        ..
    } = Held::deploy("resumed").await;
    let addr = env.url.trim_start_matches("http://").to_owned();
    env.stop_server();
    drop(gateway);
    env.start_server(&addr);
    // The gateway takes a moment to come back, as a real one would after its backoff.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut gateway = FakeAgent::connect_as(&env, "slow-gateway", "gateway").await;
    let token = env.login().await;
    let waiting = env.wait_deployment(&token, &id);
    tokio::pin!(waiting);
    let d = loop {
        tokio::select! {
            d = &mut waiting => break d,
            job = gateway.next_job("routes") => {
                gateway.reply(&job, json!({"outcome": "routes_applied"})).await;
            }
        }
    };
    assert_eq!(d["state"], "ready", "{d}");
    assert_eq!(routing_step(&d)["state"], "done", "{d}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The process's peak resident memory (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The timestamp of the last JSON log line whose message is `message`.
fn last_time_of(log: &str, message: &str) -> String {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == message)
        .and_then(|v| v["timestamp"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no {message:?} in\n{log}"))
}
