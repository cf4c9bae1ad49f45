//! Q3_K, Q4_K and Q6_K GEMM with the activation columns in the vector lanes (AVX-512 VNNI): the
//! kernel for prefill and other batches of [`TILE_COLS`] columns or more.
//!
//! The column kernels (`wide.rs`) put 64 weights of one row in a vector and unpack each weight
//! block again for every group of eight columns. Here a call first unpacks its weight rows once
//! ([`Unpacked`]: one byte per weight, made non-negative, plus the sub-block scales as i32), and
//! the activations are laid out once per matrix ([`TiledColumns`]): per four-element group `kg`
//! of a super-block, the four Q8_K bytes of each of sixteen columns side by side. Then one
//! `vpdpbusd` multiplies four weights of one row (broadcast) with those four elements of sixteen
//! columns: 64 multiply-adds with no shuffling, eight rows (a band) sharing each activation load.
//! Per sub-block the band's i32 lanes are scaled (`vpmulld`) into the super-block's sum; the
//! offset or min term `sum_j m_j * bsum_j` over the sixteen Q8_K block sums comes from eight
//! `vpdpwssd` per row and super-block. This is the layout of llama.cpp's `tiled` VNNI kernels
//! (`ggml/src/ggml-cpu/tiled/tiled-kernel.cpp`, an 8x16 band); the code here is our own.
//!
//! Exactness: every super-block's integer sum is exact, and its f32 operations are those of the
//! portable kernels (`quant/kquants.rs`) in their order, so every result is bit-identical to the
//! portable kernel's (and the 256-bit kernels'), whatever the column count. It differs from the
//! 512-bit column kernels (`wide.rs`) in f32 rounding only, as they sum in sixteen lanes.

use std::arch::x86_64::*;
use std::cell::Cell;

use super::super::kquants::k4_scales_mins;
use super::f16_at;
use super::kquants::{Q8_K_BSUMS, Q8_K_BYTES, Q8_K_QS, paired_mins, q3_k_scales};
use super::load;
use super::wide::{halves8, halves16};

/// Activation columns per tile: the sixteen f32/i32 lanes of a 512-bit vector.
pub(crate) const TILE_COLS: usize = 16;
/// Weight rows per band (rows of one micro-kernel call; a call's rows are padded to a multiple).
pub(super) const BAND_ROWS: usize = 8;
/// Most weight rows one call unpacks (the rows of a matmul work item).
pub(crate) const MAX_ROWS: usize = 32;
/// Elements of a super-block.
const QK_K: usize = 256;
/// Four-element groups of a super-block.
const GROUPS: usize = QK_K / 4;

/// Q8_K activation rows (each `nb` 292-byte blocks) in the tiled layout, [`TILE_COLS`] columns
/// per tile; a last partial tile is padded with zero columns (scale 0, quants 0).
pub(crate) struct TiledColumns {
    n_cols: usize,
    nb: usize,
    /// `[tile][block][kg: 64][column: 16][4]` i8: elements `4kg..4kg + 4` of each column.
    codes: Vec<u8>,
    /// `[tile][block][pair: 8][column: 16][2]` i16: the Q8_K block sums `2p`, `2p + 1` (each the
    /// sum of sixteen quants).
    bsums: Vec<u8>,
    /// `[tile][block][column: 16]` f32: the Q8_K scales.
    d: Vec<f32>,
}

