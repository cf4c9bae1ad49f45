//! A plain, slow reference implementation of the Mellum / Qwen3-MoE forward pass, used to check
//! the optimized path (`moeshard::model::Model::forward`); the checks are in [`tests`].
//!
//! The spec is llama.cpp's graph (`src/models/mellum.cpp`, `src/models/qwen3moe.cpp`). Every
//! weight is dequantized to f32 once, up front, with `GgmlType::dequantize_row`; that, the
//! hyperparameters of `ModelConfig` and (when activation rounding is modelled)
//! `VecDotType::quantize_row` are all this shares with the optimized path. Everything else is
//! straightforward f64 loops written here:
//!
//! - per layer: `x -> RMSNorm(attn_norm) -> q, k, v = W x -> per-head RMSNorm of q (attn_q_norm)
//!   and k (attn_k_norm) -> NeoX RoPE (pairs i, i + head_dim/2), YaRN on full-attention layers
//!   -> causal GQA attention (query head h reads KV head h / (n_head / n_head_kv)), scale
//!   1/sqrt(head_dim), sliding window on SWA layers -> attn_output -> residual`;
//! - then `RMSNorm(ffn_norm) -> router logits -> softmax over all experts -> top n_expert_used
//!   (ties: lower id first) -> renormalise to sum 1 -> sum_k w_k down_k(silu(gate_k h) * up_k h)
//!   -> residual`;
//! - final `RMSNorm(output_norm) -> output` (LM head).
//!
//! Hyperparameters come from `ModelConfig`, except where llama.cpp ignores a key moeshard reads:
//! RoPE base and YaRN magnitude are llama.cpp's (see [`Reference::new`]); the values agree on
//! every fixture.
//!
//! There is no KV cache: the whole prefix is run layer by layer, and every query attends over
//! the keys of every visible position, recomputed from scratch.
//!
//! **Activation rounding.** With `quantize_activations`, each matrix input row is rounded as
//! llama.cpp's CPU `mul_mat` rounds it before a quantized dot product: to the weight type's
//! `vec_dot_type()` (Q8_0 / Q8_1 / Q8_K; f16 / bf16) and back, `value = d * q`. That is the only
//! deliberate precision loss of the optimized path. It is discontinuous: an input element
//! within a hair of a rounding boundary (half a quantization step) may round one way here (f64
//! inputs) and the other way in the optimized path (f32 inputs, ~3e-7 relative away), a
//! difference of one step that attention can spread to 1e-2 of the logits. The same holds for
//! the f16 block scale `d` of Q8_0 / Q8_1 (`amax / 127` rounded to f16). The reference therefore
//! records such *rounding ties* ([`Tie`]: an element within [`TIE_MARGIN`] steps of a rounding
//! boundary, or a scale within [`SCALE_TIE_MARGIN`] f16 ulps of one) and can be told to round any
//! of them the other way ([`Overrides::flips`]). Likewise, router decisions at near-ties can be
//! forced ([`Overrides::experts`]).

mod tests;

use std::collections::{HashMap, HashSet};

use moeshard::model::{MatrixRef, Model, ModelConfig};
use moeshard_kernels::quant::{GgmlType, VecDotType};

/// An element is recorded as a [`Tie`] when it lies within this many quantization steps of a
/// rounding boundary. The optimized path's f32 inputs differ from the reference's by ~3e-7
/// relative (up to ~1e-6 after long attention sums), i.e. by up to ~1.3e-4 steps for the largest
/// element of a block (127 steps); the flips seen had margins of 1e-7 to 1.0e-4 steps.
pub const TIE_MARGIN: f64 = 3e-4;

/// A Q8_0 / Q8_1 block scale `d` is recorded as a [`Tie`] when `amax / 127` lies within this many
/// f16 ulps of an f16 rounding boundary: 1e-6 relative noise is ~2e-3 ulps (2^-11 relative); the
/// flips seen had margins of 0 to 4e-4 ulps (amax / 127 exactly halfway happens: it has 24
/// significant bits, f16 keeps 11).
pub const SCALE_TIE_MARGIN: f64 = 1e-2;

/// Which matrix input of a (layer, position) is rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// `attn_norm` output, the input of Q, K and V.
    Attn,
    /// Attention output, the input of `attn_output`.
    AttnOut,
    /// `ffn_norm` output, the input of the router.
    Router,
    /// `ffn_norm` output, the input of every expert's gate and up projections.
    Experts,
    /// Expert `e`'s `silu(gate) * up`, the input of its down projection.
    Down(usize),
    /// `output_norm` output, the input of the LM head (layer = `n_layer`).
    LmHead,
}

