//! `POST /v1/chat/completions`, and the conversation handling Ollama's `/api/chat` shares:
//! checking messages and tools, rendering the chat template.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::errors::ApiError;
use super::generate::{GenEvent, GenRequest, Generation, Outcome, Reason, TokenLogprob};
use super::openai::{
    StreamSink, chat_logprobs, check_model, check_single_choice, max_tokens, new_id, sse, timings, usage,
};
use super::output::{ChatOutput, Delta};
use super::params::{Fields, parse_body};
use super::reasoning::ReasoningParser;
use super::tool_calls::ToolCall;
use super::{ServeState, unix_now};
use crate::chat::ChatError;

/// Most alternatives `top_logprobs` may ask for.
const MAX_TOP_LOGPROBS: i64 = 20;

/// A conversation rendered into a prompt.
pub struct Prompt {
    /// The prompt's tokens.
    pub tokens: Vec<u32>,
    /// Whether the template left the assistant's turn inside an opened `<think>` block.
    pub in_think: bool,
}

/// The conversation's messages, checked and normalised for the template: roles `system`
/// (`developer` too), `user`, `assistant` and `tool`; content as a string or a list of text
/// parts (joined with newlines); tool-call arguments given as JSON text are parsed, as
/// templates expect objects.
pub fn messages(value: Option<&Value>, name: &str) -> Result<Value, ApiError> {
    let Some(value) = value else {
        return Err(ApiError::param(name, format!("`{name}` is required")));
    };
    let Some(list) = value.as_array().filter(|l| !l.is_empty()) else {
        return Err(ApiError::param(name, format!("`{name}` must be a non-empty array of messages")));
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| message(m, &format!("{name}[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn message(m: &Value, path: &str) -> Result<Value, ApiError> {
    let Some(obj) = m.as_object() else {
        return Err(ApiError::param(path, format!("`{path}` must be an object")));
    };
    let mut out = obj.clone();
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("developer") => "system",
        Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
        Some(r) => {
            return Err(ApiError::param(
                format!("{path}.role"),
                format!("`{path}.role` is `{r}`; expected system, user, assistant or tool"),
            ));
        }
        None => return Err(ApiError::param(format!("{path}.role"), format!("`{path}.role` must be a string"))),
    };
    out.insert("role".into(), role.into());
    let content = match obj.get("content") {
        None | Some(Value::Null) if role == "assistant" => Value::Null,
        None | Some(Value::Null) => Value::String(String::new()),
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => Value::String(text_parts(parts, &format!("{path}.content"))?),
        Some(_) => {
            return Err(ApiError::param(
                format!("{path}.content"),
                format!("`{path}.content` must be a string or an array of text parts"),
            ));
        }
    };
    out.insert("content".into(), content);
    if let Some(calls) = obj.get("tool_calls").filter(|v| !v.is_null()) {
        out.insert("tool_calls".into(), tool_calls(calls, &format!("{path}.tool_calls"))?);
    }
    Ok(Value::Object(out))
}

fn text_parts(parts: &[Value], path: &str) -> Result<String, ApiError> {
    let texts = parts
        .iter()
        .enumerate()
        .map(|(i, p)| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
            (Some("text") | None, Some(text)) => Ok(text),
            _ => Err(ApiError::param(format!("{path}[{i}]"), format!("`{path}[{i}]`: only text parts are supported"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(texts.join("\n"))
}

fn tool_calls(calls: &Value, path: &str) -> Result<Value, ApiError> {
    let Some(list) = calls.as_array() else {
        return Err(ApiError::param(path, format!("`{path}` must be an array")));
    };
    let mut out = list.clone();
    for (i, call) in out.iter_mut().enumerate() {
        let function = call.get_mut("function").filter(|f| f.get("name").is_some_and(Value::is_string));
        let Some(function) = function else {
            return Err(ApiError::param(
                format!("{path}[{i}]"),
                format!("`{path}[{i}].function.name` must be a string"),
            ));
        };
        if let Some(Value::String(text)) = function.get("arguments")
            && let Ok(parsed) = serde_json::from_str::<Value>(text)
        {
            function["arguments"] = parsed;
        }
    }
    Ok(Value::Array(out))
}

/// The `tools` parameter, checked (`[{"type": "function", "function": {"name": ...}}]`); `None`
/// when absent or when `tool_choice` is `"none"`.
pub fn tools(fields: &Fields) -> Result<Option<Value>, ApiError> {
    let Some(tools) = fields.raw("tools") else { return Ok(None) };
    let Some(list) = tools.as_array() else {
        return Err(ApiError::param(fields.name("tools"), "`tools` must be an array"));
    };
    for (i, t) in list.iter().enumerate() {
        let ok = t.get("type").and_then(Value::as_str).is_none_or(|ty| ty == "function")
            && t.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string);
        if !ok {
            return Err(ApiError::param(
                format!("tools[{i}]"),
                format!("`tools[{i}]` must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
            ));
        }
    }
    match fields.raw("tool_choice") {
        None => Ok(Some(tools.clone())),
        Some(Value::String(s)) if s == "none" => Ok(None),
        Some(Value::String(s)) if s == "auto" || s == "required" => Ok(Some(tools.clone())),
        Some(Value::Object(_)) => Ok(Some(tools.clone())),
        Some(_) => Err(ApiError::param("tool_choice", "`tool_choice` must be none, auto, required or an object")),
    }
}

/// Renders the conversation with the model's chat template and tokenizes it.
pub fn render(
    state: &ServeState,
    messages: &Value,
    tools: Option<&Value>,
    kwargs: &Map<String, Value>,
) -> Result<Prompt, ApiError> {
    let Some(template) = &state.template else {
        return Err(ApiError::invalid("the model has no chat template; use /v1/completions"));
    };
    let text = template.render(messages, tools, true, kwargs).map_err(|e| match e {
        ChatError::InvalidInput(m) | ChatError::Render(m) => ApiError::invalid(format!("cannot render the chat: {m}")),
        other => ApiError::internal(other.to_string()),
    })?;
    let tokens = state.tokenizer.encode(&text, true).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Prompt { tokens, in_think: ReasoningParser::prompt_opens_think(&text) })
}

/// `stream_options`.
#[derive(serde::Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// What a response needs besides the generation.
struct Meta {
    id: String,
    created: u64,
    model: String,
    in_think: bool,
    parse_tools: bool,
    logprobs: bool,
}

/// `POST /v1/chat/completions`.
pub async fn handle(State(state): State<Arc<ServeState>>, body: Bytes) -> Result<Response, ApiError> {
    let map = parse_body(&body)?;
    let f = Fields::new(&map, "");
    check_model(&state, &f, "model")?;
    check_single_choice(&f)?;
    let messages = messages(f.raw("messages"), "messages")?;
    let tools = tools(&f)?;
    let kwargs = f.get::<Map<String, Value>>("chat_template_kwargs")?.unwrap_or_default();
    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    let include_usage = f.get::<StreamOptions>("stream_options")?.is_some_and(|o| o.include_usage);
    let logprobs = f.get::<bool>("logprobs")?.unwrap_or(false);
    let top = f.integer("top_logprobs", 0)?.unwrap_or(0);
    if top > MAX_TOP_LOGPROBS {
        return Err(ApiError::param("top_logprobs", format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}")));
    }
    let sampling = f.sampling()?;
    let stop = f.stop("stop")?;
    let max_tokens = max_tokens(&f)?;
    let prompt = render(&state, &messages, tools.as_ref(), &kwargs)?;
    let generation = Generation::start(
        &state,
        GenRequest { prompt: prompt.tokens, max_tokens, sampling, logprobs: logprobs.then_some(top as usize), stop },
    )?;
    let meta = Meta {
        id: new_id("chatcmpl-"),
        created: unix_now(),
        model: state.info.name.clone(),
        in_think: prompt.in_think,
        parse_tools: tools.is_some(),
        logprobs,
    };
    if stream {
        Ok(stream_chat(state, generation, meta, include_usage))
    } else {
        complete(state, generation, meta).await
    }
}

/// The assistant message parts gathered from deltas.
#[derive(Default)]
struct Message {
    reasoning: String,
    content: String,
    calls: Vec<Value>,
}

impl Message {
    fn add(&mut self, deltas: Vec<Delta>, n_calls: &mut usize) {
        for d in deltas {
            match d {
                Delta::Reasoning(t) => self.reasoning.push_str(&t),
                Delta::Content(t) => self.content.push_str(&t),
                Delta::Call(call) => {
                    self.calls.push(call_json(&call, *n_calls));
                    *n_calls += 1;
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.calls.is_empty()
    }

    /// As a streaming `delta` (only the fields present).
    fn delta(self) -> Value {
        let mut d = Map::new();
        if !self.reasoning.is_empty() {
            d.insert("reasoning_content".into(), self.reasoning.into());
        }
        if !self.content.is_empty() {
            d.insert("content".into(), self.content.into());
        }
        if !self.calls.is_empty() {
            d.insert("tool_calls".into(), self.calls.into());
        }
        Value::Object(d)
    }
}

fn call_json(call: &ToolCall, index: usize) -> Value {
    json!({
        "index": index,
        "id": new_id("call_"),
        "type": "function",
        "function": { "name": call.name, "arguments": call.arguments },
    })
}

fn finish_reason(outcome: &Outcome, n_calls: usize) -> &'static str {
    if n_calls > 0 { "tool_calls" } else { outcome.reason.as_str() }
}

fn logprobs_json(state: &ServeState, meta: &Meta, lps: &[TokenLogprob]) -> Value {
    if meta.logprobs { json!({ "content": chat_logprobs(&state.tokenizer, lps) }) } else { Value::Null }
}

async fn complete(state: Arc<ServeState>, generation: Generation, meta: Meta) -> Result<Response, ApiError> {
    let (text, lps, outcome) = generation.collect().await;
    if let Reason::Error(e) = &outcome.reason {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    let mut output = ChatOutput::new(meta.in_think, meta.parse_tools);
    let mut msg = Message::default();
    let mut n_calls = 0;
    msg.add(output.push(&text), &mut n_calls);
    msg.add(output.finish(), &mut n_calls);
    let mut message = json!({ "role": "assistant", "content": msg.content });
    if msg.content.is_empty() && n_calls > 0 {
        message["content"] = Value::Null;
    }
    if !msg.reasoning.is_empty() {
        message["reasoning_content"] = msg.reasoning.into();
    }
    if n_calls > 0 {
        message["tool_calls"] = msg.calls.into();
    }
    Ok(Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": logprobs_json(&state, &meta, &lps),
            "finish_reason": finish_reason(&outcome, n_calls),
        }],
        "usage": usage(&outcome),
        "timings": timings(&outcome),
    }))
    .into_response())
}

fn stream_chat(state: Arc<ServeState>, generation: Generation, meta: Meta, include_usage: bool) -> Response {
    let (sink, response) = sse();
    tokio::spawn(run_stream(state, generation, meta, include_usage, sink));
    response
}

async fn run_stream(
    state: Arc<ServeState>,
    mut generation: Generation,
    meta: Meta,
    include_usage: bool,
    sink: StreamSink,
) {
    let chunk = |delta: Value, logprobs: Value, finish: Option<&str>| {
        json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }],
        })
    };
    if !sink.send(chunk(json!({ "role": "assistant", "content": "" }), Value::Null, None)).await {
        return;
    }
    let mut output = ChatOutput::new(meta.in_think, meta.parse_tools);
    let mut lps: Vec<TokenLogprob> = Vec::new();
    let mut n_calls = 0;
    while let Some(ev) = sink.next(&mut generation).await {
        let (deltas, outcome) = match ev {
            GenEvent::Text { text, logprobs } => {
                lps.extend(logprobs);
                (output.push(&text), None)
            }
            GenEvent::Done(outcome) => (output.finish(), Some(outcome)),
        };
        let mut msg = Message::default();
        msg.add(deltas, &mut n_calls);
        if !msg.is_empty() {
            let logprobs = logprobs_json(&state, &meta, &std::mem::take(&mut lps));
            if !sink.send(chunk(msg.delta(), logprobs, None)).await {
                return;
            }
        }
        let Some(outcome) = outcome else { continue };
        if let Reason::Error(e) = &outcome.reason {
            sink.send(ApiError::internal(format!("generation failed: {e}")).body()).await;
            return;
        }
        let mut last = chunk(json!({}), logprobs_json(&state, &meta, &lps), Some(finish_reason(&outcome, n_calls)));
        last["usage"] = usage(&outcome);
        last["timings"] = timings(&outcome);
        if sink.send(last).await && include_usage {
            let mut usage_chunk = chunk(Value::Null, Value::Null, None);
            usage_chunk["choices"] = json!([]);
            usage_chunk["usage"] = usage(&outcome);
            sink.send(usage_chunk).await;
        }
        return;
    }
}
