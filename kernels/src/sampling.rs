//! Token sampling: penalties, truncation samplers, temperature and a seeded draw.
//!
//! Semantics follow llama.cpp's default sampler chain (`common/sampling.cpp`, samplers in
//! `src/llama-sampler.cpp`), restricted to the samplers moeshard exposes, in the same order:
//!
//! 1. **penalties** over the last `repeat_last_n` tokens of the history: repetition penalty
//!    (a logit `> 0` is divided by `repeat_penalty`, a logit `<= 0` is multiplied by it), then
//!    `logit -= count * frequency_penalty + presence_penalty` for every token present `count > 0`
//!    times in the window;
//! 2. **top-k**: keep the `top_k` highest logits;
//! 3. **top-p** (nucleus): keep the shortest prefix of the candidates sorted by probability whose
//!    cumulative probability is `>= top_p` (always at least one token);
//! 4. **min-p**: keep the candidates with `p >= min_p * p_max`;
//! 5. **temperature**: divide the surviving logits by `temperature`;
//! 6. **softmax and draw**: one uniform `f64` in `[0, 1)` from the sampler's ChaCha20 generator
//!    selects a token by inverse CDF over the candidates.
//!
//! `temperature <= 0` (or NaN) is greedy decoding: the first index of the maximum penalised logit,
//! without touching the random generator. top-k, top-p and min-p always keep the maximum, so this
//! is what llama.cpp's chain yields for `temp <= 0` as well.
//!
//! Ordering ties are broken by the lower token id everywhere. NaN logits are treated as `-inf`.
//! Probabilities are computed with the maximum subtracted, `exp` in `f32` and sums in `f64`.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Seed used by [`SamplingParams::default`].
///
/// llama.cpp's default (`LLAMA_DEFAULT_SEED`) asks for a fresh random seed on every run; moeshard
/// uses this fixed value instead so that a run with default parameters is reproducible. Callers
/// that want different samples per request must set [`SamplingParams::seed`] themselves.
pub const DEFAULT_SEED: u64 = 0;

/// Number of candidates sorted first when top-p runs on an unsorted candidate list; the rest is
/// sorted only if this prefix does not reach the requested mass (llama.cpp uses the same value).
const TOP_P_PREFIX: usize = 256;

/// Parameters of a [`Sampler`]. Field semantics and disabling values follow llama.cpp.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, applied after the truncation samplers. `<= 0` (or NaN): greedy
    /// decoding. Default `0.8`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens. `0` (or `>=` the vocabulary size): off.
    /// Default `40`.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose cumulative probability
    /// (softmax of the penalised logits, temperature 1, over the top-k survivors) is `>= top_p`.
    /// Range `(0, 1]`; `>= 1`: off; `<= 0` keeps only the most likely token. Default `0.95`.
    pub top_p: f32,
    /// Keep tokens whose probability is at least `min_p` times the most likely token's, among the
    /// top-k/top-p survivors and before temperature (exact rule: `logit >= max_logit +
    /// ln(min_p)`). Range `[0, 1]`; `<= 0`: off; `> 1` keeps only the most likely token.
    /// Default `0.05`.
    pub min_p: f32,
    /// Repetition penalty for tokens in the window: positive logits are divided by it, non-positive
    /// ones multiplied. Must be `> 0`; `1`: off; `> 1` discourages repeats. Default `1.0`.
    pub repeat_penalty: f32,
    /// Size of the penalty window: the last `repeat_last_n` tokens of the history (prompt and
    /// generated tokens). `0`: all penalties off; `usize::MAX`: the whole history (llama.cpp's
    /// `-1`). Default `64`.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token present in the window (OpenAI's
    /// `presence_penalty`). `0`: off; typical range `[-2, 2]`. Default `0.0`.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in the window (OpenAI's
    /// `frequency_penalty`). `0`: off; typical range `[-2, 2]`. Default `0.0`.
    pub frequency_penalty: f32,
    /// Seed of the ChaCha20 generator. Default [`DEFAULT_SEED`].
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's command-line defaults (`common_params_sampling`), with the fixed
    /// [`DEFAULT_SEED`] in place of a random seed.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: DEFAULT_SEED,
        }
    }
}

