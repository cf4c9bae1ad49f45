//! Random tensor data in GGUF block layouts, for synthesized model files and benchmarks: random
//! quant bits with f16 super-scales chosen so that the dequantized weights have a requested
//! standard deviation and a mean near zero.

use half::{bf16, f16};

use crate::quant::GgmlType;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Blocks dequantized to calibrate a quant type's scales.
const CALIBRATION_BLOCKS: usize = 256;

/// What a tensor's elements should look like, as f32 values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Init {
    /// Mean of the elements (1 for norm weights, 0 for matrices).
    pub mean: f32,
    /// Standard deviation of the elements.
    pub std: f32,
}

/// Fills rows of one element type with random data of a given [`Init`].
///
/// Float types get uniform values. Quant types get random bytes (so every quant, sub-block
/// scale and min is uniform over its bits) and, in each block, f16 super-scales `d` (and
/// `dmin`) of `u x d0` (`u x dmin0`), `u` uniform in [0.5, 1.5); `d0` and `dmin0` are calibrated
/// by dequantizing sample blocks with the kernels, so that the weights' standard deviation is
/// about `init.std` (4% more from the spread of `u`) and their mean about 0. (`init.mean` is
/// ignored for quant types.)
#[derive(Clone, Debug)]
pub struct BlockFiller {
    ty: GgmlType,
    init: Init,
    /// Byte offsets in a block of `d` and `dmin` (or `m`), and their calibrated values.
    d: Option<(usize, f32)>,
    dmin: Option<(usize, f32)>,
}

/// Byte offsets of the f16 super-scale `d` and of `dmin` / `m` in a block (`ggml-common.h`);
/// `None` for float types.
fn scale_offsets(ty: GgmlType) -> Option<(usize, Option<usize>)> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some((0, None)),
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => Some((0, Some(2))),
        // block_q2_K: scales[16], qs[64], d, dmin.
        GgmlType::Q2_K => Some((80, Some(82))),
        // block_q3_K: hmask[32], qs[64], scales[12], d.
        GgmlType::Q3_K => Some((108, None)),
        // block_q6_K: ql[128], qh[64], scales[16], d.
        GgmlType::Q6_K => Some((208, None)),
    }
}

impl BlockFiller {
    /// A filler of `ty` data with elements distributed as `init`.
    pub fn new(ty: GgmlType, init: Init) -> Self {
        let Some((d_at, dmin_at)) = scale_offsets(ty) else {
            return BlockFiller { ty, init, d: None, dmin: None };
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut sample = vec![0u8; CALIBRATION_BLOCKS * ty.type_size()];
        rng.fill_bytes(&mut sample);
        // Weights are linear in `d` and `dmin`: the means with (d, dmin) = (1, 0) and (0, 1) give
        // the `dmin / d` ratio that centres them, then both are scaled to the requested spread.
        let (d_mean, _) = moments(ty, &with_scales(ty, &sample, d_at, dmin_at, 1.0, 0.0));
        let ratio = match dmin_at {
            Some(_) => -d_mean / moments(ty, &with_scales(ty, &sample, d_at, dmin_at, 0.0, 1.0)).0,
            None => 0.0,
        };
        let (_, std) = moments(ty, &with_scales(ty, &sample, d_at, dmin_at, 1.0, ratio));
        let d0 = init.std / std;
        BlockFiller { ty, init, d: Some((d_at, d0)), dmin: dmin_at.map(|at| (at, ratio * d0)) }
    }

    /// Fills `out` (whole rows of this filler's type) from `rng`.
    pub fn fill(&self, rng: &mut ChaCha8Rng, out: &mut [u8]) {
        let Some((d_at, d0)) = self.d else {
            let (lo, hi) = (self.init.mean - self.init.std * 3f32.sqrt(), self.init.mean + self.init.std * 3f32.sqrt());
            let width = self.ty.type_size();
            for elem in out.chunks_exact_mut(width) {
                let v: f32 = rng.random_range(lo..hi);
                match self.ty {
                    GgmlType::F32 => elem.copy_from_slice(&v.to_le_bytes()),
                    GgmlType::F16 => elem.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                    _ => elem.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                }
            }
            return;
        };
        rng.fill_bytes(out);
        for block in out.chunks_exact_mut(self.ty.type_size()) {
            let u: f32 = rng.random_range(0.5..1.5);
            block[d_at..d_at + 2].copy_from_slice(&f16::from_f32(u * d0).to_le_bytes());
            if let Some((at, dmin)) = self.dmin {
                block[at..at + 2].copy_from_slice(&f16::from_f32(u * dmin).to_le_bytes());
            }
        }
    }
}

/// `blocks` with every block's `d` and `dmin` set.
fn with_scales(ty: GgmlType, blocks: &[u8], d_at: usize, dmin_at: Option<usize>, d: f32, dmin: f32) -> Vec<u8> {
    let mut out = blocks.to_vec();
    for block in out.chunks_exact_mut(ty.type_size()) {
        block[d_at..d_at + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        if let Some(at) = dmin_at {
            block[at..at + 2].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
        }
    }
    out
}

/// Mean and standard deviation of the dequantized `blocks`.
fn moments(ty: GgmlType, blocks: &[u8]) -> (f32, f32) {
    let mut x = vec![0.0f32; blocks.len() / ty.type_size() * ty.block_size()];
    ty.dequantize_row(blocks, &mut x);
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, var.sqrt() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_gets_the_requested_spread_and_a_small_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for ty in GgmlType::ALL {
            let init = Init { mean: 0.0, std: 0.02 };
            let filler = BlockFiller::new(ty, init);
            let mut bytes = vec![0u8; ty.row_bytes(64 * 256).unwrap()];
            filler.fill(&mut rng, &mut bytes);
            let (mean, std) = moments(ty, &bytes);
            assert!((std / 0.02 - 1.0).abs() < 0.25, "{ty}: std {std}");
            assert!(mean.abs() < 0.004, "{ty}: mean {mean}");
        }
    }

    #[test]
    fn float_types_honour_the_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let filler = BlockFiller::new(GgmlType::F32, Init { mean: 1.0, std: 0.05 });
        let mut bytes = vec![0u8; 4 * 4096];
        filler.fill(&mut rng, &mut bytes);
        let (mean, std) = moments(GgmlType::F32, &bytes);
        assert!((mean - 1.0).abs() < 0.01 && (std - 0.05).abs() < 0.01, "{mean} {std}");
    }
}
