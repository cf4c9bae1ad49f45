//! Legacy 32-element block quantizations: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights, and the Q8_0 /
//! Q8_1 activation blocks they are multiplied with.
//!
//! Block layouts (`ggml/src/ggml-common.h`; little-endian; `d`, `m`, `s` are IEEE f16). Element
//! `i` of a block (`0 <= i < 32`) holds the 4-bit quant `qs[i] & 0xF` for `i < 16` and
//! `qs[i - 16] >> 4` for `i >= 16`; in the Q5 types bit `i` of the little-endian u32 `qh` is its
//! fifth (high) bit.
//!
//! | type | bytes | fields | element |
//! |---|---|---|---|
//! | `block_q4_0` | 18 | `d`, `qs[16]` | `d * (q - 8)` |
//! | `block_q4_1` | 20 | `d`, `m`, `qs[16]` | `d * q + m` |
//! | `block_q5_0` | 22 | `d`, `qh[4]`, `qs[16]` | `d * (q - 16)` |
//! | `block_q5_1` | 24 | `d`, `m`, `qh[4]`, `qs[16]` | `d * q + m` |
//! | `block_q8_0` | 34 | `d`, `qs[32]` (i8) | `d * q` |
//! | `block_q8_1` | 36 | `d`, `s`, `qs[32]` (i8) | `d * q`, with `s = d * sum(q)` |
//!
//! Activation quantization is bit-exact with ggml's reference `quantize_row_q8_0_ref` /
//! `quantize_row_q8_1_ref` (`ggml-quants.c`). The dot products use the formulas and float
//! operation order of ggml's scalar `ggml_vec_dot_*_generic` (`ggml-cpu/quants.c`): an exact
//! integer sum per block, scaled and accumulated in f32 block by block.

use super::float::{fp16_to_fp32, fp32_to_fp16};

/// Elements per block.
const QK: usize = 32;
const Q4_0_BYTES: usize = 18;
const Q4_1_BYTES: usize = 20;
const Q5_0_BYTES: usize = 22;
const Q5_1_BYTES: usize = 24;
const Q8_0_BYTES: usize = 34;
const Q8_1_BYTES: usize = 36;

#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    fp16_to_fp32(u16::from_le_bytes([lo, hi]))
}

/// Number of blocks of a row of `n` elements; panics unless `n` is a multiple of 32.
fn n_blocks(n: usize) -> usize {
    assert!(n.is_multiple_of(QK), "row of {n} elements is not a multiple of {QK}");
    n / QK
}

/// `bytes` as exactly `nb` blocks of `B` bytes; panics on a length mismatch.
#[inline(always)]
fn blocks<'a, const B: usize>(bytes: &'a [u8], nb: usize, what: &str) -> &'a [[u8; B]] {
    let (blocks, rest) = bytes.as_chunks::<B>();
    assert!(rest.is_empty() && blocks.len() == nb, "{what}: {} bytes, expected {nb} blocks of {B} bytes", bytes.len());
    blocks
}

/// The 32 unsigned 4-bit quants of `qs`, in element order.
#[inline(always)]
fn nibbles(qs: &[u8; QK / 2]) -> [u8; QK] {
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = qs[j] & 0x0F;
        q[j + QK / 2] = qs[j] >> 4;
    }
    q
}

/// The 32 unsigned 5-bit quants from the high bits `qh` (bit `i` of the little-endian u32, i.e.
/// bit `i % 8` of byte `i / 8`, for element `i`) and `qs`.
#[inline(always)]
fn five_bit(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let mut q = nibbles(qs);
    // A byte mask per element rather than per-element shift counts, which SSE2 cannot vectorize.
    for (i, q) in q.iter_mut().enumerate() {
        let bit = qh[i / 8] & (1 << (i % 8));
        *q |= u8::from(bit != 0) << 4;
    }
    q
}

/// `sum((q[i] - offset) * a[i])` with `a` read as i8; exact in i32.
#[inline(always)]
fn dot_unsigned(q: &[u8; QK], offset: i32, a: &[u8; QK]) -> i32 {
    let mut sum = 0i32;
    for i in 0..QK {
        sum += (i32::from(q[i]) - offset) * i32::from(a[i] as i8);
    }
    sum
}

