//! Splits a command's output into log lines: a line ends at `\n`, `\r\n` or a lone `\r` (as
//! progress bars print), a line whose text would take more than [`MAX_LINE`] bytes in a frame
//! is cut into pieces (between characters, never inside one), and bytes that are not UTF-8 are
//! replaced rather than refused.
//!
//! A line ended by a lone `\r` keeps it as its last character: it is a progress bar's redraw,
//! which a viewer draws over with the next line of the same stream, as a terminal does. A `\r`
//! that ends a read is taken for a plain line end, since what follows it is not known yet
//! (progress bars mostly write the `\r` first, and a CRLF mostly comes whole).

use std::sync::Arc;

use sdp_protocol::{Credentials, DeploymentId, LogStream, ServiceName, escaped_char_len};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::events::Outbox;
use crate::git::mask;

/// The most a line's text may take once encoded in a frame (JSON escapes control characters:
/// a NUL takes six bytes); longer lines are cut into pieces of at most this.
pub const MAX_LINE: usize = 8 * 1024;

/// Where the lines of one output stream go: log events of a deployment, tagged with the
/// service and stream, with the user's password masked when given.
pub struct LineSink {
    pub outbox: Arc<Outbox>,
    pub deployment: DeploymentId,
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

/// The state between chunks: the unfinished line and what it takes encoded, the first bytes
/// of a character whose rest is in the next chunk, and whether the last character was a `\r`
/// (so that a `\n` right after it ends no second, empty line). It counts the bytes it has
/// made into characters, so that each line says where in the output it ends: where a
/// follower resumes after the agent's restart.
#[derive(Default)]
pub struct Splitter {
    line: String,
    escaped: usize,
    partial: Vec<u8>,
    after_cr: bool,
    /// A `\r` just read, with the position past it: whether it ends a progress line depends
    /// on the character after it.
    cr_at: Option<u64>,
    pos: u64,
}

impl Splitter {
    /// A splitter that takes up output at `pos`, just after a `\r` when `after_cr`.
    pub fn resumed(pos: u64, after_cr: bool) -> Splitter {
        Splitter {
            pos,
            after_cr,
            ..Splitter::default()
        }
    }

    /// The output was emptied: positions count from `pos` again.
    pub fn rebase(&mut self, pos: u64) {
        self.pos = pos;
    }

    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.push_at(chunk)
            .into_iter()
            .map(|(line, _)| line)
            .collect()
    }

