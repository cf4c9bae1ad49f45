//! Incremental detokenization for streaming responses.

use super::Tokenizer;

/// Turns generated token ids, one at a time, into text that is safe to send at once.
///
/// A token may end inside a multi-byte UTF-8 character (byte-level BPE splits emoji and CJK into
/// byte tokens); such a tail is held back until the following tokens complete it. A byte sequence
/// that can never become valid UTF-8 is emitted as U+FFFD as soon as it is known to be invalid,
/// and an incomplete tail left at the end becomes U+FFFD in [`StreamDecoder::finish`]. The
/// concatenation of everything returned equals [`Tokenizer::decode`] of the same ids (the same
/// replacement rule as `String::from_utf8_lossy`, which is also Python's `errors="replace"`).
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    /// Bytes of a character not yet complete (at most 3).
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder {
    /// A decoder with nothing pending. With `skip_special`, control tokens produce no text (as
    /// in [`Tokenizer::decode`]).
    pub fn new(skip_special: bool) -> Self {
        Self { pending: Vec::new(), skip_special }
    }

    /// Feeds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if self.skip_special && tokenizer.is_special(id) {
            return String::new();
        }
        self.push_bytes(tokenizer.token_bytes(id))
    }

    /// Feeds raw bytes (what [`Tokenizer::token_bytes`] returns) and returns the text they
    /// complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is UTF-8 by construction of `valid_up_to`.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            // An incomplete character at the end: wait for more bytes.
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }

    /// Ends the stream: returns U+FFFD if an incomplete character is still pending (empty
    /// otherwise) and resets the decoder.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_bytes(chunks: &[&[u8]]) -> Vec<String> {
        let mut d = StreamDecoder::new(false);
        let mut out: Vec<String> = chunks.iter().map(|c| d.push_bytes(c)).collect();
        out.push(d.finish());
        out
    }

    #[test]
    fn emoji_split_across_byte_tokens_is_held_back() {
        let rocket = "🚀".as_bytes();
        let out = feed_bytes(&[b"go ", &rocket[..1], &rocket[1..3], &rocket[3..], b"!"]);
        assert_eq!(out, ["go ", "", "", "🚀", "!", ""]);
    }

    #[test]
    fn cjk_one_byte_at_a_time() {
        let text = "日本語のテキスト";
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        let out = feed_bytes(&chunks);
        assert_eq!(out.concat(), text);
        // Every character comes out exactly when its last byte arrives.
        assert_eq!(out.iter().filter(|s| !s.is_empty()).count(), text.chars().count());
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        // A lone continuation byte, a lead byte followed by ASCII, an overlong encoding, and a
        // truncated character at the very end.
        let chunks: &[&[u8]] = &[b"a\x80b", b"\xe6", b"x", b"\xc0\xaf", b"\xf0\x9f\x9a"];
        let out = feed_bytes(chunks);
        assert_eq!(out, ["a\u{FFFD}b", "", "\u{FFFD}x", "\u{FFFD}\u{FFFD}", "", "\u{FFFD}"]);
        let all: Vec<u8> = chunks.concat();
        assert_eq!(out.concat(), String::from_utf8_lossy(&all));
    }

    #[test]
    fn finish_resets() {
        let mut d = StreamDecoder::new(false);
        assert_eq!(d.push_bytes(b"\xe6\x97"), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.push_bytes("é".as_bytes()), "é");
        assert_eq!(d.finish(), "");
    }
}
