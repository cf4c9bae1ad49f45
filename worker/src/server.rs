//! Start-up, the accept loop and shutdown of the daemon.
//!
//! Start-up: the compute pool, the blob store, the GEMV probe, a random node id and a fresh TLS
//! identity, the QUIC endpoint; then exactly one line on stdout,
//! `listening on {bound address} node {node id} cluster {cluster id}`, and the mDNS announcement.
//! SIGINT or SIGTERM withdraw the announcement and close every connection with code 0.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moeshard_protocol::auth::cluster_id;
use moeshard_protocol::transport::{NodeIdentity, server_endpoint};

use crate::announce::Announcement;
use crate::cli::Settings;
use crate::connection::{self, CLOSED};
use crate::node::Node;
use crate::sched;
use crate::store::BlobStore;

/// How long shutdown waits for connections to acknowledge their close.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    // Before any thread is created: they all inherit both.
    if let Some(cpus) = &settings.cpus {
        moeshard_kernels::affinity::pin(cpus)
            .with_context(|| format!("cannot keep the worker on CPUs {cpus} (--cpus)"))?;
    }
    sched::apply(settings.sched).with_context(|| format!("cannot set the scheduling policy {:?}", settings.sched))?;
    // This thread is the pool's thread 0 and runs the single-threaded async runtime below: an
    // expert batch is computed from the thread that read it (see `connection::BatchStream`).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.threads)
        .use_current_thread()
        .thread_name(|i| format!("moeshard-compute-{i}"))
        .build()
        .context("cannot start the compute threads")?;
    let cpus = settings.cpus.as_ref().map_or_else(|| "any".to_owned(), ToString::to_string);
    let store = BlobStore::open(settings.cache_dir.clone(), settings.model.as_deref())?;
    let gemv_gbps = pool.install(moeshard_kernels::probe::gemv_throughput);
    let node = Arc::new(Node {
        node_id: Node::random_id(),
        name: settings.name,
        key: settings.key,
        cores: u32::try_from(settings.threads).unwrap_or(u32::MAX),
        mem_budget: settings.mem_budget,
        gemv_gbps,
        store,
        pool,
    });
    tracing::info!(
        node = %node.node_id, name = %node.name, threads = node.cores, mem_budget = node.mem_budget,
        cpus = %cpus,
        cache = %settings.cache_dir.display(), "quantized GEMV: {gemv_gbps:.2} GB/s"
    );
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(serve(node, settings.listen, settings.mdns))
}

async fn serve(node: Arc<Node>, listen: SocketAddr, mdns: bool) -> anyhow::Result<()> {
    let identity = NodeIdentity::generate(&node.name)?;
    let endpoint = server_endpoint(listen, &identity).with_context(|| format!("cannot listen on {listen}"))?;
    let bound = endpoint.local_addr()?;
    let cluster = cluster_id(&node.key);
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {bound} node {} cluster {cluster}", node.node_id)?;
        stdout.flush()?;
    }
    let announcement = if mdns {
        match Announcement::start(&node, &cluster, bound) {
            Ok(announcement) => Some(announcement),
            Err(err) => {
                tracing::warn!("no mDNS announcement ({err}); coordinators must name this worker with --worker");
                None
            }
        }
    } else {
        None
    };

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(connection::serve(incoming, Arc::clone(&node)));
                }
                None => break,
            },
            signal = &mut shutdown => {
                match signal {
                    Ok(name) => tracing::info!("{name}: shutting down"),
                    Err(err) => tracing::warn!("cannot wait for signals ({err}); shutting down"),
                }
                break;
            }
        }
    }
    if let Some(announcement) = announcement {
        let _ = tokio::task::spawn_blocking(move || announcement.stop()).await;
    }
    endpoint.close(CLOSED, b"the worker is shutting down");
    let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, endpoint.wait_idle()).await;
    Ok(())
}

/// Resolves with the signal's name on SIGINT or SIGTERM.
#[cfg(unix)]
async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted.map(|()| "SIGINT"),
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
async fn shutdown_signal() -> std::io::Result<&'static str> {
    tokio::signal::ctrl_c().await.map(|()| "Ctrl-C")
}
