//! `moeshard run`: generate from a prompt, streaming text to stdout.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use moeshard_kernels::sampling::{Sampler, SamplingParams, log_softmax, top_logprobs};
use serde_json::json;

use super::ModelArgs;
use super::load::load;
use crate::chat::ChatTemplate;
use crate::model::Logits;
use crate::tokenizer::StreamDecoder;

/// Arguments of `moeshard run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Raw prompt text (special tokens such as `<|im_start|>` are parsed).
    #[arg(short = 'p', long = "prompt", group = "input")]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long = "chat", group = "input")]
    chat: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long = "prompt-tokens", group = "input", value_delimiter = ',')]
    prompt_tokens: Option<Vec<u32>>,
    /// Tokens to generate; -1 = until an end-of-generation token or the context is full.
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    n_predict: i64,
    /// Temperature; 0 = greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temp: f32,
    /// Top-k sampling; 0 = off.
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    /// Top-p (nucleus) sampling; 1 = off.
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    /// Min-p sampling; 0 = off.
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty over the last `--repeat-last-n` tokens; 1 = off.
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Window of the repetition penalty in tokens.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    repeat_last_n: usize,
    /// Sampling seed: the same seed and prompt give the same output.
    #[arg(long = "seed", default_value_t = 0)]
    seed: u64,
    /// Print one JSON line per generated token with the top-K logprobs:
    /// `{"id","text","logprob","top":[[id,logprob],...]}`.
    #[arg(long = "logprobs", requires = "json")]
    logprobs: Option<usize>,
    /// JSON lines output (with `--logprobs`).
    #[arg(long)]
    json: bool,
    /// Print per-worker traffic statistics to stderr at the end.
    #[arg(long)]
    stats: bool,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut loaded = load(&args.model)?;
    let tok = &loaded.tokenizer;
    let prompt: Vec<u32> = match (&args.prompt, &args.chat, &args.prompt_tokens) {
        (Some(p), _, _) => tok.encode(p, true)?,
        (_, Some(msg), _) => {
            let template = ChatTemplate::from_gguf(&loaded.gguf)?.with_context(|| {
                format!("{}: the model has no chat template (tokenizer.chat_template)", loaded.gguf.path().display())
            })?;
            let messages = json!([{ "role": "user", "content": msg }]);
            let text = template.render(&messages, None, true, &serde_json::Map::new())?;
            tok.encode(&text, true)?
        }
        (_, _, Some(ids)) => ids.clone(),
        _ => anyhow::bail!("give a prompt with -p TEXT, --chat TEXT or --prompt-tokens 1,2,3"),
    };
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let n_vocab = loaded.session.model().config.n_vocab;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= n_vocab) {
        anyhow::bail!("--prompt-tokens: token id {bad} is outside the vocabulary of {n_vocab}");
    }

    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: args.seed,
        ..SamplingParams::default()
    });
    let budget = loaded.session.n_ctx().saturating_sub(prompt.len());
    let n_predict = if args.n_predict < 0 { budget } else { (args.n_predict as usize).min(budget) };

    let session = &mut loaded.session;
    let pool = &loaded.pool;
    let mut out = std::io::stdout().lock();
    let mut decoder = StreamDecoder::new(false);
    let mut history = prompt.clone();

    let t0 = Instant::now();
    let mut logits = pool.install(|| session.eval(&prompt, Logits::Last))?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = 0usize;
    while generated < n_predict {
        let id = sampler.sample(&logits, &history);
        generated += 1;
        if tok.is_eog(id) {
            break;
        }
        history.push(id);
        if args.json {
            let lp = log_softmax(&logits);
            let top = top_logprobs(&lp, args.logprobs.unwrap_or(0));
            let line = json!({
                "id": id,
                "text": String::from_utf8_lossy(tok.token_bytes(id)),
                "logprob": lp[id as usize],
                "top": top,
            });
            writeln!(out, "{line}")?;
        } else {
            out.write_all(decoder.push(tok, id).as_bytes())?;
            out.flush()?;
        }
        if generated == n_predict {
            break;
        }
        logits = pool.install(|| session.eval(&[id], Logits::Last))?;
    }
    if !args.json {
        out.write_all(decoder.finish().as_bytes())?;
        writeln!(out)?;
    }
    let gen_secs = t1.elapsed().as_secs_f64();
    if args.stats {
        match &loaded.cluster {
            Some(cluster) => eprint!("{}", cluster.report()),
            None => eprintln!("no workers: every expert ran on this machine"),
        }
    }
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s",
        prompt.len(),
        prompt.len() as f64 / prompt_secs,
        generated,
        generated as f64 / gen_secs.max(1e-9),
    );
    Ok(())
}
