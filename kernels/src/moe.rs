//! Mixture-of-Experts math: router top-k selection and the grouped SwiGLU expert FFN.
//!
//! Follows llama.cpp's `build_moe_ffn` (`src/llama-graph.cpp`) for softmax gating: softmax over
//! all experts in f32, the `k` most probable experts (descending), optionally renormalised so
//! the selected weights sum to 1 (the sum clamped below at 6.103515625e-5, the smallest normal
//! f16), then `sum_k w_k * down_k(silu(gate_k(x)) * up_k(x))`.

use std::collections::BTreeMap;
use std::ops::Range;

use rayon::prelude::*;

use crate::matmul::{Columns, DisjointOut, QMatrix, QuantizedActivations, dot_rows, rows_per_chunk};
use crate::quant::{TILED_MIN_COLS, VecDotType};

/// One (token, expert, weight) triple of a routing decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Route {
    /// Row of the token in the hidden-state batch.
    pub token: u32,
    /// Expert index within the layer, `0..n_expert`.
    pub expert: u32,
    /// Gate weight the expert's output is multiplied by.
    pub weight: f32,
}

/// Softmax gating with top-k selection for a batch of router logits.
///
/// `logits` is `[n_tokens, n_expert]` row-major. Returns the routes token by token, each token's
/// `k` experts in descending probability (ties: lower expert id first), so summing a token's
/// routes in the returned order reproduces llama.cpp's slot order.
pub fn softmax_top_k(logits: &[f32], n_expert: usize, k: usize, renormalize: bool) -> Vec<Route> {
    assert!(k >= 1 && k <= n_expert && logits.len().is_multiple_of(n_expert));
    let mut routes = Vec::with_capacity(logits.len() / n_expert * k);
    let mut probs = vec![0.0f32; n_expert];
    let mut order: Vec<u32> = Vec::with_capacity(n_expert);
    for (t, row) in logits.chunks_exact(n_expert).enumerate() {
        softmax(row, &mut probs);
        order.clear();
        order.extend(0..n_expert as u32);
        order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
        let chosen = &order[..k];
        let scale = if renormalize {
            let sum: f32 = chosen.iter().map(|&e| probs[e as usize]).sum();
            1.0 / sum.max(6.103_515_6e-5)
        } else {
            1.0
        };
        routes.extend(chosen.iter().map(|&e| Route { token: t as u32, expert: e, weight: probs[e as usize] * scale }));
    }
    routes
}

/// Numerically stable softmax of `x` into `out` (max subtracted, sum accumulated in f64 as
/// ggml's `ggml_vec_soft_max_f32` does).
pub fn softmax(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        let e = (v - max).exp();
        *o = e;
        sum += f64::from(e);
    }
    let inv = (1.0 / sum) as f32;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// SiLU (`x * sigmoid(x)`, computed as `x / (1 + e^-x)` like ggml's `ggml_silu_f32`).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The three weight matrices of one SwiGLU expert: `gate` and `up` are `[n_ff, n_embd]`, `down`
/// is `[n_embd, n_ff]` (rows x columns, GGUF layout).
#[derive(Clone, Copy)]
pub struct ExpertFfn<'a> {
    /// `ffn_gate_exps` slice of this expert.
    pub gate: QMatrix<'a>,
    /// `ffn_up_exps` slice of this expert.
    pub up: QMatrix<'a>,
    /// `ffn_down_exps` slice of this expert.
    pub down: QMatrix<'a>,
}

/// A batch of hidden states quantized once per activation type its experts need
/// (`[n_tokens, n_embd]` rows in each type's block layout).
pub struct QuantizedInputs {
    /// Hidden size of each row, in elements.
    pub n_embd: usize,
    /// Rows in the batch.
    pub n_tokens: usize,
    per_type: Vec<QuantizedActivations>,
}

