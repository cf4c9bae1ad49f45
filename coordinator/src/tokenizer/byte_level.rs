//! GPT-2 byte-level alphabet: the reversible map between the 256 byte values and the printable
//! characters that byte-level BPE vocabularies are spelled in (`Ġ` for a space, `Ċ` for `\n`).
//!
//! Source of the rule: `bytes_to_unicode` in OpenAI's GPT-2 `encoder.py`, which Hugging Face
//! `tokenizers` (`pre_tokenizers::byte_level`) and llama.cpp (`unicode_utf8_to_byte`) follow.
//! Printable bytes map to the character with the same code point; the 68 others (0..=32,
//! 127..=160 and 173), in increasing order, map to U+0100, U+0101, ... U+0143.

/// The byte that `c` stands for in a byte-level vocabulary, or `None` when `c` is not part of
/// the GPT-2 byte alphabet.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => u8::try_from(cp).ok(),
        0x100..=0x120 => u8::try_from(cp - 0x100).ok(),
        0x121..=0x142 => u8::try_from(cp - 0x121 + 0x7F).ok(),
        0x143 => Some(0xAD),
        _ => None,
    }
}

/// Appends the raw bytes that a byte-level token spelling stands for to `out`. A character
/// outside the byte alphabet (which a well-formed vocabulary never has) is kept as its own UTF-8
/// bytes, as llama.cpp's `llama_decode_text` keeps unknown characters visible.
pub(crate) fn decode_into(spelling: &str, out: &mut Vec<u8>) {
    for c in spelling.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte has exactly one character, and the map agrees with the spellings the
    /// `tokenizers` crate produces for them.
    #[test]
    fn alphabet_is_a_bijection_matching_tokenizers() {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

        let mut seen = [false; 256];
        for cp in 0u32..0x200 {
            if let Some(b) = char::from_u32(cp).and_then(char_to_byte) {
                assert!(!seen[usize::from(b)], "byte {b} mapped twice");
                seen[usize::from(b)] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));

        // Round-trip text through the library's byte-level spelling and back: every byte value
        // that can occur in UTF-8 occurs here.
        let mut text: String = (0u32..0x800).filter_map(char::from_u32).collect();
        text.push_str("€日本語\u{10000}🚀\u{10FFFF}");
        let mut pts = PreTokenizedString::from(text.as_str());
        ByteLevel::new(false, false, false).pre_tokenize(&mut pts).expect("byte-level pre-tokenize");
        let mut back = Vec::new();
        for (piece, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            decode_into(piece, &mut back);
        }
        assert_eq!(back, text.as_bytes());
        let mut out = Vec::new();
        decode_into("ĠhelloĊ", &mut out);
        assert_eq!(out, b" hello\n");
    }
}
