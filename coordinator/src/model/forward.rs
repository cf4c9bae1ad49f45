//! The forward pass of Mellum / Qwen3-MoE (llama.cpp `src/models/mellum.cpp`, HF
//! `modeling_qwen3_moe.py`): per block, RMSNorm -> Q/K/V projections -> per-head RMSNorm of q
//! and k -> NeoX RoPE (YaRN on full-attention layers) -> GQA attention over the KV cache
//! (sliding window on SWA layers) -> output projection -> residual; RMSNorm -> router softmax ->
//! top-k -> renormalise -> experts (through an [`ExpertBackend`]) -> residual. Then the final
//! RMSNorm and the LM head.

use moeshard_kernels::attention::{AttentionScratch, AttentionShape, KvPair, attend};
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
    /// None (a prompt chunk that is not the last).
    None,
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
    /// The expert backend failed. Its error's whole chain is part of the message (and not
    /// repeated as `source()`).
    #[error("experts of layer {layer}: {cause:#}")]
    Experts {
        /// The layer.
        layer: usize,
        /// The backend's error.
        cause: anyhow::Error,
    },
}

/// One sequence's part of a multi-sequence batch: its KV cache and the tokens to append to it.
pub struct SeqBatch<'a> {
    /// The sequence's cache; its tokens go at positions `kv.len()..`.
    pub kv: &'a mut KvCache,
    /// Tokens to append (at least one).
    pub tokens: &'a [u32],
    /// Which of its positions need logits.
    pub logits: Logits,
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
        kv.reserve(tokens.len())?;
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(n_ubatch.max(1));
        for (i, chunk) in tokens.chunks(n_ubatch.max(1)).enumerate() {
            let want = match logits {
                Logits::All => Logits::All,
                Logits::Last if i + 1 == n_chunks => Logits::Last,
                Logits::Last | Logits::None => Logits::None,
            };
            let mut seq = [SeqBatch { kv: &mut *kv, tokens: chunk, logits: want }];
            out.extend(self.forward_batch(&mut seq, experts)?.pop().unwrap_or_default());
        }
        Ok(out)
    }

    /// One forward pass over the tokens of several sequences at once (continuous batching):
    /// every weight matrix is read once for all of them and each MoE layer makes one call to
    /// `experts` for the whole batch. Each sequence's tokens attend only to its own cache.
    /// Returns, per sequence, the logits its `logits` selects (`[n, n_vocab]`; empty for
    /// [`Logits::None`]). The results for a sequence do not depend on what else is in the batch.
    ///
    /// Runs on the current rayon pool; the caller bounds the batch size (`n_ubatch` of the caches).
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqBatch<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let c = &self.config;
        let n_vocab = c.n_vocab;
        for seq in seqs.iter() {
            if let Some(&id) = seq.tokens.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(ForwardError::BadToken { id, n_vocab });
            }
            seq.kv.reserve(seq.tokens.len())?;
        }
        // Row r of the batch: (sequence, position).
        let rows: Vec<(usize, usize)> = seqs
            .iter()
            .enumerate()
            .flat_map(|(s, seq)| (0..seq.tokens.len()).map(move |i| (s, seq.kv.len() + i)))
            .collect();
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let (n, n_embd, hd) = (tokens.len(), c.n_embd, c.head_dim);
        let (n_q, n_kv) = (c.n_head * hd, c.n_embd_kv());

        let mut x = vec![0.0f32; n * n_embd];
        let embd = self.matrix(&self.tok_embd);
        for (row, &t) in x.chunks_exact_mut(n_embd).zip(&tokens) {
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
            for (t, &(s, pos)) in rows.iter().enumerate() {
                rope.cos_sin(pos, &mut cos_sin);
                rope.apply(&mut q[t * n_q..(t + 1) * n_q], hd, &cos_sin);
                rope.apply(&mut k[t * n_kv..(t + 1) * n_kv], hd, &cos_sin);
                seqs[s].kv.write(il, pos, &k[t * n_kv..(t + 1) * n_kv], &v[t * n_kv..(t + 1) * n_kv]);
            }

            let shape = AttentionShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let caches: Vec<&KvCache> = seqs.iter().map(|s| &*s.kv).collect();
            // One work item per (token, KV head): its group of query heads.
            let per_kv_head = n_q / c.n_head_kv;
            attn.par_chunks_mut(per_kv_head).zip(q.par_chunks(per_kv_head)).enumerate().for_each_init(
                || (AttentionScratch::default(), Vec::new()),
                |(scratch, slots), (i, (out, qt))| {
                    let (s, pos) = rows[i / c.n_head_kv];
                    let cache = caches[s];
                    let (keys, values) = cache.rows(il, i % c.n_head_kv);
                    cache.visible_slots(il, pos, slots);
                    attend(shape, qt, KvPair { keys, values }, slots, scratch, out);
                },
            );
            matmul_f32(&self.matrix(&l.attn_output), &attn, n, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut h);
            matmul_f32(&self.matrix(&l.ffn_gate_inp), &h, n, &mut router);
            let routes = softmax_top_k(&router, c.n_expert, c.n_expert_used, c.arch.renormalizes_top_k());
            experts
                .moe_forward(il, &h, &routes, &mut proj)
                .map_err(|cause| ForwardError::Experts { layer: il, cause })?;
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }

        // The rows whose logits are wanted, per sequence.
        let mut wanted: Vec<std::ops::Range<usize>> = Vec::with_capacity(seqs.len());
        let mut first = 0;
        for seq in seqs.iter_mut() {
            let len = seq.tokens.len();
            seq.kv.advance(len);
            wanted.push(match seq.logits {
                Logits::All => first..first + len,
                Logits::Last => first + len - 1..first + len,
                Logits::None => first..first,
            });
            first += len;
        }
        let picked: Vec<usize> = wanted.iter().flat_map(|r| r.clone()).collect();
        if picked.is_empty() {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let mut normed = vec![0.0f32; picked.len() * n_embd];
        for (dst, &r) in normed.chunks_exact_mut(n_embd).zip(&picked) {
            rms_norm(&x[r * n_embd..(r + 1) * n_embd], &self.output_norm, c.rms_eps, dst);
        }
        let mut logits = vec![0.0f32; picked.len() * n_vocab];
        matmul_f32(&self.matrix(&self.output), &normed, picked.len(), &mut logits);
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for r in wanted {
            out.push(logits[at * n_vocab..(at + r.len()) * n_vocab].to_vec());
            at += r.len();
        }
        Ok(out)
    }
}
