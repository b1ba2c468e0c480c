//! A stand-in for the shared environment's services (the "baseline" on OpenShift): one local
//! HTTP server that answers any path with what it was sent, as JSON, and echoes WebSocket
//! messages on paths ending in `/ws`.

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
