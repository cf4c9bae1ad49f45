//! The optimized forward pass (`Session::eval`, f32 KV cache, local experts) against
//! [`super::Reference`].
//!
//! Compared: the logits of every position and, through a recording expert backend, the MoE input
//! (`ffn_norm` output) and the selected experts of every layer and position. The first
//! disagreement in computation order (position by position, layer by layer, logits last) must be
//! one of two legitimate ambiguities; it is resolved the optimized path's way and the comparison
//! redone:
//! - a router near-tie: the optimized path picked another top-k set, one that is a top-k set up
//!   to probability differences below `tie_gap` (f32 noise on router probabilities is ~1e-8);
//! - activation rounding ties ([`super::Tie`]): rounding one element (or block scale), or two, the
//!   other way in the reference removes the disagreement (of the ties that reach it, the one
//!   after which the reference agrees longest).
//!
//! At most [`MAX_RESOLVED`] resolutions are allowed (measured: 0 to 3 per 40 tokens, 0 to 12 per
//! 200), so a real bug, which disagrees at most positions, cannot be explained away. Then every
//! value must agree within:
//! - f32 files: 1e-4 absolute. The optimized path computes in f32 (dot products of up to `n_embd`
//!   terms, softmax, norms, RoPE tables), ~1e-7 relative per operation; the measured max |logit
//!   diff| is 4e-6 over 40 tokens on logits up to ~14, 25x below. Over the 623-token text, error
//!   grows with the attention sums over hundreds of keys: that test allows 3e-4 (measured 1.8e-5).
//! - quantized files (activation rounding modelled, ties resolved): 1e-4 of the largest |logit|
//!   (~1.3e-3). What remains is f32 accumulation, measured <= 4.1e-6 (3e-7 relative); a rounding
//!   tie moves logits by 3e-4 to 1e-1 (those below the tolerance stay unresolved), and dropping the
//!   activation rounding from the reference costs 1e-2 and more.
//! - MoE inputs: the same tolerance, relative ones scaled by the layer's largest |input|.

use std::sync::{Arc, Mutex};

use moeshard::experts::{ExpertBackend, LocalExperts};
use moeshard::kv_cache::KvType;
use moeshard::model::{Logits, Model};
use moeshard::session::Session;
use moeshard_kernels::moe::Route;
use rayon::prelude::*;

use super::{Overrides, RefOutput, Reference, Site, Tie};
use crate::util::{model_path, reference, u32s};

/// Tokens compared (more than every fixture's sliding window: 16 or 32).
const N_TOKENS: usize = 40;
/// At most this many ambiguities may be resolved in one comparison.
const MAX_RESOLVED: usize = 10;
/// Rounding ties tried per disagreement (nearest first).
const MAX_CANDIDATES: usize = 512;

/// How closely the optimized path must follow the reference.
#[derive(Clone, Copy)]
struct Tolerance {
    /// Max |diff| of logits: absolute, or relative to the largest |reference logit| (and of MoE
    /// inputs, relative to the layer's largest |input|) when `relative`.
    value: f64,
    relative: bool,
    /// Router probability gap under which the k-th and (k+1)-th experts are a near-tie.
    tie_gap: f64,
}

const F32: Tolerance = Tolerance { value: 1e-4, relative: false, tie_gap: 1e-5 };
const QUANT: Tolerance = Tolerance { value: 1e-4, relative: true, tie_gap: 1e-4 };

/// One `moe_forward` call: layer, hidden states, routes.
type MoeCall = (usize, Vec<f32>, Vec<Route>);

/// Local experts that also record what the optimized path hands them (the MoE input and the
/// routing decision of every layer), so these intermediates can be compared with the reference.
struct Recorder {
    inner: LocalExperts,
    calls: Mutex<Vec<MoeCall>>,
}

impl ExpertBackend for Recorder {
    fn moe_forward(&self, layer: usize, hidden: &[f32], routes: &[Route], out: &mut [f32]) -> anyhow::Result<()> {
        self.calls.lock().expect("lock").push((layer, hidden.to_vec(), routes.to_vec()));
        self.inner.moe_forward(layer, hidden, routes, out)
    }
}