impl QuantizedInputs {
    /// Quantizes `x` (`[n_tokens, n_embd]`) to each of `types` (duplicates are skipped).
    pub fn quantize(x: &[f32], n_embd: usize, types: impl IntoIterator<Item = VecDotType>) -> Self {
        assert!(n_embd > 0 && x.len().is_multiple_of(n_embd));
        let n_tokens = x.len() / n_embd;
        let mut per_type: Vec<QuantizedActivations> = Vec::new();
        for ty in types {
            if per_type.iter().all(|q| q.ty != ty) {
                per_type.push(QuantizedActivations::quantize(ty, x, n_tokens, n_embd));
            }
        }
        QuantizedInputs { n_embd, n_tokens, per_type }
    }

    /// Wraps already quantized rows (e.g. received from the coordinator); each must hold
    /// `n_tokens` rows of `n_embd` elements, one entry per type.
    pub fn from_parts(n_embd: usize, n_tokens: usize, per_type: Vec<QuantizedActivations>) -> Self {
        for q in &per_type {
            assert!(q.cols == n_embd && q.n_rows == n_tokens, "quantized rows do not match the batch shape");
        }
        QuantizedInputs { n_embd, n_tokens, per_type }
    }

    /// The rows quantized to `ty`, if present.
    pub fn get(&self, ty: VecDotType) -> Option<&QuantizedActivations> {
        self.per_type.iter().find(|q| q.ty == ty)
    }

    /// Every type present, with its rows.
    pub fn parts(&self) -> &[QuantizedActivations] {
        &self.per_type
    }

    /// The rows `tokens` of the `ty` copy, as a new batch (bytes copied, no requantization).
    pub fn gather(&self, ty: VecDotType, tokens: &[usize]) -> Option<QuantizedActivations> {
        let all = self.get(ty)?;
        let mut data = Vec::with_capacity(tokens.len() * ty.row_bytes(self.n_embd));
        for &t in tokens {
            data.extend_from_slice(all.row(t));
        }
        Some(QuantizedActivations { ty, n_rows: tokens.len(), cols: self.n_embd, data })
    }
}

/// Errors of [`grouped_expert_ffn_quantized`].
#[derive(Debug, PartialEq, Eq)]
pub enum MoeError {
    /// An expert needs activations in a type the inputs do not carry.
    MissingActivations(VecDotType),
    /// A route names a token outside the batch.
    TokenOutOfRange {
        /// The token row.
        token: u32,
        /// Rows in the batch.
        n_tokens: usize,
    },
}

impl std::fmt::Display for MoeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MoeError::MissingActivations(ty) => write!(f, "the batch carries no {ty:?} activations"),
            MoeError::TokenOutOfRange { token, n_tokens } => {
                write!(f, "route to token {token} of a {n_tokens}-token batch")
            }
        }
    }
}

impl std::error::Error for MoeError {}

/// Runs every routed (token, expert) pair and writes the gate-weighted sums to `out`.
///
/// `x` is `[n_tokens, n_embd]` (the normalised hidden states), `out` is `[n_tokens, n_embd]` and is
/// overwritten: row `t` becomes `sum over routes r with r.token == t (in the order of routes) of
/// r.weight * down(silu(gate(x_t)) * up(x_t))`; tokens with no route get zeros. `expert(e)`
/// returns expert `e`'s matrices. Quantizes `x` once per activation type the routed experts
/// need, then calls [`grouped_expert_ffn_quantized`].
pub fn grouped_expert_ffn<'a>(
    expert: impl Fn(u32) -> ExpertFfn<'a>,
    x: &[f32],
    n_embd: usize,
    routes: &[Route],
    out: &mut [f32],
) {
    assert_eq!(x.len(), out.len());
    let mut types: Vec<VecDotType> = Vec::new();
    for r in routes {
        let ffn = expert(r.expert);
        types.extend([ffn.gate.ty.vec_dot_type(), ffn.up.ty.vec_dot_type()]);
    }
    let inputs = QuantizedInputs::quantize(x, n_embd, types);
    grouped_expert_ffn_quantized(expert, &inputs, routes, out).expect("inputs quantized for every routed expert");
}

