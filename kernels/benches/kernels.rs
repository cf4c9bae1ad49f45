//! Microbenchmarks of the kernels at Mellum2's sizes (hidden 2304, expert FFN 896, 32 query /
//! 4 KV heads of 128, 64 experts top-8): `cargo bench -p moeshard-kernels`.
//!
//! Throughput is weight bytes for `vec_dot` and `matmul` (the memory-bound figure), KV bytes for
//! attention, buffer bytes for the read probe, elements for the rest. Each benchmark measures
//! for about 2 s with 10 samples, so the whole suite takes a few minutes.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moeshard_kernels::attention::{AttentionScratch, AttentionShape, KvPair, KvRows, attend};
use moeshard_kernels::matmul::{QMatrix, QuantizedActivations, matmul};
use moeshard_kernels::moe::softmax_top_k;
use moeshard_kernels::norm::rms_norm_inplace;
use moeshard_kernels::probe::read_bandwidth;
use moeshard_kernels::quant::{GgmlType, VecDotType, vec_dot};
use moeshard_kernels::random::{BlockFiller, Init};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N_EMBD: usize = 2304;
const N_FF_EXP: usize = 896;
const WEIGHTS: Init = Init { mean: 0.0, std: 0.02 };

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(1)
}

/// `n_rows` random rows of `cols` elements of `ty`.
fn weights(ty: GgmlType, n_rows: usize, cols: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n_rows * ty.row_bytes(cols).expect("whole blocks")];
    BlockFiller::new(ty, WEIGHTS).fill(&mut rng(), &mut bytes);
    bytes
}

