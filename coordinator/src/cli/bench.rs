//! `moeshard bench`: llama-bench's prompt-processing and generation tests, with the weight bytes
//! read per token against the machine's read bandwidth, and per-worker network figures.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use moeshard_kernels::probe::{READ_PROBE_BYTES, read_bandwidth};
use moeshard_protocol::control::WorkerStats;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::ModelArgs;
use super::load::{Loaded, load};
use crate::bench::{MeanStd, RouteCounter, WeightBytes, ftype_name};
use crate::cluster::{ClusterExperts, Counters};
use crate::experts::{ExpertBackend, LocalExperts};
use crate::model::Logits;
use crate::session::Session;

/// Arguments of `moeshard bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens evaluated in one batch from an empty cache (test `ppN`; 0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens generated one at a time from an empty cache (test `tgN`; 0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Timed repetitions of each test (after one untimed warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,
    /// Output format: a markdown table (md) or one JSON object (json).
    #[arg(short = 'o', long = "output", default_value = "md")]
    output: Format,
}

/// `moeshard bench` output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Md,
    Json,
}

/// The whole run, as `--output json` prints it.
#[derive(Serialize)]
struct Report {
    model: String,
    file: String,
    /// Bytes of tensor data.
    size_bytes: u64,
    /// Elements of all tensors.
    params: u64,
    backend: String,
    threads: usize,
    /// STREAM-like read bandwidth on the same threads, GB/s (1e9 bytes/s).
    read_bandwidth_gbps: f64,
    tests: Vec<TestResult>,
}

#[derive(Serialize)]
struct TestResult {
    /// `ppN` or `tgN`.
    test: String,
    n_prompt: usize,
    n_gen: usize,
    /// Tokens per second of each repetition.
    samples_ts: Vec<f64>,
    ts: MeanStd,
    /// Weight bytes read per token: dense weights once per forward call, the distinct experts
    /// routed in each call.
    weight_bytes_per_token: f64,
    /// `weight_bytes_per_token x mean t/s`, GB/s.
    achieved_gbps: f64,
    /// `achieved_gbps / read_bandwidth_gbps`.
    bandwidth_share: f64,
    workers: Vec<WorkerTraffic>,
}

