//! Waiting for a condition with a deadline: the one loop every test that waits for something uses.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 50 ms until it returns `Ok`, failing the test after `within` with `what` and
/// the last `Err` (what was seen instead).
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) => assert!(start.elapsed() < within, "{what}: not within {within:?}; {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `cond` holds, failing the test with `what` after `within`.
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until(what, within, || {
        let c = cond();
        async move { c.await.then_some(()).ok_or_else(|| "still not".to_owned()) }
    })
    .await
}

/// Waits until `table` on `pool` has no rows, failing the test with `what` after `within`.
pub async fn until_empty(pool: &sqlx::PgPool, table: &str, what: &str, within: Duration) {
    let count = format!("SELECT count(*) FROM {table}");
    wait_for(what, within, || async {
        crate::db::scalar::<_, i64>(pool, &count).await == 0
    })
    .await
}
