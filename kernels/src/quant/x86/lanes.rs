//! Q4_0, Q5_0 and Q8_0 GEMM with eight weight rows in the vector lanes (AVX2): the kernel for
//! prefill and other batches of [`super::super::TILED_MIN_COLS`] columns or more.
//!
//! The column kernels (`legacy.rs`, `rows_avx2.rs`) sum each 32-element block of one row and
//! one column across the lanes of a vector and then scale it in f32: per block and column
//! about nine instructions, most of them the scaling. Here a call transposes its weight rows
//! once, eight at a time (a band): per block, vector `g` holds elements `4g..4g + 4` of the eight
//! rows, one row per 32-bit lane, with the eight rows' scales in one f32 vector. Then per block
//! and column, eight `vpmaddubsw` multiply the column's four activations `4g..4g + 4`
//! (broadcast) with those vectors, the products of a block are widened to i32 and added, and
//! one conversion and two multiplies scale the eight rows together.
//!
//! Q4_0 and Q5_0: `vpmaddubsw` takes the activations as its unsigned operand, as `a + 128`
//! (their sign bits flipped once per product, [`prepare_columns`]), and the signed weights `w`
//! (Q4_0 `q - 8`, Q5_0 `q - 16`); each row's `128 * sum(w)` per block, computed in the
//! transpose, is subtracted from the widened sum. The i16 lanes hold exact sums: a product pair
//! is at most `2 * 255 * 16` and a lane adds eight pairs of Q4_0 (at most 32640) or four of
//! Q5_0 (32640) before widening.
//!
//! Q8_0: weights reach 127 in magnitude, so `vpmaddubsw` takes `|w|` (kept in the band) as its
//! unsigned operand and the activations as stored, with the weights' signs applied by
//! `vpsignb` (ggml's trick, as `rows_avx2.rs`): a product pair is at most `2 * 128 * 127 =
//! 32512`, and each product is widened on its own. The activations are Q8_0 as the quantizer
//! writes them (`-127..=127`; `vpsignb` cannot negate `-128`).
//!
//! Exactness: integer sums are exact, and each block adds its product of `isum`, `d_w` and `d_a`
//! to its row's sum in the portable kernels' order and rounding (`quant/legacy.rs`), so every
//! result is the portable kernel's, bit for bit, whatever the column count.

use std::arch::x86_64::*;
use std::cell::Cell;

use super::legacy::{Q8_0_BYTES, signed_weights};
use super::wide::{Q4_0, Q8_0, legacy_block_bytes};
use super::{Avx2, load};

/// Weight rows per band: the eight 32-bit lanes of a vector.
pub(super) const BAND_ROWS: usize = 8;

/// The columns of a product, prepared once for all its calls: per column and block the 32
/// activation quants (plus 128, as u8, for Q4_0 and Q5_0; as stored for Q8_0) and the block's
/// scale.
pub(crate) struct Prepared {
    n_cols: usize,
    /// `[column][block][32]`.
    quants: Vec<u8>,
    /// `[column][block]`.
    d: Vec<f32>,
}

/// One band of weight rows, transposed. Reused per thread.
#[derive(Default)]
struct Band {
    /// `[block][g: 8]`: elements `4g..4g + 4` of the band's rows, row `r` in lane `r` (Q8_0:
    /// their magnitudes `|w|`).
    codes: Vec<__m256i>,
    /// Q8_0 only, `[block][g: 8]`: the weights `w` as `codes`, for their signs.
    signs: Vec<__m256i>,
    /// Q4_0 and Q5_0 only, `[block]`: `128 * sum(w)` of each row's block, per lane.
    offsets: Vec<__m256i>,
    /// `[block]`: each row's `d_w`, per lane (0 for padding rows).
    d: Vec<__m256>,
}

thread_local! {
    static BAND: Cell<Band> = Cell::new(Default::default());
}

