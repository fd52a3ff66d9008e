//! The conformance suite every `Store` backend passes. `conformance_suite!(Db, fresh)` expands to one
//! `#[tokio::test]` per guarantee, where `fresh` is a future of a new, migrated `Pool<Db>`; the store
//! on it is the one [`Dialect::store`](crate::inbox_suite::Dialect::store) gives.
//! `conformance_suite!(Db, fresh, single_writer)` is for databases with one write transaction at a
//! time (SQLite), where one scenario cannot be staged as written (see
//! `late_commit_with_lower_id_is_still_claimed`).
//! Statements in the suite are written in the SQL all backends share (no bind placeholders).
//! The scenarios are in two hidden macros, `writes` and `claims`, which the suite expands after its
//! helpers.

mod claims;
mod writes;

use std::time::Duration;

use outbox::{Lease, Store, LANES};

/// Owner name used by suite tests.
pub const OWNER: &str = "suite-owner";

/// Takes every lane for `owner` (fresh database: all lanes are free).
pub async fn take_all(store: &dyn Store, owner: &str) -> Vec<Lease> {
    let leases = store
        .acquire(owner, LANES as usize, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(leases.len(), LANES as usize, "a fresh database has every lane free");
    leases
}

/// The lease of `lane` among `leases`.
pub fn lease_of(leases: &[Lease], lane: i32) -> &Lease {
    leases.iter().find(|l| l.lane == lane).expect("lease for lane")
}

/// Claims every lane once and returns all rows.
pub async fn claim_all(store: &dyn Store, leases: &[Lease]) -> Vec<outbox::StoredMessage> {
    let mut out = Vec::new();
    for l in leases {
        out.extend(store.claim(l, 10_000, &[]).await.unwrap());
    }
    out
}

/// The payloads of `rows` in order; with `key`, only those of that key.
pub fn payloads<'r>(rows: &'r [outbox::StoredMessage], key: Option<&str>) -> Vec<&'r [u8]> {
    rows.iter()
        .filter(|r| key.is_none() || r.key.as_deref() == key)
        .map(|r| r.payload.as_slice())
        .collect()
}

/// Claims every lane every 50 ms until `ready` holds of the rows, and returns them; fails with
/// `never` after 10 s.
pub async fn claim_until(
    store: &dyn Store,
    leases: &[Lease],
    ready: impl Fn(&[outbox::StoredMessage]) -> bool,
    never: &str,
) -> Vec<outbox::StoredMessage> {
    let start = std::time::Instant::now();
    loop {
        let rows = claim_all(store, leases).await;
        if ready(&rows) {
            return rows;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{never}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[macro_export]
macro_rules! conformance_suite {
    (@suite $db:ty, $fresh:expr, $single_writer:expr) => {
        /// One write transaction at a time (SQLite): `late_commit_with_lower_id_is_still_claimed`.
        const SINGLE_WRITER: bool = $single_writer;

        use std::sync::Arc;
        use std::time::{Duration, Instant};

        use outbox::{Delivered, Error, Message, Store};
        use $crate::conformance::{claim_all, claim_until, lease_of, payloads, take_all, OWNER};
        use $crate::db::commit_each;

        async fn fresh() -> (sqlx::Pool<$db>, Arc<dyn Store>) {
            let pool: sqlx::Pool<$db> = $fresh.await;
            let store = <$db as $crate::inbox_suite::Dialect>::store(pool.clone());
            sqlx::raw_sql("CREATE TABLE biz (id BIGINT PRIMARY KEY)").execute(&pool).await.unwrap();
            (pool, store)
        }

        /// [`fresh`], with every lane taken by [`OWNER`].
        async fn fresh_with_leases() -> (sqlx::Pool<$db>, Arc<dyn Store>, Vec<outbox::Lease>) {
            let (pool, store) = fresh().await;
            let leases = take_all(&*store, OWNER).await;
            (pool, store, leases)
        }

        async fn biz_rows(pool: &sqlx::Pool<$db>) -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM biz").fetch_one(pool).await.unwrap()
        }

        fn delivered(rows: &[outbox::StoredMessage]) -> Vec<Delivered> {
            rows.iter().map(|r| Delivered::new(r.pos).at(0, 0)).collect()
        }

        $crate::__conformance_writes!();
        $crate::__conformance_claims!();
    };
    ($db:ty, $fresh:expr, single_writer) => {
        $crate::conformance_suite!(@suite $db, $fresh, true);
    };
    ($db:ty, $fresh:expr) => {
        $crate::conformance_suite!(@suite $db, $fresh, false);
    };
}
