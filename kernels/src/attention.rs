//! Scaled dot-product attention of one query token over rows of a KV cache, with grouped-query
//! heads (Ainslie et al. 2023). Query head `h` reads KV head `h / (n_head / n_head_kv)`, as ggml's
//! broadcasting `mul_mat` does in llama.cpp's `build_attn_mha`. One call covers one KV head and
//! its group of query heads, so that a single token's attention (decoding) splits over
//! `n_head_kv` threads, and each call reads only that head's cache rows ([`KvRows`]: one head's
//! rows, contiguous).

use crate::quant::GgmlType;

/// Head geometry and score scale of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` is a multiple of it).
    pub n_head_kv: usize,
    /// Elements per head (the same for keys, queries and values).
    pub head_dim: usize,
    /// Factor applied to `q . k` before the softmax, usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// The cached rows of one KV head: `data` holds consecutive rows (cache slots) of `row_elems`
/// elements (the head's `head_dim`), stored as `ty` (F32, F16, BF16 or Q8_0 blocks). A head's
/// rows are contiguous, so reading them in slot order is one forward stream per head, which the
/// hardware prefetchers follow (a cache that interleaved the heads of a slot would put a head's
/// rows `n_head_kv` rows apart: four rows of Mellum2's F16 cache to a 4 KiB page, where the
/// prefetchers stop, and a TLB miss every four slots).
#[derive(Clone, Copy)]
pub struct KvRows<'a> {
    /// Storage type of each row.
    pub ty: GgmlType,
    /// Elements per row (a multiple of `ty`'s block size).
    pub row_elems: usize,
    /// The rows' bytes.
    pub data: &'a [u8],
}

impl KvRows<'_> {
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.row_elems).expect("KV row length is a multiple of the block size")
    }

    /// Decodes row `slot` into `out` (`row_elems` f32).
    pub fn read(&self, slot: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        self.ty.dequantize_row(&self.data[slot * rb..(slot + 1) * rb], out);
    }

    /// [`Self::read`], with F16 rows converted eight elements at a time by F16C when `F16C` (the
    /// caller's build enables it) and the row is a whole number of eight elements.
    #[inline(always)]
    fn read_row<const F16C: bool>(&self, slot: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if F16C && self.ty == GgmlType::F16 && self.row_elems.is_multiple_of(8) {
            let n = self.row_elems;
            let src = &self.data[slot * n * 2..(slot + 1) * n * 2];
            for (d, s) in out[..n].chunks_exact_mut(8).zip(src.chunks_exact(16)) {
                // SAFETY: `s` is 16 readable bytes and `d` 8 writable f32; F16C is enabled in the
                // build that instantiates `F16C = true`.
                unsafe {
                    use std::arch::x86_64::{_mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
                    _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast())));
                }
            }
            return;
        }
        self.read(slot, &mut out[..self.row_elems]);
    }
}

/// The key and value rows of one KV head of a layer's cache.
#[derive(Clone, Copy)]
pub struct KvPair<'a> {
    /// Key rows.
    pub keys: KvRows<'a>,
    /// Value rows (the same slots).
    pub values: KvRows<'a>,
}

/// Reusable buffers of [`attend`] (one per thread).
#[derive(Default)]
pub struct AttentionScratch {
    scores: Vec<f32>,
    /// One decoded key row, `[head_dim]`.
    row: Vec<f32>,
    /// A tile of decoded value rows, `[SLOT_TILE][head_dim]`.
    values: Vec<f32>,
    /// One slot's scores, `[group]`.
    slot_scores: Vec<f32>,
}

/// Attention output of one query token for the query heads of one KV head.
///
/// `q` is `[group, head_dim]` with `group = n_head / n_head_kv`: query heads `kv_head * group ..
/// (kv_head + 1) * group` of the token, and `kv` holds KV head `kv_head`'s rows (`head_dim`
/// elements each); `slots` lists the cache rows the token may see (any order; the softmax is
/// over all of them); `out` receives `[group, head_dim]`. Scores and the softmax are f32 with
/// the maximum subtracted; the softmax denominator accumulates in f64 as ggml's does.
pub fn attend(
    shape: AttentionShape,
    q: &[f32],
    kv: KvPair<'_>,
    slots: &[usize],
    scratch: &mut AttentionScratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C are present.
        return unsafe { attend_avx2(shape, q, kv, slots, scratch, out) };
    }
    attend_body::<false>(shape, q, kv, slots, scratch, out);
}

