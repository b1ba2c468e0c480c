//! The fast path's reading of a request against hyper's, on the same bytes.
//!
//! Shared with the fuzzer (`fuzz/fuzz_targets/request.rs` includes this file): for any input,
//! what the fast path would forward (method, target, fields, framing, body) must be what
//! hyper's server reads from those bytes; where the fast path is unsure it hands the
//! connection to hyper or refuses, and that is always allowed. Also checked: the head it
//! writes upstream parses back cleanly, with no field it was not meant to carry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Bytes};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sdp_router::h1::chunked::Chunked;
use sdp_router::h1::request::{self, Forwarding, Framing, MAX_FIELDS};
use tokio::io::AsyncWriteExt;

/// What one side reads from a request: what would go upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Reading {
    pub method: String,
    pub target: String,
    /// Field values by lowercase name, in the order they came.
    pub fields: BTreeMap<String, Vec<Vec<u8>>>,
    /// The body's length as its framing gives it: `None` when chunked.
    pub length: Option<u64>,
    pub body: Vec<u8>,
}

/// What the fast path does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Fast {
    /// Hyper takes the connection.
    Handover,
    /// More bytes are needed.
    Incomplete,
    /// Refused: 400, connection closed.
    Refused,
    Forwarded(Reading),
}

/// The fast path's reading of the first request in `bytes`.
pub fn fast(bytes: &[u8]) -> Fast {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let head = match request::parse(bytes, &mut fields) {
        request::Parsed::Partial => return Fast::Incomplete,
        request::Parsed::Handover => return Fast::Handover,
        request::Parsed::Fast(head) => head,
    };
    check_upstream_head(&head);
    let rest = &bytes[head.len..];
    let (length, body) = match head.framing {
        Framing::Empty => (Some(0), Vec::new()),
        Framing::Length(n) => match rest.get(..n as usize) {
            Some(body) => (Some(n), body.to_vec()),
            None => return Fast::Incomplete,
        },
        Framing::Chunked => {
            let mut chunked = Chunked::default();
            let mut body = Vec::new();
            match chunked.feed(rest, |data| body.extend_from_slice(data)) {
                Err(_) => return Fast::Refused,
                Ok(_) if !chunked.done() => return Fast::Incomplete,
                Ok(_) => (None, body),
            }
        }
    };
    let mut by_name = BTreeMap::<String, Vec<Vec<u8>>>::new();
    for field in head.fields {
        by_name
            .entry(field.name.to_ascii_lowercase())
            .or_default()
            .push(field.value.to_vec());
    }
    Fast::Forwarded(Reading {
        method: head.method.to_owned(),
        target: head.target.to_owned(),
        fields: by_name,
        length,
        body,
    })
}

/// Fields the fast path writes upstream of its own.
const ADDED: [&str; 7] = [
    "host",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-sdp-sandbox",
    "via",
];

/// The head written upstream, for a trusted peer and an untrusted one: one head, CRLF only,
/// the same method and target, every field either one of the client's or one the router
/// adds, and the body framed as the client framed it.
fn check_upstream_head(head: &request::Head<'_, '_>) {
    for trusted in [false, true] {
        let mut out = Vec::new();
        head.write_upstream(
            &Forwarding {
                base_path: "/base",
                host: b"upstream:8080",
                client_ip: b"10.0.0.1",
                trusted,
                sandbox: Some("bench"),
            },
            &mut out,
        );
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut written = httparse::Request::new(&mut fields);
        let parsed = written.parse(&out);
        assert_eq!(
            parsed.ok(),
            Some(httparse::Status::Complete(out.len())),
            "the upstream head is one whole head: {}",
            String::from_utf8_lossy(&out)
        );
        assert!(request::crlf_only(&out));
        assert_eq!(written.method, Some(head.method));
        assert_eq!(
            written.path.map(|p| p.strip_prefix("/base").unwrap_or(p)),
            Some(head.target)
        );
        for field in written.headers.iter() {
            let copied = head
                .fields
                .iter()
                .any(|f| f.name == field.name && f.value == field.value);
            let added = ADDED.iter().any(|a| field.name.eq_ignore_ascii_case(a));
            assert!(
                copied || added,
                "{} is neither the client's nor the router's",
                field.name
            );
        }
        let count = |name: &str| {
            written
                .headers
                .iter()
                .filter(|f| f.name.eq_ignore_ascii_case(name))
                .count()
        };
        let expected = match head.framing {
            Framing::Empty => (
                head.fields
                    .iter()
                    .filter(|f| f.name.eq_ignore_ascii_case("content-length"))
                    .count(),
                0,
            ),
            Framing::Length(_) => (1, 0),
            Framing::Chunked => (0, 1),
        };
        assert_eq!(
            (count("content-length"), count("transfer-encoding")),
            expected
        );
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
}

/// Hyper's server's reading of the first request in `bytes` (then the end of the
/// connection); `None` when it refuses it or its body.
pub fn hyper(bytes: &[u8]) -> Option<Reading> {
    RUNTIME.with(|runtime| runtime.block_on(hyper_read(bytes)))
}

async fn hyper_read(bytes: &[u8]) -> Option<Reading> {
    let (mut client, server) = tokio::io::duplex(bytes.len() + 64 * 1024);
    client.write_all(bytes).await.ok()?;
    client.shutdown().await.ok()?;
    let first = Arc::new(Mutex::new(None::<Option<Reading>>));
    let kept = first.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let kept = kept.clone();
        async move {
            let (parts, body) = req.into_parts();
            let length = body.size_hint().exact();
            let body = body.collect().await.ok().map(|b| b.to_bytes().to_vec());
            let mut fields = BTreeMap::<String, Vec<Vec<u8>>>::new();
            for (name, value) in &parts.headers {
                fields
                    .entry(name.as_str().to_owned())
                    .or_default()
                    .push(value.as_bytes().to_vec());
            }
            let reading = body.map(|body| Reading {
                method: parts.method.to_string(),
                target: parts
                    .uri
                    .path_and_query()
                    .map_or_else(String::new, |pq| pq.as_str().to_owned()),
                fields,
                length,
                body,
            });
            let mut first = kept.lock().unwrap();
            if first.is_none() {
                *first = Some(reading);
            }
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
        }
    });
    // Half-closed, so that the end of the input does not cancel the request being read:
    // that changes nothing of how a head or a body is parsed.
    let connection = http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(server), service);
    let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
    first.lock().unwrap().take().flatten()
}

/// The check: where the fast path forwards, hyper reads the same.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let Fast::Forwarded(fast) = fast(bytes) else {
        return Ok(());
    };
    match hyper(bytes) {
        Some(hyper) if hyper == fast => Ok(()),
        Some(hyper) => Err(format!(
            "the fast path reads {fast:?}, hyper reads {hyper:?}"
        )),
        None => Err(format!(
            "the fast path forwards what hyper refuses: {fast:?}"
        )),
    }
}
