//! GGUF tensor element types and their block layouts.
//!
//! Block layouts follow ggml (`ggml/src/ggml-common.h`, `ggml-quants.c` in llama.cpp). A weight
//! row of `n` elements is `n / block_size` consecutive blocks of `type_size` bytes. Dot products
//! quantize the activation row first to the weight type's [`VecDotType`] (as ggml does for its
//! `vec_dot` kernels), so the result equals llama.cpp's up to float summation order.

/// Element type of a GGUF tensor, with ggml's numeric type ids.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 32 weights: f16 scale `d`, 16 bytes of 4-bit quants; `w = d * (q - 8)`.
    Q4_0,
    /// 32 weights: f16 `d`, f16 `m`, 16 bytes of 4-bit quants; `w = d * q + m`.
    Q4_1,
    /// 32 weights: f16 `d`, 4 bytes of high bits, 16 bytes of low nibbles; `w = d * (q - 16)`.
    Q5_0,
    /// 32 weights: f16 `d`, f16 `m`, 4 bytes of high bits, 16 bytes of nibbles; `w = d * q + m`.
    Q5_1,
    /// 32 weights: f16 `d`, 32 signed bytes; `w = d * q`.
    Q8_0,
    /// 256-weight super-block of 16 sub-blocks, 2-bit quants with 4-bit scales and mins.
    Q2_K,
    /// 256-weight super-block of 16 sub-blocks, 3-bit quants with 6-bit scales.
    Q3_K,
    /// 256-weight super-block of 8 sub-blocks, 4-bit quants with 6-bit scales and mins.
    Q4_K,
    /// 256-weight super-block of 8 sub-blocks, 5-bit quants with 6-bit scales and mins.
    Q5_K,
    /// 256-weight super-block of 16 sub-blocks, 6-bit quants with 8-bit scales.
    Q6_K,
}

/// The type an activation row is converted to before a dot product with a weight row
/// (ggml's `vec_dot_type`): Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the k-quants.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VecDotType {
    /// Plain f32 (F32 weights).
    F32,
    /// f16 (F16 weights), as ggml converts activations for F16 matmuls.
    F16,
    /// bf16 (BF16 weights).
    BF16,
    /// 32 values: f16 `d`, 32 signed bytes.
    Q8_0,
    /// 32 values: f16 `d`, f16 `s = d * sum(q)`, 32 signed bytes.
    Q8_1,
    /// 256 values: f32 `d`, 256 signed bytes, 16 i16 sums of 16 quants each.
    Q8_K,
}

