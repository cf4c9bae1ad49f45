//! When to try reconnecting a lost worker. Pure, no I/O.
//!
//! Attempts are spaced by an exponential backoff: [`Backoff::INITIAL`], doubling per failed attempt
//! up to [`Backoff::MAX`]. A link that comes back and is lost again soon after (within
//! [`Backoff::STABLE`]) keeps the backoff where it was, so a flapping worker is not reconnected
//! (and re-timed-out) in a tight loop; one that stayed up that long starts over from the initial
//! delay.

use std::time::Duration;

/// Exponential reconnect backoff of one worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Delay before the first attempt after a loss.
    pub const INITIAL: Duration = Duration::from_millis(100);
    /// The longest delay between attempts.
    pub const MAX: Duration = Duration::from_secs(2);
    /// How long a link must stay up for its next loss to restart the backoff.
    pub const STABLE: Duration = Duration::from_secs(30);

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = Self::INITIAL.saturating_mul(1u32 << self.failures.min(16)).min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// A link that was up for `up_for` was lost: restarts the backoff if it had been stable.
    pub fn lost_after(&mut self, up_for: Duration) {
        if up_for >= Self::STABLE {
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        for _ in 0..100 {
            assert_eq!(b.next_delay(), Backoff::MAX);
        }
    }

    #[test]
    fn only_a_stable_link_restarts_the_backoff() {
        let mut b = Backoff::default();
        b.next_delay();
        b.next_delay();
        b.lost_after(Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_millis(400), "a flapping link keeps backing off");
        b.lost_after(Backoff::STABLE);
        assert_eq!(b.next_delay(), Backoff::INITIAL);
    }
}