/// One worker's traffic during a test's timed repetitions.
#[derive(Serialize)]
struct WorkerTraffic {
    name: String,
    round_trips: u64,
    bytes_out: u64,
    bytes_in: u64,
    /// Round trips per token processed.
    round_trips_per_token: f64,
    /// Bytes both ways per token processed.
    bytes_per_token: f64,
    rtt_mean_ms: f64,
    rtt_p99_ms: f64,
    /// The worker's own mean time per batch from receiving it to having its answer (decoding,
    /// hand-off to its pool, experts, encoding), from its stats; absent when it did not answer.
    /// `rtt_mean_ms` less this is the network and both sides' scheduling.
    compute_mean_ms: Option<f64>,
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repetitions > 0, "-r must be at least 1");
    anyhow::ensure!(args.n_prompt > 0 || args.n_gen > 0, "nothing to run: -p and -n are both 0");
    let mut model_args = args.model.clone();
    model_args.ctx_size.get_or_insert(args.n_prompt.max(args.n_gen));
    let Loaded { gguf, session, pool, cluster, .. } = load(&model_args)?;
    let model = session.model().clone();
    let n_ctx = session.n_ctx();
    drop(session);
    let backend: Arc<dyn ExpertBackend> = match &cluster {
        Some(c) => c.clone(),
        None => Arc::new(LocalExperts::new(model.clone())),
    };
    let counter = Arc::new(RouteCounter::new(backend, model.config.n_layer));
    let mut session =
        Session::new(model.clone(), counter.clone(), n_ctx, model_args.cache_type_k, model_args.cache_type_v)?;
    let weights = WeightBytes::of(&model);

    let threads = pool.current_num_threads();
    let read_bw = pool.install(|| read_bandwidth(READ_PROBE_BYTES));
    let file_type = gguf.get_u32("general.file_type").ok();
    let mut report = Report {
        model: format!("{} {}", model.config.arch.name(), file_type.map_or_else(|| "?".to_owned(), ftype_name)),
        file: gguf.path().display().to_string(),
        size_bytes: gguf.tensors().iter().map(|t| t.n_bytes).sum(),
        params: gguf.tensors().iter().map(|t| t.n_elements()).sum(),
        backend: match &cluster {
            Some(c) => format!("CPU + {} workers", c.members().len()),
            None => "CPU".to_owned(),
        },
        threads,
        read_bandwidth_gbps: read_bw,
        tests: Vec::new(),
    };
    let mut out = std::io::stdout().lock();
    if args.output == Format::Md {
        writeln!(
            out,
            "| model | size | params | backend | threads | test | t/s | weights/token | GB/s | of read BW |"
        )?;
        writeln!(out, "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    }

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n_vocab = model.config.n_vocab as u32;
    let mut tokens = |n: usize| (0..n).map(|_| rng.random_range(0..n_vocab)).collect::<Vec<u32>>();
    let tests = [("pp", args.n_prompt, 0), ("tg", 0, args.n_gen)];
    for (kind, n_prompt, n_gen) in tests.into_iter().filter(|&(_, p, n)| p + n > 0) {
        let n = n_prompt + n_gen;
        let prompt = tokens(n);
        // One batch of the whole prompt, or one token per forward call.
        let run = |session: &mut Session, toks: &[u32]| -> anyhow::Result<Duration> {
            session.clear();
            let started = Instant::now();
            if kind == "pp" {
                pool.install(|| session.eval(toks, Logits::Last))?;
            } else {
                for t in toks {
                    pool.install(|| session.eval(std::slice::from_ref(t), Logits::Last))?;
                }
            }
            Ok(started.elapsed())
        };
        run(&mut session, &prompt[..n.min(if kind == "pp" { 32 } else { 1 })])?;
        counter.take();
        let before = snapshots(cluster.as_deref());
        let mut samples = Vec::with_capacity(args.repetitions);
        for _ in 0..args.repetitions {
            let secs = run(&mut session, &prompt)?.as_secs_f64();
            samples.push(n as f64 / secs.max(1e-9));
        }
        let counts = counter.take();
        let ts = MeanStd::of(&samples);
        let per_token = counts.bytes_read(&weights) as f64 / counts.tokens.max(1) as f64;
        let achieved = per_token * ts.mean / 1e9;
        let result = TestResult {
            test: format!("{kind}{n}"),
            n_prompt,
            n_gen,
            samples_ts: samples,
            ts,
            weight_bytes_per_token: per_token,
            achieved_gbps: achieved,
            bandwidth_share: achieved / read_bw,
            workers: traffic(cluster.as_deref(), &before, counts.tokens),
        };
        if args.output == Format::Md {
            writeln!(
                out,
                "| {} | {:.2} GiB | {} | {} | {} | {} | {:.2} ± {:.2} | {:.1} MB | {:.2} | {:.0}% |",
                report.model,
                report.size_bytes as f64 / f64::from(1u32 << 30),
                params_label(report.params),
                report.backend,
                threads,
                result.test,
                result.ts.mean,
                result.ts.stddev,
                per_token / 1e6,
                achieved,
                100.0 * result.bandwidth_share,
            )?;
            out.flush()?;
        }
        report.tests.push(result);
    }

    match args.output {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Format::Md => {
            writeln!(out)?;
            writeln!(
                out,
                "read bandwidth: {read_bw:.2} GB/s (parallel sum over {} MiB, {threads} threads); weights/token: dense weights once per forward call + the distinct experts routed",
                READ_PROBE_BYTES >> 20
            )?;
            for t in &report.tests {
                for w in &t.workers {
                    let compute = w.compute_mean_ms.map_or_else(String::new, |c| {
                        format!(" (worker compute {c:.3} ms, network and scheduling {:.3} ms)", w.rtt_mean_ms - c)
                    });
                    writeln!(
                        out,
                        "{} worker {}: {} round trips ({:.1}/token), {} bytes out, {} bytes in ({:.0} bytes/token), RTT mean {:.3} ms{compute}, p99 {:.3} ms",
                        t.test,
                        w.name,
                        w.round_trips,
                        w.round_trips_per_token,
                        w.bytes_out,
                        w.bytes_in,
                        w.bytes_per_token,
                        w.rtt_mean_ms,
                        w.rtt_p99_ms
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// llama-bench's params column: `1.23 B` or `456.78 M`.
fn params_label(params: u64) -> String {
    if params >= 1_000_000_000 {
        format!("{:.2} B", params as f64 / 1e9)
    } else {
        format!("{:.2} M", params as f64 / 1e6)
    }
}

fn snapshots(cluster: Option<&ClusterExperts>) -> Vec<(Counters, Option<WorkerStats>)> {
    let Some(c) = cluster else { return Vec::new() };
    c.members()
        .iter()
        .map(|m| {
            let remote = m.link().and_then(|link| c.runtime().block_on(link.remote_stats()).ok());
            (m.stats().snapshot(), remote)
        })
        .collect()
}

/// Each worker's traffic since `before`, over `tokens` tokens.
fn traffic(
    cluster: Option<&ClusterExperts>,
    before: &[(Counters, Option<WorkerStats>)],
    tokens: u64,
) -> Vec<WorkerTraffic> {
    let Some(cluster) = cluster else { return Vec::new() };
    let tokens = tokens.max(1) as f64;
    cluster
        .members()
        .iter()
        .zip(snapshots(Some(cluster)))
        .zip(before)
        .map(|((link, (now, remote_now)), (before, remote_before))| {
            let rtts = now.rtt_all_layers().since(&before.rtt_all_layers());
            let compute_mean_ms = match (remote_now, remote_before) {
                (Some(now), Some(before)) if now.batches > before.batches => Some(
                    now.compute_us.saturating_sub(before.compute_us) as f64
                        / 1e3
                        / (now.batches - before.batches) as f64,
                ),
                _ => None,
            };
            let ms = |d: Option<std::time::Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
            let round_trips = now.round_trips - before.round_trips;
            let (bytes_out, bytes_in) = (now.bytes_out - before.bytes_out, now.bytes_in - before.bytes_in);
            WorkerTraffic {
                name: link.name().to_owned(),
                round_trips,
                bytes_out,
                bytes_in,
                round_trips_per_token: round_trips as f64 / tokens,
                bytes_per_token: (bytes_out + bytes_in) as f64 / tokens,
                rtt_mean_ms: ms(rtts.mean()),
                rtt_p99_ms: ms(rtts.quantile(0.99)),
                compute_mean_ms,
            }
        })
        .collect()
}
