//! Pooling workers: discovery, connection, placement, weight shipping and the distributed
//! expert backend.
//!
//! [`Cluster::start`] runs the setup once: find workers (mDNS, filtered by the cluster id, plus
//! `--worker HOST:PORT`), connect and authenticate each (a worker that cannot prove the key is
//! skipped with a warning), measure them (hello capabilities, ping RTT), place the experts
//! (proportionally to measured GEMV speed within memory budgets, or from a `--placement` file),
//! ship each worker its experts' GGUF bytes (only the blobs it does not have), and return a
//! [`ClusterExperts`] backend for the forward pass. Each worker then has a supervisor task on the
//! cluster's runtime that reconnects it after a loss ([`Member`]).

mod backend;
mod backoff;
pub mod deadline;
pub mod discovery;
mod link;
mod member;
mod net;
pub mod placement;
mod stats;

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moeshard_protocol::auth::{ClusterKey, cluster_id};
use moeshard_protocol::control::{Assignment, Capabilities, ExpertShard, Hello, TensorBlob};
use moeshard_protocol::frame::PROTOCOL_VERSION;
use moeshard_protocol::transport::client_endpoint;
use rayon::prelude::*;

pub use backend::ClusterExperts;
pub use deadline::DeadlineBounds;
pub use link::{BlobSource, WorkerLink};
pub use member::Member;
pub use net::NetRuntime;
pub use placement::{NodeSpec, Placement, PlacementError};
pub use stats::{Counters, LinkStats};

use crate::gguf::GgufFile;
use crate::model::{MatrixRef, Model};

/// How to form the cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The shared secret of the cluster.
    pub key: ClusterKey,
    /// Workers given explicitly (`HOST:PORT`).
    pub workers: Vec<String>,
    /// Browse mDNS for workers of this cluster.
    pub discovery: bool,
    /// How long to browse.
    pub discovery_timeout: Duration,
    /// Explicit placement file (`LAYERS EXPERTS NODE` lines), else proportional placement.
    pub placement: Option<PathBuf>,
    /// Bounds of the adaptive deadline of one data-plane round trip.
    pub deadline: DeadlineBounds,
}

/// Summary of the setup, for logs and tests.
pub struct Cluster {
    /// The backend to run the model with.
    pub experts: Arc<ClusterExperts>,
    /// The placement used (node 0 = coordinator, node `i + 1` = `experts.members()[i]`).
    pub placement: Placement,
}

impl Cluster {
    /// Forms the cluster for `model`. With no reachable, authenticated worker every expert stays
    /// on the coordinator (a warning says so).
    pub fn start(model: Arc<Model>, opts: &ClusterOptions) -> anyhow::Result<Cluster> {
        let runtime = Arc::new(NetRuntime::start()?);
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for w in &opts.workers {
            let resolved = w
                .to_socket_addrs()
                .with_context(|| format!("--worker {w}: expected HOST:PORT"))?
                .next()
                .with_context(|| format!("--worker {w}: no address"))?;
            addrs.push(resolved);
        }
        if opts.discovery {
            match discovery::browse(&cluster_id(&opts.key), opts.discovery_timeout) {
                Ok(found) => {
                    tracing::info!("mDNS: {} worker(s) of this cluster", found.len());
                    addrs.extend(found.into_iter().map(|w| w.addr));
                }
                Err(e) => tracing::warn!("mDNS discovery failed: {e}; use --worker HOST:PORT"),
            }
        }
        addrs.sort();
        addrs.dedup();

        let local_gbps = moeshard_kernels::probe::gemv_throughput() as f32;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            node_id: format!("{:016x}", rand::random::<u64>()),
            name: "coordinator".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: Capabilities {
                cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                mem_budget: 0,
                backends: vec!["cpu".into()],
                gemv_gbps: local_gbps,
            },
        };
        let endpoint = runtime.block_on(async { client_endpoint(SocketAddr::from(([0, 0, 0, 0], 0))) })?;
        let links: Vec<Arc<WorkerLink>> = runtime.block_on(async {
            let mut links: Vec<Arc<WorkerLink>> = Vec::new();
            for addr in addrs {
                match WorkerLink::connect(&endpoint, addr, &opts.key, hello.clone()).await {
                    Ok(link) if links.iter().any(|l| l.hello.node_id == link.hello.node_id) => {
                        link.close("the same worker is reachable at another address")
                    }
                    Ok(link) => {
                        tracing::info!(
                            "worker {} at {addr}: ping {:?}, {:.1} GB/s GEMV, {} bytes budget",
                            link.name(),
                            link.rtt,
                            link.capabilities().gemv_gbps,
                            link.capabilities().mem_budget
                        );
                        links.push(Arc::new(link))
                    }
                    Err(e) => tracing::warn!("{e:#}; not using it"),
                }
            }
            anyhow::Ok(links)
        })?;
        if links.is_empty() && (!opts.workers.is_empty() || opts.discovery) {
            tracing::warn!("no worker joined; every expert runs on the coordinator");
        }

