//! Quantized matrix multiplication: GGUF weight rows times quantized activation rows.
//!
//! `out[t][r] = dot(weight row r, activation row t)`, the product `x · Wᵀ` of activations `x`
//! (`[n_rows, cols]`) with a weight matrix `W` (`[rows, cols]`, GGUF row-major: ggml's `ne0 =
//! cols`, `ne1 = rows`). Each dot product is [`crate::quant::vec_dot_cols`] on the activation
//! rows quantized to the weight type's [`VecDotType`], as ggml's CPU `mul_mat` does.
//!
//! Work is split over the current rayon pool by chunks of weight rows. A chunk walks the
//! activation rows in groups of [`MAX_COLS`] that one kernel call serves, and each group over
//! every row of the chunk: the group's activations (8 Q8_K rows of 2304 values are 21 KB) stay
//! in L1 while the chunk's weight rows (a few KB each) come from L2 after the first group, the
//! smaller of the two streams. Batches of [`TILED_MIN_COLS`] columns or more of a type with a
//! tiled kernel (Q3_K, Q4_K, Q6_K on AVX-512 VNNI) are laid out once per product (`Columns`);
//! a chunk then unpacks its weight rows once and multiplies them with every tile of sixteen
//! columns. Below that size a result does not depend on the batch it was computed in; the tiled
//! kernels give the portable kernels' bits, which differ from the 512-bit column kernels' in f32
//! rounding only (their integer sums are exact), so on AVX-512 VNNI a k-quant product computed in
//! a batch of [`TILED_MIN_COLS`] columns or more may differ in its last bits from the same
//! product computed alone.

use std::ops::Range;

use rayon::prelude::*;

#[cfg(doc)]
use crate::quant::TILED_MIN_COLS;
use crate::quant::{DotKernel, GgmlType, Isa, LaneColumns, MAX_COLS, TILED_MAX_ROWS, TiledColumns, VecDotType};

/// Weight rows per work item are a multiple of this (a band of the tiled kernel).
const ROW_ALIGN: usize = 8;
/// At most this many weight rows per work item, so a chunk stays cache-resident while it is
/// multiplied with every activation row.
const MAX_ROWS_PER_CHUNK: usize = 32;
/// Work items per pool thread to aim for (load balance).
const CHUNKS_PER_THREAD: usize = 4;

/// Weight matrix in GGUF layout: `rows` rows of `cols` elements; row r is bytes
/// `[r * row_bytes, (r + 1) * row_bytes)` of `data`, each row `cols / ty.block_size()` blocks in
/// the block layout of `ty` (`ggml-common.h`).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    /// Element type of the weights.
    pub ty: GgmlType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Elements per row (input features); a multiple of `ty.block_size()`.
    pub cols: usize,
    /// `rows * row_bytes()` bytes.
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Wraps `data` as a `[rows, cols]` matrix of type `ty`. Panics when `cols` is not a multiple
    /// of the block size or `data.len() != rows * ty.row_bytes(cols)`.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Self {
        let row_bytes = ty
            .row_bytes(cols)
            .unwrap_or_else(|| panic!("{ty}: {cols} columns is not a multiple of the block size {}", ty.block_size()));
        assert_eq!(data.len(), rows * row_bytes, "{ty} [{rows}, {cols}] matrix: data length");
        Self { ty, rows, cols, data }
    }

    /// Bytes per row: `cols / ty.block_size() * ty.type_size()`.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// Row `r` (`row_bytes()` bytes). Panics when `r >= rows`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// Activation rows quantized to a [`VecDotType`], `[n_rows, cols]`: row `i` is bytes
/// `[i * ty.row_bytes(cols), (i + 1) * ty.row_bytes(cols))` of `data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizedActivations {
    /// Layout of each row.
    pub ty: VecDotType,
    /// Number of rows (tokens).
    pub n_rows: usize,
    /// Elements per row; a multiple of `ty.block_size()`.
    pub cols: usize,
    /// `n_rows * ty.row_bytes(cols)` bytes.
    pub data: Vec<u8>,
}