/// `sum(q[i] * a[i])` with both read as i8; exact in i32.
#[inline(always)]
fn dot_signed(q: &[u8; QK], a: &[u8; QK]) -> i32 {
    let mut sum = 0i32;
    for i in 0..QK {
        sum += i32::from(q[i] as i8) * i32::from(a[i] as i8);
    }
    sum
}

/// Writes `d * (q[i] - offset) + m` (no `+ m` when `m` is `None`) for the 32 quants of a block.
#[inline(always)]
fn write_block(y: &mut [f32; QK], q: &[u8; QK], offset: i32, d: f32, m: Option<f32>) {
    for (y, &q) in y.iter_mut().zip(q) {
        let v = (i32::from(q) - offset) as f32 * d;
        *y = match m {
            Some(m) => v + m,
            None => v,
        };
    }
}

/// Dequantizes a Q4_0 row: `src` is `dst.len() / 32` blocks of 18 bytes.
pub fn dequantize_row_q4_0(src: &[u8], dst: &mut [f32]) {
    let nb = n_blocks(dst.len());
    let (out, _) = dst.as_chunks_mut::<QK>();
    for ([d0, d1, qs @ ..], y) in blocks::<Q4_0_BYTES>(src, nb, "q4_0").iter().zip(out) {
        write_block(y, &nibbles(qs), 8, f16_le(*d0, *d1), None);
    }
}

/// Dequantizes a Q4_1 row: `src` is `dst.len() / 32` blocks of 20 bytes.
pub fn dequantize_row_q4_1(src: &[u8], dst: &mut [f32]) {
    let nb = n_blocks(dst.len());
    let (out, _) = dst.as_chunks_mut::<QK>();
    for ([d0, d1, m0, m1, qs @ ..], y) in blocks::<Q4_1_BYTES>(src, nb, "q4_1").iter().zip(out) {
        write_block(y, &nibbles(qs), 0, f16_le(*d0, *d1), Some(f16_le(*m0, *m1)));
    }
}

/// Dequantizes a Q5_0 row: `src` is `dst.len() / 32` blocks of 22 bytes.
pub fn dequantize_row_q5_0(src: &[u8], dst: &mut [f32]) {
    let nb = n_blocks(dst.len());
    let (out, _) = dst.as_chunks_mut::<QK>();
    for ([d0, d1, h0, h1, h2, h3, qs @ ..], y) in blocks::<Q5_0_BYTES>(src, nb, "q5_0").iter().zip(out) {
        let q = five_bit([*h0, *h1, *h2, *h3], qs);
        write_block(y, &q, 16, f16_le(*d0, *d1), None);
    }
}

/// Dequantizes a Q5_1 row: `src` is `dst.len() / 32` blocks of 24 bytes.
pub fn dequantize_row_q5_1(src: &[u8], dst: &mut [f32]) {
    let nb = n_blocks(dst.len());
    let (out, _) = dst.as_chunks_mut::<QK>();
    for ([d0, d1, m0, m1, h0, h1, h2, h3, qs @ ..], y) in blocks::<Q5_1_BYTES>(src, nb, "q5_1").iter().zip(out) {
        let q = five_bit([*h0, *h1, *h2, *h3], qs);
        write_block(y, &q, 0, f16_le(*d0, *d1), Some(f16_le(*m0, *m1)));
    }
}

/// Dequantizes a Q8_0 row: `src` is `dst.len() / 32` blocks of 34 bytes.
pub fn dequantize_row_q8_0(src: &[u8], dst: &mut [f32]) {
    let nb = n_blocks(dst.len());
    let (out, _) = dst.as_chunks_mut::<QK>();
    for ([d0, d1, qs @ ..], y) in blocks::<Q8_0_BYTES>(src, nb, "q8_0").iter().zip(out) {
        let d = f16_le(*d0, *d1);
        for (y, &q) in y.iter_mut().zip(qs) {
            *y = f32::from(q as i8) * d;
        }
    }
}