/// The 8x8 transpose of 32-bit elements: lane `r` of result `g` is element `g` of `v[r]`.
///
/// # Safety
/// AVX2.
#[inline(always)]
pub(super) unsafe fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    unsafe {
        let t = [
            _mm256_unpacklo_epi32(v[0], v[1]),
            _mm256_unpackhi_epi32(v[0], v[1]),
            _mm256_unpacklo_epi32(v[2], v[3]),
            _mm256_unpackhi_epi32(v[2], v[3]),
            _mm256_unpacklo_epi32(v[4], v[5]),
            _mm256_unpackhi_epi32(v[4], v[5]),
            _mm256_unpacklo_epi32(v[6], v[7]),
            _mm256_unpackhi_epi32(v[6], v[7]),
        ];
        // u[k] (rows 0..4) and u[4 + k] (rows 4..8) hold elements k and 4 + k in their halves.
        let u = [
            _mm256_unpacklo_epi64(t[0], t[2]),
            _mm256_unpackhi_epi64(t[0], t[2]),
            _mm256_unpacklo_epi64(t[1], t[3]),
            _mm256_unpackhi_epi64(t[1], t[3]),
            _mm256_unpacklo_epi64(t[4], t[6]),
            _mm256_unpackhi_epi64(t[4], t[6]),
            _mm256_unpacklo_epi64(t[5], t[7]),
            _mm256_unpackhi_epi64(t[5], t[7]),
        ];
        [
            _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
            _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
            _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
            _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
            _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
            _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
            _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
            _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
        ]
    }
}

/// Transposes rows `row0..row0 + n` (`n <= 8`; the rest of the band zero) of `w` (rows of `nb`
/// blocks of `TYPE`) into `band`.
///
/// # Safety
/// `w` holds the rows; AVX2, F16C.
#[inline(always)]
unsafe fn transpose_band<const TYPE: u8>(w: &[u8], row0: usize, n: usize, nb: usize, band: &mut Band) {
    let bytes = legacy_block_bytes(TYPE);
    band.codes.clear();
    band.signs.clear();
    band.offsets.clear();
    band.d.clear();
    unsafe {
        let ones8 = _mm256_set1_epi8(1);
        for k in 0..nb {
            let mut rows = [_mm256_setzero_si256(); BAND_ROWS];
            let mut d = [0u16; BAND_ROWS];
            for (r, (row, d)) in rows.iter_mut().zip(&mut d).enumerate().take(n) {
                let b = w.as_ptr().add(((row0 + r) * nb + k) * bytes);
                *row = signed_weights::<Avx2, TYPE>(b);
                *d = b.cast::<u16>().read_unaligned();
            }
            let codes = transpose8(rows);
            band.d.push(_mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast())));
            if TYPE == Q8_0 {
                // A loop, not a closure: a closure would not inherit the target features.
                for &c in &codes {
                    band.codes.push(_mm256_abs_epi8(c));
                }
                band.signs.extend_from_slice(&codes);
                continue;
            }
            // Per lane (row): sum(w) as i16 pairs over the eight vectors, widened once.
            let mut pairs = _mm256_setzero_si256();
            for &c in &codes {
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(ones8, c));
            }
            band.codes.extend_from_slice(&codes);
            band.offsets.push(_mm256_slli_epi32::<7>(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1))));
        }
    }
}

/// The i16 pair products of activations `4g..4g + 4` at `a` (broadcast) with vector `g` of a
/// block's transposed weights at `codes`.
///
/// # Safety
/// `a..a + 32` readable, `codes` eight vectors; AVX2.
#[inline(always)]
unsafe fn product(a: *const u8, codes: *const __m256i, g: usize) -> __m256i {
    unsafe { _mm256_maddubs_epi16(_mm256_set1_epi32(a.add(4 * g).cast::<i32>().read_unaligned()), *codes.add(g)) }
}

/// The i16 sum of the eight products of a Q4_0 block (`g` = 0..8) or of half a Q5_0 block
/// (`g` = `first..first + 4`, as each of its pairs can reach `2 * 255 * 16`), added as a tree.
///
/// # Safety
/// As [`product`].
#[inline(always)]
unsafe fn product_sum<const GROUPS: usize>(a: *const u8, codes: *const __m256i, first: usize) -> __m256i {
    unsafe {
        let quad = product_quad(a, codes, first);
        if GROUPS == 8 { _mm256_add_epi16(quad, product_quad(a, codes, first + 4)) } else { quad }
    }
}

