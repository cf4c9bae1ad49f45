//! What `moeshard bench` measures besides time: the weight bytes a forward pass reads, from the
//! model's tensors and the experts actually routed, and the statistics of repeated runs.
//!
//! Decoding is memory-bound, so `weight bytes per token x tokens/s` against the machine's read
//! bandwidth ([`moeshard_kernels::probe::read_bandwidth`]) says how close a run is to the limit.

use std::sync::{Arc, Mutex};

use moeshard_kernels::moe::Route;

use crate::experts::ExpertBackend;
use crate::model::Model;

/// Weight bytes of a model, split by how a forward pass reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightBytes {
    /// Bytes read once per forward call whatever its tokens: every layer's attention matrices,
    /// router (`ffn_gate_inp`) and norms, `output_norm` and the LM head (`output`).
    pub dense_per_forward: u64,
    /// Bytes of one `token_embd` row, read per token.
    pub embd_row: u64,
    /// Per layer, bytes of one expert (its `ffn_gate`, `ffn_up` and `ffn_down` matrices).
    pub expert: Vec<u64>,
}

impl WeightBytes {
    /// The byte counts of `model`'s tensors.
    pub fn of(model: &Model) -> Self {
        let f32s = |v: &[f32]| (v.len() * 4) as u64;
        let layers: u64 = model
            .layers
            .iter()
            .map(|l| {
                [l.attn_q, l.attn_k, l.attn_v, l.attn_output, l.ffn_gate_inp]
                    .iter()
                    .map(|m| m.n_bytes() as u64)
                    .sum::<u64>()
                    + f32s(&l.attn_norm)
                    + f32s(&l.attn_q_norm)
                    + f32s(&l.attn_k_norm)
                    + f32s(&l.ffn_norm)
            })
            .sum();
        WeightBytes {
            dense_per_forward: layers + model.output.n_bytes() as u64 + f32s(&model.output_norm),
            embd_row: model.tok_embd.row_bytes() as u64,
            expert: model
                .layers
                .iter()
                .map(|l| {
                    [l.ffn_gate_exps, l.ffn_up_exps, l.ffn_down_exps].iter().map(|e| e.matrix.n_bytes() as u64).sum()
                })
                .collect(),
        }
    }
}

/// What a [`RouteCounter`] saw since it was last reset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteCounts {
    /// Forward calls (calls of layer 0's MoE).
    pub forwards: u64,
    /// Tokens through layer 0's MoE.
    pub tokens: u64,
    /// Per layer, distinct experts summed over the calls (an expert hit by several tokens of one
    /// call is read once).
    pub distinct_experts: Vec<u64>,
}

impl RouteCounts {
    /// Weight bytes read in these calls: the dense weights once per forward, a `token_embd` row
    /// per token and each call's distinct experts.
    pub fn bytes_read(&self, w: &WeightBytes) -> u64 {
        let experts: u64 = self.distinct_experts.iter().zip(&w.expert).map(|(n, b)| n * b).sum();
        self.forwards * w.dense_per_forward + self.tokens * w.embd_row + experts
    }
}

/// An [`ExpertBackend`] that passes every call to another one and counts the distinct experts
/// routed per layer per call.
pub struct RouteCounter {
    inner: Arc<dyn ExpertBackend>,
    counts: Mutex<RouteCounts>,
}

impl RouteCounter {
    /// A counter in front of `inner`, for a model of `n_layer` layers.
    pub fn new(inner: Arc<dyn ExpertBackend>, n_layer: usize) -> Self {
        let counts = RouteCounts { distinct_experts: vec![0; n_layer], ..RouteCounts::default() };
        RouteCounter { inner, counts: Mutex::new(counts) }
    }

    /// The counts so far, resetting them to zero.
    pub fn take(&self) -> RouteCounts {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = RouteCounts { distinct_experts: vec![0; c.distinct_experts.len()], ..RouteCounts::default() };
        std::mem::replace(&mut *c, fresh)
    }

