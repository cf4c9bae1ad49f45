//! Rotary position embeddings, NeoX (half-split) layout, with optional YaRN scaling.
//!
//! Follows ggml's CPU rope (`ggml/src/ggml-cpu/ops.cpp`: `rope_yarn`, `ggml_rope_cache_init`,
//! `rotate_pairs`) and `ggml_rope_yarn_corr_dims` (`ggml/src/ggml.c`); YaRN is Peng et al. 2023
//! ("YaRN: Efficient Context Window Extension of Large Language Models"). NeoX layout pairs
//! element `i` with element `i + n_dims/2` of each head.

/// YaRN parameters of a RoPE layer (GGUF `{arch}.rope.scaling.*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    /// Context extension factor (`rope.scaling.factor`); frequencies are interpolated by `1/factor`.
    pub factor: f32,
    /// Training context the model was extended from (`rope.scaling.original_context_length`).
    pub original_context: u32,
    /// High-frequency boundary in rotations (`rope.scaling.yarn_beta_fast`, 32 by default).
    pub beta_fast: f32,
    /// Low-frequency boundary in rotations (`rope.scaling.yarn_beta_slow`, 1 by default).
    pub beta_slow: f32,
    /// Magnitude scale applied to cos and sin (`rope.scaling.yarn_attn_factor`, `0.1 ln(factor) + 1`
    /// when absent), i.e. the attention temperature of the YaRN paper, `sqrt(1/t)`.
    pub attn_factor: f32,
}

impl Yarn {
    /// The YaRN paper's default magnitude scale for `factor`: `0.1 ln(factor) + 1` (1 if factor <= 1).
    pub fn default_attn_factor(factor: f32) -> f32 {
        if factor <= 1.0 { 1.0 } else { 0.1 * factor.ln() + 1.0 }
    }
}

/// RoPE settings of one layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Rotated dimensions per head (`n_rot`, equal to the head size for Mellum and Qwen3-MoE).
    pub n_dims: usize,
    /// Base frequency theta (`rope.freq_base`).
    pub freq_base: f32,
    /// YaRN scaling, or `None` for plain RoPE.
    pub yarn: Option<Yarn>,
}

impl Rope {
    /// Fills `cos_sin` (`[n_dims/2, 2]`: cos then sin per pair) for position `pos`.
    pub fn cos_sin(&self, pos: usize, cos_sin: &mut [f32]) {
        let half = self.n_dims / 2;
        assert_eq!(cos_sin.len(), self.n_dims);
        let theta_scale = self.freq_base.powf(-2.0 / self.n_dims as f32);
        let (freq_scale, corr, mscale) = match self.yarn {
            Some(y) => {
                let dims = yarn_corr_dims(self.n_dims, y.original_context, self.freq_base, y.beta_fast, y.beta_slow);
                (1.0 / y.factor, Some(dims), y.attn_factor)
            }
            None => (1.0, None, 1.0),
        };
        let mut theta = pos as f32;
        for i in 0..half {
            let theta_extrap = theta;
            let theta_interp = freq_scale * theta_extrap;
            let angle = match corr {
                Some([low, high]) => {
                    let y = (i as f32 - low) / (high - low).max(0.001);
                    let ramp_mix = 1.0 - y.clamp(0.0, 1.0);
                    theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix
                }
                None => theta_interp,
            };
            cos_sin[2 * i] = angle.cos() * mscale;
            cos_sin[2 * i + 1] = angle.sin() * mscale;
            theta *= theta_scale;
        }
    }

    /// Rotates every head of `x` (`[n_heads, head_dim]`, `head_dim >= n_dims`) in place with the
    /// table from [`Rope::cos_sin`]; dimensions past `n_dims` are left as they are.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cos_sin: &[f32]) {
        let half = self.n_dims / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (c, s) = (cos_sin[2 * i], cos_sin[2 * i + 1]);
                let x0 = head[i];
                let x1 = head[i + half];
                head[i] = x0 * c - x1 * s;
                head[i + half] = x0 * s + x1 * c;
            }
        }
    }
}

