//! k-quant (Q2_K..Q6_K) x Q8_K kernels on 256-bit vectors; see the parent module.
//!
//! Block layouts are those documented in `quant/kquants.rs` (`ggml-common.h`). Each kernel turns
//! a 32-element group of weights into non-negative bytes `u` (the quant plus its offset: Q3_K
//! `q + 4`, Q6_K `q + 32`), takes `dpbusd(u, a)` per column, multiplies its lanes by the
//! sub-block scales (`vpmulld`), and removes the offset once per super-block through the Q8_K
//! block sums: `sum(q * a) = sum(u * a) - offset * bsum`. Integer sums are exact; the f32
//! operations per super-block are those of the portable kernels, in their order.

use std::arch::x86_64::*;

use super::super::kquants::k4_scales_mins;
use super::{Dot, f16_at, hsum_i32, load};

/// Bytes of a `block_q8_K`; `d` at 0, quants at 4, `bsums` at 260.
pub(super) const Q8_K_BYTES: usize = 292;
pub(super) const Q8_K_QS: usize = 4;
pub(super) const Q8_K_BSUMS: usize = 260;

/// A Q8_K block's pointers and `d` for column `c` of super-block `i`.
///
/// # Safety
/// `a[c]` holds more than `i` blocks.
#[inline(always)]
pub(super) unsafe fn q8_k_block<const C: usize>(a: &[&[u8]; C], c: usize, i: usize) -> (*const u8, f32) {
    unsafe {
        let p = a[c].as_ptr().add(i * Q8_K_BYTES);
        (p, p.cast::<f32>().read_unaligned())
    }
}

/// `sum_j bsums[j] * s16[j]` over the 16 i16 block sums of the Q8_K block at `p`.
///
/// # Safety
/// `p` is a Q8_K block; AVX2.
#[inline(always)]
pub(super) unsafe fn bsum_dot(p: *const u8, s16: __m256i) -> i32 {
    unsafe { hsum_i32(_mm256_madd_epi16(load(p.add(Q8_K_BSUMS)), s16)) }
}

/// Lanes 0..4 = `s[2g]`, lanes 4..8 = `s[2g + 1]` (as i32) from the sixteen i8 scales `s`: the
/// scales of the two 16-element sub-blocks of 32-element group `g`, for the lanes of `dpbusd`
/// over that group. With `g` a constant (unrolled loops), one shuffle and one extension.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn pair_scales(s: __m128i, g: usize) -> __m256i {
    let (lo, hi) = (2 * g as u64, 2 * g as u64 + 1);
    let index = lo * 0x0101_0101 + hi * 0x0101_0101_0000_0000;
    unsafe { _mm256_cvtepi8_epi32(_mm_shuffle_epi8(s, _mm_cvtsi64_si128(index as i64))) }
}

/// Lane `k` of `v` in all eight lanes (`k` a constant in unrolled loops).
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn lane_splat(v: __m256i, k: usize) -> __m256i {
    unsafe { _mm256_permutevar8x32_epi32(v, _mm256_set1_epi32(k as i32)) }
}

/// `acc + dpbusd(u, a) * scales` lane by lane.
///
/// # Safety
/// `a` has 32 readable bytes; the CPU supports `D`.
#[inline(always)]
unsafe fn scaled_dot<D: Dot>(acc: __m256i, u: __m256i, a: *const u8, scales: __m256i) -> __m256i {
    unsafe { _mm256_add_epi32(acc, _mm256_mullo_epi32(D::dpbusd(_mm256_setzero_si256(), u, load(a)), scales)) }
}

/// Q2_K (84-byte blocks): `u` is the 2-bit quant; per block `ad * d * isum - ad * dmin * summs`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q2_k<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut sumf = [0.0f32; C];
        let low2 = _mm256_set1_epi8(3);
        for i in 0..nb {
            let b = w.as_ptr().add(i * 84);
            let packed = _mm_loadu_si128(b.cast());
            let scales = _mm_and_si128(packed, _mm_set1_epi8(0xF));
            let mins16 = _mm256_cvtepu8_epi16(_mm_srli_epi16::<4>(_mm_and_si128(packed, _mm_set1_epi8(0xF0u8 as i8))));
            let mut acc = [_mm256_setzero_si256(); C];
            for h in 0..2 {
                let mut qv = load(b.add(16 + 32 * h));
                for j in 0..4 {
                    let g = 4 * h + j;
                    let u = _mm256_and_si256(qv, low2);
                    let sc = pair_scales(scales, g);
                    for c in 0..C {
                        acc[c] = scaled_dot::<D>(acc[c], u, a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 32 * g), sc);
                    }
                    qv = _mm256_srli_epi16::<2>(qv);
                }
            }
            let (d, dmin) = (f16_at(b.add(80)), f16_at(b.add(82)));
            for c in 0..C {
                let (p, ad) = q8_k_block(a, c, i);
                let isum = hsum_i32(acc[c]);
                let summs = bsum_dot(p, mins16);
                let (dall, dmin) = (ad * d, ad * dmin);
                sumf[c] += dall * isum as f32 - dmin * summs as f32;
            }
        }
        *out = sumf;
    }
}

