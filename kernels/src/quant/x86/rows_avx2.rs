//! Q4_0, Q5_0 and Q8_0 weights with Q8_0 activations on AVX2, several weight rows per call: the
//! GEMV of single-token decoding's `ffn_down_exps` (the 896-wide rows that llama-quantize's
//! k-quant presets demote to these types) and the GEMM of batches under the lanes kernels'
//! minimum.
//!
//! A step covers eight 32-element blocks, and ends in one vector of their eight exact integer
//! sums: the step adds `f32(isum) * (d_w * d_a)` lane by lane, one conversion, one multiply and
//! one FMA per eight blocks where ggml's AVX2 `ggml_vec_dot_q4_0_q8_0` spends them per block. The
//! weights' eight f16 scales enter as one vector, gathered by scalar loads.
//!
//! - Q4_0 and Q5_0 go by pairs of blocks, both sides laid out alike: vector `lo` holds elements
//!   `0..16` of the two blocks (the first block in the lower 128 bits), `hi` elements `16..32`,
//!   so the low and high nibbles are `lo` and `hi` as they stand. The weights enter
//!   `vpmaddubsw` as their unsigned codes `u = q + m` (`m` = 8, 16: [`offset_shift`]), `lo`'s
//!   and `hi`'s i16 pairs are added, and `vpmaddwd` by ones gives each block's `sum(u * a)` in
//!   four i32 lanes; three `vphaddd` fold the four pair vectors into the eight sums (lanes in
//!   block order 0, 2, 4, 6, 1, 3, 5, 7), and the prepared `-m * sum(a)` of each block removes
//!   the offset.
//! - Q8_0 goes block by block in element order: `vpmaddubsw(|w|, a * sign(w))` and `vpmaddwd`
//!   by ones give a block's sum in eight lanes; a blend and a cross-half permute add each pair
//!   of blocks into the pair vector above, folded the same way (`vphaddd` is slow on Zen 3:
//!   folding the eight block vectors by it alone measured 15% slower).
//!
//! The activations are prepared once per call for every row: per column and step `d_a` (and for
//! Q4_0 and Q5_0 the offsets) in the step's lane order, and for Q4_0 and Q5_0 each pair's `lo`
//! and `hi`.
//!
//! Exactness: each block's integer sum is exact (within i16 at every `vpmaddubsw` pair: Q4_0 and
//! Q5_0 at most `2 * 2 * 31 * 128` after adding `lo`'s and `hi`'s pairs, Q8_0 `2 * 127 * 128`)
//! and converts to f32 exactly (at most `32 * 127 * 128`, below 2^24); the f32 products and lane
//! sums round in an order fixed per column, whatever the column or row count.

use std::arch::x86_64::*;
use std::cell::Cell;

use super::legacy::Q8_0_BYTES;
use super::wide::{Q5_0, Q8_0, legacy_block_bytes, offset_shift};
use super::{Avx2, Dot, hsum_f32, load, prefetch_ahead};

/// Blocks per step: one vector of block sums.
const STEP_BLOCKS: usize = 8;
/// Pairs of blocks per step (Q4_0, Q5_0).
const STEP_PAIRS: usize = STEP_BLOCKS / 2;

/// One column's Q4_0/Q5_0 activations of a pair of blocks, laid out as the weights
/// ([`pair_weights`]).
#[derive(Clone, Copy)]
struct Pair {
    /// Elements `0..16` of the first block, then of the second.
    lo: __m256i,
    /// Elements `16..32` of the first block, then of the second.
    hi: __m256i,
}

/// One column's constants of a step, in the step's lane order ([`lane_of`]).
#[derive(Clone, Copy)]
struct Step {
    /// `-m * sum(a)` of each block (zero for Q8_0 weights, which enter signed).
    start: __m256i,
    /// Each block's `d_a`.
    d: __m256,
}

