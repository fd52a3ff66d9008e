//! The unkeyed backlog of figure 2: the same drains as the keyed one, on rows without a key (no
//! per-key order to keep, lanes by message id), each against a SQL-only drain of an unkeyed backlog
//! in the same round.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;

use super::{drain_config, med, relay_drain, Drained, Sink};
use crate::common::{payload, BenchDb, Env, Row, Target};

/// Rows per `INSERT` while filling (ids and lanes are sent as arrays).
const CHUNK: usize = 50_000;

/// Adds `n` committed, unkeyed messages (200-byte payloads) to the outbox: the rows `enqueue`
/// writes for a message without a key (a UUIDv7 id, the lane of that id, no key and no seq), in one
/// transaction of `INSERT ... SELECT unnest` statements of [`CHUNK`] rows. Returns the seconds taken.
pub(crate) async fn fill_unkeyed_backlog(pool: &PgPool, topic: &str, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let payload = payload();
    let mut tx = pool.begin().await?;
    let mut done = 0;
    while done < n {
        let m = CHUNK.min(n - done);
        let ids: Vec<uuid::Uuid> = (0..m).map(|_| uuid::Uuid::now_v7()).collect();
        let lanes: Vec<i32> = ids.iter().map(|id| outbox::lane_of(None, *id, outbox::LANES)).collect();
        sqlx::query(
            "INSERT INTO outbox_messages (lane, id, topic, payload) \
             SELECT u.lane, u.id, $3, $4 FROM unnest($1::uuid[], $2::int[]) WITH ORDINALITY AS u(id, lane, ord) \
             ORDER BY u.ord",
        )
        .bind(&ids)
        .bind(&lanes)
        .bind(topic)
        .bind(&payload)
        .execute(&mut *tx)
        .await?;
        done += m;
    }
    tx.commit().await?;
    sqlx::query("ANALYZE outbox_messages").execute(pool).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// A SQL-only drain (publisher confirming at once) of a fresh unkeyed backlog of `n` rows.
pub(crate) async fn sql_only(env: &Env, n: usize, limit: Duration) -> anyhow::Result<(Drained, f64)> {
    let db = BenchDb::create(env, 20).await?;
    let fill = fill_unkeyed_backlog(&db.pool, "bench-sql-unkeyed", n).await?;
    let d = relay_drain(&db, drain_config(), Sink::Null(Duration::ZERO), None, n as u64, limit).await;
    db.drop_db().await;
    Ok((d?, fill))
}

/// The relay with its defaults (`claim_ahead = never`) draining a fresh unkeyed backlog of `n`
/// rows to `bootstrap`.
pub(crate) async fn relay(
    env: &Env,
    name: &str,
    bootstrap: &str,
    pid: Option<u32>,
    topic: &str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<(Drained, f64)> {
    let db = BenchDb::create(env, 20).await?;
    let fill = fill_unkeyed_backlog(&db.pool, topic, n).await?;
    let d = relay_drain(&db, drain_config(), Sink::Broker(bootstrap), pid, n as u64, limit)
        .await
        .with_context(|| format!("unkeyed relay drain on {name}"));
    db.drop_db().await;
    Ok((d?, fill))
}

/// The unkeyed rows of the figure: per broker, the relay (defaults) against the unkeyed SQL-only
/// drain of the same round (target 0.6), then the SQL-only drain itself.
pub(crate) fn rows(sql: &[Drained], relay: &[Vec<Drained>], brokers: &[(&str, String)], n: usize) -> Vec<Row> {
    let rate = |v: &[Drained]| v.iter().map(Drained::rate).collect::<Vec<f64>>();
    let sql_row = Row::rate(
        format!("SQL-only drain, unkeyed ({n}-row backlog, claim + delete via PgStore, no broker)"),
        rate(sql),
    )
    .extra("bench_cpu_us_per_msg", med(sql, Drained::cpu_us_per_msg))
    .extra("pg_cpu_us_per_msg", med(sql, |d| d.cpu.postgres * 1e6 / d.msgs as f64))
    .extra("claim_us_per_msg", med(sql, |d| d.phases_us.0))
    .extra("mark_us_per_msg", med(sql, |d| d.phases_us.2))
    .extra("drain_secs", med(sql, |d| d.secs));
    let mut rows = Vec::new();
    for (b, (name, _)) in brokers.iter().enumerate() {
        let v = &relay[b];
        rows.push(
            Row::rate(
                format!("relay drain on {name}, unkeyed, claim_ahead = never (the default) ({n}-row backlog)"),
                rate(v),
            )
            .extra("relay_cpu_us_per_msg", med(v, Drained::cpu_us_per_msg))
            .extra("broker_cpu_us_per_msg", med(v, |d| d.cpu.broker * 1e6 / d.msgs as f64))
            .extra("pg_cpu_us_per_msg", med(v, |d| d.cpu.postgres * 1e6 / d.msgs as f64))
            .extra("claim_us_per_msg", med(v, |d| d.phases_us.0))
            .extra("publish_us_per_msg", med(v, |d| d.phases_us.1))
            .extra("mark_us_per_msg", med(v, |d| d.phases_us.2))
            .extra("avg_batch", med(v, |d| d.avg_batch))
            .extra("drain_secs", med(v, |d| d.secs))
            .vs(&sql_row)
            .target(Target::AtLeast(0.6))
            .note("vs SQL-only, unkeyed, same round"),
        );
    }
    rows.push(sql_row);
    rows
}
