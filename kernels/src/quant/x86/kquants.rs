//! k-quant (Q2_K..Q6_K) x Q8_K kernels on 256-bit vectors; see the parent module.
//!
//! Block layouts are those documented in `quant/kquants.rs` (`ggml-common.h`). Each kernel turns
//! a 32-element group of weights into non-negative bytes `u` (the quant plus its offset: Q3_K
//! `q + 4`, Q6_K `q + 32`) and takes `vpmaddubsw(u, a)` (i16 pairs, exact: `u <= 63`) then
//! `vpmaddwd` with the sub-block scales as i16 multipliers, so a group costs two instructions
//! per column and the scales need no separate multiply. The offset is removed once per
//! super-block through the Q8_K block sums, `sum(q * a) = sum(u * a) - offset * bsum`, in
//! integers. Each super-block then adds `(d * a.d) * isum` lane by lane to eight f32 lanes per
//! column (the `dmin` term of Q2_K/Q4_K/Q5_K likewise), summed across lanes once per row, as
//! ggml's AVX2 kernels do: integer sums are exact, the f32 summation order differs from the
//! portable kernels', never with the column count.
//!
//! These bodies use only AVX2 instructions; the AVX-512 VNNI build compiles them too for Q2_K
//! and Q5_K (its Q3_K, Q4_K and Q6_K kernels are the 512-bit ones of `wide.rs`).

use std::arch::x86_64::*;

use super::super::kquants::k4_scales_mins;
use super::{f16_splat, hsum_f32, load, prefetch_ahead};

/// Bytes of a `block_q8_K`; `d` at 0, quants at 4, `bsums` at 260.
pub(super) const Q8_K_BYTES: usize = 292;
pub(super) const Q8_K_QS: usize = 4;
pub(super) const Q8_K_BSUMS: usize = 260;

/// The sixteen 6-bit Q3_K scales packed in the 12 bytes at `p`, as i8 (`scale - 32`), decoded in
/// vector registers (ggml's `ggml_vec_dot_q3_K_q8_K` layout; the same values as
/// the portable `q3_k_scales`, without the scalar stores a vector load would wait on).
///
/// # Safety
/// `p..p + 12` readable; AVX2.
#[inline(always)]
pub(super) unsafe fn q3_k_scales(p: *const u8) -> __m128i {
    unsafe {
        let low = _mm_loadl_epi64(p.cast());
        let high = _mm_set1_epi32(p.add(8).cast::<i32>().read_unaligned());
        let low4 = _mm_and_si128(_mm_unpacklo_epi64(low, _mm_srli_epi16::<4>(low)), _mm_set1_epi8(0xF));
        let high2 = _mm_and_si128(_mm_srlv_epi32(high, _mm_set_epi32(6, 4, 2, 0)), _mm_set1_epi8(3));
        _mm_sub_epi8(_mm_or_si128(low4, _mm_slli_epi32::<4>(high2)), _mm_set1_epi8(32))
    }
}

/// The eight Q4_K/Q5_K mins as 16 i16, each twice (for the two Q8_K sums of its sub-block).
///
/// # Safety
/// AVX2.
#[inline(always)]
pub(super) unsafe fn paired_mins(mins: [u8; 8]) -> __m256i {
    unsafe {
        let m = _mm_set_epi64x(0, i64::from_le_bytes(mins));
        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m))
    }
}

/// `vpmaddwd(vpmaddubsw(u, a), scales)`: eight i32 lanes, lane `i` the sum over bytes
/// `4i..4i + 4` of `u * a` times the i16 multipliers of its two pairs. Exact when `u <= 63`
/// (`2 * 63 * 128` fits an i16) and the multipliers are 6-bit or i8 scales.
///
/// # Safety
/// `a..a + 32` readable; AVX2.
#[inline(always)]
unsafe fn scaled_pairs(u: __m256i, a: *const u8, scales: __m256i) -> __m256i {
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, load(a)), scales) }
}

/// Sixteen i16 values `v` as the multipliers of the 32 bytes of one group: the two 128-bit
/// halves of the result take the i16 lanes `lo` and `hi` of `v` (each lane index in 0..8 of the
/// half it is read from), repeated. `v` holds the same eight values in both halves.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn spread16(v: __m256i, lo: usize, hi: usize) -> __m256i {
    let pick = |k: usize| (((2 * k + 1) << 8) | (2 * k)) as i16;
    unsafe { _mm256_shuffle_epi8(v, _mm256_setr_m128i(_mm_set1_epi16(pick(lo)), _mm_set1_epi16(pick(hi)))) }
}

