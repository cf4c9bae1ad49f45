//! `moeshard bench`: llama-bench's prompt-processing and generation tests, with the weight bytes
//! read per token against the machine's read bandwidth, and per-worker network figures. With
//! `--compare-local`, each test also runs with every expert on this machine, interleaved with the
//! cluster runs, for the cluster's speed as a ratio of the local one.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use moeshard_kernels::moe::Route;
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
use crate::model::Model;
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
    /// Tokens already in the cache when each test starts (llama-bench's `-d`, test `ppN @ dD`):
    /// random tokens evaluated once, untimed, and kept for every repetition (the cache is cut
    /// back to them, or filled again where a sliding-window ring no longer holds them), so that
    /// attention's cost at a long context shows.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    n_depth: usize,
    /// Timed repetitions of each test (after one untimed warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,
    /// Output format: a markdown table (md) or one JSON object (json).
    #[arg(short = 'o', long = "output", default_value = "md")]
    output: Format,
    /// With workers: also run each test with every expert computed on this machine, interleaved
    /// with the cluster (tgN alternates token by token, ppN repetition by repetition), and print
    /// the cluster's speed as a ratio of the local one. Both halves then see the same moments of
    /// a machine whose speed drifts, which separate runs do not.
    #[arg(long)]
    compare_local: bool,
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
    /// `ppN` or `tgN`, followed by ` @ dD` when the cache held `D` tokens before each run.
    test: String,
    n_prompt: usize,
    n_gen: usize,
    /// Tokens in the cache before each run of the test (`-d`).
    n_depth: usize,
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
    /// With `--compare-local`: the same test with every expert on this machine, interleaved.
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<LocalComparison>,
}

/// The local half of a `--compare-local` test.
#[derive(Serialize)]
struct LocalComparison {
    /// Tokens per second of each repetition, every expert computed on this machine.
    samples_ts: Vec<f64>,
    ts: MeanStd,
    /// Cluster tokens per second over local tokens per second, all repetitions together.
    speed_ratio: f64,
    /// Median over adjacent (local, cluster) pairs of local time over cluster time: tgN pairs
    /// consecutive tokens, ppN the two runs of a repetition.
    median_pair_ratio: f64,
    pairs: usize,
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

/// The cluster, or while `local` is set the experts of the mapped file on this machine
/// (`--compare-local`). Both give the same sums (the workers compute the bytes the local kernels
/// would quantize), so a sequence may switch between them token by token.
struct Switched {
    cluster: Arc<ClusterExperts>,
    local_experts: LocalExperts,
    local: AtomicBool,
}

impl Switched {
    fn new(cluster: Arc<ClusterExperts>, model: Arc<Model>) -> Self {
        Switched { cluster, local_experts: LocalExperts::new(model), local: AtomicBool::new(false) }
    }

