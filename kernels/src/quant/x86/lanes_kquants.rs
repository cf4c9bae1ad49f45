//! Q3_K and Q4_K GEMM with eight weight rows in the vector lanes (AVX2): the kernels for prefill
//! and other batches of [`super::super::TILED_MIN_COLS`] columns or more, as `lanes.rs` is for
//! Q4_0/Q5_0.
//!
//! The column kernels (`kquants.rs`) unpack a 32-element group of one row for at most eight
//! columns, then spend `vpmaddubsw` + `vpmaddwd` + an add per group and column on that one row.
//! Here a call unpacks and transposes its weight rows once, eight at a time (a band): per
//! super-block, vector `g` (0..64) holds elements `4g..4g + 4` of the eight rows as non-negative
//! codes (Q3_K `q + 4`, 0..=7; Q4_K `q`, 0..=15), one row per 32-bit lane, and each sub-block's
//! scale is a vector of the eight rows' scales (i16, in both halves of a lane). Per sub-block
//! and column, `vpmaddubsw` multiplies those codes with the column's activations `4g..4g + 4`
//! (broadcast), the i16 products of the sub-block are added, and one `vpmaddwd` by the scales
//! widens them: every multiply serves the eight rows at once.
//!
//! Q3_K's offset `q = u - 4` is removed through the Q8_K block sums (`bsums`, the sum of each
//! 16-element sub-block's quants): `sum(q * a) = sum(u * a) - 4 * bsum`, subtracted from the low
//! i16 of each lane before the widening (prepared once per column, [`prepare_columns`]). Q4_K's
//! mins multiply the sums of its 32-element sub-blocks' two `bsums`, one `vpmaddwd` per pair of
//! sub-blocks. The i16 lanes hold exact sums: a `vpmaddubsw` pair is at most `2 * 7 * 128`
//! (Q3_K, four pairs per sub-block, `4 * |bsum|` at most 8192 more) or `2 * 15 * 128` (Q4_K,
//! eight pairs: 30720).
//!
//! Exactness: the integer sums of each super-block are exact, and each super-block adds the
//! portable kernel's f32 expression (`vec_dot_q3_k_q8_k`, `dot_block_k4` in `quant/kquants.rs`)
//! to its row's sum in the same order, so every result is the portable kernel's, bit for bit,
//! whatever the column count.

use std::arch::x86_64::*;
use std::cell::Cell;

use super::super::kquants::{k4_scales_mins, q3_k_scales};
use super::kquants::{Q8_K_BSUMS, Q8_K_BYTES, Q8_K_QS, q3_k_codes};
use super::lanes::{BAND_ROWS, store_band_column, transpose8};
use super::load;

/// A k-quant type with a lanes kernel: how a band of its rows unpacks, how a column's block
/// sums are prepared, and its products.
pub(super) trait KLanes {
    /// Bytes of one super-block.
    const BYTES: usize;

    /// The 32-element group `g` (0..8) of the super-block at `b` as non-negative codes.
    ///
    /// # Safety
    /// `b..b + BYTES` readable; AVX2.
    unsafe fn group_codes(b: *const u8, g: usize) -> __m256i;

    /// The super-block at `b`'s scale multipliers (i16, twice per i32) into `scales`, its
    /// min multipliers (pairs of i16 per i32, Q4_K) into `mins`, and its f16 `d`, `dmin`.
    fn row_params(b: &[u8], scales: &mut [i32; 16], mins: &mut [i32; 4]) -> (u16, u16);

    /// The i32 values a column's Q8_K block contributes to [`Prepared::offsets`], from its
    /// sixteen `bsums`.
    fn offsets(bsums: [i16; 16], out: &mut Vec<i32>);

    /// The eight rows of `band` times the `N` prepared columns `c0..c0 + N`: per super-block the
    /// portable kernel's f32 expression, added in super-block order.
    ///
    /// # Safety
    /// `band` and `cols` hold `nb` super-blocks of this type, `cols` at least `c0 + N` columns;
    /// AVX2.
    unsafe fn band_columns<const N: usize>(band: &Band, cols: &Prepared, c0: usize, nb: usize) -> [__m256; N];
}

/// Q3_K (110-byte super-blocks: 32 bytes of `hmask`, 64 of 2-bit quants, 12 of scales, `d`).
pub(super) struct Q3K;
/// Q4_K (144-byte super-blocks: `d`, `dmin`, 12 bytes of scales and mins, 128 of nibbles).
pub(super) struct Q4K;

