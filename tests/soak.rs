//! Soak: streams N committed messages (writers also rolling transactions back) into PostgreSQL while
//! an `outbox-relay` daemon publishes them and is SIGKILLed and restarted every few seconds, and a
//! consumer service (ConsumerRunner + Inbox) applies them into its own database. An independent
//! Kafka reader and the consumer's database are then compared with what the writers committed.
//!
//! With `--cluster N` the soak starts a Kafka cluster of its own (N KRaft nodes, `.ci/kafka`; with
//! 3 or more nodes, replication factor 3 and `min.insync.replicas=2`), and with
//! `--broker-kill-every-ms` it also SIGKILLs one random node of that cluster on a schedule and
//! restarts it on its log dirs a few seconds later (never two nodes down at once), until the
//! consumers have caught up.
//!
//! ```sh
//! cargo run --release -p outbox-tests --bin soak -- --messages 1000000
//! cargo run --release -p outbox-tests --bin soak -- --messages 20000 --cluster 3 --broker-kill-every-ms 10000
//! ```
//!
//! Prints lost / rolled-back-leaked / per-key-inversions / duplicate-effects counts (and the wire
//! duplicates against their bound) and exits non-zero if any is above zero. Needs the local
//! PostgreSQL and, without `--cluster` or `--bootstrap`, the local Kafka broker (started by
//! `.ci/kafka` if down), like the tests. `--help` lists the options.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::StoreAdmin;
use outbox_inbox::Inbox;
use outbox_kafka::{ConsumerConfig, ConsumerRunner};
use outbox_tests::daemon::{db_url, RelayArgs, RelayProcess};

#[path = "soak/args.rs"]
mod args;
#[path = "soak/brokers.rs"]
mod brokers;
#[path = "soak/verdict.rs"]
mod verdict;
#[path = "soak/wire.rs"]
mod wire;
#[path = "soak/writers.rs"]
mod writers;

use args::{parse_args, Args};
use brokers::spawn_broker_killer;
use verdict::{catch_up, judge, Run};
use wire::{spawn_reader, Wire};
use writers::{write, Written};

