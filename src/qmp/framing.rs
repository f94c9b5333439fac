//! Splitting a client's byte stream into JSON messages, as QEMU's JSON streamer does: a
//! message ends where its outermost object or array closes (or after a lone scalar token),
//! whatever whitespace or newlines there are. What a client can make the monitor buffer is
//! bounded: a message longer than [`MAX_MESSAGE`] bytes or nested deeper than [`MAX_NESTING`]
//! is dropped as it streams in and reported as one error.

/// Largest message kept in memory; larger ones are skipped and answered with an error.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Deepest nesting of objects and arrays (QEMU's limit).
pub const MAX_NESTING: usize = 1024;

/// One complete message, or why it was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one message (not yet parsed).
    Message(Vec<u8>),
    /// A message over [`MAX_MESSAGE`] bytes.
    TooLong,
    /// A message nested deeper than [`MAX_NESTING`].
    TooDeep,
    /// A closing bracket without an opening one.
    Unbalanced,
}

/// The splitter's state between reads.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Within a bare scalar token (number, true, ...) outside any object.
    in_scalar: bool,
    too_long: bool,
    too_deep: bool,
}

impl Splitter {
    /// Feeds bytes; returns the frames they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for &b in bytes {
            if self.in_scalar && !self.in_string && self.depth == 0 && !is_scalar_byte(b) {
                frames.push(self.finish());
            }
            if let Some(frame) = self.step(b) {
                frames.push(frame);
            }
        }
        frames
    }

    fn keep(&mut self, b: u8) {
        if self.too_long || self.too_deep {
            return;
        }
        if self.buf.len() >= MAX_MESSAGE {
            self.too_long = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.push(b);
    }

    fn finish(&mut self) -> Frame {
        let frame = if self.too_deep {
            Frame::TooDeep
        } else if self.too_long {
            Frame::TooLong
        } else {
            Frame::Message(std::mem::take(&mut self.buf))
        };
        *self = Splitter::default();
        frame
    }

    fn step(&mut self, b: u8) -> Option<Frame> {
        if self.in_string {
            self.keep(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    return Some(self.finish());
                }
            }
            return None;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.keep(b);
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_NESTING {
                    self.too_deep = true;
                    self.buf = Vec::new();
                }
                self.keep(b);
            }
            b'}' | b']' => {
                self.keep(b);
                if self.depth == 0 {
                    *self = Splitter::default();
                    return Some(Frame::Unbalanced);
                }
                self.depth -= 1;
                if self.depth == 0 {
                    return Some(self.finish());
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => {}
            _ => {
                if self.depth == 0 {
                    self.in_scalar = true;
                }
                self.keep(b);
            }
        }
        None
    }
}

/// Bytes that continue a bare scalar token (numbers, true, false, null, and junk words).
fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(frames: Vec<Frame>) -> Vec<String> {
        frames
            .into_iter()
            .map(|f| match f {
                Frame::Message(m) => String::from_utf8(m).expect("utf-8"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn messages_end_where_their_object_closes_whatever_the_reads() {
        let input = br#"{"execute": "a", "arguments": {"s": "}{\"]"}} [1, [2]]{"x":1}"#;
        let whole = messages(Splitter::default().push(input));
        assert_eq!(
            whole,
            [
                r#"{"execute": "a", "arguments": {"s": "}{\"]"}}"#,
                "[1, [2]]",
                r#"{"x":1}"#
            ]
        );
        let mut s = Splitter::default();
        let mut bytewise = Vec::new();
        for b in input {
            bytewise.extend(messages(s.push(&[*b])));
        }
        assert_eq!(bytewise, whole);
    }

    #[test]
    fn scalars_and_stray_closers_are_messages_of_their_own() {
        let mut s = Splitter::default();
        assert_eq!(messages(s.push(b"42 true}")), ["42", "true", "Unbalanced"]);
        assert_eq!(messages(s.push(b"{}")), ["{}"]);
    }

    #[test]
    fn an_oversized_message_is_dropped_and_the_next_one_parsed() {
        let mut s = Splitter::default();
        let mut big = br#"{"execute": "x", "arguments": {"pad": ""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_MESSAGE));
        big.extend_from_slice(br#""}}{"execute": "y"}"#);
        let frames = s.push(&big);
        assert_eq!(messages(frames), ["TooLong", r#"{"execute": "y"}"#]);
        assert!(s.buf.capacity() <= MAX_MESSAGE + 1);
    }

    #[test]
    fn deep_nesting_is_dropped_without_being_kept() {
        let mut s = Splitter::default();
        let mut deep = vec![b'['; MAX_NESTING + 1];
        deep.extend(vec![b']'; MAX_NESTING + 1]);
        deep.extend_from_slice(b"{}");
        assert_eq!(messages(s.push(&deep)), ["TooDeep", "{}"]);
    }
}
