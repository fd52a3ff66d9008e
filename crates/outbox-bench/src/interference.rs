//! Figure 4: business-transaction throughput while the relay drains a backlog, against the same
//! writers without a relay running; and the relay's drain alone, unpaced and with the adaptive
//! pace, against the SQL-only drain.

use std::time::{Duration, Instant};

use outbox::postgres::PgStore;
use outbox::Outbox;
use outbox_kafka::KafkaPublisher;
use outbox_relay::Relay;

use crate::common::{fill_backlog, new_topic, pending, print_figure, BenchDb, Env, Figure, Row, Target, UntilStopped};
use crate::drain::{drain_config, relay_drain, Sink};
use crate::write::{throughput, Variant};

/// `max_busy_lanes` of the relay variant paced by lanes.
const LIMITED: usize = 1;
/// `max_rate` (msg/s) of the relay variant paced by rate.
const RATE: u32 = 2_000;
/// A smaller [`outbox_relay::RelayConfig::pace_slowdown`] than the default, measured beside it.
const SLOWER: f64 = 0.08;

/// How long the relay drains before the writers start.
const WARM_UP: Duration = Duration::from_secs(2);

/// Drains of `backlog` rows without business load: SQL-only, the relay unpaced and adaptive.
async fn drain_alone(env: &Env, rounds: usize, bootstrap: &str) -> anyhow::Result<Vec<Row>> {
    let n = env.pick(1_000_000usize, 20_000);
    let limit = Duration::from_secs(env.pick(600, 120));
    let pid = crate::common::broker_pid();
    let topic = new_topic(env, bootstrap, "bench-pace").await?;
    let kinds = ["sql-only", "unpaced", "adaptive"];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        for i in 0..kinds.len() {
            let k = (i + round) % kinds.len();
            let db = BenchDb::create(env, 20).await?;
            fill_backlog(&db.pool, &topic, n).await?;
            let (cfg, sink) = match k {
                0 => (drain_config(), Sink::Null(Duration::ZERO)),
                1 => (drain_config().adaptive_pace(false), Sink::Broker(bootstrap)),
                _ => (drain_config().adaptive_pace(true), Sink::Broker(bootstrap)),
            };
            let d = relay_drain(&db, cfg, sink, pid, n as u64, limit).await?;
            eprintln!(
                "pace: round {}/{rounds}, {}: {:.0} msg/s",
                round + 1,
                kinds[k],
                d.rate()
            );
            rates[k].push(d.rate());
            db.drop_db().await;
        }
    }
    crate::common::delete_topic(env, bootstrap, &topic).await;
    let sql = Row::rate(format!("SQL-only drain, {n}-row backlog"), rates[0].clone());
    Ok(vec![
        sql.clone(),
        Row::rate(
            format!("relay drain to Kafka, unpaced, {n}-row backlog"),
            rates[1].clone(),
        )
        .vs(&sql),
        Row::rate(
            format!("relay drain to Kafka, adaptive pace, {n}-row backlog"),
            rates[2].clone(),
        )
        .vs(&sql)
        .target(Target::AtLeast(0.45)),
    ])
}

