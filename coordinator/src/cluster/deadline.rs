//! The deadline of one expert round trip, adapted to what a worker has shown. Pure, no I/O.
//!
//! A worker's round trip is modelled as `base + per_token * tokens` (network latency plus compute
//! that grows with the rows of the batch): `base` is the smallest round trip seen (the connection's
//! ping first), `per_token` a moving average of what each answered batch cost beyond `base` per
//! row, and `deviation` a moving average of the prediction error (like TCP's RTTVAR, RFC 6298). The
//! deadline is [`SAFETY_FACTOR`] times the prediction plus four deviations, clamped to
//! `[min, max]`: the floor keeps scheduling hiccups of a healthy but loaded worker from tripping
//! it, the cap bounds what a lost worker can cost, and until a batch was answered the cap applies.

use std::time::Duration;

/// How many predicted round trips a worker gets before it counts as lost.
pub const SAFETY_FACTOR: f64 = 3.0;

/// Weight of a new sample in the per-token and deviation averages.
const GAIN: f64 = 0.125;

/// Bounds of the adaptive deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadlineBounds {
    /// The shortest deadline ever used.
    pub min: Duration,
    /// The longest deadline, and the one used before a worker answered any batch.
    pub max: Duration,
}

/// What a worker's round trips have cost so far (all times in microseconds).
#[derive(Clone, Debug, PartialEq)]
pub struct RttModel {
    base_us: f64,
    per_token_us: Option<f64>,
    deviation_us: f64,
}

impl RttModel {
    /// A model that knows only the connection's ping round trip.
    pub fn new(ping: Duration) -> RttModel {
        RttModel { base_us: micros(ping), per_token_us: None, deviation_us: 0.0 }
    }

    /// Learns from one answered batch of `tokens` rows that took `rtt`.
    pub fn observe(&mut self, tokens: usize, rtt: Duration) {
        let rtt = micros(rtt);
        let tokens = tokens.max(1) as f64;
        if let Some(predicted) = self.predict_us(tokens) {
            let error = (rtt - predicted).abs();
            self.deviation_us += GAIN * (error - self.deviation_us);
        }
        self.base_us = self.base_us.min(rtt);
        let sample = (rtt - self.base_us) / tokens;
        self.per_token_us = Some(match self.per_token_us {
            Some(avg) => avg + GAIN * (sample - avg),
            None => sample,
        });
    }

    /// The deadline of a batch of `tokens` rows within `bounds`.
    pub fn deadline(&self, tokens: usize, bounds: DeadlineBounds) -> Duration {
        let Some(predicted) = self.predict_us(tokens.max(1) as f64) else { return bounds.max };
        let us = SAFETY_FACTOR * predicted + 4.0 * self.deviation_us;
        Duration::from_secs_f64(us * 1e-6).clamp(bounds.min, bounds.max.max(bounds.min))
    }

    fn predict_us(&self, tokens: f64) -> Option<f64> {
        self.per_token_us.map(|p| self.base_us + p * tokens)
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: DeadlineBounds = DeadlineBounds { min: Duration::from_millis(250), max: Duration::from_secs(10) };

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn the_cap_applies_until_a_batch_was_answered() {
        let m = RttModel::new(ms(1));
        assert_eq!(m.deadline(1, BOUNDS), BOUNDS.max);
        assert_eq!(m.deadline(512, BOUNDS), BOUNDS.max);
    }

    #[test]
    fn a_fast_worker_gets_the_floor() {
        let mut m = RttModel::new(Duration::from_micros(200));
        for _ in 0..50 {
            m.observe(1, Duration::from_micros(900));
        }
        assert_eq!(m.deadline(1, BOUNDS), BOUNDS.min);
    }

    #[test]
    fn large_batches_get_proportionally_longer() {
        let mut m = RttModel::new(ms(2));
        // 2 ms of latency plus 1 ms per row, steady.
        for &n in [1usize, 8, 64, 256, 1, 8, 64, 256].iter().cycle().take(200) {
            m.observe(n, ms(2 + n as u64));
        }
        let d = m.deadline(512, BOUNDS);
        let expected = SAFETY_FACTOR * 514e-3;
        assert!((d.as_secs_f64() - expected).abs() < 0.1 * expected, "{d:?}, expected about {expected} s");
        assert!(m.deadline(2048, BOUNDS) > m.deadline(512, BOUNDS));
        assert_eq!(m.deadline(100_000, BOUNDS), BOUNDS.max);
    }

    #[test]
    fn jitter_widens_the_deadline() {
        let (mut steady, mut jittery) = (RttModel::new(ms(10)), RttModel::new(ms(10)));
        for i in 0..100u64 {
            steady.observe(4, ms(100));
            jittery.observe(4, ms(if i % 2 == 0 { 40 } else { 160 }));
        }
        let bounds = DeadlineBounds { min: ms(1), max: ms(60_000) };
        assert!(jittery.deadline(4, bounds) > steady.deadline(4, bounds));
        // Steady 100 ms round trips: about three of them.
        let d = steady.deadline(4, bounds).as_secs_f64();
        assert!((0.28..0.32).contains(&d), "{d}");
    }

    #[test]
    fn a_floor_above_the_cap_wins() {
        let mut m = RttModel::new(ms(1));
        m.observe(1, ms(1));
        let bounds = DeadlineBounds { min: ms(500), max: ms(100) };
        assert_eq!(m.deadline(1, bounds), ms(500));
    }
}
