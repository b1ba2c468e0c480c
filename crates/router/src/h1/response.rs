//! An upstream's response head, read and rewritten for the client, or refused.
//!
//! Upstreams run other users' code: a head whose framing is not plain (two lengths, a length
//! and a coding, a coding other than `chunked`, an interim answer, a bare LF) is refused, and
//! the client gets a 502 rather than a response read one way here and another way by the
//! client.

use super::chunked::token;
use super::request::{MAX_FIELDS, MAX_HEAD, crlf_only, decimal};

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Empty,
    Length(u64),
    Chunked,
    /// When the upstream closes the connection.
    UntilClose,
}

pub enum Parsed<'h, 'b> {
    Partial,
    Refused(&'static str),
    Head(Head<'h, 'b>),
}

pub struct Head<'h, 'b> {
    /// Bytes of the head, with its empty line.
    pub len: usize,
    pub status: u16,
    reason: &'b str,
    pub body: Body,
    /// The connection can take another request once the body has been read.
    pub reusable: bool,
    /// A `Connection` field names other fields (most answers have none, and pay nothing).
    options: bool,
    fields: &'h [httparse::Header<'b>],
}

/// Fields that describe one connection (RFC 9110 §7.6.1), and the route, which the router
/// sets itself.
const DROPPED: [&str; 7] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "x-sdp-route",
];

/// Reads the head at the start of `buf`, an answer to a request that is not `HEAD`.
pub fn parse<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [httparse::Header<'b>; MAX_FIELDS],
) -> Parsed<'h, 'b> {
    let mut res = httparse::Response::new(fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) => return Parsed::Refused("response head too long"),
        Err(_) => return Parsed::Refused("malformed response head"),
    };
    if !crlf_only(&buf[..len]) {
        return Parsed::Refused("response head with a bare CR or LF");
    }
    let (Some(version), Some(status), Some(reason)) = (res.version, res.code, res.reason) else {
        return Parsed::Refused("malformed status line");
    };
    if status < 200 {
        return Parsed::Refused("interim or switching response");
    }
    let fields = res.headers;
    let mut lengths = 0;
    let mut length = None;
    let mut codings = 0;
    let mut close = version == 0;
    let mut options = false;
    for field in fields.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = std::str::from_utf8(field.value).ok().and_then(decimal);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            if !field.value.eq_ignore_ascii_case(b"chunked") {
                return Parsed::Refused("transfer coding other than chunked");
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let Ok(value) = std::str::from_utf8(field.value) else {
                return Parsed::Refused("bad Connection field");
            };
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case("keep-alive") {
                    options = true;
                }
            }
        }
    }
    let no_body = status == 204 || status == 304;
    let body = match (lengths, codings, length) {
        _ if no_body => Body::Empty,
        (0, 0, _) => {
            close = true;
            Body::UntilClose
        }
        (1, 0, Some(0)) => Body::Empty,
        (1, 0, Some(n)) => Body::Length(n),
        (0, 1, _) if version == 1 => Body::Chunked,
        _ => return Parsed::Refused("conflicting or malformed framing fields"),
    };
    Parsed::Head(Head {
        len,
        status,
        reason,
        body,
        reusable: !close,
        options,
        fields,
    })
}

impl Head<'_, '_> {
    /// Writes the head the client gets: hop-by-hop fields and those `Connection` names out,
    /// `X-SDP-Route: route` in, and `Connection: close` when `close`.
    pub fn write(&self, route: &str, close: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(b"HTTP/1.1 ");
        // httparse reads exactly three digits.
        let s = self.status;
        out.extend_from_slice(&[
            b'0' + (s / 100 % 10) as u8,
            b'0' + (s / 10 % 10) as u8,
            b'0' + (s % 10) as u8,
        ]);
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for field in self.fields {
            if DROPPED.iter().any(|d| field.name.eq_ignore_ascii_case(d))
                || (self.options && self.named(field.name))
            {
                continue;
            }
            out.extend_from_slice(field.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(field.value);
            out.extend_from_slice(b"\r\n");
        }
        if self.body == Body::Chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"x-sdp-route: ");
        out.extend_from_slice(route.as_bytes());
        out.extend_from_slice(b"\r\n");
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// `name` is an option of a `Connection` field: a field of this connection alone.
    fn named(&self, name: &str) -> bool {
        self.fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("connection"))
            .filter_map(|f| std::str::from_utf8(f.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                let t = t.trim();
                t.bytes().all(token) && t.eq_ignore_ascii_case(name)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(bytes: &[u8]) -> Result<(String, Body, bool), &'static str> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match parse(bytes, &mut fields) {
            Parsed::Partial => Err("partial"),
            Parsed::Refused(why) => Err(why),
            Parsed::Head(head) => {
                let mut out = Vec::new();
                head.write("sandbox", false, &mut out);
                Ok((String::from_utf8(out).unwrap(), head.body, head.reusable))
            }
        }
    }

    #[test]
    fn hop_by_hop_fields_are_dropped_and_the_route_added() {
        let (head, body, reusable) = rewritten(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nX-SDP-Route: forged\r\nContent-Length: 2\r\nX-Kept: 1\r\n\r\nok",
        )
        .unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Kept: 1\r\nx-sdp-route: sandbox\r\n\r\n"
        );
        assert_eq!((body, reusable), (Body::Length(2), true));
    }

    #[test]
    fn a_chunked_answer_stays_chunked() {
        let (head, body, _) =
            rewritten(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(head.contains("transfer-encoding: chunked\r\n"));
        assert_eq!(body, Body::Chunked);
    }

    #[test]
    fn an_answer_without_framing_ends_with_its_connection() {
        let (_, body, reusable) = rewritten(b"HTTP/1.0 200 OK\r\n\r\nhello").unwrap();
        assert_eq!((body, reusable), (Body::UntilClose, false));
    }

    #[test]
    fn unclear_framing_is_refused() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                rewritten(head).is_err(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