/// A call's activation columns, prepared.
#[derive(Default)]
struct Columns {
    /// `[column][pair]` (Q4_0, Q5_0; empty for Q8_0); a lone last block's pair has a zero
    /// second half.
    pairs: Vec<Pair>,
    /// `[column][step]`; a last partial step has zeros past its blocks.
    steps: Vec<Step>,
}

thread_local! {
    /// Each thread's prepared columns, reused from call to call (a call is one matmul work item).
    static COLUMNS: Cell<Columns> = Cell::new(Columns::default());
}

/// The lane of a step's block `k` in its vector of block sums: the order that pair vectors fold
/// to ([`fold_pairs`]: blocks 0, 2, 4, 6, 1, 3, 5, 7).
const fn lane_of(k: usize) -> usize {
    (k % 2) * 4 + k / 2
}

/// Bytes `at..at + 16` of the block at `b` and, when `two`, of the next one `stride` bytes on,
/// as one vector (the first block in the lower half; the upper half zero without a second).
///
/// # Safety
/// The ranges read are readable; AVX2.
#[inline(always)]
unsafe fn halves(b: *const u8, stride: usize, at: usize, two: bool) -> __m256i {
    unsafe {
        let first = _mm_loadu_si128(b.add(at).cast());
        let second = if two { _mm_loadu_si128(b.add(stride + at).cast()) } else { _mm_setzero_si128() };
        _mm256_set_m128i(second, first)
    }
}

/// The f16 scales at the start of the `blocks` (at most eight) blocks at `b`, `stride` bytes
/// apart, as f32 in the step's lane order ([`lane_of`]); zero past `blocks`.
///
/// # Safety
/// Two bytes readable at each block; AVX2, F16C.
#[inline(always)]
unsafe fn step_scales(b: *const u8, stride: usize, blocks: usize) -> __m256 {
    unsafe {
        let mut lanes = [0u64; 2];
        for k in 0..blocks {
            let lane = lane_of(k);
            lanes[lane / 4] |= u64::from(b.add(k * stride).cast::<u16>().read_unaligned()) << (16 * (lane % 4));
        }
        _mm256_cvtph_ps(_mm_set_epi64x(lanes[1] as i64, lanes[0] as i64))
    }
}

/// The Q4_0 or Q5_0 (`TYPE`) weights of the block at `b` and, when `two`, of the next one, as
/// their unsigned codes `u = q + m` laid out as a [`Pair`].
///
/// # Safety
/// The blocks readable; AVX2.
#[inline(always)]
unsafe fn pair_weights<const TYPE: u8>(b: *const u8, two: bool) -> Pair {
    let bytes = legacy_block_bytes(TYPE);
    unsafe {
        let qs = halves(b, bytes, if TYPE == Q5_0 { 6 } else { 2 }, two);
        let low4 = _mm256_set1_epi8(0xF);
        let (lo, hi) = (_mm256_and_si256(qs, low4), _mm256_and_si256(_mm256_srli_epi16::<4>(qs), low4));
        if TYPE != Q5_0 {
            return Pair { lo, hi };
        }
        // Bit i of a block's `qh` is the fifth bit of its element i.
        let qh0 = b.add(2).cast::<u32>().read_unaligned();
        let qh1 = if two { b.add(bytes + 2).cast::<u32>().read_unaligned() } else { 0 };
        Pair {
            lo: _mm256_or_si256(lo, Avx2::bits_to_bytes((qh0 & 0xFFFF) | (qh1 << 16), 0x10)),
            hi: _mm256_or_si256(hi, Avx2::bits_to_bytes((qh0 >> 16) | (qh1 & 0xFFFF_0000), 0x10)),
        }
    }
}

/// Eight i32 lanes: lanes 0..4 sum to the first block's `sum(u * a)`, lanes 4..8 to the
/// second's.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn pair_sum(w: &Pair, a: &Pair) -> __m256i {
    unsafe {
        let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, a.lo), _mm256_maddubs_epi16(w.hi, a.hi));
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
}

/// Eight i32 lanes summing to `sum(w * a)` of the Q8_0 weight quants `w` and activation quants
/// `a` of one block.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn signed_sum(w: __m256i, a: __m256i) -> __m256i {
    unsafe {
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
}