impl SamplingParams {
    fn penalties_enabled(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0)
    }

    fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }
}

/// A candidate token. Ordered by logit (`f32::total_cmp`), then by lower id: `Greater` is the
/// more likely token, so a descending sort puts the most likely first.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.logit.total_cmp(&other.logit).then_with(|| other.id.cmp(&self.id))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

fn descending(a: &Candidate, b: &Candidate) -> Ordering {
    b.cmp(a)
}

/// A stateful sampler: parameters, a seeded ChaCha20 generator and reusable buffers.
///
/// The same parameters (seed included) fed the same sequence of `(logits, history)` produce the
/// same tokens. The generator advances by exactly one draw per non-greedy [`Sampler::sample`]
/// call, whatever the number of surviving candidates. After the first call, sampling allocates
/// nothing as long as the vocabulary and window sizes do not grow.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    candidates: Vec<Candidate>,
    window: Vec<u32>,
}

impl Sampler {
    /// A sampler with `params`, its generator seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self { params, rng: ChaCha20Rng::seed_from_u64(params.seed), candidates: Vec::new(), window: Vec::new() }
    }

    /// Picks the next token from `logits` (one per vocabulary entry) given `history`, the prompt
    /// and generated tokens so far, of which the last `repeat_last_n` are penalised. History ids
    /// outside the vocabulary are ignored.
    ///
    /// # Panics
    ///
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "sampling from an empty vocabulary");
        let params = self.params;
        if params.is_greedy() && !params.penalties_enabled() {
            return argmax(logits);
        }

        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| Candidate { id: i as u32, logit: if l.is_nan() { f32::NEG_INFINITY } else { l } }),
        );
        if params.penalties_enabled() {
            let start = history.len().saturating_sub(params.repeat_last_n);
            apply_penalties(&mut self.candidates, &history[start..], &mut self.window, &params);
        }
        if params.is_greedy() {
            return first_max(self.candidates.iter().map(|c| (c.id, c.logit)));
        }

        let mut sorted = false;
        if params.top_k > 0 && params.top_k < self.candidates.len() {
            apply_top_k(&mut self.candidates, params.top_k);
            sorted = true;
        }
        if params.top_p < 1.0 {
            apply_top_p(&mut self.candidates, params.top_p, sorted);
            sorted = true;
        }
        if params.min_p > 0.0 {
            apply_min_p(&mut self.candidates, params.min_p);
        }
        for c in &mut self.candidates {
            c.logit /= params.temperature;
        }
        let u = self.rng.random::<f64>();
        draw(&mut self.candidates, sorted, u)
    }
}

/// Penalises the candidates (in id order, `candidates[id].id == id`) of the tokens in `window`.
/// `counts` is scratch space.
fn apply_penalties(candidates: &mut [Candidate], window: &[u32], counts: &mut Vec<u32>, params: &SamplingParams) {
    counts.clear();
    counts.extend_from_slice(window);
    counts.sort_unstable();
    for run in counts.chunk_by(|a, b| a == b) {
        let Some(c) = candidates.get_mut(run[0] as usize) else {
            continue;
        };
        if c.logit <= 0.0 {
            c.logit *= params.repeat_penalty;
        } else {
            c.logit /= params.repeat_penalty;
        }
        c.logit -= run.len() as f32 * params.frequency_penalty + params.presence_penalty;
    }
}

/// Keeps the `k` best candidates (`0 < k < len`), sorted best first.
fn apply_top_k(candidates: &mut Vec<Candidate>, k: usize) {
    candidates.select_nth_unstable_by(k - 1, descending);
    candidates.truncate(k);
    candidates.sort_unstable_by(descending);
}

