//! Figure 3: latency from commit to delivery report at a steady message rate, with NOTIFY wake-up
//! and with polling only, against a raw producer's send-to-report latency at the same rate.

mod case;
mod raw;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use outbox::postgres::PgStore;
use outbox::{Message, Outbox};
use outbox_kafka::KafkaPublisher;
use outbox_relay::{Relay, RelayConfig};
use rdkafka::producer::FutureProducer;
use uuid::Uuid;

use self::case::{Case, Variant};
use self::raw::raw_latency;
use crate::common::{
    key, new_topic, payload, print_figure, sleep_until, BenchDb, Env, Figure, Row, Target, UntilStopped, KEYS,
};
use crate::probe::{Phases, Reports, TimedPublisher, TimedStore};

/// Transactions per second the writers aim for; messages per transaction = rate / this.
const TX_PER_SEC: u64 = 200;
/// Concurrent writers.
const WRITERS: usize = 16;

/// Percentiles of one run, in milliseconds, and what the load achieved.
#[derive(Debug, Clone, Copy, Default)]
struct Lat {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    achieved: f64,
    missing: u64,
    /// Relay phases: mean milliseconds per claim (incl. empty ones), per publish, per mark.
    claim_ms: f64,
    publish_ms: f64,
    mark_ms: f64,
    /// Mean rows per published batch.
    batch: f64,
    /// p50 and p99 of the two parts of the relay's latency: commit to the start of the publish
    /// call that carried the message (wake-up, claim, queueing), and that call's start to its
    /// report (the broker).
    to_publish: (f64, f64),
    publish: (f64, f64),
    /// Claims per delivered message, and the share of claims that found nothing.
    claims_per_msg: f64,
    empty_claims: f64,
    /// Questions per delivered message after a lane's flag said idle (which transactions are
    /// open, which still are).
    open_questions_per_msg: f64,
}

