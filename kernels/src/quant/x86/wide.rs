//! 512-bit AVX-512 VNNI kernels for the types that carry most of a Q4_K_M or Q3_K_S model's
//! bytes: Q3_K, Q4_K, Q6_K, and [`signed_pairs`] for the 32-element Q4_0, Q5_0, Q8_0 (the
//! `down` projections of 896-wide experts fall back to them), which `rows.rs` uses for the
//! blocks past its last whole four-block step. The other types use the 256-bit kernels.
//!
//! Same arithmetic as the 256-bit kernels (see the parent module), 64 weights per instruction:
//! integer sums are exact; the k-quants accumulate each super-block's scaled lanes, the
//! 32-element types `(d_w * d_a) * sum` for two blocks at a time, in sixteen f32 lanes summed
//! once per row (f32 summation order differs from the portable kernel, never with the column
//! count).

use std::arch::x86_64::*;

use super::super::kquants::k4_scales_mins;
use super::kquants::{Q8_K_BSUMS, Q8_K_BYTES, Q8_K_QS, paired_mins, q3_k_scales};
use super::{hsum_f32, load, prefetch_ahead};

/// Loads 64 bytes from `p`.
///
/// # Safety
/// `p..p + 64` readable; AVX-512 F.
#[inline(always)]
unsafe fn load512(p: *const u8) -> __m512i {
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// `acc + dot(u, a) * scales` lane by lane (sixteen i32 lanes, four weights each): `vpmaddubsw`
/// then `vpdpwssd` with `scales` as i16 pairs ([`spread_scales`]); exact, as the weights are at most 63
/// (`2 * 63 * 128` fits an i16), and two instructions where `vpdpbusd` needs a multiply and an
/// add more.
///
/// # Safety
/// `a..a + 64` readable; AVX-512 BW/VNNI.
#[inline(always)]
unsafe fn scaled_dot(acc: __m512i, u: __m512i, a: *const u8, scales: __m512i) -> __m512i {
    unsafe { _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(u, load512(a)), scales) }
}

/// `lo` in every i16 lane of the lower 256 bits, `hi` in the upper.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
pub(super) unsafe fn halves16(lo: i16, hi: i16) -> __m512i {
    unsafe { _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi)) }
}

/// `lo` in every byte of the lower 256 bits, `hi` in the upper.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
pub(super) unsafe fn halves8(lo: i8, hi: i8) -> __m512i {
    unsafe { _mm512_inserti64x4::<1>(_mm512_set1_epi8(lo), _mm256_set1_epi8(hi)) }
}

/// The index vector of [`spread_scales`] for the sub-blocks from `k0` on.
///
/// i16 lane `l` of the result of `vpermw(scale_index(k0, span), s)` is `s[k0 + l / span]`: with
/// `span = 8`, four sub-blocks of 16 weights (four i32 lanes each, both i16 halves of a lane the
/// same scale); with `span = 16`, two sub-blocks of 32 weights.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
unsafe fn scale_index(k0: usize, span: usize) -> __m512i {
    let lanes: [u16; 32] = std::array::from_fn(|l| (k0 + l / span) as u16);
    unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
}

/// The multipliers of [`scaled_dot`] for the 64 weights of one vector: each i32 lane's two i16
/// halves hold the i16 scale of the lane's sub-block, `index` from [`scale_index`] choosing
/// among the (up to 32) i16 scales of `s16`. One `vpermw`.
///
/// # Safety
/// AVX-512 BW.
#[inline(always)]
unsafe fn spread_scales(index: __m512i, s16: __m512i) -> __m512i {
    unsafe { _mm512_permutexvar_epi16(index, s16) }
}

/// Per-column f32 accumulators of the k-quant kernels, sixteen lanes each: per super-block
/// `(d * a.d) * isum` of its integer lanes (converted, no horizontal sum per block), less the
/// block-sum term `sum(bsums * m)` of the weights' offset in the lower eight lanes. One register
/// per column, so eight columns of integer and f32 accumulators fit AVX-512's 32 registers beside
/// the unpacked weights.
struct KAcc<const C: usize> {
    main: [__m512; C],
}

impl<const C: usize> KAcc<C> {
    /// Zero accumulators.
    ///
    /// # Safety
    /// AVX-512 F.
    #[inline(always)]
    unsafe fn new() -> Self {
        unsafe { KAcc { main: [_mm512_setzero_ps(); C] } }
    }

