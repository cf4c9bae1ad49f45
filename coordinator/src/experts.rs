//! The seam between the dense part of the model (run by the coordinator) and its experts, which
//! may run here or on workers.
//!
//! Per MoE layer the forward pass hands an [`ExpertBackend`] the normalised hidden states of the
//! batch and the routing decision; the backend returns, per token, the gate-weighted sum of its
//! experts' outputs. [`LocalExperts`] runs them on this machine's CPU from the mapped file.

use std::sync::Arc;

use moeshard_kernels::moe::{Route, grouped_expert_ffn};

use crate::model::Model;

/// Computes the MoE FFN of a layer for a batch of routed tokens.
pub trait ExpertBackend: Send + Sync {
    /// `hidden` is `[n_tokens, n_embd]` (the `ffn_norm` output of every token in the batch),
    /// `routes` the (token, expert, weight) triples, token by token with each token's experts in
    /// descending router probability. Writes `out` (`[n_tokens, n_embd]`): for each token the sum,
    /// in the order of `routes`, of `weight * expert(hidden[token])`; zeros for unrouted tokens.
    ///
    /// Errors when the experts cannot be computed (a remote worker failed and no fallback is left).
    fn moe_forward(&self, layer: usize, hidden: &[f32], routes: &[Route], out: &mut [f32]) -> anyhow::Result<()>;
}

/// Every expert of every layer, computed on this machine's CPU from the model's mapped weights.
pub struct LocalExperts {
    model: Arc<Model>,
}

impl LocalExperts {
    /// Local experts of `model`.
    pub fn new(model: Arc<Model>) -> LocalExperts {
        LocalExperts { model }
    }
}

impl ExpertBackend for LocalExperts {
    fn moe_forward(&self, layer: usize, hidden: &[f32], routes: &[Route], out: &mut [f32]) -> anyhow::Result<()> {
        let n_expert = self.model.config.n_expert;
        if let Some(r) = routes.iter().find(|r| r.expert as usize >= n_expert) {
            anyhow::bail!("route to expert {} of a layer with {n_expert} experts", r.expert);
        }
        grouped_expert_ffn(|e| self.model.expert_ffn(layer, e as usize), hidden, self.model.config.n_embd, routes, out);
        Ok(())
    }
}
