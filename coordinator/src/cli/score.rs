//! `moeshard score`: teacher-forced scoring of a text file as one sequence.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use super::load::load;

/// Arguments of `moeshard score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score (UTF-8); special tokens in it are not parsed.
    #[arg(long = "text-file")]
    text_file: PathBuf,
    /// How many top logprobs to keep per position.
    #[arg(long = "top", default_value_t = 5)]
    top: usize,
    /// Print one JSON object `{tokens, next_token_logprobs, top, perplexity}` instead of a summary.
    #[arg(long)]
    json: bool,
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("{}: cannot read the text file (expected UTF-8 text)", args.text_file.display()))?;
    let mut loaded = load(&args.model)?;
    let tokens = loaded.tokenizer.encode(&text, false)?;
    anyhow::ensure!(tokens.len() >= 2, "{}: needs at least 2 tokens to score", args.text_file.display());
    let start = std::time::Instant::now();
    let session = &mut loaded.session;
    let scores = loaded.pool.install(|| session.score(&tokens, args.top))?;
    let secs = start.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &scores)?;
        writeln!(out)?;
    } else {
        writeln!(out, "tokens: {}", scores.tokens.len())?;
        writeln!(out, "perplexity: {:.4}", scores.perplexity)?;
    }
    eprintln!("scored {} tokens in {:.2} s ({:.1} tokens/s)", tokens.len(), secs, tokens.len() as f64 / secs);
    Ok(())
}
