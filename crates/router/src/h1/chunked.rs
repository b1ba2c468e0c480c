//! The chunked framing (RFC 9112 §7.1), followed byte by byte so that a body can be relayed
//! as it came, unchanged, and its end known.
//!
//! Stricter than the RFC where hyper is lenient: no whitespace around a chunk size, at most
//! 15 hex digits (so no overflow), extensions of visible ASCII only and short, trailer fields
//! as `token: value`, every line ending in CRLF. A body outside that is refused; it is never
//! read some other way.

/// Longest extension part of one chunk-size line.
const MAX_EXTENSION: usize = 1024;
/// Longest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most trailer fields: hyper's own bound (its default `h1_max_headers`), past which it refuses
/// the body; the fast path must never forward a body hyper would not.
const MAX_TRAILER_FIELDS: usize = 100;
/// Hex digits of a chunk size: up to 2^60 - 1.
const MAX_SIZE_DIGITS: u8 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct ChunkError(&'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk size; `digits` so far.
    Size {
        value: u64,
        digits: u8,
    },
    /// After `;`: an extension, up to CR.
    Extension {
        value: u64,
        len: usize,
    },
    /// After the size line's CR.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    /// Bytes of trailer section so far.
    trailers: usize,
    /// Trailer fields so far.
    fields: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            trailers: 0,
            fields: 0,
        }
    }
}

impl Chunked {
    /// The body has ended (its last chunk and trailers read).
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `input`, handing each stretch of chunk data to `data`; returns how many bytes
    /// belong to the body (all of `input` unless it ended within).
    pub fn feed(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data { left } => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    data(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { left }
                    }
                }
                state => {
                    i += 1;
                    self.step(state, b)?
                }
            };
        }
        Ok(i)
    }

    fn step(&mut self, state: State, b: u8) -> Result<State, ChunkError> {
        Ok(match state {
            State::Size { value, digits } => match (b as char).to_digit(16) {
                Some(d) if digits < MAX_SIZE_DIGITS => State::Size {
                    value: value << 4 | u64::from(d),
                    digits: digits + 1,
                },
                Some(_) => return Err(ChunkError("chunk size too large")),
                None if digits == 0 => return Err(ChunkError("no chunk size")),
                None if b == b';' => State::Extension { value, len: 0 },
                None if b == b'\r' => State::SizeLf { value },
                None => return Err(ChunkError("bad chunk size")),
            },
            State::Extension { value, len } => match b {
                b'\r' => State::SizeLf { value },
                _ if len >= MAX_EXTENSION => return Err(ChunkError("chunk extension too long")),
                b'\t' | 0x20..=0x7e => State::Extension {
                    value,
                    len: len + 1,
                },
                _ => return Err(ChunkError("bad chunk extension")),
            },
            State::SizeLf { value } => match (b, value) {
                (b'\n', 0) => State::TrailerStart,
                (b'\n', left) => State::Data { left },
                _ => return Err(ChunkError("bare CR after a chunk size")),
            },
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataLf if b == b'\n' => State::Size {
                value: 0,
                digits: 0,
            },
            State::DataCr | State::DataLf => return Err(ChunkError("no CRLF after chunk data")),
            State::TrailerStart => match b {
                b'\r' => State::EndLf,
                _ if token(b) => self.trailer(State::TrailerName)?,
                _ => return Err(ChunkError("bad trailer field")),
            },
            State::TrailerName => match b {
                b':' => self.trailer(State::TrailerValue)?,
                _ if token(b) => self.trailer(State::TrailerName)?,
                _ => return Err(ChunkError("bad trailer name")),
            },
            State::TrailerValue => match b {
                b'\r' => self.trailer(State::TrailerLf)?,
                b'\t' | 0x20..=0x7e => self.trailer(State::TrailerValue)?,
                _ => return Err(ChunkError("bad trailer value")),
            },
            State::TrailerLf if b == b'\n' => {
                self.fields += 1;
                if self.fields > MAX_TRAILER_FIELDS {
                    return Err(ChunkError("too many trailer fields"));
                }
                self.trailer(State::TrailerStart)?
            }
            State::TrailerLf => return Err(ChunkError("bare CR in a trailer")),
            State::EndLf if b == b'\n' => State::Done,
            State::EndLf => return Err(ChunkError("bare CR at the end")),
            State::Data { .. } | State::Done => state,
        })
    }

    /// One more byte of trailers, within their limit.
    fn trailer(&mut self, next: State) -> Result<State, ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError("trailers too long"));
        }
        Ok(next)
    }
}

/// A `tchar` of RFC 9110 §5.6.2.
pub fn token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut chunked = Chunked::default();
        let mut out = Vec::new();
        let used = chunked.feed(body, |d| out.extend_from_slice(d))?;
        Ok((out, used, chunked.done()))
    }

    #[test]
    fn chunks_extensions_and_trailers_are_followed_to_the_end() {
        let body = b"3;a=b\r\nabc\r\n0\r\nX-T: 1\r\n\r\nGET";
        assert_eq!(decode(body), Ok((b"abc".to_vec(), body.len() - 3, true)));
    }

    #[test]
    fn a_body_fed_one_byte_at_a_time_reads_the_same() {
        let body = b"A\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n";
        let mut chunked = Chunked::default();
        let mut out = Vec::new();
        for b in body {
            assert_eq!(chunked.feed(&[*b], |d| out.extend_from_slice(d)), Ok(1));
        }
        assert!(chunked.done());
        assert_eq!(out, b"0123456789x");
    }

    #[test]
    fn malformed_framing_is_refused() {
        for body in [
            &b"\r\n"[..],
            b"g\r\n",
            b" 3\r\nabc\r\n",
            b"3 \r\nabc\r\n",
            b"3\nabc\r\n",
            b"3\r\nabcd\r\n",
            b"1000000000000000\r\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\nX-T 1\r\n\r\n",
            b"0\r\n\n",
            b"1;\x00\r\n",
        ] {
            assert!(decode(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