/// Keeps the shortest best-first prefix whose probability mass is `>= p` (at least one token)
/// and leaves the candidates sorted best first. Sorts only a [`TOP_P_PREFIX`] prefix of unsorted
/// candidates unless the mass lies beyond it.
fn apply_top_p(candidates: &mut Vec<Candidate>, p: f32, sorted: bool) {
    let n = candidates.len();
    let mut sorted_len = if sorted {
        n
    } else {
        let m = TOP_P_PREFIX.min(n);
        if m < n {
            candidates.select_nth_unstable_by(m - 1, descending);
        }
        candidates[..m].sort_unstable_by(descending);
        m
    };
    let max = candidates[0].logit;
    let total: f64 = candidates.iter().map(|c| f64::from((c.logit - max).exp())).sum();
    let target = f64::from(p) * total;
    let mut cumulative = 0.0;
    let mut keep = n;
    for i in 0..n {
        if i == sorted_len {
            candidates[i..].sort_unstable_by(descending);
            sorted_len = n;
        }
        cumulative += f64::from((candidates[i].logit - max).exp());
        if cumulative >= target {
            keep = i + 1;
            break;
        }
    }
    candidates.truncate(keep);
}

/// Keeps the candidates with `logit >= max_logit + ln(min_p)`, i.e. `p >= min_p * p_max`, in
/// their current order; only the best one when `min_p > 1` leaves none.
fn apply_min_p(candidates: &mut Vec<Candidate>, min_p: f32) {
    let Some(&best) = candidates.iter().max() else {
        return;
    };
    let threshold = best.logit + min_p.ln();
    if threshold > best.logit {
        candidates.clear();
        candidates.push(best);
    } else {
        candidates.retain(|c| c.logit >= threshold);
    }
}

/// Softmax over the candidates and inverse-CDF selection with `u` in `[0, 1)`: the first
/// candidate whose running mass exceeds `u` times the total. Overwrites the logits with the
/// unnormalised probabilities.
fn draw(candidates: &mut [Candidate], sorted: bool, u: f64) -> u32 {
    let max =
        if sorted { candidates[0].logit } else { candidates.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.logit)) };
    if !max.is_finite() {
        return first_max(candidates.iter().map(|c| (c.id, c.logit)));
    }
    let mut total = 0.0f64;
    for c in candidates.iter_mut() {
        c.logit = (c.logit - max).exp();
        total += f64::from(c.logit);
    }
    let target = u * total;
    let mut running = 0.0f64;
    let mut last_positive = candidates[0].id;
    for c in candidates.iter() {
        if c.logit > 0.0 {
            last_positive = c.id;
        }
        running += f64::from(c.logit);
        if running > target {
            return c.id;
        }
    }
    last_positive
}

/// The id of the first maximum under `>` (NaN never wins); the first id if nothing beats `-inf`,
/// `0` for no items.
fn first_max(mut items: impl Iterator<Item = (u32, f32)>) -> u32 {
    let Some((mut best, first)) = items.next() else {
        return 0;
    };
    let mut best_value = if first.is_nan() { f32::NEG_INFINITY } else { first };
    for (id, value) in items {
        if value > best_value {
            best = id;
            best_value = value;
        }
    }
    best
}

/// Index of the first maximum of `logits`: ties go to the lowest id, as llama.cpp's greedy
/// sampler. NaN entries never win; if every entry is NaN or `-inf` the result is `0`.
///
/// # Panics
///
/// If `logits` is empty.
pub fn argmax(logits: &[f32]) -> u32 {
    assert!(!logits.is_empty(), "argmax of an empty slice");
    first_max(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)))
}

