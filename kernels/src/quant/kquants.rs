//! k-quants (Q2_K..Q6_K) and their Q8_K activation blocks.
//!
//! Every k-quant block covers a super-block of 256 weights, split into sub-blocks of 16 (Q2_K,
//! Q3_K, Q6_K) or 32 (Q4_K, Q5_K) weights that each carry a small integer scale (and, for Q2_K,
//! Q4_K and Q5_K, a min) that are themselves multiplied by the block's f16 super-scales `d` and
//! `dmin`. Byte layouts are those of llama.cpp's `ggml/src/ggml-common.h` (`block_q2_K` ...
//! `block_q8_K`), all fields little-endian; the dequantization and Q8_K quantization follow
//! `ggml/src/ggml-quants.c` bit for bit, the dot products follow the scalar kernels of
//! `ggml/src/ggml-cpu/quants.c` (`ggml_vec_dot_q*_K_q8_K_generic`) up to float summation order.
//!
//! Dot products take the activations already quantized to Q8_K (one block per 256 values) with
//! [`quantize_row_q8_k`], and accumulate integer products per sub-block in `i32`; for any byte
//! content of the blocks these sums stay below 2^28, so they cannot overflow.

use half::f16;

/// Elements per super-block (ggml's `QK_K`).
pub(crate) const QK_K: usize = 256;
/// Bytes of a `block_q2_K`.
const Q2_K_BYTES: usize = 84;
/// Bytes of a `block_q3_K`.
const Q3_K_BYTES: usize = 110;
/// Bytes of a `block_q4_K`.
const Q4_K_BYTES: usize = 144;
/// Bytes of a `block_q5_K`.
const Q5_K_BYTES: usize = 176;
/// Bytes of a `block_q6_K`.
const Q6_K_BYTES: usize = 210;
/// Bytes of a `block_q8_K`: f32 `d`, 256 `i8` quants, 16 `i16` sums of 16 quants.
const Q8_K_BYTES: usize = 292;

/// Quantizes `x` to Q8_K blocks in `dst`, bit-exactly as ggml's `quantize_row_q8_K_ref`
/// (`ggml/src/ggml-quants.c`), which every ggml CPU backend uses for k-quant activations.
///
/// Per block of 256 values, `dst` receives 292 bytes: `d: f32` (bytes 0..4), `qs: [i8; 256]`
/// (4..260) and `bsums: [i16; 16]` (260..292, `bsums[j]` is the sum of `qs[16j..16j + 16]`).
/// With `max` the first value of largest magnitude and `iscale = -127 / max`,
/// `qs[i] = min(127, round(iscale * x[i]))` (to nearest, ties to even) and `d = 1 / iscale`, so
/// `x[i] ~ d * qs[i]` and `d` is negative when `max` is positive. An all-zero block gives `d = 0`
/// and zero quants and sums (ggml leaves its `bsums` unwritten there; they are multiplied by 0).
///
/// # Panics
/// If `x.len()` is not a multiple of 256 or `dst.len() != x.len() / 256 * 292`.
pub fn quantize_row_q8_k(x: &[f32], dst: &mut [u8]) {
    assert!(x.len().is_multiple_of(QK_K), "Q8_K: {} values is not a multiple of 256", x.len());
    let n_blocks = x.len() / QK_K;
    let (out, rest) = dst.as_chunks_mut::<Q8_K_BYTES>();
    assert!(
        rest.is_empty() && out.len() == n_blocks,
        "Q8_K: {} destination bytes for {} values, need {}",
        out.len() * Q8_K_BYTES + rest.len(),
        x.len(),
        n_blocks * Q8_K_BYTES
    );
    for (x, out) in x.as_chunks::<QK_K>().0.iter().zip(out) {
        quantize_block_q8_k(x, out);
    }
}

/// Dequantizes Q2_K blocks (`block_q2_K`, 84 bytes per 256 weights) into `dst`, bit-exactly as
/// ggml's `dequantize_row_q2_K` (`ggml/src/ggml-quants.c`).
///
/// Layout: `scales: [u8; 16]` (bytes 0..16, one per 16 weights: low nibble scale, high nibble
/// min), `qs: [u8; 64]` (16..80, 2-bit quants), f16 `d` (80..82), f16 `dmin` (82..84). Weight
/// `e = 128h + 32j + l` is `(qs[32h + l] >> 2j) & 3 = q`, and
/// `w = (d * scale) * q - dmin * min` with the scale and min of sub-block `e / 16`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src.len() != dst.len() / 256 * 84`.
pub fn dequantize_row_q2_k(src: &[u8], dst: &mut [f32]) {
    let blocks = weight_blocks::<Q2_K_BYTES>(src, dst.len(), "Q2_K");
    for (b, y) in blocks.iter().zip(dst.as_chunks_mut::<QK_K>().0) {
        let d = f16_at(b, 80);
        let dmin = f16_at(b, 82);
        let q = unpack_2bit(field(b, 16));
        let sub_blocks = y.as_chunks_mut::<16>().0.iter_mut().zip(q.as_chunks::<16>().0);
        for ((y, q), &sc) in sub_blocks.zip(field::<16>(b, 0)) {
            dequantize_affine(y, q, d * f32::from(sc & 0xF), dmin * f32::from(sc >> 4));
        }
    }
}