/// `[lo as i16, hi as i16]` as one i32 lane.
fn i16_pair(lo: i32, hi: i32) -> i32 {
    ((lo as u16 as u32) | ((hi as u16 as u32) << 16)) as i32
}

impl KLanes for Q3K {
    const BYTES: usize = 110;

    #[inline(always)]
    unsafe fn group_codes(b: *const u8, g: usize) -> __m256i {
        unsafe { q3_k_codes(load(b.add(32 + 32 * (g / 4))), load(b), g) }
    }

    fn row_params(b: &[u8], scales: &mut [i32; 16], _mins: &mut [i32; 4]) -> (u16, u16) {
        let packed: &[u8; 12] = b[96..108].try_into().expect("twelve bytes");
        for (dst, &s) in scales.iter_mut().zip(&q3_k_scales(packed)) {
            *dst = i16_pair(i32::from(s), i32::from(s));
        }
        (u16::from_le_bytes([b[108], b[109]]), 0)
    }

    fn offsets(bsums: [i16; 16], out: &mut Vec<i32>) {
        // Wrapping: only a forged row has sums beyond 16 * 128.
        out.extend(bsums.iter().map(|&s| i16_pair(i32::from(s.wrapping_mul(4)), 0)));
    }

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
                        let t = products::<4>(codes.add(4 * j), a);
                        let t = _mm256_sub_epi16(t, _mm256_set1_epi32(*cols.offsets.as_ptr().add(block * 16 + j)));
                        *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(t, sc));
                    }
                }
                let dw = *band.d.as_ptr().add(k);
                for (c, (sum, isum)) in sum.iter_mut().zip(isum).enumerate() {
                    let da = _mm256_set1_ps(*cols.d.as_ptr().add((c0 + c) * nb + k));
                    // The portable `d * ad * isum`.
                    *sum = _mm256_add_ps(*sum, _mm256_mul_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum)));
                }
            }
            sum
        }
    }
}

impl KLanes for Q4K {
    const BYTES: usize = 144;

    #[inline(always)]
    unsafe fn group_codes(b: *const u8, g: usize) -> __m256i {
        unsafe {
            let qv = load(b.add(16 + 32 * (g / 2)));
            let nibbles = if g.is_multiple_of(2) { qv } else { _mm256_srli_epi16::<4>(qv) };
            _mm256_and_si256(nibbles, _mm256_set1_epi8(0xF))
        }
    }

    fn row_params(b: &[u8], scales: &mut [i32; 16], mins: &mut [i32; 4]) -> (u16, u16) {
        let (sc, m) = k4_scales_mins(b[4..16].try_into().expect("twelve bytes"));
        for (dst, &s) in scales.iter_mut().zip(&sc) {
            *dst = i16_pair(i32::from(s), i32::from(s));
        }
        for (dst, m) in mins.iter_mut().zip(m.chunks_exact(2)) {
            *dst = i16_pair(i32::from(m[0]), i32::from(m[1]));
        }
        (u16::from_le_bytes([b[0], b[1]]), u16::from_le_bytes([b[2], b[3]]))
    }

    fn offsets(bsums: [i16; 16], out: &mut Vec<i32>) {
        // The sum of each 32-element sub-block's two bsums (at most 4096 in magnitude for a row
        // the quantizer wrote), two sub-blocks per i32.
        let pair = |j: usize| i32::from(bsums[2 * j].wrapping_add(bsums[2 * j + 1]));
        out.extend((0..4).map(|i| i16_pair(pair(2 * i), pair(2 * i + 1))));
    }