    /// Adds `counts` (taken earlier with [`RouteCounter::take`]) back to the counts so far: the
    /// calls in between, taken and dropped, are then left out of the tally.
    pub fn put_back(&self, counts: RouteCounts) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.forwards += counts.forwards;
        c.tokens += counts.tokens;
        for (n, more) in c.distinct_experts.iter_mut().zip(counts.distinct_experts) {
            *n += more;
        }
    }
}

impl ExpertBackend for RouteCounter {
    fn moe_forward(&self, layer: usize, hidden: &[f32], routes: &[Route], out: &mut [f32]) -> anyhow::Result<()> {
        let mut experts: Vec<u32> = routes.iter().map(|r| r.expert).collect();
        experts.sort_unstable();
        experts.dedup();
        {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if layer == 0 {
                c.forwards += 1;
                c.tokens += routes.iter().map(|r| u64::from(r.token) + 1).max().unwrap_or(0);
            }
            if let Some(n) = c.distinct_experts.get_mut(layer) {
                *n += experts.len() as u64;
            }
        }
        self.inner.moe_forward(layer, hidden, routes, out)
    }
}

/// Mean and sample standard deviation of repeated measurements (llama-bench's `avg ± stdev`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MeanStd {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); 0 for one sample.
    pub stddev: f64,
}

impl MeanStd {
    /// The statistics of `samples` (at least one).
    pub fn of(samples: &[f64]) -> Self {
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let stddev = if samples.len() > 1 {
            (samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        MeanStd { mean, stddev }
    }
}

/// llama.cpp's name of a `general.file_type` (`llama_model_ftype_name`), for the types moeshard
/// reads.
pub fn ftype_name(file_type: u32) -> String {
    match file_type {
        0 => "all F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        7 => "Q8_0".into(),
        8 => "Q5_0".into(),
        9 => "Q5_1".into(),
        10 => "Q2_K - Medium".into(),
        11 => "Q3_K - Small".into(),
        12 => "Q3_K - Medium".into(),
        13 => "Q3_K - Large".into(),
        14 => "Q4_K - Small".into(),
        15 => "Q4_K - Medium".into(),
        16 => "Q5_K - Small".into(),
        17 => "Q5_K - Medium".into(),
        18 => "Q6_K".into(),
        32 => "BF16".into(),
        other => format!("file type {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl ExpertBackend for Nothing {
        fn moe_forward(&self, _: usize, _: &[f32], _: &[Route], _: &mut [f32]) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn counter_counts_distinct_experts_per_call() {
        let c = RouteCounter::new(Arc::new(Nothing), 2);
        let r = |token, expert| Route { token, expert, weight: 0.5 };
        // Two tokens sharing expert 3: three distinct experts.
        c.moe_forward(0, &[], &[r(0, 3), r(0, 1), r(1, 3), r(1, 7)], &mut []).unwrap();
        c.moe_forward(1, &[], &[r(0, 2), r(0, 2), r(1, 2), r(1, 2)], &mut []).unwrap();
        c.moe_forward(0, &[], &[r(0, 5), r(0, 6)], &mut []).unwrap();
        let counts = c.take();
        assert_eq!(counts, RouteCounts { forwards: 2, tokens: 3, distinct_experts: vec![5, 1] });
        let w = WeightBytes { dense_per_forward: 1000, embd_row: 10, expert: vec![100, 200] };
        assert_eq!(counts.bytes_read(&w), 2 * 1000 + 3 * 10 + 5 * 100 + 200);
        assert_eq!(c.take(), RouteCounts { distinct_experts: vec![0, 0], ..RouteCounts::default() });

        // Calls between a take and a put_back are left out of the tally.
        c.moe_forward(0, &[], &[r(0, 4)], &mut []).unwrap();
        let kept = c.take();
        c.moe_forward(0, &[], &[r(0, 1), r(0, 2)], &mut []).unwrap();
        c.take();
        c.put_back(kept);
        c.moe_forward(1, &[], &[r(0, 6)], &mut []).unwrap();
        assert_eq!(c.take(), RouteCounts { forwards: 1, tokens: 1, distinct_experts: vec![1, 1] });
    }

    #[test]
    fn mean_and_sample_stddev() {
        let s = MeanStd::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(s.mean, 5.0);
        assert!((s.stddev - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(MeanStd::of(&[3.0]).stddev, 0.0);
    }
}
