//! One request through the router: choose, rewrite, forward, stream back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use sdp_protocol::{RouteDecision, RouteKind, ServiceName};
use time::OffsetDateTime;

use crate::metrics::Target;
use crate::pool::{PooledBody, RequestBody};
use crate::table::{Route, SANDBOX_HEADER, Sandbox, Table, Upstream};
use crate::{Inner, sleep};

pub type Body = Either<PooledBody, Full<Bytes>>;

// Names made once: parsing a name on every request shows in the router's profile.
const ROUTE_HEADER: HeaderName = HeaderName::from_static("x-sdp-route");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const VIA: HeaderValue = HeaderValue::from_static("1.1 sdp-router");
const HTTP: HeaderValue = HeaderValue::from_static("http");

const HOPS: usize = 6;
/// Hop-by-hop fields (RFC 9110 §7.6.1, plus `Proxy-Connection` still sent by old clients):
/// they describe one connection and are never forwarded. Fields named in `Connection` are
/// dropped too.
const HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop fields; returns the `Upgrade` value when the connection asked for
/// one (`Connection: upgrade`).
///
/// Every message passes here twice per request, so it reads the fields once, comparing
/// names rather than hashing them, and removes only what it found: most messages carry no
/// such field but `Connection: keep-alive`.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let mut found = [false; HOPS];
    let mut upgrade = false;
    let mut named = Vec::new();
    for (name, value) in headers.iter() {
        let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) else {
            continue;
        };
        found[i] = true;
        if *name != header::CONNECTION {
            continue;
        }
        for token in value.to_str().unwrap_or_default().split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if !token.eq_ignore_ascii_case("keep-alive")
                && !token.eq_ignore_ascii_case("close")
                && let Ok(name) = HeaderName::from_bytes(token.as_bytes())
            {
                // An option other than the usual ones names a field of this connection.
                named.push(name);
            }
        }
    }
    let upgrade = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in named {
        headers.remove(name);
    }
    for (name, found) in HOP_BY_HOP.iter().zip(found) {
        if found {
            headers.remove(name);
        }
    }
    upgrade
}

pub(crate) fn json_error(
    status: StatusCode,
    code: &str,
    message: &str,
    route: RouteKind,
) -> Response<Body> {
    error_response(
        status,
        serde_json::json!({ "error": { "code": code, "message": message } }),
        route,
    )
}

fn error_response(status: StatusCode, body: serde_json::Value, route: RouteKind) -> Response<Body> {
    let body = body.to_string();
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(ROUTE_HEADER, HeaderValue::from_static(route.header_value()));
    response
}

/// What the inspector is told once the response's head is known. Only requests naming a
/// sandbox the table holds are recorded; the others pay nothing for it.
pub(crate) struct Pending<'a> {
    inner: &'a Inner,
    recording: Option<Recording<'a>>,
}

struct Recording<'a> {
    sandbox: &'a str,
    since: Since,
    method: String,
    path: String,
}

/// When a request came: what its recorded duration counts from.
#[derive(Clone, Copy)]
pub(crate) struct Since {
    started: Instant,
    time: OffsetDateTime,
}

impl Since {
    pub(crate) fn now() -> Self {
        Self {
            started: Instant::now(),
            time: OffsetDateTime::now_utc(),
        }
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }
}

impl<'a> Pending<'a> {
    pub(crate) fn new(
        inner: &'a Inner,
        req: &Request<Incoming>,
        named: Option<Named<'a>>,
        since: Option<Since>,
    ) -> Self {
        Self::of(inner, req.method().as_str(), req.uri().path(), named, since)
    }

    /// For a request read as `method` and `path`.
    pub(crate) fn of(
        inner: &'a Inner,
        method: &str,
        path: &str,
        named: Option<Named<'a>>,
        since: Option<Since>,
    ) -> Self {
        Self {
            inner,
            recording: named.filter(|n| n.entry.is_some()).map(|named| Recording {
                sandbox: named.name,
                since: since.unwrap_or_else(Since::now),
                method: method.to_owned(),
                path: path.to_owned(),
            }),
        }
    }

    pub(crate) fn record(
        self,
        service: Option<&ServiceName>,
        route: RouteKind,
        upstream: Option<&str>,
        status: StatusCode,
    ) {
        let Some(r) = self.recording else {
            return;
        };
        self.inner.shared.inspector.record(
            self.inner.thread,
            r.sandbox,
            RouteDecision {
                time: r.since.time,
                method: r.method,
                path: r.path,
                service: service.cloned(),
                route,
                upstream: upstream.map(str::to_owned),
                status: status.as_u16(),
                duration_ms: r.since.started.elapsed().as_secs_f64() * 1000.0,
            },
        );
    }
}

