//! Per-sequence key/value cache.
//!
//! Each layer stores K and V rows (`n_head_kv * head_dim` elements per token, heads contiguous)
//! as f32, f16, bf16 or Q8_0 blocks (llama.cpp's `-ctk`/`-ctv` types; Q8_0 quantized exactly as
//! ggml's `quantize_row_q8_0`). Full-attention layers keep one slot per context position.
//! Sliding-window layers keep a ring of `window + n_ubatch` slots, position `p` in slot
//! `p % capacity`: a batch of up to `n_ubatch` new tokens never overwrites a key that one of
//! them can still see (llama.cpp sizes its SWA cache the same way, `n_swa + n_ubatch`).

use moeshard_kernels::attention::KvRows;
use moeshard_kernels::quant::{GgmlType, VecDotType};

use crate::model::ModelConfig;

/// Storage type of cached keys or values (`-ctk` / `-ctv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    /// 32-bit float.
    F32,
    /// 16-bit float (the default, as in llama.cpp).
    #[default]
    F16,
    /// bfloat16.
    BF16,
    /// ggml Q8_0 blocks (34 bytes per 32 values); needs rows that are a multiple of 32.
    Q8_0,
}

impl KvType {
    /// Parses llama.cpp's names: `f32`, `f16`, `bf16`, `q8_0`.
    pub fn parse(s: &str) -> Option<KvType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            "bf16" => Some(KvType::BF16),
            "q8_0" => Some(KvType::Q8_0),
            _ => None,
        }
    }

    fn storage(self) -> (GgmlType, VecDotType) {
        match self {
            KvType::F32 => (GgmlType::F32, VecDotType::F32),
            KvType::F16 => (GgmlType::F16, VecDotType::F16),
            KvType::BF16 => (GgmlType::BF16, VecDotType::BF16),
            KvType::Q8_0 => (GgmlType::Q8_0, VecDotType::Q8_0),
        }
    }
}

/// Errors creating or filling a cache.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KvError {
    /// The sequence would outgrow the context.
    #[error("context overflow: {needed} tokens needed, the context holds {n_ctx} (raise -c)")]
    ContextFull {
        /// Tokens the sequence would hold.
        needed: usize,
        /// The context size.
        n_ctx: usize,
    },
    /// The KV row length does not fit the storage type's blocks.
    #[error("KV type {ty:?} needs rows that are a multiple of {block}, the model's are {row}")]
    BadRow {
        /// Requested type.
        ty: KvType,
        /// Its block size.
        block: usize,
        /// Elements per row.
        row: usize,
    },
}

struct LayerCache {
    capacity: usize,
    window: Option<usize>,
    k: Vec<u8>,
    v: Vec<u8>,
}

/// The KV cache of one sequence.
pub struct KvCache {
    layers: Vec<LayerCache>,
    n_ctx: usize,
    n_tokens: usize,
    row_elems: usize,
    k_type: KvType,
    v_type: KvType,
}

/// `len` zero bytes, written now rather than left to the first touch of each page (as
/// `vec![0; len]`, a `calloc`, would), so a cache costs its full size from the start and the
/// process's resident memory does not creep up as contexts grow (llama.cpp clears its KV buffers
/// at allocation too).
#[allow(clippy::slow_vector_initialization)] // `vec![0; len]` is the lazy zeroing avoided here.
fn resident_zeros(len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    bytes.resize(len, 0);
    bytes
}

impl KvCache {
    /// Allocates a cache for `n_ctx` tokens, written in batches of at most `n_ubatch` tokens.
    pub fn new(
        config: &ModelConfig,
        n_ctx: usize,
        n_ubatch: usize,
        k_type: KvType,
        v_type: KvType,
    ) -> Result<KvCache, KvError> {
        let row_elems = config.n_embd_kv();
        for ty in [k_type, v_type] {
            let block = ty.storage().0.block_size();
            if !row_elems.is_multiple_of(block) {
                return Err(KvError::BadRow { ty, block, row: row_elems });
            }
        }
        let layers = (0..config.n_layer)
            .map(|il| {
                let window = config.sliding_window.filter(|_| config.is_swa(il));
                let capacity = window.map_or(n_ctx, |w| n_ctx.min(w + n_ubatch));
                LayerCache {
                    capacity,
                    window,
                    k: resident_zeros(capacity * k_type.storage().1.row_bytes(row_elems)),
                    v: resident_zeros(capacity * v_type.storage().1.row_bytes(row_elems)),
                }
            })
            .collect();
        Ok(KvCache { layers, n_ctx, n_tokens: 0, row_elems, k_type, v_type })
    }

