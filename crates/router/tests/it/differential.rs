//! The fast path's parser against hyper's, on request-smuggling cases and on requests made
//! of risky pieces at random: where the two would read a request differently, the fast path
//! must hand it to hyper or refuse it, never forward its own reading.

use proptest::prelude::*;
use proptest::strategy::ValueTree;

use crate::hyper_check::{self, Fast};

/// Requests the fast path must never forward: each would let two readers of it disagree.
const SMUGGLING: &[(&str, &[u8])] = &[
    (
        "length and chunked",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "chunked and length",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ),
    (
        "two equal lengths",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
    ),
    (
        "two different lengths",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ),
    (
        "a list of lengths",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\na",
    ),
    (
        "a signed length",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na",
    ),
    (
        "a length too long to hold",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ),
    (
        "chunked then identity",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ),
    (
        "identity then chunked",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "gzip",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    ),
    (
        "two coding fields",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "a coding with a tab",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\t\r\nContent-Length: 3\r\n\r\nabc",
    ),
    (
        "an obs-folded coding",
        b"POST /a HTTP/1.1\r\nHost: x\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "an obs-folded value",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\tc\r\n\r\n",
    ),
    (
        "a bare LF after the request line",
        b"GET /a HTTP/1.1\nHost: x\r\n\r\n",
    ),
    (
        "a bare LF after a field",
        b"GET /a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    ),
    (
        "a bare LF to end the head",
        b"GET /a HTTP/1.1\r\nHost: x\r\n\n",
    ),
    (
        "a bare CR in a value",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\rContent-Length: 3\r\n\r\nabc",
    ),
    (
        "a NUL in a value",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    ),
    (
        "a control byte in a value",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\x01c\r\n\r\n",
    ),
    (
        "a NUL in a name",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-\x00A: b\r\n\r\n",
    ),
    (
        "a space before the colon",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc",
    ),
    (
        "a space in a name",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent Length: 3\r\n\r\nabc",
    ),
    (
        "a non-ASCII value",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: \xff\r\n\r\n",
    ),
    ("no host", b"GET /a HTTP/1.1\r\n\r\n"),
    (
        "two hosts",
        b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    ),
    (
        "an absolute-form target",
        b"GET http://y/a HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "a fragment in the target",
        b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    ("HTTP/1.0", b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n"),
    (
        "two spaces in the request line",
        b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "an empty line before the request",
        b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "an upgrade",
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ),
    (
        "an expectation",
        b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\na",
    ),
    (
        "a connection option naming a field",
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: X-A\r\nX-A: b\r\n\r\n",
    ),
    ("HEAD", b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("CONNECT", b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
    (
        "an invalid chunk size",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nz\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a chunk size with a 0x",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a chunk size with a space",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a negative chunk size",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a chunk size that overflows",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000003\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a huge chunk size",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "chunk data longer than its size",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a bare LF after a chunk size",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    ),
    (
        "a chunk extension with a bare LF",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;a\nb\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "a trailer without a colon",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T 1\r\n\r\n",
    ),
    (
        "a trailer with a bare LF",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\n\r\n",
    ),
];

#[test]
fn risky_pieces_make_requests_the_fast_path_forwards_often_enough_to_compare() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let forwarded = (0..1000)
        .filter(|_| {
            let bytes = request().new_tree(&mut runner).unwrap().current();
            matches!(hyper_check::fast(&bytes), Fast::Forwarded(_))
        })
        .count();
    assert!(forwarded >= 100, "only {forwarded} of 1000 forwarded");
}

#[test]
fn request_smuggling_cases_are_never_forwarded_in_the_fast_paths_reading() {
    for (name, bytes) in SMUGGLING {
        let fast = hyper_check::fast(bytes);
        assert!(
            matches!(fast, Fast::Handover | Fast::Refused),
            "{name}: the fast path would forward it: {fast:?}"
        );
    }
}

/// Found by the fuzzer: hyper takes at most 100 trailer fields, and refused a body with 104
/// that the fast path had forwarded.
#[test]
fn a_body_with_more_trailer_fields_than_hyper_takes_is_never_forwarded() {
    let with = |fields: usize| {
        let mut bytes =
            b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        for i in 0..fields {
            bytes.extend_from_slice(format!("X-T{i}: {i}\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        bytes
    };
    assert!(matches!(hyper_check::fast(&with(100)), Fast::Forwarded(_)));
    for fields in [100, 101, 104] {
        assert_eq!(hyper_check::check(&with(fields)), Ok(()), "{fields} fields");
    }
    assert!(matches!(
        hyper_check::fast(&with(101)),
        Fast::Handover | Fast::Refused
    ));
}

#[test]
fn a_head_past_the_limit_is_hyper_s_to_refuse() {
    let mut head = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
    head.resize(sdp_router::h1::request::MAX_HEAD + 10, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    assert_eq!(hyper_check::fast(&head), Fast::Handover);
    assert_eq!(hyper_check::check(&head), Ok(()));
}

#[test]
fn plain_requests_are_read_by_the_fast_path_as_hyper_reads_them() {
    for bytes in [
        &b"GET /orders/1?x=y&z=%20 HTTP/1.1\r\nHost: x\r\nUser-Agent: a\r\nAccept: */*\r\n\r\n"[..],
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"PUT /a HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\nConnection: close\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"q\"\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\nX-Forwarded-For: 1.2.3.4\r\nVia: 1.0 other\r\n\r\n",
        b"DELETE /a HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nX-Spaces:   v  \r\n\r\n",
    ] {
        assert!(
            matches!(hyper_check::fast(bytes), Fast::Forwarded(_)),
            "{}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(hyper_check::check(bytes), Ok(()));
    }
}

/// Pieces of requests that the property below puts together: plain ones, most often, so
/// that many requests reach the fast path's reading, and risky ones among them.
const REQUEST_LINES: &[&str] = &[
    "GET /a HTTP/1.1",
    "POST /orders/1?x=y HTTP/1.1",
    "PUT /%zz HTTP/1.1",
    "OPTIONS /a HTTP/1.1",
    "DELETE /a;b=c HTTP/1.1",
];
const RISKY_LINES: &[&str] = &[
    "GET http://x/a HTTP/1.1",
    "GET /a HTTP/1.0",
    "GET  /a HTTP/1.1",
    "get /a HTTP/1.1",
    "GET /a\"b HTTP/1.1",
    "GET /a|b{c} HTTP/1.1",
    "GET * HTTP/1.1",
    "GET /a HTTP/1.1 ",
    "GET /a\x00 HTTP/1.1",
];
const FIELDS: &[&str] = &[
    "Content-Length: 5",
    "Content-Length: 3",
    "Content-Length: 0",
    "Content-Length: 05",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: CHUNKED",
    "X-SDP-Sandbox: bench",
    "baggage: sdp-sandbox=bench",
    "Connection: close",
    "Connection: keep-alive",
    "TE: trailers",
    "Keep-Alive: timeout=5",
    "X-Forwarded-For: 1.2.3.4",
    "Forwarded: for=1.2.3.4",
    "X-A:\tb\t",
    "X-Empty:",
    "Accept: */*",
];
const RISKY_FIELDS: &[&str] = &[
    "Host: bench.sandbox.test",
    "Host:",
    "Content-Length: 5, 5",
    "Content-Length:5",
    "Content-Length : 5",
    "Content-Length: 18446744073709551616",
    "Content-Length: -1",
    "Transfer-Encoding: chunked, identity",
    "Transfer-Encoding: identity",
    "Transfer-Encoding: xchunked",
    "Transfer-Encoding: chunked ",
    " Transfer-Encoding: chunked",
    "\tX-Folded: yes",
    "Connection: keep-alive, upgrade",
    "Connection: te",
    "Upgrade: websocket",
    "Expect: 100-continue",
    "X-A: b\x00c",
    "X-A: b\x7fc",
    "X-A: caf\u{e9}",
    "X-\x01: v",
    "X-A b: c",
    ": empty name",
];
/// Mostly CRLF, so that many requests get past their heads to their fields and bodies.
const ENDS: &[&str] = &[
    "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\n", "\r", "\r\r\n",
];
const BODIES: &[&str] = &[
    "",
    "hello",
    "hel",
    "5\r\nhello\r\n0\r\n\r\n",
    "5;ext=1\r\nhello\r\n0\r\n\r\n",
    "5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    "5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    "5 \r\nhello\r\n0\r\n\r\n",
    "0x5\r\nhello\r\n0\r\n\r\n",
    "ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "5\nhello\n0\n\n",
    "3\r\nhello\r\n0\r\n\r\n",
];

fn request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            3 => prop::sample::select(REQUEST_LINES),
            1 => prop::sample::select(RISKY_LINES),
        ],
        prop::bool::weighted(0.9),
        prop::collection::vec(
            (
                prop_oneof![
                    6 => prop::sample::select(FIELDS),
                    1 => prop::sample::select(RISKY_FIELDS),
                ],
                prop::sample::select(ENDS),
            ),
            0..5,
        ),
        prop::sample::select(ENDS),
        prop::sample::select(BODIES),
    )
        .prop_map(|(line, host, fields, end, body)| {
            let mut bytes = format!("{line}\r\n").into_bytes();
            if host {
                bytes.extend_from_slice(b"Host: x\r\n");
            }
            for (field, end) in fields {
                bytes.extend_from_slice(field.as_bytes());
                bytes.extend_from_slice(end.as_bytes());
            }
            bytes.extend_from_slice(end.as_bytes());
            bytes.extend_from_slice(body.as_bytes());
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn requests_of_risky_pieces_are_forwarded_only_as_hyper_reads_them(bytes in request()) {
        prop_assert_eq!(hyper_check::check(&bytes), Ok(()));
    }
}
