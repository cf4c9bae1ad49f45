//! x86-64 SIMD dot products of quantized weight rows with quantized activation rows.
//!
//! Every kernel body multiplies ONE weight row with `C` activation rows (`C` = 1..=[`MAX_COLS`])
//! so that a weight block is loaded and unpacked once for all of them (the GEMM of prefill and
//! of batched decoding); with `C = 1` it is the GEMV of single-token decoding. The arithmetic of
//! each column is the same whatever `C`, so a token's result does not depend on its batch. The
//! compiled entry points ([`RawKernel`]) run a body over a run of rows, so a matrix's rows share
//! one call.
//!
//! The 256-bit legacy kernels (`legacy.rs`) are written once, generic over [`Dot`], the
//! `u8 x i8 -> i32` multiply-add of four byte pairs per lane: AVX2's `vpmaddubsw` + `vpmaddwd`
//! ([`Avx2`]) or AVX-512 VNNI's single `vpdpbusd` on 256-bit registers ([`Vnni`], which also
//! brings 32 vector registers and byte masks), except Q4_0, Q5_0 and Q8_0 on AVX2, whose
//! kernel prepares the activations once per call for all its rows and folds eight blocks' sums
//! into one vector before scaling them (`rows_avx2.rs`). The
//! 256-bit k-quant kernels (`kquants.rs`) take
//! `vpmaddubsw` then `vpmaddwd` by the sub-block scales, in both builds. The AVX-512 VNNI build
//! uses 512-bit kernels instead for Q3_K, Q4_K, Q6_K (`wide.rs`) and, several weight rows per
//! call, for Q4_0, Q5_0 and Q8_0 (`rows.rs`, whose `vpdpbusd` also takes Q8_0's `w + 128` up to
//! 255: it has no i16 step to saturate). The `u8` side is always a
//! weight quant made non-negative (0..=63, or `|w|` for the signed types), so `vpmaddubsw`'s i16
//! saturation is never reached (at most 2 x 128 x 127 = 32512). Batches of
//! [`super::TILED_MIN_COLS`] columns or more of Q3_K, Q4_K and Q6_K take the tiled kernels
//! (`tiled.rs`: rows unpacked once per call, sixteen columns in the lanes of a vector), through
//! [`run_tiled`] rather than [`RawKernel`]; such batches of Q4_0, Q5_0 and Q8_0 take
//! [`LanesKernel`]s: on AVX-512 VNNI `tiled_legacy.rs` (sixteen columns in the lanes, as
//! `tiled.rs`), on AVX2 `lanes.rs` (eight weight rows in the lanes; Q4_0, Q5_0 and Q8_0), and so do
//! such batches of Q3_K and Q4_K on AVX2 (`lanes_kquants.rs`, the same eight-row bands).
//!
//! Exactness: integer sums are exact everywhere; only the f32 summation order differs from the
//! portable kernels. The column kernels accumulate scaled blocks in f32 lanes and sum across
//! lanes once per row (like ggml's AVX2 kernels). Whatever the column kernel, a column's
//! operations never depend on the column count. The tiled and lanes kernels apply the portable
//! kernels' f32 operations, so they are bit-identical to them (and differ from the column
//! kernels in rounding).

mod kquants;
mod lanes;
mod lanes_kquants;
mod legacy;
mod rows;
mod rows_avx2;
pub(crate) mod tiled;
mod tiled_legacy;
mod wide;

use std::arch::x86_64::*;

use super::GgmlType;

/// `u8 x i8` byte dot products accumulated in i32 lanes, and the byte-mask expansion the Q5
/// types need: the two instruction sets the kernels are compiled for.
pub(super) trait Dot {
    /// `acc[i] + sum_{k<4} u[4i + k] * s[4i + k]` for the eight i32 lanes, `u` read as u8 and `s`
    /// as i8. Exact when every pair sum `u[2j] * s[2j] + u[2j+1] * s[2j+1]` fits in i16.
    ///
    /// # Safety
    /// The CPU must support the implementor's instruction set.
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;

    /// 32 bytes: byte `i` is `value` where bit `i` of `bits` is set, else 0.
    ///
    /// # Safety
    /// The CPU must support the implementor's instruction set.
    unsafe fn bits_to_bytes(bits: u32, value: i8) -> __m256i;
}

/// AVX2 (with FMA): `vpmaddubsw` then `vpmaddwd` by ones.
pub(super) struct Avx2;

impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))) }
    }

    #[inline(always)]
    unsafe fn bits_to_bytes(bits: u32, value: i8) -> __m256i {
        unsafe {
            // Byte i takes byte i / 8 of `bits`, then tests bit i % 8 of it.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
            _mm256_and_si256(set, _mm256_set1_epi8(value))
        }
    }
}

/// AVX-512 VNNI on 256-bit vectors (`vpdpbusd`, with AVX-512 VL/BW byte masks).
pub(super) struct Vnni;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }

    #[inline(always)]
    unsafe fn bits_to_bytes(bits: u32, value: i8) -> __m256i {
        unsafe { _mm256_maskz_set1_epi8(bits, value) }
    }
}

/// The instruction sets the kernels are compiled for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum X86Isa {
    /// AVX-512 F/BW/VL + VNNI, on 256-bit vectors.
    Avx512Vnni,
    /// AVX2 + FMA.
    Avx2,
}

impl X86Isa {
    /// The best instruction set this CPU supports, if any (detected once per process).
    pub fn detect() -> Option<Self> {
        static BEST: std::sync::OnceLock<Option<X86Isa>> = std::sync::OnceLock::new();
        *BEST.get_or_init(Self::probe)
    }

    fn probe() -> Option<Self> {
        let avx2 =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let vnni = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        match (avx2, vnni) {
            (true, true) => Some(X86Isa::Avx512Vnni),
            (true, false) => Some(X86Isa::Avx2),
            _ => None,
        }
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub fn supported(self) -> bool {
        Self::detect().is_some_and(|best| best == self || self == X86Isa::Avx2)
    }
}

/// A kernel over several weight rows after the length checks: `(w, n_rows, a, n_blocks, out)`,
/// `w` the rows back to back, `out[r * a.len() + c]` row `r` times `a[c]`, `a.len()` in
/// `1..=super::MAX_COLS`. The loop over the rows runs inside the compiled function, so a
/// matrix's rows pay one call, one column dispatch and one setup of the kernel's constants
/// between them, not one per row (on AVX2 that per-row toll was about 4% of decoding).
///
/// # Safety
/// `n_rows >= 1`; `w` holds `n_rows` rows of `n_blocks` weight blocks, every `a[c]` `n_blocks`
/// activation blocks of the weight type's vec-dot type (for Q8_K, `n_blocks` is counted in
/// 256-element super-blocks), `out` `n_rows * a.len()` values, and the CPU supports the
/// kernel's instruction set.
pub(super) type RawKernel = unsafe fn(w: &[u8], n_rows: usize, a: &[&[u8]], n_blocks: usize, out: &mut [f32]);

/// The kernel for weights of type `ty` compiled for `isa`; `None` for the float types, which
/// have no SIMD kernel here. Q4_0, Q5_0 and Q8_0 take the kernels that prepare the activations
/// once per call for all its rows (`rows.rs` on AVX-512 VNNI, `rows_avx2.rs` on AVX2);
/// a single row goes through the same kernel, so that every dot product of such a matrix takes
/// the same arithmetic.
pub(super) fn kernel(ty: GgmlType, isa: X86Isa) -> Option<RawKernel> {
    macro_rules! pick {
        ($f:ident) => {
            match isa {
                X86Isa::Avx2 => $f::avx2 as RawKernel,
                X86Isa::Avx512Vnni => $f::vnni as RawKernel,
            }
        };
    }
    Some(match (ty, isa) {
        (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16, _) => return None,
        (GgmlType::Q4_0, X86Isa::Avx512Vnni) => rows_entry::q4_0,
        (GgmlType::Q5_0, X86Isa::Avx512Vnni) => rows_entry::q5_0,
        (GgmlType::Q8_0, X86Isa::Avx512Vnni) => rows_entry::q8_0,
        (GgmlType::Q4_0, X86Isa::Avx2) => rows_entry::q4_0_avx2,
        (GgmlType::Q5_0, X86Isa::Avx2) => rows_entry::q5_0_avx2,
        (GgmlType::Q8_0, X86Isa::Avx2) => rows_entry::q8_0_avx2,
        (GgmlType::Q2_K, _) => pick!(q2_k),
        (GgmlType::Q3_K, _) => pick!(q3_k),
        (GgmlType::Q4_K, _) => pick!(q4_k),
        (GgmlType::Q5_K, _) => pick!(q5_k),
        (GgmlType::Q6_K, _) => pick!(q6_k),
        (GgmlType::Q4_1, _) => pick!(q4_1),
        (GgmlType::Q5_1, _) => pick!(q5_1),
    })
}

/// Defines module `$name` with the two compiled entry points of a kernel ([`RawKernel`]s),
/// each dispatching on the column count once and then running the body over every row:
/// `avx2` and `vnni` (compiled for AVX-512 VNNI). A legacy body is generic over [`Dot`]
/// (`unsafe fn body<D: Dot, const C: usize>(w: &[u8], a: &[&[u8]; C], nb: usize, out: &mut
/// [f32; C])`, one row) and built with [`Avx2`] and [`Vnni`]; a k-quant body (`body<const C:
/// usize>`, AVX2 instructions only) serves both builds, unless a 512-bit body replaces it in the
/// `vnni` one (`wide`).
macro_rules! entry_points {
    ($name:ident, legacy :: $body:ident) => {
        entry_points!($name, avx2: legacy::$body[Avx2], vnni: legacy::$body[Vnni]);
    };
    ($name:ident, kquants :: $body:ident) => {
        entry_points!($name, avx2: kquants::$body[], vnni: kquants::$body[]);
    };
    ($name:ident, kquants :: $body:ident, wide) => {
        entry_points!($name, avx2: kquants::$body[], vnni: wide::$body[]);
    };
    ($name:ident, avx2: $am:ident :: $abody:ident [$($ag:ty)?], vnni: $vm:ident :: $vbody:ident [$($vg:ty)?]) => {
        mod $name {
            use super::*;

            /// AVX2 + FMA + F16C build.
            ///
            /// # Safety
            /// See [`RawKernel`].
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn avx2(w: &[u8], n_rows: usize, a: &[&[u8]], nb: usize, out: &mut [f32]) {
                unsafe { dispatch_cols!($am::$abody, [$($ag)?], w, n_rows, a, nb, out) }
            }

            /// AVX-512 VNNI build.
            ///
            /// # Safety
            /// See [`RawKernel`].
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            pub(super) unsafe fn vnni(w: &[u8], n_rows: usize, a: &[&[u8]], nb: usize, out: &mut [f32]) {
                unsafe { dispatch_cols!($vm::$vbody, [$($vg)?], w, n_rows, a, nb, out) }
            }
        }
    };
}

/// Runs `$module::$body::<$generics.., C>` (`C = a.len()`, chosen once) on each of the
/// `$n_rows` rows of `$w`, row `r`'s results into `$out[r * C..]`.
macro_rules! dispatch_cols {
    ($module:ident :: $body:ident, [$($g:ty)?], $w:expr, $n_rows:expr, $a:expr, $nb:expr, $out:expr) => {
        match $a.len() {
            1 => each_row!($module::$body, [$($g)?], 1, $w, $n_rows, $a, $nb, $out),
            2 => each_row!($module::$body, [$($g)?], 2, $w, $n_rows, $a, $nb, $out),
            3 => each_row!($module::$body, [$($g)?], 3, $w, $n_rows, $a, $nb, $out),
            4 => each_row!($module::$body, [$($g)?], 4, $w, $n_rows, $a, $nb, $out),
            5 => each_row!($module::$body, [$($g)?], 5, $w, $n_rows, $a, $nb, $out),
            6 => each_row!($module::$body, [$($g)?], 6, $w, $n_rows, $a, $nb, $out),
            7 => each_row!($module::$body, [$($g)?], 7, $w, $n_rows, $a, $nb, $out),
            8 => each_row!($module::$body, [$($g)?], 8, $w, $n_rows, $a, $nb, $out),
            n => unreachable!("{n} columns"),
        }
    };
}

/// One arm of [`dispatch_cols`]: the body with `$c` columns over every row.
macro_rules! each_row {
    ($module:ident :: $body:ident, [$($g:ty)?], $c:literal, $w:expr, $n_rows:expr, $a:expr, $nb:expr, $out:expr) => {{
        let a: &[&[u8]; $c] = $a.try_into().unwrap();
        for (row, out) in $w.chunks_exact($w.len() / $n_rows).zip($out.chunks_exact_mut($c)) {
            $module::$body::<$($g,)? $c>(row, a, $nb, out.try_into().unwrap());
        }
    }};
}

entry_points!(q2_k, kquants::q2_k);
entry_points!(q3_k, kquants::q3_k, wide);
entry_points!(q4_k, kquants::q4_k, wide);
entry_points!(q5_k, kquants::q5_k);
entry_points!(q6_k, kquants::q6_k, wide);
entry_points!(q4_1, legacy::q4_1);
entry_points!(q5_1, legacy::q5_1);

/// The [`RawKernel`]s whose body takes the rows itself (it prepares the activations once per
/// call for all of them), dispatching on the column count: the several-rows kernels of
/// `rows.rs` (AVX-512 VNNI) and `rows_avx2.rs` (AVX2), both for Q4_0, Q5_0 and Q8_0.
mod rows_entry {
    use super::rows::legacy_rows;
    use super::rows_avx2::legacy_rows_avx2;
    use super::wide::{Q4_0, Q5_0, Q8_0};