/// The sandbox a request names, as one table has it.
#[derive(Clone, Copy)]
pub(crate) struct Named<'t> {
    pub name: &'t str,
    /// None: the table does not hold it.
    pub entry: Option<&'t Sandbox>,
}

impl<'t> Named<'t> {
    /// What `table` makes of `name`.
    pub(crate) fn find(table: &'t Table, name: &'t str) -> Self {
        Self {
            name,
            entry: table.sandbox(name),
        }
    }

    pub(crate) fn sleeping(&self) -> bool {
        self.entry.is_some_and(Sandbox::sleeping)
    }
}

/// The `Host` a request came for: the field, else the authority of an absolute-form target.
pub(crate) fn host_of(req: &Request<Incoming>) -> Option<HeaderValue> {
    req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// What a connection's requests share: made once per connection, not per request.
pub struct Client {
    /// The peer's address, as `X-Forwarded-For` carries it.
    pub ip: HeaderValue,
    /// The peer is a proxy in front of the router (`trusted_proxies`): the `X-Forwarded-*`
    /// fields it sends are kept.
    pub trusted: bool,
}

impl Client {
    pub fn new(peer: SocketAddr, trusted: bool) -> Self {
        Self {
            ip: HeaderValue::from_str(&peer.ip().to_canonical().to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            trusted,
        }
    }
}

/// What a request was answered, and where it went.
pub(crate) type Answered = (Response<Body>, Target);

pub async fn handle(inner: &Inner, req: Request<Incoming>, client: &Client) -> Response<Body> {
    let (response, target) = route(inner, req, client).await;
    inner
        .shared
        .metrics
        .request(inner.thread, target, response.status());
    response
}

async fn route(inner: &Inner, req: Request<Incoming>, client: &Client) -> Answered {
    // Held until this request has its answer: a table installed meanwhile is for the next.
    let table = inner.table();
    let host = host_of(&req);
    let named = table.sandbox_of(host.as_ref().and_then(|h| h.to_str().ok()), req.headers());
    let named = named.as_ref().map(|(name, _)| Named::find(&table, name));
    if named.is_some_and(|n| n.sleeping()) {
        let name = named.map(|n| n.name.to_owned()).unwrap_or_default();
        drop(table);
        return hold(inner, req, client, host, name).await;
    }
    forward(inner, &table, req, client, host, named, None).await
}

/// Routes a request by `table`, in the sandbox it names (`named`, found in that table), and
/// forwards it. `held`: since when the request waited for its sandbox to wake.
pub(crate) async fn forward(
    inner: &Inner,
    table: &Table,
    mut req: Request<Incoming>,
    client: &Client,
    host: Option<HeaderValue>,
    named: Option<Named<'_>>,
    held: Option<Since>,
) -> Answered {
    let sandbox = named.map(|n| n.name);
    let entry = named.and_then(|n| n.entry);
    let pending = Pending::new(inner, &req, named, held);
    let path = req.uri().path();

    let route = match (sandbox, entry) {
        (Some(_), None) => Route::UnknownSandbox,
        _ => table.route_in(entry, path),
    };
    let (service, upstream, kind) = match route {
        Route::UnknownSandbox => {
            let name = sandbox.unwrap_or_default();
            let response = json_error(
                StatusCode::NOT_FOUND,
                "unknown_sandbox",
                &format!(
                    "no sandbox named {name:?} is routed here: check the name, or whether it was deleted or expired"
                ),
                RouteKind::Sandbox,
            );
            return (response, Target::Router);
        }
        Route::NoRoute => {
            pending.record(None, RouteKind::Baseline, None, StatusCode::NOT_FOUND);
            let response = json_error(
                StatusCode::NOT_FOUND,
                "no_route",
                &format!("no service's route matches {path}"),
                RouteKind::Baseline,
            );
            return (response, Target::Router);
        }
        Route::NoBaseline { service } => {
            pending.record(
                Some(&service.name),
                RouteKind::Baseline,
                None,
                StatusCode::SERVICE_UNAVAILABLE,
            );
            let response = json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_baseline",
                &format!(
                    "service {} has no baseline: only a sandbox that runs it can answer; name one",
                    service.name
                ),
                RouteKind::Baseline,
            );
            return (response, Target::Router);
        }
        Route::Down { service, state } => {
            pending.record(
                Some(&service.name),
                RouteKind::Sandbox,
                None,
                StatusCode::SERVICE_UNAVAILABLE,
            );
            let message = format!(
                "service {} of this sandbox is {state}: see its runtime log; it answers again once it runs",
                service.name
            );
            let response = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": {
                    "code": "instance_down",
                    "message": message,
                    "service": service.name.as_str(),
                    "state": state.as_str(),
                } }),
                RouteKind::Sandbox,
            );
            return (response, Target::Router);
        }
        Route::To {
            service,
            upstream,
            kind,
        } => {
            // Someone uses the sandbox, whether this path is one of its own services or the
            // baseline's: its host name is what they test through.
            if let Some(entry) = entry {
                entry.mark_active();
            }
            (service, upstream, kind)
        }
    };

    let target = match upstream.target(req.uri().path_and_query()) {
        Ok(uri) => uri,
        Err(e) => {
            let response = json_error(
                StatusCode::BAD_REQUEST,
                "bad_path",
                &format!("the path cannot be forwarded: {e}"),
                kind,
            );
            return (response, Target::Router);
        }
    };
    // Taken before the request is consumed: resolves once the client has our 101.
    let client_upgrade = strip_and_prepare(&mut req, client, host, sandbox)
        .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let headers = req.headers_mut();
    if let Some((protocol, _)) = &client_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    headers.insert(header::HOST, upstream.host().clone());
    *req.uri_mut() = target;
    *req.version_mut() = Version::HTTP_11;

    let (parts, body) = req.into_parts();
    let (body, body_sent) = RequestBody::sent(body);
    let sent_at = Instant::now();
    let send = inner.pool.send(upstream, Request::from_parts(parts, body));
    let timeout = inner.shared.config.response_timeout;
    let sent = async {
        tokio::pin!(send);
        if let Some(body_sent) = body_sent {
            // The wait for the answer starts once the body is sent whole.
            tokio::select! {
                answer = &mut send => return Some(answer),
                _ = body_sent => {}
            }
        }
        tokio::time::timeout(timeout, send).await.ok()
    }
    .await;
    let mut response = match sent {
        Some(Ok(response)) => {
            inner
                .shared
                .metrics
                .upstream_latency(inner.thread, kind, sent_at.elapsed());
            response
        }
        Some(Err(e)) => {
            let reason = e.to_string();
            tracing::debug!(upstream = upstream.label(), service = %service.name, reason, "upstream failed");
            pending.record(
                Some(&service.name),
                kind,
                Some(upstream.label()),
                StatusCode::BAD_GATEWAY,
            );
            let response = json_error(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                &failed_message(upstream, &service.name, &reason),
                kind,
            );
            return (response, kind.into());
        }
        None => {
            pending.record(
                Some(&service.name),
                kind,
                Some(upstream.label()),
                StatusCode::GATEWAY_TIMEOUT,
            );
            let response = json_error(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                &timeout_message(
                    upstream,
                    &service.name,
                    inner.shared.config.response_timeout,
                ),
                kind,
            );
            return (response, kind.into());
        }
    };

    let status = response.status();
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    match client_upgrade {
        Some((asked, client)) if switching => {
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
            // The protocol the upstream switched to, which may be one of several asked for.
            let protocol = strip_hop_by_hop(headers).unwrap_or(asked);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol);
        }
        _ => {
            strip_hop_by_hop(response.headers_mut());
        }
    }
    response
        .headers_mut()
        .insert(ROUTE_HEADER, HeaderValue::from_static(kind.header_value()));
    pending.record(Some(&service.name), kind, Some(upstream.label()), status);
    (response.map(Either::Left), kind.into())
}

