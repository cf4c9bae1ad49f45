//! Chat template tests: the fixtures' reference renderings (transformers / llama.cpp), and the
//! Python-compatibility and error behaviour real templates rely on.

use std::path::Path;

use serde_json::{Map, Value as Json, json};

use super::*;
use crate::tokenizer::Tokenizer;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

fn render(source: &str, messages: Json, tools: Option<Json>, kwargs: Json) -> Result<String, ChatError> {
    let kwargs: Map<String, Json> = kwargs.as_object().cloned().unwrap_or_default();
    ChatTemplate::new(source)?.render(&messages, tools.as_ref(), true, &kwargs)
}

/// Tool schemas reach the prompt through `tojson` in the client's key order; that needs
/// serde_json's `preserve_order` feature.
#[test]
fn serde_json_keeps_client_key_order() {
    let v: Json = serde_json::from_str(r#"{"type": 1, "function": 2}"#).expect("json");
    let keys: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    assert_eq!(keys, ["type", "function"], "enable serde_json's `preserve_order` feature in the workspace Cargo.toml");
}

/// Every `chat` entry of every `*.public.json` fixture renders byte for byte like the reference
/// and encodes to the reference tokens.
#[test]
fn fixture_chat_entries_render_exactly() {
    let mut checked = 0;
    for entry in std::fs::read_dir(FIXTURES).expect("fixtures directory") {
        let path = entry.expect("fixtures entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some(stem) = name.strip_suffix(".public.json") else { continue };
        let fx: Json =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture")).expect("parse fixture");
        let gguf = GgufFile::open(Path::new(FIXTURES).join(format!("{stem}.gguf"))).expect("open gguf");
        let template = ChatTemplate::from_gguf(&gguf).expect("chat template").expect("has a template");
        let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer");
        for case in fx["chat"].as_array().expect("chat entries") {
            let kwargs = case["kwargs"].as_object().cloned().unwrap_or_default();
            let tools = Some(&case["tools"]).filter(|t| !t.is_null());
            let got = template.render(&case["messages"], tools, true, &kwargs).expect("render");
            assert_eq!(got, case["rendered"].as_str().expect("rendered"), "{name}");
            let want: Vec<u32> = serde_json::from_value(case["tokens"].clone()).expect("tokens");
            assert_eq!(tokenizer.encode(&got, true).expect("encode"), want, "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 48, "only {checked} chat cases");
}

#[test]
fn from_gguf_sets_special_tokens() {
    let gguf = GgufFile::open(Path::new(FIXTURES).join("tiny-mellum-f32.gguf")).expect("open gguf");
    let template = ChatTemplate::from_gguf(&gguf).expect("template").expect("present");
    assert_eq!(template.bos_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(template.eos_token.as_deref(), Some("<|im_end|>"));
}

#[test]
fn tojson_follows_python_json_dumps() {
    let tools = json!([{"type": "function", "function": {"name": "f", "description": "naïve \"q\" <b>",
        "parameters": {"z": 1, "a": [1.5, true, null, {}], "m": []}}}]);
    let out = render("{% for t in tools %}{{ t | tojson }}{% endfor %}", json!([]), Some(tools.clone()), json!({}))
        .expect("render");
    assert_eq!(
        out,
        r#"{"type": "function", "function": {"name": "f", "description": "naïve \"q\" <b>", "parameters": {"z": 1, "a": [1.5, true, null, {}], "m": []}}}"#
    );
    let out =
        render("{{ tools[0].function.parameters | tojson(indent=2) }}", json!([]), Some(tools.clone()), json!({}))
            .expect("render");
    assert_eq!(out, "{\n  \"z\": 1,\n  \"a\": [\n    1.5,\n    true,\n    null,\n    {}\n  ],\n  \"m\": []\n}");
    let src = "{{ tools[0].function.parameters | tojson(separators=(',', ':'), sort_keys=true) }}|\
               {{ 'é' | tojson(ensure_ascii=true) }}";
    let out = render(src, json!([]), Some(tools), json!({})).expect("render");
    assert_eq!(out, r#"{"a":[1.5,true,null,{}],"m":[],"z":1}|"\u00e9""#);
}

#[test]
fn python_string_and_dict_methods_work() {
    let src = "{%- for m in messages %}\
        {%- set c = m.content.split('</think>')[-1].lstrip('\\n') %}\
        {{- m.role.upper() }}:{{ c.strip() }}|{{ m.content.startswith('<think>') }}|\
        {%- for k, v in m.items() %}{{ k }}={{ v | length }},{% endfor %}\
        {{- m.get('missing', 'dflt') }}\n\
        {%- endfor %}";
    let messages = json!([{"role": "assistant", "content": "<think>x</think>\n\n  hi  "}]);
    assert_eq!(render(src, messages, None, json!({})).expect("render"), "ASSISTANT:hi|True|role=9,content=24,dflt");
}

#[test]
fn variables_and_whitespace_control() {
    let src = "{{ bos_token }}\n{% if tools is none %}no tools{% endif %}\n{% if flag %}F{% endif %}{{ eos_token }}";
    let t = ChatTemplate::new(src).expect("compile").with_special_tokens(Some("<s>"), Some("</s>"));
    let kwargs = json!({"flag": true}).as_object().cloned().unwrap_or_default();
    // trim_blocks eats the newline after a block tag; a variable tag keeps it.
    assert_eq!(t.render(&json!([]), None, false, &kwargs).expect("render"), "<s>\nno toolsF</s>");
    let printed = render("{{ tools }} {{ 1 > 2 }} {{ [1, 'a'] | length }}", json!([]), None, json!({}));
    assert_eq!(printed.expect("render"), "None False 2");
    let date = render("{{ strftime_now('%Y') }}", json!([]), None, json!({})).expect("render");
    assert!(date.len() == 4 && date.starts_with('2'), "{date}");
}

#[test]
fn errors_are_values_not_panics() {
    let syntax = ChatTemplate::new("{% if %}").expect_err("syntax error");
    assert!(matches!(syntax, ChatError::Syntax(_)), "{syntax}");

    let raise =
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}";
    let err = render(raise, json!([{"role": "system", "content": "x"}]), None, json!({})).expect_err("raise");
    assert!(
        matches!(err, ChatError::Render(_)) && err.to_string().contains("first message must be from the user"),
        "{err}"
    );

    let err = render("{{ messages[5].content.strip() }}", json!([]), None, json!({})).expect_err("undefined");
    assert!(matches!(err, ChatError::Render(_)), "{err}");
    let err = render("{{ 'a' + messages }}", json!([]), None, json!({})).expect_err("type error");
    assert!(matches!(err, ChatError::Render(_)), "{err}");
    let err =
        render("{{ messages | tojson(indent='x', bogus=1) }}", json!([]), None, json!({})).expect_err("bad kwarg");
    assert!(matches!(err, ChatError::Render(_)), "{err}");

    let err = render("x", json!({"role": "user"}), None, json!({})).expect_err("not an array");
    assert!(matches!(err, ChatError::InvalidInput(_)), "{err}");
    let err = render("x", json!([]), Some(json!({"type": "function"})), json!({})).expect_err("tools object");
    assert!(matches!(err, ChatError::InvalidInput(_)), "{err}");
    let err = render("x", json!([]), None, json!({"messages": []})).expect_err("reserved");
    assert!(matches!(err, ChatError::InvalidInput(_)), "{err}");
}