/// Four pair vectors ([`pair_sum`]) folded into the eight block sums, lanes in the order of
/// [`lane_of`].
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn fold_pairs(p: &[__m256i; STEP_PAIRS]) -> __m256i {
    unsafe { _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3])) }
}

/// Eight block vectors ([`signed_sum`]) folded into the eight block sums, lanes in the order of
/// [`lane_of`].
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn fold_blocks(v: &[__m256i; STEP_BLOCKS]) -> __m256i {
    unsafe {
        let mut pairs = [_mm256_setzero_si256(); STEP_PAIRS];
        for (j, pair) in pairs.iter_mut().enumerate() {
            let (x, y) = (v[2 * j], v[2 * j + 1]);
            *pair = _mm256_add_epi32(_mm256_blend_epi32::<0xF0>(x, y), _mm256_permute2x128_si256::<0x21>(x, y));
        }
        fold_pairs(&pairs)
    }
}

/// Fills `columns` for the activation rows `a` of `nb` Q8_0 blocks each, for `TYPE` weights.
///
/// # Safety
/// Every `a[c]` holds `nb` Q8_0 blocks; AVX2, F16C.
#[inline(always)]
unsafe fn prepare<const TYPE: u8>(columns: &mut Columns, a: &[&[u8]], nb: usize) {
    columns.pairs.clear();
    columns.steps.clear();
    unsafe {
        let ones = _mm256_set1_epi8(1);
        let shift = _mm_cvtsi32_si128(offset_shift(TYPE) as i32);
        for col in a {
            let p = col.as_ptr();
            let first_pair = columns.pairs.len();
            if TYPE != Q8_0 {
                for k in (0..nb).step_by(2) {
                    let q = p.add(k * Q8_0_BYTES);
                    let two = k + 1 < nb;
                    columns.pairs.push(Pair { lo: halves(q, Q8_0_BYTES, 2, two), hi: halves(q, Q8_0_BYTES, 18, two) });
                }
            }
            for first in (0..nb).step_by(STEP_BLOCKS) {
                let blocks = (nb - first).min(STEP_BLOCKS);
                let start = if TYPE == Q8_0 {
                    _mm256_setzero_si256()
                } else {
                    let mut sums = [_mm256_setzero_si256(); STEP_PAIRS];
                    let pairs = &columns.pairs[first_pair + first / 2..][..blocks.div_ceil(2)];
                    for (sum, pair) in sums.iter_mut().zip(pairs) {
                        *sum = pair_sum(&Pair { lo: ones, hi: ones }, pair);
                    }
                    _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_sll_epi32(fold_pairs(&sums), shift))
                };
                let d = step_scales(p.add(first * Q8_0_BYTES), Q8_0_BYTES, blocks);
                columns.steps.push(Step { start, d });
            }
        }
    }
}

