//! Q3_K GEMM with eight weight rows in the vector lanes (AVX2): the kernel for prefill and other
//! batches of [`super::super::TILED_MIN_COLS`] columns or more, as `lanes.rs` is for Q4_0/Q5_0.
//!
//! The column kernel (`kquants.rs`) unpacks a 32-element group of one row for at most eight
//! columns, then spends `vpmaddubsw` + `vpmaddwd` + an add per group and column on one row:
//! eight multiplies of 32 bytes give one row's partial sum. Here a call unpacks and transposes
//! its weight rows once, eight at a time (a band): per super-block, vector `g` (0..64) holds
//! elements `4g..4g + 4` of the eight rows as `u = q + 4` (0..=7), one row per 32-bit lane, and
//! vector `j` (0..16) of the scales holds each row's 16-element sub-block scale `j` (i16, in
//! both halves of its lane). Per sub-block and column, four `vpmaddubsw` multiply those weights
//! with the column's activations `4g..4g + 4` (broadcast), their i16 sums are added, and one
//! `vpmaddwd` by the scales widens them: every multiply serves the eight rows at once.
//!
//! The offset `q = u - 4` is removed through the Q8_K block sums (`bsums`, the sum of each
//! sub-block's 16 quants): `sum(q * a) = sum(u * a) - 4 * bsum`, subtracted from the low i16 of
//! each lane before the widening (prepared once per column, [`prepare_columns`]). The i16 lanes
//! hold exact sums: a `vpmaddubsw` pair is at most `2 * 7 * 128`, four of them `7168`, and
//! `4 * |bsum|` at most `8192`.
//!
//! Exactness: the integer sum of each super-block is exact, and each super-block adds
//! `(d_w * d_a) * isum` to its row's sum in the portable kernel's order and rounding
//! (`vec_dot_q3_k_q8_k` in `quant/kquants.rs`), so every result is the portable kernel's, bit for
//! bit, whatever the column count.

use std::arch::x86_64::*;
use std::cell::Cell;

use super::super::kquants::q3_k_scales;
use super::kquants::{Q8_K_BSUMS, Q8_K_BYTES, Q8_K_QS};
use super::lanes::{BAND_ROWS, transpose8};
use super::load;

/// Bytes of a Q3_K super-block: 32 of `hmask`, 64 of 2-bit quants, 12 of scales, `d`.
const Q3_K_BYTES: usize = 110;

/// The columns of a product, prepared once for all its calls.
pub(crate) struct Prepared {
    n_cols: usize,
    /// `[column][super-block][256]`: the Q8_K quants.
    quants: Vec<i8>,
    /// `[column][super-block][sub-block: 16]`: `4 * bsum` in the low i16 of an i32, 0 above.
    offsets: Vec<i32>,
    /// `[column][super-block]`: the Q8_K scale.
    d: Vec<f32>,
}

/// One band of weight rows, unpacked and transposed. Reused per thread.
#[derive(Default)]
struct Band {
    /// `[super-block][g: 64]`: elements `4g..4g + 4` of the band's rows as `q + 4`, row `r` in
    /// lane `r`.
    codes: Vec<__m256i>,
    /// `[super-block][sub-block: 16]`: each row's sub-block scale as i16, twice per lane.
    scales: Vec<__m256i>,
    /// `[super-block]`: each row's `d`, per lane (0 for padding rows).
    d: Vec<__m256>,
}

thread_local! {
    static BAND: Cell<Band> = Cell::new(Default::default());
}

/// The 32-element group `g` (0..8) of the Q3_K super-block at `b` as `q + 4`, one byte each.
///
/// # Safety
/// `b..b + 110` readable; AVX2.
#[inline(always)]
unsafe fn group_codes(b: *const u8, g: usize) -> __m256i {
    unsafe {
        let qv = load(b.add(32 + 32 * (g / 4)));
        let low = _mm256_and_si256(_mm256_srl_epi16(qv, _mm_cvtsi32_si128(2 * (g % 4) as i32)), _mm256_set1_epi8(3));
        let high = _mm256_and_si256(_mm256_srl_epi16(load(b), _mm_cvtsi32_si128(g as i32)), _mm256_set1_epi8(1));
        _mm256_or_si256(low, _mm256_slli_epi16::<2>(high))
    }
}

/// Unpacks and transposes rows `row0..row0 + n` (`n <= 8`; the rest of the band zero) of `w`
/// (rows of `nb` Q3_K super-blocks) into `band`.
///
/// # Safety
/// `w` holds the rows; AVX2, F16C.
#[inline(always)]
unsafe fn transpose_band(w: &[u8], row0: usize, n: usize, nb: usize, band: &mut Band) {
    band.codes.clear();
    band.scales.clear();
    band.d.clear();
    unsafe {
        for k in 0..nb {
            let block = |r: usize| w.as_ptr().add(((row0 + r) * nb + k) * Q3_K_BYTES);
            for g in 0..8 {
                let mut rows = [_mm256_setzero_si256(); BAND_ROWS];
                for (r, row) in rows.iter_mut().enumerate().take(n) {
                    *row = group_codes(block(r), g);
                }
                band.codes.extend_from_slice(&transpose8(rows));
            }
            let mut scales = [[0i32; BAND_ROWS]; 16];
            let mut d = [0u16; BAND_ROWS];
            for r in 0..n {
                let b = block(r);
                for (j, &s) in q3_k_scales(&*b.add(96).cast::<[u8; 12]>()).iter().enumerate() {
                    scales[j][r] = (u32::from(s as i16 as u16) * 0x1_0001) as i32;
                }
                d[r] = b.add(108).cast::<u16>().read_unaligned();
            }
            band.scales.extend(scales.iter().map(|s| _mm256_loadu_si256(s.as_ptr().cast())));
            band.d.push(_mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast())));
        }
    }
}

