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

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::{Message, StoreAdmin, LANES};
use outbox_inbox::Inbox;
use outbox_kafka::{ConsumerConfig, ConsumerRunner};
use outbox_tests::daemon::{db_url, RelayArgs, RelayProcess};
use outbox_tests::kafka::Cluster;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::ClientConfig;

const USAGE: &str = "\
soak [--messages N] [--rate N] [--writers N] [--keys N] [--hot-share PCT] [--rollback-pct PCT]
     [--batch N] [--kill-every-ms MS] [--lease-ttl-ms MS] [--partitions N] [--consumers N]
     [--relay-bin PATH] [--bootstrap HOST:PORT|mock | --cluster N [--broker-kill-every-ms MS]]

  --messages       committed messages to stream (default 100000)
  --rate           committed messages per second, all writers together (default 2000; 0: no limit)
  --writers        concurrent writer tasks (default 4); each transaction enqueues 1-10 messages
  --keys           ordinary keys (default 1000), plus one hot key
  --hot-share      percent of messages on the hot key (default 10)
  --rollback-pct   percent of transactions rolled back after enqueueing (default 10)
  --batch          relay --batch-size (default 500)
  --kill-every-ms  SIGKILL and restart the relay this often (default 5000)
  --lease-ttl-ms   relay lease TTL; a restarted relay waits this long for the lanes (default 2000)
  --partitions     topic partitions (default 8)
  --consumers      ConsumerRunners in the consumer group (default 1)
  --relay-bin      outbox-relay binary (default: built with cargo, same profile as this binary)
  --bootstrap      Kafka bootstrap servers (default: the local Kafka broker, started if down);
                   `mock` runs librdkafka's mock cluster in this process instead
  --cluster        start a Kafka cluster of N KRaft nodes for this run (`.ci/kafka`, stopped at
                   the end); with N >= 3, replication factor 3 and min.insync.replicas=2.
                   Not with --bootstrap
  --broker-kill-every-ms
                   with --cluster: SIGKILL one random node this often (at least 1000; default 0:
                   never), restart it on its log dirs 3-5 s later and wait until every partition
                   is fully in sync again before the next kill (never two nodes down); kills go on
                   until the consumers have caught up. Each broker kill adds batch x 32 lanes to
                   the wire-duplicate bound";

#[derive(Debug, Clone)]
struct Args {
    messages: usize,
    rate: u64,
    writers: usize,
    keys: usize,
    hot_share: u32,
    rollback_pct: u32,
    batch: usize,
    kill_every: Duration,
    lease_ttl_ms: u64,
    partitions: i32,
    consumers: usize,
    relay_bin: Option<String>,
    bootstrap: Option<String>,
    cluster: Option<u16>,
    broker_kill_every: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        messages: 100_000,
        rate: 2000,
        writers: 4,
        keys: 1000,
        hot_share: 10,
        rollback_pct: 10,
        batch: 500,
        kill_every: Duration::from_secs(5),
        lease_ttl_ms: 2000,
        partitions: 8,
        consumers: 1,
        relay_bin: None,
        bootstrap: None,
        cluster: None,
        broker_kill_every: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--messages" => a.messages = num(&v)? as usize,
            "--rate" => a.rate = num(&v)?,
            "--writers" => a.writers = num(&v)?.max(1) as usize,
            "--keys" => a.keys = num(&v)?.max(1) as usize,
            "--hot-share" => a.hot_share = num(&v)?.min(100) as u32,
            "--rollback-pct" => a.rollback_pct = num(&v)?.min(90) as u32,
            "--batch" => a.batch = num(&v)?.max(1) as usize,
            "--kill-every-ms" => a.kill_every = Duration::from_millis(num(&v)?.max(500)),
            "--lease-ttl-ms" => a.lease_ttl_ms = num(&v)?.max(1000),
            "--partitions" => a.partitions = num(&v)?.max(1) as i32,
            "--consumers" => a.consumers = num(&v)?.max(1) as usize,
            "--relay-bin" => a.relay_bin = Some(v),
            "--bootstrap" => a.bootstrap = Some(v),
            "--cluster" => match num(&v)? {
                n @ 1..=10 => a.cluster = Some(n as u16),
                _ => return Err(format!("--cluster {v}: between 1 and 10 nodes")),
            },
            "--broker-kill-every-ms" => {
                a.broker_kill_every = match num(&v)? {
                    0 => None,
                    ms => Some(Duration::from_millis(ms.max(1000))),
                }
            }
            _ => return Err(format!("unknown option {flag}\n\n{USAGE}")),
        }
    }
    if a.cluster.is_some() && a.bootstrap.is_some() {
        return Err(format!(
            "--cluster and --bootstrap exclude each other: --cluster starts the cluster it uses\n\n{USAGE}"
        ));
    }
    if a.broker_kill_every.is_some() && a.cluster.is_none() {
        return Err(format!(
            "--broker-kill-every-ms needs --cluster: the soak only kills brokers it started\n\n{USAGE}"
        ));
    }
    Ok(a)
}

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

