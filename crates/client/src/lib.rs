//! A client of one SDP control plane: typed calls of its JSON API (`sdp_api`), followers of
//! its log WebSockets that resume after a dropped connection ([`Follow`]), and the file the
//! command line keeps its session in ([`Store`]).
//!
//! Every failure is a [`ClientError`] that tells apart what the person can fix by logging in
//! (401), what the server refused (any other status, with its `code` and `message`), and a
//! server that cannot be reached at all.

mod follow;
mod store;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sdp_api::{
    Accepted, Agent, CreateSandbox, Deployment, ErrorBody, Extend, ListParams, LoginRequest,
    LoginResponse, Page, Redeploy, Sandbox, ServicePatch, SessionInfo,
};
use serde::de::DeserializeOwned;
use url::Url;

pub use follow::{Follow, Followed};
pub use store::{Store, StoreError, StoredSession};

/// How long a connection to the server may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer may take, whole. A login probes the git server and a branch listing
/// asks an agent, each within the server's own job timeout; a log can be long.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

type Http = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A request before it is sent: what [`Client::send`] needs.
struct Call {
    method: Method,
    url: Url,
    body: Option<Vec<u8>>,
}

impl Call {
    fn json<T: serde::Serialize>(mut self, body: &T) -> Call {
        self.body = Some(serde_json::to_vec(body).expect("API types serialize"));
        self
    }

    fn pair(mut self, key: &str, value: &str) -> Call {
        self.url.query_pairs_mut().append_pair(key, value);
        self
    }

