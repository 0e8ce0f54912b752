//! Guest output shown on a terminal: control characters made visible, so code in the
//! VM cannot drive the user's terminal (move the cursor, rewrite earlier lines, set the
//! window title, write to the clipboard with OSC 52, hide text...).
//!
//! Kept as they are: tab, newline and carriage return (progress bars). Shown as `\xNN`
//! escapes: every other C0 control (ESC, BEL, backspace...), DEL, and the C1 controls
//! U+0080–U+009F in their UTF-8 form (a terminal in UTF-8 mode may take U+009B as CSI).
//! `sbx run --raw-output` passes the bytes through untouched; output that is not a
//! terminal (a pipe, a file, `--json`) is never altered.

/// A streaming escaper: feed chunks as they come, a C1 control split across two chunks is
/// still caught.
#[derive(Debug, Default)]
pub struct Escaper {
    /// A trailing 0xC2 byte held back until the next chunk says what it starts.
    pending_c2: bool,
}

fn push_escaped(out: &mut Vec<u8>, byte: u8) {
    out.extend_from_slice(format!("\\x{byte:02x}").as_bytes());
}

impl Escaper {
    /// Escapes `chunk`; may hold back its last byte for the next call (see [`finish`]).
    ///
    /// [`finish`]: Escaper::finish
    pub fn escape(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len() + 8);
        let mut i = 0;
        if std::mem::take(&mut self.pending_c2) {
            match chunk.first() {
                Some(b @ 0x80..=0x9f) => {
                    push_escaped(&mut out, 0xc2);
                    push_escaped(&mut out, *b);
                    i = 1;
                }
                Some(_) => out.push(0xc2),
                None => {
                    self.pending_c2 = true;
                    return out;
                }
            }
        }
        while i < chunk.len() {
            let b = chunk[i];
            match b {
                b'\t' | b'\n' | b'\r' => out.push(b),
                0x00..=0x1f | 0x7f => push_escaped(&mut out, b),
                0xc2 => match chunk.get(i + 1) {
                    Some(next @ 0x80..=0x9f) => {
                        push_escaped(&mut out, 0xc2);
                        push_escaped(&mut out, *next);
                        i += 1;
                    }
                    Some(_) => out.push(b),
                    None => self.pending_c2 = true,
                },
                _ => out.push(b),
            }
            i += 1;
        }
        out
    }

    /// The byte held back at the end of the stream, if any.
    pub fn finish(&mut self) -> Vec<u8> {
        if std::mem::take(&mut self.pending_c2) {
            vec![0xc2]
        } else {
            Vec::new()
        }
    }
}

/// [`Escaper`] over a whole text at once.
pub fn escape_all(bytes: &[u8]) -> Vec<u8> {
    let mut e = Escaper::default();
    let mut out = e.escape(bytes);
    out.extend(e.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sequences_are_made_visible() {
        let hostile = "ok\x1b]52;c;ZXZpbA==\x07 \x1b[2J\x1b[1A\x08\x7f tab\there\r\n";
        let out = String::from_utf8(escape_all(hostile.as_bytes())).unwrap();
        assert_eq!(
            out,
            "ok\\x1b]52;c;ZXZpbA==\\x07 \\x1b[2J\\x1b[1A\\x08\\x7f tab\there\r\n"
        );
        assert!(!out.bytes().any(|b| b == 0x1b || b == 0x07));
    }

    #[test]
    fn c1_controls_are_caught_even_split_across_chunks() {
        // U+009B (CSI) in UTF-8 is C2 9B; "é" (C3 A9) and "¢" (C2 A2) stay.
        assert_eq!(
            escape_all("a\u{9b}31mb é ¢".as_bytes()),
            b"a\\xc2\\x9b31mb \xc3\xa9 \xc2\xa2"
        );
        let mut e = Escaper::default();
        let mut out = e.escape(b"x\xc2");
        out.extend(e.escape(b"\x9bHy\xc2"));
        out.extend(e.escape(b"\xa2"));
        out.extend(e.escape(b"\xc2"));
        out.extend(e.finish());
        assert_eq!(out, b"x\\xc2\\x9bHy\xc2\xa2\xc2");
    }

    #[test]
    fn ordinary_text_is_untouched() {
        let text = "héllo 😀 ✓\n\tcol\r100%\n";
        assert_eq!(escape_all(text.as_bytes()), text.as_bytes());
    }
}
