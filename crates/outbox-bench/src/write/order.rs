//! The flash-sale order transaction's rows: its tables, and the order transaction at 16 writers
//! without and with a relay draining.

use std::time::Duration;

use sqlx::PgPool;

use super::{variant_rows, Load, Shape, Variant, PRODUCTS, VARIANTS};
use crate::common::{BenchDb, Row, Target};

/// Creates the `Order` shape's tables, every product with a large stock.
async fn create_order_tables(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE bench_stock (product INT PRIMARY KEY, stock BIGINT NOT NULL); \
         CREATE TABLE bench_order_lines (order_id BIGINT NOT NULL, line INT NOT NULL, product INT NOT NULL, \
           qty INT NOT NULL, price BIGINT NOT NULL, PRIMARY KEY (order_id, line));",
    )
    .execute(pool)
    .await?;
    sqlx::query("INSERT INTO bench_stock SELECT p, 1000000000 FROM generate_series(0, $1 - 1) p")
        .bind(PRODUCTS as i32)
        .execute(pool)
        .await?;
    Ok(())
}

/// The flash-sale order transaction at 16 writers: without the outbox, with an unkeyed and a keyed
/// message (NOTIFY on, the library's default) and a keyed one with NOTIFY off, interleaved with a
/// rotating start. Each entry of `relays` is one setting measured in every round (in turn, rotating
/// start): `None` without a relay, `Some((linger, every))` with an embedded relay (publisher
/// answering after 2 ms) draining the messages as they commit, its lanes lingering that long after
/// running dry, looked at every `every`.
pub(super) async fn order_rows(
    db: &BenchDb,
    rounds: usize,
    dur: Duration,
    relays: &[Option<(Duration, Duration)>],
) -> anyhow::Result<Vec<Row>> {
    if relays.iter().any(Option::is_some) {
        sqlx::query("TRUNCATE bench_orders, bench_order_lines, outbox_messages")
            .execute(&db.pool)
            .await?;
    } else {
        create_order_tables(&db.pool).await?;
    }
    let start_relay = |(linger, every): (Duration, Duration)| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = outbox_relay::Relay::new(
            outbox::postgres::PgStore::new(db.pool.clone()),
            crate::probe::NullPublisher {
                delay: Duration::from_millis(2),
            },
        )
        .config(crate::drain::drain_config().linger(linger).linger_poll_interval(every));
        let task = tokio::spawn(relay.run_until(async {
            let _ = stopped.await;
        }));
        (stop, task)
    };
    let label = |relay: Option<(Duration, Duration)>| match relay {
        None => String::new(),
        Some((l, _)) if l.is_zero() => ", relay draining, linger 0".into(),
        Some((l, e)) => format!(
            ", relay draining, linger {} ms looked at every {} ms",
            l.as_millis(),
            e.as_millis()
        ),
    };
    let writers = 16;
    // All but the unkeyed message with NOTIFY off: without the outbox, an unkeyed and a keyed message
    // with NOTIFY on (the library's default), a keyed one with NOTIFY off.
    let unkeyed_without_notify = Variant::Outbox {
        keyed: false,
        notify: false,
    };
    let variants: Vec<Variant> = VARIANTS.into_iter().filter(|v| *v != unkeyed_without_notify).collect();
    let load = Load {
        pool: &db.pool,
        shape: Shape::Order,
        writers,
        dur,
    };
    load.warm_up(variants[2]).await?;
    // tps[setting][variant]: one list of rounds each.
    let mut tps: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); variants.len()]; relays.len()];
    for round in 0..rounds {
        for i in 0..relays.len() {
            let r = (i + round) % relays.len();
            if relays[r].is_none() {
                sqlx::query("TRUNCATE bench_orders, bench_order_lines, outbox_messages")
                    .execute(&db.pool)
                    .await?;
            }
            let running = relays[r].map(start_relay);
            let what = format!("order transaction, {writers} writers{}", label(relays[r]));
            load.round(&variants, (round, rounds), &what, &mut tps[r]).await?;
            if let Some((stop, task)) = running {
                let _ = stop.send(());
                task.await??;
            }
        }
    }
    let mut rows = Vec::new();
    for (r, relay) in relays.iter().enumerate() {
        rows.extend(variant_rows(
            &format!("order transaction, {writers} writers{}", label(*relay)),
            &variants,
            &tps[r],
            |_| Target::AtLeast(0.90),
            "8 statements without the outbox, 9 with it (round-trip bound 8/9)",
        ));
    }
    Ok(rows)
}