    /// The fields of `params` (a flat struct of optional values) as the query.
    fn query<T: serde::Serialize>(mut self, params: &T) -> Call {
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(params) {
            let mut pairs = self.url.query_pairs_mut();
            for (key, value) in fields {
                match value {
                    serde_json::Value::Null => {}
                    serde_json::Value::String(s) => {
                        pairs.append_pair(&key, &s);
                    }
                    other => {
                        pairs.append_pair(&key, &other.to_string());
                    }
                }
            }
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the SDP server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an error: its status, and the body's `code` and `message`.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the server at {url} did not answer as SDP's API does: {reason}")]
    Protocol { url: String, reason: String },
    #[error("`{url}` is not a server URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

impl ClientError {
    /// The API's error code (`invalid_branch`, `reauth_required`…), when the server answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// A 401: no session, an ended one, or one the server cannot act for any more.
    pub fn needs_login(&self) -> bool {
        matches!(self, ClientError::Api { status: 401, .. })
    }
}

/// Typed requests to one SDP server, with or without a session token.
#[derive(Clone)]
pub struct Client {
    base: Url,
    token: Option<String>,
    http: Http,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

impl Client {
    /// A client of the server at `server` (`http://` or `https://`, with or without a path
    /// prefix such as `https://host/sdp`).
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: server.to_owned(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(server).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("it must start with http:// or https://"));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(bad(
                "it must not hold credentials; log in with `sdp login` instead",
            ));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("it must not have a query or a fragment"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let tls = Arc::new(tls_config()?);
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        // No redirect is followed: one would send the bearer token wherever it points.
        let http =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
        Ok(Client {
            base,
            token,
            http,
            tls,
        })
    }

    /// The server's URL, as given.
    pub fn server(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
    }

    /// `POST /api/login`: the server probes git with these credentials.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
    ) -> Result<LoginResponse, ClientError> {
        let body = LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        };
        self.json(self.request(Method::POST, &["api", "login"]).json(&body))
            .await
    }

    /// `POST /api/logout`: the session ends on the server.
    pub async fn logout(&self) -> Result<(), ClientError> {
        self.empty(self.request(Method::POST, &["api", "logout"]))
            .await
    }

    /// `GET /api/session`: who the token is, and until when.
    pub async fn session(&self) -> Result<SessionInfo, ClientError> {
        self.json(self.request(Method::GET, &["api", "session"]))
            .await
    }

    /// `GET /api/sandboxes/{name}`, or `None` when there is no such sandbox.
    pub async fn sandbox(&self, name: &str) -> Result<Option<Sandbox>, ClientError> {
        match self
            .json(self.request(Method::GET, &["api", "sandboxes", name]))
            .await
        {
            Ok(sandbox) => Ok(Some(sandbox)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every sandbox the filters of `params` select, page after page, newest first.
    pub async fn sandboxes(&self, params: ListParams) -> Result<Vec<Sandbox>, ClientError> {
        self.all_pages(&["api", "sandboxes"], params).await
    }

    /// One page of `GET /api/deployments`.
    pub async fn deployments(&self, params: &ListParams) -> Result<Page<Deployment>, ClientError> {
        self.json(
            self.request(Method::GET, &["api", "deployments"])
                .query(params),
        )
        .await
    }

    pub async fn create(&self, request: &CreateSandbox) -> Result<Accepted, ClientError> {
        self.json(
            self.request(Method::POST, &["api", "sandboxes"])
                .json(request),
        )
        .await
    }

    pub async fn redeploy(
        &self,
        sandbox: &str,
        request: &Redeploy,
    ) -> Result<Accepted, ClientError> {
        self.json(
            self.request(Method::POST, &["api", "sandboxes", sandbox, "deploy"])
                .json(request),
        )
        .await
    }

    pub async fn extend(&self, sandbox: &str, ttl: &str) -> Result<Sandbox, ClientError> {
        let body = Extend {
            ttl: ttl.to_owned(),
        };
        self.json(
            self.request(Method::POST, &["api", "sandboxes", sandbox, "extend"])
                .json(&body),
        )
        .await
    }

    /// `PATCH /api/sandboxes/{name}/services/{service}`: follow its branch, or stop.
    pub async fn set_follow(
        &self,
        sandbox: &str,
        service: &str,
        follow: bool,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(
                Method::PATCH,
                &["api", "sandboxes", sandbox, "services", service],
            )
            .json(&ServicePatch { follow }),
        )
        .await
    }

    /// `DELETE /api/sandboxes/{name}`: its services stop and it ends.
    pub async fn delete(&self, sandbox: &str) -> Result<(), ClientError> {
        self.empty(self.request(Method::DELETE, &["api", "sandboxes", sandbox]))
            .await
    }

    pub async fn deployment(&self, id: &str) -> Result<Deployment, ClientError> {
        self.json(self.request(Method::GET, &["api", "deployments", id]))
            .await
    }

    pub async fn agents(&self) -> Result<Vec<Agent>, ClientError> {
        self.json(self.request(Method::GET, &["api", "agents"]))
            .await
    }

    /// A deployment's whole log as text (`GET /api/deployments/{id}/logs`).
    pub async fn deployment_log(&self, id: &str) -> Result<String, ClientError> {
        self.text(self.request(Method::GET, &["api", "deployments", id, "logs"]))
            .await
    }

    /// A sandbox's runtime log as text (`GET /api/sandboxes/{id}/logs`), of one service
    /// when `service` is given.
    pub async fn runtime_log(
        &self,
        sandbox: &str,
        service: Option<&str>,
    ) -> Result<String, ClientError> {
        let mut req = self.request(Method::GET, &["api", "sandboxes", sandbox, "logs"]);
        if let Some(service) = service {
            req = req.pair("service", service);
        }
        self.text(req).await
    }

    /// Follows `/ws/deployments/{id}` from its first frame to its end.
    pub fn follow_deployment(&self, id: &str) -> Follow {
        Follow::new(
            self.clone(),
            self.ws_url(&["ws", "deployments", id]),
            Vec::new(),
            1,
        )
    }

    /// Follows `/ws/sandboxes/{id}/logs`: what is stored from `from` on, then what comes.
    pub fn follow_runtime(&self, sandbox: &str, service: Option<&str>, from: u64) -> Follow {
        let query = service
            .map(|s| vec![("service".to_owned(), s.to_owned())])
            .unwrap_or_default();
        Follow::new(
            self.clone(),
            self.ws_url(&["ws", "sandboxes", sandbox, "logs"]),
            query,
            from,
        )
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("an http(s) URL has a path");
            path.pop_if_empty();
            // Each segment is percent-encoded: a name can never reach another path.
            path.extend(segments);
        }
        url
    }

    fn ws_url(&self, segments: &[&str]) -> Url {
        let mut url = self.url(segments);
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .expect("ws and wss replace http and https");
        url
    }

    fn request(&self, method: Method, segments: &[&str]) -> Call {
        Call {
            method,
            url: self.url(segments),
            body: None,
        }
    }

    async fn all_pages<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        mut params: ListParams,
    ) -> Result<Vec<T>, ClientError> {
        let mut items = Vec::new();
        loop {
            let page: Page<T> = self
                .json(self.request(Method::GET, segments).query(&params))
                .await?;
            items.extend(page.items);
            match page.next {
                Some(next) => params.cursor = Some(next),
                None => return Ok(items),
            }
        }
    }

    async fn json<T: DeserializeOwned>(&self, req: Call) -> Result<T, ClientError> {
        let (url, body) = self.send(req).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            url,
            reason: e.to_string(),
        })
    }

