//! Float element types: F32, F16 (IEEE binary16) and BF16 (bfloat16) rows.
//!
//! A row of `n` elements is `n` little-endian values of 4 bytes (F32) or 2 bytes (F16, BF16), as
//! GGUF stores `GGML_TYPE_F32`, `GGML_TYPE_F16` and `GGML_TYPE_BF16` (`ggml_fp16_t` /
//! `ggml_bf16_t` in `ggml.h`). For a dot product with an F16 or BF16 weight row the activation row
//! is first converted to the same type, as ggml's CPU backend does (`vec_dot_type` in
//! `ggml-cpu.c`): f32 -> f16 rounds to nearest-even, f32 -> bf16 follows
//! `ggml_compute_fp32_to_bf16` (`ggml-impl.h`). Dot products accumulate in f32.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Independent f32 partial sums in the dot products (LLVM keeps them in SIMD registers).
const LANES: usize = 16;

/// Elements converted per step by [`quantize_row_f16`] (size of its stack buffer).
const F16_CONVERT_CHUNK: usize = 64;

/// IEEE binary16 bits to f32, exactly (subnormals included); NaN stays NaN with its payload.
///
/// Branch-free so that loops over it vectorize, and without arithmetic on f32 subnormals (slow
/// on some CPUs); equal to `half::f16::to_f32` for every non-NaN input.
#[inline(always)]
pub fn fp16_to_fp32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let magnitude = u32::from(bits & 0x7fff);
    let exponent = magnitude >> 10;
    // Normal: exponent and mantissa moved to the f32 positions, exponent rebiased by 127 - 15.
    // Inf/NaN (exponent 31): rebiased once more, to 255. Subnormal or zero: mantissa * 2^-24.
    let shifted = magnitude << 13;
    let normal = shifted + (112 << 23);
    let inf_nan = shifted + (224 << 23);
    let subnormal = (magnitude as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let value = match exponent {
        0 => subnormal,
        31 => inf_nan,
        _ => normal,
    };
    f32::from_bits(sign | value)
}

/// f32 to IEEE binary16 bits, round to nearest-even, overflow to ±inf (ggml's
/// `GGML_FP32_TO_FP16`; via the `half` crate).
#[inline]
pub fn fp32_to_fp16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// bf16 bits to f32 (exact: the bits are the upper half of the f32), as
/// `ggml_compute_bf16_to_fp32` (`ggml-impl.h`).
#[inline(always)]
pub fn bf16_to_fp32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bf16 bits: round to nearest-even, NaN forced quiet, subnormals kept; bit-identical to
/// `ggml_compute_fp32_to_bf16` (`ggml-impl.h`).
#[inline]
pub fn fp32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    // Cannot overflow: the largest non-NaN pattern is 0xff80_0000.
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn f32_le(b: [u8; 4]) -> f32 {
    f32::from_le_bytes(b)
}

#[inline(always)]
fn f16_le(b: [u8; 2]) -> f32 {
    fp16_to_fp32(u16::from_le_bytes(b))
}

#[inline(always)]
fn bf16_le(b: [u8; 2]) -> f32 {
    bf16_to_fp32(u16::from_le_bytes(b))
}

/// `src` as `n` elements of `B` bytes; panics on a length mismatch.
#[inline(always)]
fn elements<'a, const B: usize>(src: &'a [u8], n: usize, what: &str) -> &'a [[u8; B]] {
    let (elems, rest) = src.as_chunks::<B>();
    assert!(rest.is_empty() && elems.len() == n, "{what}: {} bytes for {n} elements of {B} bytes", src.len());
    elems
}

#[inline(always)]
fn decode_row<const B: usize>(src: &[u8], dst: &mut [f32], decode: impl Fn([u8; B]) -> f32) {
    let src = elements::<B>(src, dst.len(), "dequantize_row");
    for (y, &e) in dst.iter_mut().zip(src) {
        *y = decode(e);
    }
}

