//! Tokenizer input: arbitrary bytes read as text (lossy UTF-8, as a request body's strings can
//! hold anything), encoded with and without special-token parsing, decoded back (the text must
//! come back unchanged without special parsing), and fed to the streaming decoder both as token
//! ids (arbitrary, past the vocabulary too) and as raw bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeshard::tokenizer::StreamDecoder;
use moeshard_fuzz::fixture;

fuzz_target!(|data: &[u8]| {
    let tok = &fixture().tokenizer;
    let text = String::from_utf8_lossy(data);
    let plain = tok.encode(&text, false).expect("byte-level BPE spells any text");
    // The fixture adds neither BOS nor EOS, so the ids spell exactly the text.
    assert_eq!(tok.decode(&plain, false), text, "decode(encode(text)) == text");
    let special = tok.encode(&text, true).expect("encode with special tokens");
    let _ = tok.decode(&special, true);

    let ids: Vec<u32> = data.chunks(3).map(|c| c.iter().fold(0u32, |acc, &b| acc << 8 | u32::from(b))).collect();
    let mut stream = StreamDecoder::new(false);
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&stream.push(tok, id));
    }
    streamed.push_str(&stream.finish());
    assert_eq!(streamed, tok.decode(&ids, false), "streamed text equals decoded text");

    let mut bytes = StreamDecoder::new(false);
    let mut out = String::new();
    for chunk in data.chunks(5) {
        out.push_str(&bytes.push_bytes(chunk));
    }
    out.push_str(&bytes.finish());
    assert_eq!(out, text, "streamed bytes read as lossy UTF-8");
});