    macro_rules! rows_entry {
        ($name:ident, $body:ident::<$ty:ident>, $features:literal, $build:literal) => {
            #[doc = concat!($build, " build of [`", stringify!($body), "`] for this type.")]
            ///
            /// # Safety
            /// See [`super::RawKernel`].
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(w: &[u8], n_rows: usize, a: &[&[u8]], nb: usize, out: &mut [f32]) {
                unsafe {
                    match a.len() {
                        1 => $body::<$ty, 1>(w, n_rows, a.try_into().unwrap(), nb, out),
                        2 => $body::<$ty, 2>(w, n_rows, a.try_into().unwrap(), nb, out),
                        3 => $body::<$ty, 3>(w, n_rows, a.try_into().unwrap(), nb, out),
                        4 => $body::<$ty, 4>(w, n_rows, a.try_into().unwrap(), nb, out),
                        5 => $body::<$ty, 5>(w, n_rows, a.try_into().unwrap(), nb, out),
                        6 => $body::<$ty, 6>(w, n_rows, a.try_into().unwrap(), nb, out),
                        7 => $body::<$ty, 7>(w, n_rows, a.try_into().unwrap(), nb, out),
                        8 => $body::<$ty, 8>(w, n_rows, a.try_into().unwrap(), nb, out),
                        n => unreachable!("{n} columns"),
                    }
                }
            }
        };
    }