impl TiledColumns {
    /// Lays out `a` (every row `nb` Q8_K blocks). Panics when a row has another length.
    pub(crate) fn new(a: &[&[u8]], nb: usize) -> Self {
        let tiles = a.len().div_ceil(TILE_COLS);
        let mut codes = vec![0u8; tiles * nb * GROUPS * TILE_COLS * 4];
        let mut bsums = vec![0u8; tiles * nb * 8 * TILE_COLS * 4];
        let mut d = vec![0.0f32; tiles * nb * TILE_COLS];
        for (col, row) in a.iter().enumerate() {
            assert_eq!(row.len(), nb * Q8_K_BYTES, "Q8_K row of {nb} blocks");
            let (tile, c) = (col / TILE_COLS, col % TILE_COLS);
            for (b, block) in row.chunks_exact(Q8_K_BYTES).enumerate() {
                let tb = tile * nb + b;
                d[tb * TILE_COLS + c] = f32::from_le_bytes(block[..4].try_into().unwrap());
                let quants = block[Q8_K_QS..Q8_K_QS + QK_K].as_chunks::<4>().0;
                for (kg, four) in quants.iter().enumerate() {
                    let at = ((tb * GROUPS + kg) * TILE_COLS + c) * 4;
                    codes[at..at + 4].copy_from_slice(four);
                }
                let sums = block[Q8_K_BSUMS..Q8_K_BSUMS + 32].as_chunks::<4>().0;
                for (p, pair) in sums.iter().enumerate() {
                    let at = ((tb * 8 + p) * TILE_COLS + c) * 4;
                    bsums[at..at + 4].copy_from_slice(pair);
                }
            }
        }
        TiledColumns { n_cols: a.len(), nb, codes, bsums, d }
    }

    /// Columns laid out (without the padding).
    pub(crate) fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// Super-blocks per column.
    pub(crate) fn n_blocks(&self) -> usize {
        self.nb
    }

    /// Tiles of [`TILE_COLS`] columns.
    pub(crate) fn n_tiles(&self) -> usize {
        self.n_cols.div_ceil(TILE_COLS)
    }
}

/// Weight rows unpacked for the micro-kernel, rows padded with zeros to a multiple of
/// [`BAND_ROWS`]. Reused per thread (see [`with_unpacked`]).
#[derive(Default)]
pub(super) struct Unpacked {
    /// Rows held, padding included.
    rows: usize,
    nb: usize,
    /// `[row][element]`: the weight made non-negative (`u = q + offset`, 0..=63).
    codes: Vec<u8>,
    /// `[row][block][sub-block]`: the sub-block scales (`NS` per block).
    scales: Vec<i32>,
    /// `[row][block][pair: 8]`: i16 pairs `(m_2p, m_2p+1)`, `m_j` the multiplier of Q8_K block
    /// sum `j` in the offset (Q3_K `4 * scale`, Q6_K `32 * scale`) or min term (Q4_K `min`).
    mins: Vec<i32>,
    /// `[row][block]`: `d`.
    d: Vec<f32>,
    /// `[row][block]`: `dmin` (Q4_K; unused otherwise).
    dmin: Vec<f32>,
}

impl Unpacked {
    /// Sizes the buffers for `rows` rows of `nb` super-blocks with `ns` sub-blocks each, zeroing
    /// the padding rows past `filled`.
    fn reset(&mut self, rows: usize, filled: usize, nb: usize, ns: usize) {
        self.rows = rows;
        self.nb = nb;
        self.codes.resize(rows * nb * QK_K, 0);
        self.scales.resize(rows * nb * ns, 0);
        self.mins.resize(rows * nb * 8, 0);
        self.d.resize(rows * nb, 0.0);
        self.dmin.resize(rows * nb, 0.0);
        self.codes[filled * nb * QK_K..].fill(0);
        self.scales[filled * nb * ns..].fill(0);
        self.mins[filled * nb * 8..].fill(0);
        self.d[filled * nb..].fill(0.0);
        self.dmin[filled * nb..].fill(0.0);
    }
}

thread_local! {
    static UNPACKED: Cell<Unpacked> = Cell::new(Unpacked::default());
}

/// Runs `f` with this thread's [`Unpacked`] buffers (taken out of the thread-local and put back,
/// so the buffers are allocated once per thread, not per call).
pub(super) fn with_unpacked<R>(f: impl FnOnce(&mut Unpacked) -> R) -> R {
    let mut unpacked = UNPACKED.take();
    let result = f(&mut unpacked);
    UNPACKED.set(unpacked);
    result
}