/// Dot product in f32 with `LANES` independent partial sums, reduced pairwise at the end.
#[inline(always)]
fn dot_row<const B: usize>(w: &[u8], a: &[u8], n: usize, decode: impl Fn([u8; B]) -> f32) -> f32 {
    let (w, w_tail) = elements::<B>(w, n, "vec_dot weights").as_chunks::<LANES>();
    let (a, a_tail) = elements::<B>(a, n, "vec_dot activations").as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (wc, ac) in w.iter().zip(a) {
        for l in 0..LANES {
            acc[l] += decode(wc[l]) * decode(ac[l]);
        }
    }
    let mut tail = 0f32;
    for (&x, &y) in w_tail.iter().zip(a_tail) {
        tail += decode(x) * decode(y);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + tail
}

/// Dequantizes an F32 row: `src` is `dst.len()` little-endian f32 (4 bytes each).
pub fn dequantize_row_f32(src: &[u8], dst: &mut [f32]) {
    decode_row(src, dst, f32_le);
}

/// Dequantizes an F16 row: `src` is `dst.len()` little-endian IEEE binary16 (2 bytes each).
pub fn dequantize_row_f16(src: &[u8], dst: &mut [f32]) {
    decode_row(src, dst, f16_le);
}

/// Dequantizes a BF16 row: `src` is `dst.len()` little-endian bfloat16 (2 bytes each).
pub fn dequantize_row_bf16(src: &[u8], dst: &mut [f32]) {
    decode_row(src, dst, bf16_le);
}

/// Writes activations `x` as an F32 row: `dst` is `4 * x.len()` bytes, little-endian.
pub fn quantize_row_f32(x: &[f32], dst: &mut [u8]) {
    let (out, rest) = dst.as_chunks_mut::<4>();
    assert!(rest.is_empty() && out.len() == x.len(), "quantize_row_f32: dst length");
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v.to_le_bytes();
    }
}

/// Converts activations `x` to an F16 row (round to nearest-even, as ggml's
/// `ggml_cpu_fp32_to_fp16`): `dst` is `2 * x.len()` bytes, little-endian.
pub fn quantize_row_f16(x: &[f32], dst: &mut [u8]) {
    let (out, rest) = dst.as_chunks_mut::<2>();
    assert!(rest.is_empty() && out.len() == x.len(), "quantize_row_f16: dst length");
    let mut buf = [f16::ZERO; F16_CONVERT_CHUNK];
    for (xc, oc) in x.chunks(F16_CONVERT_CHUNK).zip(out.chunks_mut(F16_CONVERT_CHUNK)) {
        let buf = &mut buf[..xc.len()];
        buf.convert_from_f32_slice(xc);
        for (o, h) in oc.iter_mut().zip(buf.iter()) {
            *o = h.to_bits().to_le_bytes();
        }
    }
}

/// Converts activations `x` to a BF16 row with [`fp32_to_bf16`] (as ggml's
/// `ggml_cpu_fp32_to_bf16`): `dst` is `2 * x.len()` bytes, little-endian.
pub fn quantize_row_bf16(x: &[f32], dst: &mut [u8]) {
    let (out, rest) = dst.as_chunks_mut::<2>();
    assert!(rest.is_empty() && out.len() == x.len(), "quantize_row_bf16: dst length");
    for (o, &v) in out.iter_mut().zip(x) {
        *o = fp32_to_bf16(v).to_le_bytes();
    }
}

/// Dot product of an F32 weight row `w` and an F32 activation row `a`, both `n` elements
/// (`4 * n` bytes).
pub fn vec_dot_f32(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_row(w, a, n, f32_le)
}

/// Dot product of an F16 weight row `w` and an F16 activation row `a`, both `n` elements
/// (`2 * n` bytes); products and sums in f32.
pub fn vec_dot_f16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_row(w, a, n, f16_le)
}