/// Natural-log softmax over the whole slice: `x_i - ln(sum_j exp(x_j))`.
///
/// Computed stably: the maximum is subtracted, the exponentials and their sum are evaluated in
/// `f64`, and each result rounded to `f32` once (so it is within half an `f32` ulp of the exact
/// value, plus `f64` error). `-inf` entries give `-inf`. The input should hold at
/// least one finite value; otherwise the result is NaN. Empty input gives an empty vector.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = f64::from(logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)));
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    let log_norm = max + sum.ln();
    logits.iter().map(|&l| (f64::from(l) - log_norm) as f32).collect()
}

/// The `k` largest entries of `logprobs` as `(id, value)`, largest first, equal values by lower
/// id. Returns fewer when the slice is shorter than `k`; NaN entries are skipped. Runs in
/// `O(n log k)` and allocates only the result.
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap = BinaryHeap::with_capacity(k.min(logprobs.len()) + 1);
    for (i, &logit) in logprobs.iter().enumerate() {
        if logit.is_nan() {
            continue;
        }
        let c = Candidate { id: i as u32, logit };
        if heap.len() < k {
            heap.push(Reverse(c));
        } else if heap.peek().is_some_and(|worst: &Reverse<Candidate>| c > worst.0) {
            heap.pop();
            heap.push(Reverse(c));
        }
    }
    heap.into_sorted_vec().into_iter().map(|Reverse(c)| (c.id, c.logit)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 7,
        }
    }

    fn random_logits(rng: &mut ChaCha20Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (rng.random::<f32>() - 0.5) * scale).collect()
    }

    fn candidates(logits: &[f32]) -> Vec<Candidate> {
        logits.iter().enumerate().map(|(i, &logit)| Candidate { id: i as u32, logit }).collect()
    }

    fn ids(candidates: &[Candidate]) -> Vec<u32> {
        candidates.iter().map(|c| c.id).collect()
    }

    fn softmax_f64(logits: &[f32]) -> Vec<f64> {
        let max = logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l.into()));
        let e: Vec<f64> = logits.iter().map(|&l| (f64::from(l) - max).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn argmax_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.7]), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-5.0]), 0);
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for temperature in [0.0, -1.0, f32::NAN] {
            let mut s = Sampler::new(SamplingParams { temperature, ..SamplingParams::default() });
            for _ in 0..20 {
                let logits = random_logits(&mut rng, 1000, 20.0);
                assert_eq!(s.sample(&logits, &[]), argmax(&logits));
            }
            assert_eq!(s.sample(&[0.0, 2.0, 2.0, 1.0], &[]), 1);
        }
    }

    fn sequence(params: SamplingParams, steps: usize) -> Vec<u32> {
        let mut logits_rng = ChaCha20Rng::seed_from_u64(99);
        let mut s = Sampler::new(params);
        let mut history = vec![1, 2, 3];
        for _ in 0..steps {
            let logits = random_logits(&mut logits_rng, 500, 6.0);
            let t = s.sample(&logits, &history);
            history.push(t);
        }
        history.split_off(3)
    }

    #[test]
    fn same_seed_same_sequence() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            repeat_penalty: 1.1,
            frequency_penalty: 0.1,
            ..SamplingParams::default()
        };
        let a = sequence(params, 100);
        assert_eq!(a, sequence(params, 100));
        assert_ne!(a, sequence(SamplingParams { seed: params.seed + 1, ..params }, 100));
        let defaults = SamplingParams::default();
        assert_eq!(sequence(defaults, 100), sequence(defaults, 100));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for (seed, temperature) in [(0, 0.1), (1, 1.0), (2, 5.0), (3, 1000.0)] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                top_k: 1,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..SamplingParams::default()
            });
            for _ in 0..20 {
                let logits = random_logits(&mut rng, 2000, 4.0);
                assert_eq!(s.sample(&logits, &[]), argmax(&logits));
            }
        }
    }

    #[test]
    fn top_k_keeps_best_k_sorted() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0, 0.0];
        let mut c = candidates(&logits);
        apply_top_k(&mut c, 3);
        assert_eq!(ids(&c), [1, 3, 4]);
        let mut s = Sampler::new(SamplingParams { temperature: 100.0, top_k: 3, ..off() });
        let mut seen = [0usize; 6];
        for _ in 0..3000 {
            seen[s.sample(&logits, &[]) as usize] += 1;
        }
        assert!(seen[1] > 0 && seen[3] > 0 && seen[4] > 0);
        assert_eq!(seen[0] + seen[2] + seen[5], 0);
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for (seed, n) in [(0, 100), (1, 5000)] {
            let mut s = Sampler::new(SamplingParams {
                temperature: 10.0,
                top_k: 0,
                top_p: 1e-6,
                min_p: 0.0,
                seed,
                ..SamplingParams::default()
            });
            for _ in 0..20 {
                let logits = random_logits(&mut rng, n, 2.0);
                assert_eq!(s.sample(&logits, &[]), argmax(&logits));
            }
        }
    }

    fn top_p_reference(logits: &[f32], p: f32) -> Vec<u32> {
        let mut c = candidates(logits);
        c.sort_by(descending);
        let probs = softmax_f64(&c.iter().map(|c| c.logit).collect::<Vec<_>>());
        let mut cumulative = 0.0;
        for (i, q) in probs.iter().enumerate() {
            cumulative += q;
            if cumulative >= f64::from(p) {
                return ids(&c[..=i]);
            }
        }
        ids(&c)
    }

    #[test]
    fn top_p_matches_full_sort() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        for n in [1, 10, 300, 3000] {
            for scale in [0.5, 8.0] {
                let logits = random_logits(&mut rng, n, scale);
                for p in [0.0, 0.1, 0.5, 0.9, 0.99] {
                    let mut c = candidates(&logits);
                    apply_top_p(&mut c, p, false);
                    assert_eq!(ids(&c), top_p_reference(&logits, p), "n {n} p {p}");
                }
            }
        }
        let mut c = candidates(&[0.0; 2000]);
        apply_top_p(&mut c, 0.50025, false);
        assert_eq!(ids(&c), (0..1001).collect::<Vec<u32>>());
    }

    #[test]
    fn min_p_exact() {
        let probs = [0.06f32, 0.5, 0.09, 0.2, 0.1, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let keep = |min_p: f32| {
            let mut c = candidates(&logits);
            apply_min_p(&mut c, min_p);
            ids(&c)
        };
        assert_eq!(keep(0.19), [1, 3, 4]);
        assert_eq!(keep(0.15), [1, 2, 3, 4]);
        assert_eq!(keep(0.3), [1, 3]);
        assert_eq!(keep(0.5), [1]);
        assert_eq!(keep(2.0), [1]);
        assert_eq!(keep(0.01), [0, 1, 2, 3, 4, 5]);

        let mut s = Sampler::new(SamplingParams { min_p: 0.19, ..off() });
        let mut seen = [0usize; 6];
        for _ in 0..4000 {
            seen[s.sample(&logits, &[]) as usize] += 1;
        }
        assert!(seen[1] > 0 && seen[3] > 0 && seen[4] > 0);
        assert_eq!(seen[0] + seen[2] + seen[5], 0);
    }

    #[test]
    fn penalties() {
        let greedy = |params: SamplingParams, logits: &[f32], history: &[u32]| {
            Sampler::new(SamplingParams { temperature: 0.0, ..params }).sample(logits, history)
        };
        let logits = [2.0, 1.8, -1.0];
        assert_eq!(greedy(off(), &logits, &[0]), 0);
        let repeat = SamplingParams { repeat_penalty: 1.2, ..off() };
        assert_eq!(greedy(repeat, &logits, &[0, 7]), 1);
        assert_eq!(greedy(SamplingParams { repeat_last_n: 2, ..repeat }, &logits, &[0, 1, 1]), 0);
        assert_eq!(greedy(SamplingParams { repeat_last_n: 0, ..repeat }, &logits, &[0]), 0);

        let mut c = candidates(&[2.0, -1.0, 0.5, 0.5]);
        let params = SamplingParams { repeat_penalty: 2.0, frequency_penalty: 0.25, presence_penalty: 0.125, ..off() };
        apply_penalties(&mut c, &[1, 0, 1, 2, 1, 99], &mut Vec::new(), &params);
        let got: Vec<f32> = c.iter().map(|c| c.logit).collect();
        assert_eq!(got, [1.0 - 0.375, -2.0 - 0.875, 0.25 - 0.375, 0.5]);

        let logits = [1.0, 0.9];
        let frequency = SamplingParams { frequency_penalty: 0.04, ..off() };
        assert_eq!(greedy(frequency, &logits, &[0]), 0);
        assert_eq!(greedy(frequency, &logits, &[0, 0, 0]), 1);
        let presence = SamplingParams { presence_penalty: 0.2, ..off() };
        assert_eq!(greedy(presence, &logits, &[0]), 1);
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0, 0.5, 0.0, -1.0];
        for (seed, temperature) in [(11, 1.0), (12, 0.5)] {
            let mut s = Sampler::new(SamplingParams { temperature, seed, ..off() });
            let mut counts = [0usize; 4];
            let draws = 20_000;
            for _ in 0..draws {
                counts[s.sample(&logits, &[]) as usize] += 1;
            }
            let scaled: Vec<f32> = logits.iter().map(|l| l / temperature).collect();
            for (count, p) in counts.iter().zip(softmax_f64(&scaled)) {
                let freq = *count as f64 / draws as f64;
                assert!((freq - p).abs() < 0.02, "t {temperature}: {freq} vs {p}");
            }
        }
    }

    #[test]
    fn draw_never_picks_zero_mass() {
        let mut c = candidates(&[-200.0, 0.0, -200.0]);
        assert_eq!(draw(&mut c, false, 0.0), 1);
        let mut c = candidates(&[0.0, -200.0]);
        assert_eq!(draw(&mut c, false, 0.999_999_999), 0);
    }

    #[test]
    fn log_softmax_matches_f64_reference() {
        let check = |logits: &[f32], tolerance: &dyn Fn(f64) -> f64| {
            let lp = log_softmax(logits);
            let total: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "{total}");
            let norm: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
            for (&l, &x) in logits.iter().zip(&lp) {
                let want = f64::from(l) - norm;
                if want.is_finite() {
                    let err = (f64::from(x) - want).abs();
                    assert!(err < tolerance(want), "{x} vs {want}");
                } else {
                    assert_eq!(x, f32::NEG_INFINITY);
                }
            }
        };
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut small = random_logits(&mut rng, 1000, 8.0);
        small[3] = f32::NEG_INFINITY;
        check(&small, &|_| 1e-6);
        // Below -8 one f32 ulp exceeds 1e-6: there the bound is the f32 rounding of the f64 value.
        let mut vocab = random_logits(&mut rng, 100_000, 40.0);
        vocab[17] = f32::NEG_INFINITY;
        check(&vocab, &|want| 1e-6f64.max(want.abs() * f64::from(f32::EPSILON)));

        let shifted: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|l| l + 1000.0).collect();
        for (a, b) in log_softmax(&shifted).iter().zip(log_softmax(&[1.0, 2.0, 3.0])) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(log_softmax(&[]).is_empty());
    }

    #[test]
    fn top_logprobs_order_and_ties() {
        let lp = [-1.0, -0.5, -0.5, -3.0, -0.1, f32::NAN, -0.5];
        assert_eq!(top_logprobs(&lp, 3), [(4, -0.1), (1, -0.5), (2, -0.5)]);
        assert_eq!(top_logprobs(&lp, 5), [(4, -0.1), (1, -0.5), (2, -0.5), (6, -0.5), (0, -1.0)]);
        assert_eq!(top_logprobs(&lp, 100).len(), 6);
        assert!(top_logprobs(&lp, 0).is_empty());
        assert!(top_logprobs(&[], 4).is_empty());
    }
}
