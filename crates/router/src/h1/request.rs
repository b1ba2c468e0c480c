//! A request head, read for the fast path or declined.
//!
//! The fast path takes only what it is sure of, and says so field by field: one HTTP/1.1
//! request with an origin-form target, CRLF line ends, visible ASCII values, one `Host`, at
//! most one framing field, and a `Connection` that names only `keep-alive` or `close`.
//! Anything else is [`Parsed::Handover`]: hyper reads the same bytes and answers as it
//! always has, so a request the two would read differently never reaches an upstream in the
//! fast path's reading.

/// A longer head is hyper's (which answers 431 past its own limit).
pub const MAX_HEAD: usize = 16 * 1024;
/// More fields are hyper's.
pub const MAX_FIELDS: usize = 64;

/// What a buffer holds.
pub enum Parsed<'h, 'b> {
    /// The start of a head that may still be the fast path's: read more.
    Partial,
    /// Not for the fast path: hyper takes the connection, with these bytes.
    Handover,
    Fast(Head<'h, 'b>),
}

/// How a message's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A request head the fast path can forward.
pub struct Head<'h, 'b> {
    /// Bytes of the head, up to and with its empty line.
    pub len: usize,
    pub method: &'b str,
    /// Origin-form: the path and the query.
    pub target: &'b str,
    /// The target up to its query.
    pub path: &'b str,
    pub host: &'b str,
    /// The first `X-SDP-Sandbox`.
    pub sandbox: Option<&'b str>,
    pub framing: Framing,
    /// The client asked to close the connection after this request.
    pub close: bool,
    /// Every field, in order.
    pub fields: &'h [httparse::Header<'b>],
}

impl<'b> Head<'_, 'b> {
    /// The values of the fields named `name`, in order.
    pub fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b str> + 's {
        self.fields
            .iter()
            .filter(move |f| f.name.eq_ignore_ascii_case(name))
            .map(|f| ascii(f.value))
    }
}

/// What an upstream request's head is made of besides the client's fields.
pub struct Forwarding<'a> {
    /// Put before the target: empty, or the baseline's base path without a trailing `/`.
    pub base_path: &'a str,
    /// The upstream's `Host`.
    pub host: &'a [u8],
    /// The client's address, as `X-Forwarded-For` carries it.
    pub client_ip: &'a [u8],
    /// The peer is a trusted proxy: its `X-Forwarded-*` are kept, `For` appended to.
    pub trusted: bool,
    /// The sandbox the request names, passed on as `X-SDP-Sandbox`.
    pub sandbox: Option<&'a str>,
}

/// Fields that describe one connection (RFC 9110 §7.6.1, and `Proxy-Connection`).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
];

