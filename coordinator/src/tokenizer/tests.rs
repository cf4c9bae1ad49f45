//! Conformance tests against the reference outputs in `tests/fixtures` (llama.cpp via
//! llama-cpp-python) and the Hugging Face `tokenizer.json` of the same vocabulary.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;
use crate::gguf::{GgufValue, GgufWriter};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// Every `*.public.json` reference file with the GGUF file it describes.
fn fixtures() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(FIXTURES).expect("fixtures directory") {
        let path = entry.expect("fixtures entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(stem) = name.strip_suffix(".public.json") {
            let text = std::fs::read_to_string(&path).expect("read fixture");
            let json: Value = serde_json::from_str(&text).expect("parse fixture");
            out.push((Path::new(FIXTURES).join(format!("{stem}.gguf")), json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 12, "expected the tiny-, kq- and odd- fixtures, found {}", out.len());
    out
}

fn load(gguf: &Path) -> Tokenizer {
    let file = GgufFile::open(gguf).expect("open gguf");
    Tokenizer::from_gguf(&file).expect("tokenizer")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("token array")
        .iter()
        .map(|t| u32::try_from(t.as_u64().expect("token id")).expect("u32 id"))
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("fixture field {key}"))
}

#[test]
fn fixture_tokenize_entries_encode_and_decode_exactly() {
    for (gguf, fx) in fixtures() {
        let tok = load(&gguf);
        for case in fx["tokenize"].as_array().expect("tokenize") {
            let text = str_of(case, "text");
            let want = ids(&case["tokens"]);
            assert_eq!(tok.encode(text, true).expect("encode"), want, "{}: {text:?}", gguf.display());
            assert_eq!(tok.decode(&want, false), text, "{}: decode", gguf.display());
        }
    }
}

#[test]
fn fixture_chat_renderings_encode_exactly() {
    for (gguf, fx) in fixtures() {
        let tok = load(&gguf);
        for case in fx["chat"].as_array().expect("chat") {
            let rendered = str_of(case, "rendered");
            assert_eq!(tok.encode(rendered, true).expect("encode"), ids(&case["tokens"]), "{}", gguf.display());
        }
    }
}

/// `greedy_text` is the plain lossy decode of `greedy_tokens` (control tokens kept), and the
/// stream decoder produces the same text.
#[test]
fn fixture_greedy_text_is_the_decode_of_greedy_tokens() {
    for (gguf, fx) in fixtures() {
        let tok = load(&gguf);
        for case in fx["greedy"].as_array().expect("greedy") {
            let tokens = ids(&case["greedy_tokens"]);
            let want = str_of(case, "greedy_text");
            assert_eq!(tok.decode(&tokens, false), want, "{}", gguf.display());
            let mut stream = StreamDecoder::new(false);
            let mut got: String = tokens.iter().map(|&id| stream.push(&tok, id)).collect();
            got.push_str(&stream.finish());
            assert_eq!(got, want, "{}: stream", gguf.display());
        }
    }
}

/// The teacher-forced token lists are llama.cpp's tokenization of a Python file: decoding and
/// re-encoding them must give them back.
#[test]
fn fixture_teacher_forced_text_round_trips() {
    for (gguf, fx) in fixtures() {
        let tok = load(&gguf);
        for case in fx["teacher_forced"].as_array().expect("teacher_forced") {
            let tokens = ids(&case["tokens"]);
            let text = tok.decode(&tokens, false);
            assert_eq!(tok.encode(&text, true).expect("encode"), tokens, "{}", gguf.display());
        }
    }
}

/// Our tokenizer agrees with the Hugging Face `tokenizer.json` written for the same vocabulary
/// (Digits + ByteLevel pre-tokenizer) on the fixture texts and on a longer mixed sample.
#[test]
fn agrees_with_hf_tokenizer_json() {
    let hf =
        tokenizers::Tokenizer::from_file(format!("{FIXTURES}/tiny-mellum-hf/tokenizer.json")).expect("tokenizer.json");
    let tok = load(&Path::new(FIXTURES).join("tiny-mellum-f32.gguf"));
    let fx = &fixtures().into_iter().find(|(p, _)| p.ends_with("tiny-mellum-f32.gguf")).expect("fixture").1;
    let mut texts: Vec<String> =
        fx["tokenize"].as_array().expect("tokenize").iter().map(|c| str_of(c, "text").to_owned()).collect();
    for case in fx["teacher_forced"].as_array().expect("teacher_forced") {
        texts.push(tok.decode(&ids(&case["tokens"]), false));
    }
    texts.push("x1 = 3.14159e-10 ; y=x1**2\r\n\t\t# ünïcödé ＦＵＬＬ  ١٢٣ 𝟘𝟙\u{a0}end  \n".to_owned());
    for text in &texts {
        let want = hf.encode(text.as_str(), false).expect("hf encode").get_ids().to_vec();
        assert_eq!(tok.encode(text, true).expect("encode"), want, "{text:?}");
        let hf_text = hf.decode(&want, false).expect("hf decode");
        assert_eq!(tok.decode(&want, false), hf_text, "{text:?}");
    }
}

#[test]
fn special_tokens_metadata_and_parse_special() {
    let tok = load(&Path::new(FIXTURES).join("tiny-mellum-f32.gguf"));
    assert_eq!(tok.n_vocab(), 1030);
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_id(), Some(8));
    assert_eq!(tok.token_id("<|im_end|>"), Some(8));
    assert_eq!(tok.token_id("<think>"), Some(1024));
    assert_eq!(tok.token_id("no such token"), None);
    // llama.cpp's EOG set for this vocabulary: <|endoftext|>, <fim_pad>, <reponame>, <|im_end|>.
    assert_eq!(tok.eog_token_ids().collect::<Vec<_>>(), [0, 4, 5, 8]);
    assert!(tok.is_eog(8) && !tok.is_eog(7) && !tok.is_eog(1024) && !tok.is_eog(u32::MAX));

    // Control tokens are text unless parse_special; user-defined tokens are always parsed.
    let text = "<|im_start|>user\n<think>";
    let parsed = tok.encode(text, true).expect("encode");
    assert_eq!(parsed[0], 7);
    assert_eq!(parsed.last(), Some(&1024));
    let plain = tok.encode(text, false).expect("encode");
    assert!(!plain.contains(&7));
    assert_eq!(plain.last(), Some(&1024));
    assert_eq!(tok.decode(&plain, false), text);

    // Special tokens keep their text in token_bytes and are dropped by skip_special.
    assert_eq!(tok.token_bytes(8), b"<|im_end|>");
    assert_eq!(tok.token_to_piece(1025), "</think>");
    assert_eq!(tok.token_bytes(u32::MAX), b"");
    assert_eq!(tok.decode(&parsed, true), "user\n<think>");
    let mut stream = StreamDecoder::new(true);
    let streamed: String = parsed.iter().map(|&id| stream.push(&tok, id)).collect();
    assert_eq!(streamed, "user\n<think>");
}

