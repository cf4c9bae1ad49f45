//! 512-bit VNNI kernels for Q4_0, Q5_0 and Q8_0 weights that take several weight rows per call
//! and prepare the Q8_0 activations once for all of them.
//!
//! Per step of four 32-element blocks (128 weights), both sides are split the same way: vector
//! `lo` holds elements `0..16` of each of the four blocks, `hi` elements `16..32` (Q4_0's low and
//! high nibbles fall out like this). The weights enter `vpdpbusd` unsigned, as `u = w + m` (`m` =
//! 8, 16, 128 for Q4_0, Q5_0, Q8_0), and each column's preparation holds `-m * (sum of its four
//! activation bytes)` per i32 lane as the accumulator's start, so `lo` and `hi` give each lane
//! `sum(w * a)` over its eight elements exactly, in two instructions per column and step. The
//! preparation also spreads each block's activation scale over its four lanes; a step adds
//! `(d_w * d_a) * isum` lane by lane, and a row's result is the sum of its sixteen lanes (then
//! the blocks past the last whole step, from [`super::wide`]'s single-row kernel).
//!
//! Integer sums are exact; the f32 summation order differs from the portable kernels and never
//! depends on the column count, the row count or a row's place in the call.

use std::arch::x86_64::*;

use super::prefetch_ahead;
use super::wide::{Q5_0, Q8_0, hsum16_f32, legacy_block_bytes, offset_shift, signed_pairs};

/// Blocks per step.
const STEP_BLOCKS: usize = 4;
/// Bytes of a Q8_0 activation block: f16 scale, 32 quants.
const Q8_0_BYTES: usize = 34;

/// One column's activations for one step, prepared.
#[repr(C, align(64))]
struct Prepared {
    /// Elements 0..16 of each of the four blocks.
    lo: __m512i,
    /// Elements 16..32 of each block.
    hi: __m512i,
    /// `-m * (sum of the lane's four bytes of lo and of hi)` per i32 lane.
    start: __m512i,
    /// Each block's scale in its four lanes.
    d: __m512,
}

/// Four 16-byte loads at `p + k * stride` as one vector.
///
/// # Safety
/// The four ranges readable; AVX-512 F.
#[inline(always)]
unsafe fn gather4(p: *const u8, stride: usize) -> __m512i {
    unsafe {
        let v = _mm512_castsi128_si512(_mm_loadu_si128(p.cast()));
        let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(p.add(stride).cast()));
        let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(p.add(2 * stride).cast()));
        _mm512_inserti32x4::<3>(v, _mm_loadu_si128(p.add(3 * stride).cast()))
    }
}

/// The four f16 scales at `p + k * stride` as f32, each in four consecutive lanes.
///
/// # Safety
/// The four pairs of bytes readable; AVX-512 F, F16C.
#[inline(always)]
unsafe fn scales4(p: *const u8, stride: usize) -> __m512 {
    unsafe {
        let h = |k: usize| u64::from(p.add(k * stride).cast::<u16>().read_unaligned()) << (16 * k);
        let d = _mm_cvtph_ps(_mm_cvtsi64_si128((h(0) | h(1) | h(2) | h(3)) as i64));
        _mm512_permutexvar_ps(
            _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
            _mm512_castps128_ps512(d),
        )
    }
}

/// The step of Q8_0 activation blocks at `p`, prepared for weights of type `TYPE`.
///
/// # Safety
/// Four blocks readable at `p`; AVX-512 F/BW/VNNI, F16C.
#[inline(always)]
unsafe fn prepare<const TYPE: u8>(p: *const u8) -> Prepared {
    unsafe {
        let (lo, hi) = (gather4(p.add(2), Q8_0_BYTES), gather4(p.add(18), Q8_0_BYTES));
        let ones = _mm512_set1_epi8(1);
        let sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, lo), ones, hi);
        let start = _mm512_sub_epi32(
            _mm512_setzero_si512(),
            _mm512_sll_epi32(sums, _mm_cvtsi32_si128(offset_shift(TYPE) as i32)),
        );
        Prepared { lo, hi, start, d: scales4(p, Q8_0_BYTES) }
    }
}

