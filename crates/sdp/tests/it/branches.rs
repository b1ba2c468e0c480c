use std::time::{Duration, Instant};

use sdp_testkit::{FakeAgent, InProcessEnv, TestEnv};

use crate::SDP;

#[tokio::test(flavor = "multi_thread")]
async fn the_branch_list_equals_what_git_ls_remote_heads_says_with_commits() {
    let env = TestEnv::builder(SDP).repos(&["orders"]).start().await;
    let token = env.login().await;
    let listed = env.branches("orders", &token).await;
    let expected = env.git.heads("orders");
    assert_eq!(expected.len(), 5);
    assert_eq!(listed, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_service_gets_404() {
    let env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    for name in ["nope", "--upload-pack=x", "ORDERS"] {
        let reply = env
            .get(&format!("/api/services/{name}/branches"), Some(&token))
            .await;
        assert_eq!(reply.status, 404, "{name}: {}", reply.body);
        assert_eq!(reply.error_code(), "unknown_service");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_list_is_the_catalog() {
    let env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    let reply = env.get("/api/services", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let services = reply.json();
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "orders",
            "billing",
            "payments",
            "stuck",
            "chatty",
            "steady",
            "secure",
            "untrusted",
            "hostile",
            "talker",
            "fragile",
            "brittle",
            "torrent",
        ]
    );
    assert_eq!(services[0]["repo"], env.repo_url("orders"));
    assert_eq!(services[0]["routes"], serde_json::json!(["/orders"]));
    assert_eq!(services[0]["baseline"], env.baseline_url().as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_branch_list_is_503_without_an_agent_and_504_with_a_hung_one() {
    let mut env = InProcessEnv::builder().job_timeout("2s").start().await;
    let token = env.login().await;
    env.agents.clear();
    env.wait_for_agents(0).await;
    let reply = env.get("/api/services/orders/branches", Some(&token)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.error_code(), "no_agent");

    let _hung = FakeAgent::connect(&env, "fake-hung").await;
    let started = Instant::now();
    let reply = env.get("/api/services/orders/branches", Some(&token)).await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert_eq!(reply.error_code(), "agent_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_git_server_that_hangs_is_cut_off_by_the_git_timeout() {
    let env = TestEnv::builder(SDP)
        .repos(&["stuck"])
        .git_timeout("2s")
        .start()
        .await;
    let token = env.login().await;
    let started = Instant::now();
    let reply = env.get("/api/services/stuck/branches", Some(&token)).await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert_eq!(reply.error_code(), "git_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The whole process group went: no git helper is left talking to the server.
    let stuck = env.git.url("stuck");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&stuck))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "git processes left: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
