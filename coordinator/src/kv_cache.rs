//! Per-sequence key/value cache.
//!
//! Each layer stores K and V head-major: per KV head a plane of `capacity` rows of `head_dim`
//! elements, so the rows one head's attention reads are contiguous (a single forward stream per
//! head, where a slot-major cache puts them `n_head_kv` rows apart), as f32, f16, bf16 or Q8_0
//! blocks (llama.cpp's `-ctk`/`-ctv` types; Q8_0 quantized exactly as ggml's
//! `quantize_row_q8_0`, block by block, so a head's blocks are those of the token's whole row).
//! K head `h`'s row of slot `s` starts at byte `(h * capacity + s) * row_bytes(head_dim)`.
//! Full-attention layers keep one slot per context position. Sliding-window layers keep a ring
//! of `window + n_ubatch` slots, position `p` in slot `p % capacity`: a batch of up to
//! `n_ubatch` new tokens never overwrites a key that one of them can still see (llama.cpp sizes
//! its SWA cache the same way, `n_swa + n_ubatch`).

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
    /// The head size does not fit the storage type's blocks.
    #[error("KV type {ty:?} needs heads that are a multiple of {block} elements, the model's are {row}")]
    BadRow {
        /// Requested type.
        ty: KvType,
        /// Its block size.
        block: usize,
        /// Elements per head (`head_dim`).
        row: usize,
    },
}

struct LayerCache {
    capacity: usize,
    window: Option<usize>,
    /// `[n_head_kv][capacity]` rows of `head_dim` keys.
    k: Vec<u8>,
    /// `[n_head_kv][capacity]` rows of `head_dim` values.
    v: Vec<u8>,
}

/// The KV cache of one sequence.
pub struct KvCache {
    layers: Vec<LayerCache>,
    n_ctx: usize,
    n_tokens: usize,
    n_head_kv: usize,
    head_dim: usize,
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
        let (n_head_kv, head_dim) = (config.n_head_kv, config.head_dim);
        for ty in [k_type, v_type] {
            let block = ty.storage().0.block_size();
            if !head_dim.is_multiple_of(block) {
                return Err(KvError::BadRow { ty, block, row: head_dim });
            }
        }
        let plane_bytes = |ty: KvType, capacity: usize| n_head_kv * capacity * ty.storage().1.row_bytes(head_dim);
        let layers = (0..config.n_layer)
            .map(|il| {
                let window = config.sliding_window.filter(|_| config.is_swa(il));
                let capacity = window.map_or(n_ctx, |w| n_ctx.min(w + n_ubatch));
                LayerCache {
                    capacity,
                    window,
                    k: resident_zeros(plane_bytes(k_type, capacity)),
                    v: resident_zeros(plane_bytes(v_type, capacity)),
                }
            })
            .collect();
        Ok(KvCache { layers, n_ctx, n_tokens: 0, n_head_kv, head_dim, k_type, v_type })
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

    /// Stores the K and V rows (`n_head_kv * head_dim` f32 each, heads contiguous) of the token
    /// at position `pos` in layer `il`: head `h`'s elements into row `pos % capacity` of plane `h`.
    pub fn write(&mut self, il: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let layer = &mut self.layers[il];
        let slot = pos % layer.capacity;
        for (ty, src, dst) in [(self.k_type, k, &mut layer.k), (self.v_type, v, &mut layer.v)] {
            let ty = ty.storage().1;
            let rb = ty.row_bytes(hd);
            for (h, x) in src.chunks_exact(hd).enumerate() {
                let row = (h * layer.capacity + slot) * rb;
                ty.quantize_row(x, &mut dst[row..row + rb]);
            }
        }
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

    /// The K and V rows of KV head `kv_head` of layer `il` (`capacity` rows of `head_dim`
    /// elements each, indexed by the slots of [`KvCache::visible_slots`]).
    pub fn rows(&self, il: usize, kv_head: usize) -> (KvRows<'_>, KvRows<'_>) {
        assert!(kv_head < self.n_head_kv, "KV head {kv_head} of {}", self.n_head_kv);
        let layer = &self.layers[il];
        (
            self.head_rows(self.k_type, &layer.k, layer.capacity, kv_head),
            self.head_rows(self.v_type, &layer.v, layer.capacity, kv_head),
        )
    }

    /// Plane `kv_head` of a layer's K or V bytes `data` (`capacity` rows of type `ty`).
    fn head_rows<'a>(&self, ty: KvType, data: &'a [u8], capacity: usize, kv_head: usize) -> KvRows<'a> {
        let plane = capacity * ty.storage().1.row_bytes(self.head_dim);
        KvRows { ty: ty.storage().0, row_elems: self.head_dim, data: &data[kv_head * plane..][..plane] }
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

    /// Each KV head's row of a written token, read back from its plane, equals that head's part
    /// of the token's whole row stored in the same type, in a full layer and at a wrapped slot of
    /// a sliding layer's ring. Q8_0 needs heads of whole 32-element blocks; the fixture's are 16.
    #[test]
    fn write_puts_each_head_in_its_plane() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-mellum-q8_0.gguf");
        let model = Model::load(path).unwrap();
        let c = &model.config;
        let (n_kv, hd) = (c.n_embd_kv(), c.head_dim);
        let (full, sliding) =
            ((0..c.n_layer).find(|&il| !c.is_swa(il)).unwrap(), (0..c.n_layer).find(|&il| c.is_swa(il)).unwrap());
        assert_eq!(
            KvCache::new(c, 128, 4, KvType::F16, KvType::Q8_0).err(),
            Some(KvError::BadRow { ty: KvType::Q8_0, block: 32, row: 16 })
        );
        for ty in [KvType::F32, KvType::F16, KvType::BF16] {
            let mut kv = KvCache::new(c, 128, 4, ty, ty).unwrap();
            let k: Vec<f32> = (0..n_kv).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let v: Vec<f32> = (0..n_kv).map(|i| ((i * 53 % 89) as f32 - 44.0) / 13.0).collect();
            let (gt, vt) = ty.storage();
            let stored = |x: &[f32]| {
                let mut bytes = vec![0u8; vt.row_bytes(n_kv)];
                vt.quantize_row(x, &mut bytes);
                let mut back = vec![0.0f32; n_kv];
                gt.dequantize_row(&bytes, &mut back);
                back
            };
            let (want_k, want_v) = (stored(&k), stored(&v));
            for (il, pos) in [(full, 5), (sliding, 70)] {
                kv.write(il, pos, &k, &v);
                let mut slots = Vec::new();
                kv.visible_slots(il, pos, &mut slots);
                let slot = *slots.last().unwrap();
                for h in 0..c.n_head_kv {
                    let (keys, values) = kv.rows(il, h);
                    let (mut got_k, mut got_v) = (vec![0.0f32; hd], vec![0.0f32; hd]);
                    keys.read(slot, &mut got_k);
                    values.read(slot, &mut got_v);
                    assert_eq!(got_k, want_k[h * hd..(h + 1) * hd], "{ty:?} layer {il} head {h} keys");
                    assert_eq!(got_v, want_v[h * hd..(h + 1) * hd], "{ty:?} layer {il} head {h} values");
                }
            }
        }
    }
}
