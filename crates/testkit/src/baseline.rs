//! A stand-in for the shared environment's services (the "baseline" on OpenShift): one local
//! HTTP server that answers any path with what it was sent, as JSON (after `ms` milliseconds
//! on paths ending in `/slow`), and echoes WebSocket messages on paths ending in `/ws`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

pub struct Baseline {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Baseline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Baseline {
    pub async fn start() -> Baseline {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(answer);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Baseline { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn answer(req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    if parts.uri.path().ends_with("/ws") {
        return match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(upgrade) => upgrade
                .on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        let reply = match msg {
                            Message::Text(t) => Message::Text(format!("baseline echo: {t}").into()),
                            Message::Binary(b) => Message::Binary(b),
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if socket.send(reply).await.is_err() {
                            break;
                        }
                    }
                })
                .into_response(),
            Err(rejection) => rejection.into_response(),
        };
    }
    if parts.uri.path().ends_with("/slow") {
        let ms: u64 = parts
            .uri
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let entry = headers
            .entry(name.as_str().to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(values) = entry {
            values.push(Value::String(value.to_str().unwrap_or("").to_owned()));
        }
    }
    Json(json!({
        "from": "baseline",
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
    }))
    .into_response()
}

/// A baseline over HTTPS, as OpenShift's routes are: its certificate, for `localhost` only,
/// is signed by a test CA written to `ca_file`, which the gateway agent is told to trust
/// (`SSL_CERT_FILE`). It answers any path with what it was sent, as JSON.
pub struct TlsBaseline {
    pub addr: SocketAddr,
    pub ca_file: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBaseline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBaseline {
    pub async fn start(dir: &std::path::Path) -> TlsBaseline {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let ca_file = dir.join("test-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(
            std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends here.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = json!({
                                "from": "tls baseline",
                                "path": req.uri().path(),
                                "host": req.headers().get("host").and_then(|h| h.to_str().ok()),
                            });
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(axum::body::Bytes::from(
                                    body.to_string(),
                                )),
                            ))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TlsBaseline {
            addr,
            ca_file,
            task,
        }
    }
}