impl Head<'_, '_> {
    /// Writes the head the upstream gets, as the hyper path rewrites it (`proxy.rs`): the
    /// client's fields copied as they came, less the hop-by-hop ones and those the router
    /// sets; then `Host`, the framing, the forwarding fields, the sandbox and `Via`.
    pub fn write_upstream(&self, f: &Forwarding<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(f.base_path.as_bytes());
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut has_proto = false;
        let mut has_host = false;
        for field in self.fields {
            let name = field.name;
            let dropped = HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
                || name.eq_ignore_ascii_case("host")
                || (f.sandbox.is_some() && name.eq_ignore_ascii_case("x-sdp-sandbox"))
                || if f.trusted {
                    has_proto |= name.eq_ignore_ascii_case("x-forwarded-proto");
                    has_host |= name.eq_ignore_ascii_case("x-forwarded-host");
                    name.eq_ignore_ascii_case("x-forwarded-for")
                } else {
                    client_claim(name)
                };
            if !dropped {
                field_line(out, name.as_bytes(), field.value);
            }
        }
        field_line(out, b"host", f.host);
        if self.framing == Framing::Chunked {
            field_line(out, b"transfer-encoding", b"chunked");
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if f.trusted {
            for earlier in self.values("x-forwarded-for") {
                out.extend_from_slice(earlier.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(f.client_ip);
        out.extend_from_slice(b"\r\n");
        if !has_proto {
            field_line(out, b"x-forwarded-proto", b"http");
        }
        if !has_host {
            field_line(out, b"x-forwarded-host", self.host.as_bytes());
        }
        if let Some(sandbox) = f.sandbox {
            field_line(out, b"x-sdp-sandbox", sandbox.as_bytes());
        }
        out.extend_from_slice(b"via: 1.1 sdp-router\r\n\r\n");
    }
}

/// A field a proxy writes about the client: from a peer that is not a trusted proxy, a
/// claim anyone can make.
fn client_claim(name: &str) -> bool {
    name.get(..12)
        .is_some_and(|p| p.eq_ignore_ascii_case("x-forwarded-"))
        || name.eq_ignore_ascii_case("forwarded")
        || name.eq_ignore_ascii_case("x-real-ip")
}

fn field_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Methods the fast path forwards: each has a body only as its framing says, and a response
/// framed the usual way (no `HEAD`, no `CONNECT`).
const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

/// Reads the head at the start of `buf` into `fields`.
pub fn parse<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [httparse::Header<'b>; MAX_FIELDS],
) -> Parsed<'h, 'b> {
    let mut req = httparse::Request::new(fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Handover,
    };
    if len > MAX_HEAD || !crlf_only(&buf[..len]) || req.version != Some(1) {
        return Parsed::Handover;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Handover;
    };
    // httparse skips empty lines before the request line; hyper's reading of them is its own.
    if !buf.starts_with(method.as_bytes()) || !METHODS.contains(&method) {
        return Parsed::Handover;
    }
    if !target.starts_with('/') || !target.bytes().all(target_byte) {
        return Parsed::Handover;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let fields = req.headers;

    let mut host = None;
    let mut hosts = 0;
    let mut sandbox = None;
    let mut length = None;
    let mut lengths = 0;
    let mut chunked = 0;
    let mut close = false;
    for field in fields.iter() {
        if !field.value.iter().all(|&b| visible(b)) {
            return Parsed::Handover;
        }
        // Read as text only for the fields interpreted here: most are copied as bytes.
        let value = || ascii(field.value);
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = decimal(value());
            if length.is_none() {
                return Parsed::Handover;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked += 1;
            if !field.value.eq_ignore_ascii_case(b"chunked") {
                return Parsed::Handover;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value().split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case("keep-alive") {
                    return Parsed::Handover;
                }
            }
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(value());
        } else if name.eq_ignore_ascii_case("x-sdp-sandbox") {
            sandbox = sandbox.or_else(|| Some(value()));
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return Parsed::Handover;
        }
    }
    let framing = match (lengths, chunked, length) {
        (0, 0, _) | (1, 0, Some(0)) => Framing::Empty,
        (1, 0, Some(n)) => Framing::Length(n),
        (0, 1, _) => Framing::Chunked,
        _ => return Parsed::Handover,
    };
    let (1, Some(host)) = (hosts, host) else {
        return Parsed::Handover;
    };
    Parsed::Fast(Head {
        len,
        method,
        target,
        path,
        host,
        sandbox,
        framing,
        close,
        fields,
    })
}

/// Every line ends with CRLF: no bare LF, no bare CR.
pub fn crlf_only(head: &[u8]) -> bool {
    let mut previous = 0u8;
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\n' if previous != b'\r' => return false,
            b'\r' if head.get(i + 1) != Some(&b'\n') => return false,
            _ => {}
        }
        previous = b;
    }
    true
}

/// A byte a field value may hold here: visible ASCII, space and tab.
fn visible(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b)
}

/// A byte of an origin-form target the fast path forwards: RFC 3986's unreserved,
/// sub-delims, `:`, `@`, `/`, `?` and `%`. Others (`"`, `{`, `|`, `#`, ...) are hyper's.
fn target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// A `Content-Length` value: decimal digits only, short enough never to overflow.
pub fn decimal(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Bytes already checked to be ASCII.
fn ascii(value: &[u8]) -> &str {
    std::str::from_utf8(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> &'static str {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match parse(bytes, &mut fields) {
            Parsed::Partial => "partial",
            Parsed::Handover => "handover",
            Parsed::Fast(_) => "fast",
        }
    }

    #[test]
    fn a_plain_get_is_the_fast_paths() {
        assert_eq!(parsed(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n"), "fast");
    }

    #[test]
    fn a_head_cut_short_asks_for_more() {
        assert_eq!(parsed(b"GET /a HTTP/1.1\r\nHost: x\r\n"), "partial");
    }

    #[test]
    fn anything_unusual_is_handed_to_hyper() {
        for head in [
            &b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n"[..],
            b"GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.1\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nA: b\rc\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"GET /a HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: x-private\r\n\r\n",
            b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: caf\xc3\xa9\r\n\r\n",
            b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(parsed(head), "handover", "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_head_past_the_limit_is_handed_to_hyper() {
        let mut head = b"GET /a HTTP/1.1\r\nHost: x\r\nA: ".to_vec();
        head.resize(MAX_HEAD + 1, b'a');
        assert_eq!(parsed(&head), "handover");
    }
}
