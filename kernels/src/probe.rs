//! Quick measurements of this machine's speed.
//!
//! - [`gemv_throughput`]: quantized GEMV throughput, the figure expert placement weighs nodes by
//!   (workers report it in their hello and mDNS TXT; the coordinator measures its own). A Q4_K
//!   matrix of about [`PROBE_BYTES`] of random but valid blocks is multiplied with one
//!   activation row, repeatedly for at least [`PROBE_DURATION`], on the current rayon pool; the
//!   result is weight bytes read per second.
//! - [`read_bandwidth`]: memory read bandwidth, STREAM-like (a parallel sum over a buffer much
//!   larger than the last-level cache), the ceiling of memory-bound decoding.
//!
//! Rates are in GB/s (10^9 bytes per second).

use std::time::{Duration, Instant};

use crate::matmul::{QMatrix, QuantizedActivations, matmul};
use crate::quant::{GgmlType, VecDotType};
use rand::Rng;

/// Size of the probe's weight matrix in bytes (about 32 MiB, larger than most caches).
pub const PROBE_BYTES: usize = 32 << 20;

/// How long the probe runs, at least.
pub const PROBE_DURATION: Duration = Duration::from_millis(100);

/// Columns (elements per row) of the probe matrix.
const PROBE_COLS: usize = 4096;

// Byte offsets in a Q4_K block (`block_q4_K`): f16 `d`, f16 `dmin`, 12 bytes of scales, 128 of quants.
const Q4_K_D: usize = 0;
const Q4_K_DMIN: usize = 2;

/// Measures quantized GEMV throughput on the current rayon pool, in GB/s of weight bytes read.
pub fn gemv_throughput() -> f64 {
    let ty = GgmlType::Q4_K;
    let row_bytes = PROBE_COLS / ty.block_size() * ty.type_size();
    let rows = (PROBE_BYTES / row_bytes).next_multiple_of(4);
    let weights = random_q4_k_blocks(rows * row_bytes);
    let matrix = QMatrix::new(ty, rows, PROBE_COLS, &weights);
    let mut rng = rand::rng();
    let x: Vec<f32> = (0..PROBE_COLS).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![0.0f32; rows];
    let act = QuantizedActivations::quantize(VecDotType::Q8_K, &x, 1, PROBE_COLS);
    matmul(&matrix, &act, &mut out);
    let started = Instant::now();
    let mut runs = 0u32;
    while started.elapsed() < PROBE_DURATION {
        matmul(&matrix, &act, &mut out);
        runs += 1;
    }
    (weights.len() as f64 * f64::from(runs)) / started.elapsed().as_secs_f64() / 1e9
}

/// Default buffer of [`read_bandwidth`]: 1 GiB, far larger than any last-level cache.
pub const READ_PROBE_BYTES: usize = 1 << 30;

/// Passes over the buffer [`read_bandwidth`] makes, at least (the fastest one counts, as STREAM
/// reports its best time).
const READ_PROBE_PASSES: u32 = 5;

/// Bytes each rayon task sums (a whole number of `u64`s).
const READ_PROBE_TASK_BYTES: usize = 1 << 20;

/// Measures memory read bandwidth on the current rayon pool: a buffer of `bytes` bytes (rounded
/// down to whole `u64`s, at least one) is written once, then summed in parallel
/// at least 5 times (`READ_PROBE_PASSES`; each rayon task summing 1 MiB); returns the
/// fastest pass's bytes read per second, in GB/s. Use [`READ_PROBE_BYTES`] for a figure of main
/// memory; a small buffer measures the caches.
pub fn read_bandwidth(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let words: Vec<u64> =
        (0..(bytes / 8).max(1) as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let mut best = f64::INFINITY;
    for _ in 0..READ_PROBE_PASSES {
        let started = Instant::now();
        let sum = words
            .par_chunks(READ_PROBE_TASK_BYTES / 8)
            .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (words.len() * 8) as f64 / best.max(1e-9) / 1e9
}

/// `len` bytes of Q4_K blocks (`len` a multiple of the block size): random scales and quants,
/// `d` and `dmin` finite positive f16 values between 2^-10 and 2^-3.
fn random_q4_k_blocks(len: usize) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    for block in bytes.chunks_exact_mut(GgmlType::Q4_K.type_size()) {
        for at in [Q4_K_D, Q4_K_DMIN] {
            let exponent: u16 = rng.random_range(5..=12);
            let bits = exponent << 10 | rng.random_range(0..1024u16);
            block[at..at + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_a_positive_finite_rate() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        let gbps = pool.install(gemv_throughput);
        assert!(gbps.is_finite() && gbps > 0.0, "{gbps}");
    }

    #[test]
    fn read_probe_reports_a_positive_finite_rate() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        for bytes in [0, 8 << 20] {
            let gbps = pool.install(|| read_bandwidth(bytes));
            assert!(gbps.is_finite() && gbps > 0.0, "{bytes} bytes: {gbps}");
        }
    }

    #[test]
    fn probe_blocks_dequantize_to_finite_values() {
        let ty = GgmlType::Q4_K;
        let blocks = random_q4_k_blocks(ty.type_size() * 64);
        let mut out = vec![0.0f32; 64 * ty.block_size()];
        ty.dequantize_row(&blocks, &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
    }
}
