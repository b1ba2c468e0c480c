//! One request through the router: choose, rewrite, forward, stream back.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use sdp_protocol::{RouteDecision, RouteKind, ServiceName};
use time::OffsetDateTime;

use crate::Inner;
use crate::table::{Route, SANDBOX_HEADER};

pub type Body = Either<Incoming, Full<Bytes>>;

const ROUTE_HEADER: &str = "x-sdp-route";
const VIA: HeaderValue = HeaderValue::from_static("1.1 sdp-router");

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus `Proxy-Connection` still sent by old clients):
/// they describe one connection and are never forwarded. Fields named in `Connection` are
/// dropped too.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop fields; returns the `Upgrade` value when the connection asked for
/// one (`Connection: upgrade`).
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let mut upgrade = false;
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| {
            let token = token.trim();
            upgrade |= token.eq_ignore_ascii_case("upgrade");
            HeaderName::from_bytes(token.as_bytes()).ok()
        })
        .collect();
    let upgrade = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    upgrade
}

fn json_error(status: StatusCode, code: &str, message: &str, route: RouteKind) -> Response<Body> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(ROUTE_HEADER, HeaderValue::from_static(route.as_str()));
    response
}

/// What the inspector is told once the response's head is known.
struct Pending<'a> {
    inner: &'a Inner,
    sandbox: Option<&'a str>,
    started: Instant,
    time: OffsetDateTime,
    method: &'a str,
    path: &'a str,
}

impl Pending<'_> {
    fn record(
        &self,
        service: Option<&ServiceName>,
        route: RouteKind,
        upstream: Option<&str>,
        status: StatusCode,
    ) {
        let Some(sandbox) = self.sandbox else {
            return;
        };
        self.inner.inspector.record(
            sandbox,
            RouteDecision {
                time: self.time,
                method: self.method.to_owned(),
                path: self.path.to_owned(),
                service: service.cloned(),
                route,
                upstream: upstream.map(str::to_owned),
                status: status.as_u16(),
                duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            },
        );
    }
}

pub async fn handle(inner: &Inner, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    // Held until this request has its answer: a table installed meanwhile is for the next.
    let table = inner.table.load_full();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(ToString::to_string));
    let named = table.sandbox_of(host.as_deref(), req.headers());
    let sandbox = named.as_ref().map(|(name, _)| name.as_str());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let pending = Pending {
        inner,
        // Only a sandbox the table holds has an inspector log.
        sandbox: sandbox.filter(|s| table.has_sandbox(s)),
        started,
        time: OffsetDateTime::now_utc(),
        method: method.as_str(),
        path: &path,
    };

    let (service, upstream, kind) = match table.route(sandbox, &path) {
        Route::UnknownSandbox => {
            let name = sandbox.unwrap_or_default();
            return json_error(
                StatusCode::NOT_FOUND,
                "unknown_sandbox",
                &format!(
                    "no sandbox named {name:?} is routed here: check the name, or whether it was deleted or expired"
                ),
                RouteKind::Sandbox,
            );
        }
        Route::NoRoute => {
            pending.record(None, RouteKind::Baseline, None, StatusCode::NOT_FOUND);
            return json_error(
                StatusCode::NOT_FOUND,
                "no_route",
                &format!("no service's route matches {path}"),
                RouteKind::Baseline,
            );
        }
        Route::NoBaseline { service } => {
            pending.record(
                Some(&service.name),
                RouteKind::Baseline,
                None,
                StatusCode::SERVICE_UNAVAILABLE,
            );
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_baseline",
                &format!(
                    "service {} has no baseline: only a sandbox that runs it can answer; name one",
                    service.name
                ),
                RouteKind::Baseline,
            );
        }
        Route::To {
            service,
            upstream,
            kind,
        } => (service, upstream, kind),
    };

    let uri = match upstream.uri_for(req.uri().path_and_query()) {
        Ok(uri) => uri,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_path",
                &format!("the path cannot be forwarded: {e}"),
                kind,
            );
        }
    };
    // Taken before the request is consumed: resolves once the client has our 101.
    let client_upgrade = strip_and_prepare(&mut req, peer, host.as_deref(), sandbox)
        .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    if let Some((protocol, _)) = &client_upgrade {
        let headers = req.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;

    let sent = tokio::time::timeout(inner.config.response_timeout, inner.client.request(req)).await;
    let mut response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            let reason = error_chain(&e);
            tracing::debug!(upstream = upstream.label(), service = %service.name, reason, "upstream failed");
            pending.record(
                Some(&service.name),
                kind,
                Some(upstream.label()),
                StatusCode::BAD_GATEWAY,
            );
            return json_error(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                &format!(
                    "upstream {} of service {} failed: {reason}",
                    upstream.label(),
                    service.name
                ),
                kind,
            );
        }
        Err(_) => {
            pending.record(
                Some(&service.name),
                kind,
                Some(upstream.label()),
                StatusCode::GATEWAY_TIMEOUT,
            );
            return json_error(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                &format!(
                    "upstream {} of service {} did not answer within {}s",
                    upstream.label(),
                    service.name,
                    inner.config.response_timeout.as_secs_f32()
                ),
                kind,
            );
        }
    };

    let status = response.status();
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    match client_upgrade {
        Some((protocol, client)) if switching => {
            let upstream_side = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(client, upstream_side) {
                    Ok((client, upstream_side)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(client),
                            &mut TokioIo::new(upstream_side),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade through the router failed"),
                }
            });
            let headers = response.headers_mut();
            strip_hop_by_hop(headers);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol);
        }
        _ => {
            strip_hop_by_hop(response.headers_mut());
        }
    }
    response
        .headers_mut()
        .insert(ROUTE_HEADER, HeaderValue::from_static(kind.as_str()));
    pending.record(Some(&service.name), kind, Some(upstream.label()), status);
    response.map(Either::Left)
}

/// Rewrites the request's fields for the upstream: hop-by-hop fields out, the forwarding
/// fields in, the sandbox passed on. Returns the protocol asked for by an upgrade.
fn strip_and_prepare(
    req: &mut Request<Incoming>,
    peer: SocketAddr,
    host: Option<&str>,
    sandbox: Option<&str>,
) -> Option<HeaderValue> {
    let headers = req.headers_mut();
    let upgrade = strip_hop_by_hop(headers);
    // The client sets `Host` from the upstream's URI: OpenShift routes by it.
    headers.remove(header::HOST);
    let client_ip = peer.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    // A proxy in front (nginx for TLS) knows the original scheme and host better: theirs
    // are kept.
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if !headers.contains_key("x-forwarded-host")
        && let Some(value) = host.and_then(|h| HeaderValue::from_str(h).ok())
    {
        headers.insert("x-forwarded-host", value);
    }
    // Named by Host or baggage, the sandbox still travels as the header, so that a service
    // calling others through the gateway with it stays inside its sandbox.
    if let Some(value) = sandbox.and_then(|s| HeaderValue::from_str(s).ok()) {
        headers.insert(SANDBOX_HEADER, value);
    }
    headers.append(header::VIA, VIA);
    upgrade
}

/// An error and its causes, for a person: "client error (Connect): tcp connect error:
/// Connection refused (os error 111)".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_those_named_in_connection_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Private, Upgrade"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let upgrade = strip_hop_by_hop(&mut headers);
        assert_eq!(upgrade, Some(HeaderValue::from_static("websocket")));
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn an_upgrade_header_without_connection_upgrade_is_not_an_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(strip_hop_by_hop(&mut headers), None);
        assert!(headers.is_empty());
    }
}
