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
            Access::Asset => {
                // Served to anyone; a file this version does not have is a 404, not a 401.
                let reply = Reply::from(env.http.request(method, &url).send().await.unwrap()).await;
                assert_eq!(reply.status, 404, "{} {}", route.method, route.path);
                assert_eq!(reply.error_code(), "not_found");
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
            Access::Webhook => {
                // Signed, not a session: this server has no secret, so the hook is off; with
                // one, an unsigned delivery is refused (see follow.rs).
                let reply = Reply::from(env.http.request(method, &url).send().await.unwrap()).await;
                assert_eq!(reply.status, 404, "{} {}", route.method, route.path);
                assert_eq!(reply.error_code(), "webhooks_off");
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

/// A request made with the session cookie, from a page at `origin` (none when `None`).
async fn by_cookie(
    env: &InProcessEnv,
    method: Method,
    path: &str,
    token: &str,
    origin: Option<&str>,
    body: serde_json::Value,
) -> Reply {
    let mut req = env
        .http
        .request(method, format!("{}{path}", env.url))
        .header("cookie", format!("sdp_session={token}"))
        .json(&body);
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    Reply::from(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_made_with_the_cookie_must_come_from_our_own_origin_and_a_bearer_token_need_not() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let create = |name: &str| serde_json::json!({"name": name, "services": [{"service": "orders", "branch": "main"}]});

    for origin in [None, Some("http://evil.example"), Some("null")] {
        let refused = by_cookie(
            &env,
            Method::POST,
            "/api/sandboxes",
            &token,
            origin,
            create("forged"),
        )
        .await;
        assert_eq!(refused.status, 403, "from {origin:?}: {}", refused.body);
        assert_eq!(refused.error_code(), "forbidden_origin");
    }
    let listed = env.get("/api/sandboxes", Some(&token)).await.json();
    assert_eq!(
        listed["items"],
        serde_json::json!([]),
        "a refused request changed nothing"
    );
    // Reading with the cookie needs no Origin: a page's GETs send none.
    let read = by_cookie(
        &env,
        Method::GET,
        "/api/sandboxes",
        &token,
        None,
        serde_json::json!(null),
    )
    .await;
    assert_eq!(read.status, 200, "{}", read.body);

    let ours = by_cookie(
        &env,
        Method::POST,
        "/api/sandboxes",
        &token,
        Some(&env.url),
        create("ours"),
    )
    .await;
    assert_eq!(ours.status, 202, "{}", ours.body);
    let deleted = by_cookie(
        &env,
        Method::DELETE,
        "/api/sandboxes/ours",
        &token,
        Some("http://evil.example"),
        serde_json::json!(null),
    )
    .await;
    assert_eq!(deleted.status, 403, "{}", deleted.body);

    // The command line sends its token itself, and no Origin: a browser cannot be made to.
    let bearer = env
        .http
        .post(format!("{}/api/sandboxes", env.url))
        .header("authorization", format!("Bearer {token}"))
        .header("origin", "http://evil.example")
        .json(&create("cli"))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 202);
    let deleted = env.delete_sandbox(&token, "cli").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_is_one_page_for_every_route_and_its_files_are_cached_by_version() {
    let env = InProcessEnv::builder().no_agents().start().await;
    let page = env.http.get(format!("{}/", env.url)).send().await.unwrap();
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let etag = page.headers()["etag"].to_str().unwrap().to_owned();
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let html = page.text().await.unwrap();
    for path in [
        "/login",
        "/sandboxes",
        "/new",
        "/sandboxes/demo",
        "/deployments/dep_1",
        "/agents",
    ] {
        let other = env
            .http
            .get(format!("{}{path}", env.url))
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 200, "{path}");
        assert_eq!(other.text().await.unwrap(), html, "{path}");
    }
    let again = env
        .http
        .get(format!("{}/sandboxes", env.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    // Every file the page names is served under its version, cacheable for a year.
    let script = html
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    assert!(
        script.starts_with("/assets/") && script.ends_with("/main.js"),
        "{script}"
    );
    let main = env
        .http
        .get(format!("{}{script}", env.url))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 200);
    assert_eq!(
        main.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert!(
        main.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let etag = main.headers()["etag"].to_str().unwrap().to_owned();
    let body = main.text().await.unwrap();
    assert!(body.contains("from './router.js'"), "{body}");
    let cached = env
        .http
        .get(format!("{}{script}", env.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    let dir = script.trim_end_matches("main.js");
    let css = env
        .http
        .get(format!("{}{dir}app.css", env.url))
        .send()
        .await
        .unwrap();
    assert!(
        css.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    // Another version's file is not this version's: the page must be loaded again.
    let stale = env
        .get(&script.replacen("/assets/", "/assets/0", 1), None)
        .await;
    assert_eq!(stale.status, 404);
    assert_eq!(stale.error_code(), "not_found");
    let missing = env.get(&format!("{dir}nope.js"), None).await;
    assert_eq!(missing.status, 404);
}
