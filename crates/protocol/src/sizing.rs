//! How many bytes things take once encoded in a frame.
//!
//! A text's length says little about its frame's: JSON escapes control characters, so a NUL
//! becomes `\u0000` (six bytes) and ESC `\u001b`. Whoever fills a frame with content it does
//! not control (build output, branch names, request paths) sizes it by these counts, never
//! by the raw length.

use serde::Serialize;

/// The bytes `b` takes inside a JSON string as serde_json writes it. Bytes of a multi-byte
/// UTF-8 character are written as they are, one byte each.
fn escaped_byte_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' | 0x08 | b'\t' | b'\n' | 0x0c | b'\r' => 2,
        0x00..=0x1f => 6,
        _ => 1,
    }
}

/// The bytes `s` takes inside a JSON string (without the quotes).
pub fn escaped_len(s: &str) -> usize {
    s.bytes().map(escaped_byte_len).sum()
}

/// The bytes `c` takes inside a JSON string.
pub fn escaped_char_len(c: char) -> usize {
    let mut buf = [0u8; 4];
    escaped_len(c.encode_utf8(&mut buf))
}

/// Splits `s` where its head takes at most `max` bytes inside a JSON string, never inside a
/// character. With `max` of at least 6 (the most one character takes) the head is never empty
/// unless `s` is.
pub fn split_escaped(s: &str, max: usize) -> (&str, &str) {
    let mut taken = 0;
    for (i, b) in s.bytes().enumerate() {
        taken += escaped_byte_len(b);
        if taken > max {
            let mut cut = i;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            return s.split_at(cut);
        }
    }
    (s, "")
}

/// `s` cut into pieces that each take at most `max` bytes inside a JSON string (`max` at
/// least 6), never splitting a character.
pub fn escaped_pieces(s: &str, max: usize) -> impl Iterator<Item = &str> {
    let max = max.max(6);
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (head, tail) = split_escaped(rest, max);
        rest = tail;
        Some(head)
    })
}

/// The length of `value`'s JSON encoding, counted without building it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("protocol types serialize to JSON");
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_len(s: &str) -> usize {
        serde_json::to_string(s).unwrap().len() - 2
    }

    #[test]
    fn the_escaped_length_is_what_serde_json_writes() {
        for c in (0u32..0x800)
            .chain([0xfffd, 0x1f600])
            .filter_map(char::from_u32)
        {
            let s = c.to_string();
            assert_eq!(escaped_len(&s), json_len(&s), "{c:?}");
            assert_eq!(escaped_char_len(c), json_len(&s), "{c:?}");
        }
        let mixed = "a\0b\u{1b}[31mé\"\\\t€😀";
        assert_eq!(escaped_len(mixed), json_len(mixed));
        assert_eq!(
            encoded_len(&serde_json::json!({"line": mixed})),
            serde_json::to_string(&serde_json::json!({"line": mixed}))
                .unwrap()
                .len()
        );
    }

    #[test]
    fn a_line_of_nuls_is_cut_by_its_encoded_size() {
        let nuls = "\0".repeat(10_000);
        let pieces: Vec<&str> = escaped_pieces(&nuls, 8192).collect();
        for piece in &pieces {
            assert!(json_len(piece) <= 8192, "{}", json_len(piece));
        }
        // 1365 NULs take 8190 bytes; one more would not fit.
        assert_eq!(pieces[0].len(), 1365);
        assert_eq!(pieces.concat(), nuls);
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // 'é' is two bytes and '😀' four: a cut by raw bytes would land inside them.
        for text in ["aé".repeat(3000), format!("x{}", "😀".repeat(3000))] {
            let pieces: Vec<&str> = escaped_pieces(&text, 1001).collect();
            assert!(pieces.len() > 1);
            for piece in &pieces {
                assert!(json_len(piece) <= 1001);
                assert!(!piece.is_empty());
            }
            assert_eq!(pieces.concat(), text);
        }
        assert_eq!(split_escaped("é", 1), ("", "é"));
        assert_eq!(escaped_pieces("", 10).count(), 0);
    }
}
