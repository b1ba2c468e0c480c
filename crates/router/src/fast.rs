//! The fast path: plain HTTP/1.1 requests proxied by the router's own code.
//!
//! A request's head is read with `httparse` from the connection's pooled buffer
//! ([`h1::request`]); what it names is routed by the same table and rules as the hyper path;
//! its head is written upstream as the client sent it, with only the proxy's edits; its body
//! is relayed as it is framed, bytes unchanged; the answer's head is read, edited and relayed
//! the same way ([`h1::response`]). Upstream connections are plain TCP, kept alive in the
//! serving thread's own pool.
//!
//! Everything else is hyper's ([`crate::serve_hyper`]): upgrades, `Expect`, HTTP/1.0,
//! absolute-form targets, `https://` upstreams, sleeping sandboxes, every answer of the
//! router's own before forwarding (404, 503), and any head the fast path is not sure of. The
//! connection then goes to hyper for the rest of its life, with the bytes already read.

use std::io;
use std::sync::Mutex;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use hyper::StatusCode;
use sdp_protocol::{RouteKind, ServiceName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::h1::chunked::{ChunkError, Chunked};
use crate::h1::request::{self, Forwarding, Framing, MAX_FIELDS};
use crate::h1::response::{self, Body};
use crate::proxy::{self, Client, Named, Pending};
use crate::table::{FastMap, Route, Source, Table, Upstream};
use crate::{Inner, pool};

/// A connection buffer's size; a head up to [`request::MAX_HEAD`] grows it.
const BUFFER: usize = 8 * 1024;
/// Buffers kept for the next connections, per serving thread.
const KEPT_BUFFERS: usize = 256;
/// Idle connections kept per upstream and thread.
const MAX_IDLE: usize = 256;

/// How a client connection's time with the fast path ended.
pub(crate) enum End {
    /// Closed, or to be closed.
    Close,
    /// Hyper takes it, with the bytes in the buffer.
    Handover,
}

/// What one serving thread keeps between requests: idle upstream connections and buffers.
pub(crate) struct Local {
    idle: Mutex<FastMap<String, Vec<Conn>>>,
    buffers: Mutex<Vec<BytesMut>>,
}

/// A plain TCP connection to an upstream, with what it read past the last answer.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    since: Instant,
    /// Taken from the pool: it may have been closed by the upstream meanwhile.
    reused: bool,
}

impl Local {
    pub(crate) fn new() -> Self {
        Self {
            idle: Mutex::default(),
            buffers: Mutex::default(),
        }
    }