/// Dequantizes Q3_K blocks (`block_q3_K`, 110 bytes per 256 weights) into `dst`, bit-exactly as
/// ggml's `dequantize_row_q3_K` (`ggml/src/ggml-quants.c`).
///
/// Layout: `hmask: [u8; 32]` (bytes 0..32, high bits), `qs: [u8; 64]` (32..96, low 2 bits),
/// `scales: [u8; 12]` (96..108, sixteen 6-bit scales), f16 `d` (108..110). Weight
/// `e = 128h + 32j + l` has low bits `(qs[32h + l] >> 2j) & 3` and high bit
/// `(hmask[l] >> (e / 32)) & 1`; a clear high bit subtracts 4, so `q` is in -4..=3. Scale `k` has
/// its low 4 bits in nibble `k / 8` of `scales[k % 8]` and its high 2 bits in bits `2(k / 4)..`
/// of `scales[8 + k % 4]`, stored with an offset of 32. `w = (d * (scale - 32)) * q` with the
/// scale of sub-block `e / 16`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src.len() != dst.len() / 256 * 110`.
pub fn dequantize_row_q3_k(src: &[u8], dst: &mut [f32]) {
    let blocks = weight_blocks::<Q3_K_BYTES>(src, dst.len(), "Q3_K");
    for (b, y) in blocks.iter().zip(dst.as_chunks_mut::<QK_K>().0) {
        let d = f16_at(b, 108);
        let q = unpack_q3_k(b);
        let sub_blocks = y.as_chunks_mut::<16>().0.iter_mut().zip(q.as_chunks::<16>().0);
        for ((y, q), sc) in sub_blocks.zip(q3_k_scales(field(b, 96))) {
            let dl = d * f32::from(sc);
            for (y, &q) in y.iter_mut().zip(q) {
                *y = dl * f32::from(q);
            }
        }
    }
}

/// Dequantizes Q4_K blocks (`block_q4_K`, 144 bytes per 256 weights) into `dst`, bit-exactly as
/// ggml's `dequantize_row_q4_K` (`ggml/src/ggml-quants.c`).
///
/// Layout: f16 `d` (bytes 0..2), f16 `dmin` (2..4), `scales: [u8; 12]` (4..16, eight 6-bit scales
/// and eight 6-bit mins, unpacked as ggml's `get_scale_min_k4`), `qs: [u8; 128]` (16..144).
/// Weight `e = 64c + 32h + l` is nibble `h` (0: low) of `qs[32c + l]`, and
/// `w = (d * scale) * q - dmin * min` with the scale and min of sub-block `e / 32`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src.len() != dst.len() / 256 * 144`.
pub fn dequantize_row_q4_k(src: &[u8], dst: &mut [f32]) {
    let blocks = weight_blocks::<Q4_K_BYTES>(src, dst.len(), "Q4_K");
    for (b, y) in blocks.iter().zip(dst.as_chunks_mut::<QK_K>().0) {
        dequantize_block_k4(b, &unpack_4bit(field(b, 16)), y);
    }
}

/// Dequantizes Q5_K blocks (`block_q5_K`, 176 bytes per 256 weights) into `dst`, bit-exactly as
/// ggml's `dequantize_row_q5_K` (`ggml/src/ggml-quants.c`).
///
/// Layout: f16 `d` (bytes 0..2), f16 `dmin` (2..4), `scales: [u8; 12]` (4..16, as Q4_K),
/// `qh: [u8; 32]` (16..48, high bits), `qs: [u8; 128]` (48..176, low nibbles). Weight
/// `e = 64c + 32h + l` is nibble `h` of `qs[32c + l]` plus 16 times bit `e / 32` of `qh[l]`, and
/// `w = (d * scale) * q - dmin * min` with the scale and min of sub-block `e / 32`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src.len() != dst.len() / 256 * 176`.
pub fn dequantize_row_q5_k(src: &[u8], dst: &mut [f32]) {
    let blocks = weight_blocks::<Q5_K_BYTES>(src, dst.len(), "Q5_K");
    for (b, y) in blocks.iter().zip(dst.as_chunks_mut::<QK_K>().0) {
        dequantize_block_k4(b, &unpack_q5_k(b), y);
    }
}

/// Dequantizes Q6_K blocks (`block_q6_K`, 210 bytes per 256 weights) into `dst`, bit-exactly as
/// ggml's `dequantize_row_q6_K` (`ggml/src/ggml-quants.c`).
///
/// Layout: `ql: [u8; 128]` (bytes 0..128, low nibbles), `qh: [u8; 64]` (128..192, high 2-bit
/// pairs), `scales: [i8; 16]` (192..208), f16 `d` (208..210). Weight `e = 128h + 32k + l` takes
/// nibble `k / 2` of `ql[64h + 32(k % 2) + l]` as low bits and bits `2k..2k + 2` of `qh[32h + l]`
/// as high bits, minus 32 (`q` in -32..=31), and `w = (d * scale) * q` with the scale of
/// sub-block `e / 16`.
///
/// # Panics
/// If `dst.len()` is not a multiple of 256 or `src.len() != dst.len() / 256 * 210`.
pub fn dequantize_row_q6_k(src: &[u8], dst: &mut [f32]) {
    let blocks = weight_blocks::<Q6_K_BYTES>(src, dst.len(), "Q6_K");
    for (b, y) in blocks.iter().zip(dst.as_chunks_mut::<QK_K>().0) {
        let d = f16_at(b, 208);
        let q = unpack_q6_k(b);
        let sub_blocks = y.as_chunks_mut::<16>().0.iter_mut().zip(q.as_chunks::<16>().0);
        for ((y, q), &sc) in sub_blocks.zip(field::<16>(b, 192)) {
            let dl = d * f32::from(sc as i8);
            for (y, &q) in y.iter_mut().zip(q) {
                *y = dl * f32::from(q);
            }
        }
    }
}

