//! The `moeshard-worker` daemon (DESIGN.md, "Crates" and "Protocol"): it holds expert weights for
//! moeshard coordinators and computes their expert batches.
//!
//! A coordinator connects over QUIC ([`moeshard_protocol::transport`]), proves it holds the
//! cluster key, exchanges `Hello`s, assigns experts (whose bytes come from this worker's memory,
//! its on-disk cache, its local copy of the model file, or the coordinator's chunks), and then
//! sends one expert batch per (step, layer), each answered with one set of partial sums.
//!
//! Modules, in the order a request meets them:
//! - [`cli`]: command line and the settings derived from it;
//! - [`announce`]: the mDNS announcement;
//! - [`server`]: start-up, the accept loop and shutdown;
//! - [`sched`]: the scheduling policy of the worker's threads (`SCHED_BATCH` by default);
//! - [`node`]: what all sessions share (identity, capabilities, store, compute pool);
//! - [`connection`]: one authenticated session (control stream and batch streams);
//! - [`assignment`]: validation of an expert assignment and the experts it yields;
//! - [`store`]: weight blobs shared by content hash, the disk cache and the local model file;
//! - [`compute`]: one expert batch through the grouped expert FFN kernel.

pub mod announce;
pub mod assignment;
pub mod cli;
pub mod compute;
pub mod connection;
pub mod node;
pub mod sched;
pub mod server;
pub mod store;

/// Lowercase hex of `bytes` (blob hashes in file names and messages).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
