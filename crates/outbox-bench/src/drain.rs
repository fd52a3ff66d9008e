//! Figure 2: draining a backlog to the broker, against a SQL-only drain, a raw producer sending the
//! same messages from memory, and a naive one-row-at-a-time relay; keyed and unkeyed backlogs, each
//! against the SQL-only drain of its own shape.

mod engine;
mod raw;
mod unkeyed;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_kafka::KafkaPublisher;
use outbox_relay::ClaimAhead;

pub(crate) use self::engine::{drain_config, relay_drain, Drained, Sink};
use self::raw::naive_drain;
pub(crate) use self::raw::raw_produce;
use crate::common::{broker_pid, fill_backlog, new_topic, print_figure, BenchDb, Env, Figure, Row, Target};

/// The broker round trip the "remote broker" drains simulate (acks=all across availability zones).
const REMOTE_RTT: Duration = Duration::from_millis(20);

/// Runs figure 2.
pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let n = env.pick(1_000_000usize, 20_000);
    let remote_n = env.pick(200_000usize, 20_000);
    let naive_n = env.pick(5_000u64, 1_000);
    let naive_limit = Duration::from_secs(env.pick(10, 4));
    let rounds = env.rounds(3, 1);
    let limit = Duration::from_secs(env.pick(600, 120));
    let brokers = env.brokers();

    let mut sql = Vec::new();
    let mut relay: Vec<Vec<Drained>> = vec![Vec::new(); brokers.len()];
    // claim_ahead = never (the default) / always, beside auto in `relay`.
    let mut relay_never: Vec<Vec<Drained>> = vec![Vec::new(); brokers.len()];
    let mut relay_always: Vec<Vec<Drained>> = vec![Vec::new(); brokers.len()];
    // Kafka only: the keyed relay (defaults) with the producer's linger.ms at 0.
    let mut relay_linger0: Vec<Vec<Drained>> = vec![Vec::new(); brokers.len()];
    // A remote broker simulated by a fixed round trip: claim_ahead auto / never.
    let mut remote: [Vec<Drained>; 2] = [Vec::new(), Vec::new()];
    let mut raw: Vec<Vec<Drained>> = vec![Vec::new(); brokers.len()];
    let mut naive: Vec<Vec<Drained>> = vec![Vec::new(); brokers.len()];
    let mut fill_secs = Vec::new();
    // The unkeyed backlog: SQL-only, and the relay (defaults) per broker.
    let mut sql_unkeyed = Vec::new();
    let mut relay_unkeyed: Vec<Vec<Drained>> = vec![Vec::new(); brokers.len()];
    let mut unkeyed_fill_secs = Vec::new();
    for round in 0..rounds {
        eprintln!("drain: round {}/{rounds}, backlog {n}", round + 1);
        // SQL-only: the relay engine with a publisher that confirms at once.
        let db = BenchDb::create(env, 20).await?;
        fill_secs.push(fill_backlog(&db.pool, "bench-sql", n).await?);
        let d = relay_drain(&db, drain_config(), Sink::Null(Duration::ZERO), None, n as u64, limit).await?;
        eprintln!("  sql-only, keyed: {:.0} msg/s", d.rate());
        sql.push(d);
        db.drop_db().await;
        let (d, fill) = unkeyed::sql_only(env, n, limit).await?;
        eprintln!("  sql-only, unkeyed: {:.0} msg/s", d.rate());
        unkeyed_fill_secs.push(fill);
        sql_unkeyed.push(d);

        for i in 0..2 {
            let auto = (i + round) % 2 == 0;
            let mode = if auto { ClaimAhead::Auto } else { ClaimAhead::Never };
            let db = BenchDb::create(env, 20).await?;
            fill_backlog(&db.pool, "bench-remote", remote_n).await?;
            let sink = Sink::Null(REMOTE_RTT);
            let d = relay_drain(
                &db,
                drain_config().claim_ahead(mode),
                sink,
                None,
                remote_n as u64,
                limit,
            )
            .await?;
            eprintln!("  simulated remote broker, claim_ahead {mode:?}: {:.0} msg/s", d.rate());
            remote[usize::from(!auto)].push(d);
            db.drop_db().await;
        }

        for (b, (name, bootstrap)) in brokers.iter().enumerate() {
            let pid = if *name == "kafka" { broker_pid() } else { None };
            let topic = new_topic(env, bootstrap, "bench-drain").await?;
            // claim_ahead auto, never (the default), always; the first one rotates by round.
            let modes = [ClaimAhead::Auto, ClaimAhead::Never, ClaimAhead::Always];
            for i in 0..modes.len() {
                let mode = modes[(i + round) % modes.len()];
                let db = BenchDb::create(env, 20).await?;
                fill_secs.push(fill_backlog(&db.pool, &topic, n).await?);
                let sink = Sink::Broker(bootstrap);
                let d = relay_drain(&db, drain_config().claim_ahead(mode), sink, pid, n as u64, limit)
                    .await
                    .with_context(|| format!("relay drain on {name}"))?;
                eprintln!("  relay on {name} (claim_ahead {mode:?}): {:.0} msg/s", d.rate());
                match mode {
                    ClaimAhead::Auto => &mut relay[b],
                    ClaimAhead::Never => &mut relay_never[b],
                    ClaimAhead::Always => &mut relay_always[b],
                }
                .push(d);
                db.drop_db().await;
            }
            if *name == "kafka" {
                let db = BenchDb::create(env, 20).await?;
                fill_backlog(&db.pool, &topic, n).await?;
                let publisher = KafkaPublisher::new([("bootstrap.servers", bootstrap.as_str()), ("linger.ms", "0")])?;
                let sink = Sink::Publisher(Arc::new(publisher));
                let d = relay_drain(&db, drain_config(), sink, pid, n as u64, limit).await?;
                eprintln!("  relay on {name}, keyed, linger.ms=0: {:.0} msg/s", d.rate());
                relay_linger0[b].push(d);
                db.drop_db().await;
            }
            let (d, fill) = unkeyed::relay(env, name, bootstrap, pid, &topic, n, limit).await?;
            eprintln!("  relay on {name}, unkeyed: {:.0} msg/s", d.rate());
            unkeyed_fill_secs.push(fill);
            relay_unkeyed[b].push(d);

            let d = raw_produce(bootstrap, pid, &topic, n).await?;
            eprintln!("  raw producer on {name}: {:.0} msg/s", d.rate());
            raw[b].push(d);

            let db = BenchDb::create(env, 4).await?;
            fill_backlog(&db.pool, &topic, naive_n as usize).await?;
            let d = naive_drain(&db, bootstrap, naive_n, naive_limit).await?;
            eprintln!("  naive relay on {name}: {:.0} msg/s", d.rate());
            naive[b].push(d);
            db.drop_db().await;
            crate::common::delete_topic(env, bootstrap, &topic).await;
        }
    }

    let rate = |v: &[Drained]| v.iter().map(Drained::rate).collect::<Vec<f64>>();
    let sql_row = Row::rate(
        format!("SQL-only drain, keyed ({n}-row backlog, claim + delete via PgStore, no broker)"),
        rate(&sql),
    )
    .extra(
        "bench_cpu_us_per_msg",
        crate::common::median(&sql.iter().map(Drained::cpu_us_per_msg).collect::<Vec<_>>()),
    )
    .extra("pg_cpu_us_per_msg", med(&sql, |d| d.cpu.postgres * 1e6 / d.msgs as f64))
    .extra("claim_us_per_msg", med(&sql, |d| d.phases_us.0))
    .extra("mark_us_per_msg", med(&sql, |d| d.phases_us.2));
    let mut rows = vec![sql_row.clone()];
    for (b, (name, _)) in brokers.iter().enumerate() {
        let naive_row = Row::rate(
            format!(
                "naive relay on {name} (1 row: claim, send, wait, delete; {naive_n}-row backlog, <= {}s)",
                naive_limit.as_secs()
            ),
            rate(&naive[b]),
        );
        let raw_row = Row::rate(
            format!("raw rdkafka producer on {name} ({n} msgs from memory)"),
            rate(&raw[b]),
        )
        .extra("bench_cpu_us_per_msg", med(&raw[b], Drained::cpu_us_per_msg))
        .extra(
            "broker_cpu_us_per_msg",
            med(&raw[b], |d| d.cpu.broker * 1e6 / d.msgs as f64),
        );
        let cpu_label = if *name == "mock" {
            "process_cpu_us_per_msg_incl_mock_broker"
        } else {
            "relay_cpu_us_per_msg"
        };
        let relay_row = Row::rate(
            format!("relay drain on {name}, keyed, claim_ahead = auto ({n}-row backlog)"),
            rate(&relay[b]),
        )
        .extra(cpu_label, med(&relay[b], Drained::cpu_us_per_msg))
        .extra(
            "broker_cpu_us_per_msg",
            med(&relay[b], |d| d.cpu.broker * 1e6 / d.msgs as f64),
        )
        .extra(
            "pg_cpu_us_per_msg",
            med(&relay[b], |d| d.cpu.postgres * 1e6 / d.msgs as f64),
        )
        .extra("claim_us_per_msg", med(&relay[b], |d| d.phases_us.0))
        .extra("publish_us_per_msg", med(&relay[b], |d| d.phases_us.1))
        .extra("mark_us_per_msg", med(&relay[b], |d| d.phases_us.2))
        .extra("avg_batch", med(&relay[b], |d| d.avg_batch))
        .extra("drain_secs", med(&relay[b], |d| d.secs));
        rows.push(
            relay_row
                .clone()
                .vs(&sql_row)
                .target(Target::AtLeast(0.5))
                .note("vs SQL-only, keyed, same round"),
        );
        rows.push(
            Row::rate(format!("relay drain on {name} vs naive relay"), rate(&relay[b]))
                .vs(&naive_row)
                .target(Target::AtLeast(20.0)),
        );
        let mode_row = |mode: &str, v: &[Drained]| {
            Row::rate(format!("relay drain on {name}, keyed, claim_ahead = {mode}"), rate(v))
                .extra("claim_us_per_msg", med(v, |d| d.phases_us.0))
                .extra("publish_us_per_msg", med(v, |d| d.phases_us.1))
                .extra("mark_us_per_msg", med(v, |d| d.phases_us.2))
        };
        let never_row = mode_row("never", &relay_never[b]);
        let always_row = mode_row("always", &relay_always[b]);
        rows.push(
            relay_row
                .clone()
                .vs(&never_row)
                .note("auto / never (the default), same rounds"),
        );
        rows.push(always_row.vs(&never_row).note("always / never, same rounds"));
        rows.push(
            never_row
                .clone()
                .vs(&sql_row)
                .target(Target::AtLeast(0.5))
                .note("the default vs SQL-only, keyed, same round"),
        );
        rows.push(never_row);
        if !relay_linger0[b].is_empty() {
            let linger0 = Row::rate(
                format!("relay drain on {name}, keyed, defaults but linger.ms=0"),
                rate(&relay_linger0[b]),
            )
            .extra("publish_us_per_msg", med(&relay_linger0[b], |d| d.phases_us.1))
            .extra("avg_batch", med(&relay_linger0[b], |d| d.avg_batch));
            let defaults = Row::rate(
                format!("relay drain on {name}, keyed, claim_ahead = never"),
                rate(&relay_never[b]),
            );
            rows.push(
                linger0
                    .clone()
                    .vs(&defaults)
                    .note("linger.ms 0 / the default, both claim_ahead = never, same rounds"),
            );
            rows.push(linger0.vs(&sql_row).note("vs SQL-only, keyed, same round"));
        }
        rows.push(relay_row.vs(&raw_row).note("relay / raw producer"));
        rows.push(raw_row);
        rows.push(naive_row);
    }
    let never = Row::rate(
        format!(
            "simulated remote broker ({} ms round trip per batch), {remote_n}-row backlog, claim_ahead = never",
            REMOTE_RTT.as_millis()
        ),
        rate(&remote[1]),
    );
    rows.push(
        Row::rate(
            format!(
                "simulated remote broker ({} ms round trip per batch), claim_ahead = auto",
                REMOTE_RTT.as_millis()
            ),
            rate(&remote[0]),
        )
        .vs(&never)
        .note("auto / never, same rounds"),
    );
    rows.push(never);
    rows.extend(unkeyed::rows(&sql_unkeyed, &relay_unkeyed, &brokers, n));
    let fig = Figure {
        id: "drain".into(),
        title: "2. Relay drain".into(),
        setup: format!(
            "Backlogs of {n} rows, {}-byte payloads: keyed ({} keys, filled with INSERT ... SELECT generate_series, \
             median fill {:.1} s) and unkeyed (UUIDv7 ids, lanes by id, filled with INSERT ... SELECT unnest in \
             50,000-row statements, median fill {:.1} s), each ratio against the SQL-only drain of the same shape in the same round; topic with {} partitions; relay embedded in this process with defaults \
             (batch 500, 32 lanes, pool of 20 connections), KafkaPublisher defaults (acks=all, idempotence, linger.ms=1). \
             Order per round: SQL-only keyed, SQL-only unkeyed, a simulated remote broker (NullPublisher answering after a fixed round trip, keyed) with claim_ahead auto and never, then per broker the keyed relay with claim_ahead auto, never (the default) and always (rotating which goes first), on Kafka the keyed relay with linger.ms=0, the unkeyed relay (defaults), raw producer, naive. Brokers: {}.",
            crate::common::PAYLOAD_BYTES,
            crate::common::KEYS,
            crate::common::median(&fill_secs),
            crate::common::median(&unkeyed_fill_secs),
            crate::common::PARTITIONS,
            brokers.iter().map(|(n, b)| format!("{n} ({b})")).collect::<Vec<_>>().join(", ")
        ),
        rounds,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}

fn med(v: &[Drained], f: impl Fn(&Drained) -> f64) -> f64 {
    crate::common::median(&v.iter().map(f).collect::<Vec<_>>())
}