impl QuantizedActivations {
    /// Quantizes `x` (`[n_rows, cols]` f32, row-major) row by row with
    /// [`VecDotType::quantize_row`], in parallel on the current rayon pool. Panics when
    /// `x.len() != n_rows * cols` or `cols` is not a multiple of the block size.
    pub fn quantize(ty: VecDotType, x: &[f32], n_rows: usize, cols: usize) -> Self {
        assert_eq!(x.len(), n_rows * cols, "activations: expected [{n_rows}, {cols}]");
        assert!(
            cols.is_multiple_of(ty.block_size()),
            "{ty:?}: {cols} columns is not a multiple of the block size {}",
            ty.block_size()
        );
        let row_bytes = ty.row_bytes(cols);
        let mut data = vec![0u8; n_rows * row_bytes];
        if row_bytes > 0 {
            data.par_chunks_mut(row_bytes).zip(x.par_chunks(cols)).for_each(|(dst, x)| ty.quantize_row(x, dst));
        }
        Self { ty, n_rows, cols, data }
    }

    /// Row `i` (`ty.row_bytes(cols)` bytes). Panics when `i >= n_rows`.
    pub fn row(&self, i: usize) -> &[u8] {
        assert!(i < self.n_rows, "row {i} of {}", self.n_rows);
        let rb = self.ty.row_bytes(self.cols);
        &self.data[i * rb..(i + 1) * rb]
    }
}

/// Weight rows per work item for a matrix of `rows` rows on the current pool.
pub(crate) fn rows_per_chunk(rows: usize) -> usize {
    let items = rayon::current_num_threads().max(1) * CHUNKS_PER_THREAD;
    rows.div_ceil(items).next_multiple_of(ROW_ALIGN).clamp(ROW_ALIGN, MAX_ROWS_PER_CHUNK)
}

/// The activation rows of one matrix product (in the weight type's `vec_dot_type()` layout),
/// with the kernel resolved once and, for batches the type's tiled kernel takes, the rows laid out
/// for it once for all work items.
pub(crate) struct Columns<'a> {
    rows: Vec<&'a [u8]>,
    kernel: DotKernel,
    tiled: Option<TiledColumns>,
    lanes: Option<LaneColumns>,
}

impl<'a> Columns<'a> {
    /// `rows` as the columns of products with `w`. Panics when a row's length does not fit `w`.
    pub(crate) fn new(w: &QMatrix, rows: Vec<&'a [u8]>) -> Self {
        let kernel = DotKernel::new(Isa::active(), w.ty, w.cols);
        let tiled = kernel.tiled_columns(&rows);
        let lanes = kernel.lane_columns(&rows);
        Columns { rows, kernel, tiled, lanes }
    }
}

/// `dot(w.row(r), x[t])` for every `r` in `rows` and every activation row `x[t]`, handed to
/// `sink(t, r0, values)` in runs: `values[i] = dot(w.row(r0 + i), x[t])`. A run is all of a
/// token's rows in the chunk with the AVX2 lanes kernels, and in the per-row path when a group
/// holds one activation row (decoding); otherwise single values. With the tiled kernel,
/// [`TILED_MAX_ROWS`] weight rows unpacked at a time for all its columns; the other columns
/// [`MAX_COLS`] activation rows per kernel call, each group over all of `rows`.
/// Single-threaded: the caller parallelizes. `x` must come from [`Columns::new`] with `w`'s type
/// and length.
pub(crate) fn dot_rows(w: &QMatrix, x: &Columns, rows: Range<usize>, mut sink: impl FnMut(usize, usize, &[f32])) {
    let kernel = &x.kernel;
    let rb = w.row_bytes();
    if let Some(lanes) = &x.lanes {
        kernel.run_lanes(&w.data[rows.start * rb..rows.end * rb], lanes, |t, r0, values| {
            sink(t, rows.start + r0, values)
        });
        return;
    }
    let mut first = 0;
    if let Some(tiled) = &x.tiled {
        for start in rows.clone().step_by(TILED_MAX_ROWS) {
            let end = rows.end.min(start + TILED_MAX_ROWS);
            kernel.run_tiled(&w.data[start * rb..end * rb], tiled, |r, t, v| sink(t, start + r, &[v]));
        }
        first = tiled.n_cols();
    }
    // On the stack: this runs once per work item, and the allocator is shared by all threads.
    let mut values = [0.0f32; MAX_ROWS_PER_CHUNK * MAX_COLS];
    for (group_index, group) in x.rows[first..].chunks(MAX_COLS).enumerate() {
        let t0 = first + group_index * MAX_COLS;
        for start in rows.clone().step_by(MAX_ROWS_PER_CHUNK) {
            let end = rows.end.min(start + MAX_ROWS_PER_CHUNK);
            let values = &mut values[..(end - start) * group.len()];
            kernel.run_rows(&w.data[start * rb..end * rb], group, values);
            if group.len() == 1 {
                sink(t0, start, values);
                continue;
            }
            for (r, row_values) in (start..end).zip(values.chunks_exact(group.len())) {
                for (k, &v) in row_values.iter().enumerate() {
                    sink(t0 + k, r, &[v]);
                }
            }
        }
    }
}