/// A k-quant type of the tiled kernel: its block and how it unpacks.
pub(super) trait Tiled {
    /// Bytes of a weight block.
    const BYTES: usize;
    /// Sub-blocks per super-block (16 of 16 elements or 8 of 32).
    const NS: usize;
    /// Whether the type has a separate `dmin` (Q4_K) rather than an offset folded into `d`.
    const HAS_MIN: bool;

    /// Unpacks the block at `b` into `codes[..256]`, `scales[..NS]`, `mins[..8]`; returns `(d,
    /// dmin)`.
    ///
    /// # Safety
    /// `b` is a whole block, the outputs writable for their lengths; AVX-512 F/BW/VL, F16C.
    unsafe fn unpack(b: *const u8, codes: *mut u8, scales: *mut i32, mins: *mut i32) -> (f32, f32);
}

/// Q3_K: `u = q + 4`; the offset term's multipliers are `4 * scale`.
pub(super) struct Q3K;
/// Q4_K: `u = q`; the min term's multipliers are the mins, each for two block sums.
pub(super) struct Q4K;
/// Q6_K: `u = q + 32`; the offset term's multipliers are `32 * scale`.
pub(super) struct Q6K;

/// Stores 64 bytes at `p`.
///
/// # Safety
/// `p..p + 64` writable; AVX-512 F.
#[inline(always)]
unsafe fn store512(p: *mut u8, v: __m512i) {
    unsafe { _mm512_storeu_si512(p.cast(), v) }
}

/// The sixteen i8 scales `s` as i32 at `scales`, and `s << shift` as i16 pairs at `mins`.
///
/// # Safety
/// Outputs writable (64 and 32 bytes); AVX-512 F/BW/VL.
#[inline(always)]
unsafe fn store_scales16<const SHIFT: i32>(s: __m128i, scales: *mut i32, mins: *mut i32) {
    unsafe {
        _mm512_storeu_si512(scales.cast(), _mm512_cvtepi8_epi32(s));
        _mm256_storeu_si256(mins.cast(), _mm256_slli_epi16::<SHIFT>(_mm256_cvtepi8_epi16(s)));
    }
}

impl Tiled for Q3K {
    const BYTES: usize = 110;
    const NS: usize = 16;
    const HAS_MIN: bool = false;

    #[inline(always)]
    unsafe fn unpack(b: *const u8, codes: *mut u8, scales: *mut i32, mins: *mut i32) -> (f32, f32) {
        unsafe {
            let (low2, four) = (_mm512_set1_epi8(3), _mm512_set1_epi8(4));
            // As in `wide::q3_k`: per 128-element half, groups j | j + 1 in one vector.
            let qs_shifts = [halves16(0, 2), halves16(4, 6)];
            let hm_bits = [[halves8(1, 2), halves8(4, 8)], [halves8(16, 32), halves8(64, -128)]];
            let hm = _mm512_broadcast_i64x4(load(b));
            for (h, hm_half) in hm_bits.iter().enumerate() {
                let qs = _mm512_broadcast_i64x4(load(b.add(32 + 32 * h)));
                for (pair, (&qs_shift, &hm_bit)) in qs_shifts.iter().zip(hm_half).enumerate() {
                    let low = _mm512_and_si512(_mm512_srlv_epi16(qs, qs_shift), low2);
                    let u = _mm512_mask_add_epi8(low, _mm512_test_epi8_mask(hm, hm_bit), low, four);
                    store512(codes.add(128 * h + 64 * pair), u);
                }
            }
            store_scales16::<2>(q3_k_scales(b.add(96)), scales, mins);
            let d = f16_at(b.add(108));
            (d, d)
        }
    }
}

impl Tiled for Q4K {
    const BYTES: usize = 144;
    const NS: usize = 8;
    const HAS_MIN: bool = true;

