//! Chat-template rendering of client input: the input is a JSON object as a request would carry
//! it, `{"messages": [...], "tools": [...], "kwargs": {...}, "add_generation_prompt": bool}`;
//! the fixture's Mellum2 template renders it (as `serve` does) and the prompt is tokenized with
//! special tokens parsed. Render errors are fine (the server answers 400); panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeshard_fuzz::fixture;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(data) else { return };
    let messages = request.get("messages").cloned().unwrap_or(Value::Null);
    let kwargs = match request.get("kwargs") {
        Some(Value::Object(k)) => k.clone(),
        _ => Map::new(),
    };
    let add_generation_prompt = request.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(true);
    let f = fixture();
    if let Ok(prompt) = f.template.render(&messages, request.get("tools"), add_generation_prompt, &kwargs) {
        f.tokenizer.encode(&prompt, true).expect("a rendered prompt tokenizes");
    }
});