/// One activation element that lies within [`TIE_MARGIN`] steps of a rounding boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tie {
    /// Layer (`n_layer` for the LM head).
    pub layer: usize,
    /// Token position.
    pub pos: usize,
    /// Which input.
    pub site: Site,
    /// The type it is rounded to. One input may be rounded to several (Q4_K queries and Q8_0 keys
    /// see Q8_K and Q8_0 roundings of the same row); where their steps coincide (the 32-block
    /// holds the row's largest element), so do their boundaries, and such ties flip together.
    pub ty: VecDotType,
    /// The element, or block scale, in the row.
    pub what: TieAt,
}

/// What a [`Tie`] rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TieAt {
    /// Element `i` of the row.
    Element(usize),
    /// The f16 scale `d` of block `b`.
    Scale(usize),
}

/// Decisions imposed on the reference where it is legitimately ambiguous.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Rounding ties to round the other way.
    pub flips: HashSet<Tie>,
    /// `(layer, position)` -> the experts to use instead of the reference's top-k.
    pub experts: HashMap<(usize, usize), Vec<usize>>,
}

/// A weight matrix dequantized to f32 (`rows` rows of `cols`), with the type llama.cpp converts
/// its inputs to.
pub struct Matrix {
    cols: usize,
    data: Vec<f32>,
    act: VecDotType,
}

impl Matrix {
    /// Dequantizes `m` from the model's mapped file.
    pub fn load(model: &Model, m: &MatrixRef) -> Matrix {
        let bytes = &model.gguf().data()[m.offset..m.offset + m.n_bytes()];
        let mut data = vec![0.0f32; m.rows * m.cols];
        for (dst, src) in data.chunks_exact_mut(m.cols).zip(bytes.chunks_exact(m.row_bytes())) {
            m.ty.dequantize_row(src, dst);
        }
        Matrix { cols: m.cols, data, act: m.ty.vec_dot_type() }
    }

    /// Row `r` as f64.
    pub fn row(&self, r: usize) -> Vec<f64> {
        self.data[r * self.cols..(r + 1) * self.cols].iter().map(|&w| f64::from(w)).collect()
    }

    /// `W x` in f64.
    pub fn mul(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.cols);
        self.data.chunks_exact(self.cols).map(|w| w.iter().zip(x).map(|(&w, &x)| f64::from(w) * x).sum()).collect()
    }
}

/// Rounds matrix inputs (or not), recording ties and applying flips.
struct Rounder<'a> {
    on: bool,
    flips: &'a HashSet<Tie>,
    ties: Vec<(Tie, f64)>,
    seen: HashSet<Tie>,
}

impl Rounder<'_> {
    /// `x` as the dot products of a `ty` matmul see it: converted to f32, quantized with
    /// `VecDotType::quantize_row`, decoded as `d * q` (Q8_0: f16 d, 32 i8; Q8_1: f16 d, f16 s,
    /// 32 i8; Q8_K: f32 d, 256 i8, 16 i16 sums). Elements within [`TIE_MARGIN`] of a rounding
    /// boundary are recorded, and rounded to the other neighbour when listed in `flips`.
    fn round(&mut self, ty: VecDotType, x: &[f64], layer: usize, pos: usize, site: Site) -> Vec<f64> {
        if !self.on || ty == VecDotType::F32 {
            return x.to_vec();
        }
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut bytes = vec![0u8; ty.row_bytes(x.len())];
        ty.quantize_row(&x32, &mut bytes);
        let mut out = vec![0.0f32; x.len()];
        let (block, block_bytes, qs_at) = match ty {
            VecDotType::F32 => unreachable!(),
            VecDotType::F16 | VecDotType::BF16 => {
                let t = if ty == VecDotType::F16 { GgmlType::F16 } else { GgmlType::BF16 };
                t.dequantize_row(&bytes, &mut out);
                return out.into_iter().map(f64::from).collect();
            }
            VecDotType::Q8_0 => (32, 34, 2),
            VecDotType::Q8_1 => (32, 36, 4),
            VecDotType::Q8_K => (256, 292, 4),
        };
        let mut result = vec![0.0f64; x.len()];
        let mut tie = |what: TieAt, margin: f64| {
            let tie = Tie { layer, pos, site, ty, what };
            if self.seen.insert(tie) {
                self.ties.push((tie, margin));
            }
            self.flips.contains(&tie)
        };
        for (bi, (b, xb)) in bytes.chunks_exact(block_bytes).zip(x32.chunks_exact(block)).enumerate() {
            let max = xb.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = match ty {
                VecDotType::Q8_K => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                _ => {
                    let d = half::f16::from_le_bytes([b[0], b[1]]);
                    // The f16 neighbours of the exact scale amax / 127 and their midpoint.
                    let exact = f64::from(max.abs() / 127.0);
                    let (lo, hi) = if f64::from(d.to_f32()) <= exact {
                        (d, half::f16::from_bits(d.to_bits() + 1))
                    } else {
                        (half::f16::from_bits(d.to_bits() - 1), d)
                    };
                    let (lo, hi) = (f64::from(lo.to_f32()), f64::from(hi.to_f32()));
                    let margin = (exact - (lo + hi) / 2.0).abs() / (hi - lo);
                    let d = f64::from(d.to_f32());
                    if max != 0.0 && margin < SCALE_TIE_MARGIN && tie(TieAt::Scale(bi), margin / SCALE_TIE_MARGIN) {
                        if d == lo { hi } else { lo }
                    } else {
                        d
                    }
                }
            };
            // The factor the quantizer multiplies by: 127 / amax (Q8_0, Q8_1) or -127 / max
            // (Q8_K, max = the element of largest magnitude, with its sign).
            let inv_step = match (ty, max == 0.0) {
                (_, true) => 0.0,
                (VecDotType::Q8_K, _) => -127.0 / f64::from(max),
                _ => 127.0 / f64::from(max.abs()),
            };
            for (i, (&v, &q)) in xb.iter().zip(&b[qs_at..qs_at + block]).enumerate() {
                let (y, mut q) = (f64::from(v) * inv_step, f64::from(q as i8));
                let margin = 0.5 - (y - q).abs();
                if margin < TIE_MARGIN && tie(TieAt::Element(bi * block + i), margin / TIE_MARGIN) {
                    q += (y - q).signum();
                }
                result[bi * block + i] = d * q;
            }
        }
        result
    }
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * w).collect()
}

