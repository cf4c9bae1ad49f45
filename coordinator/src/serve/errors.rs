//! Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status that fits, for every route (Ollama's included) and for responses axum or tower-http
//! produce on their own (unknown route, wrong method, body too large).

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::SubmitError;

/// The `Retry-After` of a 503 for a full queue, in seconds: about one generation step of a busy
/// server, so that clients come back soon rather than give up.
pub const RETRY_AFTER_SECS: u32 = 1;

/// An error answer: status, message and the OpenAI `type` / `param` / `code` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The OpenAI error type (`invalid_request_error`, `not_found_error`, ...).
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, ...), if one applies.
    pub code: Option<&'static str>,
    /// Seconds after which the request may succeed, sent as `Retry-After` (503 only).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400 for a malformed request that no single parameter is to blame for.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the parameter at fault.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.into()), ..ApiError::invalid(message) }
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(requested: &str, served: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("the model `{requested}` does not exist; this server serves `{served}`"),
            )
        }
    }

    /// 503: the server cannot take the request now.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", message)
    }

    /// 503 with `Retry-After`: every sequence is busy and the queue is full.
    pub fn busy(max_queue: usize) -> ApiError {
        ApiError {
            code: Some("server_busy"),
            retry_after: Some(RETRY_AFTER_SECS),
            ..ApiError::unavailable(format!("the server is busy: {max_queue} requests are already waiting"))
        }
    }

    /// 500: generation failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 400 for a prompt that, with the tokens to generate, does not fit in the context.
    pub fn context_overflow(prompt: usize, max_tokens: Option<usize>, n_ctx: usize) -> ApiError {
        let message = match max_tokens {
            Some(m) => format!("the prompt has {prompt} tokens and max_tokens {m}, the context holds {n_ctx}"),
            None => format!("the prompt has {prompt} tokens, the context holds {n_ctx}"),
        };
        ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid(message) }
    }

    /// 404 for an unknown route.
    fn no_route() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route")
    }

    /// The error of a plain status produced outside the handlers; `body_limit` (bytes) is the
    /// limit a 413 names.
    fn from_status(status: StatusCode, body_limit: usize) -> ApiError {
        match status {
            StatusCode::NOT_FOUND => ApiError::no_route(),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError {
                code: Some("request_too_large"),
                ..ApiError::new(
                    status,
                    "invalid_request_error",
                    format!("the request body is larger than the limit of {body_limit} bytes"),
                )
            },
            StatusCode::METHOD_NOT_ALLOWED => {
                ApiError::new(status, "invalid_request_error", "this method is not allowed on this route")
            }
            s if s.is_client_error() => {
                ApiError::new(s, "invalid_request_error", s.canonical_reason().unwrap_or("invalid request"))
            }
            s => ApiError::new(s, "server_error", s.canonical_reason().unwrap_or("server error")),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::EmptyPrompt => ApiError::param("prompt", "the prompt is empty"),
            SubmitError::BadToken { id, n_vocab } => {
                ApiError::param("prompt", format!("token id {id} is outside the vocabulary of {n_vocab}"))
            }
            SubmitError::ContextOverflow { prompt, n_ctx } => ApiError::context_overflow(prompt, None, n_ctx),
            SubmitError::QueueFull { max_queue } => ApiError::busy(max_queue),
            SubmitError::Stopped => ApiError::unavailable("the engine has stopped"),
        }
    }
}

/// Middleware: an error response without a JSON body (axum's 404 / 405 / 413, tower-http's 413)
/// gets the OpenAI error body for its status. The state is the body limit in bytes.
pub async fn json_errors(State(body_limit): State<usize>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        ApiError::from_status(status, body_limit).into_response()
    } else {
        resp
    }
}

/// Fallback for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::no_route()
}