    fn set_local(&self, local: bool) {
        self.local.store(local, Ordering::Relaxed);
    }
}

impl ExpertBackend for Switched {
    fn moe_forward(&self, layer: usize, hidden: &[f32], routes: &[Route], out: &mut [f32]) -> anyhow::Result<()> {
        if self.local.load(Ordering::Relaxed) {
            self.local_experts.moe_forward(layer, hidden, routes, out)
        } else {
            self.cluster.moe_forward(layer, hidden, routes, out)
        }
    }
}

/// The forward calls of one timed run: each one's duration, and whether it ran locally.
#[derive(Default)]
struct Timing {
    calls: Vec<(bool, Duration)>,
}

impl Timing {
    /// Tokens processed and seconds spent in the calls of one mode (`local`), `per_call` tokens
    /// each.
    fn total(&self, local: bool, per_call: usize) -> (usize, f64) {
        let calls = self.calls.iter().filter(|(l, _)| *l == local);
        let (n, secs) = calls.fold((0, 0.0), |(n, s), (_, d)| (n + 1, s + d.as_secs_f64()));
        (n * per_call, secs)
    }
}

/// Which half of a `--compare-local` pair runs first: pair `i`'s local call comes first when `i`
/// is even, so a drift within the run (the context growing, the machine slowing) favours neither.
fn local_first(pair: usize) -> bool {
    pair.is_multiple_of(2)
}

/// Leaves `session` holding exactly the tokens `depth` (evaluated earlier, or now): cut back to
/// them when its cache still holds what comes next, else cleared and evaluated again (with a
/// sliding-window layer, a test longer than the ring's slack of `n_ubatch` slots overwrites
/// positions the next token attends to). An evaluation here is left out of `counter`'s tally.
fn back_to_depth(session: &mut Session, depth: &[u32], counter: &RouteCounter) -> anyhow::Result<()> {
    if depth.is_empty() {
        session.clear();
        return Ok(());
    }
    if session.truncate(depth.len()) {
        return Ok(());
    }
    let kept = counter.take();
    session.clear();
    let filled = session.eval(depth, Logits::Last);
    counter.take();
    counter.put_back(kept);
    filled?;
    Ok(())
}

/// Median of `xs` (not empty).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repetitions > 0, "-r must be at least 1");
    anyhow::ensure!(args.n_prompt > 0 || args.n_gen > 0, "nothing to run: -p and -n are both 0");
    let mut model_args = args.model.clone();
    let needed = args.n_depth + args.n_prompt.max(args.n_gen);
    model_args.ctx_size.get_or_insert(needed);
    let Loaded { gguf, session, pool, cluster, .. } = load(&model_args)?;
    anyhow::ensure!(
        !args.compare_local || cluster.is_some(),
        "--compare-local compares the cluster with this machine alone: it needs workers (--worker, or discovery)"
    );
    let model = session.model().clone();
    let n_ctx = session.n_ctx();
    anyhow::ensure!(
        n_ctx >= needed,
        "the context of {n_ctx} tokens (-c) cannot hold -d {} plus the longest test ({} tokens)",
        args.n_depth,
        args.n_prompt.max(args.n_gen)
    );
    drop(session);
    let switched = match &cluster {
        Some(c) if args.compare_local => Some(Arc::new(Switched::new(c.clone(), model.clone()))),
        _ => None,
    };
    let backend: Arc<dyn ExpertBackend> = match (&switched, &cluster) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => Arc::new(LocalExperts::new(model.clone())),
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
    let depth_tokens = tokens(args.n_depth);
    let tests = [("pp", args.n_prompt, 0), ("tg", 0, args.n_gen)];
    for (kind, n_prompt, n_gen) in tests.into_iter().filter(|&(_, p, n)| p + n > 0) {
        let n = n_prompt + n_gen;
        let prompt = tokens(n);
        // One batch of the whole prompt, or one token per forward call. `mode(i)` says whether
        // call `i` runs locally (`--compare-local`); the calls are timed one by one.
        let run = |session: &mut Session, toks: &[u32], mode: &dyn Fn(usize) -> bool| -> anyhow::Result<Timing> {
            back_to_depth(session, &depth_tokens, &counter)?;
            let calls: Vec<&[u32]> = if kind == "pp" { vec![toks] } else { toks.chunks(1).collect() };
            let mut timing = Timing::default();
            for (i, call) in calls.into_iter().enumerate() {
                let local = mode(i);
                if let Some(s) = &switched {
                    s.set_local(local);
                }
                let started = Instant::now();
                pool.install(|| session.eval(call, Logits::Last))?;
                timing.calls.push((local, started.elapsed()));
            }
            Ok(timing)
        };
        let cluster_only = |_: usize| false;
        run(&mut session, &prompt[..n.min(if kind == "pp" { 32 } else { 1 })], &cluster_only)?;
        if switched.is_some() {
            // Every expert this test routes to is then mapped here too, as after a single-node
            // warm-up: the local half does not pay page faults the cluster half does not.
            run(&mut session, &prompt, &|_| true)?;
        }
        counter.take();
        let before = snapshots(cluster.as_deref());
        let per_call = if kind == "pp" { n } else { 1 };
        let mut samples = Vec::with_capacity(args.repetitions);
        let mut local_samples = Vec::new();
        let mut pair_ratios = Vec::new();
        let (mut cluster_totals, mut local_totals) = ((0, 0.0), (0, 0.0));
        let mut cluster_calls = 0;
        for rep in 0..args.repetitions {
            if switched.is_none() {
                let (tokens, secs) = run(&mut session, &prompt, &cluster_only)?.total(false, per_call);
                samples.push(tokens as f64 / secs.max(1e-9));
                cluster_calls += tokens / per_call;
                continue;
            }
            // tgN: tokens 2i and 2i+1 are pair i; ppN: the repetition's two runs are a pair.
            let mut timing = Timing::default();
            if kind == "pp" {
                for local in if local_first(rep) { [true, false] } else { [false, true] } {
                    timing.calls.extend(run(&mut session, &prompt, &|_| local)?.calls);
                }
            } else {
                timing = run(&mut session, &prompt, &|i| local_first(i / 2) == (i % 2 == 0))?;
            }
            for pair in timing.calls.chunks_exact(2) {
                let (l, c) = if pair[0].0 { (pair[0].1, pair[1].1) } else { (pair[1].1, pair[0].1) };
                pair_ratios.push(l.as_secs_f64() / c.as_secs_f64().max(1e-9));
            }
            let (c, l) = (timing.total(false, per_call), timing.total(true, per_call));
            samples.push(c.0 as f64 / c.1.max(1e-9));
            local_samples.push(l.0 as f64 / l.1.max(1e-9));
            cluster_calls += c.0 / per_call;
            cluster_totals = (cluster_totals.0 + c.0, cluster_totals.1 + c.1);
            local_totals = (local_totals.0 + l.0, local_totals.1 + l.1);
        }
        let counts = counter.take();
        let ts = MeanStd::of(&samples);
        let local = switched.is_some().then(|| {
            let rate = |(tokens, secs): (usize, f64)| tokens as f64 / secs.max(1e-9);
            LocalComparison {
                ts: MeanStd::of(&local_samples),
                speed_ratio: rate(cluster_totals) / rate(local_totals).max(1e-9),
                pairs: pair_ratios.len(),
                median_pair_ratio: median(pair_ratios),
                samples_ts: local_samples,
            }
        });
        // The workers served the cluster's calls only.
        let cluster_tokens = (cluster_calls * per_call) as u64;
        let per_token = counts.bytes_read(&weights) as f64 / counts.tokens.max(1) as f64;
        let achieved = per_token * ts.mean / 1e9;
        let result = TestResult {
            test: match args.n_depth {
                0 => format!("{kind}{n}"),
                d => format!("{kind}{n} @ d{d}"),
            },
            n_prompt,
            n_gen,
            n_depth: args.n_depth,
            samples_ts: samples,
            ts,
            weight_bytes_per_token: per_token,
            achieved_gbps: achieved,
            bandwidth_share: achieved / read_bw,
            workers: traffic(cluster.as_deref(), &before, cluster_tokens),
            local,
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
            if let Some(l) = &result.local {
                let achieved = per_token * l.ts.mean / 1e9;
                writeln!(
                    out,
                    "| {} | {:.2} GiB | {} | CPU (local experts, interleaved) | {} | {} | {:.2} ± {:.2} | {:.1} MB | {:.2} | {:.0}% |",
                    report.model,
                    report.size_bytes as f64 / f64::from(1u32 << 30),
                    params_label(report.params),
                    threads,
                    result.test,
                    l.ts.mean,
                    l.ts.stddev,
                    per_token / 1e6,
                    achieved,
                    100.0 * achieved / read_bw,
                )?;
            }
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
                if let Some(l) = &t.local {
                    writeln!(
                        out,
                        "{}: the cluster at {:.3}x the local speed (all repetitions); median of {} paired ratios {:.3}x",
                        t.test, l.speed_ratio, l.pairs, l.median_pair_ratio
                    )?;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvType;

    #[test]
    fn timing_totals_count_each_mode_apart() {
        let ms = Duration::from_millis;
        let t = Timing { calls: vec![(true, ms(10)), (false, ms(30)), (false, ms(20)), (true, ms(10))] };
        assert_eq!(t.total(true, 1), (2, 0.02));
        assert_eq!(t.total(false, 1).0, 2);
        assert!((t.total(false, 1).1 - 0.05).abs() < 1e-12);
        assert_eq!(t.total(false, 64).0, 128, "a ppN call counts N tokens");
    }

    #[test]
    fn pairs_alternate_which_half_runs_first() {
        let order: Vec<bool> = (0..8).map(|i| local_first(i / 2) == (i % 2 == 0)).collect();
        assert_eq!(order, [true, false, false, true, true, false, false, true]);
        assert_eq!(order.iter().filter(|l| **l).count(), 4, "half the tokens run locally");
    }

    /// `-d`: the cache is cut back to the depth tokens when its rings still hold them and
    /// filled again when a test overran a sliding-window ring; either way the next token sees
    /// the same context (the same logits as a fresh sequence), and a fill is not counted.
    #[test]
    fn back_to_depth_cuts_or_refills_and_counts_neither() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-mellum-q8_0.gguf");
        let model = Arc::new(Model::load(path).expect("fixture"));
        let window = model.config.sliding_window.expect("the fixture has sliding-window layers");
        let counter = Arc::new(RouteCounter::new(Arc::new(LocalExperts::new(model.clone())), model.config.n_layer));
        let n_ctx = window + 2 * crate::session::DEFAULT_UBATCH;
        let new_session = || Session::new(model.clone(), counter.clone(), n_ctx, KvType::F32, KvType::F32).unwrap();
        let n_vocab = model.config.n_vocab as u32;
        let depth: Vec<u32> = (0..window as u32 + 3).map(|i| (i * 7 + 1) % n_vocab).collect();
        let next = [5u32];
        // The depth in one call, then the next token: the calls `back_to_depth` and a test make.
        let mut reference = new_session();
        reference.eval(&depth, Logits::Last).unwrap();
        let fresh = reference.eval(&next, Logits::Last).unwrap();
        counter.take();

        let mut session = new_session();
        back_to_depth(&mut session, &depth, &counter).unwrap();
        assert_eq!(session.len(), depth.len());
        assert_eq!(counter.take().forwards, 0, "the first fill is not counted");

        // A short test: cut back, nothing evaluated.
        session.eval(&[9; 10], Logits::Last).unwrap();
        counter.take();
        back_to_depth(&mut session, &depth, &counter).unwrap();
        assert_eq!((session.len(), counter.take().forwards), (depth.len(), 0));
        assert_eq!(session.eval(&next, Logits::Last).unwrap(), fresh, "after a cut");

        // A test longer than the ring's slack: filled again, and only the test's calls counted.
        let long = vec![9u32; crate::session::DEFAULT_UBATCH + 1];
        session.eval(&long, Logits::Last).unwrap();
        assert!(!session.truncate(depth.len()), "the ring no longer holds the depth's window");
        counter.take();
        session.eval(&[3], Logits::Last).unwrap();
        back_to_depth(&mut session, &depth, &counter).unwrap();
        assert_eq!((session.len(), counter.take().forwards), (depth.len(), 1));
        assert_eq!(session.eval(&next, Logits::Last).unwrap(), fresh, "after a fill");

        back_to_depth(&mut session, &[], &counter).unwrap();
        assert!(session.is_empty());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![0.9]), 0.9);
    }
}