/// Dot product of a Q2_K weight row `w` (`n / 256` blocks of 84 bytes, see
/// [`dequantize_row_q2_k`]) with a Q8_K activation row `a` (`n / 256` blocks of 292 bytes, see
/// [`quantize_row_q8_k`]), as ggml's `ggml_vec_dot_q2_K_q8_K_generic`
/// (`ggml/src/ggml-cpu/quants.c`): per block, `a.d * d * sum(scale * q * a.q)` minus
/// `a.d * dmin * sum(min * bsum)`.
///
/// # Panics
/// If `n` is not a multiple of 256 or the lengths of `w` and `a` do not match `n`.
pub fn vec_dot_q2_k_q8_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let (w, a) = dot_blocks::<Q2_K_BYTES>(w, a, n, "Q2_K");
    let mut sumf = 0.0f32;
    for (b, a) in w.iter().zip(a) {
        let (ad, aq, bsums) = q8_k_parts(a);
        let scales = field::<16>(b, 0);
        let q = unpack_2bit(field(b, 16));
        let mut isum = 0i32;
        let mut summs = 0i32;
        let sub_blocks = q.as_chunks::<16>().0.iter().zip(aq.as_chunks::<16>().0);
        for (((q, aq), &sc), bsum) in sub_blocks.zip(scales).zip(bsums) {
            isum += i32::from(sc & 0xF) * dot(q, aq);
            summs += i32::from(sc >> 4) * bsum;
        }
        let dall = ad * f16_at(b, 80);
        let dmin = ad * f16_at(b, 82);
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// Dot product of a Q3_K weight row `w` (`n / 256` blocks of 110 bytes, see
/// [`dequantize_row_q3_k`]) with a Q8_K activation row `a` (`n / 256` blocks of 292 bytes), as
/// ggml's `ggml_vec_dot_q3_K_q8_K_generic` (`ggml/src/ggml-cpu/quants.c`): per block,
/// `d * a.d * sum((scale - 32) * q * a.q)` with `q` in -4..=3.
///
/// # Panics
/// If `n` is not a multiple of 256 or the lengths of `w` and `a` do not match `n`.
pub fn vec_dot_q3_k_q8_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let (w, a) = dot_blocks::<Q3_K_BYTES>(w, a, n, "Q3_K");
    let mut sumf = 0.0f32;
    for (b, a) in w.iter().zip(a) {
        let (ad, aq, _) = q8_k_parts(a);
        let q = unpack_q3_k(b);
        let sub_blocks = q.as_chunks::<16>().0.iter().zip(aq.as_chunks::<16>().0);
        let isum: i32 = sub_blocks.zip(q3_k_scales(field(b, 96))).map(|((q, aq), sc)| i32::from(sc) * dot(q, aq)).sum();
        sumf += f16_at(b, 108) * ad * isum as f32;
    }
    sumf
}

/// Dot product of a Q4_K weight row `w` (`n / 256` blocks of 144 bytes, see
/// [`dequantize_row_q4_k`]) with a Q8_K activation row `a` (`n / 256` blocks of 292 bytes), as
/// ggml's `ggml_vec_dot_q4_K_q8_K_generic` (`ggml/src/ggml-cpu/quants.c`): per block,
/// `d * a.d * sum(scale * q * a.q)` minus `dmin * a.d * sum(min * bsum)`.
///
/// # Panics
/// If `n` is not a multiple of 256 or the lengths of `w` and `a` do not match `n`.
pub fn vec_dot_q4_k_q8_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let (w, a) = dot_blocks::<Q4_K_BYTES>(w, a, n, "Q4_K");
    let mut sumf = 0.0f32;
    for (b, a) in w.iter().zip(a) {
        sumf += dot_block_k4(b, &unpack_4bit(field(b, 16)), a);
    }
    sumf
}

/// Dot product of a Q5_K weight row `w` (`n / 256` blocks of 176 bytes, see
/// [`dequantize_row_q5_k`]) with a Q8_K activation row `a` (`n / 256` blocks of 292 bytes), as
/// ggml's `ggml_vec_dot_q5_K_q8_K_generic` (`ggml/src/ggml-cpu/quants.c`): per block,
/// `d * a.d * sum(scale * q * a.q)` minus `dmin * a.d * sum(min * bsum)`.
///
/// # Panics
/// If `n` is not a multiple of 256 or the lengths of `w` and `a` do not match `n`.
pub fn vec_dot_q5_k_q8_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let (w, a) = dot_blocks::<Q5_K_BYTES>(w, a, n, "Q5_K");
    let mut sumf = 0.0f32;
    for (b, a) in w.iter().zip(a) {
        sumf += dot_block_k4(b, &unpack_q5_k(b), a);
    }
    sumf
}

/// Dot product of a Q6_K weight row `w` (`n / 256` blocks of 210 bytes, see
/// [`dequantize_row_q6_k`]) with a Q8_K activation row `a` (`n / 256` blocks of 292 bytes), as
/// ggml's `ggml_vec_dot_q6_K_q8_K_generic` (`ggml/src/ggml-cpu/quants.c`): per block,
/// `d * a.d * sum(scale * q * a.q)` with `q` in -32..=31.
///
/// # Panics
/// If `n` is not a multiple of 256 or the lengths of `w` and `a` do not match `n`.
pub fn vec_dot_q6_k_q8_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let (w, a) = dot_blocks::<Q6_K_BYTES>(w, a, n, "Q6_K");
    let mut sumf = 0.0f32;
    for (b, a) in w.iter().zip(a) {
        let (ad, aq, _) = q8_k_parts(a);
        let q = unpack_q6_k(b);
        let sub_blocks = q.as_chunks::<16>().0.iter().zip(aq.as_chunks::<16>().0);
        let isum: i32 =
            sub_blocks.zip(field::<16>(b, 192)).map(|((q, aq), &sc)| i32::from(sc as i8) * dot(q, aq)).sum();
        sumf += f16_at(b, 208) * ad * isum as f32;
    }
    sumf
}

