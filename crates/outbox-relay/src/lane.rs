//! One lane's loop: claim a batch, publish it, settle every row (mark published, back off, or
//! dead-letter), in per-key order. Up to [`RelayConfig::pipeline`] batches in flight per lane, each
//! key in one of them at the most (see [`crate::flight`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Lease, Publisher, Store, StoredMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ClaimAhead;
#[cfg(doc)]
use crate::config::RelayConfig;
use crate::flight::{take_turns, Flight, InFlight, Turns};
use crate::linger::linger_wait;
use crate::shared::Shared;
pub(crate) use crate::waits::timed;
use crate::waits::{back_off, pace, pause};
use crate::writers::OpenWriters;

/// How many of the times at which backed-off rows may be published again a lane keeps.
const RETRIES_KEPT: usize = 16;

/// Why a lane loop ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LaneExit {
    /// Asked to stop (shutdown or rebalance); the lease is still ours.
    Stopped,
    /// Another relay took the lane over.
    Lost,
}

pub(crate) async fn run_lane<S: Store, P: Publisher>(
    shared: Arc<Shared<S, P>>,
    lease: Lease,
    stop: CancellationToken,
) -> LaneExit {
    let span = tracing::info_span!(
        "lane",
        database = shared.cfg.name.as_deref(),
        lane = lease.lane,
        epoch = lease.epoch
    );
    async move {
        tracing::debug!("lane started");
        Lane {
            lingers: crate::linger::lingers_now(&shared),
            shared: &shared,
            lease: &lease,
            stop: &stop,
            flight: Flight::default(),
            ahead: None,
            more: true,
            catching_up: false,
            held: false,
            claimed_to: 0,
            idle: false,
            idle_refused: 0,
            looked_since_idle: false,
            open_writers: OpenWriters::default(),
            linger_until: None,
            retries: BTreeSet::new(),
            store_errors: 0,
            outages: 0,
            claim_took: Duration::ZERO,
            publish_took: Duration::ZERO,
        }
        .run()
        .await
    }
    .instrument(span)
    .await
}

/// One lane's state between rounds.
struct Lane<'a, S, P> {
    shared: &'a Arc<Shared<S, P>>,
    lease: &'a Lease,
    stop: &'a CancellationToken,
    /// Batches being published or waiting for their marks, oldest first.
    flight: Flight<'a>,
    /// A batch claimed while the previous one was being published (`claim_ahead`), if any.
    ahead: Option<Vec<StoredMessage>>,
    /// Whether to claim again without waiting for a wake-up.
    more: bool,
    /// The lane's last claim was full: it takes turns under the adaptive pace.
    catching_up: bool,
    /// Rows were left out of a claim because their key is in flight: claim again once a batch is
    /// settled.
    held: bool,
    /// The last position the last claim returned (the watch looks beyond it while batches are in
    /// flight).
    claimed_to: i64,
    /// What the lane's flag says (true: writers notify it).
    idle: bool,
    /// Writes of the flag saying idle refused in a row (the lane then asks again after a backoff).
    idle_refused: u32,
    /// Since the flag said idle, a claim found nothing. Until then the lane claims after every
    /// batch: a writer that inserted while the flag said busy sends no NOTIFY, even when it
    /// commits later.
    looked_since_idle: bool,
    /// The transactions open when the flag last said idle: as they end, the lane looks once more
    /// for rows they inserted while the flag said busy (see [`crate::writers`]).
    open_writers: OpenWriters,
    /// Whether the lane lingers after running dry (see [`crate::linger`]), as of its last claim or
    /// wait.
    lingers: bool,
    /// Until when the lane keeps watching for rows after it ran dry, flag still busy.
    linger_until: Option<Instant>,
    /// When the rows this lane backed off may be published again (the earliest
    /// [`RETRIES_KEPT`]): an idle lane looks then instead of at its next poll.
    retries: BTreeSet<Instant>,
    /// Failed claims in a row (for the claim's backoff).
    store_errors: u32,
    /// Rounds in a row in which the broker was unavailable (for the lane's backoff).
    outages: u32,
    /// How long the lane's last claim and last publish took (for pipelining and
    /// `ClaimAhead::Auto`).
    claim_took: Duration,
    publish_took: Duration,
}

impl<'a, S: Store, P: Publisher> Lane<'a, S, P> {
    async fn run(&mut self) -> LaneExit {
        loop {
            if self.stop.is_cancelled() {
                return self.finish().await;
            }
            let step = if self.more && self.has_room() {
                self.start_batch().await
            } else if self.flight.is_empty() {
                self.wait_dry().await
            } else {
                self.wait_in_flight().await
            };
            match step {
                Ok(()) => {}
                // A step that found the lane stopped (a rest, a backoff, a wait) may leave
                // batches in flight behind it: they are settled as at any other stop.
                Err(LaneExit::Stopped) => return self.finish().await,
                Err(exit) => return exit,
            }
        }
    }

