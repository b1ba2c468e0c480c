//! A router on a loopback port, the wakes it asks for, and a small HTTP upstream that says
//! what it was sent.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sdp_protocol::{RouteTable, SandboxName, SandboxRoutes, ServiceName, ServiceRoutes};
use sdp_router::{Reports, Router, RouterConfig};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

pub const BASE_DOMAIN: &str = "sandbox.test";

/// The wakes a router asked for, in order.
#[derive(Default)]
pub struct WakesAsked(Mutex<Vec<String>>);

impl WakesAsked {
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Reports for WakesAsked {
    fn wake(&self, sandbox: &str) {
        self.0.lock().unwrap().push(sandbox.to_owned());
    }
}

pub struct TestRouter {
    pub router: Router,
    pub addr: SocketAddr,
    pub wakes: Arc<WakesAsked>,
    pub http: reqwest::Client,
    _stop: DropGuard,
}

impl TestRouter {
    /// A router with two serving threads, routing by `table`.
    pub async fn start(table: &RouteTable) -> Self {
        let wakes = Arc::new(WakesAsked::default());
        let router = Router::with_reports(
            RouterConfig {
                threads: 2,
                ..RouterConfig::default()
            },
            wakes.clone(),
        );
        router.install(table).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let serving = router.clone();
        let shutdown = stop.clone();
        tokio::spawn(async move { serving.serve(listener, shutdown).await });
        Self {
            router,
            addr,
            wakes,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            _stop: stop.drop_guard(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request for `path` naming `sandbox` by `X-SDP-Sandbox`, sent in a task of its own.
    pub fn get(&self, sandbox: &str, path: &str) -> tokio::task::JoinHandle<Answer> {
        self.send(
            self.http
                .get(self.url(path))
                .header("x-sdp-sandbox", sandbox),
        )
    }

    pub fn send(&self, request: reqwest::RequestBuilder) -> tokio::task::JoinHandle<Answer> {
        tokio::spawn(async move { Answer::from(request.send().await.unwrap()).await })
    }
}

/// What a client got.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    async fn from(response: reqwest::Response) -> Self {
        Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
        }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("<none>", |v| v.to_str().unwrap())
    }

    pub fn error_code(&self) -> String {
        let body: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body));
        body["error"]["code"]
            .as_str()
            .unwrap_or("<none>")
            .to_owned()
    }
}

/// Waits for `handle`'s answer, generously.
pub async fn answer(handle: tokio::task::JoinHandle<Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .expect("no answer within 20 s")
        .unwrap()
}

/// Asserts that `handle` gets no answer for a while: it is held.
pub async fn assert_held(handle: &mut tokio::task::JoinHandle<Answer>) {
    if let Ok(answer) = tokio::time::timeout(Duration::from_millis(300), &mut *handle).await {
        panic!("answered while it should be held: {answer:?}");
    }
}

/// Waits until `check` holds, generously.
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An HTTP upstream answering `<path> sandbox=<X-SDP-Sandbox> body=<body>`; `Upgrade: echo`
/// switches the connection to echoing what it is sent.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer_upstream(req, record.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    /// What it answered, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn answer_upstream(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().get(header::UPGRADE) == Some(&HeaderValue::from_static("echo")) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut read, &mut write).await;
            }
        });
        seen.lock()
            .unwrap()
            .push(format!("{} upgraded", req.uri().path()));
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        response
            .headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("echo"));
        return Ok(response);
    }
    let path = req.uri().path().to_owned();
    let sandbox = req
        .headers()
        .get("x-sdp-sandbox")
        .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let text = format!(
        "{path} sandbox={sandbox} body={}",
        String::from_utf8_lossy(&body)
    );
    seen.lock().unwrap().push(text.clone());
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// A table of one service, `orders` on `/orders`, whose baseline is `upstream` under
/// `/baseline`; each sandbox runs `orders` on `upstream`, and sleeps when it says so.
pub fn table(upstream: SocketAddr, sandboxes: &[(&str, bool)], wake_timeout_ms: u64) -> RouteTable {
    let orders = ServiceName::parse("orders").unwrap();
    RouteTable {
        generation: 1,
        base_domain: BASE_DOMAIN.into(),
        services: vec![ServiceRoutes {
            service: orders.clone(),
            routes: vec!["/orders".into()],
            baseline: format!("http://{upstream}/baseline"),
        }],
        sandboxes: sandboxes
            .iter()
            .map(|&(name, sleeping)| SandboxRoutes {
                sandbox: SandboxName::parse(name).unwrap(),
                upstreams: BTreeMap::from([(orders.clone(), upstream.to_string())]),
                down: BTreeMap::new(),
                sleeping,
                gateway: None,
            })
            .collect(),
        wake_timeout_ms,
    }
}
