//! Ollama's API, enough for tools configured for an Ollama server: `GET /api/version`,
//! `GET /api/tags`, `POST /api/show`, `POST /api/chat`, `POST /api/generate` (NDJSON streaming
//! by default, `"stream": false` for one object). Sampling settings come in `options`; durations
//! are in nanoseconds.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::chat::{messages, render, tools};
use super::errors::ApiError;
use super::generate::{GenEvent, GenRequest, Generation, Outcome, Reason};
use super::openai::{StreamSink, ndjson};
use super::output::{ChatOutput, Delta};
use super::params::{Fields, parse_body};
use super::{ModelInfo, ServeState, unix_now};
use crate::chat::strftime::DateTime;

/// The Ollama version reported: recent enough for clients that check for tool support.
const OLLAMA_VERSION: &str = "0.9.0";

/// `GET /api/version`.
pub async fn version() -> Json<Value> {
    Json(json!({ "version": OLLAMA_VERSION }))
}

/// The model's name as Ollama spells it, with a tag.
fn tagged(info: &ModelInfo) -> String {
    if info.name.contains(':') { info.name.clone() } else { format!("{}:latest", info.name) }
}

fn details(info: &ModelInfo) -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": info.arch,
        "families": [info.arch],
        "parameter_size": parameter_size(info.n_params),
        "quantization_level": info.quantization,
    })
}

/// `12150000000` -> `"12.2B"`.
fn parameter_size(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.1}B", n / 1e9),
        n if n >= 1e6 => format!("{:.1}M", n / 1e6),
        n => format!("{:.1}K", n / 1e3),
    }
}

/// `GET /api/tags`.
pub async fn tags(State(state): State<Arc<ServeState>>) -> Json<Value> {
    let info = &state.info;
    let digest = blake3::hash(format!("{}:{}:{}", info.name, info.file_size, info.created).as_bytes()).to_hex();
    Json(json!({
        "models": [{
            "name": tagged(info),
            "model": tagged(info),
            "modified_at": rfc3339(info.created),
            "size": info.file_size,
            "digest": digest.as_str(),
            "details": details(info),
        }],
    }))
}

/// Checks `model` (or the older `name`); absent: this model.
fn check_model(state: &ServeState, f: &Fields) -> Result<(), ApiError> {
    for key in ["model", "name"] {
        if let Some(m) = f.get::<String>(key)?.filter(|m| !state.info.answers_to(m)) {
            return Err(ApiError::unknown_model(&m, &state.info.name));
        }
    }
    Ok(())
}

/// `POST /api/show`.
pub async fn show(State(state): State<Arc<ServeState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let map = parse_body(&body)?;
    check_model(&state, &Fields::new(&map, ""))?;
    let info = &state.info;
    let mut model_info = Map::new();
    model_info.insert("general.architecture".into(), info.arch.clone().into());
    model_info.insert("general.parameter_count".into(), info.n_params.into());
    model_info.insert(format!("{}.context_length", info.arch), info.n_ctx.into());
    Ok(Json(json!({
        "license": "",
        "modelfile": format!("# served by moeshard\nFROM {}\n", info.name),
        "parameters": "",
        "template": "",
        "details": details(info),
        "model_info": model_info,
        "capabilities": info.capabilities,
        "modified_at": rfc3339(info.created),
    })))
}

/// The request settings both generating endpoints share.
struct Common {
    stream: bool,
    request: GenRequest,
}

fn common(f: &Fields, tokens: Vec<u32>) -> Result<Common, ApiError> {
    let empty = Map::new();
    let options = match f.raw("options") {
        None => &empty,
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::param("options", "`options` must be an object")),
    };
    let o = Fields::new(options, "options.");
    let max_tokens = match o.integer("num_predict", -2)? {
        Some(0) => return Err(ApiError::param("options.num_predict", "`options.num_predict` must not be 0")),
        Some(n) if n > 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => None,
    };
    Ok(Common {
        stream: f.get::<bool>("stream")?.unwrap_or(true),
        request: GenRequest {
            prompt: tokens,
            max_tokens,
            sampling: o.sampling()?,
            logprobs: None,
            stop: o.stop("stop")?,
        },
    })
}

/// The template arguments for `think`.
fn think_kwargs(think: Option<bool>) -> Map<String, Value> {
    think.map(|t| ("enable_thinking".to_owned(), Value::Bool(t))).into_iter().collect()
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Generate,
}

/// `POST /api/chat`.
pub async fn chat(State(state): State<Arc<ServeState>>, body: Bytes) -> Result<Response, ApiError> {
    let map = parse_body(&body)?;
    let f = Fields::new(&map, "");
    check_model(&state, &f)?;
    let messages = messages(f.raw("messages"), "messages")?;
    let tools = tools(&f)?;
    let think = f.get::<bool>("think")?;
    let prompt = render(&state, &messages, tools.as_ref(), &think_kwargs(think))?;
    let c = common(&f, prompt.tokens)?;
    let output = ChatOutput::new(prompt.in_think, tools.is_some());
    respond(state, c, output, Api::Chat).await
}