/// The i16 sum of products `g..g + 4` ([`product`]), added as a tree. A function, not a closure:
/// a closure would not inherit the caller's target features, and the intrinsics would not inline.
///
/// # Safety
/// As [`product`].
#[inline(always)]
unsafe fn product_quad(a: *const u8, codes: *const __m256i, g: usize) -> __m256i {
    unsafe {
        let low = _mm256_add_epi16(product(a, codes, g), product(a, codes, g + 1));
        _mm256_add_epi16(low, _mm256_add_epi16(product(a, codes, g + 2), product(a, codes, g + 3)))
    }
}

/// The i32 sum of a Q8_0 block's products: per `g`, `|w|` of vector `g` at `codes` times
/// activations `4g..4g + 4` at `a` (broadcast) carrying the signs of vector `g` at `signs`,
/// widened on its own (two pairs may exceed i16), added as a tree.
///
/// # Safety
/// `a..a + 32` readable, `codes` and `signs` eight vectors; AVX2.
#[inline(always)]
unsafe fn signed_block_sum(a: *const u8, codes: *const __m256i, signs: *const __m256i) -> __m256i {
    unsafe {
        let ones16 = _mm256_set1_epi16(1);
        let mut wide = [_mm256_setzero_si256(); 8];
        for (g, wide) in wide.iter_mut().enumerate() {
            let a4 = _mm256_sign_epi8(_mm256_set1_epi32(a.add(4 * g).cast::<i32>().read_unaligned()), *signs.add(g));
            *wide = _mm256_madd_epi16(_mm256_maddubs_epi16(*codes.add(g), a4), ones16);
        }
        let quads = [
            _mm256_add_epi32(_mm256_add_epi32(wide[0], wide[1]), _mm256_add_epi32(wide[2], wide[3])),
            _mm256_add_epi32(_mm256_add_epi32(wide[4], wide[5]), _mm256_add_epi32(wide[6], wide[7])),
        ];
        _mm256_add_epi32(quads[0], quads[1])
    }
}

/// The eight rows of `band` times the `N` prepared columns `c0..c0 + N`: per block the portable
/// kernel's product of `isum`, `d_w` and `d_a`, added in block order.
///
/// # Safety
/// `band` and `cols` hold `nb` blocks, `cols` at least `c0 + N` columns; AVX2.
#[inline(always)]
unsafe fn band_columns<const TYPE: u8, const N: usize>(
    band: &Band,
    cols: &Prepared,
    c0: usize,
    nb: usize,
) -> [__m256; N] {
    unsafe {
        let ones16 = _mm256_set1_epi16(1);
        let mut sum = [_mm256_setzero_ps(); N];
        for k in 0..nb {
            let codes = band.codes.as_ptr().add(k * 8);
            let dw = *band.d.as_ptr().add(k);
            for (j, sum) in sum.iter_mut().enumerate() {
                let c = c0 + j;
                let a = cols.quants.as_ptr().add((c * nb + k) * 32);
                let isum = match TYPE {
                    Q8_0 => signed_block_sum(a, codes, band.signs.as_ptr().add(k * 8)),
                    Q4_0 => {
                        let isum = _mm256_madd_epi16(product_sum::<8>(a, codes, 0), ones16);
                        _mm256_sub_epi32(isum, *band.offsets.as_ptr().add(k))
                    }
                    _ => {
                        let lo = _mm256_madd_epi16(product_sum::<4>(a, codes, 0), ones16);
                        let isum = _mm256_add_epi32(lo, _mm256_madd_epi16(product_sum::<4>(a, codes, 4), ones16));
                        _mm256_sub_epi32(isum, *band.offsets.as_ptr().add(k))
                    }
                };
                let isum = _mm256_cvtepi32_ps(isum);
                let da = _mm256_set1_ps(*cols.d.as_ptr().add(c * nb + k));
                // The portable kernels' products: Q4_0 `(isum * d_w) * d_a`, Q5_0
                // `(d_w * d_a) * isum`, Q8_0 `isum * (d_w * d_a)`.
                let part = match TYPE {
                    Q4_0 => _mm256_mul_ps(_mm256_mul_ps(isum, dw), da),
                    _ => _mm256_mul_ps(_mm256_mul_ps(dw, da), isum),
                };
                *sum = _mm256_add_ps(*sum, part);
            }
        }
        sum
    }
}