/// Runs figure 4.
pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let rounds = env.rounds(5, 2);
    // Long enough for the adaptive pace to settle (it decides once a second) and to be measured.
    let dur = Duration::from_millis(env.pick(6000, 1000));
    let backlog = env.pick(1_000_000usize, 50_000);
    let writers = 16;
    let variant = Variant::Outbox {
        keyed: true,
        notify: false,
    };
    let bootstrap = env.kafka.clone();
    let topic = new_topic(env, &bootstrap, "bench-interference").await?;
    let db = BenchDb::create(env, 40).await?;
    fill_backlog(&db.pool, &topic, backlog).await?;
    // The writers' transactions per second over `dur`, on connections of their own, closed after
    // it: a closing connection hands its transaction counts to the database at once, where an
    // idle one would hand in its last second up to 10 s later, into the next variant's window,
    // where the adaptive pace would read it as a busy service.
    let business = |dur| {
        let (url, topic) = (db.url.clone(), topic.clone());
        async move {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(writers as u32)
                .connect(&url)
                .await?;
            let tps = throughput(
                &Outbox::new(),
                &pool,
                &topic,
                crate::write::Shape::Minimal,
                variant,
                writers,
                dur,
            )
            .await?;
            pool.close().await;
            anyhow::Ok(tps)
        }
    };
    business(Duration::from_millis(500)).await?;
    // Relay variants: None = no relay; then the drain defaults, paced by lanes, paced by rate,
    // paced by the database's answers (the default slowdown, and a smaller one).
    let variants: [Option<outbox_relay::RelayConfig>; 6] = [
        None,
        Some(drain_config().adaptive_pace(false)),
        Some(drain_config().adaptive_pace(false).max_busy_lanes(Some(LIMITED))),
        Some(drain_config().adaptive_pace(false).max_rate(Some(RATE))),
        Some(drain_config().adaptive_pace(true)),
        Some(drain_config().adaptive_pace(true).pace_slowdown(SLOWER)),
    ];
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut drained_during: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut left = Vec::new();
    for round in 0..rounds {
        for i in 0..variants.len() {
            // Rotate which variant goes first.
            let v = (i + round) % variants.len();
            // Keep the backlog topped up so the relay drains throughout the window.
            let p = pending(&db.pool).await? as usize;
            if p < backlog {
                fill_backlog(&db.pool, &topic, backlog - p).await?;
            }
            sqlx::query("CHECKPOINT").execute(&db.pool).await?;
            let Some(cfg) = variants[v].clone() else {
                tps[v].push(business(dur).await?);
                continue;
            };
            let before = pending(&db.pool).await?;
            let store =
                crate::probe::TimedStore::new(PgStore::new(db.pool.clone()), crate::probe::Phases::until(u64::MAX));
            let publisher = crate::probe::TimedPublisher {
                inner: KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str())])?,
                phases: crate::probe::Phases::until(u64::MAX),
                reports: None,
            };
            let relay = UntilStopped::relay(Relay::new(store, publisher).config(cfg));
            // The relay reaches its drain rate (and the adaptive pace its level) first.
            tokio::time::sleep(WARM_UP).await;
            let b = business(dur).await?;
            relay.stop().await?;
            let after = pending(&db.pool).await?;
            let written = (b * dur.as_secs_f64()) as i64;
            drained_during[v].push((before + written - after) as f64 / (dur + WARM_UP).as_secs_f64());
            left.push(after as f64);
            tps[v].push(b);
        }
        eprintln!(
            "interference: round {}/{rounds}: alone {:.0} tx/s, relay draining {:.0} tx/s, max_busy_lanes={LIMITED} {:.0} \
             tx/s, max_rate={RATE} {:.0} tx/s, adaptive pace {:.0} tx/s, pace_slowdown={SLOWER} {:.0} tx/s",
            round + 1,
            tps[0][round],
            tps[1][round],
            tps[2][round],
            tps[3][round],
            tps[4][round],
            tps[5][round]
        );
    }
    db.drop_db().await;
    crate::common::delete_topic(env, &bootstrap, &topic).await;
    let med = crate::common::median;
    let base = Row::new(format!("{writers} writers, no relay running"), "tx/s", tps[0].clone());
    // Variants 1..=5 of the rounds above: what the writers ran beside, the target, whether paced adaptively.
    let paced = [
        (
            "while the relay drains the backlog (defaults: every lane busy)".to_owned(),
            0.9,
            false,
        ),
        (
            format!("while the relay drains, max_busy_lanes = {LIMITED}"),
            0.9,
            false,
        ),
        (format!("while the relay drains, max_rate = {RATE} msg/s"), 0.9, false),
        ("while the relay drains, adaptive pace".to_owned(), 0.85, true),
        (
            format!("while the relay drains, adaptive pace, pace_slowdown = {SLOWER}"),
            0.85,
            true,
        ),
    ];
    let mut rows = vec![base.clone()];
    for (i, (what, target, adaptive)) in paced.into_iter().enumerate() {
        let v = i + 1;
        let row = Row::new(format!("{writers} writers {what}"), "tx/s", tps[v].clone())
            .vs(&base)
            .target(Target::AtLeast(target))
            .extra("relay_drain_msg_per_s", med(&drained_during[v]));
        rows.push(if adaptive {
            row.extra("min_backlog_left", left.iter().copied().fold(f64::INFINITY, f64::min))
        } else {
            row
        });
    }
    rows.extend(drain_alone(env, rounds.min(3), &bootstrap).await?);
    let fig = Figure {
        id: "interference".into(),
        title: "4. Interference of the relay with business transactions".into(),
        setup: format!(
            "Apache Kafka ({bootstrap}). Business transaction = one bench_orders row + one keyed outbox message, NOTIFY off \
             (figure 1 shows NOTIFY's own cost); {writers} writers, {:.1} s windows, alone, with an embedded relay \
             (drain defaults), with one paced by max_busy_lanes = {LIMITED}, one by max_rate = {RATE} msg/s and two by the adaptive pace (pace_slowdown at its default and {SLOWER}), \
             draining a backlog kept at >= {backlog} rows ({:.1} s of draining before the writers start); variants interleaved, \
             rotating which goes first. Then, without writers, drains of a {backlog}-row backlog: SQL-only (a publisher that \
             confirms at once), the relay to Kafka unpaced and with the adaptive pace, rotating which goes first.",
            dur.as_secs_f64(),
            WARM_UP.as_secs_f64()
        ),
        rounds,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}