    rows_entry!(q4_0, legacy_rows::<Q4_0>, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", "AVX-512 VNNI");
    rows_entry!(q5_0, legacy_rows::<Q5_0>, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", "AVX-512 VNNI");
    rows_entry!(q8_0, legacy_rows::<Q8_0>, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", "AVX-512 VNNI");
    rows_entry!(q4_0_avx2, legacy_rows_avx2::<Q4_0>, "avx2,fma,f16c", "AVX2 + FMA + F16C");
    rows_entry!(q5_0_avx2, legacy_rows_avx2::<Q5_0>, "avx2,fma,f16c", "AVX2 + FMA + F16C");
    rows_entry!(q8_0_avx2, legacy_rows_avx2::<Q8_0>, "avx2,fma,f16c", "AVX2 + FMA + F16C");
}

/// A GEMM kernel for batches of columns, bit-identical to the portable kernel: weight rows in
/// the vector lanes on AVX2 (`lanes.rs` for Q4_0/Q5_0/Q8_0, `lanes_kquants.rs` for Q3_K and Q4_K),
/// activation columns in the lanes on AVX-512 VNNI (`tiled_legacy.rs`). `prepare` lays out a
/// product's columns (rows of `n_blocks` blocks of the type's activation type) once; `run` sets
/// `out` to `dot(row r, column c)` for the `n_rows` rows of `w` (whole rows of `n_blocks`
/// blocks, back to back) and every column, in the layout whose index the vector lanes fill:
/// `out[c * n_rows + r]` when `column_major` (AVX2: a band of rows is one store), else
/// `out[r * n_cols + c]` (AVX-512 VNNI: a tile of columns is one store).
///
/// Safety of both: the lengths as stated, `cols` from this kernel's `prepare` with the same
/// `n_blocks`, `out` `n_rows * n_cols` values, and the CPU supports the kernel's instruction set.
#[derive(Clone, Copy)]
pub(super) struct LanesKernel {
    pub(super) prepare: unsafe fn(a: &[&[u8]], n_blocks: usize) -> LaneColumns,
    pub(super) run: unsafe fn(w: &[u8], n_rows: usize, n_blocks: usize, cols: &LaneColumns, out: &mut [f32]),
    pub(super) column_major: bool,
}

/// A product's columns prepared by a [`LanesKernel`].
pub(super) enum LaneColumns {
    /// For `lanes.rs` (AVX2: Q4_0, Q5_0, Q8_0).
    Lanes(lanes::Prepared),
    /// For `tiled_legacy.rs` (AVX-512 VNNI).
    Tiles(tiled_legacy::Columns),
    /// For `lanes_kquants.rs` (AVX2: Q3_K, Q4_K).
    KQuants(lanes_kquants::Prepared),
}

/// The batch kernel for weights of type `ty` on `isa`, where there is one: Q4_0, Q5_0, Q8_0,
/// Q3_K, Q4_K on AVX2; Q4_0, Q5_0, Q8_0 on AVX-512 VNNI.
pub(super) fn lanes_kernel(ty: GgmlType, isa: X86Isa) -> Option<LanesKernel> {
    match (isa, ty) {
        (X86Isa::Avx2, GgmlType::Q4_0) => Some(lanes_entry::Q4_0_AVX2),
        (X86Isa::Avx2, GgmlType::Q5_0) => Some(lanes_entry::Q5_0_AVX2),
        (X86Isa::Avx2, GgmlType::Q8_0) => Some(lanes_entry::Q8_0_AVX2),
        (X86Isa::Avx2, GgmlType::Q3_K) => Some(lanes_entry::Q3_K_AVX2),
        (X86Isa::Avx2, GgmlType::Q4_K) => Some(lanes_entry::Q4_K_AVX2),
        (X86Isa::Avx512Vnni, GgmlType::Q4_0) => Some(lanes_entry::Q4_0_VNNI),
        (X86Isa::Avx512Vnni, GgmlType::Q5_0) => Some(lanes_entry::Q5_0_VNNI),
        (X86Isa::Avx512Vnni, GgmlType::Q8_0) => Some(lanes_entry::Q8_0_VNNI),
        _ => None,
    }
}

/// The compiled [`LanesKernel`]s: `lanes.rs` and `lanes_kquants.rs` for AVX2,
/// `tiled_legacy.rs` for AVX-512 VNNI.
mod lanes_entry {
    use super::lanes::{legacy_lanes, prepare_columns};
    use super::lanes_kquants::{self, Q3K, Q4K, kquant_lanes};
    use super::tiled_legacy::{lay_out_columns, legacy_tiled};
    use super::wide::{Q4_0, Q5_0, Q8_0};
    use super::{LaneColumns, LanesKernel};

    macro_rules! lanes_entry {
        ($name:ident, $variant:ident, $prepare:expr, $kernel:expr, $column_major:literal, $features:literal) => {
            #[doc = concat!("`", stringify!($kernel), "`, built with ", $features, ".")]
            pub(super) const $name: LanesKernel = {
                /// # Safety
                /// See [`LanesKernel`].
                #[target_feature(enable = $features)]
                unsafe fn prepare(a: &[&[u8]], nb: usize) -> LaneColumns {
                    unsafe { LaneColumns::$variant($prepare(a, nb)) }
                }

                /// # Safety
                /// See [`LanesKernel`].
                #[target_feature(enable = $features)]
                unsafe fn run(w: &[u8], n_rows: usize, nb: usize, cols: &LaneColumns, out: &mut [f32]) {
                    let LaneColumns::$variant(cols) = cols else { unreachable!("columns prepared by another kernel") };
                    unsafe { $kernel(w, n_rows, nb, cols, out) }
                }

                LanesKernel { prepare, run, column_major: $column_major }
            };
        };
    }

    lanes_entry!(Q4_0_AVX2, Lanes, prepare_columns::<Q4_0>, legacy_lanes::<Q4_0>, true, "avx2,fma,f16c");
    lanes_entry!(Q5_0_AVX2, Lanes, prepare_columns::<Q5_0>, legacy_lanes::<Q5_0>, true, "avx2,fma,f16c");
    lanes_entry!(Q8_0_AVX2, Lanes, prepare_columns::<Q8_0>, legacy_lanes::<Q8_0>, true, "avx2,fma,f16c");
    lanes_entry!(Q3_K_AVX2, KQuants, lanes_kquants::prepare_columns::<Q3K>, kquant_lanes::<Q3K>, true, "avx2,fma,f16c");
    lanes_entry!(Q4_K_AVX2, KQuants, lanes_kquants::prepare_columns::<Q4K>, kquant_lanes::<Q4K>, true, "avx2,fma,f16c");
    lanes_entry!(
        Q4_0_VNNI,
        Tiles,
        lay_out_columns::<Q4_0>,
        legacy_tiled::<Q4_0>,
        false,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
    lanes_entry!(
        Q5_0_VNNI,
        Tiles,
        lay_out_columns::<Q5_0>,
        legacy_tiled::<Q5_0>,
        false,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
    lanes_entry!(
        Q8_0_VNNI,
        Tiles,
        lay_out_columns::<Q8_0>,
        legacy_tiled::<Q8_0>,
        false,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
}

/// The tiled kernel of a k-quant type (`tiled.rs`): how its rows unpack, and one tile of
/// columns times the unpacked rows.
#[derive(Clone, Copy)]
pub(super) struct TiledKernel {
    unpack: unsafe fn(w: &[u8], n_rows: usize, nb: usize, u: &mut tiled::Unpacked),
    tile: unsafe fn(u: &tiled::Unpacked, cols: &tiled::TiledColumns, tile: usize, out: &mut [f32]),
}

/// The tiled kernel for weights of type `ty` on `isa`, where there is one (Q3_K, Q4_K, Q6_K on
/// AVX-512 VNNI).
pub(super) fn tiled_kernel(ty: GgmlType, isa: X86Isa) -> Option<TiledKernel> {
    match (isa, ty) {
        (X86Isa::Avx512Vnni, GgmlType::Q3_K) => Some(tiled_entry::Q3_K),
        (X86Isa::Avx512Vnni, GgmlType::Q4_K) => Some(tiled_entry::Q4_K),
        (X86Isa::Avx512Vnni, GgmlType::Q6_K) => Some(tiled_entry::Q6_K),
        _ => None,
    }
}

/// `sink(r, c, dot(row r of w, column c))` for the `n_rows` rows of `w` (whole rows back to back,
/// at most [`tiled::MAX_ROWS`]) and every column of `cols`: the rows are unpacked once, then
/// multiplied with each tile.
///
/// # Safety
/// `w` holds `n_rows` rows of `cols.n_blocks()` super-blocks of the kernel's type, and the CPU
/// supports AVX-512 VNNI.
pub(super) unsafe fn run_tiled(
    kernel: TiledKernel,
    w: &[u8],
    n_rows: usize,
    cols: &tiled::TiledColumns,
    mut sink: impl FnMut(usize, usize, f32),
) {
    assert!(n_rows <= tiled::MAX_ROWS, "{n_rows} rows, at most {}", tiled::MAX_ROWS);
    tiled::with_unpacked(|u| {
        // SAFETY: the caller's contract.
        unsafe { (kernel.unpack)(w, n_rows, cols.n_blocks(), u) };
        let mut out = [0.0f32; tiled::MAX_ROWS.next_multiple_of(tiled::BAND_ROWS) * tiled::TILE_COLS];
        for t in 0..cols.n_tiles() {
            // SAFETY: `u` was unpacked from rows of `cols.n_blocks()` blocks above, `out` holds
            // the padded rows; CPU support per the caller's contract.
            unsafe { (kernel.tile)(u, cols, t, &mut out) };
            let first = t * tiled::TILE_COLS;
            let n = tiled::TILE_COLS.min(cols.n_cols() - first);
            for r in 0..n_rows {
                for (c, &v) in out[r * tiled::TILE_COLS..][..n].iter().enumerate() {
                    sink(r, first + c, v);
                }
            }
        }
    });
}

/// The compiled [`TiledKernel`]s.
mod tiled_entry {
    use super::TiledKernel;
    use super::tiled::{Q3K, Q4K, Q6K, Tiled, TiledColumns, Unpacked, tile, unpack_rows};

    /// AVX-512 VNNI build of [`unpack_rows`].
    ///
    /// # Safety
    /// See [`unpack_rows`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack<T: Tiled>(w: &[u8], n_rows: usize, nb: usize, u: &mut Unpacked) {
        unsafe { unpack_rows::<T>(w, n_rows, nb, u) }
    }

    /// AVX-512 VNNI build of [`tile`].
    ///
    /// # Safety
    /// See [`tile`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn run<T: Tiled>(u: &Unpacked, cols: &TiledColumns, t: usize, out: &mut [f32]) {
        unsafe { tile::<T>(u, cols, t, out) }
    }

    pub(super) const Q3_K: TiledKernel = TiledKernel { unpack: unpack::<Q3K>, tile: run::<Q3K> };
    pub(super) const Q4_K: TiledKernel = TiledKernel { unpack: unpack::<Q4K>, tile: run::<Q4K> };
    pub(super) const Q6_K: TiledKernel = TiledKernel { unpack: unpack::<Q6K>, tile: run::<Q6K> };
}

/// How far ahead of the block being read the kernels prefetch weights, in bytes. The hardware
/// prefetcher alone left a 2-thread Q4_K/Q6_K GEMV streaming from DRAM at 10.5 GB/s on Zen 3;
/// with 2 KiB ahead it read 12.5-13 GB/s (of a 16 GB/s probe). On Zen 5 (AVX-512 VNNI, 2
/// threads, full Mellum2 geometry, median of four decode runs) 8 KiB beat 2 KiB: Q4_K_M 21.1 ->
/// 24.9 tokens/s, Q3_K_S 26.0 -> 28.3.
const PREFETCH_DISTANCE: usize = 8192;

/// Prefetches into L1 the `len` bytes [`PREFETCH_DISTANCE`] past `p`, one request per 64-byte
/// line. Past the end of a row this reaches into the next row of the matrix (or harmlessly
/// beyond: a prefetch never faults).
#[inline(always)]
fn prefetch_ahead(p: *const u8, len: usize) {
    let ahead = p.wrapping_add(PREFETCH_DISTANCE);
    for line in (0..len).step_by(64) {
        // SAFETY: a prefetch only hints the cache; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
    }
}

/// Loads 32 bytes from `p` (no alignment needed).
///
/// # Safety
/// `p..p + 32` must be readable; AVX.
#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Sum of the eight f32 lanes.
///
/// # Safety
/// AVX.
#[inline(always)]
unsafe fn hsum_f32(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// The little-endian f16 at `p`, as f32: exact for every input (subnormals, zero, infinities;
/// NaNs stay NaN), and free of the false register dependency a scalar `vcvtph2ps` gets (LLVM
/// merges it into whatever register is at hand, often a loop accumulator).
///
/// # Safety
/// `p..p + 2` must be readable.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let h = u32::from(unsafe { p.cast::<u16>().read_unaligned() });
    let magnitude = h & 0x7fff;
    // Exponent and mantissa moved to f32 positions, then rebiased by 2^(127 - 15) = 2^112
    // (0x7780_0000); the product is exact, and scales f16 subnormals correctly too.
    let finite = f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000);
    let bits = if magnitude >= 0x7c00 { (magnitude << 13) | 0x7f80_0000 } else { finite.to_bits() };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// The little-endian f16 at `p` as f32 in all eight lanes.
///
/// # Safety
/// `p..p + 2` must be readable; F16C and AVX2.
#[inline(always)]
unsafe fn f16_splat(p: *const u8) -> __m256 {
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned())) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// Every intrinsic is inlined into its kernel. An out-of-line copy of one (a symbol of its
    /// own such as `core::core_arch::x86::avx2::_mm256_maddubs_epi16`) means that some kernel
    /// calls it from a function compiled without the kernel's target features, typically a
    /// closure: then every instruction costs a call, and the kernel runs tens of times slower
    /// while every numeric test still passes. Reads this test binary's symbols with `nm`
    /// (binutils); the test profile optimizes as release does.
    #[test]
    fn every_intrinsic_is_inlined_into_its_kernel() {
        let exe = std::env::current_exe().expect("path of the test binary");
        let nm = std::process::Command::new("nm")
            .arg("--demangle")
            .arg(&exe)
            .output()
            .expect("run nm (binutils) on the test binary");
        assert!(nm.status.success(), "nm {}: {}", exe.display(), String::from_utf8_lossy(&nm.stderr));
        let symbols = String::from_utf8_lossy(&nm.stdout);
        assert!(symbols.contains("moeshard_kernels"), "nm listed no symbols of this crate in {}", exe.display());
        let outlined: Vec<&str> =
            symbols.lines().filter(|line| line.contains("core::core_arch::x86::") && line.contains("::_mm")).collect();
        assert!(
            outlined.is_empty(),
            "intrinsics compiled out of line (called from a closure or another function without the kernel's target features?):\n{}",
            outlined.join("\n")
        );
    }
}