/// [`attend`] compiled for AVX2 (the same operations in the same order: bit-identical results;
/// [`dot`]'s lanes in explicit 256-bit vectors for four query heads at once, the value
/// accumulation vectorized over register-held tiles), F16 cache rows converted with F16C's
/// `vcvtph2ps` (exact, as the portable conversion is).
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_avx2(
    shape: AttentionShape,
    q: &[f32],
    kv: KvPair<'_>,
    slots: &[usize],
    scratch: &mut AttentionScratch,
    out: &mut [f32],
) {
    attend_body::<true>(shape, q, kv, slots, scratch, out);
}

/// The body of [`attend`], inlined into each build; `F16C`: F16 rows are converted with F16C
/// and the `q . k` dots take explicit AVX vectors (only in the build with those features
/// enabled, [`attend_avx2`]).
#[inline(always)]
fn attend_body<const F16C: bool>(
    shape: AttentionShape,
    q: &[f32],
    kv: KvPair<'_>,
    slots: &[usize],
    scratch: &mut AttentionScratch,
    out: &mut [f32],
) {
    let AttentionShape { n_head, n_head_kv, head_dim, scale } = shape;
    let KvPair { keys, values } = kv;
    let group = n_head / n_head_kv;
    assert!(
        keys.row_elems == head_dim && values.row_elems == head_dim,
        "KV rows of one head must be {head_dim} elements"
    );
    assert!(q.len() == group * head_dim && out.len() == group * head_dim, "q and out must be [{group}, {head_dim}]");
    let n = slots.len();
    assert!(n > 0, "a query must see at least its own key");
    scratch.scores.resize(group * n, 0.0);
    scratch.row.resize(head_dim, 0.0);
    let scores = &mut scratch.scores;

    scratch.slot_scores.resize(group, 0.0);
    for (j, &slot) in slots.iter().enumerate() {
        keys.read_row::<F16C>(slot, &mut scratch.row);
        head_dots::<F16C>(q, &scratch.row, &mut scratch.slot_scores);
        for (h, &s) in scratch.slot_scores.iter().enumerate() {
            scores[h * n + j] = s * scale;
        }
    }
    for s in scores.chunks_exact_mut(n) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += f64::from(*v);
        }
        let inv = (1.0 / sum) as f32;
        s.iter_mut().for_each(|v| *v *= inv);
    }
    out.fill(0.0);
    add_weighted_values::<F16C>(values, slots, scores, &mut scratch.values, out);
}

/// `out[h] += sum_j p[h][j] * v_j` for the query heads of `out` (`[group, head_dim]`), `p` the
/// softmaxed scores (`[group, slots.len()]`) and `v_j` value row `slots[j]`. Each output
/// element adds its products in slot order, as a plain loop over the slots would (so the
/// result does not depend on the tiling); tiled so that [`OUT_TILE`] elements stay in registers
/// over a tile of [`SLOT_TILE`] slots, whose value rows are decoded once for every head into
/// `tile` (`[SLOT_TILE][head_dim]`).
#[inline(always)]
fn add_weighted_values<const F16C: bool>(
    values: KvRows<'_>,
    slots: &[usize],
    p: &[f32],
    tile: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (head_dim, n) = (values.row_elems, slots.len());
    tile.resize(SLOT_TILE * head_dim, 0.0);
    for (t, tile_slots) in slots.chunks(SLOT_TILE).enumerate() {
        for (&slot, v) in tile_slots.iter().zip(tile.chunks_exact_mut(head_dim)) {
            values.read_row::<F16C>(slot, v);
        }
        let rows = || tile.chunks_exact(head_dim);
        for (h, o) in out.chunks_exact_mut(head_dim).enumerate() {
            let p = &p[h * n + t * SLOT_TILE..][..tile_slots.len()];
            for (d0, o) in (0..head_dim).step_by(OUT_TILE).zip(o.chunks_mut(OUT_TILE)) {
                if let Ok(o) = <&mut [f32; OUT_TILE]>::try_from(&mut *o) {
                    let mut acc = *o;
                    for (&p, v) in p.iter().zip(rows()) {
                        let v: &[f32; OUT_TILE] = v[d0..d0 + OUT_TILE].try_into().expect("a whole tile");
                        for (a, &x) in acc.iter_mut().zip(v) {
                            *a += p * x;
                        }
                    }
                    *o = acc;
                } else {
                    for (&p, v) in p.iter().zip(rows()) {
                        for (a, &x) in o.iter_mut().zip(&v[d0..]) {
                            *a += p * x;
                        }
                    }
                }
            }
        }
    }
}

/// Slots whose value rows are decoded together, then read by every query head of the group.
const SLOT_TILE: usize = 64;
/// Output elements a query head accumulates in registers over a tile of slots (eight AVX2
/// vectors).
const OUT_TILE: usize = 64;