    async fn text(&self, req: Call) -> Result<String, ClientError> {
        let (_, body) = self.send(req).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    async fn empty(&self, req: Call) -> Result<(), ClientError> {
        self.send(req).await.map(drop)
    }

    /// Sends `req`; a success's URL and body, or the error the answer (or its absence) means.
    async fn send(&self, call: Call) -> Result<(String, Vec<u8>), ClientError> {
        let path = call.url.path().to_owned();
        let mut req = Request::builder()
            .method(call.method)
            .uri(call.url.as_str())
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("sdp/", env!("CARGO_PKG_VERSION"))),
            );
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::BadUrl {
                    url: self.server().to_owned(),
                    reason: "the session token is not a valid header value".into(),
                }
            })?;
            req = req.header(AUTHORIZATION, value);
        }
        let body = match call.body {
            Some(body) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(body))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| ClientError::BadUrl {
            url: self.server().to_owned(),
            reason: e.to_string(),
        })?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| self.unreachable(&e))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(&e))?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Unreachable {
                url: self.server().to_owned(),
                reason: format!("no whole answer in {}s", ANSWER_TIMEOUT.as_secs()),
            })??;
        if status.is_success() {
            return Ok((path, body.to_vec()));
        }
        Err(api_error(status, &body, &path))
    }

    fn unreachable(&self, e: &(dyn std::error::Error + 'static)) -> ClientError {
        // The outer message is generic ("client error (Connect)"); the cause says why.
        let mut reason = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        ClientError::Unreachable {
            url: self.server().to_owned(),
            reason,
        }
    }
}

/// The error an unsuccessful answer means: the API's own `code` and `message` when it sent
/// them, else words for the status (a proxy in front of the server may answer by itself).
fn api_error(status: StatusCode, body: &[u8], url: &str) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => ClientError::Api {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: format!("http_{}", status.as_u16()),
            message: format!(
                "the server answered {status} to {url}{}",
                if status == StatusCode::NOT_FOUND {
                    " (is this an SDP server, and the right URL?)"
                } else {
                    ""
                }
            ),
        },
    }
}

/// rustls with ring (as the agent's), verifying servers against the system's trusted
/// certificates, which honour `SSL_CERT_FILE` and `SSL_CERT_DIR`.
fn tls_config() -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_path_segments_and_cannot_reach_another_path() {
        let client = Client::new("https://sdp.example.com/prefix", None).unwrap();
        assert_eq!(
            client.url(&["api", "sandboxes", "../agents?x=1"]).as_str(),
            "https://sdp.example.com/prefix/api/sandboxes/..%2Fagents%3Fx=1"
        );
        assert_eq!(
            client.ws_url(&["ws", "deployments", "dep_1"]).as_str(),
            "wss://sdp.example.com/prefix/ws/deployments/dep_1"
        );
        assert_eq!(client.server(), "https://sdp.example.com/prefix");
    }

    #[test]
    fn a_server_url_with_credentials_or_another_scheme_is_refused() {
        for bad in [
            "ftp://host",
            "http://user:pw@host",
            "host:8080",
            "http://h/?q=1",
        ] {
            assert!(
                matches!(Client::new(bad, None), Err(ClientError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_error_answer_keeps_the_apis_code_and_message() {
        let body = br#"{"error":{"code":"invalid_branch","message":"no branch nope"}}"#;
        let e = api_error(StatusCode::BAD_REQUEST, body, "/api/sandboxes");
        assert_eq!(e.code(), Some("invalid_branch"));
        assert_eq!(e.to_string(), "no branch nope");
        let e = api_error(StatusCode::BAD_GATEWAY, b"<html>", "/api/sandboxes");
        assert_eq!(e.code(), Some("http_502"));
    }
}
