use std::time::Duration;

use reqwest::Method;
use sdp_server::api::{Access, route_table};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use sdp_testkit::{AGENT_TOKEN, Api, InProcessEnv, Reply, TestEnv};

use crate::SDP;

/// `/api/services/{name}/branches` -> `/api/services/x/branches`.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_but_login_and_health_refuses_a_missing_a_bad_and_an_expired_session() {
    let env = InProcessEnv::builder().session_ttl("1s").start().await;
    let expired = env.login().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bad = format!("sdp_{}", "0".repeat(64));

    let table = route_table();
    let public: Vec<&str> = table
        .iter()
        .filter(|r| r.access == Access::Public)
        .map(|r| r.path)
        .collect();
    assert_eq!(public, ["/api/health", "/api/login"]);

    for route in &table {
        let url = format!("{}{}", env.url, concrete(route.path));
        let method = Method::from_bytes(route.method.as_str().as_bytes()).unwrap();
        match route.access {
            Access::Public => continue,
            Access::Metrics => {
                // Aggregates only: served to anyone (see metrics.rs for what it holds).
                let resp = env.http.request(method, &url).send().await.unwrap();
                assert_eq!(resp.status(), 200, "{} {}", route.method, route.path);
                let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
                assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
            }
            Access::Page => {
                let resp = env.http.request(method, &url).send().await.unwrap();
                assert_eq!(resp.status(), 200, "{} {}", route.method, route.path);
                let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
                assert!(ct.starts_with("text/html"), "{ct}");
            }
            Access::Session | Access::SessionWebSocket => {
                let cases: [(&str, Option<String>); 4] = [
                    ("no session", None),
                    ("a bad token", Some(format!("Bearer {bad}"))),
                    ("garbage", Some("Bearer not-a-token".into())),
                    ("an expired session", Some(format!("Bearer {expired}"))),
                ];
                for (case, auth) in cases {
                    let mut req = env.http.request(method.clone(), &url);
                    if let Some(a) = auth {
                        req = req.header("authorization", a);
                    }
                    let reply = Reply::from(req.send().await.unwrap()).await;
                    assert_eq!(
                        reply.status, 401,
                        "{} {} with {case}: {}",
                        route.method, route.path, reply.body
                    );
                    reply.error_code();
                }
                let by_cookie = env
                    .http
                    .request(method.clone(), &url)
                    .header("cookie", format!("sdp_session={expired}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    by_cookie.status(),
                    401,
                    "{} {} with an expired cookie",
                    route.method,
                    route.path
                );
            }
            Access::Agent => {
                for auth in [
                    None,
                    Some("Bearer wrong".to_owned()),
                    Some(format!("Bearer {expired}")),
                ] {
                    let mut req = env.http.request(method.clone(), &url);
                    if let Some(a) = auth.clone() {
                        req = req.header("authorization", a);
                    }
                    let reply = Reply::from(req.send().await.unwrap()).await;
                    assert_eq!(
                        reply.status, 401,
                        "{} {} with {auth:?}: {}",
                        route.method, route.path, reply.body
                    );
                    reply.error_code();
                }
            }
        }
    }
}

async fn ws_status(api: &Api, path: &str, headers: &[(&'static str, String)]) -> u16 {
    let url = format!("{}{path}", api.url.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected WebSocket error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrades_without_a_session_or_from_a_foreign_origin_are_refused() {
    let env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    let path = "/ws/deployments/d-1";
    assert_eq!(ws_status(&env, path, &[]).await, 401);
    assert_eq!(
        ws_status(&env, path, &[("origin", env.url.clone())]).await,
        401
    );
    let auth = ("authorization", format!("Bearer {token}"));
    assert_eq!(
        ws_status(
            &env,
            path,
            &[auth.clone(), ("origin", "http://evil.example".into())]
        )
        .await,
        403
    );
    // Past both checks, the upgrade reaches the endpoint, which knows no such deployment.
    assert_eq!(
        ws_status(&env, path, &[auth.clone(), ("origin", env.url.clone())]).await,
        404
    );
    assert_eq!(
        ws_status(
            &env,
            path,
            &[
                ("cookie", format!("sdp_session={token}")),
                ("origin", env.url.clone())
            ]
        )
        .await,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_wrong_token_is_refused() {
    let mut env = TestEnv::builder(SDP).no_agents().start().await;
    assert_eq!(ws_status(&env, "/ws/agent", &[]).await, 401);
    assert_eq!(
        ws_status(
            &env,
            "/ws/agent",
            &[("authorization", "Bearer nope".into())]
        )
        .await,
        401
    );
    let almost = format!("Bearer {}x", AGENT_TOKEN);
    assert_eq!(
        ws_status(&env, "/ws/agent", &[("authorization", almost)]).await,
        401
    );

    env.start_agent("intruder", "micro", "not-the-token");
    env.agents[0].wait_for_line("the refusal", |l| l.contains("refused the agent token"));
    assert_eq!(env.health().await["agents"], 0);
}
