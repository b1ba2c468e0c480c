//! A typed client of one SDP server's API, and the helpers tests wait and assert with.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{PASSWORD, USER};

/// Typed requests to one SDP server.
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str) -> Api {
        Api {
            url: url.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    pub async fn post_json(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.post(path, token, &body).await
    }

    /// `POST` of a typed request body (the API's own types, `sdp_api`).
    pub async fn post<T: serde::Serialize>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &T,
    ) -> Reply {
        let mut req = self.http.post(format!("{}{path}", self.url)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    /// `PATCH /api/sandboxes/{name}/services/{service}` with `{"follow": follow}`.
    pub async fn set_follow(&self, token: &str, name: &str, service: &str, follow: bool) -> Reply {
        let req = self
            .http
            .patch(format!(
                "{}/api/sandboxes/{name}/services/{service}",
                self.url
            ))
            .bearer_auth(token)
            .json(&sdp_api::ServicePatch { follow });
        Reply::from(req.send().await.unwrap()).await
    }

    /// `POST /api/sandboxes` with `SERVICE@BRANCH` selections that follow their branches.
    pub async fn create_following(&self, token: &str, name: &str, selections: &[&str]) -> Reply {
        let mut services = selection_list(selections);
        for s in &mut services {
            s.follow = Some(true);
        }
        let create = sdp_api::CreateSandbox {
            name: name.to_owned(),
            services,
            ttl: None,
        };
        self.post("/api/sandboxes", Some(token), &create).await
    }

    /// `POST /api/hooks/bitbucket` of `body` as Bitbucket sends it: `X-Event-Key: event`,
    /// `X-Request-Id: id`, and `X-Hub-Signature: signature` (see
    /// [`webhook_signature`](crate::webhook_signature)) when given.
    pub async fn deliver(
        &self,
        event: &str,
        id: &str,
        body: &Value,
        signature: Option<&str>,
    ) -> Reply {
        let mut req = self
            .http
            .post(format!("{}/api/hooks/bitbucket", self.url))
            .header("content-type", "application/json")
            .header("x-event-key", event)
            .header("x-request-id", id)
            .body(body.to_string());
        if let Some(s) = signature {
            req = req.header("x-hub-signature", s);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    /// [`Api::deliver`] signed with the kit's webhook secret.
    pub async fn deliver_signed(&self, event: &str, id: &str, body: &Value) -> Reply {
        let signature = crate::webhook_signature(body.to_string().as_bytes());
        self.deliver(event, id, body, Some(&signature)).await
    }

    /// `GET /api/hooks/deliveries`: the newest first.
    pub async fn deliveries(&self, token: &str) -> Vec<sdp_api::Delivery> {
        let reply = self.get("/api/hooks/deliveries", Some(token)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.typed::<sdp_api::Page<sdp_api::Delivery>>().items
    }

    /// `DELETE /api/sandboxes/{name}`.
    pub async fn delete_sandbox(&self, token: &str, name: &str) -> Reply {
        let req = self
            .http
            .delete(format!("{}/api/sandboxes/{name}", self.url))
            .bearer_auth(token);
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn login_as(&self, user: &str, password: &str) -> Reply {
        let login = sdp_api::LoginRequest {
            username: user.to_owned(),
            password: password.to_owned(),
        };
        self.post("/api/login", None, &login).await
    }

    /// Logs in as the test user ([`USER`]) and returns the session token.
    pub async fn login(&self) -> String {
        self.token_for(USER, PASSWORD).await
    }

    /// Logs in as `user` and returns the session token; the login must succeed.
    pub async fn token_for(&self, user: &str, password: &str) -> String {
        let reply = self.login_as(user, password).await;
        assert_eq!(reply.status, 200, "login of {user} failed: {}", reply.body);
        reply.typed::<sdp_api::LoginResponse>().token
    }

    /// `GET /api/health`.
    pub async fn health(&self) -> Value {
        self.http
            .get(format!("{}/api/health", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the server reports exactly `n` connected agents.
    pub async fn wait_for_connected_agents(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = self.health().await;
            if health["agents"].as_u64() == Some(n as u64) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} connected agents, health says {health}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /api/deployments/{id}/logs` of `deployment` (as the API gives it) as text.
    pub async fn deployment_log(&self, token: &str, deployment: &Value) -> String {
        let id = deployment["id"].as_str().expect("a deployment with an id");
        let reply = self
            .get(&format!("/api/deployments/{id}/logs"), Some(token))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body
    }

    /// The entry of `service` in sandbox `sandbox`, from the API.
    pub async fn sandbox_service(&self, token: &str, sandbox: &str, service: &str) -> Value {
        let sandbox = self
            .get(&format!("/api/sandboxes/{sandbox}"), Some(token))
            .await
            .json();
        sandbox["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == service)
            .cloned()
            .unwrap_or_else(|| panic!("no {service} in {sandbox}"))
    }

    /// A service instance's answer to `GET /` at `upstream` (`host:port`).
    pub async fn answer(&self, upstream: &str) -> String {
        self.http
            .get(format!("http://{upstream}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `POST /api/sandboxes` with `SERVICE@BRANCH` selections.
    pub async fn create_sandbox(&self, token: &str, name: &str, selections: &[&str]) -> Reply {
        let create = sdp_api::CreateSandbox {
            name: name.to_owned(),
            services: selection_list(selections),
            ttl: None,
        };
        self.post("/api/sandboxes", Some(token), &create).await
    }

    /// `POST /api/sandboxes/{name}/deploy`.
    pub async fn redeploy(&self, token: &str, name: &str, selections: &[&str]) -> Reply {
        let redeploy = sdp_api::Redeploy {
            services: selection_list(selections),
        };
        self.post(
            &format!("/api/sandboxes/{name}/deploy"),
            Some(token),
            &redeploy,
        )
        .await
    }

    /// `POST /api/sandboxes/{name}/deploy`, then waits for that deployment to end.
    pub async fn redeploy_and_wait(&self, token: &str, name: &str, selections: &[&str]) -> Value {
        let reply = self.redeploy(token, name, selections).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let id = reply.json()["deployment"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.wait_deployment(token, &id).await
    }

    /// Waits until deployment `id` ends, and returns it.
    pub async fn wait_deployment(&self, token: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let reply = self
                .get(&format!("/api/deployments/{id}"), Some(token))
                .await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            let d = reply.json();
            if !matches!(d["state"].as_str(), Some("queued" | "running")) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "deployment {id} never ended: {d}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a sandbox and waits for its first deployment; returns (sandbox, deployment).
    pub async fn deploy(&self, token: &str, name: &str, selections: &[&str]) -> (Value, Value) {
        let reply = self.create_sandbox(token, name, selections).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let id = reply.json()["deployment"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let deployment = self.wait_deployment(token, &id).await;
        let sandbox = self
            .get(&format!("/api/sandboxes/{name}"), Some(token))
            .await
            .json();
        (sandbox, deployment)
    }

    /// Every frame of `/ws/deployments/{id}?from=`, until the server closes.
    pub async fn log_frames(&self, token: &str, id: &str, from: u64) -> Vec<Value> {
        let url = format!(
            "{}/ws/deployments/{id}?from={from}",
            self.url.replacen("http://", "ws://", 1)
        );
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut frames = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(120), socket.next())
                .await
                .expect("a frame or the close within 120s");
            match next {
                Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(_))) | None => return frames,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("log socket failed after {frames:?}: {e}"),
            }
        }
    }

    /// `GET /api/services/{service}/branches` as sorted (name, commit) pairs.
    pub async fn branches(&self, service: &str, token: &str) -> Vec<(String, String)> {
        let reply = self
            .get(&format!("/api/services/{service}/branches"), Some(token))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let mut pairs: Vec<(String, String)> = reply
            .json()
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {}", reply.body))
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_owned(),
                    b["commit"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        pairs.sort();
        pairs
    }
}

/// A response read whole, for assertions that print it.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub async fn from(resp: reqwest::Response) -> Reply {
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The body as one of the API's types (`sdp_api`): a body that does not fit the type
    /// the server declares fails the test.
    pub fn typed<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a {} ({e}): {}", std::any::type_name::<T>(), self.body))
    }

    /// Asserts the error shape of SPEC §11 and returns the code.
    pub fn error_code(&self) -> String {
        let sdp_api::ErrorBody { error } = self.typed();
        assert!(
            !error.message.is_empty(),
            "an error needs a message: {}",
            self.body
        );
        error.code
    }
}

/// The state of step `name` in a deployment from `GET /api/deployments/{id}`.
pub fn step_state(deployment: &Value, name: &str) -> String {
    deployment["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["step"] == name))
        .and_then(|s| s["state"].as_str())
        .unwrap_or_else(|| panic!("no step {name} in {deployment}"))
        .to_owned()
}

/// Asks `check` every 100 ms until it gives a value, for at most `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` until it holds, for at most 30 s.
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn selection_list(selections: &[&str]) -> Vec<sdp_api::Selection> {
    selections
        .iter()
        .map(|s| {
            let (service, branch) = s.split_once('@').unwrap();
            sdp_api::Selection {
                service: service.to_owned(),
                branch: branch.to_owned(),
                follow: None,
            }
        })
        .collect()
}

/// Bitbucket Server's `repo:refs_changed` for a push to `branch` of the repository cloned
/// from `clone_url`, moving it from `from` to `to`.
pub fn server_push(clone_url: &str, branch: &str, from: &str, to: &str) -> Value {
    serde_json::json!({
        "eventKey": "repo:refs_changed",
        "date": "2026-12-01T10:00:00+0000",
        "actor": {"name": "alice", "displayName": "Alice"},
        "repository": {
            "slug": "orders",
            "project": {"key": "SHOP"},
            "links": {"clone": [
                {"href": clone_url, "name": "http"},
                {"href": "ssh://git@bitbucket.example.com:7999/shop/orders.git", "name": "ssh"}
            ]}
        },
        "changes": [{
            "ref": {"id": format!("refs/heads/{branch}"), "displayId": branch, "type": "BRANCH"},
            "refId": format!("refs/heads/{branch}"),
            "fromHash": from,
            "toHash": to,
            "type": "UPDATE"
        }]
    })
}

/// Bitbucket Cloud's `repo:push` for a push to `branch` of the repository at `html_url`.
pub fn cloud_push(html_url: &str, branch: &str, to: &str) -> Value {
    serde_json::json!({
        "actor": {"display_name": "Alice"},
        "repository": {"full_name": "shop/orders", "links": {"html": {"href": html_url}}},
        "push": {"changes": [{
            "new": {"type": "branch", "name": branch, "target": {"hash": to}},
            "old": {"type": "branch", "name": branch, "target": {"hash": "0123456789abcdef0123456789abcdef01234567"}}
        }]}
    })
}