    /// Adds super-block `i` of a type whose weights are `d * scale * (u - 2^SHIFT)` (Q3_K: 2,
    /// Q6_K: 5): `acc[c]` its integer lanes `sum(scale * u * a)` per column, `m16` the sixteen
    /// i16 scales, `d` the block's scale in every lane. The offset term `2^SHIFT * sum(bsums *
    /// scales)` is subtracted in integers, so each block adds one rounded product.
    ///
    /// # Safety
    /// Every `a[c]` holds more than `i` Q8_K blocks; AVX-512 F/BW/VL.
    #[inline(always)]
    unsafe fn add_offset<const SHIFT: u32>(
        &mut self,
        a: &[&[u8]; C],
        i: usize,
        acc: &[__m512i; C],
        m16: __m256i,
        d: __m512,
    ) {
        unsafe {
            for c in 0..C {
                let p = a[c].as_ptr().add(i * Q8_K_BYTES);
                let ad = _mm512_set1_ps(p.cast::<f32>().read_unaligned());
                let side =
                    _mm256_sll_epi32(_mm256_madd_epi16(load(p.add(Q8_K_BSUMS)), m16), _mm_cvtsi32_si128(SHIFT as i32));
                let isum = _mm512_sub_epi32(acc[c], _mm512_zextsi256_si512(side));
                self.main[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, ad), self.main[c]);
            }
        }
    }

    /// Adds super-block `i` of Q4_K (weights `d * scale * u - dmin * min`): `acc[c]` its integer
    /// lanes per column, `m16` the sixteen i16 mins, `d` and `dmin` in every lane.
    ///
    /// # Safety
    /// Every `a[c]` holds more than `i` Q8_K blocks; AVX-512 F/BW/VL.
    #[inline(always)]
    unsafe fn add_min(&mut self, a: &[&[u8]; C], i: usize, acc: &[__m512i; C], m16: __m256i, d: __m512, dmin: __m512) {
        unsafe {
            for c in 0..C {
                let p = a[c].as_ptr().add(i * Q8_K_BYTES);
                let ad = _mm512_set1_ps(p.cast::<f32>().read_unaligned());
                let side = _mm512_zextps256_ps512(_mm256_cvtepi32_ps(_mm256_madd_epi16(load(p.add(Q8_K_BSUMS)), m16)));
                let main = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[c]), _mm512_mul_ps(d, ad), self.main[c]);
                self.main[c] = _mm512_fnmadd_ps(side, _mm512_mul_ps(dmin, ad), main);
            }
        }
    }

    /// The row's results.
    ///
    /// # Safety
    /// AVX-512 F.
    #[inline(always)]
    unsafe fn finish(&self, out: &mut [f32; C]) {
        unsafe {
            for (o, &main) in out.iter_mut().zip(&self.main) {
                *o = hsum16_f32(main);
            }
        }
    }
}

/// Sum of the sixteen f32 lanes in a fixed order (`_mm512_reduce_add_ps` lets LLVM reassociate,
/// so its rounding could change with the surrounding code, e.g. the column count).
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
pub(super) unsafe fn hsum16_f32(v: __m512) -> f32 {
    unsafe {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        hsum_f32(_mm256_add_ps(_mm512_castps512_ps256(v), hi))
    }
}

/// The f16 `bits` as f32 in all sixteen lanes (a vector conversion: no false dependency).
///
/// # Safety
/// AVX-512 F, F16C.
#[inline(always)]
unsafe fn f16_splat16(p: *const u8) -> __m512 {
    unsafe { _mm512_cvtph_ps(_mm256_set1_epi16(p.cast::<i16>().read_unaligned())) }
}

/// Q4_K: per 32-byte chunk `j` of quants, one vector of its 32 low nibbles (sub-block `2j`)
/// then its 32 high nibbles (sub-block `2j + 1`), against the 64 contiguous activations.
///
/// # Safety
/// See `RawKernel` in the parent module; AVX-512 F/BW/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn q4_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = KAcc::<C>::new();
        let low4 = _mm512_set1_epi8(0xF);
        // Chunk j's low nibbles are sub-block 2j, its high nibbles 2j + 1.
        let index: [__m512i; 4] = [scale_index(0, 16), scale_index(2, 16), scale_index(4, 16), scale_index(6, 16)];
        for i in 0..nb {
            let b = w.as_ptr().add(i * 144);
            prefetch_ahead(b, 144);
            let (scales, mins) = k4_scales_mins(&b.add(4).cast::<[u8; 12]>().read_unaligned());
            let mins16 = paired_mins(mins);
            let s16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(i64::from_le_bytes(scales))));
            let mut acc = [_mm512_setzero_si512(); C];
            for (j, &index) in index.iter().enumerate() {
                let q = load(b.add(16 + 32 * j));
                let u = _mm512_and_si512(
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<4>(q)),
                    low4,
                );
                let sc = spread_scales(index, s16);
                for c in 0..C {
                    acc[c] = scaled_dot(acc[c], u, a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 64 * j), sc);
                }
            }
            total.add_min(a, i, &acc, mins16, f16_splat16(b), f16_splat16(b.add(2)));
        }
        total.finish(out);
    }
}