/// `POST /api/generate`: `prompt` (with `system`) through the chat template, or as is with
/// `raw`. An empty prompt only answers that the model is loaded.
pub async fn generate(State(state): State<Arc<ServeState>>, body: Bytes) -> Result<Response, ApiError> {
    let map = parse_body(&body)?;
    let f = Fields::new(&map, "");
    check_model(&state, &f)?;
    let text = f.get::<String>("prompt")?.unwrap_or_default();
    if text.is_empty() {
        let mut done = line(&state, Api::Generate, "", "", &[]);
        done["done"] = true.into();
        done["done_reason"] = "load".into();
        return Ok(Json(done).into_response());
    }
    let raw = f.get::<bool>("raw")?.unwrap_or(false);
    let think = f.get::<bool>("think")?;
    let (tokens, in_think) = if raw || state.template.is_none() {
        (state.tokenizer.encode(&text, true).map_err(|e| ApiError::internal(e.to_string()))?, false)
    } else {
        let mut msgs = Vec::new();
        if let Some(system) = f.get::<String>("system")? {
            msgs.push(json!({ "role": "system", "content": system }));
        }
        msgs.push(json!({ "role": "user", "content": text }));
        let prompt = render(&state, &Value::Array(msgs), None, &think_kwargs(think))?;
        (prompt.tokens, prompt.in_think)
    };
    let c = common(&f, tokens)?;
    let output = ChatOutput::new(in_think, false);
    respond(state, c, output, Api::Generate).await
}

/// One response object without the final statistics.
fn line(state: &ServeState, api: Api, content: &str, thinking: &str, calls: &[Value]) -> Value {
    let mut v = json!({ "model": tagged(&state.info), "created_at": rfc3339(unix_now()) });
    match api {
        Api::Chat => {
            let mut message = json!({ "role": "assistant", "content": content });
            if !thinking.is_empty() {
                message["thinking"] = thinking.into();
            }
            if !calls.is_empty() {
                message["tool_calls"] = calls.into();
            }
            v["message"] = message;
        }
        Api::Generate => {
            v["response"] = content.into();
            if !thinking.is_empty() {
                v["thinking"] = thinking.into();
            }
        }
    }
    v["done"] = false.into();
    v
}

/// Adds the final fields to `v`.
fn finish(v: &mut Value, outcome: &Outcome) {
    let ns = |ms: f64| (ms * 1e6) as u64;
    v["done"] = true.into();
    v["done_reason"] = outcome.reason.as_str().into();
    v["total_duration"] = ns(outcome.prompt_ms + outcome.generation_ms).into();
    v["load_duration"] = 0.into();
    v["prompt_eval_count"] = outcome.prompt_tokens.into();
    v["prompt_eval_duration"] = ns(outcome.prompt_ms).into();
    v["eval_count"] = outcome.completion_tokens.into();
    v["eval_duration"] = ns(outcome.generation_ms).into();
}

/// Splits deltas into content, thinking and Ollama-shaped tool calls.
fn parts(deltas: Vec<Delta>) -> (String, String, Vec<Value>) {
    let (mut content, mut thinking, mut calls) = (String::new(), String::new(), Vec::new());
    for d in deltas {
        match d {
            Delta::Content(t) => content.push_str(&t),
            Delta::Reasoning(t) => thinking.push_str(&t),
            Delta::Call(c) => calls.push(json!({ "function": { "name": c.name, "arguments": c.arguments_value() } })),
        }
    }
    (content, thinking, calls)
}

async fn respond(state: Arc<ServeState>, c: Common, mut output: ChatOutput, api: Api) -> Result<Response, ApiError> {
    let generation = Generation::start(&state, c.request)?;
    if c.stream {
        let (sink, response) = ndjson();
        tokio::spawn(run_stream(state, generation, output, api, sink));
        return Ok(response);
    }
    let (text, _, outcome) = generation.collect().await;
    if let Reason::Error(e) = &outcome.reason {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    let mut deltas = output.push(&text);
    deltas.extend(output.finish());
    let (content, thinking, calls) = parts(deltas);
    let mut v = line(&state, api, &content, &thinking, &calls);
    finish(&mut v, &outcome);
    Ok(Json(v).into_response())
}

async fn run_stream(
    state: Arc<ServeState>,
    mut generation: Generation,
    mut output: ChatOutput,
    api: Api,
    sink: StreamSink,
) {
    while let Some(ev) = sink.next(&mut generation).await {
        let (deltas, outcome) = match ev {
            GenEvent::Text { text, .. } => (output.push(&text), None),
            GenEvent::Done(outcome) => (output.finish(), Some(outcome)),
        };
        let (content, thinking, calls) = parts(deltas);
        let has_news = !(content.is_empty() && thinking.is_empty() && calls.is_empty());
        if has_news && !sink.send(line(&state, api, &content, &thinking, &calls)).await {
            return;
        }
        let Some(outcome) = outcome else { continue };
        if let Reason::Error(e) = &outcome.reason {
            sink.send(json!({ "error": format!("generation failed: {e}") })).await;
            return;
        }
        let mut last = line(&state, api, "", "", &[]);
        finish(&mut last, &outcome);
        sink.send(last).await;
        return;
    }
}

/// `secs` since the Unix epoch as an RFC 3339 UTC timestamp.
fn rfc3339(secs: u64) -> String {
    DateTime::from_unix(i64::try_from(secs).unwrap_or(i64::MAX)).format("%Y-%m-%dT%H:%M:%SZ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn parameter_sizes() {
        assert_eq!(parameter_size(12_150_000_000), "12.2B");
        assert_eq!(parameter_size(3_500_000), "3.5M");
    }
}