/// The step of weight blocks at `b`: unsigned `lo`, `hi` and the spread scales.
///
/// # Safety
/// Four blocks of `TYPE` readable at `b`; AVX-512 F/BW, F16C.
#[inline(always)]
unsafe fn unpack<const TYPE: u8>(b: *const u8) -> (__m512i, __m512i, __m512) {
    let bytes = legacy_block_bytes(TYPE);
    unsafe {
        let d = scales4(b, bytes);
        if TYPE == Q8_0 {
            let flip = _mm512_set1_epi8(i8::MIN);
            return (
                _mm512_xor_si512(gather4(b.add(2), bytes), flip),
                _mm512_xor_si512(gather4(b.add(18), bytes), flip),
                d,
            );
        }
        let qs_at = if TYPE == Q5_0 { 6 } else { 2 };
        let q = gather4(b.add(qs_at), bytes);
        let low4 = _mm512_set1_epi8(0xF);
        let (lo, hi) = (_mm512_and_si512(q, low4), _mm512_and_si512(_mm512_srli_epi16::<4>(q), low4));
        if TYPE == Q5_0 {
            // Bit i of a block's `qh` is the fifth bit of its element i: bits 0..16 mask `lo`,
            // bits 16..32 mask `hi`, block k at byte lanes 16k..16k + 16 of each.
            let (mut mlo, mut mhi) = (0u64, 0u64);
            for k in 0..STEP_BLOCKS {
                let qh = u64::from(b.add(k * bytes + 2).cast::<u32>().read_unaligned());
                mlo |= (qh & 0xFFFF) << (16 * k);
                mhi |= (qh >> 16) << (16 * k);
            }
            let sixteen = _mm512_set1_epi8(16);
            return (_mm512_mask_add_epi8(lo, mlo, lo, sixteen), _mm512_mask_add_epi8(hi, mhi, hi, sixteen), d);
        }
        (lo, hi, d)
    }
}

/// `out[r * C + c] = dot(row r, a[c])` for the `n_rows` rows of `nb` blocks of `TYPE` in `w`.
///
/// # Safety
/// `w` holds `n_rows` rows of `nb` blocks, every `a[c]` `nb` Q8_0 blocks, `out` `n_rows * C`
/// values; AVX-512 F/BW/VL/VNNI, F16C.
#[inline(always)]
pub(super) unsafe fn legacy_rows<const TYPE: u8, const C: usize>(
    w: &[u8],
    n_rows: usize,
    a: &[&[u8]; C],
    nb: usize,
    out: &mut [f32],
) {
    let bytes = legacy_block_bytes(TYPE);
    let steps = nb / STEP_BLOCKS;
    let whole = steps * STEP_BLOCKS;
    // Taken out of the thread-local rather than borrowed in a closure: a closure would not
    // inherit the caller's target features, and the intrinsics would not inline.
    let mut prepared = PREPARED.take();
    prepared.clear();
    unsafe {
        for col in a {
            for s in 0..steps {
                prepared.push(prepare::<TYPE>(col.as_ptr().add(s * STEP_BLOCKS * Q8_0_BYTES)));
            }
        }
        let tails: [&[u8]; C] = std::array::from_fn(|c| &a[c][whole * Q8_0_BYTES..]);
        for r in 0..n_rows {
            let row = &w[r * nb * bytes..(r + 1) * nb * bytes];
            let mut acc = [_mm512_setzero_ps(); C];
            for s in 0..steps {
                let step = row.as_ptr().add(s * STEP_BLOCKS * bytes);
                prefetch_ahead(step, STEP_BLOCKS * bytes);
                let (lo, hi, dw) = unpack::<TYPE>(step);
                for (c, acc) in acc.iter_mut().enumerate() {
                    let p = &prepared[c * steps + s];
                    let isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(p.start, lo, p.lo), hi, p.hi);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, p.d), *acc);
                }
            }
            let mut tail = [0.0f32; C];
            if whole < nb {
                signed_pairs::<TYPE, C>(&row[whole * bytes..], &tails, nb - whole, &mut tail);
            }
            for (c, acc) in acc.iter().enumerate() {
                out[r * C + c] = hsum16_f32(*acc) + tail[c];
            }
        }
    }
    PREPARED.set(prepared);
}

thread_local! {
    /// Each thread's prepared activations, reused from call to call (a call is one matmul work
    /// item, and the allocator is shared by all threads).
    static PREPARED: std::cell::RefCell<Vec<Prepared>> = const { std::cell::RefCell::new(Vec::new()) };
}
