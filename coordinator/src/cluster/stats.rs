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
    /// Round-trip times in microseconds, per layer.
    pub rtt_us: Vec<Vec<u32>>,
    /// Round trips that failed and were computed locally instead.
    pub failures: u64,
    /// Times the worker was reconnected (and its experts assigned again) after being lost.
    pub reconnects: u64,
}

impl Counters {
    /// Mean and 99th-percentile RTT of `layer` (nearest-rank), if any round trip was made.
    pub fn rtt(&self, layer: usize) -> Option<(Duration, Duration)> {
        let mut v = self.rtt_us.get(layer)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let mean = v.iter().map(|&x| u64::from(x)).sum::<u64>() / v.len() as u64;
        let p99 = v[((v.len() * 99).div_ceil(100)).saturating_sub(1)];
        Some((Duration::from_micros(mean), Duration::from_micros(u64::from(p99))))
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
            c.rtt_us.resize(layer + 1, Vec::new());
        }
        c.rtt_us[layer].push(rtt.as_micros().min(u128::from(u32::MAX)) as u32);
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
