//! A quick measurement of this machine's quantized GEMV throughput, used to weigh nodes in
//! expert placement: a Q4_K matrix of about 32 MiB times one activation row, repeated for a
//! fixed time on the current rayon pool; the result is GB/s of weight bytes read.

use std::time::{Duration, Instant};

use crate::matmul::{QMatrix, QuantizedActivations, matmul};
use crate::quant::GgmlType;

/// Measures quantized GEMV throughput for about `budget`, in GB/s (10^9 bytes of weights per
/// second). Runs on the current rayon pool.
pub fn gemv_gbps(budget: Duration) -> f32 {
    let (rows, cols) = (14_336usize, 2304usize);
    let ty = GgmlType::Q4_K;
    let row_bytes = ty.row_bytes(cols).expect("2304 is a multiple of 256");
    let mut data = vec![0u8; rows * row_bytes];
    let mut seed = 0x9e37_79b9u32;
    for (i, b) in data.iter_mut().enumerate() {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        // Keep each block's f16 d/dmin (its first 4 bytes) small and finite.
        *b = if i % 144 < 4 { if i % 2 == 1 { 0x1c } else { 0 } } else { (seed >> 24) as u8 };
    }
    let w = QMatrix::new(ty, rows, cols, &data);
    let x: Vec<f32> = (0..cols).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let xq = QuantizedActivations::quantize(ty.vec_dot_type(), &x, 1, cols);
    let mut out = vec![0.0f32; rows];
    matmul(&w, &xq, &mut out);
    let start = Instant::now();
    let mut reps = 0u64;
    while start.elapsed() < budget || reps == 0 {
        matmul(&w, &xq, &mut out);
        reps += 1;
    }
    (reps as f64 * data.len() as f64 / start.elapsed().as_secs_f64() / 1e9) as f32
}

#[cfg(test)]
mod tests {
    #[test]
    fn gives_a_positive_finite_rate() {
        let r = super::gemv_gbps(std::time::Duration::from_millis(20));
        assert!(r.is_finite() && r > 0.0, "{r}");
    }
}
