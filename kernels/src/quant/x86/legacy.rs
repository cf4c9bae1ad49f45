//! Legacy 32-element block kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 weights with Q8_0 / Q8_1
//! activations) on 256-bit vectors; see the parent module.
//!
//! Block layouts are those documented in `quant/legacy.rs`. Per block and column, the exact
//! integer sum (eight i32 lanes of `dpbusd`) is converted to f32 and accumulated as
//! `acc += (d_w * d_a) * sum` in eight lanes, summed across lanes at the end of the row, as
//! ggml's AVX2 kernels do. Q4_0, Q5_0 and Q8_0 (Q8_0 activations) take `rows_avx2.rs` on AVX2
//! and `rows.rs` on AVX-512 VNNI, which prepare the activations once per call for all rows.

use std::arch::x86_64::*;

use super::wide::{Q4_0, Q5_0, Q8_0, offset_shift};
use super::{Dot, f16_at, f16_splat, hsum_f32, load, prefetch_ahead};

/// Bytes of a `block_q8_0` (`d` at 0, quants at 2) and a `block_q8_1` (`d`, `s`, quants at 4).
pub(super) const Q8_0_BYTES: usize = 34;
const Q8_1_BYTES: usize = 36;

/// The 32 nibbles of the 16 bytes at `p` in element order (low nibbles, then high nibbles).
///
/// # Safety
/// `p..p + 16` readable; AVX2.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    unsafe {
        let qs = _mm_loadu_si128(p.cast());
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs), _mm256_set1_epi8(0xF))
    }
}

/// The 5-bit quants of a Q5 block: nibbles at `qs`, high bits in the little-endian u32 at `qh`.
///
/// # Safety
/// `qs..qs + 16` and `qh..qh + 4` readable; the CPU supports `D`.
#[inline(always)]
unsafe fn five_bit<D: Dot>(qh: *const u8, qs: *const u8) -> __m256i {
    unsafe { _mm256_or_si256(nibbles(qs), D::bits_to_bytes(qh.cast::<u32>().read_unaligned(), 0x10)) }
}

/// Blocks per software prefetch of the legacy kernels (one request per line of these blocks).
const PREFETCH_BLOCKS: usize = 4;

/// The 32 quants of the `TYPE` block at `b` (a `wide` type tag) made non-negative, `w + m`
/// ([`offset_shift`]): Q4_0 and Q5_0 as coded, Q8_0 with its sign bit flipped.
///
/// # Safety
/// A block of `TYPE` readable at `b`; the CPU supports `D`.
#[inline(always)]
pub(super) unsafe fn unsigned_weights<D: Dot, const TYPE: u8>(b: *const u8) -> __m256i {
    unsafe {
        match TYPE {
            Q4_0 => nibbles(b.add(2)),
            Q5_0 => five_bit::<D>(b.add(2), b.add(6)),
            _ => _mm256_xor_si256(load(b.add(2)), _mm256_set1_epi8(i8::MIN)),
        }
    }
}

/// The 32 signed quants of the `TYPE` block at `b` (a `wide` type tag): Q4_0 `q - 8`, Q5_0
/// `q - 16`, Q8_0 as stored.
///
/// # Safety
/// A block of `TYPE` readable at `b`; the CPU supports `D`.
#[inline(always)]
pub(super) unsafe fn signed_weights<D: Dot, const TYPE: u8>(b: *const u8) -> __m256i {
    unsafe {
        match TYPE {
            Q8_0 => load(b.add(2)),
            _ => _mm256_sub_epi8(unsigned_weights::<D, TYPE>(b), _mm256_set1_epi8(1 << offset_shift(TYPE))),
        }
    }
}

/// Shared loop of the kernels with Q8_1 activations and unsigned weights plus a min:
/// `weights(block)` gives the 32 quants; `d` is at 0 and `m` at 2 of the block.
///
/// # Safety
/// See `RawKernel` in the parent module; `weights` reads only inside its block.
#[inline(always)]
unsafe fn affine_q8_1<D: Dot, const C: usize>(
    w: &[u8],
    a: &[&[u8]; C],
    nb: usize,
    out: &mut [f32; C],
    block_bytes: usize,
    weights: impl Fn(*const u8) -> __m256i,
) {
    unsafe {
        let mut acc = [_mm256_setzero_ps(); C];
        let mut summ = [0.0f32; C];
        for i in 0..nb {
            let b = w.as_ptr().add(i * block_bytes);
            if i % PREFETCH_BLOCKS == 0 {
                prefetch_ahead(b, PREFETCH_BLOCKS * block_bytes);
            }
            let u = weights(b);
            let (dw, m) = (f16_splat(b), f16_at(b.add(2)));
            for c in 0..C {
                let p = a[c].as_ptr().add(i * Q8_1_BYTES);
                let sum = _mm256_cvtepi32_ps(D::dpbusd(_mm256_setzero_si256(), u, load(p.add(4))));
                acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, f16_splat(p)), sum, acc[c]);
                summ[c] += m * f16_at(p.add(2));
            }
        }
        for c in 0..C {
            out[c] = hsum_f32(acc[c]) + summ[c];
        }
    }
}

/// Q4_1 (20 bytes: `d`, `m`, 16 bytes of nibbles) with Q8_1: `d_w d_a sum(q a) + m s_a`.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q4_1<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe { affine_q8_1::<D, C>(w, a, nb, out, 20, |b| nibbles(b.add(4))) }
}

/// Q5_1 (24 bytes: `d`, `m`, `qh`, 16 bytes of nibbles) with Q8_1.
///
/// # Safety
/// See `RawKernel` in the parent module.
#[inline(always)]
pub(super) unsafe fn q5_1<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut [f32; C]) {
    unsafe { affine_q8_1::<D, C>(w, a, nb, out, 24, |b| five_bit::<D>(b.add(4), b.add(8))) }
}
