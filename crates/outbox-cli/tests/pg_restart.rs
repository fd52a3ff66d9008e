//! PostgreSQL restarted (`pg_ctlcluster ... restart -m fast`) while services commit and the relay
//! daemon drains: every connection is terminated, new ones are refused for a moment. Afterwards
//! the truth is the business table: every order that exists was published (and nothing else), per
//! key in order, duplicates bounded.
//!
//! This binary holds this one test on purpose: cargo runs test binaries one after another, so the
//! restart disturbs no other test. It restarts the machine's PostgreSQL cluster (root, `pg_ctlcluster`);
//! set `OUTBOX_TEST_NO_PG_RESTART=1` to skip it on a server you do not own.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ids_of;
use outbox::{Message, StoreAdmin, LANES};
use outbox_tests::daemon::{db_url, wait_pending_below, RelayArgs};
use outbox_tests::kafka::{check_delivery, read_all, PgTopic};

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a cluster version");
    let st = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart", "-m", "fast"])
        .status()
        .expect("run pg_ctlcluster");
    assert!(st.success(), "pg_ctlcluster restart failed");
}

/// One business transaction: `n` orders and their messages, or nothing.
async fn order(pool: &sqlx::PgPool, t: &str, n: usize, round: usize) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let msgs: Vec<Message> = (0..n)
        .map(|i| Message::new(t, format!("order {round}-{i}")).key(format!("customer-{}", (round * n + i) % 50)))
        .collect();
    for m in &msgs {
        sqlx::query("INSERT INTO orders (id) VALUES ($1)")
            .bind(m.id())
            .execute(&mut *tx)
            .await?;
    }
    outbox::enqueue_batch(&mut tx, &msgs)
        .await
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    tx.commit().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_nothing() {
    if std::env::var_os("OUTBOX_TEST_NO_PG_RESTART").is_some() {
        eprintln!("skipped: OUTBOX_TEST_NO_PG_RESTART is set");
        return;
    }
    let (bootstrap, t, pool, _) = PgTopic::new("pg-restart", 4).await.into_parts();
    outbox_tests::db::exec(&pool, "CREATE TABLE orders (id UUID PRIMARY KEY)").await;
    let store = outbox::postgres::PgStore::new(pool.clone());
    let batch = 100;
    let mut relay = RelayArgs::new(BIN, &db_url(&pool), &bootstrap, batch).spawn();

    // Two writers commit orders continuously; failures (the restart) are retried by the next round.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (pool, t, stop, failed) = (pool.clone(), t.clone(), stop.clone(), failed.clone());
            tokio::spawn(async move {
                let mut round = w * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    if order(&pool, &t, 10, round).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    restart_postgres();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(relay.running(), "the relay died with the database:\n{}", relay.tail(20));
    wait_pending_below(&store, 1, Duration::from_secs(90)).await;
    relay.terminate();
    assert!(store.dead_letters(10).await.unwrap().is_empty());

    // What committed is what the business table holds, whatever the clients were told.
    let committed = ids_of(&pool, "SELECT id FROM orders").await;
    assert!(committed.len() > 500, "the writers got work done ({})", committed.len());
    let seen = read_all(&bootstrap, &t, &committed).await;
    let dups = check_delivery(&seen, &committed);
    let bound = batch * LANES as usize;
    assert!(dups <= bound, "{dups} duplicates exceed one batch per lane ({bound})");
    eprintln!(
        "PostgreSQL restart: {} orders committed, {} writer rounds failed, drained {:.1} s after the restart, \
         {dups} duplicates",
        committed.len(),
        failed.load(Ordering::Relaxed),
        restarted.elapsed().as_secs_f64()
    );
}