fn activations(n: usize) -> Vec<f32> {
    let mut rng = rng();
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn vec_dots(c: &mut Criterion) {
    let mut group = c.benchmark_group("vec_dot");
    for ty in GgmlType::ALL {
        for n in [N_EMBD, N_FF_EXP] {
            let Some(row_bytes) = ty.row_bytes(n) else { continue };
            let w = weights(ty, 1, n);
            let act = QuantizedActivations::quantize(ty.vec_dot_type(), &activations(n), 1, n);
            group.throughput(Throughput::Bytes(row_bytes as u64));
            group.bench_function(BenchmarkId::new(ty.name(), n), |b| {
                b.iter(|| vec_dot(ty, std::hint::black_box(&w), act.row(0), n));
            });
        }
    }
    group.finish();
}

/// An expert's `ffn_gate`/`ffn_up` shape: 896 rows of 2304, times 1, 8, 16 and 64 activation rows.
fn matmuls(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_896x2304");
    for ty in GgmlType::ALL {
        bench_matmul(&mut group, ty, N_FF_EXP, &[1, 8, 16, 64]);
    }
    group.finish();
}

/// The output head at decode batch sizes: Mellum2's 98304-row vocabulary projection in Q6_K
/// (llama-quantize's type for `output.weight`), 186 MB streamed from memory, times 1 and 8
/// activation rows (one decoding step of one and of eight sequences).
fn output_head(c: &mut Criterion) {
    let mut group = c.benchmark_group("output_head_98304x2304");
    bench_matmul(&mut group, GgmlType::Q6_K, 98304, &[1, 8]);
    group.finish();
}

/// `matmul` of a random `[rows, N_EMBD]` matrix of `ty` with each count of activation rows,
/// throughput in weight bytes.
fn bench_matmul(group: &mut BenchmarkGroup<'_, WallTime>, ty: GgmlType, rows: usize, batches: &[usize]) {
    let w = weights(ty, rows, N_EMBD);
    let matrix = QMatrix::new(ty, rows, N_EMBD, &w);
    for &n_rows in batches {
        let act = QuantizedActivations::quantize(ty.vec_dot_type(), &activations(n_rows * N_EMBD), n_rows, N_EMBD);
        let mut out = vec![0.0f32; n_rows * rows];
        group.throughput(Throughput::Bytes(w.len() as u64));
        group.bench_function(BenchmarkId::new(ty.name(), n_rows), |b| b.iter(|| matmul(&matrix, &act, &mut out)));
    }
}

/// Bytes of weights [`streamed_gemv`] reads per iteration: far more than the last-level cache.
const STREAMED_BYTES: usize = 256 << 20;

/// Single-token decoding's expert GEMVs as they meet memory: one activation row times a run of
/// distinct expert matrices totalling [`STREAMED_BYTES`], read from DRAM (gate/up shape `[896,
/// 2304]` for the k-quants, down shape `[2304, 896]` for the 32-element types the 896-wide
/// `ffn_down_exps` fall back to). Throughput in weight bytes: compare with `read_bandwidth`.
fn streamed_gemv(c: &mut Criterion) {
    let mut group = c.benchmark_group("expert_gemv_streamed");
    let types = [GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0];
    for ty in types {
        let (rows, cols) = if ty.block_size() == 256 { (N_FF_EXP, N_EMBD) } else { (N_EMBD, N_FF_EXP) };
        let matrix_bytes = rows * ty.row_bytes(cols).expect("whole blocks");
        let n_matrices = STREAMED_BYTES / matrix_bytes;
        let w = weights(ty, rows * n_matrices, cols);
        let act = QuantizedActivations::quantize(ty.vec_dot_type(), &activations(cols), 1, cols);
        let mut out = vec![0.0f32; rows];
        group.throughput(Throughput::Bytes(w.len() as u64));
        group.bench_function(ty.name(), |b| {
            b.iter(|| {
                for m in w.chunks_exact(matrix_bytes) {
                    matmul(&QMatrix::new(ty, rows, cols, m), &act, &mut out);
                }
            })
        });
    }
    group.finish();
}

fn activation_quantization(c: &mut Criterion) {
    let mut group = c.benchmark_group("quantize_activations");
    for n_rows in [1, 64] {
        let x = activations(n_rows * N_EMBD);
        group.throughput(Throughput::Elements(x.len() as u64));
        for ty in [VecDotType::Q8_K, VecDotType::Q8_0] {
            group.bench_function(BenchmarkId::new(format!("{ty:?}"), n_rows), |b| {
                b.iter(|| QuantizedActivations::quantize(ty, &x, n_rows, N_EMBD));
            });
        }
    }
    group.finish();
}

/// The read-bandwidth probe over 64 MiB (five passes per call).
fn read_probe(c: &mut Criterion) {
    const BYTES: usize = 64 << 20;
    let mut group = c.benchmark_group("read_bandwidth");
    group.throughput(Throughput::Bytes(5 * BYTES as u64));
    group.bench_function("64MiB", |b| b.iter(|| read_bandwidth(BYTES)));
    group.finish();
}

fn rms_norms(c: &mut Criterion) {
    let mut group = c.benchmark_group("rms_norm");
    let weight = activations(N_EMBD);
    for n_rows in [1, 64] {
        let mut x = activations(n_rows * N_EMBD);
        group.throughput(Throughput::Elements(x.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(n_rows), |b| {
            b.iter(|| rms_norm_inplace(&mut x, &weight, 1e-6))
        });
    }
    group.finish();
}

/// One query token over an F16 KV cache of 128, 1024 and 4096 positions, Mellum2's heads (all
/// four KV heads in turn, as the forward pass splits them over threads; each head's keys and
/// values are planes of their own, as the cache lays them out).
fn attention(c: &mut Criterion) {
    let shape = AttentionShape { n_head: 32, n_head_kv: 4, head_dim: 128, scale: 1.0 / 128f32.sqrt() };
    let q = activations(shape.n_head * shape.head_dim);
    let mut group = c.benchmark_group("attention_f16_kv");
    for n_ctx in [128, 1024, 4096] {
        let plane = || weights(GgmlType::F16, n_ctx, shape.head_dim);
        let (keys, values): (Vec<_>, Vec<_>) = (0..shape.n_head_kv).map(|_| (plane(), plane())).unzip();
        let slots: Vec<usize> = (0..n_ctx).collect();
        let mut scratch = AttentionScratch::default();
        let mut out = vec![0.0f32; q.len()];
        group.throughput(Throughput::Bytes(keys.iter().chain(&values).map(|p| p.len() as u64).sum()));
        group.bench_function(BenchmarkId::from_parameter(n_ctx), |b| {
            b.iter(|| {
                let per_kv_head = q.len() / shape.n_head_kv;
                let heads = q.chunks(per_kv_head).zip(out.chunks_mut(per_kv_head)).zip(keys.iter().zip(&values));
                for ((q, out), (k, v)) in heads {
                    let rows = |data| KvRows { ty: GgmlType::F16, row_elems: shape.head_dim, data };
                    attend(shape, q, KvPair { keys: rows(k), values: rows(v) }, &slots, &mut scratch, out);
                }
            });
        });
    }
    group.finish();
}

/// Router softmax and top-8 of 64 experts for 1 and 512 tokens.
fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("softmax_top_k_64_8");
    for n_tokens in [1, 512] {
        let logits = activations(n_tokens * 64);
        group.throughput(Throughput::Elements(logits.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(n_tokens), |b| b.iter(|| softmax_top_k(&logits, 64, 8, true)));
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(10)
}

criterion_group! {
    name = benches;
    config = config();
    targets = vec_dots, matmuls, output_head, streamed_gemv, activation_quantization, read_probe, rms_norms, attention, routing
}
criterion_main!(benches);