impl GgmlType {
    /// All supported types.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The type with ggml's numeric id (`enum ggml_type`), if supported.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// ggml's numeric id of this type (`enum ggml_type` in `ggml.h`).
    pub fn ggml_id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name of the type (`"q4_K"` style names are upper-cased as llama.cpp prints them).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// Bytes of a row of `n` elements; `None` when `n` is not a multiple of the block size.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_size()).then(|| n / self.block_size() * self.type_size())
    }

    /// Dequantizes one row: `src` holds `dst.len()` elements in this type's GGUF layout
    /// ([`GgmlType::row_bytes`] bytes); `dst` receives them as f32.
    ///
    /// Panics when `dst.len()` is not a multiple of the block size or `src` has the wrong length
    /// (callers validate tensor shapes first).
    pub fn dequantize_row(self, src: &[u8], dst: &mut [f32]) {
        assert_eq!(
            self.row_bytes(dst.len()),
            Some(src.len()),
            "{self}: {} bytes for a row of {} elements",
            src.len(),
            dst.len()
        );
        match self {
            GgmlType::F32 => float::dequantize_row_f32(src, dst),
            GgmlType::F16 => float::dequantize_row_f16(src, dst),
            GgmlType::BF16 => float::dequantize_row_bf16(src, dst),
            GgmlType::Q4_0 => legacy::dequantize_row_q4_0(src, dst),
            GgmlType::Q4_1 => legacy::dequantize_row_q4_1(src, dst),
            GgmlType::Q5_0 => legacy::dequantize_row_q5_0(src, dst),
            GgmlType::Q5_1 => legacy::dequantize_row_q5_1(src, dst),
            GgmlType::Q8_0 => legacy::dequantize_row_q8_0(src, dst),
            GgmlType::Q2_K => kquants::dequantize_row_q2_k(src, dst),
            GgmlType::Q3_K => kquants::dequantize_row_q3_k(src, dst),
            GgmlType::Q4_K => kquants::dequantize_row_q4_k(src, dst),
            GgmlType::Q5_K => kquants::dequantize_row_q5_k(src, dst),
            GgmlType::Q6_K => kquants::dequantize_row_q6_k(src, dst),
        }
    }

    /// The dot-product kernel for weight rows of this type (see [`vec_dot`]).
    pub(crate) fn vec_dot_fn(self) -> VecDotFn {
        match self {
            GgmlType::F32 => float::vec_dot_f32,
            GgmlType::F16 => float::vec_dot_f16,
            GgmlType::BF16 => float::vec_dot_bf16,
            GgmlType::Q4_0 => legacy::vec_dot_q4_0_q8_0,
            GgmlType::Q4_1 => legacy::vec_dot_q4_1_q8_1,
            GgmlType::Q5_0 => legacy::vec_dot_q5_0_q8_0,
            GgmlType::Q5_1 => legacy::vec_dot_q5_1_q8_1,
            GgmlType::Q8_0 => legacy::vec_dot_q8_0_q8_0,
            GgmlType::Q2_K => kquants::vec_dot_q2_k_q8_k,
            GgmlType::Q3_K => kquants::vec_dot_q3_k_q8_k,
            GgmlType::Q4_K => kquants::vec_dot_q4_k_q8_k,
            GgmlType::Q5_K => kquants::vec_dot_q5_k_q8_k,
            GgmlType::Q6_K => kquants::vec_dot_q6_k_q8_k,
        }
    }

    /// The type activations are quantized to for dot products with rows of this type.
    pub fn vec_dot_type(self) -> VecDotType {
        match self {
            GgmlType::F32 => VecDotType::F32,
            GgmlType::F16 => VecDotType::F16,
            GgmlType::BF16 => VecDotType::BF16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => VecDotType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => VecDotType::Q8_1,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => VecDotType::Q8_K,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl VecDotType {
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            VecDotType::F32 | VecDotType::F16 | VecDotType::BF16 => 1,
            VecDotType::Q8_0 | VecDotType::Q8_1 => 32,
            VecDotType::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            VecDotType::F32 => 4,
            VecDotType::F16 | VecDotType::BF16 => 2,
            VecDotType::Q8_0 => 34,
            VecDotType::Q8_1 => 36,
            VecDotType::Q8_K => 292,
        }
    }

    /// Bytes of a row of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// Quantizes (or converts) one f32 activation row `x` to this type's layout in `dst`.
    ///
    /// `x.len()` must be a multiple of the block size and `dst.len()` equal to
    /// [`VecDotType::row_bytes`]`(x.len())`; panics otherwise. Q8_0 / Q8_1 are bit-exact with
    /// ggml's `quantize_row_q8_0_ref` / `quantize_row_q8_1_ref`, F16 / BF16 with ggml's
    /// conversions (see [`legacy`], [`float`], [`kquants`]).
    pub fn quantize_row(self, x: &[f32], dst: &mut [u8]) {
        assert!(
            x.len().is_multiple_of(self.block_size()) && dst.len() == self.row_bytes(x.len()),
            "{self:?}: {} bytes for a row of {} elements",
            dst.len(),
            x.len()
        );
        match self {
            VecDotType::F32 => float::quantize_row_f32(x, dst),
            VecDotType::F16 => float::quantize_row_f16(x, dst),
            VecDotType::BF16 => float::quantize_row_bf16(x, dst),
            VecDotType::Q8_0 => legacy::quantize_row_q8_0(x, dst),
            VecDotType::Q8_1 => legacy::quantize_row_q8_1(x, dst),
            VecDotType::Q8_K => kquants::quantize_row_q8_k(x, dst),
        }
    }
}

/// A portable row dot-product kernel: `(w, a, n)` as in [`vec_dot`].
pub(crate) type VecDotFn = fn(&[u8], &[u8], usize) -> f32;

/// Dot product of one weight row and one activation row of `n` elements.
///
/// `w` is `n` elements of type `w_ty` in GGUF layout ([`GgmlType::row_bytes`]`(n)` bytes); `a` is
/// the activation row already in `w_ty.vec_dot_type()` layout ([`VecDotType::row_bytes`]`(n)`
/// bytes, e.g. from [`VecDotType::quantize_row`]). Runs the [`Isa::active`] kernel, so it equals
/// the matching column of [`vec_dot_cols`] bit for bit. Panics on length mismatches or when `n`
/// is not a multiple of the block size.
pub fn vec_dot(w_ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut out = [0.0f32];
    vec_dot_cols(w_ty, w, &[a], n, &mut out);
    out[0]
}

/// Dot products of one weight row with several activation rows: `out[c] = vec_dot(w_ty, w,
/// a[c], n)`, with the weight blocks loaded and unpacked once for all columns (the inner kernel
/// of batched matmul). Any number of columns; they are taken [`MAX_COLS`] at a time.
///
/// Lengths as in [`vec_dot`] for every column; `out.len() == a.len()`. Panics otherwise.
pub fn vec_dot_cols(w_ty: GgmlType, w: &[u8], a: &[&[u8]], n: usize, out: &mut [f32]) {
    vec_dot_cols_on(Isa::active(), w_ty, w, a, n, out);
}

/// Most activation rows one SIMD kernel call takes (larger batches are split).
pub const MAX_COLS: usize = 8;

