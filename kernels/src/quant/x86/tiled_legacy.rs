//! Q4_0, Q5_0 and Q8_0 GEMM with sixteen activation columns in the lanes of a 512-bit vector
//! (AVX-512 VNNI): the kernel for prefill and other batches of [`super::super::TILED_MIN_COLS`]
//! columns or more, where the several-rows kernels (`rows.rs`) would unpack each weight block
//! again for every eight columns and scale every block of every column separately.
//!
//! A product lays out its columns once ([`Columns`]): per tile of sixteen columns, block and
//! four-element group `g`, one vector of the sixteen columns' signed activations `4g..4g + 4`
//! (a 16 x 8 transpose of 32-bit groups), and per block the accumulator start `-m * sum(a)` of
//! each column. A call unpacks its weight rows once ([`Rows`]): per row and block the 32 weights
//! made non-negative (`u = w + m`: Q4_0 and Q5_0 their raw codes, `m` = 8 and 16; Q8_0 `w + 128`)
//! as eight 32-bit groups. Then eight `vpdpbusd`, each with four weights broadcast, give one
//! block of one row for sixteen columns, and a band of eight rows shares each activation load
//! (the layout of llama.cpp's `tiled` VNNI kernels, like `tiled.rs`; the code is our own).
//!
//! Exactness: each block's integer sum is exact (at most `32 * 255 * 128` before the offset),
//! and each block adds its product of `isum`, `d_w` and `d_a` to its row's sum in the portable
//! kernels' order and rounding (`quant/legacy.rs`), so every result is the portable kernel's,
//! bit for bit, whatever the column count (as `lanes.rs` on AVX2).

use std::arch::x86_64::*;
use std::cell::Cell;

use super::lanes::transpose8;
use super::legacy::{Q8_0_BYTES, unsigned_weights};
use super::wide::{Q4_0, Q5_0, legacy_block_bytes, offset_shift};
use super::{Vnni, f16_at, load};

/// Activation columns per tile: the sixteen 32-bit lanes of a vector.
const TILE_COLS: usize = 16;
/// Weight rows per band: rows that share each activation load.
const BAND_ROWS: usize = 8;
/// Four-element groups of a 32-element block.
const GROUPS: usize = 8;

/// A product's activation columns in the tiled layout, laid out once for all its calls; a last
/// partial tile is padded with zero columns.
pub(crate) struct Columns {
    n_cols: usize,
    /// `[tile][block][g: 8]`: lane `c` holds the signed activations `4g..4g + 4` of the tile's
    /// column `c`.
    codes: Vec<__m512i>,
    /// `[tile][block]`: each column's `-m * sum(a)`, the start of its accumulator.
    starts: Vec<__m512i>,
    /// `[tile][block]`: each column's `d_a`.
    d: Vec<__m512>,
}

/// A call's weight rows, unpacked.
#[derive(Default)]
struct Rows {
    /// `[row][block][g: 8]`: the non-negative weights `4g..4g + 4` as one 32-bit group.
    codes: Vec<i32>,
    /// `[row][block]`: `d_w`.
    d: Vec<f32>,
}

thread_local! {
    static ROWS: Cell<Rows> = Cell::new(Default::default());
}

/// The columns `a` (Q8_0 rows of `nb` blocks) laid out for [`legacy_tiled`] with weights of
/// `TYPE`.
///
/// # Safety
/// Every `a[c]` holds `nb` blocks; AVX-512 F/BW/VNNI, F16C.
#[inline(always)]
pub(super) unsafe fn lay_out_columns<const TYPE: u8>(a: &[&[u8]], nb: usize) -> Columns {
    let tiles = a.len().div_ceil(TILE_COLS);
    let mut cols = Columns {
        n_cols: a.len(),
        codes: Vec::with_capacity(tiles * nb * GROUPS),
        starts: Vec::with_capacity(tiles * nb),
        d: Vec::with_capacity(tiles * nb),
    };
    unsafe {
        let ones = _mm512_set1_epi8(1);
        for tile in a.chunks(TILE_COLS) {
            for k in 0..nb {
                let mut quants = [_mm256_setzero_si256(); TILE_COLS];
                let mut d = [0u16; TILE_COLS];
                for ((q, d), col) in quants.iter_mut().zip(&mut d).zip(tile) {
                    let block = col.as_ptr().add(k * Q8_0_BYTES);
                    *q = load(block.add(2));
                    *d = block.cast::<u16>().read_unaligned();
                }
                let lo = transpose8(quants[..8].try_into().unwrap());
                let hi = transpose8(quants[8..].try_into().unwrap());
                let mut sums = _mm512_setzero_si512();
                for g in 0..GROUPS {
                    let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo[g]), hi[g]);
                    sums = _mm512_dpbusd_epi32(sums, ones, v);
                    cols.codes.push(v);
                }
                let offset = _mm512_sllv_epi32(sums, _mm512_set1_epi32(offset_shift(TYPE) as i32));
                cols.starts.push(_mm512_sub_epi32(_mm512_setzero_si512(), offset));
                cols.d.push(_mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().cast())));
            }
        }
    }
    cols
}