/// What the independent reader saw, folded as it reads (per key, first arrivals in seq order).
#[derive(Default)]
struct Wire {
    /// Ids seen at least once, with where they first arrived (partition, offset, key, seq).
    seen: HashMap<uuid::Uuid, (i32, i64, Option<String>, Option<i64>)>,
    /// Records read (duplicates included).
    records: u64,
    /// Per key, the seq of the latest first arrival.
    high: HashMap<String, i64>,
    /// First arrivals whose seq was not the key's previous first arrival + 1.
    inversions: u64,
    /// A few of them, for the report.
    examples: Vec<String>,
}

impl Wire {
    fn record(&mut self, id: uuid::Uuid, key: Option<String>, seq: Option<i64>, partition: i32, offset: i64) {
        self.records += 1;
        if self.seen.contains_key(&id) {
            return;
        }
        self.seen.insert(id, (partition, offset, key.clone(), seq));
        if let (Some(k), Some(q)) = (key, seq) {
            let h = self.high.entry(k.clone()).or_insert(0);
            if q != *h + 1 {
                self.inversions += 1;
                if self.examples.len() < 5 {
                    self.examples.push(format!(
                        "key {k}: seq {q} arrived first after seq {h} (p{partition}@{offset})"
                    ));
                }
            }
            *h = (*h).max(q);
        }
    }
}

fn spawn_reader(
    bootstrap: &str,
    topic: &str,
    wire: Arc<Mutex<Wire>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("soak-reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    tokio::spawn(async move {
        while !stop.load(Relaxed) {
            let Ok(res) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await else {
                continue;
            };
            let Ok(m) = res else { continue };
            let (mut id, mut key, mut seq) = (uuid::Uuid::nil(), None, None);
            if let Some(h) = m.headers() {
                for hd in h.iter() {
                    let v = String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned();
                    match hd.key {
                        outbox::HEADER_ID => id = v.parse().unwrap_or_default(),
                        outbox::HEADER_KEY => key = Some(v),
                        outbox::HEADER_SEQ => seq = v.parse().ok(),
                        _ => {}
                    }
                }
            }
            wire.lock().unwrap().record(id, key, seq, m.partition(), m.offset());
        }
    })
}

/// Whether every partition of every topic has all its replicas in sync and a leader, as the
/// cluster's metadata says (a restarted node has caught up). Blocking.
fn fully_in_sync(metadata: &BaseConsumer) -> bool {
    let Ok(md) = metadata.fetch_metadata(None, Duration::from_secs(5)) else {
        return false;
    };
    !md.topics().is_empty()
        && md.topics().iter().all(|t| {
            t.error().is_none()
                && t.partitions()
                    .iter()
                    .all(|p| p.error().is_none() && p.leader() >= 0 && p.isr().len() == p.replicas().len())
        })
}