/// ggml's `nearest_int`: rounds to nearest, ties to even, by adding 1.5 * 2^23 so that the
/// integer lands in the low mantissa bits. Exact for `|v| < 2^22`; kept literal so that any
/// input (even NaN or infinity) gives the bits ggml gives.
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// One block of [`quantize_row_q8_k`].
fn quantize_block_q8_k(x: &[f32; QK_K], out: &mut [u8; Q8_K_BYTES]) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        out.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let mut qs = [0i8; QK_K];
    for (q, &v) in qs.iter_mut().zip(x) {
        // ggml stores the clamped int into an int8_t; `as` truncates the same way.
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    out[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (o, &q) in out[4..4 + QK_K].iter_mut().zip(&qs) {
        *o = q as u8;
    }
    let bsums = out[4 + QK_K..].as_chunks_mut::<2>().0;
    for (o, q) in bsums.iter_mut().zip(qs.as_chunks::<16>().0) {
        let sum: i16 = q.iter().map(|&q| i16::from(q)).sum();
        *o = sum.to_le_bytes();
    }
}

/// Splits a weight row into blocks of `B` bytes for `n_values` values, checking the lengths.
fn weight_blocks<'a, const B: usize>(src: &'a [u8], n_values: usize, ty: &str) -> &'a [[u8; B]] {
    assert!(n_values.is_multiple_of(QK_K), "{ty}: {n_values} values is not a multiple of 256");
    let (blocks, rest) = src.as_chunks::<B>();
    assert!(
        rest.is_empty() && blocks.len() == n_values / QK_K,
        "{ty}: {} bytes for {n_values} values, need {}",
        src.len(),
        n_values / QK_K * B
    );
    blocks
}

/// Splits the operands of a dot product of `n` values into weight and Q8_K blocks.
fn dot_blocks<'a, const B: usize>(
    w: &'a [u8],
    a: &'a [u8],
    n: usize,
    ty: &str,
) -> (&'a [[u8; B]], &'a [[u8; Q8_K_BYTES]]) {
    (weight_blocks(w, n, ty), weight_blocks(a, n, "Q8_K"))
}

/// The `L` bytes of `b` from `offset` on (constant offsets into a fixed-size block compile to
/// no checks).
fn field<const L: usize>(b: &[u8], offset: usize) -> &[u8; L] {
    b[offset..offset + L].try_into().expect("a slice of L bytes converts to [u8; L]")
}

/// The little-endian f16 at `offset`, as f32.
fn f16_at(b: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes(*field(b, offset)).to_f32()
}

/// A Q8_K block's `d`, quants (as stored bytes) and `bsums`.
fn q8_k_parts(b: &[u8; Q8_K_BYTES]) -> (f32, &[u8; QK_K], [i32; 16]) {
    let d = f32::from_le_bytes(*field(b, 0));
    let mut bsums = [0i32; 16];
    for (s, bytes) in bsums.iter_mut().zip(field::<32>(b, 4 + QK_K).as_chunks::<2>().0) {
        *s = i32::from(i16::from_le_bytes(*bytes));
    }
    (d, field(b, 4), bsums)
}

/// Integer dot product of `N` unpacked weight quants with `N` Q8_K quants (stored bytes).
fn dot<const N: usize>(q: &[i8; N], aq: &[u8; N]) -> i32 {
    q.iter().zip(aq).map(|(&q, &a)| i32::from(q) * i32::from(a as i8)).sum()
}

/// The 2-bit quants of Q2_K / low bits of Q3_K: element `128h + 32j + l` is
/// `(qs[32h + l] >> 2j) & 3`.
#[inline(always)] // returns 256 bytes by value; inlined, the copy goes away
fn unpack_2bit(qs: &[u8; 64]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for (half, src) in q.as_chunks_mut::<128>().0.iter_mut().zip(qs.as_chunks::<32>().0) {
        for (shift, dst) in (0..8).step_by(2).zip(half.as_chunks_mut::<32>().0) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = ((s >> shift) & 3) as i8;
            }
        }
    }
    q
}

/// The 4-bit quants of Q4_K / low nibbles of Q5_K: element `64c + 32h + l` is nibble `h` of
/// `qs[32c + l]`.
#[inline(always)] // returns 256 bytes by value; inlined, the copy goes away
fn unpack_4bit(qs: &[u8; 128]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for (dst, src) in q.as_chunks_mut::<64>().0.iter_mut().zip(qs.as_chunks::<32>().0) {
        let (lo, hi) = dst.split_at_mut(32);
        for ((lo, hi), &s) in lo.iter_mut().zip(hi).zip(src) {
            *lo = (s & 0xF) as i8;
            *hi = (s >> 4) as i8;
        }
    }
    q
}

/// The signed quants (-4..=3) of a Q3_K block.
#[inline(always)] // returns 256 bytes by value; inlined, the copy goes away
fn unpack_q3_k(b: &[u8; Q3_K_BYTES]) -> [i8; QK_K] {
    let mut q = unpack_2bit(field(b, 32));
    let hmask = field::<32>(b, 0);
    for (bit, group) in q.as_chunks_mut::<32>().0.iter_mut().enumerate() {
        for (q, &h) in group.iter_mut().zip(hmask) {
            *q -= (((!h >> bit) & 1) << 2) as i8;
        }
    }
    q
}

/// The 5-bit quants (0..=31) of a Q5_K block.
#[inline(always)] // returns 256 bytes by value; inlined, the copy goes away
fn unpack_q5_k(b: &[u8; Q5_K_BYTES]) -> [i8; QK_K] {
    let mut q = unpack_4bit(field(b, 48));
    let qh = field::<32>(b, 16);
    for (bit, group) in q.as_chunks_mut::<32>().0.iter_mut().enumerate() {
        for (q, &h) in group.iter_mut().zip(qh) {
            *q += (((h >> bit) & 1) << 4) as i8;
        }
    }
    q
}