/// What the optimized path computed.
struct Optimized {
    /// `[position * n_vocab + token]`.
    logits: Vec<f32>,
    /// `[layer][position]`: MoE input.
    moe_input: Vec<Vec<Vec<f32>>>,
    /// `[layer][position]`: the experts used.
    experts: Vec<Vec<Vec<usize>>>,
}

fn load(name: &str) -> Arc<Model> {
    Arc::new(Model::load(model_path(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
}

fn session(model: &Arc<Model>, experts: Arc<dyn ExpertBackend>, n_ctx: usize) -> Session {
    Session::new(model.clone(), experts, n_ctx, KvType::F32, KvType::F32).expect("session")
}

/// The first `n` tokens of the fixture's first teacher-forced text.
fn tokens(name: &str, n: usize) -> Vec<u32> {
    let all = u32s(&reference(name)["teacher_forced"][0]["tokens"]);
    assert!(all.len() >= n, "{name}: only {} teacher-forced tokens", all.len());
    all[..n].to_vec()
}

/// Evaluates `tokens` in one call (context `max(64, n)`) with a recording backend.
fn run_optimized(model: &Arc<Model>, tokens: &[u32]) -> Optimized {
    let (n, n_embd, n_layer) = (tokens.len(), model.config.n_embd, model.config.n_layer);
    let recorder = Arc::new(Recorder { inner: LocalExperts::new(model.clone()), calls: Mutex::new(Vec::new()) });
    let logits = session(model, recorder.clone(), n.max(64)).eval(tokens, Logits::All).expect("eval");
    assert_eq!(logits.len(), n * model.config.n_vocab);
    let mut moe_input = vec![vec![Vec::new(); n]; n_layer];
    let mut experts = vec![vec![Vec::new(); n]; n_layer];
    let mut next_pos = vec![0; n_layer];
    for (il, hidden, routes) in recorder.calls.lock().expect("lock").iter() {
        let pos0 = next_pos[*il];
        for (t, row) in hidden.chunks_exact(n_embd).enumerate() {
            moe_input[*il][pos0 + t] = row.to_vec();
        }
        for r in routes {
            experts[*il][pos0 + r.token as usize].push(r.expert as usize);
        }
        next_pos[*il] += hidden.len() / n_embd;
    }
    assert!(next_pos.iter().all(|&p| p == n), "MoE calls cover {next_pos:?} of {n} positions");
    Optimized { logits, moe_input, experts }
}

fn max_abs_diff(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (&a, &b)| m.max((a - f64::from(b)).abs()))
}

fn max_abs(rows: &[Vec<f64>]) -> f64 {
    rows.iter().flatten().fold(0.0, |m, v| m.max(v.abs()))
}

/// Absolute tolerances: `(per layer for MoE inputs, for logits)`.
fn abs_tolerances(want: &RefOutput, tol: Tolerance) -> (Vec<f64>, f64) {
    let scaled = |scale: f64| if tol.relative { tol.value * scale.max(1.0) } else { tol.value };
    (want.moe_input.iter().map(|l| scaled(max_abs(l))).collect(), scaled(max_abs(&want.logits)))
}

/// Where a value is produced: `(position, layer, stage)`, ordered as the computation goes;
/// stage 0 is the MoE input (or the logits, at layer `n_layer`), stage 1 the expert choice.
type At = (usize, usize, u8);

/// The first disagreement beyond `tol`: where, and its |diff| (NaN for an expert choice).
fn first_disagreement(want: &RefOutput, got: &Optimized, tol: Tolerance) -> Option<(At, f64)> {
    let (n_layer, n) = (want.moe_input.len(), want.logits.len());
    let n_vocab = got.logits.len() / n;
    let (input_tol, logit_tol) = abs_tolerances(want, tol);
    for t in 0..n {
        for (il, &layer_tol) in input_tol.iter().enumerate().take(n_layer) {
            let diff = max_abs_diff(&want.moe_input[il][t], &got.moe_input[il][t]);
            if diff > layer_tol {
                return Some(((t, il, 0), diff));
            }
            let sorted = |v: &Vec<usize>| {
                let mut v = v.clone();
                v.sort_unstable();
                v
            };
            if sorted(&want.experts[il][t]) != sorted(&got.experts[il][t]) {
                return Some(((t, il, 1), f64::NAN));
            }
        }
        let diff = max_abs_diff(&want.logits[t], &got.logits[t * n_vocab..(t + 1) * n_vocab]);
        if diff > logit_tol {
            return Some(((t, n_layer, 0), diff));
        }
    }
    None
}

/// Whether `set` is a top-`k` set of `probs` up to differences below `gap`.
fn is_near_tie_alternative(probs: &[f64], set: &[usize], k: usize, gap: f64) -> bool {
    let mut distinct = set.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let lowest_in = set.iter().map(|&e| probs[e]).fold(f64::INFINITY, f64::min);
    let highest_out = (0..probs.len()).filter(|e| !set.contains(e)).map(|e| probs[e]).fold(0.0, f64::max);
    distinct.len() == k && set.len() == k && lowest_in >= highest_out - gap
}

/// Runs the reference, imposing the optimized path's choice at each legitimate ambiguity (see the
/// module docs), until it agrees with `got` within `tol`. Returns the final reference
/// output and a description of each resolution; panics on a disagreement it cannot explain.
fn resolve(
    name: &str,
    reference: &Reference,
    tokens: &[u32],
    got: &Optimized,
    tol: Tolerance,
    k: usize,
) -> (RefOutput, Vec<String>) {
    let mut ov = Overrides::default();
    let mut want = reference.forward(tokens, &ov);
    let mut resolved = Vec::new();
    while let Some((at, diff)) = first_disagreement(&want, got, tol) {
        let (t, il, stage) = at;
        let n_layer = want.moe_input.len();
        let place = if il == n_layer { format!("logits of position {t}") } else { format!("position {t}, layer {il}") };
        assert!(
            resolved.len() < MAX_RESOLVED,
            "{name}: {place}: |diff| {diff:.3e}, another disagreement after resolving {resolved:?}; something differs for real"
        );
        if stage == 1 {
            let (mine, theirs) = (&want.experts[il][t], &got.experts[il][t]);
            assert!(
                is_near_tie_alternative(&want.router_probs[il][t], theirs, k, tol.tie_gap),
                "{name}: {place}: experts {theirs:?} (optimized) vs {mine:?} (reference), not a near-tie"
            );
            ov.experts.insert((il, t), theirs.clone());
            want = reference.forward(tokens, &ov);
            resolved.push(format!("router near-tie at {place}"));
            continue;
        }

        // Candidates: the ties that can reach `at` (earlier layers, this layer's attention, the LM
        // head of this position), each grouped with the ties of the same element in other types
        // that share its rounding boundary (equal margins: equal steps). Same position first,
        // then nearest to the boundary.
        let reaches = |tie: &Tie| match tie.site {
            Site::LmHead => tie.pos == t && il == n_layer,
            Site::Attn | Site::AttnOut => tie.pos <= t && tie.layer <= il,
            _ => tie.pos <= t && tie.layer < il,
        };
        let mut candidates: Vec<(Vec<Tie>, f64)> = Vec::new();
        for &(tie, margin) in want.ties.iter().filter(|(tie, _)| reaches(tie) && !ov.flips.contains(tie)) {
            let key = (tie.layer, tie.pos, tie.site, tie.what);
            match candidates
                .iter_mut()
                .find(|(g, m)| (g[0].layer, g[0].pos, g[0].site, g[0].what) == key && (m - margin).abs() < 1e-9)
            {
                Some((g, _)) => g.push(tie),
                None => candidates.push((vec![tie], margin)),
            }
        }
        candidates.sort_by(|a, b| (a.0[0].pos != t).cmp(&(b.0[0].pos != t)).then(a.1.total_cmp(&b.1)));

        // The flip after which the first disagreement comes latest (a flip that merely compensates
        // at `at` soon disagrees again, the cause does not); it must move the disagreement past
        // `at` or, at `at`, at least halve it (two ties flipped at once: the next round finds the
        // other).
        let with = |group: &[Tie]| {
            let mut trial = ov.clone();
            trial.flips.extend(group);
            trial
        };
        let best = (candidates.par_iter().take(MAX_CANDIDATES).enumerate())
            .map(|(i, (group, _))| {
                let w = reference.forward(tokens, &with(group));
                let (next, d) = first_disagreement(&w, got, tol).unwrap_or(((usize::MAX, 0, 0), 0.0));
                (i, next, d)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|&(_, next, d)| next > at || next == at && d < diff / 2.0)
            .max_by(|a, b| a.1.cmp(&b.1).then(b.2.total_cmp(&a.2)).then(b.0.cmp(&a.0)));
        let Some((i, ..)) = best else {
            panic!(
                "{name}: {place}: |diff| {diff:.3e} beyond tolerance, explained by none of {} activation \
                 rounding ties (after resolving {resolved:?})",
                candidates.len().min(MAX_CANDIDATES)
            );
        };
        let trial = with(&candidates[i].0);
        let w = reference.forward(tokens, &trial);
        let flipped: Vec<_> = trial.flips.difference(&ov.flips).map(|f| format!("{f:?}")).collect();
        resolved.push(format!("rounding tie for {place} ({diff:.1e}): {}", flipped.join(" + ")));
        (ov, want) = (trial, w);
    }
    (want, resolved)
}

/// Compares fixture `name`'s first `n_tokens` tokens on both paths, resolving legitimate
/// ambiguities, then checks argmax equality wherever the reference top-2 logit gap exceeds 10x
/// the logit tolerance.
fn check(name: &str, quantize: bool, tol: Tolerance, n_tokens: usize) {
    let model = load(name);
    let tokens = tokens(name, n_tokens);
    let reference = Reference::new(&model, quantize);
    let got = run_optimized(&model, &tokens);
    let (want, resolved) = resolve(name, &reference, &tokens, &got, tol, model.config.n_expert_used);

    let n_vocab = model.config.n_vocab;
    let (input_tol, logit_tol) = abs_tolerances(&want, tol);
    let mut max_diff = 0.0f64;
    let mut argmax_checked = 0;
    for (t, w) in want.logits.iter().enumerate() {
        let g = &got.logits[t * n_vocab..(t + 1) * n_vocab];
        max_diff = max_diff.max(max_abs_diff(w, g));
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 10.0 * logit_tol {
            argmax_checked += 1;
            let got_best = (0..g.len()).fold(0, |b, i| if g[i] > g[b] { i } else { b });
            let want_best = (0..w.len()).fold(0, |b, i| if w[i] > w[b] { i } else { b });
            assert_eq!(got_best, want_best, "{name}: position {t}: argmax differs");
        }
    }
    let input_diffs: Vec<String> = (want.moe_input.iter().zip(&got.moe_input))
        .zip(&input_tol)
        .map(|((w, g), tol)| {
            let d = w.iter().zip(g).fold(0.0f64, |m, (w, g)| m.max(max_abs_diff(w, g)));
            format!("{d:.1e} (tol {tol:.1e})")
        })
        .collect();
    eprintln!(
        "{name}: {n_tokens} positions, max |logit| {:.3}, max |logit diff| {max_diff:.3e} (tolerance {logit_tol:.3e}), \
         argmax checked at {argmax_checked}; max |MoE input diff| per layer: {}; resolved: {resolved:#?}",
        max_abs(&want.logits),
        input_diffs.join(", ")
    );
}

/// Measured: max |logit diff| 4.0e-6, nothing to resolve.
#[test]
fn reference_f32_tiny_mellum() {
    check("tiny-mellum-f32", false, F32, N_TOKENS);
}

/// Measured: max |logit diff| 4.7e-6, nothing to resolve.
#[test]
fn reference_f32_tiny_qwen3moe() {
    check("tiny-qwen3moe-f32", false, F32, N_TOKENS);
}

/// Every matrix Q8_0 (norms and router F32). Measured: max |logit diff| 8.8e-7 after resolving
/// 3 rounding ties (positions 12, 24, 34).
#[test]
fn reference_q8_0_tiny_mellum() {
    check("tiny-mellum-q8_0", true, QUANT, N_TOKENS);
}

/// Q4_K / Q5_K / Q6_K / Q8_0 matrices: Q8_K and Q8_0 activations. Measured: max |logit diff|
/// 2.9e-6, nothing to resolve.
#[test]
fn reference_q4_k_m_kq_mellum() {
    check("kq-mellum-q4_k_m", true, QUANT, N_TOKENS);
}

/// `ffn_down_exps` is Q5_0 / Q8_0 here (384 columns, not a multiple of 256). Measured: max
/// |logit diff| 3.6e-4 after resolving 1 rounding tie: a second one (the f16 scale of an expert's
/// down-projection input at position 34) moves logits by less than the tolerance and is left; with
/// it resolved the max is 3.2e-6.
#[test]
fn reference_q4_k_m_odd_mellum() {
    check("odd-mellum-q4_k_m", true, QUANT, N_TOKENS);
}

/// The other quantized fixtures: Q3_K, Q5_K, Q6_K, Q8_0 mixes, Q4_0 / Q8_0 `ffn_down_exps`, and
/// Qwen3-MoE in Q8_0. Measured: max |logit diff| 1.8e-6 to 4.1e-6, 0 or 1 tie each.
#[test]
fn reference_quantized_other_fixtures() {
    for name in [
        "kq-mellum-q3_k_s",
        "kq-mellum-q5_k_m",
        "kq-mellum-q6_k",
        "kq-mellum-q8_0",
        "odd-mellum-q3_k_s",
        "odd-mellum-q6_k",
        "tiny-qwen3moe-q8_0",
    ] {
        check(name, true, QUANT, N_TOKENS);
    }
}

/// The whole 623-token text. A session wraps its sliding-window ring only once a sequence
/// outgrows `window + n_ubatch` slots (16 + 512 here), which the 40-token tests never do; this
/// one does, across the batch boundary at 512. Measured: max |logit diff| 1.8e-5.
#[test]
fn reference_f32_tiny_mellum_long_ring_wrap() {
    let name = "tiny-mellum-f32";
    let n = u32s(&reference(name)["teacher_forced"][0]["tokens"]).len();
    assert!(n > 16 + 512, "{name}: {n} tokens do not wrap the ring");
    check(name, false, Tolerance { value: 3e-4, ..F32 }, n);
}

/// Evaluating 25 then 15 tokens through one session gives the logits of one 40-token call: the
/// KV cache carries every layer's state across calls (measured: bit-identical).
#[test]
fn reference_split_eval_matches_one_piece() {
    for name in ["tiny-mellum-f32", "kq-mellum-q4_k_m"] {
        let model = load(name);
        let tokens = tokens(name, N_TOKENS);
        let local = || -> Arc<dyn ExpertBackend> { Arc::new(LocalExperts::new(model.clone())) };
        let whole = session(&model, local(), 64).eval(&tokens, Logits::All).expect("eval");
        let mut s = session(&model, local(), 64);
        let mut split = s.eval(&tokens[..25], Logits::All).expect("eval");
        split.extend(s.eval(&tokens[25..], Logits::All).expect("eval"));
        assert_eq!(split.len(), whole.len());
        let max_diff = whole.iter().zip(&split).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{name}: split vs one-piece max |diff| {max_diff:.3e}");
        assert!(max_diff <= 1e-4, "{name}: split evaluation differs by {max_diff:.3e}");
    }
}