/// Quantizes one block as ggml's reference does: `d = amax / 127`, `q = roundf(x / d)` computed
/// as `x * (1 / d)` (0 when `d == 0`), rounding half away from zero. Returns `(d, q)` with `d`
/// still in f32.
#[inline(always)]
fn quantize_block(x: &[f32; QK]) -> (f32, [u8; QK]) {
    let mut amax = 0f32;
    for &v in x {
        let a = v.abs();
        // ggml's `MAX(amax, fabsf(v))`, NaN behaviour included.
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = round_half_away(v * id) as u8;
    }
    (d, q)
}

/// C's `roundf` (nearest, ties away from zero) converted to i8 with saturation; NaN gives 0.
/// Written with truncation so that it vectorizes (baseline x86-64 has no rounding instruction and
/// would call `roundf` per element). In [`quantize_block`] `|v| <= 127` up to rounding, except
/// for non-finite `v` from inputs with subnormal or non-finite values.
#[inline(always)]
fn round_half_away(v: f32) -> i8 {
    let v = v.clamp(-128.0, 128.0);
    let t = v as i32; // toward zero; NaN -> 0
    let frac = v - t as f32; // exact: t is the integer part of v
    let r = t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5);
    r.clamp(i32::from(i8::MIN), i32::from(i8::MAX)) as i8
}

/// Quantizes activations `x` (`x.len()` a multiple of 32) to Q8_0 blocks in `dst`
/// (`x.len() / 32 * 34` bytes), bit-exact with ggml's `quantize_row_q8_0_ref`.
pub fn quantize_row_q8_0(x: &[f32], dst: &mut [u8]) {
    let nb = n_blocks(x.len());
    let (out, rest) = dst.as_chunks_mut::<Q8_0_BYTES>();
    assert!(rest.is_empty() && out.len() == nb, "quantize_row_q8_0: dst length");
    let (x, _) = x.as_chunks::<QK>();
    for (x, [d0, d1, qs @ ..]) in x.iter().zip(out) {
        let (d, q) = quantize_block(x);
        [*d0, *d1] = fp32_to_fp16(d).to_le_bytes();
        *qs = q;
    }
}

/// Quantizes activations `x` (`x.len()` a multiple of 32) to Q8_1 blocks in `dst`
/// (`x.len() / 32 * 36` bytes), bit-exact with ggml's `quantize_row_q8_1_ref`: `s` is the f16 of
/// `sum(q) as f32 * d` with the unrounded f32 `d`.
pub fn quantize_row_q8_1(x: &[f32], dst: &mut [u8]) {
    let nb = n_blocks(x.len());
    let (out, rest) = dst.as_chunks_mut::<Q8_1_BYTES>();
    assert!(rest.is_empty() && out.len() == nb, "quantize_row_q8_1: dst length");
    let (x, _) = x.as_chunks::<QK>();
    for (x, [d0, d1, s0, s1, qs @ ..]) in x.iter().zip(out) {
        let (d, q) = quantize_block(x);
        let sum: i32 = q.iter().map(|&q| i32::from(q as i8)).sum();
        [*d0, *d1] = fp32_to_fp16(d).to_le_bytes();
        [*s0, *s1] = fp32_to_fp16(sum as f32 * d).to_le_bytes();
        *qs = q;
    }
}

/// Dot product of a Q4_0 weight row `w` (`n / 32` blocks of 18 bytes) and a Q8_0 activation row
/// `a` (`n / 32` blocks of 34 bytes); `n` a multiple of 32.
pub fn vec_dot_q4_0_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = n_blocks(n);
    let w = blocks::<Q4_0_BYTES>(w, nb, "vec_dot_q4_0_q8_0 weights");
    let a = blocks::<Q8_0_BYTES>(a, nb, "vec_dot_q4_0_q8_0 activations");
    let mut sumf = 0f32;
    for ([wd0, wd1, wqs @ ..], [ad0, ad1, aqs @ ..]) in w.iter().zip(a) {
        let sumi = dot_unsigned(&nibbles(wqs), 8, aqs);
        sumf += sumi as f32 * f16_le(*wd0, *wd1) * f16_le(*ad0, *ad1);
    }
    sumf
}