/// The signed quants (-32..=31) of a Q6_K block.
#[inline(always)] // returns 256 bytes by value; inlined, the copy goes away
fn unpack_q6_k(b: &[u8; Q6_K_BYTES]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    let ql = field::<128>(b, 0).as_chunks::<64>().0;
    let qh = field::<64>(b, 128).as_chunks::<32>().0;
    for ((dst, ql), qh) in q.as_chunks_mut::<128>().0.iter_mut().zip(ql).zip(qh) {
        let (ql0, ql1) = ql.split_at(32);
        // Per group of 32: the bytes holding its low nibbles, that nibble's shift, the shift of
        // its 2 high bits in `qh`.
        let sources = [(ql0, 0, 0), (ql1, 0, 2), (ql0, 4, 4), (ql1, 4, 6)];
        for (dst, (low, low_shift, high_shift)) in dst.as_chunks_mut::<32>().0.iter_mut().zip(sources) {
            for ((d, &lo), &h) in dst.iter_mut().zip(low).zip(qh) {
                *d = (((lo >> low_shift) & 0xF) | (((h >> high_shift) & 3) << 4)) as i8 - 32;
            }
        }
    }
    q
}

/// The sixteen 6-bit scales of a Q3_K block with their offset of 32 removed (-32..=31), decoded
/// four at a time in 32-bit words as ggml does.
pub(super) fn q3_k_scales(s: &[u8; 12]) -> [i8; 16] {
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes(*field(s, 4 * i));
    let (a0, a1, hi) = (word(0), word(1), word(2));
    let words = [
        (a0 & LOW4) | ((hi & LOW2) << 4),
        (a1 & LOW4) | (((hi >> 2) & LOW2) << 4),
        ((a0 >> 4) & LOW4) | (((hi >> 4) & LOW2) << 4),
        ((a1 >> 4) & LOW4) | (((hi >> 6) & LOW2) << 4),
    ];
    let mut scales = [0i8; 16];
    for (dst, w) in scales.as_chunks_mut::<4>().0.iter_mut().zip(words) {
        for (d, s) in dst.iter_mut().zip(w.to_le_bytes()) {
            *d = s as i8 - 32;
        }
    }
    scales
}

/// The eight 6-bit scales and eight 6-bit mins packed in 12 bytes (Q4_K, Q5_K), decoded in
/// 32-bit words as ggml's dot products do (equal to `get_scale_min_k4` per index).
pub(super) fn k4_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes(*field(s, 4 * i));
    let (a0, a1, a2) = (word(0), word(1), word(2));
    let join = |lo: u32, hi: u32| {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&lo.to_le_bytes());
        out[4..].copy_from_slice(&hi.to_le_bytes());
        out
    };
    let scales = join(a0 & LOW6, (a2 & LOW4) | (((a0 >> 6) & LOW2) << 4));
    let mins = join(a1 & LOW6, ((a2 >> 4) & LOW4) | (((a1 >> 6) & LOW2) << 4));
    (scales, mins)
}

/// Dequantizes one Q4_K or Q5_K block from its unpacked quants.
fn dequantize_block_k4(b: &[u8], q: &[i8; QK_K], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (scales, mins) = k4_scales_mins(field(b, 4));
    let sub_blocks = y.as_chunks_mut::<32>().0.iter_mut().zip(q.as_chunks::<32>().0);
    for (((y, q), sc), m) in sub_blocks.zip(scales).zip(mins) {
        dequantize_affine(y, q, d * f32::from(sc), dmin * f32::from(m));
    }
}

/// `y = dl * q - ml` over one sub-block. Kept out of line: inlined into the loop over
/// sub-blocks, LLVM vectorizes across sub-blocks with gathers and runs twice as slow.
#[inline(never)]
fn dequantize_affine<const N: usize>(y: &mut [f32; N], q: &[i8; N], dl: f32, ml: f32) {
    for (y, &q) in y.iter_mut().zip(q) {
        *y = dl * f32::from(q) - ml;
    }
}