/// The i16 scales of the sixteen 16-element sub-blocks of a super-block (`s16`, in order),
/// as the multipliers of group `g` (elements `32g..32g + 32`: sub-blocks `2g` and `2g + 1`).
/// `halves` is `[s16's low half twice, s16's high half twice]` ([`halves_of`]).
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn sub16_scales(halves: &[__m256i; 2], g: usize) -> __m256i {
    unsafe { spread16(halves[g / 4], 2 * (g % 4), 2 * (g % 4) + 1) }
}

/// `[v's low 128 bits twice, v's high 128 bits twice]`.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn halves_of(v: __m256i) -> [__m256i; 2] {
    unsafe { [_mm256_permute2x128_si256::<0x00>(v, v), _mm256_permute2x128_si256::<0x11>(v, v)] }
}

/// The f16 pair at `p` (`d`, then `dmin`) as f32, each in all eight lanes.
///
/// # Safety
/// `p..p + 4` readable; AVX2, F16C.
#[inline(always)]
unsafe fn f16_pair_splat(p: *const u8) -> (__m256, __m256) {
    unsafe {
        let both = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
        (_mm256_broadcastss_ps(both), _mm256_broadcastss_ps(_mm_movehdup_ps(both)))
    }
}

/// Per-column f32 accumulators: eight lanes each, summed once per row.
struct Acc<const C: usize> {
    lanes: [__m256; C],
}

impl<const C: usize> Acc<C> {
    /// Zero accumulators.
    ///
    /// # Safety
    /// AVX.
    #[inline(always)]
    unsafe fn new() -> Self {
        unsafe { Acc { lanes: [_mm256_setzero_ps(); C] } }
    }

    /// Adds super-block `i` of a type whose weights are `d * scale * (u - 2^SHIFT)` (Q3_K: 2,
    /// Q6_K: 5): `isum[c]` its integer lanes `sum(scale * u * a)` per column, `s16` the sixteen
    /// i16 scales in order, `d` the block's scale in every lane. The offset term
    /// `2^SHIFT * sum(bsums * scales)` is subtracted in integers.
    ///
    /// # Safety
    /// Every `a[c]` holds more than `i` Q8_K blocks; AVX2.
    #[inline(always)]
    unsafe fn add_offset<const SHIFT: i32>(
        &mut self,
        a: &[&[u8]; C],
        i: usize,
        isum: &[__m256i; C],
        s16: __m256i,
        d: __m256,
    ) {
        unsafe {
            for c in 0..C {
                let p = a[c].as_ptr().add(i * Q8_K_BYTES);
                let ad = _mm256_set1_ps(p.cast::<f32>().read_unaligned());
                let side = _mm256_slli_epi32::<SHIFT>(_mm256_madd_epi16(load(p.add(Q8_K_BSUMS)), s16));
                let sum = _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[c], side));
                self.lanes[c] = _mm256_fmadd_ps(_mm256_mul_ps(d, ad), sum, self.lanes[c]);
            }
        }
    }

    /// Adds super-block `i` of a type whose weights are `d * scale * u - dmin * min` (Q2_K, Q4_K,
    /// Q5_K): `isum[c]` its integer lanes per column, `m16` the sixteen i16 multipliers of the
    /// sixteen Q8_K block sums (each 16-element sub-block's min), `d` and `dmin` in every lane.
    ///
    /// # Safety
    /// Every `a[c]` holds more than `i` Q8_K blocks; AVX2.
    #[inline(always)]
    unsafe fn add_min(&mut self, a: &[&[u8]; C], i: usize, isum: &[__m256i; C], m16: __m256i, d: __m256, dmin: __m256) {
        unsafe {
            for c in 0..C {
                let p = a[c].as_ptr().add(i * Q8_K_BYTES);
                let ad = _mm256_set1_ps(p.cast::<f32>().read_unaligned());
                let side = _mm256_cvtepi32_ps(_mm256_madd_epi16(load(p.add(Q8_K_BSUMS)), m16));
                let main = _mm256_fmadd_ps(_mm256_mul_ps(d, ad), _mm256_cvtepi32_ps(isum[c]), self.lanes[c]);
                self.lanes[c] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, ad), side, main);
            }
        }
    }

    /// The row's results.
    ///
    /// # Safety
    /// AVX.
    #[inline(always)]
    unsafe fn finish(&self, out: &mut [f32; C]) {
        unsafe {
            for (o, &lanes) in out.iter_mut().zip(&self.lanes) {
                *o = hsum_f32(lanes);
            }
        }
    }
}

