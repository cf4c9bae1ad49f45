//! The `moeshard` command line: `run` (generate), `score` (teacher-forced scoring), `serve`
//! (the OpenAI / Ollama HTTP API), `bench` (llama-bench-like speed table) and `synth`
//! (random-weight GGUF files with a real model's geometry).
//!
//! Flags follow llama.cpp's names where one exists (`-m`, `-p`, `-n`, `-t`, `-c`, `--temp`,
//! `--top-k`, `--top-p`, `--min-p`, `--repeat-penalty`, `--seed`, `-ctk`/`-ctv`).

mod bench;
mod load;
mod run;
mod score;
mod serve;
mod synth;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::kv_cache::KvType;

/// Serve Mixture-of-Experts models across the machines you have.
#[derive(Parser, Debug)]
#[command(name = "moeshard", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Run(run::RunArgs),
    /// Teacher-forced scoring of a text (like llama-perplexity over one sequence).
    Score(score::ScoreArgs),
    /// Serve the model over HTTP: the OpenAI API, Ollama's API, /health and /metrics.
    Serve(serve::ServeArgs),
    /// Measure prompt processing and generation speed (llama-bench's pp/tg tests) and the
    /// weight bytes read per token against the machine's read bandwidth.
    Bench(bench::BenchArgs),
    /// Write a random-weight GGUF with a real model's geometry, metadata and quantization mix.
    Synth(synth::SynthArgs),
}

/// Options shared by every command that loads a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file.
    #[arg(short = 'm', long = "model")]
    pub model: std::path::PathBuf,
    /// Compute threads (default: one per `--cpus` CPU, else all available cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Put each compute thread on its own CPU of this list, in order (`0-3`, `1,3`; taskset's
    /// form; llama.cpp's `--cpu-strict 1`), e.g. to keep them off the CPUs of other programs
    /// or of workers on the same machine.
    #[arg(long = "cpus")]
    pub cpus: Option<moeshard_kernels::affinity::CpuList>,
    /// Context size in tokens (default 4096, at most the model's training context).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// KV cache type for keys: f32, f16, bf16, q8_0 (`-ctk`).
    #[arg(long = "cache-type-k", default_value = "f16", value_parser = parse_kv_type)]
    pub cache_type_k: KvType,
    /// KV cache type for values: f32, f16, bf16, q8_0 (`-ctv`).
    #[arg(long = "cache-type-v", default_value = "f16", value_parser = parse_kv_type)]
    pub cache_type_v: KvType,
    /// Read the model into memory instead of mapping it (llama.cpp's `--no-mmap`): the weights
    /// then stay resident even where the kernel reclaims page cache aggressively, on
    /// transparent huge pages where the kernel has them.
    #[arg(long = "no-mmap")]
    pub no_mmap: bool,
    /// Worker pooling options.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Options for pooling workers.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The cluster's shared secret (workers must be started with the same key).
    #[arg(long = "cluster-key", env = "MOESHARD_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<String>,
    /// A file holding the cluster key.
    #[arg(long = "cluster-key-file", conflicts_with = "cluster_key")]
    pub cluster_key_file: Option<std::path::PathBuf>,
    /// A worker to use, `HOST:PORT` (repeatable), for networks where mDNS does not pass.
    #[arg(long = "worker")]
    pub workers: Vec<String>,
    /// Do not browse mDNS for workers.
    #[arg(long = "no-discovery")]
    pub no_discovery: bool,
    /// How long to browse mDNS for workers, in milliseconds.
    #[arg(long = "discovery-ms", default_value_t = 1500)]
    pub discovery_ms: u64,
    /// Explicit expert placement: lines `LAYERS EXPERTS NODES` (`*`, `N`, `A-B`, lists; NODES is
    /// `local` or a worker's name, a comma list of them to split the experts in runs, or names
    /// joined by `+` for nodes that each hold them all, every call balanced between them);
    /// unlisted experts stay on the coordinator.
    #[arg(long = "placement")]
    pub placement: Option<std::path::PathBuf>,
    /// Longest deadline of one expert round trip to a worker, in milliseconds, and the one used
    /// until the worker answered a batch. The deadline adapts to the worker's measured round
    /// trips (three predicted round trips for the batch's size) between this and
    /// --worker-timeout-min-ms. A worker that misses it is lost: its experts are computed here
    /// and it is reconnected in the background.
    #[arg(long = "worker-timeout-ms", default_value_t = 10_000)]
    pub worker_timeout_ms: u64,
    /// Shortest deadline of one expert round trip to a worker, in milliseconds: what a fast
    /// worker gets, so that a scheduling hiccup does not count as a loss.
    #[arg(long = "worker-timeout-min-ms", default_value_t = 250)]
    pub worker_timeout_min_ms: u64,
}

fn parse_kv_type(s: &str) -> Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type {s:?} (expected f32, f16, bf16 or q8_0)"))
}

/// llama.cpp's two-letter single-dash flags, which clap cannot express, mapped to long forms.
fn normalize_args(args: impl Iterator<Item = String>) -> Vec<String> {
    args.map(|a| match a.as_str() {
        "-ctk" => "--cache-type-k".to_string(),
        "-ctv" => "--cache-type-v".to_string(),
        _ => a,
    })
    .collect()
}

/// Entry point of the binary: parses `std::env::args`, runs the command, prints any error as
/// one line on stderr and returns exit code 1 for it.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(normalize_args(std::env::args())) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MOESHARD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Score(args) => score::score(args),
        Command::Serve(args) => serve::serve(args),
        Command::Bench(args) => bench::bench(args),
        Command::Synth(args) => synth::synth(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
