//! Pieces of the OpenAI API shared by the endpoints: the model check, ids, usage, logprobs,
//! `/v1/models`, and the channels that feed streamed responses (SSE and NDJSON).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::ServeState;
use super::errors::ApiError;
use super::generate::{GenEvent, Generation, Outcome, TokenLogprob};
use super::params::Fields;
use crate::tokenizer::Tokenizer;

/// Responses buffered ahead of a slow client, per stream.
const STREAM_BUFFER: usize = 64;

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<ServeState>>) -> Json<Value> {
    let info = &state.info;
    Json(json!({
        "object": "list",
        "data": [{
            "id": info.name,
            "object": "model",
            "created": info.created,
            "owned_by": "moeshard",
            "meta": { "n_ctx": info.n_ctx, "n_params": info.n_params, "size": info.file_size, "arch": info.arch },
        }],
    }))
}

/// Checks the request's `model` (absent: this model).
pub fn check_model(state: &ServeState, fields: &Fields, name: &str) -> Result<(), ApiError> {
    match fields.get::<String>(name)? {
        Some(m) if !state.info.answers_to(&m) => Err(ApiError::unknown_model(&m, &state.info.name)),
        _ => Ok(()),
    }
}

/// Checks the OpenAI `n` parameter: only one choice per request is supported.
pub fn check_single_choice(fields: &Fields) -> Result<(), ApiError> {
    match fields.get::<i64>("n")? {
        Some(n) if n != 1 => Err(ApiError::param("n", format!("only n = 1 is supported, got {n}"))),
        _ => Ok(()),
    }
}

/// `max_tokens` or `max_completion_tokens` (at least 1); `None`: until the context is full.
pub fn max_tokens(fields: &Fields) -> Result<Option<usize>, ApiError> {
    let mut max = None;
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = fields.integer(name, 1)? {
            max = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
    }
    Ok(max)
}

/// A fresh id: `prefix` and 24 random letters and digits.
pub fn new_id(prefix: &str) -> String {
    let tail: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect();
    format!("{prefix}{tail}")
}

/// The `usage` object.
pub fn usage(o: &Outcome) -> Value {
    json!({
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": o.cached_tokens },
    })
}

/// llama-server's `timings` object.
pub fn timings(o: &Outcome) -> Value {
    let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    json!({
        "prompt_n": o.prompt_tokens,
        "prompt_ms": o.prompt_ms,
        "prompt_per_second": per_s(o.prompt_tokens.saturating_sub(o.cached_tokens), o.prompt_ms),
        "predicted_n": o.completion_tokens,
        "predicted_ms": o.generation_ms,
        "predicted_per_second": per_s(o.completion_tokens, o.generation_ms),
    })
}

/// The chat API's logprobs entries (`logprobs.content`).
pub fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Vec<Value> {
    let entry = |id: u32, logprob: f32| json!({ "token": tok.token_to_piece(id), "logprob": logprob, "bytes": tok.token_bytes(id) });
    lps.iter()
        .map(|lp| {
            let mut e = entry(lp.id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
            e
        })
        .collect()
}

/// The sending end of a streamed response.
pub struct StreamSink {
    tx: mpsc::Sender<Value>,
}

impl StreamSink {
    /// Sends one message; `false` when the client has gone.
    pub async fn send(&self, v: Value) -> bool {
        self.tx.send(v).await.is_ok()
    }

    /// The generation's next event, or `None` as soon as the client disconnects (dropping the
    /// generation then cancels it).
    pub async fn next(&self, generation: &mut Generation) -> Option<GenEvent> {
        tokio::select! {
            biased;
            () = self.tx.closed() => None,
            ev = generation.next() => ev,
        }
    }
}

/// A server-sent-events response: each message sent through the sink becomes a `data:` event,
/// and `data: [DONE]` follows the last.
pub fn sse() -> (StreamSink, Response) {
    let (tx, rx) = mpsc::channel::<Value>(STREAM_BUFFER);
    let events = ReceiverStream::new(rx)
        .map(|v| Event::default().data(v.to_string()))
        .chain(futures_util::stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    (StreamSink { tx }, Sse::new(events).into_response())
}

/// A newline-delimited JSON response (Ollama's streaming).
pub fn ndjson() -> (StreamSink, Response) {
    let (tx, rx) = mpsc::channel::<Value>(STREAM_BUFFER);
    let lines = ReceiverStream::new(rx).map(|v| Ok::<_, Infallible>(Bytes::from(format!("{v}\n"))));
    let resp = ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response();
    (StreamSink { tx }, resp)
}