    /// Tokens in the sequence so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    /// Whether the sequence is empty.
    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// The context size in tokens.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Forgets every token.
    pub fn clear(&mut self) {
        self.n_tokens = 0;
    }

    /// Keeps the first `n` tokens and forgets the rest, when the cache still holds what the next
    /// token at position `n` will attend to: a sliding-window layer keeps only its last
    /// `capacity` positions, so going back further than its ring allows is refused (returns
    /// false and leaves the cache unchanged). Used to reuse a cached prompt prefix.
    pub fn truncate(&mut self, n: usize) -> bool {
        if n >= self.n_tokens {
            return n == self.n_tokens;
        }
        let len = self.n_tokens;
        let fits = self.layers.iter().all(|l| match l.window {
            Some(w) => (n + 1).saturating_sub(w) + l.capacity >= len,
            None => true,
        });
        if fits {
            self.n_tokens = n;
        }
        fits
    }

    /// Checks that `n` more tokens fit.
    pub fn reserve(&self, n: usize) -> Result<(), KvError> {
        let needed = self.n_tokens + n;
        if needed > self.n_ctx { Err(KvError::ContextFull { needed, n_ctx: self.n_ctx }) } else { Ok(()) }
    }

    /// Marks `n` tokens, whose K/V rows were written with [`KvCache::write`], as part of the sequence.
    pub fn advance(&mut self, n: usize) {
        self.n_tokens += n;
        debug_assert!(self.n_tokens <= self.n_ctx);
    }

    /// Stores the K and V rows (`row_elems` f32 each) of the token at position `pos` in layer `il`.
    pub fn write(&mut self, il: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (kt, vt) = (self.k_type.storage().1, self.v_type.storage().1);
        let (kb, vb) = (kt.row_bytes(self.row_elems), vt.row_bytes(self.row_elems));
        let layer = &mut self.layers[il];
        let slot = pos % layer.capacity;
        kt.quantize_row(k, &mut layer.k[slot * kb..(slot + 1) * kb]);
        vt.quantize_row(v, &mut layer.v[slot * vb..(slot + 1) * vb]);
    }

    /// The slots a query at position `pos` of layer `il` attends to: every earlier position and
    /// itself, limited on sliding-window layers to the last `window` positions
    /// (`pos - key_pos < window`, llama.cpp's `LLAMA_SWA_TYPE_STANDARD`).
    pub fn visible_slots(&self, il: usize, pos: usize, out: &mut Vec<usize>) {
        let layer = &self.layers[il];
        let first = layer.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        out.clear();
        out.extend((first..=pos).map(|p| p % layer.capacity));
    }

    /// The K and V rows of layer `il`.
    pub fn rows(&self, il: usize) -> (KvRows<'_>, KvRows<'_>) {
        let layer = &self.layers[il];
        (
            KvRows { ty: self.k_type.storage().0, row_elems: self.row_elems, data: &layer.k },
            KvRows { ty: self.v_type.storage().0, row_elems: self.row_elems, data: &layer.v },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn truncate_respects_the_sliding_window_ring() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-mellum-q8_0.gguf");
        let model = Model::load(path).unwrap();
        // Window 16, batches of 4: the sliding layers keep a ring of 20 positions.
        let mut kv = KvCache::new(&model.config, 128, 4, KvType::F32, KvType::F32).unwrap();
        kv.advance(40);
        // Position 30 attends to 15..=30; the ring holds 20..40: refused, nothing changes.
        assert!(!kv.truncate(30));
        assert_eq!(kv.len(), 40);
        // Position 36 attends to 21..=36, all still in the ring.
        assert!(kv.truncate(36));
        assert_eq!(kv.len(), 36);
        assert!(kv.truncate(36) && !kv.truncate(37));
    }
}