/// Builds the `outbox-relay` daemon with cargo (same profile as this binary) and returns its path.
fn relay_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "outbox-cli", "--bin", "outbox-relay"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build for outbox-relay");
    assert!(st.success(), "building outbox-relay failed");
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("target dir").join("outbox-relay")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    // Killed brokers make librdkafka log every refused connection as an error: not shown unless
    // RUST_LOG asks for them.
    let default_log = if args.broker_kill_every.is_some() {
        "error,librdkafka=off,rdkafka::client=off"
    } else {
        "error"
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_log.into()))
        .with_writer(std::io::stderr)
        .init();
    let relay_bin = args.relay_bin.clone().map(PathBuf::from).unwrap_or_else(relay_binary);
    // An absolute path, checked now: a missing binary must stop the run, not leave it writing
    // into an outbox nobody drains.
    let relay_bin = match relay_bin.canonicalize() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("relay binary {}: {e}", relay_bin.display());
            return ExitCode::from(2);
        }
    };
    let topic = outbox_tests::kafka::topic("soak");
    let (bootstrap, _mock, cluster) = brokers::kafka(&args, &topic).await;
    let src = outbox_tests::db::fresh_pg().await;
    let dst = outbox_tests::db::fresh_pg().await;
    sqlx::query(outbox_tests::effects::CREATE_EFFECTS)
        .execute(&dst)
        .await
        .unwrap();
    let store = outbox::postgres::PgStore::new(src.clone());
    announce(&args, &src, &dst, &topic, &bootstrap);
    let started = Instant::now();

    // The consumer service.
    let group = format!("soak-{}", uuid::Uuid::new_v4().simple());
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let settings = [
            ("bootstrap.servers", bootstrap.as_str()),
            ("group.id", group.as_str()),
            ("session.timeout.ms", "10000"),
        ];
        let runner = ConsumerRunner::new(
            settings,
            &[topic.as_str()],
            dst.clone(),
            Inbox::new("soak"),
            outbox_tests::effects::EffectRows,
        )
        .expect("consumer")
        .config(ConsumerConfig::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            runner
                .run_until(async {
                    let _ = rx.await;
                })
                .await
        });
        consumers.push((tx, task));
    }
    // The independent reader.
    let wire = Arc::new(Mutex::new(Wire::default()));
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(&bootstrap, &topic, wire.clone(), stop_reader.clone());

    // The relay, killed and restarted on a schedule until the backlog is gone.
    let relay_args = RelayArgs::new(
        relay_bin.to_str().expect("utf-8 path"),
        &db_url(&src),
        &bootstrap,
        args.batch,
    )
    .lease_ttl_ms(args.lease_ttl_ms)
    .log("error");
    let kills = Arc::new(AtomicU64::new(0));
    let writers_done = Arc::new(AtomicBool::new(false));
    let supervisor = spawn_supervisor(
        relay_args,
        kills.clone(),
        writers_done.clone(),
        store.clone(),
        args.kill_every,
    );

    // The broker killer, until the consumers have caught up.
    let broker_kills = Arc::new(AtomicU64::new(0));
    let stop_broker_kills = Arc::new(AtomicBool::new(false));
    let broker_killer = match (&cluster, args.cluster, args.broker_kill_every) {
        (Some(c), Some(nodes), Some(every)) => Some(spawn_broker_killer(
            c.clone(),
            nodes,
            every,
            stop_broker_kills.clone(),
            broker_kills.clone(),
            started,
        )),
        _ => None,
    };

    // Writers.
    let left = Arc::new(AtomicUsize::new(args.messages));
    let writers: Vec<_> = (0..args.writers)
        .map(|w| tokio::spawn(write(src.clone(), topic.clone(), args.clone(), w, left.clone())))
        .collect();
    let progress = {
        let (store, dst, wire, kills, broker_kills, left, total) = (
            store.clone(),
            dst.clone(),
            wire.clone(),
            kills.clone(),
            broker_kills.clone(),
            left.clone(),
            args.messages,
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let pending = store.status().await.map(|s| s.pending).unwrap_or(-1);
                let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
                    .fetch_one(&dst)
                    .await
                    .unwrap_or(-1);
                let (seen, records) = {
                    let w = wire.lock().unwrap();
                    (w.seen.len(), w.records)
                };
                println!(
                    "  {:>6.0?}  committed {:>8}  pending {:>7}  on the wire {:>8} ({} records)  applied {:>8}  kills {}  \
                     broker kills {}",
                    started.elapsed(),
                    total - left.load(Relaxed),
                    pending,
                    seen,
                    records,
                    applied,
                    kills.load(Relaxed),
                    broker_kills.load(Relaxed)
                );
            }
        })
    };
    let mut supervisor = supervisor;
    let all_written = async {
        let mut written = Written::default();
        for w in writers {
            let part = w.await.expect("writer");
            written.committed.extend(part.committed);
            written.rolled_back.extend(part.rolled_back);
        }
        written
    };
    // The supervisor ends only once everything is drained: earlier means the relay could not be
    // started or exited by itself, and the run stops here.
    let written = tokio::select! {
        written = all_written => written,
        early = &mut supervisor => {
            eprintln!("the relay supervisor stopped before the writers were done: {:?}", early.err());
            return ExitCode::FAILURE;
        }
    };
    writers_done.store(true, Relaxed);
    let committed: HashSet<uuid::Uuid> = written.committed.iter().copied().collect();
    let rolled_back: HashSet<uuid::Uuid> = written.rolled_back.iter().copied().collect();
    println!(
        "writers done after {:.0?}: {} committed, {} rolled back",
        started.elapsed(),
        committed.len(),
        rolled_back.len()
    );

    // Drained: the supervisor stops killing and hands the last relay back; it must stop cleanly.
    let mut relay = supervisor.await.expect("supervisor");
    relay.signal("-TERM");
    let relay_exit = relay.wait_exit(Duration::from_secs(60));
    let kills = kills.load(Relaxed);
    println!(
        "drained after {:.0?}; relay killed {kills} times; last relay exit: {relay_exit}",
        started.elapsed()
    );

    catch_up(&committed, &wire, &dst).await;
    // No more broker kills: the node that is down comes back before the last reads.
    stop_broker_kills.store(true, Relaxed);
    if let Some(k) = broker_killer {
        k.await.expect("broker killer");
    }
    let broker_kills = broker_kills.load(Relaxed);
    // Late duplicates.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (tx, task) in consumers {
        let _ = tx.send(());
        if let Err(e) = task.await.expect("consumer task") {
            println!("consumer stopped with an error: {e}");
        }
    }
    stop_reader.store(true, Relaxed);
    reader.await.expect("reader");
    progress.abort();

    // The verdict.
    let run = Run {
        wire: std::mem::take(&mut *wire.lock().unwrap()),
        committed,
        rolled_back,
        kills,
        broker_kills,
        batch: args.batch,
        started,
        relay_exit,
    };
    let failed = judge(run, &dst, &store).await;
    brokers::finish(cluster, failed);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints what the run is about to do.
fn announce(args: &Args, src: &sqlx::PgPool, dst: &sqlx::PgPool, topic: &str, bootstrap: &str) {
    println!(
        "soak: {} messages at {}/s, {} writers, {} keys + hot key ({}%), {}% rollbacks, relay batch {} killed every \
         {:?} (lease {} ms), {} partitions, {} consumers",
        args.messages,
        args.rate,
        args.writers,
        args.keys,
        args.hot_share,
        args.rollback_pct,
        args.batch,
        args.kill_every,
        args.lease_ttl_ms,
        args.partitions,
        args.consumers
    );
    println!(
        "      source {}  consumer db {}  topic {topic}",
        db_url(src),
        db_url(dst)
    );
    match (args.cluster, args.broker_kill_every) {
        (Some(n), Some(every)) => println!("      kafka: own cluster of {n} nodes, one node SIGKILLed every {every:?}"),
        (Some(n), None) => println!("      kafka: own cluster of {n} nodes, no broker kills"),
        _ => println!("      kafka: {bootstrap}"),
    }
}

/// Runs the relay, SIGKILLed and started again every `every`, until the writers are done and
/// nothing is pending; then hands the last relay back. Counts the kills in `kills`.
fn spawn_supervisor(
    relay_args: RelayArgs,
    kills: Arc<AtomicU64>,
    writers_done: Arc<AtomicBool>,
    store: outbox::postgres::PgStore,
    every: Duration,
) -> tokio::task::JoinHandle<RelayProcess> {
    tokio::spawn(async move {
        let mut relay: RelayProcess = relay_args.spawn();
        loop {
            tokio::time::sleep(every).await;
            if writers_done.load(Relaxed) && store.status().await.map(|s| s.pending == 0).unwrap_or(false) {
                return relay;
            }
            assert!(relay.running(), "the relay exited by itself:\n{}", relay.tail(20));
            relay.kill();
            kills.fetch_add(1, Relaxed);
            relay = relay_args.spawn();
        }
    })
}