    #[inline(always)]
    unsafe fn unpack(b: *const u8, codes: *mut u8, scales: *mut i32, mins: *mut i32) -> (f32, f32) {
        unsafe {
            let low4 = _mm512_set1_epi8(0xF);
            for j in 0..4 {
                let q = load(b.add(16 + 32 * j));
                let u = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<4>(q));
                store512(codes.add(64 * j), _mm512_and_si512(u, low4));
            }
            let (sc, m) = k4_scales_mins(&b.add(4).cast::<[u8; 12]>().read_unaligned());
            let sc = _mm_cvtsi64_si128(i64::from_le_bytes(sc));
            _mm256_storeu_si256(scales.cast(), _mm256_cvtepu8_epi32(sc));
            _mm256_storeu_si256(mins.cast(), paired_mins(m));
            (f16_at(b), f16_at(b.add(2)))
        }
    }
}

impl Tiled for Q6K {
    const BYTES: usize = 210;
    const NS: usize = 16;
    const HAS_MIN: bool = false;

    #[inline(always)]
    unsafe fn unpack(b: *const u8, codes: *mut u8, scales: *mut i32, mins: *mut i32) -> (f32, f32) {
        unsafe {
            // As in `wide::q6_k`: per 128-element half, groups 0|1 then 2|3.
            let (low4, high2) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(0x30));
            let up = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
            let down = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
            for h in 0..2 {
                let ql = _mm512_loadu_si512(b.add(64 * h).cast());
                let qh = _mm512_broadcast_i64x4(load(b.add(128 + 32 * h)));
                let g01 =
                    _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_and_si512(_mm512_sllv_epi16(qh, up), high2));
                let g23 = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                    _mm512_and_si512(_mm512_srlv_epi16(qh, down), high2),
                );
                store512(codes.add(128 * h), g01);
                store512(codes.add(128 * h + 64), g23);
            }
            store_scales16::<5>(_mm_loadu_si128(b.add(192).cast()), scales, mins);
            let d = f16_at(b.add(208));
            (d, d)
        }
    }
}

/// Unpacks `n_rows` rows of `nb` blocks of `T` (back to back in `w`) into `u`, padded to whole
/// bands.
///
/// # Safety
/// `w` holds `n_rows * nb` blocks of `T`; AVX-512 F/BW/VL, F16C.
#[inline(always)]
pub(super) unsafe fn unpack_rows<T: Tiled>(w: &[u8], n_rows: usize, nb: usize, u: &mut Unpacked) {
    u.reset(n_rows.next_multiple_of(BAND_ROWS), n_rows, nb, T::NS);
    for i in 0..n_rows * nb {
        unsafe {
            let (d, dmin) = T::unpack(
                w.as_ptr().add(i * T::BYTES),
                u.codes.as_mut_ptr().add(i * QK_K),
                u.scales.as_mut_ptr().add(i * T::NS),
                u.mins.as_mut_ptr().add(i * 8),
            );
            *u.d.get_unchecked_mut(i) = d;
            *u.dmin.get_unchecked_mut(i) = dmin;
        }
    }
}