/// [`grouped_expert_ffn`] over pre-quantized inputs: the same result, bit for bit, as long as
/// the inputs were quantized from the same f32 rows. Tokens are grouped per expert (ascending
/// expert id), so each expert's weights are read once for all its tokens.
///
/// Two parallel passes over (expert, chunk of weight rows) work items on the current rayon
/// pool, whatever the number of experts: gate and up together with SwiGLU fused
/// (`silu(gate) * up` is written straight into the expert's hidden rows), then down after each
/// expert's hidden rows are quantized once. The gate-weighted sum runs in route order.
pub fn grouped_expert_ffn_quantized<'a>(
    expert: impl Fn(u32) -> ExpertFfn<'a>,
    inputs: &QuantizedInputs,
    routes: &[Route],
    out: &mut [f32],
) -> Result<(), MoeError> {
    let (n_embd, n_tokens) = (inputs.n_embd, inputs.n_tokens);
    assert_eq!(out.len(), n_tokens * n_embd);
    let mut by_expert: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in routes.iter().enumerate() {
        if r.token as usize >= n_tokens {
            return Err(MoeError::TokenOutOfRange { token: r.token, n_tokens });
        }
        by_expert.entry(r.expert).or_default().push(i);
    }
    let groups = by_expert
        .into_iter()
        .map(|(e, route_ids)| ExpertGroup::gather(expert(e), route_ids, routes, inputs))
        .collect::<Result<Vec<_>, _>>()?;

    // Pass 1: hidden[g] = silu(gate(x)) * up(x), `[n_tok, n_ff]` per group.
    let mut hidden: Vec<Vec<f32>> = groups.iter().map(|g| vec![0.0; g.route_ids.len() * g.ffn.gate.rows]).collect();
    let hidden_out: Vec<DisjointOut> = hidden.iter_mut().map(|h| DisjointOut::new(h)).collect();
    let gate_in = map_groups(&groups, n_tokens, |g| Columns::new(&g.ffn.gate, g.gate_rows()));
    let up_in = map_groups(&groups, n_tokens, |g| Columns::new(&g.ffn.up, g.up_rows()));
    work_items(&groups, |g| g.ffn.gate.rows).into_par_iter().for_each(|(gi, rows)| {
        let (g, gate_in, up_in) = (&groups[gi], &gate_in[gi], &up_in[gi]);
        let (n_tok, n_ff) = (g.route_ids.len(), g.ffn.gate.rows);
        // `[n_tok, rows]`: a run of a token's rows is contiguous here as in `hidden`.
        let n_item_rows = rows.len();
        let mut gate = vec![0.0f32; n_item_rows * n_tok];
        dot_rows(&g.ffn.gate, gate_in, rows.clone(), |t, r, vs| {
            gate[t * n_item_rows + r - rows.start..][..vs.len()].copy_from_slice(vs)
        });
        dot_rows(&g.ffn.up, up_in, rows.clone(), |t, r, vs| {
            let gates = &gate[t * n_item_rows + r - rows.start..][..vs.len()];
            let h = gates.iter().zip(vs).map(|(&g, &v)| silu(g) * v);
            // SAFETY: this item alone writes columns `rows` of group `gi`'s hidden rows.
            unsafe { hidden_out[gi].write_run(t * n_ff + r, h) };
        });
    });
    let acts: Vec<QuantizedActivations> = groups
        .par_iter()
        .zip(&hidden)
        .map(|(g, h)| {
            QuantizedActivations::quantize(g.ffn.down.ty.vec_dot_type(), h, g.route_ids.len(), g.ffn.gate.rows)
        })
        .collect();

    // Pass 2: results[route] = down(hidden), one `n_embd` row per route.
    let mut results = vec![0.0f32; routes.len() * n_embd];
    let results_out = DisjointOut::new(&mut results);
    let with_acts: Vec<_> = groups.iter().zip(&acts).collect();
    let act_rows =
        map_groups(&with_acts, n_tokens, |(g, a)| Columns::new(&g.ffn.down, (0..a.n_rows).map(|t| a.row(t)).collect()));
    work_items(&groups, |g| g.ffn.down.rows).into_par_iter().for_each(|(gi, rows)| {
        let g = &groups[gi];
        dot_rows(&g.ffn.down, &act_rows[gi], rows, |t, r, vs| {
            // SAFETY: each route belongs to one group, and this item alone writes columns `rows`.
            unsafe { results_out.write_run(g.route_ids[t] * n_embd + r, vs.iter().copied()) };
        });
    });

    out.fill(0.0);
    for (r, partial) in routes.iter().zip(results.chunks_exact(n_embd)) {
        let t = r.token as usize;
        for (o, &p) in out[t * n_embd..(t + 1) * n_embd].iter_mut().zip(partial) {
            *o += p * r.weight;
        }
    }
    Ok(())
}