/// Kills brokers of `cluster` until `stop`: every `every`, SIGKILLs one node picked at random,
/// restarts it on its log dirs 3-5 s later, and waits until every partition is fully in sync again
/// before the next kill may come (so never two nodes are down, nor one down while another is still
/// catching up). Counts the kills in `kills`.
fn spawn_broker_killer(
    cluster: Arc<Cluster>,
    nodes: u16,
    every: Duration,
    stop: Arc<AtomicBool>,
    kills: Arc<AtomicU64>,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut next = Instant::now() + every;
        loop {
            loop {
                if stop.load(Relaxed) {
                    return;
                }
                if Instant::now() >= next {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let node = rng.gen_range(1..=nodes);
            let down = Duration::from_millis(rng.gen_range(3000..=5000));
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.kill(node))
                .await
                .expect("kill broker");
            kills.fetch_add(1, Relaxed);
            println!(
                "  {:>6.0?}  broker node {node} SIGKILLed; restart in {down:.1?}",
                started.elapsed()
            );
            tokio::time::sleep(down).await;
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.restart(node))
                .await
                .expect("restart broker");
            let restarted = Instant::now();
            let (bootstrap, stop_waiting) = (cluster.bootstrap(), stop.clone());
            let in_sync = tokio::task::spawn_blocking(move || {
                let metadata: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .create()
                    .expect("metadata client");
                loop {
                    if fully_in_sync(&metadata) {
                        return true;
                    }
                    if stop_waiting.load(Relaxed) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
            .await
            .expect("wait for in-sync replicas");
            println!(
                "  {:>6.0?}  broker node {node} back{} {:.1?} after its restart",
                started.elapsed(),
                if in_sync {
                    ", every partition in sync"
                } else {
                    "; stopped waiting for the ISR"
                },
                restarted.elapsed()
            );
            next = (next + every).max(Instant::now());
        }
    })
}

#[derive(Default)]
struct Written {
    committed: Vec<uuid::Uuid>,
    rolled_back: Vec<uuid::Uuid>,
}

async fn write(pool: sqlx::PgPool, topic: String, args: Args, w: usize, left: Arc<AtomicUsize>) -> Written {
    let mut out = Written::default();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let start = Instant::now();
    let per_writer = args.rate as f64 / args.writers as f64;
    loop {
        if per_writer > 0.0 {
            // Keep to the rate: sleep while ahead of schedule.
            let due = Duration::from_secs_f64(out.committed.len() as f64 / per_writer);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
        let mut n = rng.gen_range(1..=10usize);
        let rollback = rng.gen_range(0..100) < args.rollback_pct;
        if rollback {
            if left.load(Relaxed) == 0 {
                return out;
            }
        } else {
            // Take the messages before committing them, so the writers stop at exactly N.
            match left.fetch_update(Relaxed, Relaxed, |l| l.checked_sub(n.min(l)).filter(|_| l > 0)) {
                Ok(before) => n = n.min(before),
                Err(_) => return out,
            }
        }
        let msgs: Vec<Message> = (0..n)
            .map(|i| {
                let key = if rng.gen_range(0..100) < args.hot_share {
                    "hot".to_owned()
                } else {
                    format!("k{}", rng.gen_range(0..args.keys))
                };
                Message::new(topic.clone(), format!("w{w}-{i}")).key(key)
            })
            .collect();
        let ids = msgs.iter().map(|m| m.id());
        let res: Result<(), sqlx::Error> = async {
            let mut tx = pool.begin().await?;
            outbox::enqueue_batch(&mut tx, &msgs)
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            if rollback {
                tx.rollback().await
            } else {
                tx.commit().await
            }
        }
        .await;
        match res {
            Ok(()) if rollback => out.rolled_back.extend(ids),
            Ok(()) => out.committed.extend(ids),
            Err(e) => panic!("writer {w}: {e}"),
        }
    }
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
    let mut _mock = None;
    let mut cluster: Option<Arc<Cluster>> = None;
    let bootstrap = match (args.cluster, args.bootstrap.as_deref()) {
        (Some(nodes), _) => {
            println!("starting a Kafka cluster of {nodes} nodes (.ci/kafka)");
            let c = tokio::task::spawn_blocking(move || Cluster::start(nodes))
                .await
                .expect("start the Kafka cluster");
            let b = c.bootstrap();
            println!("      cluster {} at {b}", c.dir().display());
            outbox_tests::kafka::create_topic(&b, &topic, args.partitions).await;
            cluster = Some(Arc::new(c));
            b
        }
        (None, Some("mock")) => {
            let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            mock.create_topic(&topic, args.partitions, 1).expect("mock topic");
            let b = mock.bootstrap_servers();
            _mock = Some(mock);
            b
        }
        (None, other) => {
            let b = other.map(str::to_owned).unwrap_or_else(outbox_tests::kafka::broker);
            outbox_tests::kafka::create_topic(&b, &topic, args.partitions).await;
            b
        }
    };
    let src = outbox_tests::db::fresh_pg().await;
    let dst = outbox_tests::db::fresh_pg().await;
    sqlx::query(outbox_tests::effects::CREATE_EFFECTS)
        .execute(&dst)
        .await
        .unwrap();
    let store = outbox::postgres::PgStore::new(src.clone());
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
        db_url(&src),
        db_url(&dst)
    );
    match (args.cluster, args.broker_kill_every) {
        (Some(n), Some(every)) => println!("      kafka: own cluster of {n} nodes, one node SIGKILLed every {every:?}"),
        (Some(n), None) => println!("      kafka: own cluster of {n} nodes, no broker kills"),
        _ => println!("      kafka: {bootstrap}"),
    }
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
    let supervisor = {
        let (relay_args, kills, writers_done, store) =
            (relay_args.clone(), kills.clone(), writers_done.clone(), store.clone());
        let every = args.kill_every;
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
    };

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

    // Let the reader and the consumers catch up (bounded: stop when nothing moves for 3 minutes; a
    // consumer group can sit out a coordinator's failover and the rebalance after it for a minute).
    let mut last = (0usize, 0i64, Instant::now());
    loop {
        let seen_all = committed.iter().all(|id| wire.lock().unwrap().seen.contains_key(id));
        let applied: i64 = sqlx::query_scalar("SELECT count(DISTINCT message_id) FROM effects")
            .fetch_one(&dst)
            .await
            .unwrap();
        if seen_all && applied as usize >= committed.len() {
            break;
        }
        let seen = wire.lock().unwrap().seen.len();
        if (seen, applied) != (last.0, last.1) {
            last = (seen, applied, Instant::now());
        } else if last.2.elapsed() > Duration::from_secs(180) {
            println!("reader or consumers stopped making progress; checking what arrived");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
    let wire = std::mem::take(&mut *wire.lock().unwrap());
    let lost_wire = committed.iter().filter(|id| !wire.seen.contains_key(id)).count();
    let leaked_wire = wire.seen.keys().filter(|id| !committed.contains(id)).count();
    let rows: Vec<(uuid::Uuid, Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT message_id, key, seq FROM effects ORDER BY n")
            .fetch_all(&dst)
            .await
            .unwrap();
    let mut applied: HashSet<uuid::Uuid> = HashSet::with_capacity(rows.len());
    let mut duplicate_effects = 0u64;
    let mut effect_inversions = 0u64;
    let mut high: HashMap<&str, i64> = HashMap::new();
    for (id, key, seq) in &rows {
        if !applied.insert(*id) {
            duplicate_effects += 1;
        }
        if let (Some(k), Some(q)) = (key.as_deref(), seq) {
            let h = high.entry(k).or_insert(0);
            if *q <= *h {
                effect_inversions += 1;
            }
            *h = (*h).max(*q);
        }
    }
    let lost_effects = committed.iter().filter(|id| !applied.contains(id)).count();
    let leaked_effects = applied.iter().filter(|id| !committed.contains(id)).count();
    let leaked_rolled_back = wire
        .seen
        .keys()
        .chain(applied.iter())
        .filter(|id| rolled_back.contains(id))
        .count();
    let status = store.status().await.expect("status");
    let wire_dups = wire.records - wire.seen.len() as u64;
    // A relay kill leaves at most one published, unmarked batch per lane behind; a broker kill can
    // make every lane's in-flight batch be resent.
    let bound = (kills + broker_kills) * (args.batch as u64) * LANES as u64;

    let lost = lost_wire + lost_effects;
    let leaked = leaked_wire + leaked_effects;
    let inversions = wire.inversions + effect_inversions;
    println!("\nsoak result after {:.0?}", started.elapsed());
    println!("  committed                 {}", committed.len());
    println!("  rolled back               {}", rolled_back.len());
    println!("  relay kills               {kills}");
    println!("  broker kills              {broker_kills}");
    println!("  lost                      {lost}  (never on the wire {lost_wire}, never applied {lost_effects})");
    println!(
        "  rolled-back-leaked        {leaked}  (uncommitted ids on the wire {leaked_wire}, applied {leaked_effects}; \
         of them rolled back {leaked_rolled_back})"
    );
    println!(
        "  per-key-inversions        {inversions}  (first arrivals on the wire {}, applications {effect_inversions})",
        wire.inversions
    );
    println!("  duplicate-effects         {duplicate_effects}");
    println!(
        "  wire duplicates           {wire_dups}  (bound {bound} = (relay kills {kills} + broker kills {broker_kills}) x \
         batch {} x {LANES} lanes: each kill may resend every lane's in-flight batch)",
        args.batch
    );
    println!(
        "  pending / dead letters    {} / {}",
        status.pending, status.dead_letters
    );
    for e in &wire.examples {
        println!("    e.g. {e}");
    }
    // Where the messages the consumer never applied sit on the topic.
    let mut unapplied: Vec<_> = committed
        .iter()
        .filter(|id| !applied.contains(id))
        .filter_map(|id| wire.seen.get(id))
        .collect();
    unapplied.sort_by_key(|(p, o, _, _)| (*p, *o));
    for (p, o, k, q) in unapplied.iter().take(20) {
        println!("    never applied: partition {p} offset {o} key {k:?} seq {q:?}");
    }
    let failed = lost > 0
        || leaked > 0
        || inversions > 0
        || duplicate_effects > 0
        || wire_dups > bound
        || status.pending > 0
        || status.dead_letters > 0
        || !relay_exit.success();
    println!("{}", if failed { "SOAK FAILED" } else { "soak ok" });
    if let Some(c) = cluster.and_then(Arc::into_inner) {
        if failed {
            // Stop the nodes but keep their logs.
            let _ = Command::new("bash")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/kafka"))
                .arg("down")
                .arg(c.dir())
                .status();
            println!("kafka cluster kept for inspection: {}", c.dir().display());
            std::mem::forget(c);
        } else {
            println!("stopping the Kafka cluster");
            drop(c);
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