/// A byte-level vocabulary spells an emoji as several byte tokens; the stream decoder emits it
/// only once complete, and invalid sequences of byte tokens come out as U+FFFD.
#[test]
fn stream_decoder_over_real_byte_tokens() {
    let tok = load(&Path::new(FIXTURES).join("tiny-mellum-f32.gguf"));
    let ids = tok.encode("ok 🚀", true).expect("encode");
    let mut stream = StreamDecoder::new(false);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(&tok, id)).collect();
    assert_eq!(pieces.concat(), "ok 🚀");
    assert!(pieces.iter().all(|p| p != "\u{FFFD}" && !p.contains('\u{FFFD}')));
    assert_eq!(pieces.last().map(String::as_str), Some("🚀"));

    // The emoji's first two byte tokens, then a normal token: the lead bytes are invalid.
    let broken = [ids[ids.len() - 4], ids[ids.len() - 3], tok.token_id("x").expect("x")];
    let mut stream = StreamDecoder::new(false);
    let mut out: String = broken.iter().map(|&id| stream.push(&tok, id)).collect();
    out.push_str(&stream.finish());
    assert_eq!(out, tok.decode(&broken, false));
    assert_eq!(out, "\u{FFFD}x");
}

/// Writes a GGUF file holding only `metadata` (no tensors).
fn write_gguf(path: &Path, metadata: Vec<(&str, GgufValue)>) {
    let mut w = GgufWriter::new();
    for (key, value) in metadata {
        w.add_metadata(key, value).expect("add metadata");
    }
    let mut out = Vec::new();
    w.write_header(&mut out).expect("write header");
    w.finish().expect("finish");
    std::fs::write(path, out).expect("write test gguf");
}

