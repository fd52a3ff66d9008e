//! How often the lingering lanes are looked at (see [`crate::linger`]), under the adaptive pace.
//!
//! A lane that keeps up claims what the service commits as it commits it: every look that finds
//! rows costs a claim and a mark however few rows they carry. On a database the service keeps
//! busy those statements are what the relay costs it, so the look comes less often while the relay
//! slows commits by more than
//! [`RelayConfig::pace_slowdown`](crate::RelayConfig::pace_slowdown) (the pace's own signal):
//! twice as far apart each cycle, up to
//! [`RelayConfig::linger_poll_max`](crate::RelayConfig::linger_poll_max) (off by default: the same
//! signal rises for a service that keeps up with its load, whose messages would only wait longer).
//! Within the slowdown it comes back a quarter each cycle. Lingering lanes only get rows a service
//! commits, so the look costs nobody but that service.

use std::time::Duration;

/// The interval between two looks at the lingering lanes.
#[derive(Debug)]
pub(super) struct Gather {
    pub(super) every: Duration,
    floor: Duration,
    max: Duration,
}

impl Gather {
    /// From `floor` ([`RelayConfig::linger_poll_interval`](crate::RelayConfig::linger_poll_interval))
    /// up to `max` (zero: no further), kept below half the `linger` (a lane must be looked at
    /// before its linger ends).
    pub(super) fn new(floor: Duration, max: Duration, linger: Duration) -> Self {
        Gather {
            every: floor,
            floor,
            max: top(floor, max, linger),
        }
    }

    /// Takes one cycle's quiet and working commit times and the slowdown allowed, and returns the
    /// new interval.
    pub(super) fn cycle(&mut self, quiet: Duration, working: Duration, slowdown: f64) -> Duration {
        self.every = if working > quiet.mul_f64(1.0 + slowdown) {
            (self.every * 2).min(self.max)
        } else {
            self.every.mul_f64(0.75).max(self.floor)
        };
        self.every
    }
}

/// The longest interval: `max` (zero: none beyond `floor`), below half the `linger`.
fn top(floor: Duration, max: Duration, linger: Duration) -> Duration {
    max.min(linger / 2).max(floor)
}

/// Whether the relay's settings let the look go beyond `linger_poll_interval` at all.
pub(crate) fn gathers(cfg: &crate::RelayConfig) -> bool {
    top(cfg.linger_poll_interval, cfg.linger_poll_max, cfg.linger) > cfg.linger_poll_interval
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A gather from 5 ms up to `max` under a `linger`, after ten cycles of a relay that slows
    /// commits ninefold.
    fn gathered(max: Duration, linger: Duration) -> Gather {
        let mut g = Gather::new(ms(5), max, linger);
        for _ in 0..10 {
            g.cycle(ms(1), ms(9), 0.15);
        }
        g
    }

    #[test]
    fn a_relay_that_slows_commits_looks_less_often_up_to_the_max_and_back() {
        let mut g = Gather::new(ms(5), ms(100), ms(1000));
        let seen: Vec<_> = (0..6).map(|_| g.cycle(ms(2), ms(3), 0.15)).collect();
        assert_eq!(seen, [ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]);
        // Within the slowdown the look comes back a quarter a cycle, down to the floor.
        assert_eq!(g.cycle(ms(2), Duration::from_micros(2200), 0.15), ms(75));
        for _ in 0..20 {
            g.cycle(ms(2), ms(2), 0.15);
        }
        assert_eq!(g.every, ms(5));
    }

    #[test]
    fn the_max_stays_below_half_the_linger_and_never_below_the_floor() {
        assert_eq!(gathered(ms(100), ms(1000)).every, ms(100));
        assert_eq!(gathered(ms(100), ms(60)).every, ms(30));
        let mut g = Gather::new(ms(50), ms(100), ms(60));
        assert_eq!(g.cycle(ms(1), ms(9), 0.15), ms(50));
        // Zero, the default: no gathering.
        assert_eq!(gathered(Duration::ZERO, ms(1000)).every, ms(5));
        let cfg = crate::RelayConfig::default();
        assert!(!gathers(&cfg));
        assert!(gathers(&cfg.clone().linger_poll_max(ms(100))));
        assert!(
            !gathers(&cfg.linger_poll_max(ms(100)).linger(ms(10))),
            "half the linger is the floor"
        );
    }
}
