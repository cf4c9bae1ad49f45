//! One expert batch: the received payload decoded (validated rkyv access), checked against the
//! session's held experts, run through the grouped expert FFN kernel on the current rayon pool,
//! and answered with one partial-sum message.

use std::collections::HashMap;

use moeshard_kernels::matmul::QuantizedActivations;
use moeshard_kernels::moe::{MoeError, QuantizedInputs, Route, grouped_expert_ffn_quantized};
use moeshard_protocol::data::{DataError, PartialSums, access_expert_batch, aligned};
use moeshard_protocol::frame::MAX_FRAME_PAYLOAD;
use rkyv::util::AlignedVec;
use thiserror::Error;

use crate::assignment::HeldExperts;

/// The most route rows x hidden-size elements one batch may ask for (the kernel keeps one f32
/// output row per route: 64 Mi elements are 256 MiB).
pub const MAX_ROUTE_ELEMENTS: usize = 64 << 20;

/// Room left in a frame for the partial-sum archive's fixed fields, in bytes.
const SUMS_ARCHIVE_OVERHEAD: usize = 4096;

/// Why a batch was refused. Every variant is the peer's fault.
#[derive(Debug, Error)]
pub enum BatchError {
    /// The payload is not a valid expert batch.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A route names an expert this session does not hold.
    #[error("the expert batch routes token {token} to expert {layer}.{expert}, which is not assigned to this worker")]
    Unassigned {
        /// Layer index.
        layer: u32,
        /// Expert index.
        expert: u32,
        /// Token row.
        token: u32,
    },
    /// The batch's hidden size differs from the held experts'.
    #[error("the expert batch has hidden size {got}, the assigned experts have {expected}")]
    HiddenSize {
        /// The batch's hidden size in elements.
        got: u32,
        /// The experts' hidden size in elements.
        expected: usize,
    },
    /// The reply would not fit in one frame.
    #[error("an expert batch of {n_tokens} tokens x {n_embd} elements needs partial sums larger than a frame")]
    TooManyTokens {
        /// Token rows.
        n_tokens: u32,
        /// Hidden size in elements.
        n_embd: u32,
    },
    /// The batch asks for more work than [`MAX_ROUTE_ELEMENTS`].
    #[error(
        "an expert batch of {routes} routes x {n_embd} elements exceeds the limit of {MAX_ROUTE_ELEMENTS} elements"
    )]
    TooMuchWork {
        /// Routes in the batch.
        routes: usize,
        /// Hidden size in elements.
        n_embd: u32,
    },
    /// The kernel refused the batch (activations missing for an expert's weight type).
    #[error(transparent)]
    Kernel(#[from] MoeError),
}

/// The answer to one batch.
pub struct BatchReply {
    /// The encoded [`PartialSums`], the payload of one `PartialSums` frame.
    pub payload: AlignedVec,
    /// Token rows computed.
    pub tokens: u32,
}

/// Decodes the expert batch in `payload`, computes it with `held` on the current rayon pool and
/// encodes the partial sums.
pub fn run_batch(held: &HeldExperts, payload: &[u8]) -> Result<BatchReply, BatchError> {
    let buf = aligned(payload);
    let batch = access_expert_batch(&buf)?;
    let (step, layer) = (batch.step.to_native(), batch.layer.to_native());
    let (n_tokens, n_embd) = (batch.n_tokens.to_native(), batch.n_embd.to_native());

    let mut routes = Vec::with_capacity(batch.routes.len());
    let mut ffns = HashMap::new();
    for r in batch.routes.iter() {
        let (token, expert) = (r.token.to_native(), r.expert.to_native());
        let held_expert = held.get(layer, expert).ok_or(BatchError::Unassigned { layer, expert, token })?;
        ffns.entry(expert).or_insert_with(|| held_expert.ffn());
        routes.push(Route { token, expert, weight: r.weight.to_native() });
    }
    if n_embd as usize != held.n_embd() {
        return Err(BatchError::HiddenSize { got: n_embd, expected: held.n_embd() });
    }
    let (rows, cols) = (n_tokens as usize, n_embd as usize);
    if rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .is_none_or(|b| b > MAX_FRAME_PAYLOAD - SUMS_ARCHIVE_OVERHEAD)
    {
        return Err(BatchError::TooManyTokens { n_tokens, n_embd });
    }
    if routes.len().saturating_mul(cols) > MAX_ROUTE_ELEMENTS {
        return Err(BatchError::TooMuchWork { routes: routes.len(), n_embd });
    }

    let mut parts = Vec::with_capacity(batch.activations.len());
    for a in batch.activations.iter() {
        let ty = a.vec_dot_type().ok_or(DataError::UnknownVecDotType(a.vec_dot_type))?;
        parts.push(QuantizedActivations { ty, n_rows: rows, cols, data: a.data.to_vec() });
    }
    let inputs = QuantizedInputs::from_parts(cols, rows, parts);
    let mut sums = vec![0.0f32; rows * cols];
    // Every expert the kernel asks for is a routed one, and each was inserted above.
    grouped_expert_ffn_quantized(|e| ffns[&e], &inputs, &routes, &mut sums)?;
    let payload = PartialSums { step, layer, n_tokens, n_embd, sums }.encode()?;
    Ok(BatchReply { payload, tokens: n_tokens })
}
