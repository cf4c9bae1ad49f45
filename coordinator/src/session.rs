//! One sequence being evaluated: a model, its expert backend and a KV cache.

use std::sync::Arc;

use moeshard_kernels::sampling::{log_softmax, top_logprobs};

use crate::experts::ExpertBackend;
use crate::kv_cache::{KvCache, KvError, KvType};
use crate::model::{ForwardError, Logits, Model};

/// Tokens per forward batch when none is given (llama.cpp's default `n_ubatch`).
pub const DEFAULT_UBATCH: usize = 512;

/// A sequence in progress.
pub struct Session {
    model: Arc<Model>,
    experts: Arc<dyn ExpertBackend>,
    kv: KvCache,
    n_ubatch: usize,
}

/// Teacher-forced scores of a token sequence (what llama-perplexity computes over one sequence).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Scores {
    /// The scored tokens.
    pub tokens: Vec<u32>,
    /// `next_token_logprobs[i]`: natural-log probability of `tokens[i + 1]` after `tokens[..=i]`
    /// (length `tokens.len() - 1`).
    pub next_token_logprobs: Vec<f32>,
    /// `top[i]`: the `k` most probable next tokens after `tokens[..=i]` with their logprobs,
    /// descending (length `tokens.len()`).
    pub top: Vec<Vec<(u32, f32)>>,
    /// `exp(-mean(next_token_logprobs))`.
    pub perplexity: f64,
}

impl Session {
    /// A new empty sequence of up to `n_ctx` tokens.
    pub fn new(
        model: Arc<Model>,
        experts: Arc<dyn ExpertBackend>,
        n_ctx: usize,
        k_type: KvType,
        v_type: KvType,
    ) -> Result<Session, KvError> {
        let n_ubatch = DEFAULT_UBATCH.min(n_ctx.max(1));
        let kv = KvCache::new(&model.config, n_ctx, n_ubatch, k_type, v_type)?;
        Ok(Session { model, experts, kv, n_ubatch })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokens in the sequence.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    /// Whether the sequence is empty.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// The context size.
    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Forgets every token of the sequence.
    pub fn clear(&mut self) {
        self.kv.clear();
    }

    /// Keeps the first `n` tokens and forgets the rest, when the cache still holds everything
    /// the token at position `n` will attend to (see [`KvCache::truncate`]); returns false and
    /// changes nothing otherwise (a sliding-window layer's ring no longer holds those positions,
    /// or `n` is beyond the sequence).
    pub fn truncate(&mut self, n: usize) -> bool {
        self.kv.truncate(n)
    }

    /// Appends `tokens` and returns the logits selected by `logits` (`[n, n_vocab]`).
    pub fn eval(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, ForwardError> {
        self.model.forward(tokens, &mut self.kv, &*self.experts, self.n_ubatch, logits)
    }

    /// Scores `tokens` as one sequence from an empty cache, keeping the `top_k` logprobs of
    /// every position. Logits are processed batch by batch, so memory stays at one batch of
    /// logits whatever the length.
    pub fn score(&mut self, tokens: &[u32], top_k: usize) -> Result<Scores, ForwardError> {
        self.kv.clear();
        self.kv.reserve(tokens.len())?;
        let n_vocab = self.model.config.n_vocab;
        let mut next_token_logprobs = Vec::with_capacity(tokens.len().saturating_sub(1));
        let mut top = Vec::with_capacity(tokens.len());
        let mut pos = 0;
        for chunk in tokens.chunks(self.n_ubatch) {
            let logits = self.eval(chunk, Logits::All)?;
            for row in logits.chunks_exact(n_vocab) {
                let lp = log_softmax(row);
                top.push(top_logprobs(&lp, top_k));
                if let Some(&next) = tokens.get(pos + 1) {
                    next_token_logprobs.push(lp[next as usize]);
                }
                pos += 1;
            }
        }
        let mean =
            next_token_logprobs.iter().map(|&v| f64::from(v)).sum::<f64>() / next_token_logprobs.len().max(1) as f64;
        Ok(Scores { tokens: tokens.to_vec(), next_token_logprobs, top, perplexity: (-mean).exp() })
    }
}