    /// Whether another batch may start: nothing in flight, or fewer than [`RelayConfig::pipeline`]
    /// batches holding fewer than [`RelayConfig::batch_size`] rows together, while the lane's
    /// claims take less than half as long as its publishes. A claim that takes longer means the
    /// database is the bottleneck: more, smaller batches would only add to its load, and the rows
    /// wait for the batch in flight and go out together.
    fn has_room(&self) -> bool {
        let cfg = &self.shared.cfg;
        self.flight.is_empty()
            || (self.flight.len() < cfg.pipeline
                && self.flight.rows() < cfg.batch_size
                && self.claim_took * 2 < self.publish_took)
    }

    /// Whether a row committed after the lane's last claim wakes it: a lingering lane is watched
    /// (or woken in-process), an idle one gets the commit's NOTIFY where the database sends one,
    /// once a claim since its flag said idle found nothing with no batch in flight (before that, a
    /// writer that inserted while the flag said busy may still commit, without a NOTIFY).
    /// Otherwise the lane finds the row when it claims again after its batch in flight is settled;
    /// a row whose writer inserted it before the flag said idle and commits after that empty claim
    /// is found when the lane next asks which writers have ended ([`crate::writers`]).
    fn woken_by_commits(&self) -> bool {
        self.lingers || (self.idle && self.looked_since_idle && self.shared.store.wakeups().is_some())
    }

    /// Takes a turn, claims a batch and starts publishing it.
    async fn start_batch(&mut self) -> Result<(), LaneExit> {
        let shared = self.shared;
        let turns = tokio::select! {
            turns = take_turns(shared, self.catching_up) => turns,
            _ = self.stop.cancelled() => return Ok(()),
            // The lane's own batches may hold the turns it waits for.
            _ = self.flight.oldest_answered() => return self.settle_oldest(true).await,
        };
        let started = Instant::now();
        self.lingers = crate::linger::lingers_now(shared);
        let limit = shared.cfg.batch_size - self.flight.rows();
        let mut rows = match self.ahead.take().filter(|r| !r.is_empty()) {
            Some(rows) => rows,
            None => match self.claim(limit).await {
                Some(rows) => rows,
                None => return self.claim_failed(turns).await,
            },
        };
        let claimed = rows.len();
        let full = claimed >= limit;
        self.catching_up = full;
        if let Some(pace) = &shared.adaptive {
            if let Some(oldest) = rows.iter().map(|r| r.created_at).min() {
                pace.saw_lag((chrono::Utc::now() - oldest).to_std().unwrap_or_default());
            }
        }
        self.claimed_to = rows.iter().map(|r| r.pos).max().unwrap_or(self.claimed_to);
        // Rows of a key in flight wait for that batch: claimed again after it is settled.
        rows.retain(|r| !self.flight.holds(r.key.as_deref()));
        self.held |= rows.len() < claimed;
        if rows.is_empty() {
            // Dry (or only rows behind a batch in flight): wait for a wake-up or a settled batch.
            self.more = false;
            // Only with nothing in flight: a writer that inserted while the flag said busy may
            // commit while a batch claimed since is published, as with one batch at a time.
            self.looked_since_idle |= self.idle && claimed == 0 && self.flight.is_empty();
            return Ok(());
        }
        if self.lingers {
            self.linger_until = Some(Instant::now() + shared.cfg.linger);
        }
        if self.idle && (full || self.lingers) {
            // Under load the lane is busy: writers stop paying for NOTIFY.
            set_idle(shared, self.lease, false).await;
            self.idle = false;
        }
        if let Some(rate) = &shared.rate {
            if pace(rate, rows.len(), self.stop).await {
                return Ok(());
            }
        }
        let task = {
            let (shared, lane, rows) = (Arc::clone(shared), self.lease.lane, rows.clone());
            tokio::spawn(async move { crate::batch::send(&shared, lane, rows).await }.in_current_span())
        };
        self.flight.push(InFlight::new(task, turns, &rows, started, full));
        // A full batch: claim again at once (another batch in flight, if there is room). A short
        // one: the lane is drained; one that a commit wakes waits for that, another one looks once
        // more when this batch is settled (`settle_oldest`), as with one batch at a time: a claim
        // beside the batch would mostly find nothing.
        self.more = full;
        if self.claims_ahead() {
            // Rows of a key that a batch in flight leaves unsettled (retry, park) are dropped from
            // it when that batch is settled: they stay pending and are claimed again, in order.
            self.ahead = self.claim(shared.cfg.batch_size).await;
        }
        Ok(())
    }

