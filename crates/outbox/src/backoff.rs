//! The one retry delay policy: the relay's retries and broker outages, the consumer runners'
//! retries and the daemon's reconnect all wait by a [`Backoff`] (modelled on tower's
//! `ExponentialBackoff`: exponential from a base, capped, jittered).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff: attempt `n` (1-based) waits `base * 2^(n-1)`, capped at `max`, with jitter
/// (uniform in `[delay/2, delay]`) so that clients that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

/// A [`Backoff`] whose base is zero or above its cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid backoff: base {base:?} must be above zero and at most max {max:?}")]
pub struct InvalidBackoff {
    /// The base asked for.
    pub base: Duration,
    /// The cap asked for.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() || base.as_nanos() > max.as_nanos() {
            return Err(InvalidBackoff { base, max });
        }
        Ok(Backoff { base, max })
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay before retry number `attempt` (1-based; 0 counts as 1): grows, is capped, jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.ceiling(attempt);
        let lo = cap / 2;
        lo + rand::thread_rng().gen_range(Duration::ZERO..=cap - lo)
    }

    /// The largest delay [`Backoff::delay`] may return for `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.clamp(1, 31) - 1;
        self.base.saturating_mul(1u32 << doublings).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_jittered() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d1 = b.delay(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = b.delay(3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d40 = b.delay(40);
            assert!(
                d40 >= Duration::from_secs(1) && d40 <= Duration::from_secs(2),
                "{d40:?}"
            );
            seen.insert(d3);
        }
        assert!(seen.len() > 1, "jitter spreads the delays");
        assert_eq!(b.ceiling(0), b.ceiling(1));
    }

    #[test]
    fn zero_base_or_base_above_cap_is_refused() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        let e = Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("at most max"), "{e}");
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }
}