/// Adds the step of `blocks` (at most eight) weight blocks at `b`, the step starting at block
/// `first` of the row, to every column's `acc`: `pairs[c]` and `step[c]` are column `c`'s
/// prepared pairs (Q4_0, Q5_0) and constants of this step, `a[c]` its activation row (Q8_0).
///
/// # Safety
/// The blocks readable at `b`, `pairs[c]` holding the step's pairs, `a[c]` its blocks; AVX2,
/// FMA, F16C.
#[inline(always)]
unsafe fn add_step<const TYPE: u8, const C: usize>(
    acc: &mut [__m256; C],
    b: *const u8,
    blocks: usize,
    first: usize,
    a: &[&[u8]; C],
    pairs: &[&[Pair]; C],
    step: &[&Step; C],
) {
    let bytes = legacy_block_bytes(TYPE);
    unsafe {
        prefetch_ahead(b, blocks * bytes);
        let mut isum = [_mm256_setzero_si256(); C];
        if TYPE == Q8_0 {
            // Column by column, so that a column's eight block vectors stay in registers; the
            // weights are reloaded from L1.
            for c in 0..C {
                let mut sums = [_mm256_setzero_si256(); STEP_BLOCKS];
                for (k, sum) in sums.iter_mut().enumerate() {
                    if k < blocks {
                        let p = a[c].as_ptr().add((first + k) * Q8_0_BYTES + 2);
                        *sum = signed_sum(load(b.add(k * bytes + 2)), load(p));
                    }
                }
                isum[c] = fold_blocks(&sums);
            }
        } else {
            // Two pairs at a time, each column's two pair vectors folded at once.
            let mut folded = [[_mm256_setzero_si256(); 2]; C];
            for h in 0..2 {
                let zero = Pair { lo: _mm256_setzero_si256(), hi: _mm256_setzero_si256() };
                let mut w = [zero; 2];
                let present = [4 * h < blocks, 4 * h + 2 < blocks];
                for i in 0..2 {
                    let k = 4 * h + 2 * i;
                    if present[i] {
                        w[i] = pair_weights::<TYPE>(b.add(k * bytes), k + 1 < blocks);
                    }
                }
                for c in 0..C {
                    let mut sums = [_mm256_setzero_si256(); 2];
                    for i in 0..2 {
                        if present[i] {
                            sums[i] = pair_sum(&w[i], &pairs[c][2 * h + i]);
                        }
                    }
                    folded[c][h] = _mm256_hadd_epi32(sums[0], sums[1]);
                }
            }
            for c in 0..C {
                isum[c] = _mm256_add_epi32(_mm256_hadd_epi32(folded[c][0], folded[c][1]), step[c].start);
            }
        }
        let dw = step_scales(b, bytes, blocks);
        for c in 0..C {
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c]), _mm256_mul_ps(dw, step[c].d), acc[c]);
        }
    }
}

/// `out[r * C + c] = dot(row r, a[c])` for `n_rows` rows of `nb` Q4_0, Q5_0 or Q8_0 blocks
/// (`TYPE`, a `wide` type tag) and Q8_0 activations, on AVX2; the activations are prepared once
/// per call for every row (see the module's documentation).
///
/// # Safety
/// `w` holds `n_rows` rows of `nb` blocks, every `a[c]` `nb` Q8_0 blocks, `out` `n_rows * C`
/// values; AVX2, FMA, F16C.
#[inline(always)]
pub(super) unsafe fn legacy_rows_avx2<const TYPE: u8, const C: usize>(
    w: &[u8],
    n_rows: usize,
    a: &[&[u8]; C],
    nb: usize,
    out: &mut [f32],
) {
    let bytes = legacy_block_bytes(TYPE);
    let (n_pairs, n_steps) = (nb.div_ceil(2), nb.div_ceil(STEP_BLOCKS));
    // Taken out of the thread-local rather than borrowed in a closure: a closure would not
    // inherit the caller's target features, and the intrinsics would not inline.
    let mut columns = COLUMNS.take();
    unsafe {
        prepare::<TYPE>(&mut columns, a, nb);
        for (row, out) in w.chunks_exact(nb * bytes).take(n_rows).zip(out.chunks_exact_mut(C)) {
            let mut acc = [_mm256_setzero_ps(); C];
            for s in 0..n_steps {
                let first = s * STEP_BLOCKS;
                let pairs: [&[Pair]; C] = std::array::from_fn(|c| match TYPE {
                    Q8_0 => &[],
                    _ => &columns.pairs[c * n_pairs + first / 2..],
                });
                let step: [&Step; C] = std::array::from_fn(|c| &columns.steps[c * n_steps + s]);
                let b = row.as_ptr().add(first * bytes);
                match nb - first {
                    STEP_BLOCKS.. => add_step::<TYPE, C>(&mut acc, b, STEP_BLOCKS, first, a, &pairs, &step),
                    blocks => add_step::<TYPE, C>(&mut acc, b, blocks, first, a, &pairs, &step),
                }
            }
            for c in 0..C {
                out[c] = hsum_f32(acc[c]);
            }
        }
    }
    COLUMNS.set(columns);
}
