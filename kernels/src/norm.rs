//! RMSNorm (Zhang & Sennrich 2019), as llama.cpp computes it (`ggml_compute_forward_rms_norm_f32`:
//! the sum of squares accumulated in f64, then `x * 1/sqrt(mean + eps)`, then the weight product).

/// Normalizes each row of `x` (`[n_rows, n]` row-major, `n = weight.len()`) in place:
/// `x = x / sqrt(mean(x^2) + eps) * weight`.
///
/// Panics if `x.len()` is not a multiple of `weight.len()`.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n), "rms_norm: {} values do not split into rows of {n}", x.len());
    for row in x.chunks_exact_mut(n) {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
}

/// Copies `x` into `out` and normalizes it there (see [`rms_norm_inplace`]).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm_inplace(out, weight, eps);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_plain_formula() {
        let x: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.37).collect();
        let w: Vec<f32> = (0..6).map(|i| 0.5 + i as f32 * 0.1).collect();
        let mut out = vec![0.0; 12];
        rms_norm(&x, &w, 1e-6, &mut out);
        for (r, row) in x.chunks(6).enumerate() {
            let ms: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / 6.0;
            for i in 0..6 {
                let want = f64::from(row[i]) / (ms + 1e-6).sqrt() * f64::from(w[i]);
                assert!((f64::from(out[r * 6 + i]) - want).abs() < 1e-5, "row {r} col {i}");
            }
        }
    }

    #[test]
    fn zero_row_stays_finite() {
        let mut x = vec![0.0f32; 4];
        rms_norm_inplace(&mut x, &[1.0; 4], 1e-6);
        assert!(x.iter().all(|v| *v == 0.0));
    }
}