/// SiLU: `x * sigmoid(x)`.
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Softmax (max subtracted).
pub fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Rotary embedding of one layer, NeoX layout, with optional YaRN (Peng et al. 2023, in ggml's
/// form: `rope_yarn` in `ggml-cpu/ops.cpp`, `ggml_rope_yarn_corr_dims` in `ggml.c`).
#[derive(Clone, Copy, Debug)]
pub struct RopeRef {
    dims: usize,
    base: f64,
    yarn: Option<YarnRef>,
}

/// YaRN parameters of a [`RopeRef`], with the correction range resolved.
#[derive(Clone, Copy, Debug)]
struct YarnRef {
    /// Context extension factor; interpolated angles are divided by it.
    factor: f64,
    /// Pair index where the ramp from extrapolation to interpolation starts.
    low: f64,
    /// Pair index where it ends.
    high: f64,
    /// Magnitude applied to cos and sin.
    mscale: f64,
}

impl RopeRef {
    /// Plain RoPE over `dims` dimensions with base frequency `base`.
    pub fn plain(dims: usize, base: f64) -> RopeRef {
        RopeRef { dims, base, yarn: None }
    }

    /// YaRN RoPE. The correction range is the pair indices whose wavelength makes `beta_fast`
    /// (resp. `beta_slow`) rotations over the original context,
    /// `c(beta) = dims * ln(orig_ctx / (2 pi beta)) / (2 ln base)`: `low = max(0, floor(c(beta_fast)))`,
    /// `high = min(dims - 1, ceil(c(beta_slow)))`. `mscale` multiplies cos and sin.
    pub fn yarn(dims: usize, base: f64, factor: f64, orig_ctx: f64, beta: (f64, f64), mscale: f64) -> RopeRef {
        let c = |beta: f64| dims as f64 * (orig_ctx / (2.0 * std::f64::consts::PI * beta)).ln() / (2.0 * base.ln());
        let low = c(beta.0).floor().max(0.0);
        let high = c(beta.1).ceil().min(dims as f64 - 1.0);
        RopeRef { dims, base, yarn: Some(YarnRef { factor, low, high, mscale }) }
    }

    /// Rotates one head in place for position `pos`: pair `(i, i + dims/2)` by
    /// `theta_i = pos * base^(-2i/dims)`. With YaRN the angle is
    /// `theta_i / factor * (1 - r) + theta_i * r` with the ramp
    /// `r = 1 - clamp((i - low) / max(0.001, high - low), 0, 1)` (fast-rotating pairs below `low`
    /// extrapolate, slow ones above `high` interpolate), and the pair is scaled by `mscale`.
    pub fn apply(&self, head: &mut [f64], pos: usize) {
        let half = self.dims / 2;
        for i in 0..half {
            let extrap = pos as f64 * self.base.powf(-2.0 * i as f64 / self.dims as f64);
            let (theta, m) = match self.yarn {
                None => (extrap, 1.0),
                Some(y) => {
                    let r = 1.0 - ((i as f64 - y.low) / (y.high - y.low).max(0.001)).clamp(0.0, 1.0);
                    (extrap / y.factor * (1.0 - r) + extrap * r, y.mscale)
                }
            };
            let (c, s) = (theta.cos() * m, theta.sin() * m);
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = a * s + b * c;
        }
    }
}

struct Expert {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

struct Layer {
    attn_norm: Vec<f64>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    q_norm: Vec<f64>,
    k_norm: Vec<f64>,
    ffn_norm: Vec<f64>,
    router: Matrix,
    experts: Vec<Expert>,
    rope: RopeRef,
    /// Sliding window of a SWA layer.
    window: Option<usize>,
}

/// The reference model: every weight dequantized to f32, computed in f64.
pub struct Reference {
    config: ModelConfig,
    tok_embd: Matrix,
    output_norm: Vec<f64>,
    output: Matrix,
    layers: Vec<Layer>,
    quantize_activations: bool,
}

/// What [`Reference::forward`] returns.
pub struct RefOutput {
    /// `[position][n_vocab]` logits.
    pub logits: Vec<Vec<f64>>,
    /// `[layer][position]`: the MoE input (`ffn_norm` output).
    pub moe_input: Vec<Vec<Vec<f64>>>,
    /// `[layer][position]`: the experts used, in descending router probability.
    pub experts: Vec<Vec<Vec<usize>>>,
    /// `[layer][position]`: the router's softmax over all experts.
    pub router_probs: Vec<Vec<Vec<f64>>>,
    /// Rounding ties met, with their margin as a fraction of the tie threshold, in the order met
    /// (layer by layer). Empty without activation rounding.
    pub ties: Vec<(Tie, f64)>,
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

impl Reference {
    /// Dequantizes every weight of `model`. With `quantize_activations`, matrix inputs are rounded
    /// as llama.cpp rounds them (see the module docs).
    pub fn new(model: &Model, quantize_activations: bool) -> Reference {
        let c = &model.config;
        // RoPE as llama.cpp's graph applies it: `freq_base` on every layer (mellum.cpp passes it to
        // the sliding layers too; `rope.freq_base_swa` is loaded but unused), YaRN on the others
        // with the magnitude llama.cpp ends up with, `0.1 ln(factor) + 1` (llama-context.cpp sets
        // it from the factor; the GGUF `rope.scaling.yarn_attn_factor` is never read, and
        // `rope.scaling.attn_factor`, a further factor, is absent from every fixture).
        let base = f64::from(c.rope_full.freq_base);
        let rope_of = |il: usize| match (c.is_swa(il), c.rope_full.yarn) {
            (false, Some(y)) => {
                let factor = f64::from(y.factor);
                let mscale = if factor > 1.0 { 0.1 * factor.ln() + 1.0 } else { 1.0 };
                let beta = (f64::from(y.beta_fast), f64::from(y.beta_slow));
                RopeRef::yarn(c.head_dim, base, factor, f64::from(y.original_context), beta, mscale)
            }
            _ => RopeRef::plain(c.head_dim, base),
        };
        let layers = model
            .layers
            .iter()
            .enumerate()
            .map(|(il, l)| Layer {
                attn_norm: f64s(&l.attn_norm),
                q: Matrix::load(model, &l.attn_q),
                k: Matrix::load(model, &l.attn_k),
                v: Matrix::load(model, &l.attn_v),
                o: Matrix::load(model, &l.attn_output),
                q_norm: f64s(&l.attn_q_norm),
                k_norm: f64s(&l.attn_k_norm),
                ffn_norm: f64s(&l.ffn_norm),
                router: Matrix::load(model, &l.ffn_gate_inp),
                experts: (0..c.n_expert)
                    .map(|e| Expert {
                        gate: Matrix::load(model, &l.ffn_gate_exps.expert(e)),
                        up: Matrix::load(model, &l.ffn_up_exps.expert(e)),
                        down: Matrix::load(model, &l.ffn_down_exps.expert(e)),
                    })
                    .collect(),
                rope: rope_of(il),
                window: c.sliding_window.filter(|_| c.is_swa(il)),
            })
            .collect();
        Reference {
            config: c.clone(),
            tok_embd: Matrix::load(model, &model.tok_embd),
            output_norm: f64s(&model.output_norm),
            output: Matrix::load(model, &model.output),
            layers,
            quantize_activations,
        }
    }

    /// Runs `tokens` (positions `0..tokens.len()`) with the decisions in `ov` imposed.
    pub fn forward(&self, tokens: &[u32], ov: &Overrides) -> RefOutput {
        let c = &self.config;
        let (n, hd, eps) = (tokens.len(), c.head_dim, f64::from(c.rms_eps));
        let group = c.n_head / c.n_head_kv;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut r = Rounder { on: self.quantize_activations, flips: &ov.flips, ties: Vec::new(), seen: HashSet::new() };
        let (mut moe_input, mut experts, mut router_probs) = (Vec::new(), Vec::new(), Vec::new());
        let mut x: Vec<Vec<f64>> = tokens.iter().map(|&t| self.tok_embd.row(t as usize)).collect();

        for (il, l) in self.layers.iter().enumerate() {
            // Q, K, V of every position, normed per head and rotated.
            let (mut q, mut k, mut v) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
            for (pos, xt) in x.iter().enumerate() {
                let h = rms_norm(xt, &l.attn_norm, eps);
                let mut proj = |m: &Matrix| m.mul(&r.round(m.act, &h, il, pos, Site::Attn));
                let (mut qt, mut kt, vt) = (proj(&l.q), proj(&l.k), proj(&l.v));
                for (heads, norm) in [(&mut qt, &l.q_norm), (&mut kt, &l.k_norm)] {
                    for head in heads.chunks_exact_mut(hd) {
                        let normed = rms_norm(head, norm, eps);
                        head.copy_from_slice(&normed);
                        l.rope.apply(head, pos);
                    }
                }
                q.push(qt);
                k.push(kt);
                v.push(vt);
            }

            let (mut inputs, mut chosen_of, mut probs_of) = (Vec::new(), Vec::new(), Vec::new());
            for (t, xt) in x.iter_mut().enumerate() {
                // Causal attention; on SWA layers key p is visible from query t iff t - p < window.
                let first = l.window.map_or(0, |w| (t + 1).saturating_sub(w));
                let mut attn = vec![0.0f64; c.n_head * hd];
                for h in 0..c.n_head {
                    let g = h / group;
                    let qh = &q[t][h * hd..(h + 1) * hd];
                    let scores: Vec<f64> = (first..=t)
                        .map(|p| qh.iter().zip(&k[p][g * hd..(g + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() * scale)
                        .collect();
                    let out = &mut attn[h * hd..(h + 1) * hd];
                    for (p, w) in (first..=t).zip(softmax(&scores)) {
                        for (o, vv) in out.iter_mut().zip(&v[p][g * hd..(g + 1) * hd]) {
                            *o += w * vv;
                        }
                    }
                }
                let attn_out = l.o.mul(&r.round(l.o.act, &attn, il, t, Site::AttnOut));
                xt.iter_mut().zip(attn_out).for_each(|(a, b)| *a += b);

                // Mixture of experts.
                let h = rms_norm(xt, &l.ffn_norm, eps);
                let probs = softmax(&l.router.mul(&r.round(l.router.act, &h, il, t, Site::Router)));
                let chosen = match ov.experts.get(&(il, t)) {
                    Some(forced) => forced.clone(),
                    None => {
                        let mut order: Vec<usize> = (0..c.n_expert).collect();
                        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
                        order.truncate(c.n_expert_used);
                        order
                    }
                };
                let total: f64 = chosen.iter().map(|&e| probs[e]).sum();
                let mut moe = vec![0.0f64; c.n_embd];
                for &e in &chosen {
                    let ex = &l.experts[e];
                    let gate = ex.gate.mul(&r.round(ex.gate.act, &h, il, t, Site::Experts));
                    let up = ex.up.mul(&r.round(ex.up.act, &h, il, t, Site::Experts));
                    let act: Vec<f64> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
                    let down = ex.down.mul(&r.round(ex.down.act, &act, il, t, Site::Down(e)));
                    moe.iter_mut().zip(down).for_each(|(m, d)| *m += probs[e] / total * d);
                }
                xt.iter_mut().zip(moe).for_each(|(a, b)| *a += b);
                inputs.push(h);
                chosen_of.push(chosen);
                probs_of.push(probs);
            }
            moe_input.push(inputs);
            experts.push(chosen_of);
            router_probs.push(probs_of);
        }

        let logits = (x.iter().enumerate())
            .map(|(t, xt)| {
                let h = rms_norm(xt, &self.output_norm, eps);
                self.output.mul(&r.round(self.output.act, &h, c.n_layer, t, Site::LmHead))
            })
            .collect();
        RefOutput { logits, moe_input, experts, router_probs, ties: r.ties }
    }
}
