//! [`ClusterExperts`]: the expert backend that splits each MoE layer between the coordinator's
//! CPU and the workers, per the placement.
//!
//! Per layer (DESIGN.md, "The hot path"): the hidden states are quantized once, exactly as the
//! local kernel would quantize them; each involved worker gets ONE message with the rows of the
//! tokens routed to it and their (expert, weight) lists; the local experts are computed while
//! the workers work; the partial sums are added in a fixed order (coordinator, then workers by
//! index), so a run is reproducible. A worker that fails or misses the deadline has its share
//! computed here from the mapped file (same kernels, same quantized inputs: the same numbers), and
//! its experts move to the coordinator.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use moeshard_kernels::moe::{QuantizedInputs, Route, grouped_expert_ffn_quantized};
use moeshard_protocol::data::{ActivationRows, ExpertBatch, WireRoute};

use super::link::WorkerLink;
use super::placement::Placement;
use super::stats::LinkStats;
use crate::experts::ExpertBackend;
use crate::model::Model;

/// Experts spread over the coordinator (node 0) and workers (nodes 1..).
pub struct ClusterExperts {
    model: Arc<Model>,
    placement: RwLock<Placement>,
    links: Vec<Arc<WorkerLink>>,
    stats: Vec<Arc<LinkStats>>,
    lost: Vec<AtomicBool>,
    runtime: Arc<tokio::runtime::Runtime>,
    step: AtomicU64,
    deadline: Duration,
}

impl ClusterExperts {
    /// A backend over connected `links` (node `i + 1` is `links[i]`) with `placement`; round
    /// trips run on `runtime` and give up after `deadline`.
    pub fn new(
        model: Arc<Model>,
        placement: Placement,
        links: Vec<Arc<WorkerLink>>,
        stats: Vec<Arc<LinkStats>>,
        runtime: Arc<tokio::runtime::Runtime>,
        deadline: Duration,
    ) -> Self {
        let lost = links.iter().map(|_| AtomicBool::new(false)).collect();
        ClusterExperts {
            model,
            placement: RwLock::new(placement),
            links,
            stats,
            lost,
            runtime,
            step: AtomicU64::new(0),
            deadline,
        }
    }

    /// The workers, in node order (node `i + 1` is element `i`).
    pub fn links(&self) -> &[Arc<WorkerLink>] {
        &self.links
    }

    /// Each worker's traffic counters, in node order.
    pub fn stats(&self) -> &[Arc<LinkStats>] {
        &self.stats
    }

    /// The runtime the links live on.
    pub fn runtime(&self) -> &Arc<tokio::runtime::Runtime> {
        &self.runtime
    }

    fn compute_local(
        &self,
        layer: usize,
        inputs: &QuantizedInputs,
        routes: &[Route],
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        grouped_expert_ffn_quantized(|e| self.model.expert_ffn(layer, e as usize), inputs, routes, out)
            .map_err(|e| anyhow::anyhow!("local experts of layer {layer}: {e}"))
    }
}

/// The routes of one node, with the batch rows it needs.
struct NodeShare {
    /// Global token rows, ascending; the node's row `i` is global row `tokens[i]`.
    tokens: Vec<usize>,
    /// Routes with `token` rewritten to the node's row.
    routes: Vec<Route>,
    /// The same routes with global token rows (for a local fallback).
    global: Vec<Route>,
}

impl ExpertBackend for ClusterExperts {
    fn moe_forward(&self, layer: usize, hidden: &[f32], routes: &[Route], out: &mut [f32]) -> anyhow::Result<()> {
        let c = &self.model.config;
        let l = &self.model.layers[layer];
        let n_embd = c.n_embd;
        let types = [l.ffn_gate_exps.matrix.ty.vec_dot_type(), l.ffn_up_exps.matrix.ty.vec_dot_type()];
        let inputs = QuantizedInputs::quantize(hidden, n_embd, types);

        let mut shares: BTreeMap<usize, NodeShare> = BTreeMap::new();
        {
            let placement = self.placement.read().unwrap_or_else(|e| e.into_inner());
            for r in routes {
                let node = placement.owner(layer, r.expert as usize);
                let share = shares.entry(node).or_insert_with(|| NodeShare {
                    tokens: Vec::new(),
                    routes: Vec::new(),
                    global: Vec::new(),
                });
                share.global.push(*r);
            }
        }
        for share in shares.values_mut() {
            share.tokens = share.global.iter().map(|r| r.token as usize).collect();
            share.tokens.sort_unstable();
            share.tokens.dedup();
            share.routes = share
                .global
                .iter()
                .map(|r| Route { token: share.tokens.binary_search(&(r.token as usize)).unwrap_or(0) as u32, ..*r })
                .collect();
        }

        let step = self.step.fetch_add(1, Ordering::Relaxed);
        let mut pending = Vec::new();
        for (&node, share) in shares.iter().filter(|(n, _)| **n > 0) {
            let batch = ExpertBatch {
                step,
                layer: layer as u32,
                n_tokens: share.tokens.len() as u32,
                n_embd: n_embd as u32,
                activations: inputs
                    .parts()
                    .iter()
                    .map(|q| {
                        let rows = inputs.gather(q.ty, &share.tokens).expect("type present");
                        ActivationRows::new(q.ty, rows.data)
                    })
                    .collect(),
                routes: share
                    .routes
                    .iter()
                    .map(|r| WireRoute { token: r.token, expert: r.expert, weight: r.weight })
                    .collect(),
            };
            let payload = batch.encode().map_err(|e| anyhow::anyhow!("encoding a batch for layer {layer}: {e}"))?;
            let link = self.links[node - 1].clone();
            let deadline = self.deadline;
            let started = Instant::now();
            let handle = self.runtime.spawn(async move { link.round_trip(&payload, deadline).await });
            pending.push((node, handle, started));
        }

        match shares.get(&0) {
            Some(local) => self.compute_local(layer, &inputs, &local.global, out)?,
            None => out.fill(0.0),
        }

        let mut scratch = vec![0.0f32; out.len()];
        for (node, handle, started) in pending {
            let share = &shares[&node];
            let result = self.runtime.block_on(handle).map_err(anyhow::Error::from).and_then(|r| r);
            match result {
                Ok((sums, bytes_out, bytes_in))
                    if sums.step == step
                        && sums.layer as usize == layer
                        && sums.n_tokens as usize == share.tokens.len() =>
                {
                    self.stats[node - 1].record(
                        layer,
                        bytes_out,
                        bytes_in,
                        share.tokens.len() as u64,
                        started.elapsed(),
                    );
                    for (row, &t) in sums.sums.chunks_exact(n_embd).zip(&share.tokens) {
                        out[t * n_embd..(t + 1) * n_embd].iter_mut().zip(row).for_each(|(o, s)| *o += s);
                    }
                }
                other => {
                    let why = match other {
                        Err(e) => format!("{e:#}"),
                        Ok(_) => "the reply does not match the batch".to_string(),
                    };
                    self.stats[node - 1].record_failure();
                    if !self.lost[node - 1].swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "worker {} lost ({why}); its experts move to the coordinator",
                            self.links[node - 1].addr
                        );
                        self.placement.write().unwrap_or_else(|e| e.into_inner()).reclaim(node);
                    }
                    self.compute_local(layer, &inputs, &share.global, &mut scratch)?;
                    out.iter_mut().zip(&scratch).for_each(|(o, s)| *o += s);
                }
            }
        }
        Ok(())
    }
}