    /// Whether to claim the next batch now, while this one is published, and hold it until a batch
    /// in flight is settled ([`RelayConfig::claim_ahead`]). Only when no other batch may start.
    fn claims_ahead(&self) -> bool {
        if self.has_room() && self.more {
            return false;
        }
        match self.shared.cfg.claim_ahead {
            ClaimAhead::Always => true,
            ClaimAhead::Never => false,
            ClaimAhead::Auto => self.publish_took > self.claim_took,
        }
    }

    /// Claims up to `limit` rows beside those in flight; `None` when the database failed.
    async fn claim(&mut self, limit: usize) -> Option<Vec<StoredMessage>> {
        let shared = self.shared;
        let in_flight = self.flight.positions();
        match timed(shared.counted(shared.store.claim(self.lease, limit, &in_flight))).await {
            (Ok(rows), took) => {
                self.store_errors = 0;
                self.claim_took = took;
                Some(rows)
            }
            (Err(e), _) => {
                self.store_errors += 1;
                shared.meters.store_errors.increment(1);
                tracing::warn!(error = %e, "claim failed; retrying");
                None
            }
        }
    }

    async fn claim_failed(&mut self, turns: Turns<'a>) -> Result<(), LaneExit> {
        drop(turns);
        if pause(self.stop, self.shared.backoff.delay(self.store_errors)).await {
            return Err(LaneExit::Stopped);
        }
        Ok(())
    }

    /// Nothing in flight and nothing claimed: linger, ask writers for a wake-up, or wait for one.
    async fn wait_dry(&mut self) -> Result<(), LaneExit> {
        let shared = self.shared;
        self.more = true;
        self.lingers = crate::linger::lingers_now(shared);
        if let Some(until) = self.linger_until.filter(|u| self.lingers && *u > Instant::now()) {
            // Not extended by an empty claim: rows held back behind a waiting row of their key
            // make the watch wake the lane for nothing, but only until then.
            return match linger_wait(shared, self.lease, until, self.stop).await {
                true => Err(LaneExit::Stopped),
                false => Ok(()),
            };
        }
        self.linger_until = None;
        if !self.idle {
            // Ask writers for a wake-up, then look once more: a row committed before the flag was
            // visible would otherwise wait for the next poll.
            if set_idle(shared, self.lease, true).await {
                self.idle = true;
                self.idle_refused = 0;
                self.looked_since_idle = false;
                self.open_writers = OpenWriters::taken(shared).await;
                return Ok(());
            }
            // Refused: the flag still says busy and writers send no wake-up. Taken for idle, the
            // lane waited for the poll for every row as long as it held the lane; it looks again
            // and asks again after a backoff instead.
            self.idle_refused += 1;
            let retry = shared.backoff.delay(self.idle_refused).min(shared.cfg.poll_interval);
            if pause(self.stop, retry).await {
                return Err(LaneExit::Stopped);
            }
            return Ok(());
        }
        // At the poll, or sooner when a row backed off may be published again, or when some of
        // the writers open when the flag said idle have ended and left a row.
        let poll = Instant::now() + shared.cfg.poll_interval;
        loop {
            let woken = shared.woken(self.lease.lane);
            let until = [self.retries.first().copied(), self.open_writers.next_ask()]
                .into_iter()
                .flatten()
                .fold(poll, Instant::min);
            let woken = tokio::select! {
                // A wake-up already there goes first: an overdue question must not delay it.
                biased;
                _ = woken => true,
                _ = tokio::time::sleep_until(until.into()) => false,
                _ = self.stop.cancelled() => return Err(LaneExit::Stopped),
            };
            let now = Instant::now();
            let retry = self.retries.first().is_some_and(|at| *at <= now);
            // The claim that follows looks for every row whose delay has ended.
            self.retries = self.retries.split_off(&now);
            // The claim that follows finds the rows of every writer that has ended: the question
            // waits for the next turn instead of delaying it.
            if woken || retry || now >= poll {
                return Ok(());
            }
            // Otherwise only the question was due: claim if a writer that ended since left a row.
            if self.open_writers.ended(shared, self.lease.lane).await {
                return Ok(());
            }
        }
    }

