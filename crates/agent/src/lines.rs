//! Splits a command's output into log lines: a line ends at `\n`, `\r\n` or a lone `\r` (as
//! progress bars print), a line longer than [`MAX_LINE`] bytes is cut into pieces, and bytes
//! that are not UTF-8 are replaced rather than refused.

use std::sync::Arc;

use sdp_protocol::{Credentials, LogStream, ServiceName};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::events::Outbox;
use crate::git::mask;

/// The longest line kept whole; longer ones are split at this many bytes.
pub const MAX_LINE: usize = 8 * 1024;

/// Where the lines of one output stream go: log events of a deployment, tagged with the
/// service and stream, with the user's password masked when given.
pub struct LineSink {
    pub outbox: Arc<Outbox>,
    pub deployment: String,
    pub service: ServiceName,
    pub stream: LogStream,
    pub mask: Option<Credentials>,
}

impl LineSink {
    pub async fn emit(&self, line: String) {
        let line = match &self.mask {
            Some(credentials) => mask(&line, credentials),
            None => line,
        };
        self.outbox
            .log(&self.deployment, Some(&self.service), self.stream, line)
            .await;
    }
}

/// Reads `reader` to its end and sends each line to `sink`.
pub async fn pump<R: AsyncRead + Unpin>(mut reader: R, sink: LineSink) {
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for line in splitter.push(&buf[..n]) {
            sink.emit(line).await;
        }
    }
    if let Some(line) = splitter.finish() {
        sink.emit(line).await;
    }
}

/// The state between chunks: the unfinished line, and whether the last byte was a `\r`
/// (so that a `\n` right after it ends no second, empty line).
#[derive(Default)]
pub struct Splitter {
    pending: Vec<u8>,
    after_cr: bool,
}

impl Splitter {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in chunk {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    out.push(String::from_utf8_lossy(&self.pending).into_owned());
                    self.pending.clear();
                    self.after_cr = b == b'\r';
                }
                _ => {
                    self.after_cr = false;
                    self.pending.push(b);
                    if self.pending.len() >= MAX_LINE {
                        out.push(String::from_utf8_lossy(&self.pending).into_owned());
                        self.pending.clear();
                    }
                }
            }
        }
        out
    }

    pub fn finish(self) -> Option<String> {
        (!self.pending.is_empty()).then(|| String::from_utf8_lossy(&self.pending).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn lines_end_at_newline_crlf_or_a_lone_carriage_return() {
        assert_eq!(split(&[b"a\nb\r\nc\rd"]), ["a", "b", "c", "d"]);
        // A CRLF split across two reads is still one line end.
        assert_eq!(split(&[b"a\r", b"\nb\n"]), ["a", "b"]);
        assert_eq!(split(&[b"\n\n"]), ["", ""]);
    }

    #[test]
    fn overlong_lines_are_split_and_bad_utf8_is_replaced() {
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let lines = split(&[&long]);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[2].len(), 5);
        assert_eq!(split(&[b"ok \xff\xfe end\n"]), ["ok \u{fffd}\u{fffd} end"]);
    }
}