/// Lanes of [`dot`]'s independent partial sums.
const DOT_LANES: usize = 16;

/// `sum(a[i] * b[i])` in [`DOT_LANES`] interleaved partial sums (lane `l` takes the indices
/// `i % DOT_LANES == l`, the tail goes to lane `i % DOT_LANES` as well), then added by halves:
/// lane `l` plus lane `l + 8`, then `+ 4`, `+ 2`, `+ 1`. The partial sums vectorize, the final
/// sum is four vector adds rather than sixteen dependent scalar ones, and the rounding does not
/// depend on the vector width: [`dot_avx`] and [`dot4_avx`] give the same bits.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; DOT_LANES];
    let (a_chunks, a_tail) = a.as_chunks::<DOT_LANES>();
    let (b_chunks, b_tail) = b.as_chunks::<DOT_LANES>();
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for l in 0..DOT_LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in a_tail.iter().zip(b_tail).enumerate() {
        acc[l] += x * y;
    }
    let s8: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let s4: [f32; 4] = std::array::from_fn(|l| s8[l] + s8[l + 4]);
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `out[h] = dot(q[h], k)` for the query heads `q` (`[out.len(), k.len()]`). `AVX`: the caller's
/// build has AVX (the `attend_avx2` build); then rows of a whole number of [`DOT_LANES`] go four
/// heads at a time through [`dot4_avx`], the rest through [`dot_avx`], the same operations.
#[inline(always)]
fn head_dots<const AVX: bool>(q: &[f32], k: &[f32], out: &mut [f32]) {
    let d = k.len();
    #[cfg(target_arch = "x86_64")]
    if AVX && d.is_multiple_of(DOT_LANES) {
        let (fours, rest) = out.as_chunks_mut::<4>();
        for (h4, o) in fours.iter_mut().enumerate() {
            // SAFETY: `AVX` is true only in a build with AVX enabled; four heads of `d`.
            *o = unsafe { dot4_avx(&q[4 * h4 * d..][..4 * d], k) };
        }
        let first = 4 * fours.len();
        for (h, o) in rest.iter_mut().enumerate() {
            // SAFETY: as above.
            *o = unsafe { dot_avx(&q[(first + h) * d..][..d], k) };
        }
        return;
    }
    for (qh, o) in q.chunks_exact(d).zip(out) {
        *o = dot(qh, k);
    }
}

/// The sum of [`dot_avx`]'s two vectors of partial sums by halves, as [`dot`] adds them.
///
/// # Safety
/// AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_by_halves(low: std::arch::x86_64::__m256, high: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    unsafe {
        let s8 = _mm256_add_ps(low, high);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        // Lanes 0 and 1: `s4[0] + s4[2]` and `s4[1] + s4[3]`.
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
    }
}

/// [`dot`] of four query heads `q` (`[4, k.len()]`) with `k` at once: the same operations per
/// head as [`dot_avx`], eight independent chains of adds instead of two.
///
/// # Safety
/// AVX; `q.len() == 4 * k.len()`, `k.len()` a multiple of [`DOT_LANES`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot4_avx(q: &[f32], k: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let d = k.len();
    unsafe {
        let mut low = [_mm256_setzero_ps(); 4];
        let mut high = [_mm256_setzero_ps(); 4];
        for i in (0..d).step_by(DOT_LANES) {
            let (kl, kh) = (_mm256_loadu_ps(k.as_ptr().add(i)), _mm256_loadu_ps(k.as_ptr().add(i + 8)));
            for h in 0..4 {
                let qh = q.as_ptr().add(h * d + i);
                low[h] = _mm256_add_ps(low[h], _mm256_mul_ps(_mm256_loadu_ps(qh), kl));
                high[h] = _mm256_add_ps(high[h], _mm256_mul_ps(_mm256_loadu_ps(qh.add(8)), kh));
            }
        }
        let mut out = [0.0f32; 4];
        for h in 0..4 {
            out[h] = sum_by_halves(low[h], high[h]);
        }
        out
    }
}

