use super::*;

const SLOWDOWN: f64 = crate::RelayConfig::DEFAULT_PACE_SLOWDOWN;

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

#[test]
fn without_a_busy_service_the_pace_doubles_to_every_lane() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    // The relay alone slows commits down tenfold: nobody else needs them.
    for _ in 0..6 {
        c.cycle(us(400), us(4000), None, now);
        now += CYCLE;
    }
    assert_eq!(c.level, f64::from(LANES));
}

#[test]
fn a_busy_service_cuts_the_pace_in_proportion_down_to_the_floor() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    for _ in 0..6 {
        c.cycle(us(400), us(4000), None, now);
        now += CYCLE;
    }
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
    for _ in 0..12 {
        c.cycle(us(3000), us(9000), Some(true), now);
        now += CYCLE;
    }
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
    assert_eq!(c.service_busy(Some(0), 0, at(0)), None, "one sample: no rate yet");
    // The relay alone: 200 of its own transactions a second, the database counts them.
    assert_eq!(c.service_busy(Some(200), 200, at(1)), Some(false));
    // Another relay as busy: 400 a second counted, 200 of them ours.
    assert_eq!(c.service_busy(Some(600), 400, at(2)), Some(false));
    assert_eq!(c.service_busy(Some(1000), 600, at(3)), Some(false));
    // A service committing 3,000 a second.
    for s in 4..8 {
        let database = 1000 + (s as i64 - 3) * 3200;
        c.service_busy(Some(database), 600 + (s - 3) * 200, at(s));
    }
    assert_eq!(c.service_busy(Some(1000 + 5 * 3200), 600 + 5 * 200, at(8)), Some(true));
    assert_eq!(c.service_busy(None, 0, at(9)), None, "no count: the latency decides");
}

#[test]
fn a_busy_service_by_the_counts_holds_the_pace_even_when_quiet_commits_are_quick() {
    let mut c = Control::new(SLOWDOWN);
    let mut now = Instant::now();
    for _ in 0..6 {
        c.cycle(us(110), us(4000), Some(false), now);
        now += CYCLE;
    }
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
    assert_eq!(c.permits, 3, "every permit in use: none taken back yet");
    drop((a, b));
    c.apply(&pace);
    assert_eq!(c.permits, 1, "taken back once their lanes finished");
    drop(_c);
    pace.quiet.send_replace(true);
    let waiting = tokio::time::timeout(Duration::from_millis(100), pace.turn()).await;
    assert!(waiting.is_err(), "no turn during the quiet window");
    pace.quiet.send_replace(false);
    let _d = tokio::time::timeout(Duration::from_secs(1), pace.turn()).await.unwrap();
}