/// What a 502 `upstream_unreachable` says.
pub(crate) fn failed_message(upstream: &Upstream, service: &ServiceName, reason: &str) -> String {
    format!(
        "upstream {} of service {service} failed: {reason}",
        upstream.label()
    )
}

/// What a 504 `upstream_timeout` says.
pub(crate) fn timeout_message(
    upstream: &Upstream,
    service: &ServiceName,
    waited: Duration,
) -> String {
    format!(
        "upstream {} of service {service} did not answer within {}s",
        upstream.label(),
        waited.as_secs_f32()
    )
}

/// Holds a request for `sandbox`, which sleeps in the table it came with, until a table shows
/// the sandbox awake (then routes it by that table) or gone (404), for at most the
/// `wake_timeout` of the table it came with.
///
/// Held requests wait on the count of installs (a `watch`), never polling the table: a
/// thousand of them cost a thousand parked futures, which wake when a table comes or when it
/// is time to ask again. A client that goes away drops its request's future, and with it the
/// wait.
pub(crate) async fn hold(
    inner: &Inner,
    req: Request<Incoming>,
    client: &Client,
    host: Option<HeaderValue>,
    sandbox: String,
) -> Answered {
    let since = Since::now();
    // Subscribed before the table is read: an install in between is seen, not missed.
    let mut installed = inner.shared.installed.subscribe();
    let mut table = inner.table();
    // A timeout past what an `Instant` holds (the control plane's to choose) is a year.
    let deadline = since
        .started()
        .checked_add(table.wake_timeout)
        .unwrap_or_else(|| since.started() + Duration::from_secs(365 * 24 * 3600));
    let mut ask_at = since.started();
    loop {
        let host_name = host.as_ref().and_then(|h| h.to_str().ok());
        let named = table.sandbox_of(host_name, req.headers());
        let named = named.as_ref().map(|(name, _)| Named::find(&table, name));
        if !named.is_some_and(|n| n.sleeping()) {
            return forward(inner, &table, req, client, host, named, Some(since)).await;
        }
        if let Some(entry) = named.and_then(|n| n.entry) {
            entry.mark_active();
        }
        let now = Instant::now();
        if now >= ask_at {
            inner.shared.wakes.ask(&sandbox);
            ask_at = now + sleep::WAKE_REPEAT;
        }
        if now >= deadline {
            let pending = Pending::new(inner, &req, named, Some(since));
            let service = table.service_for(req.uri().path()).map(|s| &s.name);
            pending.record(
                service,
                RouteKind::Sandbox,
                None,
                StatusCode::SERVICE_UNAVAILABLE,
            );
            return (waking(&sandbox, table.wake_timeout), Target::Router);
        }
        // Not held across the wait: the next table is read fresh.
        drop(table);
        tokio::select! {
            // The sender lives as long as the router, which outlives its requests.
            _ = installed.changed() => {}
            _ = tokio::time::sleep_until(ask_at.min(deadline).into()) => {}
        }
        table = inner.table();
    }
}

