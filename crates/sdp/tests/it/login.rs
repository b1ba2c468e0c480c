use std::time::{Duration, Instant};

use sdp_testkit::{FakeAgent, InProcessEnv, PASSWORD, USER};

#[tokio::test(flavor = "multi_thread")]
async fn right_password_gives_a_session_usable_by_bearer_and_by_cookie() {
    let env = InProcessEnv::builder().start().await;
    let reply = env.login_as(USER, PASSWORD).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    let token = body["token"].as_str().unwrap();
    assert_eq!(body["user"], USER);
    assert!(body["expires_at"].as_str().unwrap().contains('T'));

    let cookie = reply.headers["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(
        cookie.starts_with(&format!("sdp_session={token}")),
        "{cookie}"
    );

    assert_eq!(env.get("/api/services", Some(token)).await.status, 200);
    let by_cookie = env
        .http
        .get(format!("{}/api/services", env.url))
        .header("cookie", format!("sdp_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_cookie.status(), 200);
    assert_eq!(env.count_rows("sessions"), 1);
    assert_eq!(env.count_rows("audit"), 1);
    assert_eq!(env.journal_mode(), "wal");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_refused_with_401_and_a_message_a_person_understands() {
    let env = InProcessEnv::builder().start().await;
    let reply = env.login_as(USER, "wrong password").await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.error_code(), "invalid_credentials");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not accept this username and password"),
        "{}",
        reply.body
    );
    let unknown = env.login_as("mallory", PASSWORD).await;
    assert_eq!(unknown.status, 401, "{}", unknown.body);
    assert_eq!(env.count_rows("sessions"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_without_a_connected_agent_is_503_saying_so() {
    let env = InProcessEnv::builder().no_agents().start().await;
    let reply = env.login_as(USER, PASSWORD).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.error_code(), "no_agent");
    assert!(
        reply.body.contains("no micro agent is connected"),
        "{}",
        reply.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_agent_gives_504_within_the_configured_timeout() {
    let env = InProcessEnv::builder()
        .no_agents()
        .job_timeout("2s")
        .start()
        .await;
    // Connected, says hello, then never answers a job.
    let _hung = FakeAgent::connect(&env, "fake-hung").await;
    env.wait_for_agents(1).await;
    let started = Instant::now();
    let reply = env.login_as(USER, PASSWORD).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert_eq!(reply.error_code(), "agent_timeout");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_ends_the_session() {
    let env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    let reply = env
        .post_json("/api/logout", Some(&token), serde_json::json!({}))
        .await;
    assert_eq!(reply.status, 204, "{}", reply.body);
    assert!(
        reply.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let after = env.get("/api/services", Some(&token)).await;
    assert_eq!(after.status, 401, "{}", after.body);
    assert_eq!(env.count_rows("sessions"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_session_gets_401() {
    let env = InProcessEnv::builder().session_ttl("2s").start().await;
    let token = env.login().await;
    assert_eq!(
        env.get("/api/services/orders/branches", Some(&token))
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for path in ["/api/services", "/api/services/orders/branches"] {
        let reply = env.get(path, Some(&token)).await;
        assert_eq!(reply.status, 401, "{path}: {}", reply.body);
        let code = reply.error_code();
        assert!(
            code == "session_expired" || code == "unauthenticated",
            "{code}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_control_plane_restart_the_session_holds_no_password_and_asks_to_log_in_again() {
    let mut env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    env.stop_server().await;
    env.start_server("127.0.0.1:0").await;
    assert_eq!(env.get("/api/services", Some(&token)).await.status, 200);
    let reply = env.get("/api/services/orders/branches", Some(&token)).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.error_code(), "reauth_required");
}