/// A `[n, len]`-shaped f32 output that parallel work items fill at disjoint indices.
#[derive(Clone, Copy)]
pub(crate) struct DisjointOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a `DisjointOut` is only created from a `&mut [f32]` that outlives every use, and its
// users write disjoint indices (documented on `write`), so sharing it across threads is sound.
unsafe impl Send for DisjointOut {}
// SAFETY: as above.
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    /// Wraps `out`; the wrapper must not outlive the borrow (use it inside the scope that owns
    /// `out`, e.g. a rayon `for_each`).
    pub(crate) fn new(out: &mut [f32]) -> Self {
        DisjointOut { ptr: out.as_mut_ptr(), len: out.len() }
    }

    /// Writes `values` at indices `i..i + values.len()`. Panics when that range is out of bounds.
    ///
    /// # Safety
    /// No other thread reads or writes those indices while the wrapped slice is shared, and the
    /// slice is still borrowed.
    #[inline]
    pub(crate) unsafe fn write_run(&self, i: usize, values: impl ExactSizeIterator<Item = f32>) {
        let n = values.len();
        assert!(i.checked_add(n).is_some_and(|end| end <= self.len), "indices {i}..{i}+{n} of {}", self.len);
        for (k, v) in values.enumerate() {
            // SAFETY: in bounds (checked above, and the iterator yields its stated length);
            // exclusive per the caller's contract.
            unsafe { self.ptr.add(i + k).write(v) }
        }
    }
}

/// `out = x · wᵀ`: out is `[x.n_rows, w.rows]` row-major, `out[t * w.rows + r] = dot(w.row(r),
/// x.row(t))` with the weight type's dot product ([`crate::quant::vec_dot`]).
///
/// Runs on the current rayon pool. Panics when `x.ty != w.ty.vec_dot_type()`, `x.cols != w.cols`
/// or `out.len() != x.n_rows * w.rows`.
pub fn matmul(w: &QMatrix, x: &QuantizedActivations, out: &mut [f32]) {
    assert_eq!(x.ty, w.ty.vec_dot_type(), "activations are not in {}'s vec_dot type", w.ty);
    assert_eq!(x.cols, w.cols, "activation and weight columns differ");
    assert_eq!(out.len(), x.n_rows * w.rows, "out must be [{}, {}]", x.n_rows, w.rows);
    assert_eq!(w.data.len(), w.rows * w.row_bytes(), "weight data length");
    assert_eq!(x.data.len(), x.n_rows * x.ty.row_bytes(x.cols), "activation data length");
    if out.is_empty() {
        return;
    }
    let rows = Columns::new(w, (0..x.n_rows).map(|t| x.row(t)).collect());
    let chunk = rows_per_chunk(w.rows);
    let dst = DisjointOut::new(out);
    (0..w.rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let range = c * chunk..((c + 1) * chunk).min(w.rows);
        // SAFETY: work item `c` writes only the columns `range` of `out`, disjoint between items.
        dot_rows(w, &rows, range, |t, r, vs| unsafe { dst.write_run(t * w.rows + r, vs.iter().copied()) });
    });
}

