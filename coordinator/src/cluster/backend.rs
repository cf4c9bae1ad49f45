//! [`ClusterExperts`]: the expert backend that splits each MoE layer between the coordinator's
//! CPU and the workers, per the placement.
//!
//! Per layer (DESIGN.md, "The hot path"): the hidden states are quantized once, exactly as the
//! local kernel would quantize them; each involved worker gets ONE message with the rows of the
//! tokens routed to it and their (expert, weight) lists; the local experts are computed while
//! the workers work; the partial sums are added in a fixed order (coordinator, then workers by
//! index), so a run is reproducible. Shares follow the placement fixed at start-up whoever
//! computes them (a replicated expert's node is chosen per call by [`Placement::dispatch`], from
//! the routes alone): a lost worker's share is computed here from the mapped file (same kernels, same
//! quantized inputs: the same numbers, added at the same place in the sum), so the output does not
//! depend on which workers are up. A round trip that fails or misses its deadline marks the worker
//! lost (see [`Member`]); while it is lost no batch is sent to it and nothing waits on it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use moeshard_kernels::moe::{QuantizedInputs, Route, grouped_expert_ffn_quantized};
use moeshard_protocol::data::{ActivationRows, ExpertBatch, WireRoute};

use super::deadline::DeadlineBounds;
use super::member::Member;
use super::net::NetRuntime;
use super::placement::Placement;
use crate::experts::ExpertBackend;
use crate::model::Model;

/// Experts spread over the coordinator (node 0) and workers (nodes 1..).
pub struct ClusterExperts {
    model: Arc<Model>,
    placement: Placement,
    members: Vec<Arc<Member>>,
    runtime: Arc<NetRuntime>,
    step: AtomicU64,
    bounds: DeadlineBounds,
}

impl ClusterExperts {
    /// A backend over `members` (node `i + 1` is `members[i]`) with `placement`; round trips run
    /// on `runtime` with deadlines within `bounds`.
    pub(crate) fn new(
        model: Arc<Model>,
        placement: Placement,
        members: Vec<Arc<Member>>,
        runtime: Arc<NetRuntime>,
        bounds: DeadlineBounds,
    ) -> Self {
        ClusterExperts { model, placement, members, runtime, step: AtomicU64::new(0), bounds }
    }

    /// The workers, in node order (node `i + 1` is element `i`), connected or not.
    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    /// The placement (node 0 = the coordinator, node `i + 1` = `members()[i]`).
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The runtime the links live on.
    pub fn runtime(&self) -> &Arc<NetRuntime> {
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

        let route_experts: Vec<u32> = routes.iter().map(|r| r.expert).collect();
        let mut shares: BTreeMap<usize, NodeShare> = BTreeMap::new();
        for (r, node) in routes.iter().zip(self.placement.dispatch(layer, &route_experts)) {
            let share = shares.entry(node).or_insert_with(|| NodeShare {
                tokens: Vec::new(),
                routes: Vec::new(),
                global: Vec::new(),
            });
            share.global.push(*r);
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
        let mut pending = BTreeMap::new();
        for (&node, share) in shares.iter().filter(|(n, _)| **n > 0) {
            let member = &self.members[node - 1];
            let Some(link) = member.link() else { continue };
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
            let started = Instant::now();
            let deadline = started + member.deadline(share.tokens.len(), self.bounds);
            // Sent from this thread, which drives the runtime (no hand-off to another thread):
            // the stream is written and finished now, the answer read after the local experts.
            let sent = self.runtime.block_on(link.send_batch(&payload, deadline));
            pending.insert(node, (link, sent, started, deadline));
        }

        match shares.get(&0) {
            Some(local) => self.compute_local(layer, &inputs, &local.global, out)?,
            None => out.fill(0.0),
        }

        let mut scratch = vec![0.0f32; out.len()];
        for (&node, share) in shares.iter().filter(|(n, _)| **n > 0) {
            let member = &self.members[node - 1];
            let answered = pending.remove(&node).and_then(|(link, sent, started, deadline)| {
                let result = sent.and_then(|sent| self.runtime.block_on(sent.reply(deadline)));
                match result {
                    Ok((sums, bytes_out, bytes_in))
                        if sums.step == step
                            && sums.layer as usize == layer
                            && sums.n_tokens as usize == share.tokens.len() =>
                    {
                        let rtt = started.elapsed();
                        member.stats().record(layer, bytes_out, bytes_in, share.tokens.len() as u64, rtt);
                        member.observe(share.tokens.len(), rtt);
                        Some(sums)
                    }
                    other => {
                        let why = match other {
                            Err(e) => format!("{e:#}"),
                            Ok(_) => "the reply does not match the batch".to_string(),
                        };
                        member.stats().record_failure();
                        member.lose(&link, &why);
                        None
                    }
                }
            });
            match answered {
                Some(sums) => {
                    for (row, &t) in sums.sums.chunks_exact(n_embd).zip(&share.tokens) {
                        out[t * n_embd..(t + 1) * n_embd].iter_mut().zip(row).for_each(|(o, s)| *o += s);
                    }
                }
                None => {
                    self.compute_local(layer, &inputs, &share.global, &mut scratch)?;
                    out.iter_mut().zip(&scratch).for_each(|(o, s)| *o += s);
                }
            }
        }
        Ok(())
    }
}