/// Dot product of a Q4_1 weight row `w` (`n / 32` blocks of 20 bytes) and a Q8_1 activation row
/// `a` (`n / 32` blocks of 36 bytes); `n` a multiple of 32. Per block:
/// `d_w * d_a * sum(q_w * q_a) + m_w * s_a`.
pub fn vec_dot_q4_1_q8_1(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = n_blocks(n);
    let w = blocks::<Q4_1_BYTES>(w, nb, "vec_dot_q4_1_q8_1 weights");
    let a = blocks::<Q8_1_BYTES>(a, nb, "vec_dot_q4_1_q8_1 activations");
    let mut sumf = 0f32;
    for ([wd0, wd1, wm0, wm1, wqs @ ..], [ad0, ad1, as0, as1, aqs @ ..]) in w.iter().zip(a) {
        let sumi = dot_unsigned(&nibbles(wqs), 0, aqs);
        sumf += f16_le(*wd0, *wd1) * f16_le(*ad0, *ad1) * sumi as f32 + f16_le(*wm0, *wm1) * f16_le(*as0, *as1);
    }
    sumf
}

/// Dot product of a Q5_0 weight row `w` (`n / 32` blocks of 22 bytes) and a Q8_0 activation row
/// `a` (`n / 32` blocks of 34 bytes); `n` a multiple of 32.
pub fn vec_dot_q5_0_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = n_blocks(n);
    let w = blocks::<Q5_0_BYTES>(w, nb, "vec_dot_q5_0_q8_0 weights");
    let a = blocks::<Q8_0_BYTES>(a, nb, "vec_dot_q5_0_q8_0 activations");
    let mut sumf = 0f32;
    for ([wd0, wd1, h0, h1, h2, h3, wqs @ ..], [ad0, ad1, aqs @ ..]) in w.iter().zip(a) {
        let sumi = dot_unsigned(&five_bit([*h0, *h1, *h2, *h3], wqs), 16, aqs);
        sumf += f16_le(*wd0, *wd1) * f16_le(*ad0, *ad1) * sumi as f32;
    }
    sumf
}

/// Dot product of a Q5_1 weight row `w` (`n / 32` blocks of 24 bytes) and a Q8_1 activation row
/// `a` (`n / 32` blocks of 36 bytes); `n` a multiple of 32. Per block:
/// `d_w * d_a * sum(q_w * q_a) + m_w * s_a`.
pub fn vec_dot_q5_1_q8_1(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = n_blocks(n);
    let w = blocks::<Q5_1_BYTES>(w, nb, "vec_dot_q5_1_q8_1 weights");
    let a = blocks::<Q8_1_BYTES>(a, nb, "vec_dot_q5_1_q8_1 activations");
    let mut sumf = 0f32;
    for ([wd0, wd1, wm0, wm1, h0, h1, h2, h3, wqs @ ..], [ad0, ad1, as0, as1, aqs @ ..]) in w.iter().zip(a) {
        let sumi = dot_unsigned(&five_bit([*h0, *h1, *h2, *h3], wqs), 0, aqs);
        sumf += f16_le(*wd0, *wd1) * f16_le(*ad0, *ad1) * sumi as f32 + f16_le(*wm0, *wm1) * f16_le(*as0, *as1);
    }
    sumf
}