/// The pair indices `[low, high]` between which YaRN blends interpolated and extrapolated
/// frequencies (`ggml_rope_yarn_corr_dims`): the dimension whose wavelength makes `beta`
/// rotations over the original context, floored / ceiled and clamped to `[0, n_dims - 1]`.
pub fn yarn_corr_dims(
    n_dims: usize,
    original_context: u32,
    freq_base: f32,
    beta_fast: f32,
    beta_slow: f32,
) -> [f32; 2] {
    let corr_dim = |beta: f32| {
        n_dims as f32 * (original_context as f32 / (beta * 2.0 * std::f32::consts::PI)).ln() / (2.0 * freq_base.ln())
    };
    let start = corr_dim(beta_fast).floor();
    let end = corr_dim(beta_slow).ceil();
    [start.max(0.0), end.min(n_dims as f32 - 1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 reference of NeoX RoPE with YaRN, written from the paper's formulas.
    fn reference(rope: &Rope, pos: usize, x: &[f32]) -> Vec<f64> {
        let d = rope.n_dims;
        let half = d / 2;
        let mut out: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        for i in 0..half {
            let inv_freq = f64::from(rope.freq_base).powf(-2.0 * i as f64 / d as f64);
            let extrap = pos as f64 * inv_freq;
            let (angle, m) = match rope.yarn {
                Some(y) => {
                    let [lo, hi] = yarn_corr_dims(d, y.original_context, rope.freq_base, y.beta_fast, y.beta_slow);
                    let t = ((i as f64 - f64::from(lo)) / f64::from((hi - lo).max(0.001))).clamp(0.0, 1.0);
                    let mix = 1.0 - t;
                    let interp = extrap / f64::from(y.factor);
                    (interp * (1.0 - mix) + extrap * mix, f64::from(y.attn_factor))
                }
                None => (extrap, 1.0),
            };
            let (x0, x1) = (f64::from(x[i]), f64::from(x[i + half]));
            out[i] = (x0 * angle.cos() - x1 * angle.sin()) * m;
            out[i + half] = (x0 * angle.sin() + x1 * angle.cos()) * m;
        }
        out
    }

    fn check(rope: Rope) {
        let x: Vec<f32> = (0..rope.n_dims).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let mut table = vec![0.0; rope.n_dims];
        for pos in [0usize, 1, 17, 1000, 8191] {
            rope.cos_sin(pos, &mut table);
            let mut y = x.clone();
            rope.apply(&mut y, rope.n_dims, &table);
            let want = reference(&rope, pos, &x);
            for (a, b) in y.iter().zip(&want) {
                // f32 angles of up to ~8000 radians carry ~1e-3 absolute error in ggml too.
                assert!((f64::from(*a) - b).abs() < 2e-3, "pos {pos}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn plain_rope_matches_reference() {
        check(Rope { n_dims: 128, freq_base: 500000.0, yarn: None });
    }

    #[test]
    fn yarn_rope_matches_reference() {
        let yarn = Yarn {
            factor: 16.0,
            original_context: 8192,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attn_factor: Yarn::default_attn_factor(16.0),
        };
        check(Rope { n_dims: 128, freq_base: 500000.0, yarn: Some(yarn) });
        check(Rope { n_dims: 16, freq_base: 500000.0, yarn: Some(yarn) });
    }

    #[test]
    fn mellum_attn_factor() {
        assert!((Yarn::default_attn_factor(16.0) - 1.277_258_9).abs() < 1e-6);
    }

    #[test]
    fn position_zero_is_identity_without_yarn() {
        let rope = Rope { n_dims: 8, freq_base: 10000.0, yarn: None };
        let mut t = vec![0.0; 8];
        rope.cos_sin(0, &mut t);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        rope.apply(&mut x, 8, &t);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    }
}
