//! The scheduler thread: slots, admission with prefix reuse, one batched forward pass per step.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moeshard_kernels::sampling::{Sampler, log_softmax, top_logprobs};
use tokio::sync::mpsc;

use super::{EngineOptions, Event, Finish, FinishReason, Job, Request, Shared, TokenEvent};
use crate::experts::ExpertBackend;
use crate::kv_cache::KvCache;
use crate::model::{Logits, Model, SeqBatch};
use crate::session::DEFAULT_UBATCH;

/// A sequence slot: a KV cache and the tokens it holds, plus the request using it, if any.
struct Slot {
    kv: KvCache,
    /// The tokens whose K/V are in `kv` (`kv.len()` of them).
    cached: Vec<u32>,
    active: Option<Active>,
}

/// A request in progress.
struct Active {
    req: Request,
    tx: mpsc::UnboundedSender<Event>,
    sampler: Sampler,
    /// Prompt tokens already in the cache (the next one to evaluate is `prompt[evaluated]`).
    evaluated: usize,
    /// The last sampled token, to be evaluated next step.
    pending: Option<u32>,
    /// Prompt plus generated tokens, for the sampler's penalties.
    history: Vec<u32>,
    generated: usize,
    cached_tokens: usize,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Active {
    fn finish(&self, reason: FinishReason) {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let _ = self.tx.send(Event::Done(Finish {
            reason,
            prompt_tokens: self.req.prompt.len(),
            cached_tokens: self.cached_tokens,
            completion_tokens: self.generated,
            prompt_ms: (first - self.admitted).as_secs_f64() * 1e3,
            generation_ms: (now - first).as_secs_f64() * 1e3,
        }));
    }
}

pub(super) struct Scheduler {
    model: Arc<Model>,
    experts: Arc<dyn ExpertBackend>,
    eog: Vec<u32>,
    slots: Vec<Slot>,
    n_ubatch: usize,
    /// Prompt tokens evaluated, and the time of the passes that carried them.
    prefill: (u64, Duration),
    /// Decode tokens evaluated, and the time of the decode-only passes.
    decode: (u64, Duration),
    generated: u64,
}

impl Scheduler {
    pub(super) fn new(
        model: Arc<Model>,
        experts: Arc<dyn ExpertBackend>,
        eog: Vec<u32>,
        opts: &EngineOptions,
    ) -> anyhow::Result<Scheduler> {
        let n_ubatch = DEFAULT_UBATCH.min(opts.n_ctx);
        let slots = (0..opts.parallel)
            .map(|_| {
                Ok(Slot {
                    kv: KvCache::new(&model.config, opts.n_ctx, n_ubatch, opts.k_type, opts.v_type)?,
                    cached: Vec::new(),
                    active: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Scheduler {
            model,
            experts,
            eog,
            slots,
            n_ubatch,
            prefill: (0, Duration::ZERO),
            decode: (0, Duration::ZERO),
            generated: 0,
        })
    }

    /// Runs until the engine is dropped.
    pub(super) fn run(mut self, shared: &Shared) {
        while !shared.stop.load(Ordering::Relaxed) {
            self.drop_cancelled();
            self.admit(shared);
            // Before sleeping too: a cancellation seen here (not by a failed send during a step)
            // leaves no step to report it.
            self.publish(shared);
            if self.slots.iter().all(|s| s.active.is_none()) {
                let queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                if queue.is_empty() && !shared.stop.load(Ordering::Relaxed) {
                    let _ = shared.wake.wait_timeout(queue, Duration::from_millis(200));
                }
                continue;
            }
            self.step();
            self.publish(shared);
        }
        for slot in &mut self.slots {
            if let Some(a) = slot.active.take() {
                a.finish(FinishReason::Error("the server is shutting down".into()));
            }
        }
    }

    /// Copies the counters into the stats `/metrics` reads.
    fn publish(&self, shared: &Shared) {
        let mut stats = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.active = self.slots.iter().filter(|s| s.active.is_some()).count();
        stats.prompt_tokens = self.prefill.0;
        stats.generated_tokens = self.generated;
        stats.prefill_tokens_per_s = rate(self.prefill);
        stats.decode_tokens_per_s = rate(self.decode);
    }

    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot.active.as_ref().is_some_and(|a| a.tx.is_closed()) {
                slot.active = None;
            }
        }
    }

    /// Moves queued jobs into free slots, reusing the longest cached prompt prefix.
    fn admit(&mut self, shared: &Shared) {
        loop {
            if self.slots.iter().all(|s| s.active.is_some()) {
                return;
            }
            let job = {
                let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                match queue.pop_front() {
                    Some(job) => job,
                    None => return,
                }
            };
            if job.tx.is_closed() {
                continue;
            }
            let Job { req, tx, submitted } = job;
            let (best, common) = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.active.is_none())
                .map(|(i, s)| (i, common_prefix(&s.cached, &req.prompt)))
                .max_by_key(|&(i, c)| (c, std::cmp::Reverse(i)))
                .expect("a free slot exists");
            let slot = &mut self.slots[best];
            // At least the last prompt token is evaluated again, for its logits.
            let mut keep = common.min(req.prompt.len() - 1);
            if !slot.kv.truncate(keep) {
                slot.kv.clear();
                keep = 0;
            }
            slot.cached.truncate(keep);
            slot.active = Some(Active {
                sampler: Sampler::new(req.sampling),
                history: req.prompt.clone(),
                evaluated: keep,
                pending: None,
                generated: 0,
                cached_tokens: keep,
                admitted: submitted,
                first_token: None,
                req,
                tx,
            });
        }
    }