    /// Batches in flight: settle the oldest once answered, or (room for another batch) claim again
    /// when woken: by the watch, which finds a row beyond those in flight of a lingering lane, or
    /// by the NOTIFY of a commit to an idle one. Without room, a lingering lane that has no reason
    /// yet to claim again is watched all the same: a row the watch finds meanwhile leaves the lane
    /// its wake-up, which it takes once the batch is settled instead of waiting for the next look.
    async fn wait_in_flight(&mut self) -> Result<(), LaneExit> {
        let shared = self.shared;
        let lane = self.lease.lane;
        let room = self.has_room();
        let watch = self.lingers && (room || !self.more);
        if watch {
            shared
                .watched
                .add(lane, self.flight.last_position().max(self.claimed_to));
        }
        let woken = shared.woken(lane);
        let take_wake = room && self.woken_by_commits();
        let woken = async {
            if take_wake {
                woken.await
            } else {
                std::future::pending().await
            }
        };
        let settle = tokio::select! {
            _ = self.flight.oldest_answered() => true,
            _ = woken => false,
        };
        if watch {
            shared.watched.remove(lane);
        }
        if settle {
            self.settle_oldest(true).await
        } else {
            self.more = true;
            Ok(())
        }
    }

    /// Settles the oldest batch in flight (marks, retries, dead letters), then (`rest`) rests under
    /// the adaptive pace and backs off after an unavailable broker.
    async fn settle_oldest(&mut self, rest: bool) -> Result<(), LaneExit> {
        let shared = self.shared;
        let Some((mut batch, sent)) = self.flight.pop().await else {
            return Ok(());
        };
        let flight = &mut self.flight;
        let mut give_up = || {
            batch.turns = (None, None);
            flight.give_up_turns();
        };
        let done = crate::batch::settle_sent(shared, self.lease, sent, &mut give_up, self.stop).await?;
        self.publish_took = done.publish_took;
        let now = Instant::now();
        self.retries.extend(done.retry_in.iter().map(|d| now + *d));
        while self.retries.len() > RETRIES_KEPT {
            // The rows of the latest are found by an earlier look or at the poll.
            self.retries.pop_last();
        }
        if let Some(ahead) = &mut self.ahead {
            ahead.retain(|r| !r.key.as_deref().is_some_and(|k| done.blocked.contains(k)));
        }
        // A full batch leaves more behind; so do keys that waited for a batch in flight, rows the
        // batch left pending without a delay, and rows claimed ahead (their commits' wake-up may
        // be spent already: on the batch they were claimed beside). A lane that a commit wakes
        // waits for that (a row committed while the batch was in flight has woken it already);
        // another one looks once more. Rows backed off are looked for when their delay ends
        // (`retries`).
        let ahead = self.ahead.as_ref().is_some_and(|rows| !rows.is_empty());
        self.more |=
            batch.full || std::mem::take(&mut self.held) || done.left_pending || ahead || !self.woken_by_commits();
        if !rest {
            return Ok(());
        }
        if let (Some(pace), Some(paced), true) = (&shared.adaptive, batch.turns.1.as_mut(), batch.full) {
            // Below one lane's worth, the working lane rests in proportion before its next turn,
            // holding it (but no longer counted as a round under way), not its busy slot (lanes
            // that keep up need only that one, and it held them back). Not after a short batch:
            // the lane has caught up, its next claim takes no turn, and a rest would only keep it
            // from asking writers for NOTIFY and from claiming the rows committed meanwhile.
            paced.resting();
            batch.turns.0 = None;
            if pace.rest(self.stop, batch.started.elapsed(), batch.newest).await {
                return Err(LaneExit::Stopped);
            }
        }
        drop(batch);
        if back_off(&shared.backoff, self.stop, done.unavailable, &mut self.outages).await {
            return Err(LaneExit::Stopped);
        }
        Ok(())
    }

    /// Asked to stop: settles every batch in flight (so nothing published is sent again by the
    /// next owner), then gives the lane up. A batch whose marks fail (given up after a few tries:
    /// its rows stay pending) does not end it: the batches after it are still waited for, and
    /// marked if the store takes it, so that no copy of their rows is still on its way to the
    /// broker when the next owner sends them again. The first such exit is the lane's.
    async fn finish(&mut self) -> LaneExit {
        let mut failed = None;
        while !self.flight.is_empty() {
            if let Err(exit) = self.settle_oldest(false).await {
                failed.get_or_insert(exit);
            }
        }
        failed.unwrap_or(LaneExit::Stopped)
    }
}

/// Writes the lane's idle flag; false when the database refused it (logged, not fatal: the caller
/// decides what the refusal means).
async fn set_idle<S: Store, P>(shared: &Shared<S, P>, lease: &Lease, idle: bool) -> bool {
    let Some(wakeups) = shared.store.wakeups() else {
        return true;
    };
    match shared.counted_write(wakeups.set_idle(lease, idle)).await {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, idle, "could not record the lane's idle flag");
            false
        }
    }
}
