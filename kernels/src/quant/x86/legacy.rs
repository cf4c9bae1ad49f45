//! Legacy 32-element block kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 weights with Q8_0 / Q8_1
//! activations) on 256-bit vectors; see the parent module.
//!
//! Block layouts are those documented in `quant/legacy.rs`. Per block and column, the exact
//! integer sum (eight i32 lanes of `dpbusd`) is converted to f32 and accumulated as
//! `acc += (d_w * d_a) * sum` in eight lanes, summed across lanes at the end of the row, as
//! ggml's AVX2 kernels do. Q4_0, Q5_0 and Q8_0 (Q8_0 activations) on AVX2 take
//! [`prepared_rows`], which prepares the activations once per call for all its rows; the
//! AVX-512 VNNI build takes them in `rows.rs`.

use std::arch::x86_64::*;
use std::cell::Cell;

use super::wide::{Q4_0, Q5_0, Q8_0, legacy_block_bytes, offset_shift};
use super::{Avx2, Dot, f16_at, f16_splat, hsum_f32, load, prefetch_ahead};

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

/// The weights of the `TYPE` block at `b` as [`prepared_rows`] gives them to `vpmaddubsw`: Q8_0's
/// signed quants (made `|w|` in [`prepared_block`]), Q4_0's and Q5_0's unsigned codes.
///
/// # Safety
/// A block of `TYPE` readable at `b`; AVX2.
#[inline(always)]
unsafe fn prepared_weights<const TYPE: u8>(b: *const u8) -> __m256i {
    unsafe {
        match TYPE {
            Q8_0 => load(b.add(2)),
            _ => unsigned_weights::<Avx2, TYPE>(b),
        }
    }
}

/// One block and column of [`prepared_rows`]: `sum(q * a)` in f32 lanes and `d_w * d_a`, for the
/// block's weights `q` ([`prepared_weights`]) and scale `dw` (every lane), the Q8_0 activation
/// block at `p`, and entry `k` of the prepared `offsets` (Q4_0, Q5_0; empty for Q8_0) and
/// `scales`.
///
/// # Safety
/// `p..p + 34` readable; AVX2.
#[inline(always)]
unsafe fn prepared_block<const TYPE: u8>(
    p: *const u8,
    q: __m256i,
    dw: __m256,
    offsets: &[__m256i],
    scales: &[f32],
    k: usize,
) -> (__m256, __m256) {
    unsafe {
        let act = load(p.add(2));
        let pairs = match TYPE {
            Q8_0 => _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(act, q)),
            _ => _mm256_sub_epi16(_mm256_maddubs_epi16(q, act), offsets[k]),
        };
        let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        (sum, _mm256_mul_ps(dw, _mm256_set1_ps(scales[k])))
    }
}

thread_local! {
    /// Each thread's columns prepared by [`prepared_rows`]: per column and block, the activation
    /// scale as f32 and (Q4_0, Q5_0) `vpmaddubsw` of the weights' offset with the activations.
    static PREPARED_COLUMNS: Cell<(Vec<f32>, Vec<__m256i>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

/// `out[r * C + c] = dot(row r, a[c])` for `n_rows` rows of `nb` Q4_0, Q5_0 or Q8_0 blocks
/// (`TYPE`, a `wide` type tag) and Q8_0 activations, on AVX2; the activations' parts that do not
/// depend on the weights are prepared once per call for every column and block, then read by
/// every row.
///
/// The i16 pairs of `vpmaddubsw` are `q0 a0 + q1 a1` for every type. Q8_0's signed weights
/// enter as `|w|` with the activation's sign flipped where `w < 0`. Q4_0 and Q5_0 enter as their
/// unsigned codes `u = q + m` (`m` = 8 or 16, [`offset_shift`]), and the offset comes off each
/// pair through the prepared `vpmaddubsw(m, a)`: `u0 a0 + u1 a1 - m (a0 + a1)` (all within i16:
/// `|u a| <= 31 * 128`), the same pair as the sign trick's with three operations fewer per
/// block. Per block and column, the eight i32 lanes of the pairs summed by `vpmaddwd` are
/// converted to f32 and accumulated as `acc += (d_w * d_a) * sum`, two blocks per step, summed
/// across lanes at the end of the row.
///
/// # Safety
/// `n_rows >= 1`; `w` holds `n_rows` rows of `nb` blocks, every `a[c]` `nb` Q8_0 blocks, `out`
/// `n_rows * C` values; AVX2, FMA, F16C.
#[inline(always)]
pub(super) unsafe fn prepared_rows<const TYPE: u8, const C: usize>(
    w: &[u8],
    n_rows: usize,
    a: &[&[u8]; C],
    nb: usize,
    out: &mut [f32],
) {
    let block_bytes = legacy_block_bytes(TYPE);
    let (mut scales, mut offsets) = PREPARED_COLUMNS.take();
    scales.clear();
    offsets.clear();
    unsafe {
        let m = _mm256_set1_epi8(1 << offset_shift(TYPE));
        for col in a {
            for i in 0..nb {
                let p = col.as_ptr().add(i * Q8_0_BYTES);
                scales.push(f16_at(p));
                if TYPE != Q8_0 {
                    offsets.push(_mm256_maddubs_epi16(m, load(p.add(2))));
                }
            }
        }
        for (row, out) in w.chunks_exact(nb * block_bytes).take(n_rows).zip(out.chunks_exact_mut(C)) {
            let mut acc = [_mm256_setzero_ps(); C];
            // Two blocks per step, added to the accumulator as one fused pair: one dependent add
            // per two blocks.
            for i in (0..nb - nb % 2).step_by(2) {
                let (b0, b1) = (row.as_ptr().add(i * block_bytes), row.as_ptr().add((i + 1) * block_bytes));
                if i % PREFETCH_BLOCKS == 0 {
                    prefetch_ahead(b0, PREFETCH_BLOCKS * block_bytes);
                }
                let (q0, q1) = (prepared_weights::<TYPE>(b0), prepared_weights::<TYPE>(b1));
                let (dw0, dw1) = (f16_splat(b0), f16_splat(b1));
                for (c, acc) in acc.iter_mut().enumerate() {
                    let (p, k) = (a[c].as_ptr().add(i * Q8_0_BYTES), c * nb + i);
                    let (s0, d0) = prepared_block::<TYPE>(p, q0, dw0, &offsets, &scales, k);
                    let (s1, d1) = prepared_block::<TYPE>(p.add(Q8_0_BYTES), q1, dw1, &offsets, &scales, k + 1);
                    *acc = _mm256_add_ps(*acc, _mm256_fmadd_ps(s1, d1, _mm256_mul_ps(s0, d0)));
                }
            }
            if nb % 2 == 1 {
                let i = nb - 1;
                let b = row.as_ptr().add(i * block_bytes);
                let (q, dw) = (prepared_weights::<TYPE>(b), f16_splat(b));
                for (c, acc) in acc.iter_mut().enumerate() {
                    let (p, k) = (a[c].as_ptr().add(i * Q8_0_BYTES), c * nb + i);
                    let (s, d) = prepared_block::<TYPE>(p, q, dw, &offsets, &scales, k);
                    *acc = _mm256_fmadd_ps(s, d, *acc);
                }
            }
            for c in 0..C {
                out[c] = hsum_f32(acc[c]);
            }
        }
    }
    PREPARED_COLUMNS.set((scales, offsets));
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
