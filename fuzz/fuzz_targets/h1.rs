//! Arbitrary bytes through the fast path's HTTP/1.1 reading:
//! - as a request, checked against hyper's reading of the same bytes (the differential
//!   check of the router's tests, `crates/router/tests/it/hyper_check.rs`);
//! - as a chunked body, which must read the same whole or cut at any byte;
//! - as an upstream's answer, whose head as rewritten for the client must parse back as one
//!   head with no hop-by-hop field and the router's route.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdp_router::h1::chunked::Chunked;
use sdp_router::h1::request::MAX_FIELDS;
use sdp_router::h1::response;

#[path = "../../crates/router/tests/it/hyper_check.rs"]
#[allow(dead_code)]
mod hyper_check;

fuzz_target!(|data: &[u8]| {
    if let Err(difference) = hyper_check::check(data) {
        panic!("{difference}");
    }
    chunked_reads_the_same_cut_anywhere(data);
    rewritten_answers_parse_back(data);
});

fn chunked_reads_the_same_cut_anywhere(data: &[u8]) {
    let mut whole = Chunked::default();
    let mut all = Vec::new();
    let read = whole.feed(data, |d| all.extend_from_slice(d));
    let cut = data.first().map_or(0, |&b| usize::from(b)) % (data.len() + 1);
    let mut parts = Chunked::default();
    let mut pieces = Vec::new();
    let first = parts.feed(&data[..cut], |d| pieces.extend_from_slice(d));
    let read_in_parts = match first {
        Ok(n) if n < cut => Ok(n),
        Ok(n) => parts
            .feed(&data[cut..], |d| pieces.extend_from_slice(d))
            .map(|m| n + m),
        Err(e) => Err(e),
    };
    assert_eq!(read.is_ok(), read_in_parts.is_ok());
    if let (Ok(a), Ok(b)) = (read, read_in_parts) {
        assert_eq!((a, whole.done()), (b, parts.done()));
        assert_eq!(all, pieces);
    }
}

fn rewritten_answers_parse_back(data: &[u8]) {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let response::Parsed::Head(head) = response::parse(data, &mut fields) else {
        return;
    };
    let mut out = Vec::new();
    head.write("sandbox", true, &mut out);
    let mut again = [httparse::EMPTY_HEADER; MAX_FIELDS + 4];
    let mut parsed = httparse::Response::new(&mut again);
    assert_eq!(parsed.parse(&out), Ok(httparse::Status::Complete(out.len())));
    let routes = parsed
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("x-sdp-route"))
        .count();
    assert_eq!(routes, 1);
    for field in parsed.headers.iter() {
        for hop in ["keep-alive", "te", "upgrade", "proxy-connection"] {
            assert!(!field.name.eq_ignore_ascii_case(hop), "{hop} relayed");
        }
    }
}
