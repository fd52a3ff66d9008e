//! A crash at each point of a batch's life (`OUTBOX_RELAY_CRASH_AT`), then a restart.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use outbox_tests::daemon::{pending, wait_pending_below};

use super::setup;

/// Crashes the relay at `point` (the n-th time any lane passes it), restarts it without the crash
/// point, and checks nothing was lost, duplicates stay within one batch per lane, order held.
async fn crash_then_restart(point: &str) {
    let s = setup(&format!("crash-{point}"), 4, 1).await;
    let batch = 50;
    let ids = s.enqueue(3000, 100).await;
    let mut relay = s
        .relay(batch)
        .env("OUTBOX_RELAY_CRASH_AT", &format!("{point}:20"))
        .spawn();
    let st = relay.wait_exit(Duration::from_secs(60));
    assert_eq!(
        st.signal(),
        Some(6),
        "the relay must abort (SIGABRT) at {point}: {st:?}\n{}",
        relay.tail(20)
    );
    assert_eq!(
        relay.count("OUTBOX_RELAY_CRASH_AT: aborting at"),
        1,
        "{}",
        relay.tail(20)
    );
    let left = pending(&s.store).await;
    assert!(left > 0, "crashed before the end");

    // The restarted relay takes the lanes over once the dead relay's leases expire.
    let started = Instant::now();
    let mut relay = s.relay(batch).spawn();
    wait_pending_below(&s.store, 1, Duration::from_secs(90)).await;
    let took = started.elapsed();
    relay.terminate();

    let dups = s.check_within_a_batch_per_lane(&ids, batch).await;
    eprintln!("crash at {point}: {left} pending at the crash, drained {took:.1?} after the restart, {dups} duplicates");
}

/// One test per crash point: each crashes the relay there, restarts it and checks the outbox.
macro_rules! crash_points {
    ($($name:ident: $point:literal),* $(,)?) => {$(
        #[cfg_attr(
            not(feature = "failpoints"),
            ignore = "needs --features outbox-cli/failpoints (.ci/test)"
        )]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            crash_then_restart($point).await;
        }
    )*};
}

crash_points! {
    crash_after_claim_then_restart_loses_nothing: "after_claim",
    crash_during_publish_then_restart_loses_nothing: "during_publish",
    crash_before_mark_then_restart_loses_nothing: "before_mark",
    crash_during_mark_then_restart_loses_nothing: "during_mark",
    crash_after_mark_then_restart_loses_nothing: "after_mark",
}
