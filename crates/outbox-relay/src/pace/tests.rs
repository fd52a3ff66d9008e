use super::*;

const SLOWDOWN: f64 = crate::RelayConfig::DEFAULT_PACE_SLOWDOWN;

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

/// Runs `cycles` pace cycles of the same figures, one `CYCLE` apart from `now` on, and leaves
/// `now` at the next cycle's start.
fn run_cycles(
    c: &mut Control,
    now: &mut Instant,
    cycles: usize,
    quiet: Duration,
    working: Duration,
    service: Option<bool>,
) {
    for _ in 0..cycles {
        c.cycle(quiet, working, service, *now);
        *now += CYCLE;
    }
}

/// Counts of finished transactions only (as the database reports them about once a second).
fn finished(n: i64) -> ProbeCounts {
    ProbeCounts::new(Some(n), None)
}

#[test]
fn without_a_busy_service_the_pace_doubles_to_every_lane() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    // The relay alone slows commits down tenfold: nobody else needs them.
    run_cycles(&mut c, &mut now, 6, us(400), us(4000), None);
    assert_eq!(c.level, f64::from(LANES));
}

#[test]
fn a_busy_service_cuts_the_pace_in_proportion_down_to_the_floor() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    run_cycles(&mut c, &mut now, 6, us(400), us(4000), None);
    // The service commits (quiet 3 ms against a 0.4 ms baseline): the pace drops at once, then
    // is cut in proportion while the relay doubles the service's commit time.
    c.cycle(us(3000), us(6000), None, now);
    assert_eq!(c.level, BUSY_START);
    now += CYCLE;
    c.cycle(us(3000), us(6000), None, now);
    let cut = BUSY_START * (3000.0 * (1.0 + SLOWDOWN) / 6000.0);
    assert!((c.level - cut).abs() < 1e-9, "{} vs {cut}", c.level);
    for _ in 0..10 {
        now += CYCLE;
        c.cycle(us(3000), us(9000), None, now);
    }
    assert_eq!(c.level, FLOOR);
    // Within the allowed inflation the pace grows again, slowly.
    now += CYCLE;
    c.cycle(us(3000), us(3100), None, now);
    assert!((c.level - 2.0 * FLOOR).abs() < 1e-9, "{}", c.level);
}

#[test]
fn a_backlog_that_waited_too_long_keeps_one_lane_working_whatever_the_service() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    run_cycles(&mut c, &mut now, 12, us(3000), us(9000), Some(true));
    let max = Duration::from_secs(300);
    assert_eq!(
        c.bound_lag(Duration::from_secs(299), max),
        FLOOR,
        "within the bound the service wins"
    );
    assert_eq!(c.bound_lag(Duration::from_secs(301), max), 1.0);
    // The service still busy: cut again from there, and raised again while the lag lasts.
    c.cycle(us(3000), us(9000), Some(true), now);
    assert!(c.level < 1.0);
    assert_eq!(c.bound_lag(Duration::from_secs(302), max), 1.0);
}

#[test]
fn the_baseline_forgets_quiet_figures_older_than_its_window() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    c.cycle(us(100), us(100), None, now);
    // From now on every quiet commit takes 5 ms: a busy service against 0.1 ms, until that
    // figure is older than the window and 5 ms is the database at rest.
    now += CYCLE;
    c.cycle(us(5000), us(50_000), None, now);
    assert!(c.level < 1.0);
    now += BASELINE + CYCLE;
    c.cycle(us(5000), us(50_000), None, now);
    now += CYCLE;
    let before = c.level;
    c.cycle(us(5000), us(50_000), None, now);
    assert_eq!(c.level, (before * 2.0).min(f64::from(LANES)));
}

#[test]
fn the_transaction_counts_tell_a_busy_service_from_the_relay_and_its_peers() {
    let mut c = Control::new(SLOWDOWN);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(
        c.counts.service_busy(finished(0), 0, at(0)),
        None,
        "one sample: no rate yet"
    );
    // The relay alone: 200 of its own transactions a second, the database counts them.
    assert_eq!(c.counts.service_busy(finished(200), 200, at(1)), Some(false));
    // Another relay as busy: 400 a second counted, 200 of them ours.
    assert_eq!(c.counts.service_busy(finished(600), 400, at(2)), Some(false));
    assert_eq!(c.counts.service_busy(finished(1000), 600, at(3)), Some(false));
    // A service committing 3,000 a second.
    for s in 4..8 {
        let database = 1000 + (s as i64 - 3) * 3200;
        c.counts.service_busy(finished(database), 600 + (s - 3) * 200, at(s));
    }
    assert_eq!(
        c.counts.service_busy(finished(1000 + 5 * 3200), 600 + 5 * 200, at(8)),
        Some(true)
    );
    assert_eq!(
        c.counts.service_busy(ProbeCounts::default(), 0, at(9)),
        None,
        "no count: the latency decides"
    );
}