/// `isum[c] += scaled_pairs(u, a[c] at group g of super-block i, scales)` for every column.
///
/// # Safety
/// Every `a[c]` holds more than `i` Q8_K blocks, `g < 8`; AVX2.
#[inline(always)]
unsafe fn add_group<const C: usize>(
    isum: &mut [__m256i; C],
    a: &[&[u8]; C],
    i: usize,
    g: usize,
    u: __m256i,
    scales: __m256i,
) {
    unsafe {
        for c in 0..C {
            let p = a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 32 * g);
            isum[c] = _mm256_add_epi32(isum[c], scaled_pairs(u, p, scales));
        }
    }
}

/// Q2_K (84-byte blocks: 16 scale|min bytes, 64 bytes of 2-bit quants, `d`, `dmin`): `u` is the
/// 2-bit quant; per block `ad * d * sum(sc * u * a) - ad * dmin * sum(m * bsum)`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q2_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = Acc::<C>::new();
        let low2 = _mm256_set1_epi8(3);
        for i in 0..nb {
            let b = w.as_ptr().add(i * 84);
            prefetch_ahead(b, 84);
            let packed = _mm_loadu_si128(b.cast());
            let s16 = _mm256_cvtepu8_epi16(_mm_and_si128(packed, _mm_set1_epi8(0xF)));
            let m16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), _mm_set1_epi8(0xF)));
            let halves = halves_of(s16);
            let mut isum = [_mm256_setzero_si256(); C];
            for h in 0..2 {
                let qv = load(b.add(16 + 32 * h));
                for j in 0..4 {
                    let g = 4 * h + j;
                    let u = _mm256_and_si256(_mm256_srl_epi16(qv, _mm_cvtsi32_si128(2 * j as i32)), low2);
                    add_group(&mut isum, a, i, g, u, sub16_scales(&halves, g));
                }
            }
            let (d, dmin) = f16_pair_splat(b.add(80));
            total.add_min(a, i, &isum, m16, d, dmin);
        }
        total.finish(out);
    }
}

/// Group `g` (elements `32g..32g + 32`, 0..8) of a Q3_K super-block as `u = q + 4`, one byte
/// each: the 2 low bits from `qv` (the block's quant bytes `32 * (g / 4)..` loaded), the high bit
/// from `hm` (its 32 `hmask` bytes).
///
/// # Safety
/// AVX2.
#[inline(always)]
pub(super) unsafe fn q3_k_codes(qv: __m256i, hm: __m256i, g: usize) -> __m256i {
    unsafe {
        let low = _mm256_and_si256(_mm256_srl_epi16(qv, _mm_cvtsi32_si128(2 * (g % 4) as i32)), _mm256_set1_epi8(3));
        let high = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(g as i32)), _mm256_set1_epi8(1));
        _mm256_or_si256(low, _mm256_slli_epi16::<2>(high))
    }
}

/// Q3_K (110-byte blocks: 32 bytes of `hmask`, 64 of 2-bit quants, 12 of scales, `d`):
/// `u = q + 4` (2 low bits, high bit from `hmask`); per block
/// `d * ad * (sum(sc * u * a) - 4 * sum(sc * bsum))`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q3_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = Acc::<C>::new();
        for i in 0..nb {
            let b = w.as_ptr().add(i * 110);
            prefetch_ahead(b, 110);
            let s16 = _mm256_cvtepi8_epi16(q3_k_scales(b.add(96)));
            let halves = halves_of(s16);
            let hm = load(b);
            let mut isum = [_mm256_setzero_si256(); C];
            for h in 0..2 {
                let qv = load(b.add(32 + 32 * h));
                for j in 0..4 {
                    let g = 4 * h + j;
                    add_group(&mut isum, a, i, g, q3_k_codes(qv, hm, g), sub16_scales(&halves, g));
                }
            }
            total.add_offset::<2>(a, i, &isum, s16, f16_splat(b.add(108)));
        }
        total.finish(out);
    }
}