/// Q6_K: per 128-weight half, the 64 bytes of `ql` give groups 0|1 (low nibbles) and 2|3
/// (high nibbles); `qh` is repeated in both 256-bit halves and shifted per half.
///
/// # Safety
/// See `RawKernel` in the parent module; AVX-512 F/BW/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn q6_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = KAcc::<C>::new();
        let (low4, high2) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(0x30));
        // Per 256-bit half: groups 0 | 1 take qh bits 0-1 | 2-3 up to bits 4-5 (<< 4 | << 2);
        // groups 2 | 3 take bits 4-5 | 6-7 (>> 0 | >> 2).
        let up = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
        let down = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
        // Vector g of a half (g = 0: groups 0|1, g = 1: groups 2|3) covers sub-blocks 8h + 4g..+4.
        let index: [__m512i; 4] = [scale_index(0, 8), scale_index(4, 8), scale_index(8, 8), scale_index(12, 8)];
        for i in 0..nb {
            let b = w.as_ptr().add(i * 210);
            prefetch_ahead(b, 210);
            let scales = _mm_loadu_si128(b.add(192).cast());
            let s16 = _mm256_cvtepi8_epi16(scales);
            let s16x = _mm512_castsi256_si512(s16);
            let mut acc = [_mm512_setzero_si512(); C];
            for h in 0..2 {
                let ql = load512(b.add(64 * h));
                let qh = _mm512_broadcast_i64x4(load(b.add(128 + 32 * h)));
                let g01 =
                    _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_and_si512(_mm512_sllv_epi16(qh, up), high2));
                let g23 = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                    _mm512_and_si512(_mm512_srlv_epi16(qh, down), high2),
                );
                let (s01, s23) = (spread_scales(index[2 * h], s16x), spread_scales(index[2 * h + 1], s16x));
                for c in 0..C {
                    let p = a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 128 * h);
                    acc[c] = scaled_dot(acc[c], g01, p, s01);
                    acc[c] = scaled_dot(acc[c], g23, p.add(64), s23);
                }
            }
            total.add_offset::<5>(a, i, &acc, s16, f16_splat16(b.add(208)));
        }
        total.finish(out);
    }
}

/// `[f16 at p0, f16 bits h1, 0, 0]` as f32 (`vcvtph2ps` on a vector fully written first, so no
/// false dependency).
///
/// # Safety
/// `p0..p0 + 2` readable; F16C.
#[inline(always)]
unsafe fn f16_pair(p0: *const u8, h1: u16) -> __m128 {
    unsafe {
        let h0 = p0.cast::<u16>().read_unaligned();
        _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h0) | i32::from(h1) << 16))
    }
}

/// [`signed_pairs`] on Q4_0 blocks: `d`, 16 bytes of nibbles; `w = q - 8`.
pub(super) const Q4_0: u8 = 0;
/// [`signed_pairs`] on Q5_0 blocks: `d`, `qh`, 16 bytes of nibbles; `w = q - 16`.
pub(super) const Q5_0: u8 = 1;
/// [`signed_pairs`] on Q8_0 blocks: `d`, 32 signed quants.
pub(super) const Q8_0: u8 = 2;

/// Bytes of a block of the 32-element type `ty` (one of the tags above).
pub(super) const fn legacy_block_bytes(ty: u8) -> usize {
    match ty {
        Q4_0 => 18,
        Q5_0 => 22,
        _ => 34,
    }
}

/// `log2(m)` of the 32-element type `ty`: its weights made non-negative are `w + m`.
pub(super) const fn offset_shift(ty: u8) -> u32 {
    match ty {
        Q4_0 => 3,
        Q5_0 => 4,
        _ => 7,
    }
}

