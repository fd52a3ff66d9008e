//! Crash points for fault tests: `OUTBOX_RELAY_CRASH_AT=<point>:<n>` makes the process abort (like
//! SIGKILL: nothing flushed, nothing released) the n-th time a lane passes `<point>`. Compiled only
//! with the `failpoints` feature (`.ci/test` turns it on); without it [`hit`] is empty, so no
//! environment variable can abort a production relay.

#[cfg(feature = "failpoints")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

/// Where in a batch's life the relay can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    /// Rows claimed, nothing produced yet.
    AfterClaim,
    /// Abort a few milliseconds after produce started: messages in flight, reports not all back.
    DuringPublish,
    /// Every delivery report received, nothing marked yet.
    BeforeMark,
    /// Abort while the mark statement is on its way (it may or may not commit).
    DuringMark,
    /// The mark statement committed.
    AfterMark,
}

#[cfg(feature = "failpoints")]
fn parse(spec: &str) -> Option<(Point, u64)> {
    let (name, n) = spec.split_once(':').unwrap_or((spec, "1"));
    let point = match name {
        "after_claim" => Point::AfterClaim,
        "during_publish" => Point::DuringPublish,
        "before_mark" => Point::BeforeMark,
        "during_mark" => Point::DuringMark,
        "after_mark" => Point::AfterMark,
        _ => return None,
    };
    Some((point, n.parse().ok()?))
}

#[cfg(feature = "failpoints")]
static ARMED: OnceLock<Option<(Point, u64)>> = OnceLock::new();
#[cfg(feature = "failpoints")]
static HITS: AtomicU64 = AtomicU64::new(0);

/// Aborts the process if this is the armed point's n-th hit (only with the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_point: Point) {}

/// Aborts the process if this is the armed point's n-th hit.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(point: Point) {
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("OUTBOX_RELAY_CRASH_AT").ok()?;
        let parsed = parse(&spec);
        if parsed.is_none() {
            tracing::error!(%spec, "OUTBOX_RELAY_CRASH_AT not understood (after_claim|during_publish|before_mark|during_mark|after_mark[:n])");
        }
        parsed
    });
    if let Some((p, n)) = armed {
        if *p == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("OUTBOX_RELAY_CRASH_AT: aborting at {point:?} (hit {n})");
            if matches!(point, Point::DuringPublish | Point::DuringMark) {
                // Let the operation start, then die in the middle of it.
                std::thread::spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    std::process::abort();
                });
            } else {
                std::process::abort();
            }
        }
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse("before_mark:3"), Some((Point::BeforeMark, 3)));
        assert_eq!(parse("after_claim"), Some((Point::AfterClaim, 1)));
        assert_eq!(parse("nowhere:1"), None);
        assert_eq!(parse("after_mark:x"), None);
    }
}
