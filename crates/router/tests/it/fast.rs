//! The fast path on real sockets: raw bytes from a client, a scripted upstream that says
//! what reached it, and the handover to hyper on the same connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sdp_router::h1::chunked::Chunked;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{TestRouter, Upstream, table};

/// A fake upstream speaking raw HTTP/1.1 from a script: it reads each request's head (and
/// its body, when told to), records them, and writes what `answer` returns for the head.
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(read_body: bool, answer: fn(&str) -> Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_scripted(stream, read_body, answer, seen.clone()));
            }
        });
        Self {
            addr,
            accepted,
            requests,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve_scripted(
    mut stream: TcpStream,
    read_body: bool,
    answer: fn(&str) -> Vec<u8>,
    seen: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until_head(&mut stream, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut request = head.clone();
        if read_body {
            match read_body_of(&mut stream, &mut buf, &head).await {
                Some(body) => request.push_str(&String::from_utf8_lossy(&body)),
                None => {
                    seen.lock().unwrap().push(format!("{head}<cut short>"));
                    return;
                }
            }
        }
        seen.lock().unwrap().push(request);
        if stream.write_all(&answer(&head)).await.is_err() {
            return;
        }
        if !read_body {
            // Reads the rest until the router closes, so that it never sees a reset.
            let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
            return;
        }
    }
}

/// Reads until `buf` holds a head; its length with the empty line.
async fn read_until_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The body `head` frames, read from `buf` and `stream` (decoded when chunked); `None` when
/// the connection ends first.
async fn read_body_of(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Option<Vec<u8>> {
    let lower = head.to_ascii_lowercase();
    let chunked = lower.contains("transfer-encoding: chunked");
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|n| n.trim().parse::<usize>().unwrap());
    let mut decoder = Chunked::default();
    let mut body = Vec::new();
    loop {
        if chunked {
            let used = decoder
                .feed(buf, |d| body.extend_from_slice(d))
                .expect("the router relays valid chunks");
            buf.drain(..used);
            if decoder.done() {
                return Some(body);
            }
        } else {
            let want = length.unwrap_or(0);
            if buf.len() >= want {
                return Some(buf.drain(..want).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An answer a client read: the head as text, the body decoded.
struct Got {
    head: String,
    body: Vec<u8>,
}

impl Got {
    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    fn has(&self, line: &str) -> bool {
        self.head.lines().any(|l| l.eq_ignore_ascii_case(line))
    }
}

/// Reads one answer from `stream`, `buf` holding what was read past the last one.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Got {
    tokio::time::timeout(Duration::from_secs(10), async {
        let end = read_until_head(stream, buf)
            .await
            .expect("an answer's head");
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let body = read_body_of(stream, buf, &head)
            .await
            .expect("an answer's body");
        Got { head, body }
    })
    .await
    .expect("an answer within 10 s")
}

/// A router whose baseline for `/orders` is `upstream` (under `/baseline`), with a sandbox
/// `bench` running it there too.
async fn router_to(upstream: SocketAddr) -> TestRouter {
    TestRouter::start(&table(upstream, &[("bench", false)], 1000)).await
}

fn ok(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-SDP-Route: forged\r\n\r\nok"
        .to_vec()
}

/// A connection to `addr` that has sent `request`.
async fn sent(addr: std::net::SocketAddr, request: &[u8]) -> TcpStream {
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(request).await.unwrap();
    client
}

#[tokio::test]
async fn a_pipelined_pair_is_answered_in_order_on_one_upstream_connection() {
    let upstream = Scripted::start(true, ok).await;
    let router = router_to(upstream.addr).await;
    let mut client = sent(router.addr, b"GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /orders/2 HTTP/1.1\r\nHost: a\r\nX-SDP-Sandbox: bench\r\n\r\n").await;
    let mut buf = Vec::new();
    let first = read_answer(&mut client, &mut buf).await;
    let second = read_answer(&mut client, &mut buf).await;
    assert_eq!((first.status(), first.body.as_slice()), (200, &b"ok"[..]));
    assert!(first.has("x-sdp-route: baseline"), "{}", first.head);
    assert!(second.has("x-sdp-route: sandbox"), "{}", second.head);
    assert!(!first.head.contains("forged") && !first.head.contains("keep-alive"));
    let requests = upstream.requests();
    assert!(requests[0].starts_with("GET /baseline/orders/1 HTTP/1.1\r\n"));
    assert!(requests[1].starts_with("GET /orders/2 HTTP/1.1\r\n"));
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_forwarded_head_carries_the_proxys_fields_and_no_hop_by_hop_ones() {
    let upstream = Scripted::start(true, ok).await;
    let router = router_to(upstream.addr).await;
    let mut client = sent(router.addr, b"GET /orders/1?q=1 HTTP/1.1\r\nHost: bench.sandbox.test\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Kept: yes\r\n\r\n").await;
    let got = read_answer(&mut client, &mut Vec::new()).await;
    assert_eq!(got.status(), 200);
    let head = upstream.requests().remove(0).to_ascii_lowercase();
    for line in [
        "get /orders/1?q=1 http/1.1\r\n",
        &format!("host: {}\r\n", upstream.addr),
        "x-forwarded-for: 127.0.0.1\r\n",
        "x-forwarded-proto: http\r\n",
        "x-forwarded-host: bench.sandbox.test\r\n",
        "x-sdp-sandbox: bench\r\n",
        "via: 1.1 sdp-router\r\n",
        "x-kept: yes\r\n",
    ] {
        assert!(head.contains(line), "{line:?} not in {head}");
    }
    for gone in ["keep-alive", "te:", "6.6.6.6"] {
        assert!(!head.contains(gone), "{gone:?} in {head}");
    }
    assert_eq!(router.router.requests("bench")[0].status, 200);
}

fn chunked_answer(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
        .to_vec()
}

#[tokio::test]
async fn a_chunked_body_is_relayed_as_it_came_both_ways() {
    let upstream = Scripted::start(true, chunked_answer).await;
    let router = router_to(upstream.addr).await;
    let mut client = sent(
        router.addr,
        b"POST /orders HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .write_all(b"5;e=1\r\npedia\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let got = read_answer(&mut client, &mut buf).await;
    assert_eq!(got.body, b"abcde");
    assert!(got.has("transfer-encoding: chunked"), "{}", got.head);
    assert!(upstream.requests()[0].ends_with("\r\n\r\nwikipedia"));
    // The connection stays in step for the next request.
    client
        .write_all(b"GET /orders HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut client, &mut buf).await.body, b"abcde");
}

#[tokio::test]
async fn a_client_that_closes_mid_body_never_completes_the_upstream_request() {
    let upstream = Scripted::start(true, ok).await;
    let router = router_to(upstream.addr).await;
    let client = sent(
        router.addr,
        b"POST /orders HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten..",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(client);
    crate::harness::eventually("the upstream saw the request cut short", || {
        upstream
            .requests()
            .first()
            .is_some_and(|r| r.ends_with("<cut short>"))
    })
    .await;
    // The router goes on serving.
    let mut client = sent(router.addr, b"GET /orders HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(
        read_answer(&mut client, &mut Vec::new()).await.status(),
        200
    );
}

fn too_large(_: &str) -> Vec<u8> {
    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nnope".to_vec()
}

#[tokio::test]
async fn an_upstream_that_answers_before_the_body_is_read_is_relayed_and_the_connection_closed() {
    let upstream = Scripted::start(false, too_large).await;
    let router = router_to(upstream.addr).await;
    let mut client = sent(
        router.addr,
        b"POST /orders HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nstart",
    )
    .await;
    let mut buf = Vec::new();
    let got = read_answer(&mut client, &mut buf).await;
    assert_eq!((got.status(), got.body.as_slice()), (413, &b"nope"[..]));
    assert!(got.has("connection: close"), "{}", got.head);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "the connection stays open");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_across_client_connections() {
    let upstream = Scripted::start(true, ok).await;
    let router = router_to(upstream.addr).await;
    for _ in 0..6 {
        let mut client = sent(
            router.addr,
            b"GET /orders HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        let got = read_answer(&mut client, &mut Vec::new()).await;
        assert!(got.has("connection: close"), "{}", got.head);
    }
    // Two serving threads: one upstream connection each, at most.
    assert!(upstream.accepted.load(Ordering::SeqCst) <= 2);
}

fn both_framings(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()
}

#[tokio::test]
async fn an_answer_with_conflicting_framing_is_a_502_never_relayed() {
    let upstream = Scripted::start(true, both_framings).await;
    let router = router_to(upstream.addr).await;
    let mut client = sent(router.addr, b"GET /orders HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let got = read_answer(&mut client, &mut Vec::new()).await;
    assert_eq!(got.status(), 502);
    assert!(String::from_utf8_lossy(&got.body).contains("upstream_unreachable"));
}

fn unframed(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec()
}

#[tokio::test]
async fn an_answer_framed_by_its_close_is_relayed_whole_and_the_client_connection_closed() {
    let upstream = Scripted::start(false, unframed).await;
    let router = router_to(upstream.addr).await;
    let mut client = sent(router.addr, b"GET /orders HTTP/1.1\r\nHost: a\r\n\r\n").await;
    // The scripted upstream keeps reading: its answer ends when the router gives up on it,
    // so this reads whatever came before the router closed the client.
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut all)).await;
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.contains("until the end"), "{text}");
    drop(read);
}

#[tokio::test]
async fn an_upgrade_after_a_fast_request_on_the_same_connection_is_handed_to_hyper() {
    let upstream = Upstream::start().await;
    let router = router_to(upstream.addr).await;
    let mut client = sent(router.addr, b"GET /orders/1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut buf = Vec::new();
    let first = read_answer(&mut client, &mut buf).await;
    assert_eq!(first.body, b"/baseline/orders/1 sandbox=- body=");
    client
        .write_all(
            b"GET /orders/ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let end = tokio::time::timeout(
        Duration::from_secs(10),
        read_until_head(&mut client, &mut buf),
    )
    .await
    .unwrap()
    .unwrap();
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client.write_all(b"ping").await.unwrap();
    while buf.len() < 4 {
        let mut chunk = [0u8; 64];
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the echo");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(buf, b"ping");
}

#[tokio::test]
async fn a_request_the_fast_path_declines_is_answered_by_hyper_as_before() {
    let upstream = Upstream::start().await;
    let router = router_to(upstream.addr).await;
    let mut client = TcpStream::connect(router.addr).await.unwrap();
    // HTTP/1.0, then an unknown sandbox: both hyper's.
    client
        .write_all(b"GET /orders/1 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let end = read_until_head(&mut client, &mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let answer = router.get("nobody", "/orders/1").await.unwrap();
    assert_eq!(answer.status, 404);
    assert_eq!(answer.error_code(), "unknown_sandbox");
}
