//! `moeshard synth`: write a random-weight GGUF with a real model's geometry and type mix.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::model::Arch;
use crate::synth::{FileType, Preset, tensors, write};

/// Arguments of `moeshard synth`.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Architecture (`general.architecture`): mellum or qwen3moe; must be the preset's.
    #[arg(long = "arch", value_parser = ["mellum", "qwen3moe"])]
    arch: String,
    /// The model whose geometry, metadata and tokenizer to use.
    #[arg(long = "preset")]
    preset: Preset,
    /// Blocks to write (default: the model's; fewer make a smaller file with the same layers).
    #[arg(long = "layers")]
    layers: Option<usize>,
    /// llama-quantize preset whose per-tensor type mix to use.
    #[arg(long = "type")]
    ftype: FileType,
    /// Seed of the random weights: the same seed gives the same file.
    #[arg(long = "seed", default_value_t = 0)]
    seed: u64,
    /// Output file (written as FILE.partial, renamed when complete).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Threads generating the weights (default: all available cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
}

pub fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let mut g = args.preset.geometry();
    let arch = match g.arch {
        Arch::Mellum => "mellum",
        Arch::Qwen3Moe => "qwen3moe",
    };
    let preset = args.preset.to_possible_value().expect("every preset has a name");
    anyhow::ensure!(arch == args.arch, "--preset {} is a {arch} model, not {}", preset.get_name(), args.arch);
    if let Some(n) = args.layers {
        anyhow::ensure!((1..=g.n_layer).contains(&n), "--layers must be between 1 and {}", g.n_layer);
        g.n_layer = n;
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().context("thread pool")?;
    let data_bytes: u64 = tensors(&g, args.ftype).iter().map(|t| t.n_bytes()).sum();
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(data_bytes);
        bar.set_style(
            ProgressStyle::with_template("writing {msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(args.output.display().to_string());
        bar
    } else {
        ProgressBar::hidden()
    };

    let partial = args.output.with_extension("gguf.partial");
    let started = Instant::now();
    let result = (|| -> anyhow::Result<u64> {
        let file = File::create(&partial).with_context(|| format!("{}: cannot create", partial.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let size = pool.install(|| write(&g, args.ftype, args.seed, &mut out, |done| bar.set_position(done)))?;
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&partial, &args.output)
            .with_context(|| format!("renaming {} to {}", partial.display(), args.output.display()))?;
        Ok(size)
    })();
    bar.finish_and_clear();
    let size = result.inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "wrote {}: {arch}, {} layers, {:?}, {:.2} GB in {secs:.1} s ({:.2} GB/s)",
        args.output.display(),
        g.n_layer,
        args.ftype,
        size as f64 / 1e9,
        size as f64 / 1e9 / secs.max(1e-9),
    );
    Ok(())
}