/// Stores lanes `0..n` of `v`, a band's results for column `c`, as rows `row0..row0 + n` of
/// column `c` of `out` (`[column][n_rows]`): one vector store for a whole band.
///
/// # Safety
/// AVX.
#[inline(always)]
pub(super) unsafe fn store_band_column(out: &mut [f32], n_rows: usize, row0: usize, n: usize, c: usize, v: __m256) {
    // A plain move, not `_mm256_storeu_ps`: the copy of a whole band compiles to one vector
    // store, and no intrinsic is left for the inliner to keep out of line.
    // SAFETY: `__m256` and `[f32; 8]` have the same size, and every bit pattern is an f32.
    let values = unsafe { std::mem::transmute::<__m256, [f32; BAND_ROWS]>(v) };
    let dst = &mut out[c * n_rows + row0..][..n];
    if n == BAND_ROWS {
        dst.copy_from_slice(&values);
    } else {
        dst.copy_from_slice(&values[..n]);
    }
}

/// The columns `a` (Q8_0 rows of `nb` blocks) prepared for [`legacy_lanes`] of `TYPE`.
///
/// # Safety
/// Every `a[c]` holds `nb` blocks; AVX2, F16C.
#[inline(always)]
pub(super) unsafe fn prepare_columns<const TYPE: u8>(a: &[&[u8]], nb: usize) -> Prepared {
    let mut cols = Prepared { n_cols: a.len(), quants: Vec::with_capacity(a.len() * nb * 32), d: Vec::new() };
    unsafe {
        let flip = _mm256_set1_epi8(if TYPE == Q8_0 { 0 } else { i8::MIN });
        for col in a {
            for k in 0..nb {
                let p = col.as_ptr().add(k * Q8_0_BYTES);
                let mut flipped = [0u8; 32];
                _mm256_storeu_si256(flipped.as_mut_ptr().cast(), _mm256_xor_si256(load(p.add(2)), flip));
                cols.quants.extend_from_slice(&flipped);
                cols.d
                    .push(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(p.cast::<u16>().read_unaligned())))));
            }
        }
    }
    cols
}

/// `out[c * n_rows + r] = dot(row r, column c)` (column-major: a band's eight rows are adjacent)
/// for the `n_rows` rows of `nb` blocks of `TYPE` in `w` and every column of `cols`.
///
/// # Safety
/// `w` holds `n_rows` rows of `nb` blocks of `TYPE`, `cols` came from [`prepare_columns`] with
/// `nb`; AVX2, FMA, F16C.
#[inline(always)]
pub(super) unsafe fn legacy_lanes<const TYPE: u8>(
    w: &[u8],
    n_rows: usize,
    nb: usize,
    cols: &Prepared,
    out: &mut [f32],
) {
    let n_cols = cols.n_cols;
    // Taken out of the thread-local rather than borrowed in a closure: a closure would not
    // inherit the caller's target features, and the intrinsics would not inline.
    let mut band = BAND.take();
    unsafe {
        for row0 in (0..n_rows).step_by(BAND_ROWS) {
            let n = BAND_ROWS.min(n_rows - row0);
            transpose_band::<TYPE>(w, row0, n, nb, &mut band);
            for c0 in (0..n_cols - n_cols % 2).step_by(2) {
                let [v0, v1] = band_columns::<TYPE, 2>(&band, cols, c0, nb);
                store_band_column(out, n_rows, row0, n, c0, v0);
                store_band_column(out, n_rows, row0, n, c0 + 1, v1);
            }
            if n_cols % 2 == 1 {
                let [v] = band_columns::<TYPE, 1>(&band, cols, n_cols - 1, nb);
                store_band_column(out, n_rows, row0, n, n_cols - 1, v);
            }
        }
    }
    BAND.set(band);
}
