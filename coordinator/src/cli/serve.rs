//! `moeshard serve`: the OpenAI- and Ollama-compatible HTTP server.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use super::load::{Loaded, load};
use crate::chat::ChatTemplate;
use crate::engine::{Engine, EngineOptions};
use crate::experts::{ExpertBackend, LocalExperts};
use crate::serve::{HttpLimits, ModelInfo, ServeState};

/// Arguments of `moeshard serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model's name in the API (default: the file's stem).
    #[arg(long)]
    alias: Option<String>,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a free sequence; more get 503 with `Retry-After`.
    #[arg(long = "max-queue", default_value_t = 64)]
    max_queue: usize,
    /// The largest request body in MiB; larger ones get 413.
    #[arg(long = "max-body-mib", default_value_t = 8)]
    max_body_mib: usize,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long = "header-timeout", default_value_t = 30)]
    header_timeout: u64,
    /// The longest pause in seconds while a request body is received.
    #[arg(long = "body-timeout", default_value_t = 30)]
    body_timeout: u64,
    /// Connections open at once; more are closed as soon as they are accepted.
    #[arg(long = "max-connections", default_value_t = 256)]
    max_connections: usize,
}

impl ServeArgs {
    /// The HTTP limits of the flags, each checked to be positive.
    fn limits(&self) -> anyhow::Result<HttpLimits> {
        anyhow::ensure!(self.max_body_mib > 0, "--max-body-mib must be at least 1");
        anyhow::ensure!(self.header_timeout > 0, "--header-timeout must be at least 1 second");
        anyhow::ensure!(self.body_timeout > 0, "--body-timeout must be at least 1 second");
        anyhow::ensure!(
            (1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&self.max_connections),
            "--max-connections must be between 1 and {}",
            tokio::sync::Semaphore::MAX_PERMITS
        );
        let max_body = self.max_body_mib.checked_mul(1 << 20).context("--max-body-mib is too large")?;
        Ok(HttpLimits {
            max_body,
            header_timeout: Duration::from_secs(self.header_timeout),
            body_timeout: Duration::from_secs(self.body_timeout),
            max_connections: self.max_connections,
        })
    }
}

/// Loads the model, starts the engine and serves until Ctrl-C. Prints `listening on
/// http://ADDR` on stdout once the socket is bound.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.parallel > 0, "--parallel must be at least 1");
    let limits = args.limits()?;
    let Loaded { gguf, tokenizer, session, pool, cluster } = load(&args.model)?;
    let model = session.model().clone();
    let n_ctx = session.n_ctx();
    // The engine keeps its own caches, one per sequence.
    drop(session);
    let experts: Arc<dyn ExpertBackend> = match &cluster {
        Some(c) => c.clone(),
        None => Arc::new(LocalExperts::new(model.clone())),
    };
    let template = ChatTemplate::from_gguf(&gguf)?;
    let info = ModelInfo::from_gguf(&gguf, args.alias.clone(), n_ctx);
    let eog = tokenizer.eog_token_ids().collect();
    let opts = EngineOptions {
        n_ctx,
        parallel: args.parallel,
        max_queue: args.max_queue,
        k_type: args.model.cache_type_k,
        v_type: args.model.cache_type_v,
    };
    let engine = Arc::new(Engine::start(model, experts, pool, eog, opts)?);
    let state = Arc::new(ServeState::new(engine, Arc::new(tokenizer), template, info, cluster));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("moeshard-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        drop(out);
        crate::serve::serve(listener, state, limits).await;
        Ok(())
    })
}