/// [`dot`] of two equal-length slices of a whole number of [`DOT_LANES`] on 256-bit vectors:
/// lanes `0..8` and `8..16` of the partial sums in one vector each.
///
/// # Safety
/// AVX; `a.len() == b.len()`, a multiple of [`DOT_LANES`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    unsafe {
        let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (x, y) in a.chunks_exact(DOT_LANES).zip(b.chunks_exact(DOT_LANES)) {
            let (x, y) = (x.as_ptr(), y.as_ptr());
            low = _mm256_add_ps(low, _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y)));
            high = _mm256_add_ps(high, _mm256_mul_ps(_mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(y.add(8))));
        }
        sum_by_halves(low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths below, at and off the lane count: within 1e-6 of sum |products| of the f64 sum.
    #[test]
    fn dot_matches_f64_sum() {
        for n in [3, 16, 128, 133] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.37).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.11).collect();
            let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
            let abs: f64 = a.iter().zip(&b).map(|(&x, &y)| (f64::from(x) * f64::from(y)).abs()).sum();
            assert!((f64::from(dot(&a, &b)) - exact).abs() <= 1e-6 * abs, "n={n}");
        }
    }

    fn f32_rows(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The dispatched build (F16C conversion of F16 rows, four heads' dots at once, value rows
    /// in tiles) against the portable body: bit-identical over F16 rows, at Mellum2's head shape
    /// over more slots than a tile, and at a group of six heads (four, then two alone) of 80
    /// elements (a partial output tile).
    #[test]
    fn f16_rows_give_the_portable_bits() {
        for (n_head, head_dim, n_slots) in [(32, 128, 150), (24, 80, 37)] {
            let shape = AttentionShape { n_head, n_head_kv: 4, head_dim, scale: (head_dim as f32).sqrt().recip() };
            let group = n_head / 4;
            let f16_rows = |salt: usize| -> Vec<u8> {
                (0..n_slots * head_dim)
                    .flat_map(|i| half::f16::from_f32(((i * 7919 + salt) % 2001) as f32 / 1000.0 - 1.0).to_le_bytes())
                    .collect()
            };
            let q: Vec<f32> = (0..group * head_dim).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
            let slots: Vec<usize> = (0..n_slots).rev().step_by(2).collect();
            let mut scratch = AttentionScratch::default();
            for kv_head in 0..4 {
                let (kb, vb) = (f16_rows(3 + kv_head), f16_rows(11 + kv_head));
                let keys = KvRows { ty: GgmlType::F16, row_elems: head_dim, data: &kb };
                let values = KvRows { ty: GgmlType::F16, row_elems: head_dim, data: &vb };
                let (mut fast, mut portable) = (vec![0.0f32; group * head_dim], vec![0.0f32; group * head_dim]);
                attend(shape, &q, KvPair { keys, values }, &slots, &mut scratch, &mut fast);
                attend_body::<false>(shape, &q, KvPair { keys, values }, &slots, &mut scratch, &mut portable);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&portable), "{n_head} heads of {head_dim}, KV head {kv_head}");
            }
        }
    }

    #[test]
    fn matches_plain_softmax_attention_with_gqa() {
        let shape = AttentionShape { n_head: 4, n_head_kv: 2, head_dim: 3, scale: 0.5 };
        let n_slots = 5;
        // Per KV head `[n_slots, 3]`: element (head, slot, d) at `head * 15 + slot * 3 + d`.
        let k: Vec<f32> = (0..2 * n_slots * 3).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let v: Vec<f32> = (0..2 * n_slots * 3).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
        let q: Vec<f32> = (0..12).map(|i| (i as f32 - 6.0) / 3.0).collect();
        let (kb, vb) = (f32_rows(&k), f32_rows(&v));
        let slots = [4usize, 0, 2];
        let mut out = [0.0; 12];
        let mut scratch = AttentionScratch::default();
        for (kv_head, (q, out)) in q.chunks(6).zip(out.chunks_mut(6)).enumerate() {
            let plane = kv_head * n_slots * 3 * 4..(kv_head + 1) * n_slots * 3 * 4;
            let keys = KvRows { ty: GgmlType::F32, row_elems: 3, data: &kb[plane.clone()] };
            let values = KvRows { ty: GgmlType::F32, row_elems: 3, data: &vb[plane] };
            attend(shape, q, KvPair { keys, values }, &slots, &mut scratch, out);
        }
        let at = |x: &[f32], kvh: usize, t: usize, d: usize| f64::from(x[kvh * n_slots * 3 + t * 3 + d]);
        for h in 0..4 {
            let kvh = h / 2;
            let s: Vec<f64> = slots
                .iter()
                .map(|&t| (0..3).map(|d| f64::from(q[h * 3 + d]) * at(&k, kvh, t, d)).sum::<f64>() * 0.5)
                .collect();
            let m = s.iter().copied().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for d in 0..3 {
                let want: f64 = slots.iter().zip(&s).map(|(&t, x)| (x - m).exp() / z * at(&v, kvh, t, d)).sum();
                assert!((f64::from(out[h * 3 + d]) - want).abs() < 1e-6, "head {h} dim {d}");
            }
        }
    }
}