/// Unpacks the `n_rows` rows of `nb` blocks of `TYPE` in `w` into `rows`.
///
/// # Safety
/// `w` holds the rows; AVX2, F16C.
#[inline(always)]
unsafe fn unpack_rows<const TYPE: u8>(w: &[u8], n_rows: usize, nb: usize, rows: &mut Rows) {
    let bytes = legacy_block_bytes(TYPE);
    rows.codes.clear();
    rows.d.clear();
    rows.codes.resize(n_rows * nb * GROUPS, 0);
    unsafe {
        for k in 0..n_rows * nb {
            let b = w.as_ptr().add(k * bytes);
            let u = unsigned_weights::<Vnni, TYPE>(b);
            _mm256_storeu_si256(rows.codes.as_mut_ptr().add(k * GROUPS).cast(), u);
            rows.d.push(f16_at(b));
        }
    }
}

/// Rows `r0..r0 + R` of `rows` times tile `tile` of `cols`: per block the portable kernel's
/// product of `isum`, `d_w` and `d_a`, added in block order; lane `c` is the tile's column `c`.
///
/// # Safety
/// `rows` holds rows `r0..r0 + R` and `cols` the tile, both of `nb` blocks; AVX-512 F/VNNI.
#[inline(always)]
unsafe fn band<const TYPE: u8, const R: usize>(
    rows: &Rows,
    r0: usize,
    cols: &Columns,
    tile: usize,
    nb: usize,
) -> [__m512; R] {
    unsafe {
        let mut sum = [_mm512_setzero_ps(); R];
        for k in 0..nb {
            let a = cols.codes.as_ptr().add((tile * nb + k) * GROUPS);
            let (start, da) = (*cols.starts.as_ptr().add(tile * nb + k), *cols.d.as_ptr().add(tile * nb + k));
            for (r, sum) in sum.iter_mut().enumerate() {
                let rk = (r0 + r) * nb + k;
                let w = rows.codes.as_ptr().add(rk * GROUPS);
                let mut isum = start;
                for g in 0..GROUPS {
                    isum = _mm512_dpbusd_epi32(isum, _mm512_set1_epi32(*w.add(g)), *a.add(g));
                }
                let (isum, dw) = (_mm512_cvtepi32_ps(isum), _mm512_set1_ps(*rows.d.as_ptr().add(rk)));
                // The portable kernels' products: Q4_0 `(isum * d_w) * d_a`, Q5_0
                // `(d_w * d_a) * isum`, Q8_0 `isum * (d_w * d_a)`.
                let part = match TYPE {
                    Q4_0 => _mm512_mul_ps(_mm512_mul_ps(isum, dw), da),
                    Q5_0 => _mm512_mul_ps(_mm512_mul_ps(dw, da), isum),
                    _ => _mm512_mul_ps(isum, _mm512_mul_ps(dw, da)),
                };
                *sum = _mm512_add_ps(*sum, part);
            }
        }
        sum
    }
}

/// Writes the `R` rows' results for the tile's `n` real columns `c0..c0 + n` into `out` (rows of
/// `n_cols` values).
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
unsafe fn emit<const R: usize>(sums: [__m512; R], r0: usize, c0: usize, n: usize, n_cols: usize, out: &mut [f32]) {
    for (r, v) in sums.iter().enumerate() {
        let mut values = [0.0f32; TILE_COLS];
        unsafe { _mm512_storeu_ps(values.as_mut_ptr(), *v) };
        out[(r0 + r) * n_cols + c0..][..n].copy_from_slice(&values[..n]);
    }
}

/// `out[r * n_cols + c] = dot(row r, column c)` for the `n_rows` rows of `nb` blocks of `TYPE`
/// in `w` and every column of `cols`.
///
/// # Safety
/// `w` holds `n_rows` rows of `nb` blocks of `TYPE`, `cols` came from [`lay_out_columns`] with
/// `TYPE` and `nb`; AVX2, FMA, F16C, AVX-512 F/BW/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn legacy_tiled<const TYPE: u8>(w: &[u8], n_rows: usize, nb: usize, cols: &Columns, out: &mut [f32]) {
    let n_cols = cols.n_cols;
    // Taken out of the thread-local rather than borrowed in a closure: a closure would not
    // inherit the caller's target features, and the intrinsics would not inline.
    let mut rows = ROWS.take();
    unsafe {
        unpack_rows::<TYPE>(w, n_rows, nb, &mut rows);
        let bands = n_rows - n_rows % BAND_ROWS;
        for tile in 0..n_cols.div_ceil(TILE_COLS) {
            let (c0, n) = (tile * TILE_COLS, TILE_COLS.min(n_cols - tile * TILE_COLS));
            for r0 in (0..bands).step_by(BAND_ROWS) {
                emit(band::<TYPE, BAND_ROWS>(&rows, r0, cols, tile, nb), r0, c0, n, n_cols, out);
            }
            for r0 in bands..n_rows {
                emit(band::<TYPE, 1>(&rows, r0, cols, tile, nb), r0, c0, n, n_cols, out);
            }
        }
    }
    ROWS.set(rows);
}
