//! Greedy generation through the library API: load a GGUF model, tokenize a prompt, evaluate it
//! and decode token by token with the local CPU experts.
//!
//! `cargo run --release -p moeshard-examples --example generate -- MODEL.gguf "def fib(n):" 32`

use std::sync::Arc;

use moeshard::experts::LocalExperts;
use moeshard::kv_cache::KvType;
use moeshard::model::{Logits, Model};
use moeshard::session::Session;
use moeshard::tokenizer::{StreamDecoder, Tokenizer};
use moeshard_kernels::sampling::argmax;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "tests/fixtures/tiny-mellum-q8_0.gguf".into());
    let prompt = args.next().unwrap_or_else(|| "def fib(n):".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);

    let model = Arc::new(Model::load(&path)?);
    let tokenizer = Tokenizer::from_gguf(model.gguf())?;
    let experts = Arc::new(LocalExperts::new(model.clone()));
    let mut session = Session::new(model, experts, 2048, KvType::F16, KvType::F16)?;

    let mut logits = session.eval(&tokenizer.encode(&prompt, true)?, Logits::Last)?;
    let mut decoder = StreamDecoder::new(false);
    print!("{prompt}");
    for _ in 0..n {
        let id = argmax(&logits);
        if tokenizer.is_eog(id) {
            break;
        }
        print!("{}", decoder.push(&tokenizer, id));
        logits = session.eval(&[id], Logits::Last)?;
    }
    println!("{}", decoder.finish());
    Ok(())
}