/// Fewest activation rows for which [`DotKernel::tiled_columns`] lays them out for the tiled
/// kernel (Q3_K, Q4_K, Q6_K on AVX-512 VNNI); smaller batches take the column kernels. One tile
/// of sixteen columns costs 1.1-1.7 times what the column kernels take for eight (`kernels`
/// bench `matmul_896x2304`, 16 vs 8 rows).
pub const TILED_MIN_COLS: usize = 12;

/// Fewest columns past the last whole tile that still get a (zero-padded) tile of their own;
/// up to eight take the column kernels (one call), which is cheaper.
const TILED_MIN_REST: usize = 9;

/// Most weight rows one [`DotKernel::run_tiled`] call takes.
#[cfg(target_arch = "x86_64")]
pub const TILED_MAX_ROWS: usize = x86::tiled::MAX_ROWS;
/// Most weight rows one [`DotKernel::run_tiled`] call takes.
#[cfg(not(target_arch = "x86_64"))]
pub const TILED_MAX_ROWS: usize = 32;

/// Q8_K activation rows laid out for a tiled kernel ([`DotKernel::tiled_columns`]).
pub struct TiledColumns(
    #[cfg(target_arch = "x86_64")] x86::tiled::TiledColumns,
    #[cfg(not(target_arch = "x86_64"))] std::convert::Infallible,
);

/// Activation rows (Q8_0, or Q8_K for Q3_K and Q4_K) prepared for a batch kernel
/// ([`DotKernel::lane_columns`]).
pub struct LaneColumns {
    n_cols: usize,
    #[cfg(target_arch = "x86_64")]
    prepared: x86::LaneColumns,
}

impl TiledColumns {
    /// The leading activation rows laid out (the product's first `n_cols()` columns).
    pub fn n_cols(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        return self.0.n_cols();
        #[cfg(not(target_arch = "x86_64"))]
        match self.0 {}
    }
}

/// [`vec_dot_cols`] with the kernels of `isa`. Panics when this CPU does not support `isa`.
pub fn vec_dot_cols_on(isa: Isa, w_ty: GgmlType, w: &[u8], a: &[&[u8]], n: usize, out: &mut [f32]) {
    DotKernel::new(isa, w_ty, n).run(w, a, out);
}

