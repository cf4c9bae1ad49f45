//! Traffic statistics of one worker link, kept for `moeshard run --stats` and the serving
//! issue's `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

/// Counters of one worker link (coordinator side).
#[derive(Default)]
pub struct LinkStats {
    inner: Mutex<Counters>,
}

/// A snapshot of a link's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Data-plane round trips (one per (step, layer) the worker was involved in).
    pub round_trips: u64,
    /// Data-plane bytes sent, frame headers included.
    pub bytes_out: u64,
    /// Data-plane bytes received, frame headers included.
    pub bytes_in: u64,
    /// Token rows sent (summed over round trips).
    pub tokens: u64,
    /// Weight bytes shipped to the worker (0 when its cache or local file had everything).
    pub shipped_bytes: u64,
    /// Experts the worker holds.
    pub experts: u64,
    /// Round-trip times per layer (bounded histograms: a long-running server keeps a fixed
    /// amount per layer, not one entry per round trip).
    pub rtt_us: Vec<RttHistogram>,
    /// Round trips that failed and were computed locally instead.
    pub failures: u64,
    /// Times the worker was reconnected (and its experts assigned again) after being lost.
    pub reconnects: u64,
}

impl Counters {
    /// Mean and 99th-percentile RTT of `layer` (see [`RttHistogram`]), if any round trip was
    /// made.
    pub fn rtt(&self, layer: usize) -> Option<(Duration, Duration)> {
        let h = self.rtt_us.get(layer)?;
        Some((h.mean()?, h.quantile(0.99)?))
    }

    /// Every layer's round trips in one histogram.
    pub fn rtt_all_layers(&self) -> RttHistogram {
        let mut all = RttHistogram::default();
        for h in &self.rtt_us {
            all.merge(h);
        }
        all
    }
}

/// Buckets per doubling of [`RttHistogram`]: a quantile is known to within 2^(1/4) - 1 = 19%.
const BUCKETS_PER_OCTAVE: f64 = 4.0;

/// A histogram of round-trip times in microseconds, bounded in size (at most 129 buckets for
/// any `u32` value): bucket 0 holds 0 µs, bucket `b >= 1` the times in `[2^((b-1)/4),
/// 2^(b/4))` µs. The count and sum are exact, so the mean is too; quantiles are reported as
/// the upper bound of their bucket.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RttHistogram {
    /// Round trips recorded.
    pub count: u64,
    /// Their total time, in microseconds.
    pub sum_us: u64,
    buckets: Vec<u64>,
}

impl RttHistogram {
    fn bucket(us: u32) -> usize {
        if us == 0 { 0 } else { (f64::from(us).log2() * BUCKETS_PER_OCTAVE).floor() as usize + 1 }
    }

    /// Records one round trip of `us` microseconds.
    pub fn record(&mut self, us: u32) {
        let b = Self::bucket(us);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.sum_us += u64::from(us);
    }

    /// The mean, if any round trip was recorded.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.sum_us / self.count))
    }

    /// The `q` quantile (nearest rank, `0 < q <= 1`) as the upper bound of its bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let rank = ((self.count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if n > 0 && seen >= rank {
                let upper_us = if b == 0 { 0.0 } else { (b as f64 / BUCKETS_PER_OCTAVE).exp2() };
                return Some(Duration::from_secs_f64(upper_us * 1e-6));
            }
        }
        None
    }

    /// Adds `other`'s round trips.
    pub fn merge(&mut self, other: &RttHistogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
    }

    /// The round trips recorded since `before` (an earlier snapshot of the same histogram).
    pub fn since(&self, before: &RttHistogram) -> RttHistogram {
        let buckets =
            self.buckets.iter().enumerate().map(|(b, &n)| n - before.buckets.get(b).copied().unwrap_or(0)).collect();
        RttHistogram { count: self.count - before.count, sum_us: self.sum_us - before.sum_us, buckets }
    }
}

impl LinkStats {
    /// Records one data-plane round trip.
    pub fn record(&self, layer: usize, bytes_out: u64, bytes_in: u64, tokens: u64, rtt: Duration) {
        let mut c = self.lock();
        c.round_trips += 1;
        c.bytes_out += bytes_out;
        c.bytes_in += bytes_in;
        c.tokens += tokens;
        if c.rtt_us.len() <= layer {
            c.rtt_us.resize(layer + 1, RttHistogram::default());
        }
        c.rtt_us[layer].record(rtt.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    /// Records weight shipping.
    pub fn record_shipping(&self, shipped_bytes: u64, experts: u64) {
        let mut c = self.lock();
        c.shipped_bytes += shipped_bytes;
        c.experts = experts;
    }

    /// Records a reconnection after a loss that shipped `shipped_bytes` of weights.
    pub fn record_rejoin(&self, shipped_bytes: u64) {
        let mut c = self.lock();
        c.reconnects += 1;
        c.shipped_bytes += shipped_bytes;
    }

    /// Records a failed round trip.
    pub fn record_failure(&self) {
        self.lock().failures += 1;
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> Counters {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_mean_is_exact_and_quantiles_bound_the_samples() {
        let mut h = RttHistogram::default();
        for us in 1..=1000u32 {
            h.record(us);
        }
        assert_eq!(h.mean(), Some(Duration::from_micros(500)));
        let p99 = h.quantile(0.99).unwrap().as_secs_f64() * 1e6;
        assert!((990.0..=990.0 * 1.19 + 1.0).contains(&p99), "p99 {p99}");
        let mut before = h.clone();
        before.record(0);
        h.record(0);
        h.record(5000);
        let window = h.since(&before);
        assert_eq!((window.count, window.sum_us), (1, 5000));
        assert!(window.quantile(0.5).unwrap() >= Duration::from_micros(5000));
        let mut all = RttHistogram::default();
        all.merge(&h);
        all.merge(&window);
        assert_eq!(all.count, h.count + 1);
        assert!(RttHistogram::default().mean().is_none() && RttHistogram::default().quantile(0.5).is_none());
    }

    #[test]
    fn histogram_size_is_bounded() {
        let mut h = RttHistogram::default();
        for us in [0, 1, 7, 1 << 20, u32::MAX] {
            h.record(us);
        }
        assert!(h.buckets.len() <= 129, "{} buckets", h.buckets.len());
        assert_eq!(h.quantile(1.0).map(|d| d >= Duration::from_micros(u64::from(u32::MAX))), Some(true));
    }
}