    /// One forward pass over every active sequence, then sampling.
    fn step(&mut self) {
        // Decoding sequences first (one token each), then prompt chunks up to the batch budget.
        let mut budget = self.n_ubatch;
        let mut plan: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(t) = slot.active.as_ref().and_then(|a| a.pending) {
                plan.push((i, vec![t], false));
                budget -= 1;
            }
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(a) = &slot.active else { continue };
            if a.pending.is_none() && a.evaluated < a.req.prompt.len() && budget > 0 {
                let end = a.req.prompt.len().min(a.evaluated + budget);
                budget -= end - a.evaluated;
                plan.push((i, a.req.prompt[a.evaluated..end].to_vec(), true));
            }
        }
        if plan.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = {
            let mut seqs: Vec<SeqBatch<'_>> = Vec::with_capacity(plan.len());
            let mut slots: Vec<Option<&mut Slot>> = self.slots.iter_mut().map(Some).collect();
            for (i, tokens, prefill) in &plan {
                let slot = slots[*i].take().expect("each slot planned once");
                let last_chunk =
                    !prefill || slot.active.as_ref().is_some_and(|a| a.evaluated + tokens.len() == a.req.prompt.len());
                seqs.push(SeqBatch {
                    kv: &mut slot.kv,
                    tokens,
                    logits: if last_chunk { Logits::Last } else { Logits::None },
                });
            }
            self.model.forward_batch(&mut seqs, &*self.experts)
        };
        let elapsed = started.elapsed();
        let n_prompt: usize = plan.iter().filter(|p| p.2).map(|p| p.1.len()).sum();
        let n_decode = plan.len() - plan.iter().filter(|p| p.2).count();
        if n_prompt > 0 {
            self.prefill.0 += n_prompt as u64;
            self.prefill.1 += elapsed;
        } else {
            self.decode.1 += elapsed;
        }
        self.decode.0 += n_decode as u64;

        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for (i, _, _) in &plan {
                    let slot = &mut self.slots[*i];
                    if let Some(a) = slot.active.take() {
                        a.finish(FinishReason::Error(e.to_string()));
                    }
                    slot.kv.clear();
                    slot.cached.clear();
                }
                return;
            }
        };
        for ((i, tokens, prefill), logits) in plan.into_iter().zip(logits) {
            let slot = &mut self.slots[i];
            slot.cached.extend_from_slice(&tokens);
            let Some(a) = slot.active.as_mut() else { continue };
            if prefill {
                a.evaluated += tokens.len();
            } else {
                a.pending = None;
            }
            if logits.is_empty() {
                continue;
            }
            let id = a.sampler.sample(&logits, &a.history);
            let now = Instant::now();
            a.first_token.get_or_insert(now);
            if self.eog.contains(&id) {
                a.finish(FinishReason::Stop);
                slot.active = None;
                continue;
            }
            let (logprob, top) = match a.req.logprobs {
                Some(k) => {
                    let lp = log_softmax(&logits);
                    (Some(lp[id as usize]), top_logprobs(&lp, k))
                }
                None => (None, Vec::new()),
            };
            a.generated += 1;
            self.generated += 1;
            a.history.push(id);
            if a.tx.send(Event::Token(TokenEvent { id, logprob, top })).is_err() {
                slot.active = None;
                continue;
            }
            if a.generated >= a.req.max_tokens || slot.kv.len() >= slot.kv.n_ctx() {
                a.finish(FinishReason::Length);
                slot.active = None;
            } else {
                a.pending = Some(id);
            }
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn rate((tokens, time): (u64, Duration)) -> f64 {
    if time.is_zero() { 0.0 } else { tokens as f64 / time.as_secs_f64() }
}