/// One expert's share of a batch: its matrices, its routes (indices into the route list, in
/// order) and their token rows gathered in the activation types of gate and up.
struct ExpertGroup<'a> {
    ffn: ExpertFfn<'a>,
    route_ids: Vec<usize>,
    gate_in: QuantizedActivations,
    /// `None` when up takes the same activation type as gate.
    up_in: Option<QuantizedActivations>,
}

impl<'a> ExpertGroup<'a> {
    fn gather(
        ffn: ExpertFfn<'a>,
        route_ids: Vec<usize>,
        routes: &[Route],
        inputs: &QuantizedInputs,
    ) -> Result<Self, MoeError> {
        let tokens: Vec<usize> = route_ids.iter().map(|&i| routes[i].token as usize).collect();
        let gate_ty = ffn.gate.ty.vec_dot_type();
        let gate_in = inputs.gather(gate_ty, &tokens).ok_or(MoeError::MissingActivations(gate_ty))?;
        let up_ty = ffn.up.ty.vec_dot_type();
        let up_in = match up_ty == gate_ty {
            true => None,
            false => Some(inputs.gather(up_ty, &tokens).ok_or(MoeError::MissingActivations(up_ty))?),
        };
        Ok(ExpertGroup { ffn, route_ids, gate_in, up_in })
    }

    fn gate_rows(&self) -> Vec<&[u8]> {
        (0..self.gate_in.n_rows).map(|t| self.gate_in.row(t)).collect()
    }

    fn up_rows(&self) -> Vec<&[u8]> {
        let up = self.up_in.as_ref().unwrap_or(&self.gate_in);
        (0..up.n_rows).map(|t| up.row(t)).collect()
    }
}

/// `f` of every item in order: on the current rayon pool for batches of at least
/// [`TILED_MIN_COLS`] tokens, whose groups may be laid out for the tiled kernels; on this thread
/// otherwise (decoding), where a parallel pass would cost more than the work.
fn map_groups<'a, T: Sync, R: Send>(items: &'a [T], n_tokens: usize, f: impl Fn(&'a T) -> R + Sync + Send) -> Vec<R> {
    match n_tokens >= TILED_MIN_COLS {
        true => items.par_iter().map(f).collect(),
        false => items.iter().map(f).collect(),
    }
}

