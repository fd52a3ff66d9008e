//! Whether a service is busy, told by the database's transaction counts (PostgreSQL): the
//! finished transactions, late by up to a second, and the transaction ids handed out, live.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use outbox::ProbeCounts;

/// Transactions per second of others, beyond the relay's own rate, that make a service busy.
pub(super) const BUSY_RATE: f64 = 100.0;
/// How far back the transaction rates look (the database updates its count about once a second
/// per connection).
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(2);
/// The shortest span of counts a rate is taken over: shorter, one connection's update is a jump.
const RATE_MIN_SPAN: Duration = Duration::from_secs(1);
/// How far back the rate of writes looks: the last two or three probes, so a service that starts
/// writing is told within a quarter of a second.
pub(super) const WRITES_WINDOW: Duration = Duration::from_millis(300);
/// The shortest span the rate of writes is taken over.
const WRITES_MIN_SPAN: Duration = Duration::from_millis(200);

/// The database's counts and the relay's own at one probe.
pub(super) struct Sample {
    at: Instant,
    counts: ProbeCounts,
    own: u64,
    /// The relay's own writes (transactions that take an id) so far.
    own_writes: u64,
}

/// The counts of the probes of the last [`RATE_WINDOW`].
#[derive(Default)]
pub(super) struct Counts {
    pub(super) samples: VecDeque<Sample>,
}

impl Counts {
    /// Takes the counts of a probe and says whether a service is busy, when they tell (`None`: no
    /// count from the database, or too short a span of counts yet).
    #[cfg(test)]
    pub(super) fn service_busy(&mut self, counts: ProbeCounts, own: u64, now: Instant) -> Option<bool> {
        self.record(counts, own, own, now)
    }

    /// [`Counts::service_busy`], given the relay's own writes too (for [`Counts::others_writes`]).
    /// The relay's own transactions, and its writes, are the store's count of its statements
    /// where it keeps one, else the relay's count of its calls (the claims, and the marks, of
    /// several lanes may share one statement, one transaction).
    pub(super) fn record(&mut self, counts: ProbeCounts, own: u64, own_writes: u64, now: Instant) -> Option<bool> {
        if counts.finished.is_none() && counts.writes.is_none() {
            self.samples.clear();
            return None;
        }
        let store_count = |n: Option<i64>, calls: u64| n.and_then(|n| u64::try_from(n).ok()).unwrap_or(calls);
        let own = store_count(counts.own_finished, own);
        let own_writes = store_count(counts.own_writes, own_writes);
        self.samples.push_back(Sample {
            at: now,
            counts,
            own,
            own_writes,
        });
        while self
            .samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let finished = self.rates(RATE_WINDOW, RATE_MIN_SPAN, |c| c.finished);
        let writes = self.rates(WRITES_WINDOW, WRITES_MIN_SPAN, |c| c.writes);
        tracing::trace!(
            ?finished,
            ?writes,
            "pace: the others' and the relay's transactions a second"
        );
        // Beyond the relay's own and as many again; twice that for the writes' short span.
        let busy =
            |rates: Option<(f64, f64)>, margin: f64| rates.map(|(others, own)| others > margin * (BUSY_RATE + own));
        match (busy(finished, 1.0), busy(writes, 2.0)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (None, None) => None,
            _ => Some(false),
        }
    }

    /// The others' writes a second (transaction ids handed out beyond the relay's own writes) over
    /// the last [`RATE_WINDOW`]; `None` when the database does not tell or the counts span less
    /// than a second.
    pub(super) fn others_writes(&self) -> Option<f64> {
        let (last, first) = (self.samples.back()?, self.samples.front()?);
        let secs = last.at.duration_since(first.at).as_secs_f64();
        if secs < RATE_MIN_SPAN.as_secs_f64() {
            return None;
        }
        let ids = (last.counts.writes? - first.counts.writes?) as f64;
        Some((ids - (last.own_writes - first.own_writes) as f64) / secs)
    }

    /// The others' and the relay's own transactions a second by one count, over the samples of
    /// the last `window` (`None` when they span less than `min`).
    fn rates(
        &self,
        window: Duration,
        min: Duration,
        count: impl Fn(&ProbeCounts) -> Option<i64>,
    ) -> Option<(f64, f64)> {
        let last = self.samples.back()?;
        let first = self.samples.iter().find(|s| last.at.duration_since(s.at) <= window)?;
        let span = last.at.duration_since(first.at);
        if span < min {
            return None;
        }
        let secs = span.as_secs_f64();
        let own = (last.own - first.own) as f64 / secs;
        let others = (count(&last.counts)? - count(&first.counts)?) as f64 / secs - own;
        Some((others, own))
    }
}
