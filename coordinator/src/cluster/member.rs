//! One worker of the cluster over its whole life: the current connection (none while the worker
//! is lost), what its round trips cost (for the adaptive deadline), its counters, and the
//! supervisor task that notices a lost connection and reconnects with backoff.
//!
//! A worker is lost when a round trip fails or misses its deadline ([`Member::lose`], called by
//! the backend) or when its connection closes (the supervisor sees it). Losing closes the
//! connection, so a stalled worker that wakes up cannot deliver a stale answer: its streams are
//! gone. While lost, the backend computes the worker's share on the coordinator and never waits
//! on it. The supervisor reconnects to the same address, authenticates, assigns the same experts
//! (the worker still has them in memory, its disk cache or its `--model` file, so nothing is
//! shipped), and only then makes the new connection current: later batches go to the worker again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moeshard_protocol::auth::ClusterKey;
use moeshard_protocol::control::{Assignment, Hello};
use quinn::Endpoint;

use super::backoff::Backoff;
use super::deadline::{DeadlineBounds, RttModel};
use super::link::{BlobSource, WorkerLink};
use super::stats::LinkStats;

/// What reconnecting any worker needs: our endpoint, key and hello, and where weights come from.
pub(crate) struct Rejoin {
    pub endpoint: Endpoint,
    pub key: ClusterKey,
    pub hello: Hello,
    pub source: Arc<dyn BlobSource + Send>,
}

/// One worker of the cluster (node `i + 1` of the placement), connected or not.
pub struct Member {
    name: String,
    addr: SocketAddr,
    assignment: Assignment,
    link: RwLock<Option<Arc<WorkerLink>>>,
    rtt: Mutex<RttModel>,
    stats: Arc<LinkStats>,
}

impl Member {
    /// A member connected through `link`, holding `assignment`; `name` is its node name in the
    /// placement.
    pub(crate) fn new(name: String, link: Arc<WorkerLink>, assignment: Assignment, stats: Arc<LinkStats>) -> Member {
        Member {
            name,
            addr: link.addr,
            assignment,
            rtt: Mutex::new(RttModel::new(link.rtt)),
            link: RwLock::new(Some(link)),
            stats,
        }
    }

    /// Its node name in the placement (the worker's `--name`, or its address when two share one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it is reached (and reconnected) at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current connection; `None` while the worker is lost.
    pub fn link(&self) -> Option<Arc<WorkerLink>> {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Its traffic counters (kept across reconnections).
    pub fn stats(&self) -> &Arc<LinkStats> {
        &self.stats
    }

    /// The deadline of a round trip carrying `tokens` rows.
    pub fn deadline(&self, tokens: usize, bounds: DeadlineBounds) -> Duration {
        self.rtt.lock().unwrap_or_else(|e| e.into_inner()).deadline(tokens, bounds)
    }

    /// Records an answered round trip of `tokens` rows that took `rtt`.
    pub fn observe(&self, tokens: usize, rtt: Duration) {
        self.rtt.lock().unwrap_or_else(|e| e.into_inner()).observe(tokens, rtt);
    }

    /// Marks the worker lost because `link` failed (`why`), unless another connection already
    /// replaced it, and closes `link` so nothing more is read from it.
    pub fn lose(&self, link: &Arc<WorkerLink>, why: &str) {
        {
            let mut current = self.link.write().unwrap_or_else(|e| e.into_inner());
            if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
                *current = None;
                tracing::warn!(
                    "worker {} ({}) lost: {why}; its experts are computed here until it is back",
                    self.name,
                    self.addr
                );
            }
        }
        link.close(why);
    }

    /// Runs forever on the cluster's runtime: waits for the current connection to close (closed
    /// by [`Member::lose`], by the worker, or by the QUIC idle timeout), then reconnects with
    /// [`Backoff`] until the worker is back.
    pub(crate) async fn supervise(self: Arc<Self>, rejoin: Arc<Rejoin>) {
        let mut backoff = Backoff::default();
        loop {
            if let Some(link) = self.link() {
                let up_since = Instant::now();
                let why = link.closed().await;
                self.lose(&link, &why);
                backoff.lost_after(up_since.elapsed());
            }
            loop {
                tokio::time::sleep(backoff.next_delay()).await;
                match self.reconnect(&rejoin).await {
                    Ok(link) => {
                        *self.link.write().unwrap_or_else(|e| e.into_inner()) = Some(link);
                        break;
                    }
                    Err(e) => tracing::debug!("worker {} ({}) not back yet: {e:#}", self.name, self.addr),
                }
            }
        }
    }

    /// Connects, authenticates and assigns this member's experts again.
    async fn reconnect(&self, rejoin: &Rejoin) -> anyhow::Result<Arc<WorkerLink>> {
        let link = WorkerLink::connect(&rejoin.endpoint, self.addr, &rejoin.key, rejoin.hello.clone()).await?;
        let shipped = link.assign(self.assignment.clone(), rejoin.source.as_ref()).await?;
        self.stats.record_rejoin(shipped);
        tracing::warn!(
            "worker {} ({}) is back as {}: {} experts, {shipped} weight bytes shipped",
            self.name,
            self.addr,
            link.name(),
            self.assignment.shards.len()
        );
        Ok(Arc::new(link))
    }
}