fn gstr(s: &str) -> GgufValue {
    GgufValue::String(s.to_owned())
}

fn gstrs(items: &[&str]) -> GgufValue {
    GgufValue::Array(items.iter().map(|s| gstr(s)).collect())
}

/// A file name, its metadata, and the substrings the error message must contain.
type ErrorCase = (&'static str, Vec<(&'static str, GgufValue)>, &'static [&'static str]);

#[test]
fn unsupported_or_bad_metadata_names_file_and_key() {
    let dir = std::env::temp_dir().join(format!("moeshard-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let gpt2 = || ("tokenizer.ggml.model", gstr("gpt2"));
    let vocab = || ("tokenizer.ggml.tokens", gstrs(&["a", "b", "ab"]));
    let cases: Vec<ErrorCase> = vec![
        ("no-model.gguf", vec![], &["no-model.gguf", "tokenizer.ggml.model"]),
        ("spm.gguf", vec![("tokenizer.ggml.model", gstr("llama"))], &["spm.gguf", "tokenizer.ggml.model", "\"llama\""]),
        ("no-pre.gguf", vec![gpt2()], &["no-pre.gguf", "tokenizer.ggml.pre"]),
        (
            "odd-pre.gguf",
            vec![gpt2(), ("tokenizer.ggml.pre", gstr("klingon"))],
            &["odd-pre.gguf", "tokenizer.ggml.pre", "\"klingon\"", "mellum2"],
        ),
        (
            "bad-merge.gguf",
            vec![
                gpt2(),
                ("tokenizer.ggml.pre", gstr("qwen2")),
                vocab(),
                ("tokenizer.ggml.merges", gstrs(&["a b", "ab"])),
            ],
            &["bad-merge.gguf", "tokenizer.ggml.merges", "entry 1"],
        ),
        (
            "bad-eos.gguf",
            vec![
                gpt2(),
                ("tokenizer.ggml.pre", gstr("qwen2")),
                vocab(),
                ("tokenizer.ggml.merges", gstrs(&["a b"])),
                ("tokenizer.ggml.eos_token_id", GgufValue::U32(3)),
            ],
            &["bad-eos.gguf", "tokenizer.ggml.eos_token_id", "3"],
        ),
        (
            "types.gguf",
            vec![
                gpt2(),
                ("tokenizer.ggml.pre", gstr("qwen2")),
                vocab(),
                ("tokenizer.ggml.merges", gstrs(&["a b"])),
                ("tokenizer.ggml.token_type", GgufValue::Array(vec![GgufValue::I32(1); 2])),
            ],
            &["types.gguf", "tokenizer.ggml.token_type", "2 entries for 3 tokens"],
        ),
    ];
    for (name, metadata, needles) in cases {
        let path = dir.join(name);
        write_gguf(&path, metadata);
        let file = GgufFile::open(&path).expect("open test gguf");
        let msg = Tokenizer::from_gguf(&file).expect_err(name).to_string();
        for needle in needles {
            assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A tiny vocabulary written from scratch: merges apply by rank, and BOS is added when the file
/// asks for it.
#[test]
fn minimal_vocabulary_with_bos() {
    let dir = std::env::temp_dir().join(format!("moeshard-tok-bos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bos.gguf");
    write_gguf(
        &path,
        vec![
            ("tokenizer.ggml.model", gstr("gpt2")),
            ("tokenizer.ggml.pre", gstr("llama-bpe")),
            ("tokenizer.ggml.tokens", gstrs(&["<s>", "a", "b", "ab", "Ġ", "Ġab"])),
            ("tokenizer.ggml.token_type", GgufValue::Array([3, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec())),
            ("tokenizer.ggml.merges", gstrs(&["a b", "Ġ ab"])),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(0)),
        ],
    );
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).expect("open")).expect("tokenizer");
    // llama-bpe adds BOS by default (no add_bos_token key).
    assert_eq!(tok.encode("ab ab<s>", true).expect("encode"), [0, 3, 5, 0]);
    assert_eq!(tok.decode(&[0, 3, 5, 0], true), "ab ab");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn merges_split_like_llama_cpp() {
    assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
    assert_eq!(split_merge("ĠĠ ĠĠ"), Some(("ĠĠ".into(), "ĠĠ".into())));
    assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
    assert_eq!(split_merge("ab"), None);
    assert_eq!(split_merge("a "), None);
    assert_eq!(split_merge(""), None);
}