/// The eight 6-bit scales of a Q4_K/Q5_K super-block as i16 in both 128-bit halves, and its
/// eight mins as the multipliers of the sixteen Q8_K block sums ([`paired_mins`]).
///
/// # Safety
/// `p..p + 12` readable; AVX2.
#[inline(always)]
unsafe fn k4_scales(p: *const u8) -> (__m256i, __m256i) {
    unsafe {
        let (scales, mins) = k4_scales_mins(&p.cast::<[u8; 12]>().read_unaligned());
        let s = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(scales)));
        (_mm256_setr_m128i(s, s), paired_mins(mins))
    }
}

/// Adds sub-blocks `2j` (`lo`) and `2j + 1` (`hi`) of a Q4_K/Q5_K super-block `i`, whose
/// scales are `scales` ([`k4_scales`]).
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
unsafe fn k4_group_pair<const C: usize>(
    isum: &mut [__m256i; C],
    a: &[&[u8]; C],
    i: usize,
    j: usize,
    lo: __m256i,
    hi: __m256i,
    scales: __m256i,
) {
    unsafe {
        let (s0, s1) = (spread16(scales, 2 * j, 2 * j), spread16(scales, 2 * j + 1, 2 * j + 1));
        add_group(isum, a, i, 2 * j, lo, s0);
        add_group(isum, a, i, 2 * j + 1, hi, s1);
    }
}

/// Q4_K (144-byte blocks: `d`, `dmin`, 12 bytes of scales and mins, 128 bytes of nibbles): `u`
/// is the nibble; per block `d * ad * isum - dmin * ad * summs`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q4_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = Acc::<C>::new();
        let low4 = _mm256_set1_epi8(0xF);
        for i in 0..nb {
            let b = w.as_ptr().add(i * 144);
            prefetch_ahead(b, 144);
            let (scales, mins16) = k4_scales(b.add(4));
            let mut isum = [_mm256_setzero_si256(); C];
            for j in 0..4 {
                let q = load(b.add(16 + 32 * j));
                let lo = _mm256_and_si256(q, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                k4_group_pair(&mut isum, a, i, j, lo, hi, scales);
            }
            let (d, dmin) = f16_pair_splat(b);
            total.add_min(a, i, &isum, mins16, d, dmin);
        }
        total.finish(out);
    }
}

/// Q5_K (176-byte blocks: as Q4_K with 32 bytes of high bits before the nibbles): `u` is the
/// nibble plus 16 times the `qh` bit; as Q4_K otherwise.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q5_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = Acc::<C>::new();
        let (low4, one) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(1));
        for i in 0..nb {
            let b = w.as_ptr().add(i * 176);
            prefetch_ahead(b, 176);
            let (scales, mins16) = k4_scales(b.add(4));
            let qh = load(b.add(16));
            let mut isum = [_mm256_setzero_si256(); C];
            for j in 0..4 {
                let q = load(b.add(48 + 32 * j));
                let bits = |k: usize| {
                    let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(k as i32)), one);
                    _mm256_slli_epi16::<4>(bit)
                };
                let lo = _mm256_or_si256(_mm256_and_si256(q, low4), bits(2 * j));
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), low4), bits(2 * j + 1));
                k4_group_pair(&mut isum, a, i, j, lo, hi, scales);
            }
            let (d, dmin) = f16_pair_splat(b);
            total.add_min(a, i, &isum, mins16, d, dmin);
        }
        total.finish(out);
    }
}

/// Q6_K (210-byte blocks: 128 bytes of low nibbles `ql`, 64 of high bits `qh`, 16 i8 scales,
/// `d`): `u = q + 32` (4 low bits from `ql`, 2 high bits from `qh`); per block
/// `d * ad * (sum(sc * u * a) - 32 * sum(sc * bsum))`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q6_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = Acc::<C>::new();
        let (low4, high2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
        for i in 0..nb {
            let b = w.as_ptr().add(i * 210);
            prefetch_ahead(b, 210);
            let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192).cast()));
            let halves = halves_of(s16);
            let mut isum = [_mm256_setzero_si256(); C];
            for h in 0..2 {
                let ql0 = load(b.add(64 * h));
                let ql1 = load(b.add(64 * h + 32));
                let qh = load(b.add(128 + 32 * h));
                let groups = [
                    _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high2)),
                    _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), _mm256_and_si256(qh, high2)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high2),
                    ),
                ];
                for (k, u) in groups.into_iter().enumerate() {
                    let g = 4 * h + k;
                    add_group(&mut isum, a, i, g, u, sub16_scales(&halves, g));
                }
            }
            total.add_offset::<5>(a, i, &isum, s16, f16_splat(b.add(208)));
        }
        total.finish(out);
    }
}
