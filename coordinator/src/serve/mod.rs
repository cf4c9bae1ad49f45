//! The HTTP server of `moeshard serve`: the OpenAI API (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`), Ollama's (`/api/tags`, `/api/version`, `/api/show`, `/api/chat`,
//! `/api/generate`), `/health` and `/metrics`, over the [`Engine`].
//!
//! Text-level work happens here: chat templates, detokenization, stop sequences, `<think>` and
//! `<tool_call>` parsing; token-level work (batching, sampling, prefix reuse) in the engine.
//! Errors have the OpenAI shape ([`errors`]).

mod chat;
mod completions;
mod errors;
mod generate;
mod http;
mod metrics;
mod ollama;
mod openai;
mod output;
mod params;
mod reasoning;
mod stop;
mod tool_calls;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::chat::ChatTemplate;
use crate::cluster::ClusterExperts;
use crate::engine::Engine;
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

pub use http::HttpLimits;
pub use metrics::Metrics;

/// What the server says about its model (`/v1/models`, `/api/tags`, `/api/show`).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name clients use: `--alias`, or the file's stem.
    pub name: String,
    /// The file's stem, also accepted as the model's name.
    pub stem: String,
    /// `general.architecture`.
    pub arch: String,
    /// Weights in the file.
    pub n_params: u64,
    /// The file's size in bytes.
    pub file_size: u64,
    /// The tensor type holding most of the bytes (e.g. `Q4_K`).
    pub quantization: String,
    /// Context size per sequence.
    pub n_ctx: usize,
    /// When the server started (Unix seconds).
    pub created: u64,
    /// Ollama capabilities: `completion`, plus `tools` / `thinking` when the chat template
    /// handles them.
    pub capabilities: Vec<&'static str>,
}

impl ModelInfo {
    /// The description of `gguf`, served as `alias` (default: the file's stem) with `n_ctx`
    /// tokens of context.
    pub fn from_gguf(gguf: &GgufFile, alias: Option<String>, n_ctx: usize) -> ModelInfo {
        let stem = gguf.path().file_stem().map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned());
        let template = gguf.get_str("tokenizer.chat_template").unwrap_or_default();
        let mut capabilities = vec!["completion"];
        if template.contains("tools") {
            capabilities.push("tools");
        }
        if template.contains("<think>") {
            capabilities.push("thinking");
        }
        let mut bytes_by_type: Vec<(String, u64)> = Vec::new();
        for t in gguf.tensors() {
            let ty = t.ty.to_string();
            match bytes_by_type.iter_mut().find(|(name, _)| *name == ty) {
                Some((_, n)) => *n += t.n_bytes,
                None => bytes_by_type.push((ty, t.n_bytes)),
            }
        }
        let quantization = bytes_by_type.into_iter().max_by_key(|&(_, n)| n).map(|(ty, _)| ty).unwrap_or_default();
        ModelInfo {
            name: alias.unwrap_or_else(|| stem.clone()),
            stem,
            arch: gguf.architecture().unwrap_or("unknown").to_owned(),
            n_params: gguf.tensors().iter().map(|t| t.n_elements()).sum(),
            file_size: gguf.data().len() as u64,
            quantization,
            n_ctx,
            created: unix_now(),
            capabilities,
        }
    }
}

/// Everything the handlers share.
pub struct ServeState {
    engine: Arc<Engine>,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    info: ModelInfo,
    metrics: Metrics,
    cluster: Option<Arc<ClusterExperts>>,
}

impl ServeState {
    /// The state of a server over `engine`, with the model's tokenizer and chat template (if it
    /// has one), and the worker cluster whose statistics `/metrics` shows.
    pub fn new(
        engine: Arc<Engine>,
        tokenizer: Arc<Tokenizer>,
        template: Option<ChatTemplate>,
        info: ModelInfo,
        cluster: Option<Arc<ClusterExperts>>,
    ) -> ServeState {
        ServeState { engine, tokenizer, template, info, metrics: Metrics::new(), cluster }
    }
}

/// The application: every route, the body size and timeout limits of `limits`, JSON errors and
/// request metrics.
pub fn router(state: Arc<ServeState>, limits: &HttpLimits) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .fallback(errors::not_found)
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(limits.max_body))
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .layer(axum::middleware::from_fn_with_state(limits.max_body, errors::json_errors))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves on `listener` within `limits` until Ctrl-C (see [`HttpLimits`] for what each limit
/// does to a client that reaches it).
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ServeState>, limits: HttpLimits) {
    tokio::spawn(state.metrics.upkeep());
    let app = router(state, &limits);
    http::serve_connections(listener, app, limits, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn render_metrics(State(state): State<Arc<ServeState>>) -> impl IntoResponse {
    let page = state.metrics.render(&state.engine.stats(), state.cluster.as_deref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], page)
}

impl ModelInfo {
    /// Whether a request's `model` names this model: the served name or the file's stem, with or
    /// without Ollama's `:latest` tag.
    pub fn answers_to(&self, requested: &str) -> bool {
        let bare = requested.strip_suffix(":latest").unwrap_or(requested);
        [requested, bare].iter().any(|n| *n == self.name || *n == self.stem)
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
