//! Loading a model for a command: open, validate, page the file in with a progress bar, build
//! the thread pool and an empty session.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moeshard_kernels::affinity::pin_pool;

use super::{ClusterArgs, ModelArgs};
use crate::cluster::{Cluster, ClusterExperts, ClusterOptions, DeadlineBounds};
use crate::experts::{ExpertBackend, LocalExperts};
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::session::Session;
use crate::tokenizer::Tokenizer;
use moeshard_protocol::auth::ClusterKey;

/// Default context size when `-c` is not given.
const DEFAULT_CTX: usize = 4096;

/// A loaded model with its tokenizer, thread pool and an empty session.
pub struct Loaded {
    pub gguf: Arc<GgufFile>,
    pub tokenizer: Tokenizer,
    pub session: Session,
    pub pool: rayon::ThreadPool,
    /// The distributed expert backend, when workers are in use.
    pub cluster: Option<Arc<ClusterExperts>>,
}

pub fn load(args: &ModelArgs) -> anyhow::Result<Loaded> {
    let threads = args.threads.unwrap_or_else(|| match &args.cpus {
        Some(cpus) => cpus.cpus().len(),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    anyhow::ensure!(threads > 0, "-t must be at least 1");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("building the thread pool")?;
    if let Some(cpus) = &args.cpus {
        pin_pool(&pool, cpus).with_context(|| format!("cannot put the compute threads on CPUs {cpus} (--cpus)"))?;
    }
    let gguf = match args.no_mmap {
        true => Arc::new(GgufFile::read(&args.model)?),
        false => {
            let gguf = Arc::new(GgufFile::open(&args.model)?);
            page_in(&gguf);
            gguf
        }
    };
    let model = Arc::new(Model::from_gguf(gguf.clone())?);
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let n_ctx = args.ctx_size.unwrap_or(DEFAULT_CTX.min(model.config.n_ctx_train));
    anyhow::ensure!(n_ctx > 0, "-c must be at least 1");
    let cluster = pool.install(|| start_cluster(&model, &args.cluster))?;
    let experts: Arc<dyn ExpertBackend> = match &cluster {
        Some(c) => c.clone(),
        None => Arc::new(LocalExperts::new(model.clone())),
    };
    let session = Session::new(model, experts, n_ctx, args.cache_type_k, args.cache_type_v)?;
    Ok(Loaded { gguf, tokenizer, session, pool, cluster })
}

/// Forms the cluster when a key is given. Without one, a fresh key is generated and the command
/// to start workers with it is printed (no worker can know that key yet, so the run is local).
fn start_cluster(model: &Arc<Model>, args: &ClusterArgs) -> anyhow::Result<Option<Arc<ClusterExperts>>> {
    let key = match (&args.cluster_key, &args.cluster_key_file) {
        (Some(k), _) => ClusterKey::parse(k).context("--cluster-key")?,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read the cluster key file", path.display()))?;
            ClusterKey::parse(&text).with_context(|| format!("{}: cluster key file", path.display()))?
        }
        (None, None) => {
            anyhow::ensure!(args.workers.is_empty(), "--worker needs the cluster key: pass --cluster-key KEY");
            let key = ClusterKey::generate();
            eprintln!(
                "no cluster key given; generated one. To pool other machines, run on each:\n  moeshard-worker --cluster-key {}\nand pass the same --cluster-key here.",
                key.reveal()
            );
            return Ok(None);
        }
    };
    let opts = ClusterOptions {
        key,
        workers: args.workers.clone(),
        discovery: !args.no_discovery,
        discovery_timeout: Duration::from_millis(args.discovery_ms),
        placement: args.placement.clone(),
        deadline: DeadlineBounds {
            min: Duration::from_millis(args.worker_timeout_min_ms),
            max: Duration::from_millis(args.worker_timeout_ms),
        },
    };
    Ok(Some(Cluster::start(model.clone(), &opts)?.experts))
}

/// Touches every page of the mapped file so the first tokens do not stall on page faults,
/// showing a progress bar on a terminal for files over 256 MiB.
fn page_in(gguf: &GgufFile) {
    const PAGE: usize = 4096;
    const STEP: usize = 64 << 20;
    let data = gguf.data();
    let bar = if data.len() > 256 << 20 && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(data.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("loading {msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(gguf.path().display().to_string());
        Some(bar)
    } else {
        None
    };
    let mut sum = 0u8;
    for chunk in data.chunks(STEP) {
        sum = chunk.iter().step_by(PAGE).fold(sum, |a, &b| a.wrapping_add(b));
        if let Some(bar) = &bar {
            bar.inc(chunk.len() as u64);
        }
    }
    std::hint::black_box(sum);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
