//! What every session of this worker shares: who it is, what it offers, its blob store and its
//! compute pool.

use moeshard_protocol::auth::ClusterKey;
use moeshard_protocol::control::{Capabilities, Hello};
use moeshard_protocol::frame::PROTOCOL_VERSION;

use crate::store::BlobStore;

/// The worker's crate version, sent in `Hello` and the mDNS TXT record.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The state shared by all sessions. No `Debug`: it holds the key.
pub struct Node {
    /// Random 16-hex-character id of this worker process.
    pub node_id: String,
    /// Name shown to coordinators.
    pub name: String,
    /// The cluster key coordinators must prove they hold.
    pub key: ClusterKey,
    /// Compute threads (the size of `pool`).
    pub cores: u32,
    /// Memory budget for one session's expert weights, in bytes.
    pub mem_budget: u64,
    /// Measured quantized GEMV throughput, GB/s of weight bytes read.
    pub gemv_gbps: f64,
    /// Weight blobs shared by hash.
    pub store: BlobStore,
    /// The pool expert batches and the probe run on; its thread 0 is the daemon's main thread,
    /// which also runs the async runtime.
    pub pool: rayon::ThreadPool,
}

impl Node {
    /// A fresh random node id: 16 lowercase hex characters.
    pub fn random_id() -> String {
        format!("{:016x}", rand::random::<u64>())
    }

    /// The `Hello` this worker answers a coordinator's with.
    pub fn hello(&self) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            node_id: self.node_id.clone(),
            name: self.name.clone(),
            version: VERSION.to_owned(),
            capabilities: Capabilities {
                cores: self.cores,
                mem_budget: self.mem_budget,
                backends: vec!["cpu".to_owned()],
                gemv_gbps: self.gemv_gbps as f32,
            },
        }
    }
}