    pub(crate) fn buffer(&self) -> BytesMut {
        lock(&self.buffers)
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(BUFFER))
    }

    pub(crate) fn give_buffer(&self, mut buf: BytesMut) {
        buf.clear();
        let mut kept = lock(&self.buffers);
        // A buffer grown by a long head is let go.
        if kept.len() < KEPT_BUFFERS && buf.capacity() <= 2 * BUFFER {
            kept.push(buf);
        }
    }

    /// An idle connection to `key` that still looks open.
    fn take(&self, key: &str, idle_timeout: std::time::Duration) -> Option<Conn> {
        loop {
            let mut conn = lock(&self.idle).get_mut(key)?.pop()?;
            if conn.since.elapsed() >= idle_timeout {
                continue;
            }
            // The upstream said nothing since its last answer: anything now (its close,
            // most likely) means the connection is not for another request.
            match conn.stream.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.reused = true;
                    return Some(conn);
                }
                _ => continue,
            }
        }
    }

    fn give_back(&self, key: &str, mut conn: Conn) {
        conn.since = Instant::now();
        let mut idle = lock(&self.idle);
        let list = match idle.get_mut(key) {
            Some(list) => list,
            None => idle.entry(key.to_owned()).or_default(),
        };
        if list.len() < MAX_IDLE {
            list.push(conn);
        }
    }

    /// Closes the connections idle too long.
    pub(crate) fn sweep(&self, idle_timeout: std::time::Duration) {
        let mut idle = lock(&self.idle);
        for list in idle.values_mut() {
            list.retain(|c| c.since.elapsed() < idle_timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves `stream`'s requests until it closes or one is for hyper.
pub(crate) async fn serve(
    inner: &Inner,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    client: &Client,
) -> End {
    let mut out = Vec::with_capacity(1024);
    loop {
        let deadline = tokio::time::Instant::now() + inner.shared.config.header_read_timeout;
        loop {
            if !buf.is_empty() {
                // Held until this request has its answer, as in the hyper path.
                let table = inner.table();
                let mut named = None;
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
                let plan = match request::parse(buf, &mut fields) {
                    request::Parsed::Partial => None,
                    request::Parsed::Handover => return End::Handover,
                    request::Parsed::Fast(head) => {
                        match prepare(inner, &table, &mut named, head, &mut out, client) {
                            Some(plan) => Some(plan),
                            None => return End::Handover,
                        }
                    }
                };
                if let Some(plan) = plan {
                    buf.advance(plan.len);
                    if !exchange(inner, stream, buf, &mut out, plan).await {
                        return End::Close;
                    }
                    break;
                }
            }
            match tokio::time::timeout_at(deadline, fill(stream, buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return End::Close,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// Reads what `stream` has into `buf`'s free room.
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(BUFFER);
    }
    stream.read_buf(buf).await
}

/// What a routed request needs once its head has been written out.
struct Routed<'t> {
    service: &'t ServiceName,
    upstream: &'t Upstream,
    kind: RouteKind,
}

/// A request the fast path takes, its upstream head written.
struct Plan<'t> {
    routed: Routed<'t>,
    pending: Pending<'t>,
    /// Bytes of the client's head.
    len: usize,
    framing: Framing,
    /// The client asked to close after this request.
    close: bool,
    /// It may be sent again on a new connection when a pooled one was closed under it.
    retryable: bool,
}

/// Routes a parsed head and writes its upstream head into `out`; `None` when it is
/// hyper's (a sleeping or unknown sandbox, an answer of the router's own, `https://`).
fn prepare<'t>(
    inner: &'t Inner,
    table: &'t Table,
    named: &'t mut Option<(String, Source)>,
    head: request::Head<'_, '_>,
    out: &mut Vec<u8>,
    client: &Client,
) -> Option<Plan<'t>> {
    *named = table.sandbox_named(Some(head.host), head.sandbox, head.values("baggage"));
    let named = named.as_ref().map(|(name, _)| Named::find(table, name));
    let entry = named.and_then(|n| n.entry);
    if named.is_some_and(|n| n.sleeping() || n.entry.is_none()) {
        return None;
    }
    let Route::To {
        service,
        upstream,
        kind,
    } = table.route_in(entry, head.path)
    else {
        return None;
    };
    if upstream.is_https() {
        return None;
    }
    if let Some(entry) = entry {
        entry.mark_active();
    }
    out.clear();
    head.write_upstream(
        &Forwarding {
            base_path: upstream.base_path(),
            host: upstream.host().as_bytes(),
            client_ip: client.ip.as_bytes(),
            trusted: client.trusted,
            sandbox: named.map(|n| n.name),
        },
        out,
    );
    Some(Plan {
        routed: Routed {
            service: &service.name,
            upstream,
            kind,
        },
        pending: Pending::of(inner, head.method, head.path, named, None),
        len: head.len,
        framing: head.framing,
        close: head.close,
        retryable: !matches!(head.method, "POST" | "PATCH"),
    })
}

/// Forwards a planned request and relays its answer: whether the client connection goes
/// on.
async fn exchange(
    inner: &Inner,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    plan: Plan<'_>,
) -> bool {
    let Plan {
        routed,
        pending,
        framing,
        close,
        retryable,
        ..
    } = plan;
    let mut pending = Some(pending);
    let answered = forward(
        inner,
        stream,
        buf,
        out,
        &routed,
        &mut pending,
        Ask {
            framing,
            close,
            retryable,
        },
    )
    .await;
    // Recorded when the answer's head came, unless there was none.
    let mut record = |status| {
        if let Some(pending) = pending.take() {
            record(inner, pending, &routed, status);
        }
    };
    match answered {
        Answered::Relayed { keep } => keep,
        Answered::Refused(e) => {
            record(StatusCode::BAD_REQUEST);
            let answer = error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &e.to_string(),
                routed.kind,
                true,
            );
            let _ = stream.write_all(&answer).await;
            false
        }
        Answered::Failed { status, message } => {
            let code = if status == StatusCode::GATEWAY_TIMEOUT {
                "upstream_timeout"
            } else {
                "upstream_unreachable"
            };
            record(status);
            // A body not read to its end leaves the connection out of step: it ends.
            let keep = framing == Framing::Empty && !close;
            let answer = error(status, code, &message, routed.kind, !keep);
            stream.write_all(&answer).await.is_ok() && keep
        }
        // As the hyper path counts a request whose body broke.
        Answered::Gone => {
            record(StatusCode::BAD_GATEWAY);
            false
        }
    }
}

/// Counted and recorded as the hyper path does.
fn record(inner: &Inner, pending: Pending<'_>, routed: &Routed<'_>, status: StatusCode) {
    inner
        .shared
        .metrics
        .request(inner.thread, routed.kind.into(), status);
    pending.record(
        Some(routed.service),
        routed.kind,
        Some(routed.upstream.label()),
        status,
    );
}

enum Answered {
    /// The upstream's answer reached the client (or began to): `keep` when both sides of
    /// the exchange ended where they should.
    Relayed { keep: bool },
    /// The request's body was malformed: 400, and the connection closed.
    Refused(ChunkError),
    /// No answer from the upstream: 502 or 504.
    Failed { status: StatusCode, message: String },
    /// The client went away.
    Gone,
}

/// How the client framed its request, and what it allows.
struct Ask {
    framing: Framing,
    /// The client asked to close after this request.
    close: bool,
    retryable: bool,
}

/// Sends the request (its head in `out`, its body from `buf` and `stream`) and relays the
/// answer.
async fn forward(
    inner: &Inner,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    routed: &Routed<'_>,
    pending: &mut Option<Pending<'_>>,
    ask: Ask,
) -> Answered {
    let Ask {
        framing,
        close,
        retryable,
    } = ask;
    let config = &inner.shared.config;
    let failed = |reason: &str| Answered::Failed {
        status: StatusCode::BAD_GATEWAY,
        message: proxy::failed_message(routed.upstream, routed.service, reason),
    };
    // The body as far as it is here already goes out with the head, in one write.
    let mut body = match framing {
        Framing::Empty => Rest::Done,
        Framing::Length(n) => {
            let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            out.extend_from_slice(&buf[..take]);
            buf.advance(take);
            let left = n - take as u64;
            if left == 0 {
                Rest::Done
            } else {
                Rest::Length(left)
            }
        }
        Framing::Chunked => {
            let mut chunked = Chunked::default();
            let used = match chunked.feed(buf, |_| {}) {
                Ok(used) => used,
                Err(e) => return Answered::Refused(e),
            };
            out.extend_from_slice(&buf[..used]);
            buf.advance(used);
            if chunked.done() {
                Rest::Done
            } else {
                Rest::Chunked(chunked)
            }
        }
    };
    let whole = matches!(body, Rest::Done);
    let mut conn = match inner.fast.take(routed.upstream.key(), config.idle_timeout) {
        Some(conn) => conn,
        None => match connect(routed.upstream, config.connect_timeout).await {
            Ok(conn) => conn,
            Err(reason) => return failed(&reason),
        },
    };
    let mut early = false;
    let sent_at = loop {
        if let Err(e) = conn.stream.write_all(out).await {
            // A pooled connection the upstream closed meanwhile: the request never got
            // there, and goes out again on a new connection when that is safe.
            if conn.reused && whole && retryable {
                conn = match connect(routed.upstream, config.connect_timeout).await {
                    Ok(conn) => conn,
                    Err(reason) => return failed(&reason),
                };
                continue;
            }
            return failed(&e.to_string());
        }
        let sent_at = Instant::now();
        let got = if whole {
            tokio::time::timeout(config.response_timeout, read_head(&mut conn))
                .await
                .ok()
        } else {
            let (got, answered_early) =
                match send_body(stream, buf, &mut conn, &mut body, config.response_timeout).await {
                    Ok(got) => got,
                    Err(BodyError::Client) => return Answered::Gone,
                    Err(BodyError::Chunks(e)) => return Answered::Refused(e),
                    Err(BodyError::Upstream(e)) => return failed(&e.to_string()),
                };
            early = answered_early;
            got
        };
        match got {
            None => {
                return Answered::Failed {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    message: proxy::timeout_message(
                        routed.upstream,
                        routed.service,
                        config.response_timeout,
                    ),
                };
            }
            // Closed before a byte of an answer: a stale pooled connection, as above.
            Some(Ok(0)) if conn.buf.is_empty() && conn.reused && whole && retryable => {
                conn = match connect(routed.upstream, config.connect_timeout).await {
                    Ok(conn) => conn,
                    Err(reason) => return failed(&reason),
                };
            }
            Some(Err(e)) => return failed(&e.to_string()),
            Some(Ok(_)) => break sent_at,
        }
    };
    inner
        .shared
        .metrics
        .upstream_latency(inner.thread, routed.kind, sent_at.elapsed());
    relay_answer(
        inner,
        stream,
        out,
        conn,
        routed,
        pending,
        Ending { close, early },
    )
    .await
}

/// What is left of a request's body to send.
enum Rest {
    Done,
    Length(u64),
    Chunked(Chunked),
}

enum BodyError {
    Client,
    Chunks(ChunkError),
    Upstream(io::Error),
}

/// Relays the rest of the request's body while watching for the answer: an upstream may
/// answer before it has read the body (then the client connection ends after the answer).
/// Returns the head read's outcome (`None` past `response_timeout` after the body was sent)
/// and whether the answer came early.
async fn send_body(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    conn: &mut Conn,
    body: &mut Rest,
    response_timeout: std::time::Duration,
) -> Result<(Option<io::Result<usize>>, bool), BodyError> {
    let (mut reader, mut writer) = conn.stream.split();
    let head = read_head_from(&mut reader, &mut conn.buf);
    tokio::pin!(head);
    let relay = relay_body(stream, buf, &mut writer, body);
    tokio::select! {
        sent = relay => sent?,
        got = &mut head => return Ok((Some(got), true)),
    }
    Ok((
        tokio::time::timeout(response_timeout, head).await.ok(),
        false,
    ))
}

async fn relay_body<W: AsyncWrite + Unpin>(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    upstream: &mut W,
    body: &mut Rest,
) -> Result<(), BodyError> {
    loop {
        match body {
            Rest::Done => return Ok(()),
            Rest::Length(left) => {
                if buf.is_empty() {
                    read_some(stream, buf).await?;
                }
                let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                upstream
                    .write_all(&buf[..take])
                    .await
                    .map_err(BodyError::Upstream)?;
                buf.advance(take);
                *left -= take as u64;
                if *left == 0 {
                    *body = Rest::Done;
                }
            }
            Rest::Chunked(chunked) => {
                if buf.is_empty() {
                    read_some(stream, buf).await?;
                }
                let used = chunked.feed(buf, |_| {}).map_err(BodyError::Chunks)?;
                upstream
                    .write_all(&buf[..used])
                    .await
                    .map_err(BodyError::Upstream)?;
                buf.advance(used);
                if chunked.done() {
                    *body = Rest::Done;
                }
            }
        }
    }
}

async fn read_some(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), BodyError> {
    match fill(stream, buf).await {
        Ok(0) | Err(_) => Err(BodyError::Client),
        Ok(_) => Ok(()),
    }
}

async fn read_head(conn: &mut Conn) -> io::Result<usize> {
    read_head_from(&mut conn.stream, &mut conn.buf).await
}

/// Reads until `buf` holds a whole head (an empty line), the head limit, or the end (`0`).
async fn read_head_from<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    let mut searched = 0;
    loop {
        if let Some(at) = memchr::memmem::find(&buf[searched..], b"\r\n\r\n") {
            return Ok(searched + at + 4);
        }
        if buf.len() >= request::MAX_HEAD {
            return Ok(buf.len());
        }
        searched = buf.len().saturating_sub(3);
        if fill(reader, buf).await? == 0 {
            return Ok(0);
        }
    }
}