/// 503 `sandbox_waking`, with `Retry-After`.
fn waking(sandbox: &str, waited: Duration) -> Response<Body> {
    let mut response = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "sandbox_waking",
        &format!(
            "sandbox {sandbox} was asleep and is still waking after {}s; try again shortly",
            waited.as_secs_f32()
        ),
        RouteKind::Sandbox,
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(sleep::RETRY_AFTER.as_secs()),
    );
    response
}

/// Rewrites the request's fields for the upstream: hop-by-hop fields out, the forwarding
/// fields in, the sandbox passed on. Returns the protocol asked for by an upgrade.
fn strip_and_prepare(
    req: &mut Request<Incoming>,
    client: &Client,
    host: Option<HeaderValue>,
    sandbox: Option<&str>,
) -> Option<HeaderValue> {
    let headers = req.headers_mut();
    let upgrade = strip_hop_by_hop(headers);
    // Room for the fields added below at once, rather than growing the map as they come.
    headers.reserve(6);
    if client.trusted {
        forward_from_proxy(headers, client, host);
    } else {
        // Anyone can write these fields: from a peer that is not a trusted proxy they are
        // claims, not facts, and upstreams would take them for the client's address.
        drop_client_claims(headers);
        headers.insert(FORWARDED_FOR, client.ip.clone());
        headers.insert(FORWARDED_PROTO, HTTP);
        match host {
            Some(value) => headers.insert(FORWARDED_HOST, value),
            None => headers.remove(FORWARDED_HOST),
        };
    }
    // Named by Host or baggage, the sandbox still travels as the header, so that a service
    // calling others through the gateway with it stays inside its sandbox.
    if let Some(value) = sandbox.and_then(|s| HeaderValue::from_str(s).ok()) {
        headers.insert(SANDBOX_HEADER, value);
    }
    headers.append(header::VIA, VIA);
    upgrade
}

/// Removes every field a proxy writes about the client (`X-Forwarded-*` of any kind,
/// `Forwarded`, `X-Real-IP`), in one pass over the names; nothing is allocated unless one is
/// there.
fn drop_client_claims(headers: &mut HeaderMap) {
    let mut claims = Vec::new();
    for name in headers.keys() {
        let name_str = name.as_str();
        if name_str.starts_with("x-forwarded-")
            || name_str == "forwarded"
            || name_str == "x-real-ip"
        {
            claims.push(name.clone());
        }
    }
    for name in claims {
        headers.remove(name);
    }
}

/// The forwarding fields of a request from a trusted proxy (nginx for TLS): the client's
/// address is appended to the chain it sends, and its scheme and host, which it knows better,
/// are kept.
fn forward_from_proxy(headers: &mut HeaderMap, client: &Client, host: Option<HeaderValue>) {
    let mut earlier = headers
        .get_all(&FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    let forwarded_for = if earlier.peek().is_none() {
        Some(client.ip.clone())
    } else {
        let mut all = earlier.collect::<Vec<_>>().join(", ");
        all.push_str(", ");
        all.push_str(client.ip.to_str().unwrap_or_default());
        HeaderValue::from_str(&all).ok()
    };
    if let Some(value) = forwarded_for {
        headers.insert(FORWARDED_FOR, value);
    }
    headers.entry(FORWARDED_PROTO).or_insert(HTTP);
    if let Some(value) = host
        && let header::Entry::Vacant(entry) = headers.entry(FORWARDED_HOST)
    {
        entry.insert(value);
    }
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