    /// Each line with the position in the output just past it (its line end included).
    pub fn push_at(&mut self, chunk: &[u8]) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let joined;
        let bytes = if self.partial.is_empty() {
            chunk
        } else {
            let mut partial = std::mem::take(&mut self.partial);
            partial.extend_from_slice(chunk);
            joined = partial;
            &joined
        };
        let mut pieces = bytes.utf8_chunks().peekable();
        while let Some(piece) = pieces.next() {
            for c in piece.valid().chars() {
                self.push_char(c, c.len_utf8() as u64, &mut out);
            }
            let invalid = piece.invalid();
            if invalid.is_empty() {
                continue;
            }
            // A character cut by the end of this chunk is completed by the next one.
            let unfinished = pieces.peek().is_none()
                && std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
            if unfinished {
                self.partial = invalid.to_vec();
            } else {
                self.push_char(char::REPLACEMENT_CHARACTER, invalid.len() as u64, &mut out);
            }
        }
        // The read ends just after a `\r`: a line end, as far as anyone can tell now.
        if let Some(at) = self.cr_at.take() {
            self.end_line(at, false, &mut out);
            self.after_cr = true;
        }
        out
    }

    fn end_line(&mut self, at: u64, progress: bool, out: &mut Vec<(String, u64)>) {
        let mut line = std::mem::take(&mut self.line);
        // The `\r` takes two bytes encoded; a line that full is no progress bar.
        if progress && self.escaped + escaped_char_len('\r') <= MAX_LINE {
            line.push('\r');
        }
        out.push((line, at));
        self.escaped = 0;
    }

    /// `c` took `bytes` of the output.
    fn push_char(&mut self, c: char, bytes: u64, out: &mut Vec<(String, u64)>) {
        if let Some(at) = self.cr_at.take() {
            // A CRLF ends a plain line; a `\r` before anything else, a progress line.
            self.end_line(at, c != '\n', out);
            if c == '\n' {
                self.pos += bytes;
                return;
            }
        }
        match c {
            '\n' if self.after_cr => {
                self.after_cr = false;
                self.pos += bytes;
            }
            '\n' => {
                self.pos += bytes;
                self.end_line(self.pos, false, out);
                self.after_cr = false;
            }
            '\r' => {
                self.pos += bytes;
                self.cr_at = Some(self.pos);
                self.after_cr = false;
            }
            _ => {
                self.after_cr = false;
                let len = escaped_char_len(c);
                if self.escaped + len > MAX_LINE {
                    out.push((std::mem::take(&mut self.line), self.pos));
                    self.escaped = 0;
                }
                self.pos += bytes;
                self.line.push(c);
                self.escaped += len;
            }
        }
    }

    /// The last line, if the output did not end with a line end. A character left unfinished
    /// becomes a replacement character; should that take the line past [`MAX_LINE`], the
    /// outbox cuts it.
    pub fn finish(self) -> Option<String> {
        self.finish_at().map(|(line, _)| line)
    }

    /// [`Splitter::finish`], with the position past the last line.
    pub fn finish_at(mut self) -> Option<(String, u64)> {
        if !self.partial.is_empty() {
            self.line.push(char::REPLACEMENT_CHARACTER);
        }
        let end = self.pos + self.partial.len() as u64;
        (!self.line.is_empty()).then_some((self.line, end))
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
        assert_eq!(split(&[b"a\nb\r\nc\rd"]), ["a", "b", "c\r", "d"]);
        // A CRLF split across two reads is still one line end.
        assert_eq!(split(&[b"a\r", b"\nb\n"]), ["a", "b"]);
        assert_eq!(split(&[b"\n\n"]), ["", ""]);
    }

    #[test]
    fn a_progress_bar_keeps_its_carriage_returns_and_its_last_drawing_ends_plain() {
        let bar = b"fetching\n\r[#   ] 25%\r[##  ] 50%\r[####] 100%\ndone\n";
        assert_eq!(
            split(&[bar]),
            [
                "fetching",
                "\r",
                "[#   ] 25%\r",
                "[##  ] 50%\r",
                "[####] 100%",
                "done"
            ]
        );
        // Read by read as a pipe delivers it: a `\r` that ends a read is a plain line end.
        let reads: Vec<&[u8]> = vec![b"[#   ] 25%", b"\r[##  ] 50%", b"\r[####] 100%\n"];
        assert_eq!(
            split(&reads),
            ["[#   ] 25%\r", "[##  ] 50%\r", "[####] 100%"]
        );
    }

    #[test]
    fn each_line_says_where_it_ends_and_a_resumed_splitter_goes_on_from_there() {
        let output: &[u8] = b"a\r\nb\xc3\xa9\rc\n\xff\n";
        let mut s = Splitter::default();
        let lines = s.push_at(&output[..4]);
        let more = s.push_at(&output[4..]);
        assert_eq!(lines, [("a".to_owned(), 2)]);
        assert_eq!(more[0], ("bé\r".to_owned(), 7));
        assert_eq!(more[1], ("c".to_owned(), 9));
        // Taken up after "a\r": the "\n" that follows ends no empty line.
        let mut resumed = Splitter::resumed(2, true);
        let again = resumed.push_at(&output[2..]);
        assert_eq!(again[0], ("bé\r".to_owned(), 7));
        assert_eq!(again.last().unwrap().1, output.len() as u64);
    }

    #[test]
    fn overlong_lines_are_split_and_bad_utf8_is_replaced() {
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let lines = split(&[&long]);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[2].len(), 5);
        assert_eq!(split(&[b"ok \xff\xfe end\n"]), ["ok \u{fffd}\u{fffd} end"]);
        // A character the output never finished is replaced too.
        assert_eq!(split(&[b"cut \xc3"]), ["cut \u{fffd}"]);
    }

    #[test]
    fn a_line_of_nuls_and_escapes_is_cut_by_its_encoded_size() {
        // Each NUL and ESC takes six bytes encoded (`\u0000`, `\u001b`): a cut by raw length
        // would make pieces six times too large for their frame.
        let mut output = vec![0u8; 3 * MAX_LINE];
        output.extend(std::iter::repeat_n(0x1b, MAX_LINE));
        let lines = split(&[&output[..5000], &output[5000..]]);
        for line in &lines {
            let encoded = serde_json::to_string(line).unwrap().len() - 2;
            assert!(encoded <= MAX_LINE, "a piece takes {encoded} bytes");
        }
        assert_eq!(lines[0].len(), MAX_LINE / 6);
        assert_eq!(lines.concat().as_bytes(), output);
    }

    #[test]
    fn a_cut_never_splits_a_character_even_across_reads() {
        // 'é' is two bytes and '😀' four: cuts by raw length, and reads of one byte at a
        // time, land inside them.
        let text = format!("a{}{}", "é".repeat(MAX_LINE), "😀".repeat(MAX_LINE / 2));
        let bytes = text.as_bytes();
        for chunks in [
            vec![bytes],
            bytes.chunks(1).collect::<Vec<_>>(),
            bytes.chunks(4093).collect(),
        ] {
            let lines = split(&chunks);
            assert!(lines.len() > 2);
            for line in &lines {
                assert!(!line.contains('\u{fffd}'), "a character was split");
                assert!(line.len() <= MAX_LINE);
            }
            assert_eq!(lines.concat(), text);
        }
    }
}
