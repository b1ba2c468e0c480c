use std::time::{Duration, Instant};

use sdp_testkit::{AGENT_TOKEN, FakeAgent, InProcessEnv, TestEnv};

use crate::SDP;

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_list_shows_connected_agents_with_role_version_and_host() {
    let mut env = TestEnv::builder(SDP).start().await;
    env.start_agent("edge", "gateway", AGENT_TOKEN);
    env.wait_for_agents(2).await;
    let token = env.login().await;
    let reply = env.get("/api/agents", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let agents = reply.json();
    let list = agents.as_array().unwrap();
    let micro = list
        .iter()
        .find(|a| a["name"] == "micro-0")
        .expect("micro-0 listed");
    assert_eq!(micro["role"], "micro");
    assert_eq!(micro["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(micro["connected"], true);
    assert!(!micro["host"].as_str().unwrap().is_empty());
    assert!(micro["last_seen"].as_str().unwrap().contains('T'));
    assert_eq!(micro["running"], 0);
    let gateway = list
        .iter()
        .find(|a| a["name"] == "edge")
        .expect("edge listed");
    assert_eq!(gateway["role"], "gateway");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_frame_is_reported_to_the_agent_and_the_connection_survives() {
    let env = InProcessEnv::builder().no_agents().start().await;
    let mut fake = FakeAgent::connect(&env, "fake-sloppy").await;
    for bad in [
        "not json",
        "{\"type\":\"launch\"}",
        "{\"type\":\"reply\",\"id\":\"x\"}",
    ] {
        fake.send_text(bad).await;
        let answer = fake.next_json().await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["code"], "malformed_frame", "{answer}");
    }
    fake.send_text(r#"{"type":"heartbeat","load":0,"running":0}"#)
        .await;
    assert_eq!(fake.next_json().await["type"], "heartbeat");
    assert_eq!(env.health().await["agents"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_silent_past_the_heartbeat_timeout_is_dropped() {
    let env = InProcessEnv::builder()
        .no_agents()
        .agent_timeout("2s")
        .start()
        .await;
    let _silent = FakeAgent::connect(&env, "fake-silent").await;
    env.wait_for_agents(1).await;
    let started = Instant::now();
    env.wait_for_agents(0).await;
    assert!(started.elapsed() < Duration::from_secs(6));
    let log = env.server_log();
    assert!(log.contains("silent past the heartbeat timeout"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_reconnect_by_themselves_after_the_control_plane_restarts() {
    let mut env = TestEnv::builder(SDP).repos(&["orders"]).start().await;
    let addr = env.url.trim_start_matches("http://").to_owned();
    env.stop_server();
    env.start_server(&addr);
    env.wait_for_agents(1).await;
    let token = env.login().await;
    let reply = env.get("/api/services/orders/branches", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_under_a_taken_name_is_refused_and_the_first_keeps_working() {
    let env = InProcessEnv::builder().start().await;
    let answer = match FakeAgent::try_connect(&env, "micro-0", "another-host").await {
        Ok(_) => panic!("a second micro-0 was welcomed"),
        Err(answer) => answer,
    };
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "name_taken", "{answer}");
    env.wait_for_agents(1).await;
    let token = env.login().await;
    let reply = env.get("/api/services/orders/branches", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}
