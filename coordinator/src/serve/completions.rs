//! `POST /v1/completions`: raw prompts (text or token ids), `echo`, legacy `logprobs`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::chat::StreamOptions;
use super::errors::ApiError;
use super::generate::{GenEvent, GenRequest, Generation, Reason, TokenLogprob};
use super::openai::{StreamSink, check_model, check_single_choice, max_tokens, new_id, sse, timings, usage};
use super::params::{Fields, parse_body};
use super::{ServeState, unix_now};
use crate::tokenizer::Tokenizer;

/// Most alternatives the legacy `logprobs` may ask for.
const MAX_LOGPROBS: i64 = 20;

/// The `prompt` parameter as token ids, and its text for `echo`: a string, an array of token
/// ids, or a list holding one of those.
fn prompt(state: &ServeState, value: Option<&Value>) -> Result<(Vec<u32>, String), ApiError> {
    let tok = &state.tokenizer;
    match value {
        None => Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Value::String(s)) if s.is_empty() => Err(ApiError::param("prompt", "the prompt is empty")),
        Some(Value::String(s)) => {
            let ids = tok.encode(s, true).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((ids, s.clone()))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            if items.is_empty() {
                return Err(ApiError::param("prompt", "the prompt is empty"));
            }
            let n_vocab = tok.n_vocab();
            let ids = items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64().and_then(|id| u32::try_from(id).ok()).filter(|&id| (id as usize) < n_vocab).ok_or_else(
                        || {
                            ApiError::param(
                                "prompt",
                                format!("`prompt[{i}]`: {v} is not a token id below the vocabulary size {n_vocab}"),
                            )
                        },
                    )
                })
                .collect::<Result<Vec<u32>, _>>()?;
            let text = tok.decode(&ids, false);
            Ok((ids, text))
        }
        Some(Value::Array(items)) if items.len() == 1 => prompt(state, items.first()),
        Some(Value::Array(_)) => Err(ApiError::param(
            "prompt",
            "`prompt` must be a string, an array of token ids, or a list with one of those",
        )),
        Some(_) => Err(ApiError::param("prompt", "`prompt` must be a string or an array of token ids")),
    }
}

/// The legacy `logprobs` object: `tokens`, `token_logprobs`, `top_logprobs` (token text to
/// logprob) and `text_offset` (in characters of the response's `text`, counted from `offset`).
fn legacy_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut tokens = Vec::with_capacity(lps.len());
    let mut token_logprobs = Vec::with_capacity(lps.len());
    let mut top_logprobs = Vec::with_capacity(lps.len());
    let mut text_offset = Vec::with_capacity(lps.len());
    for lp in lps {
        let piece = tok.token_to_piece(lp.id);
        text_offset.push(*offset);
        *offset += piece.chars().count();
        tokens.push(piece);
        token_logprobs.push(lp.logprob);
        // Tokens spelled alike (byte tokens shown as U+FFFD) share a key: the likeliest stays.
        let mut top = Map::new();
        for &(id, l) in &lp.top {
            top.entry(tok.token_to_piece(id)).or_insert_with(|| json!(l));
        }
        top_logprobs.push(top);
    }
    json!({ "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset })
}

/// What a response needs besides the generation.
struct Meta {
    id: String,
    created: u64,
    model: String,
    echo: Option<String>,
    logprobs: bool,
}

/// `POST /v1/completions`.
pub async fn handle(State(state): State<Arc<ServeState>>, body: Bytes) -> Result<Response, ApiError> {
    let map = parse_body(&body)?;
    let f = Fields::new(&map, "");
    check_model(&state, &f, "model")?;
    check_single_choice(&f)?;
    let (ids, text) = prompt(&state, f.raw("prompt"))?;
    let echo = f.get::<bool>("echo")?.unwrap_or(false);
    let logprobs = f.integer("logprobs", 0)?;
    if logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(ApiError::param("logprobs", format!("`logprobs` must be at most {MAX_LOGPROBS}")));
    }
    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    let include_usage = f.get::<StreamOptions>("stream_options")?.is_some_and(|o| o.include_usage);
    let request = GenRequest {
        prompt: ids,
        max_tokens: max_tokens(&f)?,
        sampling: f.sampling()?,
        logprobs: logprobs.map(|k| k as usize),
        stop: f.stop("stop")?,
    };
    let generation = Generation::start(&state, request)?;
    let meta = Meta {
        id: new_id("cmpl-"),
        created: unix_now(),
        model: state.info.name.clone(),
        echo: echo.then_some(text),
        logprobs: logprobs.is_some(),
    };
    if stream {
        let (sink, response) = sse();
        tokio::spawn(run_stream(state, generation, meta, include_usage, sink));
        Ok(response)
    } else {
        complete(state, generation, meta).await
    }
}

async fn complete(state: Arc<ServeState>, generation: Generation, meta: Meta) -> Result<Response, ApiError> {
    let (generated, lps, outcome) = generation.collect().await;
    if let Reason::Error(e) = &outcome.reason {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    let mut text = meta.echo.unwrap_or_default();
    let mut offset = text.chars().count();
    text.push_str(&generated);
    let logprobs = if meta.logprobs { legacy_logprobs(&state.tokenizer, &lps, &mut offset) } else { Value::Null };
    Ok(Json(json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": outcome.reason.as_str() }],
        "usage": usage(&outcome),
        "timings": timings(&outcome),
    }))
    .into_response())
}

async fn run_stream(
    state: Arc<ServeState>,
    mut generation: Generation,
    meta: Meta,
    include_usage: bool,
    sink: StreamSink,
) {
    let chunk = |text: &str, logprobs: Value, finish: Option<&str>| {
        json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish }],
        })
    };
    let mut offset = 0;
    if let Some(echo) = &meta.echo {
        offset = echo.chars().count();
        if !sink.send(chunk(echo, Value::Null, None)).await {
            return;
        }
    }
    while let Some(ev) = sink.next(&mut generation).await {
        match ev {
            GenEvent::Text { text, logprobs } => {
                let lp =
                    if meta.logprobs { legacy_logprobs(&state.tokenizer, &logprobs, &mut offset) } else { Value::Null };
                if !sink.send(chunk(&text, lp, None)).await {
                    return;
                }
            }
            GenEvent::Done(outcome) => {
                if let Reason::Error(e) = &outcome.reason {
                    sink.send(ApiError::internal(format!("generation failed: {e}")).body()).await;
                    return;
                }
                let mut last = chunk("", Value::Null, Some(outcome.reason.as_str()));
                last["usage"] = usage(&outcome);
                last["timings"] = timings(&outcome);
                if sink.send(last).await && include_usage {
                    let mut usage_chunk = chunk("", Value::Null, None);
                    usage_chunk["choices"] = json!([]);
                    usage_chunk["usage"] = usage(&outcome);
                    sink.send(usage_chunk).await;
                }
                return;
            }
        }
    }
}