/// What ends the client connection after an answer.
struct Ending {
    /// The client asked.
    close: bool,
    /// The upstream answered before it had the request's whole body.
    early: bool,
}

/// Relays the answer whose head is in `conn.buf`, recording it; the upstream connection goes
/// back to the pool when its answer was read whole and it can take another.
async fn relay_answer(
    inner: &Inner,
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    mut conn: Conn,
    routed: &Routed<'_>,
    pending: &mut Option<Pending<'_>>,
    ending: Ending,
) -> Answered {
    let Ending {
        close: client_close,
        early,
    } = ending;
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let head = match response::parse(&conn.buf, &mut fields) {
        response::Parsed::Head(head) => head,
        response::Parsed::Partial => {
            return Answered::Failed {
                status: StatusCode::BAD_GATEWAY,
                message: proxy::failed_message(
                    routed.upstream,
                    routed.service,
                    "connection closed before a whole response head",
                ),
            };
        }
        response::Parsed::Refused(why) => {
            tracing::debug!(
                upstream = routed.upstream.label(),
                why,
                "upstream answer refused"
            );
            return Answered::Failed {
                status: StatusCode::BAD_GATEWAY,
                message: proxy::failed_message(routed.upstream, routed.service, why),
            };
        }
    };
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(pending) = pending.take() {
        record(inner, pending, routed, status);
    }
    // An early answer leaves the rest of the request's body unread on both connections.
    let close = client_close || early || head.body == Body::UntilClose;
    out.clear();
    head.write(routed.kind.header_value(), close, out);
    let (len, framing, reusable) = (head.len, head.body, head.reusable);
    conn.buf.advance(len);
    let relayed = relay_response_body(stream, out, &mut conn, framing).await;
    let keep = match relayed {
        Ok(()) => {
            if reusable && !early && conn.buf.is_empty() {
                conn.reused = false;
                inner.fast.give_back(routed.upstream.key(), conn);
            }
            !close
        }
        Err(()) => false,
    };
    Answered::Relayed { keep }
}

