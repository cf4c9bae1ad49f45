//! One request's generation as text: submits token ids to the engine, detokenizes what comes
//! back, applies the stop sequences and reports usage. Dropping a [`Generation`] drops the
//! engine's receiver, which cancels the request.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use moeshard_kernels::sampling::SamplingParams;
use tokio::sync::mpsc::UnboundedReceiver;

use super::ServeState;
use super::errors::ApiError;
use super::stop::StopMatcher;
use crate::engine::{Event, FinishReason, Request};
use crate::tokenizer::StreamDecoder;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most; `None`: until the context is full.
    pub max_tokens: Option<usize>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// `Some(k)`: report each token's logprob and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Stop sequences.
    pub stop: Vec<String>,
}

/// A generated token's logprob and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub id: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens with their logprobs, descending.
    pub top: Vec<(u32, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// An end-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` reached or the context full.
    Length,
    /// The engine failed.
    Error(String),
}

impl Reason {
    /// The OpenAI / Ollama spelling (`stop`, `length`, `error`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Stop => "stop",
            Reason::Length => "length",
            Reason::Error(_) => "error",
        }
    }
}

/// How a generation ended, with its token counts and timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Why it ended.
    pub reason: Reason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV cache was reused.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Time to process the prompt, in milliseconds.
    pub prompt_ms: f64,
    /// Time to generate, in milliseconds.
    pub generation_ms: f64,
}

/// What a [`Generation`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Text that can be sent, with the logprobs of the tokens it completes.
    Text {
        /// The text (empty only in the last one, when it carries the remaining logprobs).
        text: String,
        /// Logprobs of the tokens released with it (empty unless requested).
        logprobs: Vec<TokenLogprob>,
    },
    /// The end.
    Done(Outcome),
}

/// A request in progress.
pub struct Generation {
    state: Arc<ServeState>,
    rx: Option<UnboundedReceiver<Event>>,
    decoder: StreamDecoder,
    stop: StopMatcher,
    logprobs: Vec<TokenLogprob>,
    queued: VecDeque<GenEvent>,
    prompt_tokens: usize,
    generated: usize,
    submitted: Instant,
    first_token: Option<Instant>,
}

impl Generation {
    /// Checks that the request fits in the context and submits it.
    ///
    /// # Errors
    /// 400 for a context overflow or bad prompt, 503 when the queue is full.
    pub fn start(state: &Arc<ServeState>, req: GenRequest) -> Result<Generation, ApiError> {
        let n_ctx = state.engine.n_ctx();
        let prompt_tokens = req.prompt.len();
        if prompt_tokens == 0 {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        let max_tokens = match req.max_tokens {
            Some(m) if prompt_tokens + m > n_ctx => {
                return Err(ApiError::context_overflow(prompt_tokens, Some(m), n_ctx));
            }
            Some(m) => m,
            None if prompt_tokens >= n_ctx => return Err(ApiError::context_overflow(prompt_tokens, None, n_ctx)),
            None => n_ctx - prompt_tokens,
        };
        let rx = state.engine.submit(Request {
            prompt: req.prompt,
            max_tokens,
            sampling: req.sampling,
            logprobs: req.logprobs,
        })?;
        Ok(Generation {
            state: state.clone(),
            rx: Some(rx),
            decoder: StreamDecoder::new(true),
            stop: StopMatcher::new(req.stop),
            logprobs: Vec::new(),
            queued: VecDeque::new(),
            prompt_tokens,
            generated: 0,
            submitted: Instant::now(),
            first_token: None,
        })
    }

    /// The next event; `None` after [`GenEvent::Done`].
    pub async fn next(&mut self) -> Option<GenEvent> {
        loop {
            if let Some(ev) = self.queued.pop_front() {
                return Some(ev);
            }
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    if self.first_token.is_none() {
                        self.first_token = Some(Instant::now());
                        self.state.metrics.time_to_first_token(self.submitted.elapsed().as_secs_f64());
                    }
                    self.generated += 1;
                    if let Some(logprob) = t.logprob {
                        self.logprobs.push(TokenLogprob { id: t.id, logprob, top: t.top });
                    }
                    let text = self.decoder.push(&self.state.tokenizer, t.id);
                    let (text, hit) = self.stop.push(&text);
                    self.release(text, false);
                    if hit {
                        // Dropping the receiver cancels the rest of the generation.
                        self.rx = None;
                        let outcome = self.own_outcome(Reason::Stop);
                        self.queued.push_back(GenEvent::Done(outcome));
                    }
                }
                Some(Event::Done(f)) => {
                    self.rx = None;
                    let tail = self.decoder.finish();
                    let (mut text, hit) = self.stop.push(&tail);
                    if !hit {
                        text.push_str(&self.stop.finish());
                    }
                    self.release(text, true);
                    let reason = match f.reason {
                        _ if hit => Reason::Stop,
                        FinishReason::Stop => Reason::Stop,
                        FinishReason::Length => Reason::Length,
                        FinishReason::Error(e) => Reason::Error(e),
                    };
                    self.queued.push_back(GenEvent::Done(Outcome {
                        reason,
                        prompt_tokens: f.prompt_tokens,
                        cached_tokens: f.cached_tokens,
                        completion_tokens: f.completion_tokens,
                        prompt_ms: f.prompt_ms,
                        generation_ms: f.generation_ms,
                    }));
                }
                None => {
                    self.rx = None;
                    let outcome = self.own_outcome(Reason::Error("the engine stopped".into()));
                    self.queued.push_back(GenEvent::Done(outcome));
                }
            }
        }
    }

    /// Runs to the end: the whole text, every logprob and the outcome.
    pub async fn collect(mut self) -> (String, Vec<TokenLogprob>, Outcome) {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(ev) = self.next().await {
            match ev {
                GenEvent::Text { text: t, logprobs: l } => {
                    text.push_str(&t);
                    logprobs.extend(l);
                }
                GenEvent::Done(outcome) => return (text, logprobs, outcome),
            }
        }
        (text, logprobs, self.own_outcome(Reason::Error("the generation ended without a result".into())))
    }

    /// Queues `text` with the logprobs gathered since the last release: when it is not empty,
    /// or when it is the `last` text and logprobs remain.
    fn release(&mut self, text: String, last: bool) {
        if !text.is_empty() || (last && !self.logprobs.is_empty()) {
            let logprobs = std::mem::take(&mut self.logprobs);
            self.queued.push_back(GenEvent::Text { text, logprobs });
        }
    }

    /// The outcome measured here, for a generation that ended without the engine's report.
    fn own_outcome(&self, reason: Reason) -> Outcome {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        Outcome {
            reason,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: 0,
            completion_tokens: self.generated,
            prompt_ms: (first - self.submitted).as_secs_f64() * 1e3,
            generation_ms: (now - first).as_secs_f64() * 1e3,
        }
    }
}