/// The eight rows of `band` times the `N` prepared columns `c0..c0 + N`: per super-block the
/// portable kernel's `(d_w * d_a) * isum`, added in super-block order.
///
/// # Safety
/// `band` and `cols` hold `nb` super-blocks, `cols` at least `c0 + N` columns; AVX2.
#[inline(always)]
unsafe fn band_columns<const N: usize>(band: &Band, cols: &Prepared, c0: usize, nb: usize) -> [__m256; N] {
    unsafe {
        let mut sum = [_mm256_setzero_ps(); N];
        for k in 0..nb {
            let codes = band.codes.as_ptr().add(k * 64);
            let scales = band.scales.as_ptr().add(k * 16);
            let mut isum = [_mm256_setzero_si256(); N];
            for j in 0..16 {
                let sc = *scales.add(j);
                for (c, isum) in isum.iter_mut().enumerate() {
                    let block = (c0 + c) * nb + k;
                    let a = cols.quants.as_ptr().add(block * 256 + 16 * j);
                    let p = |m: usize| {
                        let a4 = _mm256_set1_epi32(a.add(4 * m).cast::<i32>().read_unaligned());
                        _mm256_maddubs_epi16(*codes.add(4 * j + m), a4)
                    };
                    let t = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
                    let t = _mm256_sub_epi16(t, _mm256_set1_epi32(*cols.offsets.as_ptr().add(block * 16 + j)));
                    *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(t, sc));
                }
            }
            let dw = *band.d.as_ptr().add(k);
            for (c, (sum, isum)) in sum.iter_mut().zip(isum).enumerate() {
                let da = _mm256_set1_ps(*cols.d.as_ptr().add((c0 + c) * nb + k));
                *sum = _mm256_add_ps(*sum, _mm256_mul_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum)));
            }
        }
        sum
    }
}

/// The columns `a` (Q8_K rows of `nb` super-blocks) prepared for [`q3_k_lanes`].
///
/// # Safety
/// Every `a[c]` holds `nb` Q8_K blocks.
pub(super) unsafe fn prepare_columns(a: &[&[u8]], nb: usize) -> Prepared {
    let mut cols = Prepared {
        n_cols: a.len(),
        quants: Vec::with_capacity(a.len() * nb * 256),
        offsets: Vec::with_capacity(a.len() * nb * 16),
        d: Vec::with_capacity(a.len() * nb),
    };
    for col in a {
        for block in col[..nb * Q8_K_BYTES].chunks_exact(Q8_K_BYTES) {
            cols.d.push(f32::from_le_bytes(block[..4].try_into().expect("four bytes")));
            cols.quants.extend(block[Q8_K_QS..Q8_K_QS + 256].iter().map(|&q| q as i8));
            cols.offsets.extend(block[Q8_K_BSUMS..Q8_K_BSUMS + 32].chunks_exact(2).map(|s| {
                // Wrapping: only a forged row has sums beyond 16 * 128.
                let bsum = i16::from_le_bytes([s[0], s[1]]);
                i32::from(bsum.wrapping_mul(4) as u16)
            }));
        }
    }
    cols
}

/// `out[r * n_cols + c] = dot(row r, column c)` for the `n_rows` Q3_K rows of `nb` super-blocks
/// in `w` and every column of `cols`.
///
/// # Safety
/// `w` holds `n_rows` rows of `nb` Q3_K super-blocks, `cols` came from [`prepare_columns`] with
/// `nb`; AVX2, FMA, F16C.
#[inline(always)]
pub(super) unsafe fn q3_k_lanes(w: &[u8], n_rows: usize, nb: usize, cols: &Prepared, out: &mut [f32]) {
    let n_cols = cols.n_cols;
    // Taken out of the thread-local rather than borrowed in a closure: a closure would not
    // inherit the caller's target features, and the intrinsics would not inline.
    let mut band = BAND.take();
    unsafe {
        for row0 in (0..n_rows).step_by(BAND_ROWS) {
            let n = BAND_ROWS.min(n_rows - row0);
            transpose_band(w, row0, n, nb, &mut band);
            let mut emit = |c: usize, v: __m256| {
                let mut values = [0.0f32; BAND_ROWS];
                _mm256_storeu_ps(values.as_mut_ptr(), v);
                for (r, &v) in values.iter().enumerate().take(n) {
                    out[(row0 + r) * n_cols + c] = v;
                }
            };
            let mut c0 = 0;
            while c0 + 4 <= n_cols {
                for (c, v) in band_columns::<4>(&band, cols, c0, nb).into_iter().enumerate() {
                    emit(c0 + c, v);
                }
                c0 += 4;
            }
            while c0 < n_cols {
                let [v] = band_columns::<1>(&band, cols, c0, nb);
                emit(c0, v);
                c0 += 1;
            }
        }
    }
    BAND.set(band);
}