/// Writes the head in `out` and the body after it, as far as `framing` says.
async fn relay_response_body(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    conn: &mut Conn,
    framing: Body,
) -> Result<(), ()> {
    let mut left = match framing {
        Body::Length(n) => n,
        _ => u64::MAX,
    };
    let mut chunked = Chunked::default();
    loop {
        let used = match framing {
            Body::Empty => 0,
            Body::Length(_) => conn
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX)),
            Body::Chunked => chunked.feed(&conn.buf, |_| {}).map_err(|_| ())?,
            Body::UntilClose => conn.buf.len(),
        };
        let ended = match framing {
            Body::Empty => true,
            Body::Length(_) => {
                left -= used as u64;
                left == 0
            }
            Body::Chunked => chunked.done(),
            Body::UntilClose => false,
        };
        // The head and the first of the body in one write.
        if out.is_empty() {
            stream.write_all(&conn.buf[..used]).await.map_err(|_| ())?;
        } else {
            out.extend_from_slice(&conn.buf[..used]);
            stream.write_all(out).await.map_err(|_| ())?;
            out.clear();
        }
        conn.buf.advance(used);
        if ended {
            return Ok(());
        }
        match fill(&mut conn.stream, &mut conn.buf).await {
            Ok(0) if framing == Body::UntilClose => return Ok(()),
            Ok(0) | Err(_) => return Err(()),
            Ok(_) => {}
        }
    }
}

/// A new connection within `timeout`, or why not (as the hyper path says it).
async fn connect(upstream: &Upstream, timeout: std::time::Duration) -> Result<Conn, String> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(upstream.socket_address()))
        .await
        .map_err(|_| {
            pool::UpstreamError::Connect(format!("no connection within {}s", timeout.as_secs_f32()))
                .to_string()
        })?
        .map_err(|e| pool::UpstreamError::Connect(e.to_string()).to_string())?;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        buf: BytesMut::with_capacity(BUFFER),
        since: Instant::now(),
        reused: false,
    })
}

/// The router's own JSON answer, as [`proxy::json_error`] makes it.
fn error(status: StatusCode, code: &str, message: &str, route: RouteKind, close: bool) -> Vec<u8> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut out = Vec::with_capacity(body.len() + 160);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\nx-sdp-route: ");
    out.extend_from_slice(route.header_value().as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}