/// (group index, weight rows) work items covering `rows(group)` rows of every group, in chunks
/// of [`rows_per_chunk`].
fn work_items(groups: &[ExpertGroup], rows: impl Fn(&ExpertGroup) -> usize) -> Vec<(usize, Range<usize>)> {
    let mut items = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let n = rows(g);
        let chunk = rows_per_chunk(n);
        items.extend((0..n.div_ceil(chunk)).map(|c| (gi, c * chunk..((c + 1) * chunk).min(n))));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GgmlType;

    #[test]
    fn top_k_renormalises_and_orders() {
        let logits = [0.0, 2.0, 1.0, 3.0, /* token 1 */ 5.0, 5.0, 0.0, 0.0];
        let routes = softmax_top_k(&logits, 4, 2, true);
        assert_eq!(routes.iter().map(|r| (r.token, r.expert)).collect::<Vec<_>>(), [(0, 3), (0, 1), (1, 0), (1, 1)]);
        let w0 = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((routes[0].weight - w0).abs() < 1e-6);
        assert!((routes[0].weight + routes[1].weight - 1.0).abs() < 1e-6);
        assert!((routes[2].weight - 0.5).abs() < 1e-6);
        let raw = softmax_top_k(&logits, 4, 2, false);
        let p = [0.0f32, 2.0, 1.0, 3.0].map(f32::exp);
        let s: f32 = p.iter().sum();
        assert!((raw[0].weight - p[3] / s).abs() < 1e-6);
    }

    /// Plain f64 reference: dequantize everything, loop.
    fn reference_ffn(w: &[Vec<f32>; 3], x: &[f32], n_embd: usize, n_ff: usize) -> Vec<f64> {
        let [g, u, d] = w;
        let dot = |m: &[f32], r: usize, v: &[f64]| -> f64 {
            m[r * v.len()..(r + 1) * v.len()].iter().zip(v).map(|(&a, b)| f64::from(a) * b).sum()
        };
        let xv: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let h: Vec<f64> = (0..n_ff)
            .map(|r| {
                let gv = dot(g, r, &xv);
                gv / (1.0 + (-gv).exp()) * dot(u, r, &xv)
            })
            .collect();
        (0..n_embd).map(|r| dot(d, r, &h)).collect()
    }

    #[test]
    fn grouped_ffn_matches_reference_f32() {
        let (n_embd, n_ff, n_expert) = (8usize, 6usize, 3usize);
        let mut seed = 12345u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.8
        };
        let experts: Vec<[Vec<f32>; 3]> = (0..n_expert)
            .map(|_| {
                [
                    (0..n_ff * n_embd).map(|_| rnd()).collect(),
                    (0..n_ff * n_embd).map(|_| rnd()).collect(),
                    (0..n_embd * n_ff).map(|_| rnd()).collect(),
                ]
            })
            .collect();
        let bytes: Vec<[Vec<u8>; 3]> =
            experts.iter().map(|e| e.clone().map(|m| m.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
        let x: Vec<f32> = (0..3 * n_embd).map(|_| rnd() * 3.0).collect();
        let routes = vec![
            Route { token: 0, expert: 2, weight: 0.7 },
            Route { token: 0, expert: 0, weight: 0.3 },
            Route { token: 2, expert: 2, weight: 1.0 },
        ];
        let mut out = vec![1.0f32; x.len()];
        grouped_expert_ffn(
            |e| {
                let b = &bytes[e as usize];
                ExpertFfn {
                    gate: QMatrix::new(GgmlType::F32, n_ff, n_embd, &b[0]),
                    up: QMatrix::new(GgmlType::F32, n_ff, n_embd, &b[1]),
                    down: QMatrix::new(GgmlType::F32, n_embd, n_ff, &b[2]),
                }
            },
            &x,
            n_embd,
            &routes,
            &mut out,
        );
        let mut want = vec![0.0f64; x.len()];
        for r in &routes {
            let t = r.token as usize;
            let y = reference_ffn(&experts[r.expert as usize], &x[t * n_embd..(t + 1) * n_embd], n_embd, n_ff);
            for (w, v) in want[t * n_embd..(t + 1) * n_embd].iter_mut().zip(y) {
                *w += f64::from(r.weight) * v;
            }
        }
        for (a, b) in out.iter().zip(&want) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(out[n_embd..2 * n_embd].iter().all(|v| *v == 0.0), "unrouted token must be zero");
    }
}