/// Convenience: quantizes `x` (`[n_rows, w.cols]` f32, row-major) to `w.ty.vec_dot_type()` with
/// [`QuantizedActivations::quantize`], then calls [`matmul`]; `out` is `[n_rows, w.rows]`.
pub fn matmul_f32(w: &QMatrix, x: &[f32], n_rows: usize, out: &mut [f32]) {
    let x = QuantizedActivations::quantize(w.ty.vec_dot_type(), x, n_rows, w.cols);
    matmul(w, &x, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testing::random_row;
    use crate::quant::vec_dot;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const TYPES: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool")
    }

    fn random_f32s(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// Rows 37 and 101 are not multiples of any chunk size (multiples of 8) nor of the tiled
    /// kernel's band; 17 and 44 activation rows take it (k-quants on AVX-512 VNNI, the portable
    /// kernel's bits) with columns left to the column kernels or a padded last tile; 3 threads
    /// give several chunks whatever the machine.
    #[test]
    fn matmul_equals_per_row_vec_dot() {
        let mut rng = ChaCha8Rng::seed_from_u64(20);
        for threads in [1, 3] {
            let pool = pool(threads);
            for ty in TYPES {
                for (rows, cols) in [(37, 64), (101, 256), (5, 32usize)] {
                    if !cols.is_multiple_of(ty.block_size()) {
                        continue;
                    }
                    let data = random_row(ty, rows * cols, &mut rng);
                    let w = QMatrix::new(ty, rows, cols, &data);
                    for n_rows in [1, 3, 17, 44] {
                        let xf = random_f32s(&mut rng, n_rows * cols);
                        let x = QuantizedActivations::quantize(ty.vec_dot_type(), &xf, n_rows, cols);
                        let mut out = vec![f32::NAN; n_rows * rows];
                        pool.install(|| matmul(&w, &x, &mut out));
                        // Columns the tiled or lanes kernels take give the portable kernel's bits.
                        let a: Vec<&[u8]> = (0..n_rows).map(|t| x.row(t)).collect();
                        let kernel = DotKernel::new(Isa::active(), ty, cols);
                        let tiled = match kernel.takes_lanes(n_rows) {
                            true => n_rows,
                            false => kernel.tiled_columns(&a).map_or(0, |t| t.n_cols()),
                        };
                        for t in 0..n_rows {
                            for r in 0..rows {
                                let want = match t < tiled {
                                    true => (ty.vec_dot_fn())(w.row(r), x.row(t), cols),
                                    false => vec_dot(ty, w.row(r), x.row(t), cols),
                                };
                                let got = out[t * rows + r];
                                assert_eq!(got.to_bits(), want.to_bits(), "{ty} [{rows},{cols}] t={t} r={r}");
                            }
                        }

                        let mut out2 = vec![f32::NAN; n_rows * rows];
                        pool.install(|| matmul_f32(&w, &xf, n_rows, &mut out2));
                        assert_eq!(out2, out, "{ty}: matmul_f32");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_f32_weights_match_f64_product() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (rows, cols, n_rows) = (45, 300, 7);
        let wf = random_f32s(&mut rng, rows * cols);
        let xf = random_f32s(&mut rng, n_rows * cols);
        let data: Vec<u8> = wf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = QMatrix::new(GgmlType::F32, rows, cols, &data);
        let mut out = vec![0f32; n_rows * rows];
        pool(2).install(|| matmul_f32(&w, &xf, n_rows, &mut out));
        for t in 0..n_rows {
            for r in 0..rows {
                let (wr, xr) = (&wf[r * cols..][..cols], &xf[t * cols..][..cols]);
                let prods = wr.iter().zip(xr).map(|(&a, &b)| f64::from(a) * f64::from(b));
                let exact: f64 = prods.clone().sum();
                let abs: f64 = prods.map(f64::abs).sum();
                // f32 accumulation of 300 products in 16 lanes: far below 1e-5 of sum |products|.
                assert!((f64::from(out[t * rows + r]) - exact).abs() <= 1e-5 * abs);
            }
        }
    }

    #[test]
    fn empty_shapes() {
        let w = QMatrix::new(GgmlType::Q8_0, 0, 64, &[]);
        let x = QuantizedActivations::quantize(VecDotType::Q8_0, &[0.0; 128], 2, 64);
        matmul(&w, &x, &mut []);
        let data = random_row(GgmlType::Q8_0, 4 * 32, &mut ChaCha8Rng::seed_from_u64(22));
        let w = QMatrix::new(GgmlType::Q8_0, 4, 32, &data);
        matmul_f32(&w, &[], 0, &mut []);
    }

    #[test]
    #[should_panic(expected = "vec_dot type")]
    fn matmul_rejects_wrong_activation_type() {
        let data = random_row(GgmlType::Q4_1, 4 * 32, &mut ChaCha8Rng::seed_from_u64(23));
        let w = QMatrix::new(GgmlType::Q4_1, 4, 32, &data);
        let x = QuantizedActivations::quantize(VecDotType::Q8_0, &[0.5; 32], 1, 32);
        matmul(&w, &x, &mut [0.0; 4]);
    }

    #[test]
    #[should_panic(expected = "data length")]
    fn qmatrix_rejects_wrong_length() {
        QMatrix::new(GgmlType::Q4_0, 2, 32, &[0; 35]);
    }
}