/// The dot-product kernel for rows of `n` elements of one weight type, resolved once (kernel
/// choice, byte lengths) for the many rows of a matmul.
#[derive(Clone, Copy)]
pub struct DotKernel {
    ty: GgmlType,
    n: usize,
    /// Bytes of a weight row.
    w_bytes: usize,
    /// Bytes of an activation row.
    a_bytes: usize,
    #[cfg(target_arch = "x86_64")]
    simd: Option<x86::RawKernel>,
    /// The tiled kernel for batches of [`TILED_MIN_COLS`] columns or more, where the type has one.
    #[cfg(target_arch = "x86_64")]
    tiled: Option<x86::TiledKernel>,
    /// The batch kernel of a 32-element type for [`TILED_MIN_COLS`] columns or more, where the
    /// type has one (`x86::LanesKernel`).
    #[cfg(target_arch = "x86_64")]
    lanes: Option<x86::LanesKernel>,
    portable: VecDotFn,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's output buffer of [`DotKernel::run_lanes`].
    static LANES_OUT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl DotKernel {
    /// The kernel of `isa` for `ty` rows of `n` elements. Panics when `n` is not a multiple of
    /// the block size or this CPU does not support `isa`.
    pub fn new(isa: Isa, ty: GgmlType, n: usize) -> Self {
        let w_bytes = ty.row_bytes(n).unwrap_or_else(|| panic!("{ty}: {n} is not a multiple of the block size"));
        assert!(isa.supported(), "this CPU does not support {isa:?}");
        DotKernel {
            ty,
            n,
            w_bytes,
            a_bytes: ty.vec_dot_type().row_bytes(n),
            #[cfg(target_arch = "x86_64")]
            simd: isa.x86().and_then(|x86| x86::kernel(ty, x86)),
            #[cfg(target_arch = "x86_64")]
            tiled: isa.x86().and_then(|x86| x86::tiled_kernel(ty, x86)),
            #[cfg(target_arch = "x86_64")]
            lanes: isa.x86().and_then(|x86| x86::lanes_kernel(ty, x86)),
            portable: ty.vec_dot_fn(),
        }
    }

    /// `out[c] = dot(w, a[c])` for every column. Panics unless `w` has the weight row's bytes,
    /// every `a[c]` the activation row's bytes, and `out.len() == a.len()`.
    pub fn run(&self, w: &[u8], a: &[&[u8]], out: &mut [f32]) {
        let ty = self.ty;
        assert!(w.len() == self.w_bytes, "{ty}: {} weight bytes for a row of {} elements", w.len(), self.n);
        assert_eq!(a.len(), out.len(), "one output per activation row");
        self.check_columns(a);
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = self.simd {
            let n_blocks = self.n / ty.block_size();
            for (a, out) in a.chunks(MAX_COLS).zip(out.chunks_mut(MAX_COLS)) {
                // SAFETY: one whole row of `n_blocks` blocks and as many in every `a[c]` (checked
                // above), at most MAX_COLS columns; CPU support checked in `new`.
                unsafe { kernel(w, 1, a, n_blocks, out) };
            }
            return;
        }
        for (a, o) in a.iter().zip(out) {
            *o = (self.portable)(w, a, self.n);
        }
    }

    /// `out[r * a.len() + c] = dot(row r, a[c])` for the rows of `w` (whole weight rows back to
    /// back) and at most [`MAX_COLS`] columns: what [`Self::run`] gives row by row, with the
    /// activations prepared once for all rows where the type's kernel does that. Panics unless
    /// `w` is a whole number of rows, every `a[c]` has the activation row's bytes, and
    /// `out.len()` is rows times columns.
    pub fn run_rows(&self, w: &[u8], a: &[&[u8]], out: &mut [f32]) {
        let ty = self.ty;
        assert!(w.len().is_multiple_of(self.w_bytes), "{ty}: {} weight bytes are not whole rows", w.len());
        let n_rows = w.len() / self.w_bytes;
        assert!(a.len() <= MAX_COLS, "at most {MAX_COLS} activation rows per call");
        assert_eq!(out.len(), n_rows * a.len(), "one output per weight row and activation row");
        self.check_columns(a);
        if a.is_empty() || n_rows == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = self.simd {
            // SAFETY: lengths checked above (`n_rows >= 1` rows of `n / block_size` blocks, every
            // `a[c]` as many activation blocks, 1..=MAX_COLS columns); CPU support checked in
            // `new`.
            unsafe { kernel(w, n_rows, a, self.n / ty.block_size(), out) };
            return;
        }
        for (row, out) in w.chunks_exact(self.w_bytes).zip(out.chunks_exact_mut(a.len())) {
            self.run(row, a, out);
        }
    }

    /// The leading columns of `a` laid out for this kernel's tiled path, when it has one and `a`
    /// has at least [`TILED_MIN_COLS`] columns (then [`Self::run_tiled`] takes them): all of
    /// them, or the whole tiles of sixteen when at most eight would be left for a last one
    /// ([`TiledColumns::n_cols`] says how many; the rest take [`Self::run_rows`]). `None`
    /// otherwise. Panics unless every `a[c]` has the activation row's bytes.
    pub fn tiled_columns(&self, a: &[&[u8]]) -> Option<TiledColumns> {
        self.check_columns(a);
        #[cfg(target_arch = "x86_64")]
        if self.tiled.is_some() && a.len() >= TILED_MIN_COLS {
            let rest = a.len() % x86::tiled::TILE_COLS;
            let n = if rest >= TILED_MIN_REST || rest == 0 { a.len() } else { a.len() - rest };
            return Some(TiledColumns(x86::tiled::TiledColumns::new(&a[..n], self.n / kquants::QK_K)));
        }
        None
    }

    /// `sink(r, c, dot(row r, column c))` for the rows of `w` (whole weight rows back to back, at
    /// most [`TILED_MAX_ROWS`]) and every column of `cols`: the portable kernel's values, bit for
    /// bit (within 1e-5 of sum |w_i a_i| of what [`Self::run`] gives on AVX-512 VNNI). Panics unless `w` is a whole number of rows, at most [`TILED_MAX_ROWS`], and
    /// `cols` came from this kernel's [`Self::tiled_columns`].
    pub fn run_tiled(&self, w: &[u8], cols: &TiledColumns, sink: impl FnMut(usize, usize, f32)) {
        let ty = self.ty;
        assert!(w.len().is_multiple_of(self.w_bytes), "{ty}: {} weight bytes are not whole rows", w.len());
        #[cfg(target_arch = "x86_64")]
        {
            let kernel = self.tiled.unwrap_or_else(|| panic!("{ty} has no tiled kernel here"));
            assert_eq!(cols.0.n_blocks() * kquants::QK_K, self.n, "tiled columns of another length");
            // SAFETY: whole rows of `n / 256` super-blocks of this type (checked above; the row
            // count by `run_tiled`); CPU support checked in `new`.
            unsafe { x86::run_tiled(kernel, w, w.len() / self.w_bytes, &cols.0, sink) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (sink, &cols.0);
            panic!("{ty} has no tiled kernel here");
        }
    }

    /// Whether a product with `n_cols` columns takes [`Self::run_lanes`]: the type has a batch
    /// kernel (Q4_0, Q5_0, Q8_0, Q3_K, Q4_K on AVX2; Q4_0, Q5_0, Q8_0 on AVX-512 VNNI) and there are at least
    /// [`TILED_MIN_COLS`] columns.
    pub fn takes_lanes(&self, n_cols: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.lanes.is_some() {
            return n_cols >= TILED_MIN_COLS;
        }
        let _ = n_cols;
        false
    }

    /// The columns `a` prepared once for [`Self::run_lanes`], where the product
    /// [`Self::takes_lanes`]; `None` otherwise. Panics when a row of `a` has another length.
    pub fn lane_columns(&self, a: &[&[u8]]) -> Option<LaneColumns> {
        self.check_columns(a);
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = self.lanes.filter(|_| self.takes_lanes(a.len())) {
            // SAFETY: columns of `n / block_size` blocks of the activation type (checked above);
            // CPU support checked in `new`.
            let prepared = unsafe { (kernel.prepare)(a, self.n / self.ty.block_size()) };
            return Some(LaneColumns { n_cols: a.len(), prepared });
        }
        None
    }

    /// `sink(c, r0, values)` with `values[i] = dot(row r0 + i, column c)` for the rows of `w`
    /// (whole weight rows back to back) and every column of `cols`, eight weight rows at a time
    /// in the lanes of a vector (AVX2) or sixteen columns (AVX-512 VNNI): the portable kernel's
    /// values, bit for bit (within 1e-5 of sum |w_i a_i| of what [`Self::run`] gives). The runs
    /// follow the kernel's stores: each column's rows at once (AVX2), single values row by row
    /// (AVX-512 VNNI). Panics unless `w` is a whole number of rows and `cols` came from this
    /// kernel's [`Self::lane_columns`].
    pub fn run_lanes(&self, w: &[u8], cols: &LaneColumns, mut sink: impl FnMut(usize, usize, &[f32])) {
        let ty = self.ty;
        assert!(w.len().is_multiple_of(self.w_bytes), "{ty}: {} weight bytes are not whole rows", w.len());
        #[cfg(target_arch = "x86_64")]
        {
            let kernel = self.lanes.unwrap_or_else(|| panic!("{ty} has no lanes kernel here"));
            let (n_rows, n_cols) = (w.len() / self.w_bytes, cols.n_cols);
            if n_rows == 0 || n_cols == 0 {
                return;
            }
            // Taken out of the thread-local (and put back): one buffer per thread, as the
            // allocator is shared by all threads.
            let mut out = LANES_OUT.take();
            // Every value is written by the kernel: the buffer only grows, never cleared.
            if out.len() < n_rows * n_cols {
                out.resize(n_rows * n_cols, 0.0);
            }
            let values = &mut out[..n_rows * n_cols];
            // SAFETY: whole rows of `n / block_size` blocks (checked above), `cols` prepared by this
            // kernel for rows of that length, `values` of `n_rows * n_cols` values; CPU support
            // checked in `new`.
            unsafe { (kernel.run)(w, n_rows, self.n / ty.block_size(), &cols.prepared, values) }
            if kernel.column_major {
                for (c, column) in values.chunks_exact(n_rows).enumerate() {
                    sink(c, 0, column);
                }
            } else {
                for (r, row) in values.chunks_exact(n_cols).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        sink(c, r, &[v]);
                    }
                }
            }
            LANES_OUT.set(out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (&mut sink, cols.n_cols);
            panic!("{ty} has no lanes kernel here");
        }
    }

    fn check_columns(&self, a: &[&[u8]]) {
        for (c, a) in a.iter().enumerate() {
            let ty = self.ty;
            assert!(a.len() == self.a_bytes, "{ty}: activation row {c} has {} bytes, need {}", a.len(), self.a_bytes);
        }
    }
}

/// The instruction set of the dot-product kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (`legacy.rs`, `kquants.rs`, `float.rs`), any CPU.
    Portable,
    /// x86-64 AVX2 + FMA + F16C, 256-bit vectors.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI (`vpdpbusd`), 256-bit vectors.
    Avx512Vnni,
}