/// Q4_0, Q5_0 or Q8_0 weights (`TYPE`) with Q8_0 activations, two blocks per step (the last one
/// alone when `nb` is odd, its upper half zero). `w` enters `vpdpbusd` as `|w|`, the activations
/// negated where `w < 0`.
///
/// # Safety
/// See `RawKernel` in the parent module; AVX-512 F/BW/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn signed_pairs<const TYPE: u8, const C: usize>(
    w: &[u8],
    a: &[&[u8]; C],
    nb: usize,
    out: &mut [f32; C],
) {
    let (bytes, qs_at, offset) = match TYPE {
        Q4_0 => (18, 2, 8),
        Q5_0 => (22, 6, 16),
        _ => (34, 2, 0),
    };
    unsafe {
        let mut acc = [_mm512_setzero_ps(); C];
        let (low4, sixteen, offset) = (_mm256_set1_epi8(0xF), _mm512_set1_epi8(16), _mm512_set1_epi8(offset));
        // Lanes 0..8 take f32 lane 0, lanes 8..16 lane 1.
        let halves = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi32(1));
        for i in (0..nb).step_by(2) {
            let two = i + 1 < nb;
            let b0 = w.as_ptr().add(i * bytes);
            let b1 = b0.add(bytes);
            let d1 = if two { b1.cast::<u16>().read_unaligned() } else { 0 };
            let q = if TYPE == Q8_0 {
                let q1 = if two { load(b1.add(qs_at)) } else { _mm256_setzero_si256() };
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(b0.add(qs_at))), q1)
            } else {
                let qs0 = _mm_loadu_si128(b0.add(qs_at).cast());
                let qs1 = if two { _mm_loadu_si128(b1.add(qs_at).cast()) } else { _mm_setzero_si128() };
                let qs = _mm256_set_m128i(qs1, qs0);
                let lo = _mm256_and_si256(qs, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(qs), low4);
                // [lo0, lo1, hi0, hi1] -> [lo0, hi0, lo1, hi1]: elements 0..32 of each block.
                let nibbles = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                let q = _mm512_shuffle_i64x2::<0b11_01_10_00>(nibbles, nibbles);
                if TYPE == Q5_0 {
                    let qh1 = if two { b1.add(2).cast::<u32>().read_unaligned() } else { 0 };
                    let qh = u64::from(b0.add(2).cast::<u32>().read_unaligned()) | u64::from(qh1) << 32;
                    _mm512_mask_blend_epi8(qh, q, _mm512_or_si512(q, sixteen))
                } else {
                    q
                }
            };
            let q = _mm512_sub_epi8(q, offset);
            let u = _mm512_abs_epi8(q);
            let negative = _mm512_movepi8_mask(q);
            let dw = f16_pair(b0, d1);
            for c in 0..C {
                let p0 = a[c].as_ptr().add(i * 34);
                let (a1, da1) = match two {
                    true => (load(p0.add(36)), p0.add(34).cast::<u16>().read_unaligned()),
                    false => (_mm256_setzero_si256(), 0),
                };
                let av = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(p0.add(2))), a1);
                let s = _mm512_mask_sub_epi8(av, negative, _mm512_setzero_si512(), av);
                let sum = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s));
                let d = _mm_mul_ps(dw, f16_pair(p0, da1));
                acc[c] = _mm512_fmadd_ps(_mm512_permutexvar_ps(halves, _mm512_castps128_ps512(d)), sum, acc[c]);
            }
        }
        for c in 0..C {
            out[c] = hsum16_f32(acc[c]);
        }
    }
}

/// Q3_K: per 128-weight half, groups `j | j + 1` (`j` = 0, 2) in one vector: the 32 bytes of
/// `qs` and of `hmask` repeated in both 256-bit halves, shifted per half; `u = q + 4`.
///
/// # Safety
/// See `RawKernel` in the parent module; AVX-512 F/BW/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn q3_k<const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe {
        let mut total = KAcc::<C>::new();
        let (low2, four) = (_mm512_set1_epi8(3), _mm512_set1_epi8(4));
        // Shift counts (in 16-bit lanes) of `qs` in the lower and upper 256-bit half.
        let qs_shifts = [halves16(0, 2), halves16(4, 6)];
        // The `hmask` bit of each half's group, tested byte by byte.
        let hm_bits = [[halves8(1, 2), halves8(4, 8)], [halves8(16, 32), halves8(64, -128)]];
        // Vector `pair` of half h covers sub-blocks 8h + 4 * pair..+4.
        let index: [__m512i; 4] = [scale_index(0, 8), scale_index(4, 8), scale_index(8, 8), scale_index(12, 8)];
        for i in 0..nb {
            let b = w.as_ptr().add(i * 110);
            prefetch_ahead(b, 110);
            let scales = q3_k_scales(b.add(96));
            let s16 = _mm256_cvtepi8_epi16(scales);
            let s16x = _mm512_castsi256_si512(s16);
            let hm = _mm512_broadcast_i64x4(load(b));
            let mut acc = [_mm512_setzero_si512(); C];
            for (h, hm_half) in hm_bits.iter().enumerate() {
                let qs = _mm512_broadcast_i64x4(load(b.add(32 + 32 * h)));
                for (pair, (&qs_shift, &hm_bit)) in qs_shifts.iter().zip(hm_half).enumerate() {
                    let low = _mm512_and_si512(_mm512_srlv_epi16(qs, qs_shift), low2);
                    let u = _mm512_mask_add_epi8(low, _mm512_test_epi8_mask(hm, hm_bit), low, four);
                    let sc = spread_scales(index[2 * h + pair], s16x);
                    for c in 0..C {
                        let p = a[c].as_ptr().add(i * Q8_K_BYTES + Q8_K_QS + 128 * h + 64 * pair);
                        acc[c] = scaled_dot(acc[c], u, p, sc);
                    }
                }
            }
            total.add_offset::<2>(a, i, &acc, s16, f16_splat16(b.add(108)));
        }
        total.finish(out);
    }
}
