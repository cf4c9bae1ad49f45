//! The forward pass of Mellum / Qwen3-MoE (llama.cpp `src/models/mellum.cpp`, HF
//! `modeling_qwen3_moe.py`): per block, RMSNorm -> Q/K/V projections -> per-head RMSNorm of q
//! and k -> NeoX RoPE (YaRN on full-attention layers) -> GQA attention over the KV cache
//! (sliding window on SWA layers) -> output projection -> residual; RMSNorm -> router softmax ->
//! top-k -> renormalise -> experts (through an [`ExpertBackend`]) -> residual. Then the final
//! RMSNorm and the LM head.

use moeshard_kernels::attention::{AttentionScratch, AttentionShape, attend};
use moeshard_kernels::matmul::matmul_f32;
use moeshard_kernels::moe::softmax_top_k;
use moeshard_kernels::norm::{rms_norm, rms_norm_inplace};
use rayon::prelude::*;

use super::Model;
use crate::experts::ExpertBackend;
use crate::kv_cache::{KvCache, KvError};

/// Which positions of a batch need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every position (teacher-forced scoring).
    All,
    /// Only the last position (generation).
    Last,
}

/// Errors of a forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The context is full.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken {
        /// The id.
        id: u32,
        /// Vocabulary size.
        n_vocab: usize,
    },
    /// The expert backend failed.
    #[error("experts of layer {layer}: {source}")]
    Experts {
        /// The layer.
        layer: usize,
        /// The backend's error.
        source: anyhow::Error,
    },
}

impl Model {
    /// Runs `tokens` (appended at positions `kv.len()..`) through the model in batches of at most
    /// `n_ubatch` tokens, updating `kv`. Returns the logits (`[n, n_vocab]` row-major) of the
    /// positions selected by `logits`: all of `tokens`, or the last one.
    ///
    /// Runs on the current rayon pool. On error the cache is left at the last whole batch.
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        experts: &dyn ExpertBackend,
        n_ubatch: usize,
        logits: Logits,
    ) -> Result<Vec<f32>, ForwardError> {
        let n_vocab = self.config.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ForwardError::BadToken { id, n_vocab });
        }
        kv.reserve(tokens.len())?;
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(n_ubatch.max(1));
        for (i, chunk) in tokens.chunks(n_ubatch.max(1)).enumerate() {
            let want = match logits {
                Logits::All => chunk.len(),
                Logits::Last if i + 1 == n_chunks => 1,
                Logits::Last => 0,
            };
            out.extend(self.forward_ubatch(chunk, kv, experts, want)?);
        }
        Ok(out)
    }

    /// One batch; returns logits of its last `n_logits` positions.
    fn forward_ubatch(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        experts: &dyn ExpertBackend,
        n_logits: usize,
    ) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let (n, n_embd, hd) = (tokens.len(), c.n_embd, c.head_dim);
        let (n_q, n_kv) = (c.n_head * hd, c.n_embd_kv());
        let pos0 = kv.len();

        let mut x = vec![0.0f32; n * n_embd];
        let embd = self.matrix(&self.tok_embd);
        for (row, &t) in x.chunks_exact_mut(n_embd).zip(tokens) {
            self.tok_embd.ty.dequantize_row(embd.row(t as usize), row);
        }

        let mut h = vec![0.0f32; n * n_embd];
        let mut q = vec![0.0f32; n * n_q];
        let mut k = vec![0.0f32; n * n_kv];
        let mut v = vec![0.0f32; n * n_kv];
        let mut attn = vec![0.0f32; n * n_q];
        let mut proj = vec![0.0f32; n * n_embd];
        let mut router = vec![0.0f32; n * c.n_expert];
        let mut cos_sin = vec![0.0f32; hd];

        for (il, l) in self.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, c.rms_eps, &mut h);
            matmul_f32(&self.matrix(&l.attn_q), &h, n, &mut q);
            matmul_f32(&self.matrix(&l.attn_k), &h, n, &mut k);
            matmul_f32(&self.matrix(&l.attn_v), &h, n, &mut v);
            rms_norm_inplace(&mut q, &l.attn_q_norm, c.rms_eps);
            rms_norm_inplace(&mut k, &l.attn_k_norm, c.rms_eps);
            let rope = c.rope(il);
            for t in 0..n {
                rope.cos_sin(pos0 + t, &mut cos_sin);
                rope.apply(&mut q[t * n_q..(t + 1) * n_q], hd, &cos_sin);
                rope.apply(&mut k[t * n_kv..(t + 1) * n_kv], hd, &cos_sin);
                kv.write(il, pos0 + t, &k[t * n_kv..(t + 1) * n_kv], &v[t * n_kv..(t + 1) * n_kv]);
            }

            let shape = AttentionShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let (keys, values) = kv.rows(il);
            let cache = &*kv;
            attn.par_chunks_mut(n_q).zip(q.par_chunks(n_q)).enumerate().for_each_init(
                || (AttentionScratch::default(), Vec::new()),
                |(scratch, slots), (t, (out, qt))| {
                    cache.visible_slots(il, pos0 + t, slots);
                    attend(shape, qt, keys, values, slots, scratch, out);
                },
            );
            matmul_f32(&self.matrix(&l.attn_output), &attn, n, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut h);
            matmul_f32(&self.matrix(&l.ffn_gate_inp), &h, n, &mut router);
            let routes = softmax_top_k(&router, c.n_expert, c.n_expert_used, c.arch.renormalizes_top_k());
            experts
                .moe_forward(il, &h, &routes, &mut proj)
                .map_err(|source| ForwardError::Experts { layer: il, source })?;
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        kv.advance(n);

        if n_logits == 0 {
            return Ok(Vec::new());
        }
        let tail = &x[(n - n_logits) * n_embd..];
        let mut normed = vec![0.0f32; tail.len()];
        rms_norm(tail, &self.output_norm, c.rms_eps, &mut normed);
        let mut logits = vec![0.0f32; n_logits * c.n_vocab];
        matmul_f32(&self.matrix(&self.output), &normed, n_logits, &mut logits);
        Ok(logits)
    }
}
