//! What agents report of instances after `ready` (runtime frames), in-process with a fake
//! agent: the sandbox's runtime log (stored once, across reconnects and restarts; text with
//! filters; a live WebSocket; rotated; deleted with the sandbox), and each service's state
//! (crashed, unhealthy, restarted) in the API, the route table's `down` and the history.

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use sdp_testkit::fake_agent::wire::{runtime_instance, runtime_log};
use sdp_testkit::{Deploys, FakeAgent, InProcessEnv, Reply, wait_until};

/// A ready sandbox `name` running `selections`, with its id.
async fn ready(env: &InProcessEnv, token: &str, name: &str, selections: &[&str]) -> String {
    let (sandbox, deployment) = env.deploy(token, name, selections).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    sandbox["id"].as_str().unwrap().to_owned()
}

async fn text(env: &InProcessEnv, token: &str, path: &str) -> Reply {
    env.get(path, Some(token)).await
}

fn lines(reply: &Reply) -> Vec<String> {
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body.lines().map(str::to_owned).collect()
}

/// The last route table's entry for sandbox `name`.
fn routes_of(env: &InProcessEnv, name: &str) -> Option<Value> {
    let tables = env.script.jobs("routes");
    tables.last()?["job"]["sandboxes"]
        .as_array()?
        .iter()
        .find(|s| s["sandbox"] == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_lines_are_stored_once_and_read_as_text_by_service_since_and_tail() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let id = ready(&env, &token, "talk", &["orders@main", "billing@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;

    let first = vec![
        runtime_log(&id, 1, "orders", "stdout", "order 1 taken"),
        runtime_log(&id, 2, "billing", "stderr", "invoice failed"),
        runtime_log(&id, 3, "orders", "stdout", "order 2 taken"),
    ];
    agent.send_runtime(first).await;
    let ack = agent.next_runtime_answer().await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64()),
        (Some("runtime_ack"), Some(3)),
        "{ack}"
    );
    assert_eq!(ack["sandbox"], id.as_str());
    // Sent again after a reconnect, with one new: only the new one is stored.
    let again = vec![
        runtime_log(&id, 2, "billing", "stderr", "invoice failed"),
        runtime_log(&id, 3, "orders", "stdout", "order 2 taken"),
        runtime_log(&id, 4, "orders", "stdout", "order 3 taken"),
    ];
    agent.send_runtime(again).await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 4);

    let all = lines(&text(&env, &token, "/api/sandboxes/talk/logs").await);
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(
        all[1].ends_with("[billing/stderr] invoice failed"),
        "{all:?}"
    );
    let by_id = lines(&text(&env, &token, &format!("/api/sandboxes/{id}/logs")).await);
    assert_eq!(by_id, all);
    let billing = lines(&text(&env, &token, "/api/sandboxes/talk/logs?service=billing").await);
    assert_eq!(billing.len(), 1, "{billing:?}");
    let tail = lines(
        &text(
            &env,
            &token,
            "/api/sandboxes/talk/logs?service=orders&tail=2",
        )
        .await,
    );
    assert!(
        tail[0].ends_with("order 2 taken") && tail[1].ends_with("order 3 taken"),
        "{tail:?}"
    );
    let recent = lines(&text(&env, &token, "/api/sandboxes/talk/logs?since=10m").await);
    assert_eq!(recent.len(), 4);
    let future = lines(
        &text(
            &env,
            &token,
            "/api/sandboxes/talk/logs?since=2999-01-01T00:00:00Z",
        )
        .await,
    );
    assert!(future.is_empty(), "{future:?}");

    for (query, code) in [
        ("since=yesterday", "invalid_since"),
        ("tail=-1", "invalid_tail"),
        ("tail=lots", "invalid_tail"),
        ("service=nope", "invalid_service"),
        ("service=..%2Fetc", "invalid_service"),
    ] {
        let reply = text(&env, &token, &format!("/api/sandboxes/talk/logs?{query}")).await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
        assert_eq!(reply.error_code(), code, "{query}");
    }
    let unknown = text(&env, &token, "/api/sandboxes/nosuch/logs").await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let anonymous = env.get("/api/sandboxes/talk/logs", None).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_events_sent_again_after_a_control_plane_restart_are_not_stored_twice() {
    let mut env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let id = ready(&env, &token, "steady", &["orders@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    agent
        .send_runtime(vec![
            runtime_log(&id, 1, "orders", "stdout", "one"),
            runtime_log(&id, 2, "orders", "stdout", "two"),
        ])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 2);
    drop(agent);

    env.restart_server_with("", "").await;
    env.wait_for_agents(1).await;
    let token = env.login().await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    agent
        .send_runtime(vec![
            runtime_log(&id, 1, "orders", "stdout", "one"),
            runtime_log(&id, 2, "orders", "stdout", "two"),
            runtime_log(&id, 3, "orders", "stdout", "three"),
        ])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 3);
    let all = lines(&text(&env, &token, "/api/sandboxes/steady/logs").await);
    let said: Vec<&str> = all.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(said, ["one", "two", "three"], "{all:?}");
    // The log's own numbering went on from the file.
    let frames = frames_until(&env, &token, "steady", "?from=3", 1).await;
    assert_eq!(
        (frames[0]["seq"].as_u64(), frames[0]["line"].as_str()),
        (Some(3), Some("three"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gap_in_runtime_events_is_asked_for_again_and_nothing_after_it_is_stored() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let id = ready(&env, &token, "gappy", &["orders@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    agent
        .send_runtime(vec![runtime_log(&id, 1, "orders", "stdout", "one")])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 1);
    agent
        .send_runtime(vec![runtime_log(&id, 3, "orders", "stdout", "three")])
        .await;
    let resend = agent.next_runtime_answer().await;
    assert_eq!(
        (resend["type"].as_str(), resend["from_seq"].as_u64()),
        (Some("runtime_resend"), Some(2)),
        "{resend}"
    );
    agent
        .send_runtime(vec![
            runtime_log(&id, 2, "orders", "stdout", "two"),
            runtime_log(&id, 3, "orders", "stdout", "three"),
        ])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 3);
    let all = lines(&text(&env, &token, "/api/sandboxes/gappy/logs").await);
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all[1].ends_with("two"), "{all:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_takes_a_service_out_of_the_routes_and_its_restart_puts_it_back_with_history() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let id = ready(&env, &token, "crashy", &["orders@main", "billing@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;

    agent
        .send_runtime(vec![
            runtime_log(&id, 1, "orders", "stderr", "panic: nil map"),
            runtime_instance(&id, 2, "orders", "crashed", Some("exit code 2"), None, 0),
        ])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 2);
    let orders = env.sandbox_service(&token, "crashy", "orders").await;
    assert_eq!(orders["state"], "crashed", "{orders}");
    assert_eq!(orders["reason"], "exit code 2");
    assert_eq!(orders["last_lines"][0], "last words before exit code 2");
    assert!(orders["upstream"].is_null(), "{orders}");
    wait_until("the routes say orders is down", || {
        routes_of(&env, "crashy").is_some_and(|r| r["down"]["orders"] == "crashed")
    })
    .await;
    let routes = routes_of(&env, "crashy").unwrap();
    assert!(routes["upstreams"].get("orders").is_none(), "{routes}");
    assert!(routes["upstreams"].get("billing").is_some(), "{routes}");

    agent
        .send_runtime(vec![runtime_instance(
            &id,
            3,
            "orders",
            "restarting",
            Some("exit code 2"),
            None,
            1,
        )])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 3);
    let orders = env.sandbox_service(&token, "crashy", "orders").await;
    assert_eq!(
        (orders["state"].as_str(), orders["restarts"].as_u64()),
        (Some("crashed"), Some(1)),
        "{orders}"
    );

    agent
        .send_runtime(vec![runtime_instance(
            &id,
            4,
            "orders",
            "running",
            None,
            Some("127.0.0.1:20999"),
            1,
        )])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 4);
    let orders = env.sandbox_service(&token, "crashy", "orders").await;
    assert_eq!(orders["state"], "running", "{orders}");
    assert_eq!(orders["upstream"], "127.0.0.1:20999");
    assert!(orders["reason"].is_null(), "{orders}");
    wait_until("the routes send orders to where it runs now", || {
        routes_of(&env, "crashy").is_some_and(|r| {
            r["upstreams"]["orders"] == "127.0.0.1:20999" && r.get("down").is_none()
        })
    })
    .await;

    agent
        .send_runtime(vec![runtime_instance(
            &id,
            5,
            "billing",
            "unhealthy",
            Some("/healthz gave status 500"),
            None,
            0,
        )])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 5);
    assert_eq!(
        env.sandbox_service(&token, "crashy", "billing").await["state"],
        "unhealthy"
    );
    wait_until("the routes say billing is unhealthy", || {
        routes_of(&env, "crashy").is_some_and(|r| r["down"]["billing"] == "unhealthy")
    })
    .await;

    // Crashing too often: the agent gives up, and says so.
    agent
        .send_runtime(vec![runtime_instance(
            &id,
            6,
            "billing",
            "crashed",
            Some("gave up after 5 restarts within 600s"),
            None,
            5,
        )])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 6);

    let history = env.get("/api/sandboxes/crashy/history", Some(&token)).await;
    assert_eq!(history.status, 200, "{}", history.body);
    let history: Vec<sdp_api::HistoryEntry> = history.typed();
    let actions: Vec<&str> = history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "create_sandbox",
            "instance_crashed",
            "instance_restarting",
            "instance_restarted",
            "instance_unhealthy",
            "instance_gave_up",
        ]
    );
    assert!(
        history[1].detail.contains("orders: exit code 2"),
        "{:?}",
        history[1]
    );
    assert_eq!(history[1].actor, "agent:watcher");
    // The instance frames are in the runtime log too.
    let all = lines(&text(&env, &token, "/api/sandboxes/crashy/logs?service=orders").await);
    assert!(
        all.iter()
            .any(|l| l.ends_with("[orders] instance crashed: exit code 2 (restarts: 0)")),
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_report_for_a_service_being_deployed_leaves_the_deployment_to_say_what_runs() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let id = ready(&env, &token, "moving", &["orders@main"]).await;
    env.script.set_deploys(Deploys::Held);
    let reply = env.redeploy(&token, "moving", &["orders@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let deployment = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut agent = FakeAgent::connect(&env, "watcher").await;
    agent
        .send_runtime(vec![runtime_instance(
            &id,
            1,
            "orders",
            "crashed",
            Some("killed by SIGTERM"),
            None,
            0,
        )])
        .await;
    // Acknowledged (the line is kept), but the service stays the deployment's.
    assert_eq!(agent.next_runtime_answer().await["seq"], 1);
    assert_eq!(
        env.sandbox_service(&token, "moving", "orders").await["state"],
        "deploying"
    );

    env.script.release();
    let done = env.wait_deployment(&token, &deployment).await;
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(
        env.sandbox_service(&token, "moving", "orders").await["state"],
        "running"
    );
}

/// The first `n` frames of `/ws/sandboxes/{name}/logs{query}`.
async fn frames_until(
    env: &InProcessEnv,
    token: &str,
    name: &str,
    query: &str,
    n: usize,
) -> Vec<Value> {
    let mut socket = open_socket(env, token, name, query).await;
    let mut frames = Vec::new();
    while frames.len() < n {
        frames.push(next_frame(&mut socket).await.expect("a frame"));
    }
    frames
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_socket(env: &InProcessEnv, token: &str, name: &str, query: &str) -> Socket {
    let url = format!(
        "{}/ws/sandboxes/{name}/logs{query}",
        env.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// The next text frame, or `None` once the server closed.
async fn next_frame(socket: &mut Socket) -> Option<Value> {
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), socket.next())
            .await
            .expect("a frame or the close within 30s");
        match next {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(_))) | None => return None,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("runtime log socket failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_log_socket_replays_from_a_seq_streams_live_filters_and_ends_with_the_sandbox()
{
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let id = ready(&env, &token, "watched", &["orders@main", "billing@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    agent
        .send_runtime(vec![
            runtime_log(&id, 1, "orders", "stdout", "a"),
            runtime_log(&id, 2, "billing", "stdout", "b"),
            runtime_log(&id, 3, "orders", "stdout", "c"),
        ])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 3);

    let mut all = open_socket(&env, &token, "watched", "?from=2").await;
    let mut orders = open_socket(&env, &token, "watched", "?service=orders").await;
    let replayed = [
        next_frame(&mut all).await.unwrap(),
        next_frame(&mut all).await.unwrap(),
    ];
    assert_eq!(replayed[0]["seq"], 2, "{replayed:?}");
    assert_eq!(
        (replayed[0]["type"].as_str(), replayed[0]["line"].as_str()),
        (Some("log"), Some("b"))
    );
    assert_eq!(replayed[1]["seq"], 3);
    assert_eq!(next_frame(&mut orders).await.unwrap()["line"], "a");
    assert_eq!(next_frame(&mut orders).await.unwrap()["line"], "c");

    agent
        .send_runtime(vec![
            runtime_log(&id, 4, "billing", "stdout", "d"),
            runtime_log(&id, 5, "orders", "stderr", "e"),
        ])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 5);
    let live = next_frame(&mut all).await.unwrap();
    assert_eq!(
        (live["seq"].as_u64(), live["service"].as_str()),
        (Some(4), Some("billing"))
    );
    assert_eq!(next_frame(&mut all).await.unwrap()["line"], "e");
    let live = next_frame(&mut orders).await.unwrap();
    assert_eq!(
        (live["seq"].as_u64(), live["line"].as_str()),
        (Some(5), Some("e")),
        "billing's line is filtered out"
    );

    // Resuming where a viewer left off gives only what came after.
    let resumed = frames_until(&env, &token, "watched", "?from=5", 1).await;
    assert_eq!(resumed[0]["line"], "e");

    let deleted = env.api.delete_sandbox(&token, "watched").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    let end = next_frame(&mut all).await.unwrap();
    assert_eq!(
        (end["type"].as_str(), end["state"].as_str()),
        (Some("end"), Some("deleted")),
        "{end}"
    );
    assert!(next_frame(&mut all).await.is_none(), "closed after the end");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_output_rotates_the_runtime_log_and_a_deleted_sandbox_leaves_none() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .server_keys("max_runtime_log_size = \"64KiB\"")
        .start()
        .await;
    let token = env.login().await;
    let id = ready(&env, &token, "noisy", &["orders@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    let padding = "x".repeat(200);
    for batch in 0..10u64 {
        let events = (1..=300)
            .map(|i| {
                let seq = batch * 300 + i;
                runtime_log(
                    &id,
                    seq,
                    "orders",
                    "stdout",
                    &format!("line {seq} {padding}"),
                )
            })
            .collect();
        agent.send_runtime(events).await;
        assert_eq!(agent.next_runtime_answer().await["seq"], (batch + 1) * 300);
    }
    let dir = env.server_data_dir().join("runtime");
    let size = |name: &str| {
        std::fs::metadata(dir.join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let (current, rotated) = (size(&format!("{id}.log")), size(&format!("{id}.log.1")));
    assert!(
        current <= 64 * 1024 && rotated <= 64 * 1024 && rotated > 0,
        "{current} {rotated}"
    );
    let tail = lines(&text(&env, &token, "/api/sandboxes/noisy/logs?tail=1").await);
    assert!(tail[0].contains("line 3000 "), "{tail:?}");
    let all = lines(&text(&env, &token, "/api/sandboxes/noisy/logs").await);
    assert!(all.len() < 3000 && all.len() > 200, "{}", all.len());

    let deleted = env.api.delete_sandbox(&token, "noisy").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    assert_eq!(size(&format!("{id}.log")) + size(&format!("{id}.log.1")), 0);
    assert!(!dir.join(format!("{id}.log")).exists());
    // Later events of the ended sandbox are acknowledged, so the agent forgets them, and
    // dropped.
    agent
        .send_runtime(vec![runtime_log(&id, 3001, "orders", "stdout", "late")])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 3001);
    assert!(!dir.join(format!("{id}.log")).exists());
    let after = text(&env, &token, &format!("/api/sandboxes/{id}/logs")).await;
    assert_eq!((after.status, after.body.as_str()), (200, ""));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_log_socket_with_tail_replays_only_the_last_frames_that_pass_its_filter() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let id = ready(&env, &token, "tailed", &["orders@main", "billing@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    agent
        .send_runtime(vec![
            runtime_log(&id, 1, "orders", "stdout", "o1"),
            runtime_log(&id, 2, "billing", "stdout", "b1"),
            runtime_log(&id, 3, "orders", "stdout", "o2"),
            runtime_log(&id, 4, "billing", "stdout", "b2"),
            runtime_log(&id, 5, "orders", "stdout", "o3"),
        ])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 5);
    let said = |frames: Vec<Value>| -> Vec<String> {
        frames
            .iter()
            .map(|f| format!("{}:{}", f["seq"], f["line"].as_str().unwrap()))
            .collect()
    };
    let last = frames_until(&env, &token, "tailed", "?tail=2", 2).await;
    assert_eq!(said(last), ["4:b2", "5:o3"]);
    let billing = frames_until(&env, &token, "tailed", "?tail=1&service=billing", 1).await;
    assert_eq!(said(billing), ["4:b2"]);
    // `from` wins over `tail`: a viewer resuming asks for what it has not seen.
    let resumed = frames_until(&env, &token, "tailed", "?from=3&tail=1", 3).await;
    assert_eq!(said(resumed), ["3:o2", "4:b2", "5:o3"]);
    // Nothing of the past: the next frame is the next line.
    let mut socket = open_socket(&env, &token, "tailed", "?tail=0").await;
    agent
        .send_runtime(vec![runtime_log(&id, 6, "orders", "stdout", "o4")])
        .await;
    let next = next_frame(&mut socket).await.expect("a frame");
    assert_eq!(said(vec![next]), ["6:o4"]);
    let refused = env
        .get("/api/sandboxes/tailed/logs?tail=lots", Some(&token))
        .await;
    assert_eq!(refused.error_code(), "invalid_tail");
}