impl Isa {
    /// The kernels every dot product uses: the best this CPU supports, unless the environment
    /// variable `MOESHARD_KERNELS` names another (`portable`, `avx2`, `avx512vnni`; one the CPU
    /// lacks falls back to the best supported). Decided once per process.
    pub fn active() -> Isa {
        static ACTIVE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("MOESHARD_KERNELS").ok().and_then(|v| Isa::from_name(&v)) {
                Some(want) if want.supported() => want,
                _ => best,
            }
        })
    }

    /// The best instruction set this CPU supports.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if let Some(x86) = x86::X86Isa::detect() {
            return match x86 {
                x86::X86Isa::Avx2 => Isa::Avx2,
                x86::X86Isa::Avx512Vnni => Isa::Avx512Vnni,
            };
        }
        Isa::Portable
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(x86) = self.x86() {
            return x86.supported();
        }
        self == Isa::Portable
    }

    /// Every instruction set this CPU supports, portable first.
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.supported()).collect()
    }

    /// The lower-case name `MOESHARD_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    fn from_name(name: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni].into_iter().find(|i| i.name() == name.trim().to_ascii_lowercase())
    }

    #[cfg(target_arch = "x86_64")]
    fn x86(self) -> Option<x86::X86Isa> {
        match self {
            Isa::Portable => None,
            Isa::Avx2 => Some(x86::X86Isa::Avx2),
            Isa::Avx512Vnni => Some(x86::X86Isa::Avx512Vnni),
        }
    }
}