#[test]
fn a_service_waking_up_is_told_at_the_first_probe_that_sees_its_count() {
    let mut c = Control::new(SLOWDOWN);
    let t0 = Instant::now();
    let probe = CYCLE / 8;
    // The relay alone, probed 8 times a second: 100 of its own transactions a second.
    let mut answers = Vec::new();
    for i in 0..24u32 {
        let own = u64::from(i) * 100 / 8;
        answers.push(c.counts.service_busy(finished(own as i64), own, t0 + probe * i));
    }
    assert_eq!(&answers[..8], &[None; 8], "less than a second of counts: no rate");
    assert!(answers[8..].iter().all(|a| *a == Some(false)), "{answers:?}");
    // A service's connections report a second of 5,000 transactions a second at once.
    let own = 24 * 100 / 8;
    assert_eq!(
        c.counts.service_busy(finished(own as i64 + 5000), own, t0 + probe * 24),
        Some(true)
    );
    // The pace drops to its busy start there, and the cycle's end does not drop it twice.
    c.level = f64::from(LANES);
    assert_eq!(c.became_busy(), BUSY_START);
    c.cycle(us(300), us(320), Some(true), t0 + probe * 32);
    assert!((c.level - (BUSY_START + FLOOR)).abs() < 1e-9, "{}", c.level);
}

#[test]
fn a_service_that_starts_writing_is_told_by_the_ids_it_takes_before_its_counts_arrive() {
    let mut c = Control::new(SLOWDOWN);
    let t0 = Instant::now();
    let probe = CYCLE / 8;
    // Every probe: the relay's 40 transactions, all writes, and no finished count from the
    // service yet (its connections add theirs a second later).
    let mut own = 0u64;
    let mut ids = 0i64;
    let mut answer = |c: &mut Control, i: u32, service_writes: i64| {
        own += 40;
        ids += 40 + service_writes;
        c.counts
            .service_busy(ProbeCounts::new(Some(own as i64), Some(ids)), own, t0 + probe * i)
    };
    assert_eq!(answer(&mut c, 0, 0), None);
    assert_eq!(answer(&mut c, 1, 0), None, "one probe apart: too short a span");
    assert_eq!(answer(&mut c, 2, 0), Some(false));
    // Another relay as busy as this one, writing as much: no service.
    for i in 3..6 {
        assert_eq!(answer(&mut c, i, 40), Some(false));
    }
    // A service writing 5,000 times a second (625 per probe) on top of it.
    assert_eq!(answer(&mut c, 6, 40 + 625), Some(true), "told at the first probe");
    assert!(
        c.counts.samples.len() > 3,
        "the finished counts keep their longer window"
    );
}

#[test]
fn a_busy_service_by_the_counts_holds_the_pace_even_when_quiet_commits_are_quick() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    run_cycles(&mut c, &mut now, 6, us(110), us(4000), Some(false));
    assert_eq!(c.level, f64::from(LANES));
    // Quiet commits barely slower than the baseline (the service is bound by CPU, not by the
    // database), yet the counts say it is busy: the relay's slowdown of commits is cut.
    c.cycle(us(140), us(350), Some(true), now);
    assert_eq!(c.level, BUSY_START, "dropped at once");
    now += CYCLE;
    c.cycle(us(140), us(350), Some(true), now);
    assert!(c.level < BUSY_START * 0.5, "{}", c.level);
}

#[test]
fn below_one_lane_the_lane_rests_in_proportion() {
    let pace = Adaptive::default();
    assert_eq!(pace.pause_after(Duration::from_millis(10)), Duration::ZERO);
    pace.milli.store(250, Ordering::Relaxed);
    assert_eq!(pace.pause_after(Duration::from_millis(10)), Duration::from_millis(30));
    // A round that waited on a lock for 12 s is counted as one of a second.
    pace.milli.store(50, Ordering::Relaxed);
    assert_eq!(pace.pause_after(Duration::from_secs(12)), Duration::from_secs(19));
}

#[tokio::test]
async fn a_resting_lane_counts_the_wait_behind_it_as_lag_and_stops_resting_when_the_pace_rises() {
    let pace = Arc::new(Adaptive::default());
    pace.milli.store(50, Ordering::Relaxed);
    let stop = tokio_util::sync::CancellationToken::new();
    let behind_since = chrono::Utc::now() - chrono::Duration::seconds(10);
    let rises = {
        let pace = Arc::clone(&pace);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let lag = pace.lag_ms.load(Ordering::Relaxed);
            pace.milli.store(1000, Ordering::Relaxed);
            lag
        })
    };
    let began = Instant::now();
    // At the floor, a round of a second rests 19 s.
    assert!(!pace.rest(&stop, Duration::from_secs(1), behind_since).await);
    let rested = began.elapsed();
    let lag_seen = rises.await.unwrap();
    assert!(lag_seen >= 10_000, "lag seen while resting: {lag_seen} ms");
    assert!(
        rested < Duration::from_secs(3),
        "rested {rested:?} after the pace rose to one lane"
    );
}