/// Q3_K (110-byte blocks): `u = q + 4` (2 low bits, high bit from `hmask`); per block
/// `d * ad * (sum(sc * u * a) - 4 * sum(sc * bsum))`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q3_k<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut sumf = [0.0f32; C];
        let (low2, one) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
        for i in 0..nb {
            let b = w.as_ptr().add(i * 110);
            let scales = q3_k_scales(b.add(96));
            let s16 = _mm256_cvtepi8_epi16(scales);
            let mut hm = load(b);
            let mut acc = [_mm256_setzero_si256(); C];
            for h in 0..2 {
                let mut qv = load(b.add(32 + 32 * h));
                for j in 0..4 {
                    let g = 4 * h + j;
                    let high = _mm256_slli_epi16::<2>(_mm256_and_si256(hm, one));
                    let u = _mm256_or_si256(_mm256_and_si256(qv, low2), high);
                    let sc = pair_scales(scales, g);
                    for c in 0..C {
                        acc[c] = scaled_dot::<D>(acc[c], u, a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 32 * g), sc);
                    }
                    qv = _mm256_srli_epi16::<2>(qv);
                    hm = _mm256_srli_epi16::<1>(hm);
                }
            }
            let d = f16_at(b.add(108));
            for c in 0..C {
                let (p, ad) = q8_k_block(a, c, i);
                let isum = hsum_i32(acc[c]) - 4 * bsum_dot(p, s16);
                sumf[c] += d * ad * isum as f32;
            }
        }
        *out = sumf;
    }
}

/// Q4_K (144-byte blocks): `u` is the nibble; per block `d * ad * isum - dmin * ad * summs`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q4_k<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut sumf = [0.0f32; C];
        let low4 = _mm256_set1_epi8(0xF);
        for i in 0..nb {
            let b = w.as_ptr().add(i * 144);
            let (scales, mins) = k4_scales_mins(&b.add(4).cast::<[u8; 12]>().read_unaligned());
            let mins16 = paired_mins(mins);
            let scales = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(scales)));
            let mut acc = [_mm256_setzero_si256(); C];
            for j in 0..4 {
                let q = load(b.add(16 + 32 * j));
                let lo = _mm256_and_si256(q, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                k4_group_pair::<D, C>(&mut acc, a, i, j, lo, hi, scales);
            }
            let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
            k4_finish(&mut sumf, a, i, &acc, mins16, d, dmin);
        }
        *out = sumf;
    }
}

/// Q5_K (176-byte blocks): `u` is the nibble plus 16 times the `qh` bit; as Q4_K otherwise.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q5_k<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut sumf = [0.0f32; C];
        let (low4, one) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(1));
        for i in 0..nb {
            let b = w.as_ptr().add(i * 176);
            let (scales, mins) = k4_scales_mins(&b.add(4).cast::<[u8; 12]>().read_unaligned());
            let mins16 = paired_mins(mins);
            let scales = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(scales)));
            let mut qh = load(b.add(16));
            let mut acc = [_mm256_setzero_si256(); C];
            for j in 0..4 {
                let q = load(b.add(48 + 32 * j));
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, one));
                let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(qh), one));
                let lo = _mm256_or_si256(_mm256_and_si256(q, low4), h0);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), low4), h1);
                k4_group_pair::<D, C>(&mut acc, a, i, j, lo, hi, scales);
                qh = _mm256_srli_epi16::<2>(qh);
            }
            let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
            k4_finish(&mut sumf, a, i, &acc, mins16, d, dmin);
        }
        *out = sumf;
    }
}

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

/// Accumulates sub-blocks `2j` (`lo`) and `2j + 1` (`hi`) of a Q4_K/Q5_K super-block `i`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
unsafe fn k4_group_pair<D: Dot, const C: usize>(
    acc: &mut [__m256i; C],
    a: &[&[u8]; C],
    i: usize,
    j: usize,
    lo: __m256i,
    hi: __m256i,
    scales: __m256i,
) {
    unsafe {
        let (s0, s1) = (lane_splat(scales, 2 * j), lane_splat(scales, 2 * j + 1));
        for c in 0..C {
            let p = a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 64 * j);
            acc[c] = scaled_dot::<D>(acc[c], lo, p, s0);
            acc[c] = scaled_dot::<D>(acc[c], hi, p.add(32), s1);
        }
    }
}

/// Adds super-block `i`'s `d * ad * isum - dmin * ad * summs` to every column (Q4_K, Q5_K).
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
unsafe fn k4_finish<const C: usize>(
    sumf: &mut [f32; C],
    a: &[&[u8]; C],
    i: usize,
    acc: &[__m256i; C],
    mins16: __m256i,
    d: f32,
    dmin: f32,
) {
    unsafe {
        for c in 0..C {
            let (p, ad) = q8_k_block(a, c, i);
            let isum = hsum_i32(acc[c]);
            let summs = bsum_dot(p, mins16);
            sumf[c] += d * ad * isum as f32 - dmin * ad * summs as f32;
        }
    }
}

/// Q6_K (210-byte blocks): `u = q + 32` (4 low bits from `ql`, 2 high bits from `qh`); per block
/// `d * ad * (sum(sc * u * a) - 32 * sum(sc * bsum))`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q6_k<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut sumf = [0.0f32; C];
        let (low4, high2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
        for i in 0..nb {
            let b = w.as_ptr().add(i * 210);
            let scales = _mm_loadu_si128(b.add(192).cast());
            let s16 = _mm256_cvtepi8_epi16(scales);
            let mut acc = [_mm256_setzero_si256(); C];
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
                    let sc = pair_scales(scales, g);
                    for c in 0..C {
                        acc[c] = scaled_dot::<D>(acc[c], u, a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 32 * g), sc);
                    }
                }
            }
            let d = f16_at(b.add(208));
            for c in 0..C {
                let (p, ad) = q8_k_block(a, c, i);
                let isum = hsum_i32(acc[c]) - 32 * bsum_dot(p, s16);
                sumf[c] += d * ad * isum as f32;
            }
        }
        *out = sumf;
    }
}