/// Dot product of one Q4_K or Q5_K block, given its unpacked quants, with one Q8_K block.
fn dot_block_k4(b: &[u8], q: &[i8; QK_K], a: &[u8; Q8_K_BYTES]) -> f32 {
    let (ad, aq, bsums) = q8_k_parts(a);
    let (scales, mins) = k4_scales_mins(field(b, 4));
    let sub_blocks = q.as_chunks::<32>().0.iter().zip(aq.as_chunks::<32>().0);
    let isum: i32 = sub_blocks.zip(scales).map(|((q, aq), sc)| i32::from(sc) * dot(q, aq)).sum();
    let summs: i32 = bsums.as_chunks::<2>().0.iter().zip(mins).map(|(s, m)| i32::from(m) * (s[0] + s[1])).sum();
    f16_at(b, 0) * ad * isum as f32 - f16_at(b, 2) * ad * summs as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// One k-quant type under test: block size, where its f16 super-scales sit, its kernels and
    /// an independent per-element reference dequantizer.
    struct Kind {
        name: &'static str,
        bytes: usize,
        f16_offsets: &'static [usize],
        dequantize: fn(&[u8], &mut [f32]),
        vec_dot: fn(&[u8], &[u8], usize) -> f32,
        reference: fn(&[u8], usize) -> f32,
    }

    static KINDS: [Kind; 5] = [
        Kind {
            name: "Q2_K",
            bytes: 84,
            f16_offsets: &[80, 82],
            dequantize: dequantize_row_q2_k,
            vec_dot: vec_dot_q2_k_q8_k,
            reference: ref_q2_k,
        },
        Kind {
            name: "Q3_K",
            bytes: 110,
            f16_offsets: &[108],
            dequantize: dequantize_row_q3_k,
            vec_dot: vec_dot_q3_k_q8_k,
            reference: ref_q3_k,
        },
        Kind {
            name: "Q4_K",
            bytes: 144,
            f16_offsets: &[0, 2],
            dequantize: dequantize_row_q4_k,
            vec_dot: vec_dot_q4_k_q8_k,
            reference: ref_q4_k,
        },
        Kind {
            name: "Q5_K",
            bytes: 176,
            f16_offsets: &[0, 2],
            dequantize: dequantize_row_q5_k,
            vec_dot: vec_dot_q5_k_q8_k,
            reference: ref_q5_k,
        },
        Kind {
            name: "Q6_K",
            bytes: 210,
            f16_offsets: &[208],
            dequantize: dequantize_row_q6_k,
            vec_dot: vec_dot_q6_k_q8_k,
            reference: ref_q6_k,
        },
    ];

    fn kind(name: &str) -> &'static Kind {
        KINDS.iter().find(|k| k.name == name).expect("known kind")
    }

    fn ref_f16(b: &[u8], offset: usize) -> f32 {
        f16::from_le_bytes([b[offset], b[offset + 1]]).to_f32()
    }

    /// Bits `shift..shift + width` of `byte`.
    fn bits(byte: u8, shift: usize, width: u32) -> u32 {
        (u32::from(byte) >> shift) & ((1 << width) - 1)
    }

    /// Q2_K / Q3_K low bits of element `e`: 32-byte group `e / 128`, 2-bit field `(e % 128) / 32`.
    fn ref_low2(qs: &[u8], e: usize) -> u32 {
        bits(qs[(e / 128) * 32 + e % 32], 2 * ((e % 128) / 32), 2)
    }

    /// Q4_K / Q5_K low nibble of element `e`: 32-byte group `e / 64`, nibble `(e / 32) % 2`.
    fn ref_nibble(qs: &[u8], e: usize) -> u32 {
        bits(qs[(e / 64) * 32 + e % 32], 4 * ((e / 32) % 2), 4)
    }

    /// Scale and min `j` of the 12-byte Q4_K / Q5_K field, following the layout description:
    /// indices 0..4 are the low 6 bits of bytes 0..4 (scales) and 4..8 (mins); indices 4..8 take
    /// their low 4 bits from the nibbles of bytes 8..12 and their top 2 bits from the spare top
    /// bits of bytes 0..4 (scales) and 4..8 (mins).
    fn ref_scale_min_k4(s: &[u8], j: usize) -> (u32, u32) {
        if j < 4 {
            (bits(s[j], 0, 6), bits(s[j + 4], 0, 6))
        } else {
            let k = j - 4;
            (bits(s[8 + k], 0, 4) | bits(s[k], 6, 2) << 4, bits(s[8 + k], 4, 4) | bits(s[4 + k], 6, 2) << 4)
        }
    }

    fn ref_q2_k(b: &[u8], e: usize) -> f32 {
        let sc = b[e / 16];
        let q = ref_low2(&b[16..80], e);
        let dl = ref_f16(b, 80) * bits(sc, 0, 4) as f32;
        let ml = ref_f16(b, 82) * bits(sc, 4, 4) as f32;
        dl * q as f32 - ml
    }

    fn ref_q3_k(b: &[u8], e: usize) -> f32 {
        let high = bits(b[e % 32], e / 32, 1);
        let q = ref_low2(&b[32..96], e) as i32 - if high == 1 { 0 } else { 4 };
        let k = e / 16;
        let s = &b[96..108];
        let scale = (bits(s[k % 8], 4 * (k / 8), 4) | bits(s[8 + k % 4], 2 * (k / 4), 2) << 4) as i32;
        let dl = ref_f16(b, 108) * (scale - 32) as f32;
        dl * q as f32
    }

    fn ref_q4_k(b: &[u8], e: usize) -> f32 {
        let (sc, m) = ref_scale_min_k4(&b[4..16], e / 32);
        let q = ref_nibble(&b[16..144], e);
        (ref_f16(b, 0) * sc as f32) * q as f32 - ref_f16(b, 2) * m as f32
    }

    fn ref_q5_k(b: &[u8], e: usize) -> f32 {
        let (sc, m) = ref_scale_min_k4(&b[4..16], e / 32);
        let q = ref_nibble(&b[48..176], e) + 16 * bits(b[16 + e % 32], e / 32, 1);
        (ref_f16(b, 0) * sc as f32) * q as f32 - ref_f16(b, 2) * m as f32
    }

    fn ref_q6_k(b: &[u8], e: usize) -> f32 {
        let (half, quarter, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = bits(b[half * 64 + (quarter % 2) * 32 + l], 4 * (quarter / 2), 4);
        let high = bits(b[128 + half * 32 + l], 2 * quarter, 2);
        let q = (low | high << 4) as i32 - 32;
        let scale = b[192 + e / 16] as i8;
        (ref_f16(b, 208) * f32::from(scale)) * q as f32
    }

    /// `n_blocks` blocks of `kind` with random bytes, except that rows of more than two blocks
    /// start with a block of all zero bytes and one of all 0xFF bytes; the f16 super-scales are
    /// replaced by finite values in [-0.1, 0.1].
    fn random_blocks(rng: &mut ChaCha8Rng, kind: &Kind, n_blocks: usize) -> Vec<u8> {
        let mut w = vec![0u8; n_blocks * kind.bytes];
        for (i, b) in w.chunks_exact_mut(kind.bytes).enumerate() {
            match i {
                0 if n_blocks > 2 => {}
                1 if n_blocks > 2 => b.fill(0xFF),
                _ => rng.fill(b),
            }
            for &o in kind.f16_offsets {
                let d = f16::from_f32(rng.random_range(-0.1f32..=0.1));
                b[o..o + 2].copy_from_slice(&d.to_le_bytes());
            }
        }
        w
    }

    fn check_dequantize(kind: &Kind, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n_blocks = 40;
        let w = random_blocks(&mut rng, kind, n_blocks);
        let mut got = vec![f32::NAN; n_blocks * QK_K];
        (kind.dequantize)(&w, &mut got);
        for (i, (b, y)) in w.chunks_exact(kind.bytes).zip(got.chunks_exact(QK_K)).enumerate() {
            for (e, &y) in y.iter().enumerate() {
                let want = (kind.reference)(b, e);
                assert_eq!(y.to_bits(), want.to_bits(), "{} block {i} element {e}: {y} != {want}", kind.name);
            }
        }
    }

    #[test]
    fn dequantize_q2_k_matches_reference() {
        check_dequantize(kind("Q2_K"), 2);
    }

    #[test]
    fn dequantize_q3_k_matches_reference() {
        check_dequantize(kind("Q3_K"), 3);
    }

    #[test]
    fn dequantize_q4_k_matches_reference() {
        check_dequantize(kind("Q4_K"), 4);
    }

    #[test]
    fn dequantize_q5_k_matches_reference() {
        check_dequantize(kind("Q5_K"), 5);
    }

    #[test]
    fn dequantize_q6_k_matches_reference() {
        check_dequantize(kind("Q6_K"), 6);
    }

    /// A decoded Q8_K block.
    struct Q8K {
        d: f32,
        qs: Vec<i8>,
        bsums: Vec<i16>,
    }

    fn decode_q8_k(b: &[u8]) -> Q8K {
        Q8K {
            d: f32::from_le_bytes(b[0..4].try_into().unwrap()),
            qs: b[4..260].iter().map(|&q| q as i8).collect(),
            bsums: b[260..292].chunks_exact(2).map(|s| i16::from_le_bytes([s[0], s[1]])).collect(),
        }
    }

    fn quantize_one(x: &[f32; QK_K]) -> Q8K {
        let mut out = [0xAAu8; Q8_K_BYTES];
        quantize_row_q8_k(x, &mut out);
        decode_q8_k(&out)
    }

    fn dequantize_q8_k(a: &[u8]) -> Vec<f32> {
        a.chunks_exact(Q8_K_BYTES)
            .flat_map(|b| {
                let b = decode_q8_k(b);
                b.qs.into_iter().map(move |q| b.d * f32::from(q))
            })
            .collect()
    }

    #[test]
    fn q8_k_all_zero_block() {
        let b = quantize_one(&[0.0; QK_K]);
        assert_eq!(b.d.to_bits(), 0);
        assert!(b.qs.iter().all(|&q| q == 0));
        assert!(b.bsums.iter().all(|&s| s == 0));
        let mut x = [0.0; QK_K];
        x[17] = -0.0;
        assert_eq!(quantize_one(&x).d.to_bits(), 0, "-0.0 has no magnitude");
    }

    /// Largest magnitude -127 gives iscale = -127 / -127 = 1 exactly, so quants are `x` rounded
    /// half to even (not half away from zero), and d = 1.
    #[test]
    fn q8_k_negative_max_rounds_ties_to_even() {
        let mut x = [0.0f32; QK_K];
        let cases: [(f32, i8); 12] = [
            (-127.0, -127),
            (0.5, 0),
            (-0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-2.5, -2),
            (3.5, 4),
            (-3.5, -4),
            (126.5, 126),
            (126.6, 127),
            (127.0, 127),
            (0.49, 0),
        ];
        for (i, &(v, _)) in cases.iter().enumerate() {
            x[i * 20] = v;
        }
        let b = quantize_one(&x);
        assert_eq!(b.d, 1.0);
        for (i, &(v, q)) in cases.iter().enumerate() {
            assert_eq!(b.qs[i * 20], q, "x = {v}");
        }
        for (j, s) in b.bsums.iter().enumerate() {
            let want: i32 = b.qs[16 * j..16 * j + 16].iter().map(|&q| i32::from(q)).sum();
            assert_eq!(i32::from(*s), want, "bsum {j}");
        }
    }

    /// A positive maximum gives iscale = -127 / max < 0: quants have the opposite sign of `x`,
    /// the maximum maps to -127 and d = max / -127.
    #[test]
    fn q8_k_positive_max_gives_negative_d() {
        let mut x = [0.0f32; QK_K];
        x[3] = 2.0;
        x[200] = -1.0;
        x[201] = 0.25;
        let b = quantize_one(&x);
        // iscale = -63.5 exactly; -63.5 rounds to the even -64.
        assert_eq!(b.d, 1.0 / -63.5);
        assert_eq!((b.qs[3], b.qs[200], b.qs[201]), (-127, 64, -16));
        assert_eq!((b.bsums[0], b.bsums[12]), (-127, 48));
    }

    /// Of equal magnitudes the first wins, so its sign sets the sign of d.
    #[test]
    fn q8_k_equal_magnitudes_first_sets_sign() {
        let mut x = [0.0f32; QK_K];
        x[10] = -4.0;
        x[20] = 4.0;
        let b = quantize_one(&x);
        assert!(b.d > 0.0);
        assert_eq!((b.qs[10], b.qs[20]), (-127, 127));
        x[5] = 4.0;
        let b = quantize_one(&x);
        assert!(b.d < 0.0);
        assert_eq!((b.qs[5], b.qs[10], b.qs[20]), (-127, 127, -127));
    }

    /// Activations for 256-blocks of very different magnitudes, with an outlier per block.
    fn random_activations(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        let mut x = vec![0.0f32; n];
        for b in x.chunks_exact_mut(QK_K) {
            let scale = 10f32.powf(rng.random_range(-3.0..2.0));
            for v in b.iter_mut() {
                *v = rng.random_range(-scale..scale);
            }
            let i = rng.random_range(0..QK_K);
            b[i] *= rng.random_range(1.0..8.0);
        }
        x
    }

    /// The bound of the Q8_K round trip: half a quantization step, plus 8 ulps of the largest
    /// magnitude for the rounding of `iscale * x` and `d * q`.
    fn q8_k_error_bound(d: f32, amax: f32) -> f32 {
        d.abs() / 2.0 + 8.0 * f32::EPSILON * amax
    }

    #[test]
    fn q8_k_roundtrip_error_and_bsums() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let x = random_activations(&mut rng, 64 * QK_K);
        let mut a = vec![0u8; 64 * Q8_K_BYTES];
        quantize_row_q8_k(&x, &mut a);
        for (xb, ab) in x.chunks_exact(QK_K).zip(a.chunks_exact(Q8_K_BYTES)) {
            let b = decode_q8_k(ab);
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(b.qs.contains(&-127), "the largest magnitude maps to -127");
            for (&v, &q) in xb.iter().zip(&b.qs) {
                let err = (b.d * f32::from(q) - v).abs();
                assert!(err <= q8_k_error_bound(b.d, amax), "x = {v}, d = {}, q = {q}", b.d);
            }
            for (j, s) in b.bsums.iter().enumerate() {
                let want: i32 = b.qs[16 * j..16 * j + 16].iter().map(|&q| i32::from(q)).sum();
                assert_eq!(i32::from(*s), want, "bsum {j}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "Q8_K: 291 destination bytes")]
    fn q8_k_rejects_short_destination() {
        quantize_row_q8_k(&[0.0; QK_K], &mut [0u8; Q8_K_BYTES - 1]);
    }

    /// `vec_dot` against f64 dot products, for one block and for a Mellum2 hidden row (2304).
    ///
    /// 1. Against the dequantized weights and dequantized Q8_K activations: the kernel computes
    ///    the same quantity with exact integer sums and a few f32 roundings per block (the super
    ///    scale products, the int-to-float conversions, the dequantized values' own roundings),
    ///    so it agrees to 1e-5 of the sum of |products|.
    /// 2. Against the raw f32 activations: each Q8_K value is within `q8_k_error_bound` of its
    ///    activation (checked in `q8_k_roundtrip_error_and_bsums`), so the dot products differ by
    ///    at most that bound times the sum of |w| over the block, summed over blocks; plus the
    ///    tolerance of 1. This is a worst-case bound, about 1/254 of the block's largest |x| per
    ///    weight, i.e. on the order of 1% of the sum of |products| for these activations.
    fn check_vec_dot(kind: &Kind, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for n in [QK_K, 9 * QK_K] {
            for _ in 0..20 {
                let w = random_blocks(&mut rng, kind, n / QK_K);
                let x = random_activations(&mut rng, n);
                let mut a = vec![0u8; n / QK_K * Q8_K_BYTES];
                quantize_row_q8_k(&x, &mut a);
                let got = f64::from((kind.vec_dot)(&w, &a, n));

                let mut wf = vec![0.0f32; n];
                (kind.dequantize)(&w, &mut wf);
                let af = dequantize_q8_k(&a);
                let products = || wf.iter().zip(&af).map(|(&w, &a)| f64::from(w) * f64::from(a));
                let exact: f64 = products().sum();
                let magnitude: f64 = products().map(f64::abs).sum();
                let tol = 1e-5 * magnitude;
                assert!((got - exact).abs() <= tol, "{} n={n}: {got} vs {exact} (tolerance {tol})", kind.name);

                let mut raw = 0.0f64;
                let mut raw_tol = tol;
                let blocks = wf.chunks_exact(QK_K).zip(x.chunks_exact(QK_K));
                for ((wb, xb), ab) in blocks.zip(a.chunks_exact(Q8_K_BYTES)) {
                    raw += wb.iter().zip(xb).map(|(&w, &x)| f64::from(w) * f64::from(x)).sum::<f64>();
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let step = q8_k_error_bound(decode_q8_k(ab).d, amax);
                    raw_tol += f64::from(step) * wb.iter().map(|w| f64::from(w.abs())).sum::<f64>();
                }
                assert!((got - raw).abs() <= raw_tol, "{} n={n}: {got} vs raw {raw} (tolerance {raw_tol})", kind.name);
            }
        }
    }

    #[test]
    fn vec_dot_q2_k_q8_k_matches_f64() {
        check_vec_dot(kind("Q2_K"), 12);
    }

    #[test]
    fn vec_dot_q3_k_q8_k_matches_f64() {
        check_vec_dot(kind("Q3_K"), 13);
    }

    #[test]
    fn vec_dot_q4_k_q8_k_matches_f64() {
        check_vec_dot(kind("Q4_K"), 14);
    }

    #[test]
    fn vec_dot_q5_k_q8_k_matches_f64() {
        check_vec_dot(kind("Q5_K"), 15);
    }

    #[test]
    fn vec_dot_q6_k_q8_k_matches_f64() {
        check_vec_dot(kind("Q6_K"), 16);
    }

    #[test]
    #[should_panic(expected = "Q4_K: 143 bytes for 256 values")]
    fn vec_dot_rejects_wrong_weight_length() {
        vec_dot_q4_k_q8_k(&[0u8; Q4_K_BYTES - 1], &[0u8; Q8_K_BYTES], QK_K);
    }
}
