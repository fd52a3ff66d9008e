//! The lane's waits: the relay's rate, the backoff after an unavailable broker, a pause that a
//! stop cuts short.

use std::time::Duration;

use outbox::Backoff;
use tokio_util::sync::CancellationToken;

/// After a round in which the broker was unavailable, waits (growing with each such round in a
/// row) before the lane tries again; true when stopped meanwhile.
pub(crate) async fn back_off(
    backoff: &Backoff,
    stop: &CancellationToken,
    unavailable: bool,
    outages: &mut u32,
) -> bool {
    if !unavailable {
        *outages = 0;
        return false;
    }
    *outages += 1;
    pause(stop, backoff.delay(*outages)).await
}

/// Waits until the relay's pace allows the `n` messages of a batch, all at once, so that lanes take
/// turns batch by batch (asked piecemeal, 32 lanes would share the rate and every batch would wait
/// for the slowest share). A batch larger than the limiter's burst (one second's worth) goes message
/// by message. True when stopped meanwhile.
pub(crate) async fn pace(rate: &governor::DefaultDirectRateLimiter, n: usize, stop: &CancellationToken) -> bool {
    let Some(want) = std::num::NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
        return false;
    };
    let ready = async {
        if rate.until_n_ready(want).await.is_err() {
            for _ in 0..want.get() {
                rate.until_ready().await;
            }
        }
    };
    tokio::select! {
        _ = ready => false,
        _ = stop.cancelled() => true,
    }
}

/// Runs `f` and says how long it took.
pub(crate) async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = std::time::Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// Sleeps `d` unless stopped first; true when stopped.
pub(crate) async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}