    #[inline(always)]
    unsafe fn band_columns<const N: usize>(band: &Band, cols: &Prepared, c0: usize, nb: usize) -> [__m256; N] {
        unsafe {
            let mut sum = [_mm256_setzero_ps(); N];
            for k in 0..nb {
                let codes = band.codes.as_ptr().add(k * 64);
                let scales = band.scales.as_ptr().add(k * 16);
                let mins = band.mins.as_ptr().add(k * 4);
                let mut isum = [_mm256_setzero_si256(); N];
                let mut summs = [_mm256_setzero_si256(); N];
                for j in 0..8 {
                    let sc = *scales.add(j);
                    for (c, isum) in isum.iter_mut().enumerate() {
                        let a = cols.quants.as_ptr().add(((c0 + c) * nb + k) * 256 + 32 * j);
                        *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(products::<8>(codes.add(8 * j), a), sc));
                    }
                }
                for i in 0..4 {
                    let m = *mins.add(i);
                    for (c, summs) in summs.iter_mut().enumerate() {
                        let p = _mm256_set1_epi32(*cols.offsets.as_ptr().add(((c0 + c) * nb + k) * 4 + i));
                        *summs = _mm256_add_epi32(*summs, _mm256_madd_epi16(m, p));
                    }
                }
                let (dw, dmin) = (*band.d.as_ptr().add(k), *band.dmin.as_ptr().add(k));
                for (c, sum) in sum.iter_mut().enumerate() {
                    let da = _mm256_set1_ps(*cols.d.as_ptr().add((c0 + c) * nb + k));
                    // The portable `d * ad * isum - dmin * ad * summs`.
                    let main = _mm256_mul_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum[c]));
                    let side = _mm256_mul_ps(_mm256_mul_ps(dmin, da), _mm256_cvtepi32_ps(summs[c]));
                    *sum = _mm256_add_ps(*sum, _mm256_sub_ps(main, side));
                }
            }
            sum
        }
    }
}

/// The i16 sum of the `G` products of code vectors `codes..codes + G` with the column's
/// activations `4g..4g + 4` at `a` (broadcast), added as a tree.
///
/// # Safety
/// `codes` holds `G` vectors, `a..a + 4 * G` readable; AVX2.
#[inline(always)]
unsafe fn products<const G: usize>(codes: *const __m256i, a: *const i8) -> __m256i {
    unsafe {
        let quad = product_quad(codes, a, 0);
        if G == 8 { _mm256_add_epi16(quad, product_quad(codes, a, 4)) } else { quad }
    }
}

/// The product of code vector `codes + m` with the column's activations `4m..4m + 4` at `a`
/// (broadcast): sixteen i16 pair sums.
///
/// # Safety
/// `codes` holds more than `m` vectors, `a..a + 4m + 4` readable; AVX2.
#[inline(always)]
unsafe fn product(codes: *const __m256i, a: *const i8, m: usize) -> __m256i {
    unsafe { _mm256_maddubs_epi16(*codes.add(m), _mm256_set1_epi32(a.add(4 * m).cast::<i32>().read_unaligned())) }
}

/// The i16 sum of products `m..m + 4` ([`product`]), added as a tree. A function, not a
/// closure: a closure would not inherit the caller's target features, and the intrinsics would
/// not inline.
///
/// # Safety
/// As [`product`], for `m + 3`.
#[inline(always)]
unsafe fn product_quad(codes: *const __m256i, a: *const i8, m: usize) -> __m256i {
    unsafe {
        let low = _mm256_add_epi16(product(codes, a, m), product(codes, a, m + 1));
        _mm256_add_epi16(low, _mm256_add_epi16(product(codes, a, m + 2), product(codes, a, m + 3)))
    }
}

/// The columns of a product, prepared once for all its calls.
pub(crate) struct Prepared {
    n_cols: usize,
    /// `[column][super-block][256]`: the Q8_K quants.
    quants: Vec<i8>,
    /// `[column][super-block][..]`: what [`KLanes::offsets`] makes of the block sums.
    offsets: Vec<i32>,
    /// `[column][super-block]`: the Q8_K scale.
    d: Vec<f32>,
}

/// One band of weight rows, unpacked and transposed. Reused per thread.
#[derive(Default)]
pub(super) struct Band {
    /// `[super-block][g: 64]`: elements `4g..4g + 4` of the band's rows as codes, row `r` in
    /// lane `r`.
    codes: Vec<__m256i>,
    /// `[super-block][sub-block: 16]`: each row's sub-block scale (Q4_K: the first eight).
    scales: Vec<__m256i>,
    /// `[super-block][pair: 4]`: each row's mins of two sub-blocks (Q4_K).
    mins: Vec<__m256i>,
    /// `[super-block]`: each row's `d`, per lane (0 for padding rows).
    d: Vec<__m256>,
    /// `[super-block]`: each row's `dmin` (Q4_K).
    dmin: Vec<__m256>,
}

thread_local! {
    static BAND: Cell<Band> = Cell::new(Default::default());
}

