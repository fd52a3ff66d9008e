//! The consumer's database read-only or unreachable for a while mid-stream: nothing is
//! dead-lettered and every effect is there once afterwards.

use std::collections::HashSet;
use std::time::Duration;

use outbox_tests::effects::effects_db;
use outbox_tests::kafka::{broker, create_topic, read_until, topic};

use crate::{effect_counts, fast, produce, start, wait_effects, Effects};

/// Waits until the dead-letter topic `dlq` has stayed empty for 3 s; returns what it held.
async fn dead_letter_topic(bootstrap: &str, dlq: &str) -> usize {
    read_until(bootstrap, dlq, &HashSet::new(), Duration::from_secs(3), Duration::ZERO)
        .await
        .len()
}

/// Terminates every connection to `db` (they come back with the database's current settings).
async fn drop_connections(admin: &sqlx::PgPool, db: &str) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(db)
    .execute(admin)
    .await
    .unwrap();
}

/// A consumer database outage mid-stream: 400 messages, the runner on `runner_pool`; `outage`
/// breaks the database after the first 50 effects and mends it before returning. Afterwards every
/// effect is there once, nothing was dead-lettered, and the runner saw the outage.
async fn outage_mid_stream<F, Fut>(name: &str, pool: &sqlx::PgPool, runner_pool: sqlx::PgPool, outage: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let b = broker();
    let t = topic(name);
    let dlq = format!("{t}.dlq");
    create_topic(&b, &t, 2).await;
    create_topic(&b, &dlq, 1).await;
    let ids = produce(&b, &t, 400, 20, 1).await;
    let (stop, task, stats) = start(&b, &topic("g"), &t, runner_pool, Effects::default(), fast(), &[]);
    wait_effects(pool, 50, Duration::from_secs(60)).await;
    outage().await;
    wait_effects(pool, ids.len() as i64, Duration::from_secs(90)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(effect_counts(pool).await, (400, 400), "every effect exactly once");
    assert_eq!(stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(
        stats.infrastructure_retries.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the outage was seen"
    );
    assert_eq!(dead_letter_topic(&b, &dlq).await, 0, "nothing on the dead-letter topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_database_read_only_for_a_while_dead_letters_nothing() {
    let pool = effects_db().await;
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&outbox_tests::db::pg_url()).await.unwrap();
    // A failover's read-only phase for 3 s: every write of the inbox fails (SQLSTATE 25006).
    let read_only = |on: bool| {
        let sql = if on {
            format!("ALTER DATABASE {db} SET default_transaction_read_only = on")
        } else {
            format!("ALTER DATABASE {db} RESET default_transaction_read_only")
        };
        let (admin, db) = (admin.clone(), db.clone());
        async move {
            outbox_tests::db::exec(&admin, &sql).await;
            drop_connections(&admin, &db).await;
        }
    };
    outage_mid_stream("consume-read-only", &pool, pool.clone(), || async {
        read_only(true).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        read_only(false).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_database_unreachable_then_back_dead_letters_nothing() {
    let pool = effects_db().await;
    let proxy = outbox_tests::proxy::DbProxy::start().await;
    let through_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with((*pool.connect_options()).clone().port(proxy.port))
        .await
        .unwrap();
    // The database stops answering (connections dropped, new ones refused) for 15 s: longer than
    // max_attempts (5) tries of 2 s (the pool's acquire timeout) each.
    outage_mid_stream("consume-db-down", &pool, through_proxy, || async {
        proxy.cut();
        tokio::time::sleep(Duration::from_secs(15)).await;
        proxy.restore().await;
    })
    .await;
}