/// The band of rows `row0..row0 + 8` of `u` times tile `tile` of `cols`: per row, the sixteen
/// columns' dot products.
///
/// Per super-block `b`, row `r`, column `c`: `s1 = sum_s scale_s * sum_{k in s} u_k * a_k` and
/// `s2 = sum_j m_j * bsum_j` (exact i32), then in f32 as the portable kernels:
/// `(d * ad) * (s1 - s2)`, or with a min `(d * ad) * s1 - (dmin * ad) * s2`, added to the row's
/// sum.
///
/// # Safety
/// `row0 + 8 <= u.rows`, `tile < cols.n_tiles()`, `u.nb == cols.nb`; AVX-512 F/BW/VL/VNNI.
#[inline(always)]
unsafe fn band<T: Tiled>(u: &Unpacked, row0: usize, cols: &TiledColumns, tile: usize) -> [__m512; BAND_ROWS] {
    unsafe {
        let nb = u.nb;
        let k = nb * QK_K;
        let group_count = GROUPS / T::NS;
        let w = u.codes.as_ptr().add(row0 * k);
        let codes = cols.codes.as_ptr().add(tile * nb * GROUPS * TILE_COLS * 4);
        let bsums = cols.bsums.as_ptr().add(tile * nb * 8 * TILE_COLS * 4);
        let ad_all = cols.d.as_ptr().add(tile * nb * TILE_COLS);
        let mut sum = [_mm512_setzero_ps(); BAND_ROWS];
        for b in 0..nb {
            let mut s1 = [_mm512_setzero_si512(); BAND_ROWS];
            for s in 0..T::NS {
                let mut acc = [_mm512_setzero_si512(); BAND_ROWS];
                for g in 0..group_count {
                    let kg = s * group_count + g;
                    let a = _mm512_loadu_si512(codes.add((b * GROUPS + kg) * TILE_COLS * 4).cast());
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let four = w.add(t * k + b * QK_K + kg * 4).cast::<i32>().read_unaligned();
                        *acc = _mm512_dpbusd_epi32(*acc, _mm512_set1_epi32(four), a);
                    }
                }
                for (t, (s1, acc)) in s1.iter_mut().zip(acc).enumerate() {
                    let scale = *u.scales.get_unchecked(((row0 + t) * nb + b) * T::NS + s);
                    *s1 = _mm512_add_epi32(*s1, _mm512_mullo_epi32(acc, _mm512_set1_epi32(scale)));
                }
            }
            let mut s2 = [_mm512_setzero_si512(); BAND_ROWS];
            for p in 0..8 {
                let bsum = _mm512_loadu_si512(bsums.add((b * 8 + p) * TILE_COLS * 4).cast());
                for (t, s2) in s2.iter_mut().enumerate() {
                    let m = *u.mins.get_unchecked(((row0 + t) * nb + b) * 8 + p);
                    *s2 = _mm512_dpwssd_epi32(*s2, _mm512_set1_epi32(m), bsum);
                }
            }
            let ad = _mm512_loadu_ps(ad_all.add(b * TILE_COLS));
            for t in 0..BAND_ROWS {
                let i = (row0 + t) * nb + b;
                let dd = _mm512_mul_ps(_mm512_set1_ps(*u.d.get_unchecked(i)), ad);
                let part = if T::HAS_MIN {
                    let dm = _mm512_mul_ps(_mm512_set1_ps(*u.dmin.get_unchecked(i)), ad);
                    _mm512_sub_ps(
                        _mm512_mul_ps(dd, _mm512_cvtepi32_ps(s1[t])),
                        _mm512_mul_ps(dm, _mm512_cvtepi32_ps(s2[t])),
                    )
                } else {
                    _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_sub_epi32(s1[t], s2[t])))
                };
                sum[t] = _mm512_add_ps(sum[t], part);
            }
        }
        sum
    }
}

/// Tile `tile` of `cols` times every row of `u`: `out[r * TILE_COLS + c]` for the padded rows.
///
/// # Safety
/// `out.len() >= u.rows * TILE_COLS`, `tile < cols.n_tiles()`, `u.nb == cols.nb`; AVX-512
/// F/BW/VL/VNNI.
#[inline(always)]
pub(super) unsafe fn tile<T: Tiled>(u: &Unpacked, cols: &TiledColumns, tile: usize, out: &mut [f32]) {
    for row0 in (0..u.rows).step_by(BAND_ROWS) {
        unsafe {
            let sums = band::<T>(u, row0, cols, tile);
            for (t, sum) in sums.into_iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add((row0 + t) * TILE_COLS), sum);
            }
        }
    }
}