        let c = &model.config;
        let mut names = vec!["local".to_string()];
        for l in &links {
            let name = if names.contains(&l.name().to_string()) { l.addr.to_string() } else { l.name().to_string() };
            names.push(name);
        }
        let placement = match &opts.placement {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{}: cannot read the placement file", path.display()))?;
                Placement::parse(&text, c.n_layer, c.n_expert, &names).with_context(|| path.display().to_string())?
            }
            None => {
                let l0 = &model.layers[0];
                let expert_bytes = (l0.ffn_gate_exps.matrix.n_bytes()
                    + l0.ffn_up_exps.matrix.n_bytes()
                    + l0.ffn_down_exps.matrix.n_bytes()) as u64;
                let mut nodes = vec![NodeSpec { name: "local".into(), mem_budget: u64::MAX, gemv_gbps: local_gbps }];
                for (l, name) in links.iter().zip(&names[1..]) {
                    let caps = l.capabilities();
                    nodes.push(NodeSpec { name: name.clone(), mem_budget: caps.mem_budget, gemv_gbps: caps.gemv_gbps });
                }
                Placement::proportional(c.n_layer, c.n_expert, expert_bytes, &nodes)
            }
        };

        let gguf = model.gguf().clone();
        let model_id = *blake3::hash(&gguf.data()[..gguf.data_offset() as usize]).as_bytes();
        let source = Arc::new(MappedFile(gguf.clone()));
        let mut members = Vec::with_capacity(links.len());
        for (i, link) in links.into_iter().enumerate() {
            let experts = placement.experts_of(i + 1);
            let shards: Vec<ExpertShard> = experts
                .par_iter()
                .map(|&(layer, e)| {
                    let l = &model.layers[layer];
                    ExpertShard {
                        layer: layer as u32,
                        expert: e as u32,
                        gate: blob(&gguf, &l.ffn_gate_exps.expert(e)),
                        up: blob(&gguf, &l.ffn_up_exps.expert(e)),
                        down: blob(&gguf, &l.ffn_down_exps.expert(e)),
                    }
                })
                .collect();
            let assignment = Assignment { model_id, shards };
            let shipped = runtime
                .block_on(link.assign(assignment.clone(), source.as_ref()))
                .with_context(|| format!("assigning experts to {}", names[i + 1]))?;
            let stats = Arc::new(LinkStats::default());
            stats.record_shipping(shipped, experts.len() as u64);
            tracing::info!("{}: {} experts, {} bytes shipped", names[i + 1], experts.len(), shipped);
            members.push(Arc::new(Member::new(names[i + 1].clone(), link, assignment, stats)));
        }

        let rejoin = Arc::new(member::Rejoin { endpoint, key: opts.key.clone(), hello, source });
        for m in &members {
            runtime.spawn(m.clone().supervise(rejoin.clone()));
        }
        let experts = Arc::new(ClusterExperts::new(model, placement.clone(), members, runtime, opts.deadline));
        Ok(Cluster { experts, placement })
    }
}

/// A weight matrix's blob description (BLAKE3 of its bytes in the file).
fn blob(gguf: &GgufFile, m: &MatrixRef) -> TensorBlob {
    let bytes = &gguf.data()[m.offset..m.offset + m.n_bytes()];
    TensorBlob {
        ggml_type: m.ty.ggml_id(),
        rows: m.rows as u32,
        cols: m.cols as u32,
        hash: *blake3::hash(bytes).as_bytes(),
        len: bytes.len() as u64,
        file_offset: m.offset as u64,
    }
}

struct MappedFile(Arc<GgufFile>);

impl BlobSource for MappedFile {
    fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        &self.0.data()[offset as usize..(offset + len) as usize]
    }
}

impl ClusterExperts {
    /// A human-readable traffic report: per worker the experts held, weight bytes shipped, round
    /// trips, bytes each way, bytes per token, failures and reconnections, and RTT mean / p99
    /// overall and per layer.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for member in self.members() {
            let c = member.stats().snapshot();
            let per_token = if c.tokens > 0 { (c.bytes_out + c.bytes_in) as f64 / c.tokens as f64 } else { 0.0 };
            let state = match member.link() {
                Some(link) => format!(
                    "ping {:.3} ms, {:.1} GB/s GEMV",
                    link.rtt.as_secs_f64() * 1e3,
                    link.capabilities().gemv_gbps
                ),
                None => "lost".to_string(),
            };
            let _ = writeln!(
                s,
                "worker {} ({}, {state}): {} experts, {} weight bytes shipped, {} round trips, {} bytes out, {} bytes in, {:.0} bytes/token/layer, {} failures, {} reconnects",
                member.name(),
                member.addr(),
                c.experts,
                c.shipped_bytes,
                c.round_trips,
                c.bytes_out,
                c.bytes_in,
                per_token,
                c.failures,
                c.reconnects
            );
            for layer in 0..c.rtt_us.len() {
                if let Some((mean, p99)) = c.rtt(layer) {
                    let _ = writeln!(
                        s,
                        "  layer {layer:>3}: rtt mean {:>8.3} ms, p99 {:>8.3} ms",
                        mean.as_secs_f64() * 1e3,
                        p99.as_secs_f64() * 1e3
                    );
                }
            }
        }
        s
    }
}