/// Dot product of a Q8_0 weight row `w` and a Q8_0 activation row `a` (each `n / 32` blocks of
/// 34 bytes); `n` a multiple of 32.
pub fn vec_dot_q8_0_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    let nb = n_blocks(n);
    let w = blocks::<Q8_0_BYTES>(w, nb, "vec_dot_q8_0_q8_0 weights");
    let a = blocks::<Q8_0_BYTES>(a, nb, "vec_dot_q8_0_q8_0 activations");
    let mut sumf = 0f32;
    for ([wd0, wd1, wqs @ ..], [ad0, ad1, aqs @ ..]) in w.iter().zip(a) {
        let sumi = dot_signed(wqs, aqs);
        sumf += sumi as f32 * (f16_le(*wd0, *wd1) * f16_le(*ad0, *ad1));
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testing::random_row;
    use crate::quant::{GgmlType, VecDotType};
    use half::f16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn f16_at(b: &[u8], off: usize) -> f32 {
        f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
    }

    /// Straightforward per-element dequantization from the block layout table in the module docs.
    fn reference_dequantize(ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
        let bytes = ty.type_size();
        (0..n)
            .map(|k| {
                let b = &src[k / 32 * bytes..][..bytes];
                let i = k % 32;
                let nibble = |qs: usize| -> u32 {
                    let byte = u32::from(b[qs + i % 16]);
                    if i < 16 { byte & 0xF } else { byte >> 4 }
                };
                let high = |qh: usize| -> u32 {
                    let qh = u32::from_le_bytes(b[qh..qh + 4].try_into().unwrap());
                    (qh >> i) & 1
                };
                match ty {
                    GgmlType::Q4_0 => (nibble(2) as i32 - 8) as f32 * f16_at(b, 0),
                    GgmlType::Q4_1 => nibble(4) as f32 * f16_at(b, 0) + f16_at(b, 2),
                    GgmlType::Q5_0 => ((nibble(6) + 16 * high(2)) as i32 - 16) as f32 * f16_at(b, 0),
                    GgmlType::Q5_1 => (nibble(8) + 16 * high(4)) as f32 * f16_at(b, 0) + f16_at(b, 2),
                    GgmlType::Q8_0 => f32::from(b[2 + i] as i8) * f16_at(b, 0),
                    _ => unreachable!(),
                }
            })
            .collect()
    }

    /// Dequantizes Q8_0 / Q8_1 activation blocks: `d * q`.
    fn dequantize_activations(ty: VecDotType, src: &[u8], n: usize) -> Vec<f32> {
        let (bytes, qs) = match ty {
            VecDotType::Q8_0 => (34, 2),
            VecDotType::Q8_1 => (36, 4),
            _ => unreachable!(),
        };
        (0..n)
            .map(|k| {
                let b = &src[k / 32 * bytes..][..bytes];
                f32::from(b[qs + k % 32] as i8) * f16_at(b, 0)
            })
            .collect()
    }

    const LEGACY: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

    #[test]
    fn block_sizes_match_type_table() {
        let ours = [Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES];
        for (ty, bytes) in LEGACY.into_iter().zip(ours) {
            assert_eq!((ty.block_size(), ty.type_size()), (QK, bytes), "{ty}");
        }
        assert_eq!(VecDotType::Q8_0.type_size(), Q8_0_BYTES);
        assert_eq!(VecDotType::Q8_1.type_size(), Q8_1_BYTES);
    }

    #[test]
    fn dequantize_matches_reference_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for ty in LEGACY {
            for n in [0, 32, 96, 2304] {
                let src = random_row(ty, n, &mut rng);
                let mut out = vec![f32::NAN; n];
                ty.dequantize_row(&src, &mut out);
                let want = reference_dequantize(ty, &src, n);
                for (k, (o, w)) in out.iter().zip(&want).enumerate() {
                    assert_eq!(o.to_bits(), w.to_bits(), "{ty} n={n} element {k}");
                }
            }
        }
    }

    #[test]
    fn q8_quantization_hand_picked() {
        // amax 127 gives d = 1 exactly, so x * id = x: ties round away from zero (roundf).
        let mut x = [0f32; 32];
        x[..12].copy_from_slice(&[127.0, 0.5, -0.5, 1.5, 2.5, -2.5, 0.49, -126.5, 3.0, 0.0, -0.0, -127.0]);
        let want_q: [i8; 12] = [127, 1, -1, 2, 3, -3, 0, -127, 3, 0, 0, -127];
        let want_sum: i32 = want_q.iter().map(|&q| i32::from(q)).sum();

        let mut b0 = [0u8; 34];
        quantize_row_q8_0(&x, &mut b0);
        assert_eq!(u16::from_le_bytes([b0[0], b0[1]]), 0x3c00, "d = 1.0");
        let mut b1 = [0u8; 36];
        quantize_row_q8_1(&x, &mut b1);
        assert_eq!(u16::from_le_bytes([b1[0], b1[1]]), 0x3c00, "d = 1.0");
        assert_eq!(f16_at(&b1, 2), want_sum as f32, "s = d * sum(q)");
        for (i, &q) in want_q.iter().enumerate() {
            assert_eq!(b0[2 + i] as i8, q, "q8_0 element {i}");
            assert_eq!(b1[4 + i] as i8, q, "q8_1 element {i}");
        }
        assert!(b0[2 + 12..].iter().chain(&b1[4 + 12..]).all(|&q| q == 0));

        // All-zero block: d = 0, s = 0, quants 0, no NaN.
        let zeros = [0f32; 64];
        let mut b0 = [0xAAu8; 68];
        quantize_row_q8_0(&zeros, &mut b0);
        assert!(b0.iter().all(|&b| b == 0));
        let mut b1 = [0xAAu8; 72];
        quantize_row_q8_1(&zeros, &mut b1);
        assert!(b1.iter().all(|&b| b == 0));
    }

    #[test]
    fn round_half_away_is_roundf() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut values: Vec<f32> = (0..200_000).map(|_| rng.random_range(-130.0f32..130.0)).collect();
        for k in -260..=260 {
            let tie = k as f32 * 0.5;
            values.extend([tie, tie.next_up(), tie.next_down()]);
        }
        values.extend([0.0, -0.0, 1e-40, -1e-40, 0.49999997, -0.49999997]);
        for v in values {
            assert_eq!(round_half_away(v), v.round().clamp(-128.0, 127.0) as i8, "{v:e}");
        }
        assert_eq!(round_half_away(f32::NAN), 0);
        assert_eq!(round_half_away(f32::INFINITY), 127);
        assert_eq!(round_half_away(f32::NEG_INFINITY), -128);
    }

    #[test]
    fn quantize_survives_subnormal_and_non_finite_inputs() {
        // amax subnormal: 1 / d overflows to inf. Non-finite: d is inf or NaN. No panic.
        let mut x = [0f32; 96];
        x[0] = 1e-40;
        x[1] = -3e-41;
        x[32] = f32::INFINITY;
        x[33] = 1.0;
        x[64] = f32::NAN;
        let mut b0 = [0u8; 3 * 34];
        quantize_row_q8_0(&x, &mut b0);
        let mut b1 = [0u8; 3 * 36];
        quantize_row_q8_1(&x, &mut b1);
        assert_eq!((b0[2] as i8, b0[3] as i8), (127, -128));
    }

    #[test]
    fn q8_1_sum_uses_unrounded_scale() {
        // amax = 1: d = 1/127 is not an f16, so s must be f16(sum * d_f32), not sum * f16(d).
        let mut x = [0.25f32; 32];
        x[0] = 1.0;
        let mut b = [0u8; 36];
        quantize_row_q8_1(&x, &mut b);
        let d = 1.0f32 / 127.0;
        let sum: i32 = b[4..].iter().map(|&q| i32::from(q as i8)).sum();
        assert_eq!(sum, 127 + 31 * 32); // 0.25 * 127 = 31.75 -> 32
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), f16::from_f32(sum as f32 * d).to_bits());
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), f16::from_f32(d).to_bits());
    }

    #[test]
    fn q8_round_trip_within_half_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let n = 1024;
        for ty in [VecDotType::Q8_0, VecDotType::Q8_1] {
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-5.0f32..5.0)).collect();
            let mut q = vec![0u8; ty.row_bytes(n)];
            ty.quantize_row(&x, &mut q);
            let y = dequantize_activations(ty, &q, n);
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f64::from(amax) / 127.0;
                let d16 = f64::from(f16::from_f64(d).to_f32());
                // Rounding to the step is within d / 2; the stored f16 scale moves each of the at
                // most 127 steps by |d - d16|; 1e-6 * d covers f32 rounding of x * (1 / d).
                let tol = 0.5 * d + 127.0 * (d - d16).abs() + 1e-6 * d;
                for (&a, &b) in xb.iter().zip(yb) {
                    assert!((f64::from(a) - f64::from(b)).abs() <= tol, "{ty:?}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn q8_quantization_matches_ggml_reference_formula() {
        // Per element, as written in ggml's quantize_row_q8_{0,1}_ref.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = 4096;
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut b0 = vec![0u8; n / 32 * 34];
        let mut b1 = vec![0u8; n / 32 * 36];
        quantize_row_q8_0(&x, &mut b0);
        quantize_row_q8_1(&x, &mut b1);
        for (bi, xb) in x.chunks(32).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<i8> = xb.iter().map(|v| (v * id).round() as i8).collect();
            let s = q.iter().map(|&q| i32::from(q)).sum::<i32>() as f32 * d;
            let (c0, c1) = (&b0[bi * 34..][..34], &b1[bi * 36..][..36]);
            assert_eq!(&c0[..2], &f16::from_f32(d).to_le_bytes());
            assert_eq!(&c1[..2], &f16::from_f32(d).to_le_bytes());
            assert_eq!(&c1[2..4], &f16::from_f32(s).to_le_bytes());
            for (j, &q) in q.iter().enumerate() {
                assert_eq!(c0[2 + j] as i8, q);
                assert_eq!(c1[4 + j] as i8, q);
            }
        }
    }

    /// Summation tolerance relative to `sum |products|`: the block sums are exact integers; the
    /// f32 scaling (3 roundings) and sequential accumulation of at most 72 blocks give < 1e-5.
    const SUM_REL_TOL: f64 = 1e-5;

    #[test]
    fn vec_dot_matches_dequantized_and_f32_dots() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        for ty in LEGACY {
            let aty = ty.vec_dot_type();
            for n in [32, 256, 2304] {
                let w = random_row(ty, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let mut a = vec![0u8; aty.row_bytes(n)];
                aty.quantize_row(&x, &mut a);
                let got = f64::from(crate::quant::vec_dot(ty, &w, &a, n));

                let wd = reference_dequantize(ty, &w, n);
                let ad = dequantize_activations(aty, &a, n);
                let prod = |p: f32, q: f32| f64::from(p) * f64::from(q);
                let exact: f64 = wd.iter().zip(&ad).map(|(&p, &q)| prod(p, q)).sum();
                let abs: f64 = wd.iter().zip(&ad).map(|(&p, &q)| prod(p, q).abs()).sum();

                // Q8_1's `s` is f16(d_f32 * sum q), not d_f16 * sum q as in the dequantized
                // row: each block adds |m| * |s - d16 * sum(q)| of deviation.
                let s_dev: f64 = if aty == VecDotType::Q8_1 {
                    (0..n / 32)
                        .map(|b| {
                            let (wb, ab) = (&w[b * ty.type_size()..], &a[b * 36..][..36]);
                            let sum: i32 = ab[4..].iter().map(|&q| i32::from(q as i8)).sum();
                            let s_ideal = f64::from(f16_at(ab, 0)) * f64::from(sum);
                            f64::from(f16_at(wb, 2)).abs() * (f64::from(f16_at(ab, 2)) - s_ideal).abs()
                        })
                        .sum()
                } else {
                    0.0
                };
                let tol = SUM_REL_TOL * abs + s_dev + 1e-30;
                assert!((got - exact).abs() <= tol, "{ty} n={n}: {got} vs {exact} (tol {tol})");

                // Against the f32 activations: each quantized activation is within one step
                // `d` of its block (half a step of rounding plus the f16 scale's error, see
                // q8_round_trip_within_half_step), so the dot moves by at most sum |w| * d.
                let orig: f64 = wd.iter().zip(&x).map(|(&p, &q)| prod(p, q)).sum();
                let step_dev: f64 = wd
                    .chunks(32)
                    .zip(x.chunks(32))
                    .map(|(wb, xb)| {
                        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                        wb.iter().map(|v| f64::from(v.abs())).sum::<f64>() * f64::from(amax) / 127.0
                    })
                    .sum();
                let tol = tol + step_dev;
                assert!((got - orig).abs() <= tol, "{ty} n={n}: {got} vs f32 {orig} (tol {tol})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "not a multiple of 32")]
    fn vec_dot_rejects_partial_blocks() {
        vec_dot_q8_0_q8_0(&[0; 34], &[0; 34], 31);
    }

    #[test]
    #[should_panic(expected = "q4_1")]
    fn dequantize_rejects_length_mismatch() {
        dequantize_row_q4_1(&[0; 19], &mut [0.0; 32]);
    }
}