fn lat_of(h: &Histogram<u64>, achieved: f64, missing: u64) -> Lat {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Lat {
        p50: ms(0.5),
        p99: ms(0.99),
        p999: ms(0.999),
        max: h.max() as f64 / 1000.0,
        achieved,
        missing,
        ..Lat::default()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// What the writers do with their messages.
#[derive(Clone)]
enum Writes {
    /// Enqueue them in the transaction (a relay publishes them).
    Outbox(Outbox),
    /// Commit without them, then send them with this producer (a dual write), recording commit to
    /// delivery report in the histogram.
    Direct(FutureProducer, Arc<Mutex<Histogram<u64>>>),
}

/// Paced load: transaction `i` starts at `start + i / TX_PER_SEC`. Returns (message id, commit
/// instant) for transactions that committed after `measure_from`, and the achieved msg/s. With
/// [`Writes::Direct`], returns once every report has come.
async fn paced_writes(
    pool: &sqlx::PgPool,
    topic: &str,
    per_tx: usize,
    writes: &Writes,
    (warm, dur): (Duration, Duration),
) -> anyhow::Result<(Vec<(Uuid, Instant)>, f64)> {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warm;
    let end = measure_from + dur;
    let ticket = Arc::new(AtomicU64::new(0));
    let body = Arc::new(payload());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (pool, ticket, body, writes, topic) = (
            pool.clone(),
            ticket.clone(),
            body.clone(),
            writes.clone(),
            topic.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut reports = Vec::new();
            loop {
                let i = ticket.fetch_add(1, Ordering::Relaxed);
                let at = start + Duration::from_nanos(i * 1_000_000_000 / TX_PER_SEC);
                if at >= end {
                    break;
                }
                sleep_until(at).await;
                let keys: Vec<String> = (0..per_tx)
                    .map(|j| key((i as usize * 7919 + j * 104_729 + w) % KEYS))
                    .collect();
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_orders (customer, amount, note) VALUES ($1, $2, 'latency')")
                    .bind(w as i32)
                    .bind(i as i64)
                    .execute(&mut *tx)
                    .await?;
                let measured = at >= measure_from;
                let (ids, committed) = match &writes {
                    Writes::Outbox(outbox) => {
                        let msgs: Vec<Message> = keys
                            .iter()
                            .map(|k| Message::new(topic.clone(), body.to_vec()).key(k.clone()))
                            .collect();
                        outbox.enqueue_batch(&mut tx, &msgs).await?;
                        // A plain commit unless the relay listens for the in-process wake-up.
                        outbox.commit(tx).await?;
                        (msgs.iter().map(Message::id).collect::<Vec<_>>(), Instant::now())
                    }
                    Writes::Direct(producer, h) => {
                        tx.commit().await?;
                        let committed = Instant::now();
                        let ids: Vec<Uuid> = keys.iter().map(|_| Uuid::now_v7()).collect();
                        let sent = ids
                            .iter()
                            .zip(&keys)
                            .map(|(id, k)| raw::send(producer, &topic, *id, k, &body))
                            .collect::<anyhow::Result<Vec<_>>>()?;
                        let h = h.clone();
                        reports.push(tokio::spawn(async move {
                            raw::reported(sent, committed, measured, &h).await
                        }));
                        (ids, committed)
                    }
                };
                if measured {
                    out.extend(ids.into_iter().map(|id| (id, committed)));
                }
            }
            for r in reports {
                r.await?;
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let last = all.iter().map(|(_, t)| *t).max().unwrap_or(end);
    let achieved = all.len() as f64 / last.saturating_duration_since(measure_from).as_secs_f64().max(1e-3);
    Ok((all, achieved))
}

/// The relay in `case`, measured from commit to delivery report.
async fn relay_latency(
    db: &BenchDb,
    bootstrap: &str,
    topic: &str,
    rate: u64,
    case: Case,
    (warm, dur): (Duration, Duration),
) -> anyhow::Result<Lat> {
    let reports: Reports = Arc::new(Mutex::new(HashMap::new()));
    let mut settings = vec![("bootstrap.servers".to_owned(), bootstrap.to_owned())];
    if let Some(l) = case.linger_ms {
        settings.push(("linger.ms".into(), l.to_string()));
    }
    let phases = Phases::until(u64::MAX);
    let publisher = TimedPublisher {
        inner: KafkaPublisher::new(settings)?,
        phases: phases.clone(),
        reports: Some(reports.clone()),
    };
    let outbox = Outbox::new().notify(case.notify);
    let mut embedded = Relay::new(
        TimedStore::new(PgStore::new(db.pool.clone()), phases.clone()),
        publisher,
    )
    .config(
        RelayConfig::default()
            .poll_interval(case.poll)
            .linger(case.lanes_linger)
            .linger_poll_interval(case.watch)
            .linger_poll_max(case.watch_max)
            .pipeline(case.pipeline)
            .adaptive_pace(case.pace),
    );
    if case.local {
        embedded = embedded.wake_on(outbox.local_wakeup());
    }
    let relay = UntilStopped::relay(embedded);
    // Let the relay take its lanes and start listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_tx = (rate / TX_PER_SEC) as usize;
    let writes = Writes::Outbox(outbox);
    let (committed, achieved) = paced_writes(&db.pool, topic, per_tx, &writes, (warm, dur)).await?;
    // Wait for the stragglers.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = {
            let r = reports.lock().expect("reports lock");
            committed.iter().filter(|(id, _)| r.contains_key(id)).count()
        };
        if n == committed.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await?;
    let r = reports.lock().expect("reports lock");
    let (mut h, mut to_publish, mut publish) = (histogram(), histogram(), histogram());
    let micros = |d: Duration| (d.as_micros() as u64).max(1);
    let mut missing = 0;
    for (id, at) in &committed {
        match r.get(id) {
            Some(&(sent, rep)) => {
                h.record(micros(rep.saturating_duration_since(*at)))?;
                to_publish.record(micros(sent.saturating_duration_since(*at)))?;
                publish.record(micros(rep.saturating_duration_since(sent)))?;
            }
            None => missing += 1,
        }
    }
    let mut lat = lat_of(&h, achieved, missing);
    let p50_p99 = |h: &Histogram<u64>| {
        let l = lat_of(h, 0.0, 0);
        (l.p50, l.p99)
    };
    lat.to_publish = p50_p99(&to_publish);
    lat.publish = p50_p99(&publish);
    let per_call = |us: &AtomicU64, n: &AtomicU64| {
        us.load(Ordering::Relaxed) as f64 / 1000.0 / n.load(Ordering::Relaxed).max(1) as f64
    };
    lat.claim_ms = per_call(&phases.claim_us, &phases.claims);
    lat.publish_ms = per_call(&phases.publish_us, &phases.publishes);
    lat.mark_ms = per_call(&phases.mark_us, &phases.marks);
    lat.batch = phases.claimed.load(Ordering::Relaxed) as f64 / phases.publishes.load(Ordering::Relaxed).max(1) as f64;
    let claims = phases.claims.load(Ordering::Relaxed) as f64;
    lat.claims_per_msg = claims / phases.marked.load(Ordering::Relaxed).max(1) as f64;
    lat.empty_claims = phases.empty_claims.load(Ordering::Relaxed) as f64 / claims.max(1.0);
    lat.open_questions_per_msg =
        phases.open_questions.load(Ordering::Relaxed) as f64 / phases.marked.load(Ordering::Relaxed).max(1) as f64;
    Ok(lat)
}

/// A dual write: the writers' transaction without the outbox, then the messages sent with a raw
/// producer at `linger_ms`; latency from commit to delivery report.
async fn dual_write_latency(
    db: &BenchDb,
    bootstrap: &str,
    topic: &str,
    rate: u64,
    linger_ms: Option<u32>,
    (warm, dur): (Duration, Duration),
) -> anyhow::Result<Lat> {
    let h = Arc::new(Mutex::new(histogram()));
    let writes = Writes::Direct(raw::producer(bootstrap, linger_ms)?, h.clone());
    let per_tx = (rate / TX_PER_SEC) as usize;
    let (committed, achieved) = paced_writes(&db.pool, topic, per_tx, &writes, (warm, dur)).await?;
    let h = h.lock().expect("histogram lock");
    Ok(lat_of(&h, achieved, (committed.len() as u64).saturating_sub(h.len())))
}

/// Runs figure 3.
pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let rounds = env.rounds(3, 1);
    let warm = Duration::from_secs(1);
    let dur = Duration::from_secs(env.pick(6, 2));
    let poll = Duration::from_millis(100);
    let bootstrap = env.kafka.clone();
    let topic = new_topic(env, &bootstrap, "bench-latency").await?;
    let db = BenchDb::create(env, 24).await?;
    let rates = [1000u64, 5000];
    // [rate][variant] -> runs. Each relay row's ratio is to the raw producer with its linger.ms.
    let d = Case::defaults();
    let local = Case { local: true, ..d };
    let cases = [
        Variant::Raw(None),
        Variant::DualWrite(None),
        Variant::Relay(d),
        Variant::Relay(local),
        Variant::Raw(Some(5)),
        Variant::Relay(Case {
            linger_ms: Some(5),
            ..d
        }),
        Variant::Raw(Some(0)),
        Variant::Relay(Case {
            linger_ms: Some(0),
            ..local
        }),
        Variant::Relay(Case {
            notify: false,
            poll,
            ..d
        }),
        Variant::Relay(Case { pace: false, ..d }),
        // The lingering lanes looked at every 1 ms and every 2 ms, and every 1 ms up to 5 ms while
        // the relay slows the writers.
        Variant::Relay(Case {
            watch: Duration::from_millis(1),
            ..d
        }),
        Variant::Relay(Case {
            watch: Duration::from_millis(2),
            ..d
        }),
        Variant::Relay(Case {
            watch: Duration::from_millis(1),
            watch_max: Duration::from_millis(5),
            ..d
        }),
        // Lanes that ask for NOTIFY as soon as they run dry: every commit to an idle lane notifies.
        Variant::Relay(Case {
            lanes_linger: Duration::ZERO,
            ..d
        }),
        // One batch in flight per lane (the default before four).
        Variant::Relay(Case { pipeline: 1, ..d }),
        Variant::Relay(Case { pipeline: 1, ..local }),
        // The lingering lanes looked at up to 100 ms apart while the relay slows the writers.
        Variant::Relay(Case {
            watch_max: Duration::from_millis(100),
            ..d
        }),
    ];
    // `--only`: the chosen relay variants, and the raw producer at each one's linger.
    let lingers: Vec<Option<u32>> = cases
        .iter()
        .filter_map(|v| match v {
            Variant::Relay(c) if env.keeps(&v.label()) => Some(c.linger_ms),
            _ => None,
        })
        .collect();
    let cases: Vec<Variant> = cases
        .into_iter()
        .filter(|v| {
            env.keeps(&v.label()) || matches!(v, Variant::Raw(l) | Variant::DualWrite(l) if lingers.contains(l))
        })
        .collect();
    anyhow::ensure!(
        cases.iter().any(|v| matches!(v, Variant::Relay(_))),
        "--only names no relay variant of figure 3"
    );
    let mut res: Vec<Vec<Vec<Lat>>> = vec![vec![Vec::new(); cases.len()]; rates.len()];
    for round in 0..rounds {
        for (ri, &rate) in rates.iter().enumerate() {
            for k in 0..cases.len() {
                let variant = (k + round) % cases.len();
                let l = match cases[variant] {
                    Variant::Raw(linger) => raw_latency(&bootstrap, &topic, rate, linger, (warm, dur)).await?,
                    Variant::Relay(case) => relay_latency(&db, &bootstrap, &topic, rate, case, (warm, dur)).await?,
                    Variant::DualWrite(linger) => {
                        dual_write_latency(&db, &bootstrap, &topic, rate, linger, (warm, dur)).await?
                    }
                };
                // The relay's latency in its two parts; the raw producer has one.
                let parts = match cases[variant] {
                    Variant::Raw(_) | Variant::DualWrite(_) => String::new(),
                    Variant::Relay(_) => format!(
                        "; p50 / p99 commit to publish {:.1} / {:.1} ms, publish to report {:.1} / {:.1} ms",
                        l.to_publish.0, l.to_publish.1, l.publish.0, l.publish.1
                    ),
                };
                eprintln!(
                    "latency: round {}/{rounds}, {rate} msg/s, {}: p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms (achieved {:.0} msg/s, missing {}{parts})",
                    round + 1,
                    cases[variant].label(),
                    l.p50,
                    l.p99,
                    l.p999,
                    l.achieved,
                    l.missing
                );
                res[ri][variant].push(l);
            }
            sqlx::query("TRUNCATE bench_orders").execute(&db.pool).await?;
        }
    }
    db.drop_db().await;
    crate::common::delete_topic(env, &bootstrap, &topic).await;

    let mut rows = Vec::new();
    for (ri, &rate) in rates.iter().enumerate() {
        let per_tx = rate / TX_PER_SEC;
        // The raw producer last, as the floor under the relay's rows.
        for variant in (1..cases.len()).chain([0]) {
            let label = format!("{rate} msg/s, {}", cases[variant].label());
            let runs = &res[ri][variant];
            let col = |f: fn(&Lat) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
            let med = |f: fn(&Lat) -> f64| crate::common::median(&col(f));
            // Against the raw producer with the same linger.ms (the relay's rows name theirs).
            let linger = match cases[variant] {
                Variant::Raw(l) | Variant::DualWrite(l) => l,
                Variant::Relay(c) => c.linger_ms,
            };
            let raw = cases
                .iter()
                .position(|v| matches!(v, Variant::Raw(l) if *l == linger))
                .unwrap_or(0);
            let raw_p99 = crate::common::median(&res[ri][raw].iter().map(|l| l.p99).collect::<Vec<_>>());
            let mut p99 = Row::new(format!("{label}: p99"), "ms", col(|l| l.p99))
                .extra("achieved_msg_per_s", med(|l| l.achieved))
                .extra("p99_over_raw_p99", med(|l| l.p99) / raw_p99)
                .extra("max_ms", med(|l| l.max))
                .extra("missing", med(|l| l.missing as f64));
            // Against the same writers committing without the outbox and sending themselves, where
            // measured with that linger.ms: the machine's load included.
            let dual = cases
                .iter()
                .position(|v| matches!(v, Variant::DualWrite(l) if *l == linger));
            if let (Some(dual), Variant::Relay(_)) = (dual, cases[variant]) {
                let dual_p99 = crate::common::median(&res[ri][dual].iter().map(|l| l.p99).collect::<Vec<_>>());
                p99 = p99.extra("p99_over_dual_write_p99", med(|l| l.p99) / dual_p99);
            }
            if let Variant::Relay(_) = cases[variant] {
                p99 = p99
                    .extra("claim_ms_per_call", med(|l| l.claim_ms))
                    .extra("publish_ms_per_batch", med(|l| l.publish_ms))
                    .extra("mark_ms_per_batch", med(|l| l.mark_ms))
                    .extra("rows_per_batch", med(|l| l.batch))
                    .extra("commit_to_publish_p50_ms", med(|l| l.to_publish.0))
                    .extra("commit_to_publish_p99_ms", med(|l| l.to_publish.1))
                    .extra("publish_to_report_p50_ms", med(|l| l.publish.0))
                    .extra("publish_to_report_p99_ms", med(|l| l.publish.1))
                    .extra("claims_per_msg", med(|l| l.claims_per_msg))
                    .extra("empty_claim_share", med(|l| l.empty_claims))
                    .extra("open_questions_per_msg", med(|l| l.open_questions_per_msg));
            }
            if cases[variant].label() == Variant::Relay(d).label() && rate == 1000 {
                p99 = p99.target(Target::AtMost(10.0));
            }
            rows.push(Row::new(format!("{label}: p50"), "ms", col(|l| l.p50)));
            rows.push(p99);
            rows.push(Row::new(format!("{label}: p99.9"), "ms", col(|l| l.p999)).note(format!("{per_tx} msgs per tx")));
        }
    }
    let fig = Figure {
        id: "latency".into(),
        title: "3. Latency, commit -> delivery report".into(),
        setup: format!(
            "Apache Kafka ({bootstrap}). {WRITERS} writers issue {TX_PER_SEC} business transactions/s on a fixed schedule, each \
             with rate/{TX_PER_SEC} keyed messages (enqueue_batch), so 1,000 msg/s = 5 msgs/tx and 5,000 msg/s = 25 msgs/tx \
             (NOTIFY serializes commits: see figure 1). Latency per message = time the relay's publish() returned with its \
             delivery report - time commit() returned, over {} s after 1 s of warm-up; embedded relay with defaults \
             (batch 500, pipeline {}, adaptive pace, lanes linger 1 s watched every 5 ms, KafkaPublisher defaults incl. linger.ms=1); \
             each relay row's ratio is to the raw producer with the same linger.ms. Variants interleaved (rotating start).",
            dur.as_secs(),
            RelayConfig::DEFAULT_PIPELINE
        ),
        rounds,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}