#[tokio::test]
async fn the_gate_lets_as_many_lanes_work_as_the_pace_allows_and_none_in_the_quiet() {
    let pace = Adaptive::default();
    let mut c = Control::new(SLOWDOWN);
    c.level = 2.5;
    c.apply(&pace);
    let a = pace.turn().await;
    let mut b = pace.turn().await;
    let _c = pace.turn().await;
    assert_eq!(pace.active.load(Ordering::Acquire), 3);
    assert!(pace.gate.try_acquire().is_err(), "3 permits at 2.5 lanes");
    b.resting();
    assert_eq!(
        pace.active.load(Ordering::Acquire),
        2,
        "a resting lane is no round under way"
    );
    c.level = 1.0;
    c.apply(&pace);
    let held = || pace.permits.lock().unwrap().held;
    assert_eq!(held(), 3, "every permit in use: none taken back yet");
    drop((a, b));
    assert_eq!(held(), 1, "taken back as their turns ended, before the next cycle");
    assert!(pace.gate.try_acquire().is_err(), "the one permit left is in use");
    drop(_c);
    assert_eq!(held(), 1, "the pace's own permit stays");
    pace.quiet.send_replace(true);
    let waiting = tokio::time::timeout(Duration::from_millis(100), pace.turn()).await;
    assert!(waiting.is_err(), "no turn during the quiet window");
    pace.quiet.send_replace(false);
    let _d = tokio::time::timeout(Duration::from_secs(1), pace.turn()).await.unwrap();
}

#[test]
fn lanes_linger_above_the_writes_given_and_stop_below_half_of_it() {
    let above = crate::RelayConfig::DEFAULT_LINGER_ABOVE_WRITES;
    assert!(
        !lanes_linger(200.0, false, above),
        "a few hundred commits a second: NOTIFY"
    );
    assert!(!lanes_linger(above, false, above));
    assert!(lanes_linger(above + 1.0, false, above));
    // Lingering, they go on down to half of it.
    assert!(lanes_linger(above / 2.0 + 1.0, true, above));
    assert!(!lanes_linger(above / 2.0, true, above));
    // 0: always.
    assert!(lanes_linger(0.0, false, 0.0));
}

#[test]
fn the_others_writes_leave_out_the_relays_own_writes_but_not_its_reads() {
    let mut counts = counts::Counts::default();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // 2,000 transaction ids a second, 1,500 of them the relay's marks; its 3,000 reads a second
    // (claims, looks) take none.
    counts.record(ProbeCounts::new(None, Some(10_000)), 0, 0, at(0));
    assert_eq!(counts.others_writes(), None, "a single sample spans no time");
    counts.record(ProbeCounts::new(None, Some(11_000)), 2_250, 750, at(500));
    assert_eq!(counts.others_writes(), None, "half a second is too short a span");
    counts.record(ProbeCounts::new(None, Some(12_000)), 4_500, 1_500, at(1000));
    assert_eq!(counts.others_writes(), Some(500.0));
    // Without the ids the database hands out, nothing to tell.
    counts.record(ProbeCounts::new(Some(1), None), 4_500, 1_500, at(1500));
    assert_eq!(counts.others_writes(), None);
}

#[test]
fn the_others_writes_leave_out_the_writes_the_store_counted_where_it_counts_them() {
    let mut counts = counts::Counts::default();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // 2,000 transaction ids a second, 1,000 of them the store's own statements; the relay made
    // 3,000 calls that write a second (the marks of three lanes shared each statement).
    let probe = |ids: i64, own: i64| ProbeCounts::new(None, Some(ids)).own_writes(Some(own));
    counts.record(probe(10_000, 100), 0, 0, at(0));
    counts.record(probe(11_000, 600), 0, 1_500, at(500));
    counts.record(probe(12_000, 1_100), 0, 3_000, at(1000));
    assert_eq!(counts.others_writes(), Some(1_000.0));
}

#[test]
fn a_service_is_busy_by_the_transactions_beyond_those_the_store_counted_where_it_counts_them() {
    let mut counts = counts::Counts::default();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // 3,000 transactions finished a second, 500 of them the store's own statements; the relay made
    // 3,000 calls a second (the claims of six lanes shared each statement). The others' 2,500 a
    // second are well beyond the relay's 500 and the margin: a service is busy.
    let probe = |finished: i64, own: i64| ProbeCounts::new(Some(finished), None).own_finished(Some(own));
    counts.record(probe(10_000, 100), 0, 0, at(0));
    counts.record(probe(11_500, 350), 1_500, 0, at(500));
    assert_eq!(counts.record(probe(13_000, 600), 3_000, 0, at(1000)), Some(true));
    // By the relay's count of its calls the others would have finished none.
    let mut calls = counts::Counts::default();
    let probe = |finished: i64| ProbeCounts::new(Some(finished), None);
    calls.record(probe(10_000), 0, 0, at(0));
    calls.record(probe(11_500), 1_500, 0, at(500));
    assert_eq!(calls.record(probe(13_000), 3_000, 0, at(1000)), Some(false));
}