pub mod float;
pub mod kquants;
pub mod legacy;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Test helpers shared by the kernel tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::GgmlType;
    use half::f16;
    use rand::Rng;
    use rand_chacha::ChaCha8Rng;

    /// A random row of `n` elements of `ty` in GGUF layout. Float elements are uniform in
    /// [-1, 1); quant blocks have random quant and scale bits and finite f16 super-scales (`d` of
    /// magnitude in [1e-3, 0.1), either sign; `m` / `dmin` in [-0.5, 0.5)).
    pub(crate) fn random_row(ty: GgmlType, n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let f16_bytes = |rng: &mut ChaCha8Rng, lo: f32, hi: f32, signed: bool| {
            let v = rng.random_range(lo..hi);
            let v = if signed && rng.random::<bool>() { -v } else { v };
            f16::from_f32(v).to_le_bytes()
        };
        let has_min = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let mut out = vec![0u8; ty.vec_dot_type().row_bytes(n)];
                ty.vec_dot_type().quantize_row(&x, &mut out);
                return out;
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => false,
            GgmlType::Q4_1 | GgmlType::Q5_1 => true,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => false,
        };
        // Offsets of `d` and of `m` / `dmin` in a block (`ggml-common.h`).
        let (d_at, m_at) = match ty {
            GgmlType::Q2_K => (80, Some(82)),
            GgmlType::Q3_K => (108, None),
            GgmlType::Q4_K | GgmlType::Q5_K => (0, Some(2)),
            GgmlType::Q6_K => (208, None),
            _ => (0, has_min.then_some(2)),
        };
        let mut out = vec![0u8; ty.row_bytes(n).expect("whole blocks")];
        rng.fill(&mut out[..]);
        for block in out.chunks_exact_mut(ty.type_size()) {
            block[d_at..d_at + 2].copy_from_slice(&f16_bytes(rng, 1e-3, 0.1, true));
            if let Some(m) = m_at {
                block[m..m + 2].copy_from_slice(&f16_bytes(rng, -0.5, 0.5, false));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::random_row;
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The activation row `a` (in `ty`'s layout) as f32: Q8_1 blocks lose their `s` field and
    /// are read as Q8_0, Q8_K blocks are `d` times the quants.
    fn dequantize_activations(ty: VecDotType, a: &[u8], n: usize) -> Vec<f32> {
        match ty {
            VecDotType::Q8_0 => {
                let mut out = vec![0.0; n];
                GgmlType::Q8_0.dequantize_row(a, &mut out);
                out
            }
            VecDotType::Q8_1 => {
                let q8_0: Vec<u8> = a.chunks_exact(36).flat_map(|b| b[..2].iter().chain(&b[4..]).copied()).collect();
                dequantize_activations(VecDotType::Q8_0, &q8_0, n)
            }
            VecDotType::Q8_K => a
                .chunks_exact(292)
                .flat_map(|b| {
                    let d = f32::from_le_bytes(b[..4].try_into().unwrap());
                    b[4..260].iter().map(move |&q| d * f32::from(q as i8))
                })
                .collect(),
            _ => unreachable!("float types have no SIMD kernel"),
        }
    }

    /// `count` activation rows of `n` values uniform in [-3, 3), quantized to `vt`.
    fn random_activation_rows(vt: VecDotType, n: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<u8>> {
        (0..count)
            .map(|_| {
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let mut q = vec![0u8; vt.row_bytes(n)];
                vt.quantize_row(&x, &mut q);
                q
            })
            .collect()
    }

    /// `run_rows` over several rows equals `run` row by row bit for bit, in every instruction
    /// set and for 1 to 8 columns, and stays within 1e-5 of sum |w_i a_i| of the portable
    /// kernel; row lengths include block counts that are not a multiple of the several-rows
    /// kernels' steps (four blocks on AVX-512 VNNI, eight on AVX2: their tail paths), odd ones
    /// (a lone last block) and a row shorter than one step.
    #[test]
    fn run_rows_equals_row_by_row() {
        let mut rng = ChaCha8Rng::seed_from_u64(47);
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let vt = ty.vec_dot_type();
            for n in [32, 32 * 3, 256, 32 * 7, 896, 32 * 30, 2304] {
                let Some(row_bytes) = ty.row_bytes(n) else { continue };
                let n_rows = 5;
                let w: Vec<u8> = (0..n_rows).flat_map(|_| random_row(ty, n, &mut rng)).collect();
                let cols = random_activation_rows(vt, n, 8, &mut rng);
                for isa in Isa::all_supported() {
                    let kernel = DotKernel::new(isa, ty, n);
                    for n_cols in 1..=8 {
                        let a: Vec<&[u8]> = cols[..n_cols].iter().map(Vec::as_slice).collect();
                        let mut all = vec![f32::NAN; n_rows * n_cols];
                        kernel.run_rows(&w, &a, &mut all);
                        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
                            let mut one = vec![f32::NAN; n_cols];
                            kernel.run(row, &a, &mut one);
                            let mut wf = vec![0.0; n];
                            ty.dequantize_row(row, &mut wf);
                            for c in 0..n_cols {
                                let got = all[r * n_cols + c];
                                assert_eq!(got.to_bits(), one[c].to_bits(), "{ty} {isa:?} n={n} row {r} column {c}");
                                let portable = (ty.vec_dot_fn())(row, a[c], n);
                                let af = dequantize_activations(vt, a[c], n);
                                let abs: f64 = wf.iter().zip(&af).map(|(&w, &a)| f64::from(w * a).abs()).sum();
                                let diff = f64::from(got - portable).abs();
                                assert!(diff <= 1e-5 * abs, "{ty} {isa:?} n={n} row {r}: {got} vs {portable}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The tiled kernels equal the portable kernel bit for bit (same exact integer sums, same f32
    /// operations per super-block) and the AVX-512 VNNI column kernels within 1e-5 of
    /// sum |w_i a_i|, for every row of a call of 1 to 32 rows (bands padded) and 16 to 37 columns
    /// (a last padded tile, or columns left to the column kernels), rows of one to sixteen
    /// super-blocks.
    #[test]
    fn tiled_equals_portable_bit_for_bit() {
        if !Isa::Avx512Vnni.supported() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(53);
        for ty in [GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q6_K] {
            for (n, n_rows, n_cols) in [(256, 1, 16), (2304, 32, 37), (4096, 13, 20), (512, 8, 31)] {
                let row_bytes = ty.row_bytes(n).unwrap();
                let w: Vec<u8> = (0..n_rows).flat_map(|_| random_row(ty, n, &mut rng)).collect();
                let cols = random_activation_rows(VecDotType::Q8_K, n, n_cols, &mut rng);
                let a: Vec<&[u8]> = cols.iter().map(Vec::as_slice).collect();
                let kernel = DotKernel::new(Isa::Avx512Vnni, ty, n);
                let tiled = kernel.tiled_columns(&a).expect("a tiled kernel");
                // 37 = 2 tiles + 5 left to the column kernels; 20 = 1 + 4; 31 = 1 + a padded 15.
                let whole = if n_cols % 16 < 9 { n_cols - n_cols % 16 } else { n_cols };
                assert_eq!(tiled.n_cols(), whole, "{ty} {n_cols} columns");
                let mut got = vec![f32::NAN; n_rows * n_cols];
                kernel.run_tiled(&w, &tiled, |r, c, v| got[r * n_cols + c] = v);
                for (i, v) in got.iter().enumerate() {
                    let (r, c) = (i / n_cols, i % n_cols);
                    if c >= whole {
                        assert!(v.is_nan(), "{ty} column {c} is not the tiled kernel's");
                        continue;
                    }
                    let row = &w[r * row_bytes..][..row_bytes];
                    let portable = (ty.vec_dot_fn())(row, a[c], n);
                    assert_eq!(v.to_bits(), portable.to_bits(), "{ty} tiled n={n} row {r} col {c}: {v} vs {portable}");
                    let mut column = [0.0f32];
                    kernel.run(row, &a[c..c + 1], &mut column);
                    let (mut wf, af) = (vec![0.0; n], dequantize_activations(VecDotType::Q8_K, a[c], n));
                    ty.dequantize_row(row, &mut wf);
                    let abs: f64 = wf.iter().zip(&af).map(|(&w, &a)| f64::from(w * a).abs()).sum();
                    assert!(f64::from(v - column[0]).abs() <= 1e-5 * abs, "{ty} row {r} col {c}: {v} vs {}", column[0]);
                }
            }
        }
    }

    /// The batch kernels (AVX2 lanes, AVX-512 VNNI tiles) equal the portable kernel bit for bit
    /// (same exact integer sums, same f32 operations per block) and the same ISA's column kernels
    /// within 1e-5 of sum |w_i a_i|, for every row of calls of 1 to 33 rows (a partial last
    /// band) and 12 to 40 columns (a partial last tile), rows of 7 to 72 blocks.
    #[test]
    fn lanes_equal_portable_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(59);
        let cases = [
            (Isa::Avx2, GgmlType::Q4_0),
            (Isa::Avx2, GgmlType::Q5_0),
            (Isa::Avx2, GgmlType::Q8_0),
            (Isa::Avx2, GgmlType::Q3_K),
            (Isa::Avx2, GgmlType::Q4_K),
            (Isa::Avx512Vnni, GgmlType::Q4_0),
            (Isa::Avx512Vnni, GgmlType::Q5_0),
            (Isa::Avx512Vnni, GgmlType::Q8_0),
        ];
        for (isa, ty) in cases.into_iter().filter(|(isa, _)| isa.supported()) {
            let vt = ty.vec_dot_type();
            for (n, n_rows, n_cols) in [(32 * 7, 1, 12), (896, 33, 40), (2304, 8, 13), (32 * 9, 17, 16), (256, 11, 21)]
            {
                let Some(row_bytes) = ty.row_bytes(n) else { continue };
                let w: Vec<u8> = (0..n_rows).flat_map(|_| random_row(ty, n, &mut rng)).collect();
                let cols = random_activation_rows(vt, n, n_cols, &mut rng);
                let a: Vec<&[u8]> = cols.iter().map(Vec::as_slice).collect();
                let kernel = DotKernel::new(isa, ty, n);
                assert!(kernel.takes_lanes(n_cols) && !kernel.takes_lanes(TILED_MIN_COLS - 1));
                assert!(kernel.lane_columns(&a[..TILED_MIN_COLS - 1]).is_none());
                let prepared = kernel.lane_columns(&a).expect("a batch the kernel takes");
                let mut got = vec![f32::NAN; n_rows * n_cols];
                kernel.run_lanes(&w, &prepared, |c, r0, vs| {
                    for (i, &v) in vs.iter().enumerate() {
                        got[(r0 + i) * n_cols + c] = v;
                    }
                });
                for (i, v) in got.iter().enumerate() {
                    let (r, c) = (i / n_cols, i % n_cols);
                    let row = &w[r * row_bytes..][..row_bytes];
                    let portable = (ty.vec_dot_fn())(row, a[c], n);
                    assert_eq!(
                        v.to_bits(),
                        portable.to_bits(),
                        "{isa:?} {ty} n={n} row {r} col {c}: {v} vs {portable}"
                    );
                    let mut column = [0.0f32];
                    kernel.run(row, &a[c..c + 1], &mut column);
                    let (mut wf, af) = (vec![0.0; n], dequantize_activations(vt, a[c], n));
                    ty.dequantize_row(row, &mut wf);
                    let abs: f64 = wf.iter().zip(&af).map(|(&w, &a)| f64::from(w * a).abs()).sum();
                    assert!(f64::from(v - column[0]).abs() <= 1e-5 * abs, "{ty} row {r} col {c}: {v} vs {}", column[0]);
                }
            }
        }
    }

    /// Every SIMD kernel against the portable one within 1e-5 of sum |w_i a_i| (exact integer
    /// sums, f32 summation order differs); and in every instruction set each column of a batch
    /// equals that row alone bit for bit, for batches of 1 to 11 columns (more than
    /// [`MAX_COLS`]).
    #[test]
    fn simd_kernels_match_portable_and_are_batch_invariant() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let quantized = GgmlType::ALL.into_iter().filter(|t| t.block_size() > 1);
        for ty in quantized {
            let vt = ty.vec_dot_type();
            for n in [256, 2304] {
                let w = random_row(ty, n, &mut rng);
                let mut wf = vec![0.0; n];
                ty.dequantize_row(&w, &mut wf);
                let cols = random_activation_rows(vt, n, 11, &mut rng);
                let a: Vec<&[u8]> = cols.iter().map(Vec::as_slice).collect();
                let mut portable = vec![0.0f32; a.len()];
                vec_dot_cols_on(Isa::Portable, ty, &w, &a, n, &mut portable);
                for isa in Isa::all_supported() {
                    let mut batch = vec![f32::NAN; a.len()];
                    vec_dot_cols_on(isa, ty, &w, &a, n, &mut batch);
                    for (c, col) in a.iter().enumerate() {
                        let mut alone = [f32::NAN];
                        vec_dot_cols_on(isa, ty, &w, &[col], n, &mut alone);
                        assert_eq!(alone[0].to_bits(), batch[c].to_bits(), "{ty} {isa:?} n={n} column {c}");
                        let af = dequantize_activations(vt, col, n);
                        let abs: f64 = wf.iter().zip(&af).map(|(&w, &a)| f64::from(w * a).abs()).sum();
                        let diff = f64::from(batch[c] - portable[c]).abs();
                        assert!(diff <= 1e-5 * abs, "{ty} {isa:?} n={n} column {c}: {} vs {}", batch[c], portable[c]);
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "activation row 1")]
    fn vec_dot_cols_checks_every_column() {
        let w = random_row(GgmlType::Q4_K, 256, &mut ChaCha8Rng::seed_from_u64(32));
        vec_dot_cols(GgmlType::Q4_K, &w, &[&[0u8; 292], &[0u8; 291]], 256, &mut [0.0; 2]);
    }

    #[test]
    fn isa_names_round_trip() {
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni] {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert!(Isa::active().supported() && Isa::best().supported());
        assert_eq!(Isa::all_supported()[0], Isa::Portable);
    }
}