/// Dot product of a BF16 weight row `w` and a BF16 activation row `a`, both `n` elements
/// (`2 * n` bytes); products and sums in f32.
pub fn vec_dot_bf16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_row(w, a, n, bf16_le)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_f32s(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn to_bytes(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn fp16_to_fp32_matches_half_for_all_inputs() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = fp16_to_fp32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn fp32_to_bf16_hand_picked() {
        let cases: [(u32, u16); 10] = [
            (0x3f80_0000, 0x3f80), // 1.0
            (0x8000_0000, 0x8000), // -0.0
            (0x3f80_8000, 0x3f80), // tie, even below: stays
            (0x3f81_8000, 0x3f82), // tie, odd below: rounds up to even
            (0x3f80_8001, 0x3f81), // just above a tie
            (0x3f80_7fff, 0x3f80), // just below a tie
            (0x7f80_0000, 0x7f80), // +inf
            (0x7f7f_ffff, 0x7f80), // f32::MAX rounds to +inf
            (0x0000_0001, 0x0000), // smallest subnormal rounds to 0
            (0x7f80_0001, 0x7fc0), // signalling NaN is quieted
        ];
        for (x, want) in cases {
            assert_eq!(fp32_to_bf16(f32::from_bits(x)), want, "{x:#010x}");
        }
    }

    #[test]
    fn fp32_to_bf16_matches_half_round_to_nearest_even() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..100_000 {
            let x = f32::from_bits(rng.random());
            if x.is_nan() {
                continue;
            }
            assert_eq!(fp32_to_bf16(x), bf16::from_f32(x).to_bits(), "{x:e}");
        }
    }

    #[test]
    fn dequantize_rows_match_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 301;
        let x = random_f32s(&mut rng, n, 10.0);
        let mut out = vec![0f32; n];
        dequantize_row_f32(&to_bytes(&x), &mut out);
        assert_eq!(out, x);

        let bits: Vec<u16> = (0..n)
            .map(|_| rng.random::<u16>() & 0xfbff) // exponent never all ones: no inf/NaN
            .collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        dequantize_row_f16(&bytes, &mut out);
        for (o, &b) in out.iter().zip(&bits) {
            assert_eq!(o.to_bits(), f16::from_bits(b).to_f32().to_bits());
        }
        dequantize_row_bf16(&bytes, &mut out);
        for (o, &b) in out.iter().zip(&bits) {
            assert_eq!(o.to_bits(), bf16::from_bits(b).to_f32().to_bits());
        }
    }

    #[test]
    fn activation_conversion_is_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 200; // not a multiple of the f16 conversion chunk
        let mut x = random_f32s(&mut rng, n, 4.0);
        // Ties for f16 (1 + 2^-11 -> 1, 1 + 3 * 2^-11 -> 1 + 2^-9), overflow, a subnormal.
        x[..5].copy_from_slice(&[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 7.0e4, -7.0e4, 1.0e-7]);
        let mut bytes = vec![0u8; 2 * n];

        quantize_row_f16(&x, &mut bytes);
        let (h, _) = bytes.as_chunks::<2>();
        for (&v, &b) in x.iter().zip(h) {
            assert_eq!(u16::from_le_bytes(b), f16::from_f32(v).to_bits(), "{v:e}");
        }
        assert_eq!(u16::from_le_bytes(h[0]), 0x3c00);
        assert_eq!(u16::from_le_bytes(h[1]), 0x3c02);
        assert_eq!(u16::from_le_bytes(h[2]), 0x7c00);
        assert_eq!(u16::from_le_bytes(h[3]), 0xfc00);

        quantize_row_bf16(&x, &mut bytes);
        let (h, _) = bytes.as_chunks::<2>();
        for (&v, &b) in x.iter().zip(h) {
            assert_eq!(u16::from_le_bytes(b), fp32_to_bf16(v));
        }

        let mut bytes = vec![0u8; 4 * n];
        quantize_row_f32(&x, &mut bytes);
        assert_eq!(bytes, to_bytes(&x));
    }

    /// Tolerance for f32 accumulation against an f64 reference: 16 lanes of `n / 16` sequential
    /// sums plus a 4-level reduction stay well below 1e-5 relative to `sum |products|` for n < 4096.
    const SUM_REL_TOL: f64 = 1e-5;

    fn check_dot(
        quantize: fn(&[f32], &mut [u8]),
        dequantize: fn(&[u8], &mut [f32]),
        dot: fn(&[u8], &[u8], usize) -> f32,
        bytes_per_elem: usize,
        unit_roundoff: f64,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for n in [0, 1, 15, 16, 33, 1024, 2307] {
            let wf = random_f32s(&mut rng, n, 1.0);
            let xf = random_f32s(&mut rng, n, 3.0);
            let mut w = vec![0u8; n * bytes_per_elem];
            let mut a = vec![0u8; n * bytes_per_elem];
            quantize(&wf, &mut w);
            quantize(&xf, &mut a);
            let mut wd = vec![0f32; n];
            let mut ad = vec![0f32; n];
            dequantize(&w, &mut wd);
            dequantize(&a, &mut ad);
            let got = f64::from(dot(&w, &a, n));

            // Against the dequantized rows: only summation error.
            let exact: f64 = wd.iter().zip(&ad).map(|(&p, &q)| f64::from(p) * f64::from(q)).sum();
            let abs: f64 = wd.iter().zip(&ad).map(|(&p, &q)| (f64::from(p) * f64::from(q)).abs()).sum();
            assert!((got - exact).abs() <= SUM_REL_TOL * abs + 1e-30, "n={n}: {got} vs {exact}");

            // Against the f32 activations: each converted activation is within a relative
            // `unit_roundoff` of the original.
            let orig: f64 = wd.iter().zip(&xf).map(|(&p, &q)| f64::from(p) * f64::from(q)).sum();
            let tol = (unit_roundoff + SUM_REL_TOL) * abs + 1e-30;
            assert!((got - orig).abs() <= tol, "n={n}: {got} vs {orig}");
        }
    }

    #[test]
    fn vec_dot_f32_matches_f64() {
        check_dot(quantize_row_f32, dequantize_row_f32, vec_dot_f32, 4, 0.0);
    }

    #[test]
    fn vec_dot_f16_matches_f64() {
        check_dot(quantize_row_f16, dequantize_row_f16, vec_dot_f16, 2, 2f64.powi(-11));
    }

    #[test]
    fn vec_dot_bf16_matches_f64() {
        check_dot(quantize_row_bf16, dequantize_row_bf16, vec_dot_bf16, 2, 2f64.powi(-8));
    }

    #[test]
    #[should_panic(expected = "vec_dot weights")]
    fn vec_dot_rejects_short_rows() {
        vec_dot_f32(&[0; 8], &[0; 12], 3);
    }
}