/// Unpacks and transposes rows `row0..row0 + n` (`n <= 8`; the rest of the band zero) of `w`
/// (rows of `nb` super-blocks of `T`) into `band`.
///
/// # Safety
/// `w` holds the rows; AVX2, F16C.
#[inline(always)]
unsafe fn transpose_band<T: KLanes>(w: &[u8], row0: usize, n: usize, nb: usize, band: &mut Band) {
    band.codes.clear();
    band.scales.clear();
    band.mins.clear();
    band.d.clear();
    band.dmin.clear();
    unsafe {
        for k in 0..nb {
            let block = |r: usize| &w[((row0 + r) * nb + k) * T::BYTES..][..T::BYTES];
            for g in 0..8 {
                let mut rows = [_mm256_setzero_si256(); BAND_ROWS];
                for (r, row) in rows.iter_mut().enumerate().take(n) {
                    *row = T::group_codes(block(r).as_ptr(), g);
                }
                band.codes.extend_from_slice(&transpose8(rows));
            }
            let (mut scales, mut mins) = ([[0i32; BAND_ROWS]; 16], [[0i32; BAND_ROWS]; 4]);
            let (mut d, mut dmin) = ([0u16; BAND_ROWS], [0u16; BAND_ROWS]);
            for r in 0..n {
                let (mut s, mut m) = ([0i32; 16], [0i32; 4]);
                (d[r], dmin[r]) = T::row_params(block(r), &mut s, &mut m);
                s.iter().enumerate().for_each(|(j, &s)| scales[j][r] = s);
                m.iter().enumerate().for_each(|(i, &m)| mins[i][r] = m);
            }
            band.scales.extend(scales.iter().map(|s| _mm256_loadu_si256(s.as_ptr().cast())));
            band.mins.extend(mins.iter().map(|m| _mm256_loadu_si256(m.as_ptr().cast())));
            band.d.push(_mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast())));
            band.dmin.push(_mm256_cvtph_ps(_mm_loadu_si128(dmin.as_ptr().cast())));
        }
    }
}

/// The columns `a` (Q8_K rows of `nb` super-blocks) prepared for [`kquant_lanes`] of `T`.
/// Panics when a row is shorter than `nb` blocks.
///
/// # Safety
/// None: the lengths are checked. `unsafe` only to share the signature of the other lanes
/// kernels' `prepare`, which use intrinsics.
pub(super) unsafe fn prepare_columns<T: KLanes>(a: &[&[u8]], nb: usize) -> Prepared {
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
            let mut bsums = [0i16; 16];
            for (s, b) in bsums.iter_mut().zip(block[Q8_K_BSUMS..Q8_K_BSUMS + 32].chunks_exact(2)) {
                *s = i16::from_le_bytes([b[0], b[1]]);
            }
            T::offsets(bsums, &mut cols.offsets);
        }
    }
    cols
}

/// `out[c * n_rows + r] = dot(row r, column c)` (column-major, as [`super::lanes::legacy_lanes`])
/// for the `n_rows` rows of `nb` super-blocks of `T` in `w` and every column of `cols`.
///
/// # Safety
/// `w` holds `n_rows` rows of `nb` super-blocks of `T`, `cols` came from
/// [`prepare_columns`]`::<T>` with `nb`; AVX2, FMA, F16C.
#[inline(always)]
pub(super) unsafe fn kquant_lanes<T: KLanes>(w: &[u8], n_rows: usize, nb: usize, cols: &Prepared, out: &mut [f32]) {
    let n_cols = cols.n_cols;
    // Taken out of the thread-local rather than borrowed in a closure: a closure would not
    // inherit the caller's target features, and the intrinsics would not inline.
    let mut band = BAND.take();
    unsafe {
        for row0 in (0..n_rows).step_by(BAND_ROWS) {
            let n = BAND_ROWS.min(n_rows - row0);
            transpose_band::<T>(w, row0, n, nb, &mut band);
            let mut c0 = 0;
            while c0 + 4 <= n_cols {
                for (c, v) in T::band_columns::<4>(&band, cols, c0, nb).into_iter().enumerate() {
                    store_band_column(out, n_rows, row0, n, c0 + c, v);
                }
                c0 += 4;
            }
            while c0 < n_cols {
                let [v] = T::band_columns::<1>(&band, cols, c0, nb);
                store_band_column(out, n_rows, row0, n, c0, v);
                c0 += 1;
            }
        }
    }
    BAND.set(band);
}
