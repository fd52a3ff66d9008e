//! The flash-sale order transaction's rows: its tables, and the order transaction at 16 writers
//! without and with a relay draining.

use std::time::Duration;

use outbox::Outbox;
use sqlx::PgPool;

use super::{counter_rows, variant_rows, Load, Shape, Variant, PRODUCTS, VARIANTS};
use crate::common::{BenchDb, Row, Target, UntilStopped};

/// Creates the `Order` shape's tables, every product with a large stock.
pub(super) async fn create_order_tables(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE bench_stock (product INT PRIMARY KEY, stock BIGINT NOT NULL); \
         CREATE TABLE bench_order_lines (order_id BIGINT NOT NULL, line INT NOT NULL, product INT NOT NULL, \
           qty INT NOT NULL, price BIGINT NOT NULL, PRIMARY KEY (order_id, line)); \
         CREATE TABLE bench_events (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, key TEXT NOT NULL, \
           payload BYTEA NOT NULL); \
         CREATE TABLE bench_key_counters (key TEXT PRIMARY KEY, seq BIGINT NOT NULL);",
    )
    .execute(pool)
    .await?;
    sqlx::query("INSERT INTO bench_stock SELECT p, 1000000000 FROM generate_series(0, $1 - 1) p")
        .bind(PRODUCTS as i32)
        .execute(pool)
        .await?;
    // Every key has its counter row, as the outbox's own counters in this figure.
    counter_rows(pool, "bench_key_counters").await?;
    Ok(())
}

/// What runs beside the writers: an embedded relay, or a reference in its place.
#[derive(Debug, Clone, Copy)]
pub(super) enum Beside {
    Relay(RelaySetting),
    /// Every so often one statement reads and deletes every committed row (`DELETE ... RETURNING`
    /// the message, without waiting for the WAL flush, as the relay's marks): the least database
    /// work any relay that removes what it sent can do at that cadence.
    Removal(Duration),
}

/// An embedded relay (publisher answering after 2 ms) draining the writers' messages as they commit.
#[derive(Debug, Clone, Copy)]
pub(super) struct RelaySetting {
    /// How long its lanes linger after running dry ([`outbox_relay::RelayConfig::linger`]).
    pub(super) linger: Duration,
    /// How often lingering lanes are looked at.
    pub(super) every: Duration,
    /// The longest between two looks while the relay slows the writers
    /// ([`outbox_relay::RelayConfig::linger_poll_max`]).
    pub(super) max: Duration,
    /// Woken in-process by the writers' `Outbox::commit` (`Relay::wake_on`).
    pub(super) local: bool,
}

impl Beside {
    /// The setting as its rows name it, and as `--only` chooses it.
    pub(super) fn label(&self) -> String {
        let b = match self {
            Beside::Removal(every) => {
                return format!(
                    "no relay, every committed row read and deleted by one statement every {} ms (reference)",
                    every.as_millis()
                )
            }
            Beside::Relay(b) => b,
        };
        if b.local {
            format!(
                "relay draining, woken in-process by Outbox::commit, linger {} ms",
                b.linger.as_millis()
            )
        } else if b.linger.is_zero() {
            "relay draining, linger 0".into()
        } else if b.max <= b.every {
            format!(
                "relay draining, linger {} ms looked at every {} ms",
                b.linger.as_millis(),
                b.every.as_millis()
            )
        } else {
            format!(
                "relay draining, linger {} ms looked at every {} ms, up to {} ms while it slows the writers",
                b.linger.as_millis(),
                b.every.as_millis(),
                b.max.as_millis()
            )
        }
    }
}

/// The flash-sale order transaction at 16 writers: without the outbox, with an unkeyed and a keyed
/// message (NOTIFY on, the library's default) and a keyed one with NOTIFY off, interleaved with a
/// rotating start. Each entry of `relays` is one setting measured in every round (in turn, rotating
/// start): `None` without a relay, or a relay draining beside the writers.
pub(super) async fn order_rows(
    db: &BenchDb,
    rounds: usize,
    dur: Duration,
    relays: &[Option<Beside>],
) -> anyhow::Result<Vec<Row>> {
    sqlx::query("TRUNCATE bench_orders, bench_order_lines, outbox_messages")
        .execute(&db.pool)
        .await?;
    // The writers' Outbox: a new one per relay run, given to the relay when it is woken in-process.
    let start_relay = |b: Beside, outbox: &Outbox| {
        let b = match b {
            Beside::Removal(every) => {
                let pool = db.pool.clone();
                return UntilStopped::spawn(move |stopped| remove_every(pool, every, stopped));
            }
            Beside::Relay(b) => b,
        };
        let mut relay = outbox_relay::Relay::new(
            outbox::postgres::PgStore::new(db.pool.clone()),
            crate::probe::NullPublisher {
                delay: Duration::from_millis(2),
            },
        )
        .config(
            crate::drain::drain_config()
                .linger(b.linger)
                .linger_poll_interval(b.every)
                .linger_poll_max(b.max),
        );
        if b.local {
            relay = relay.wake_on(outbox.local_wakeup());
        }
        UntilStopped::relay(relay)
    };
    let label = |relay: Option<Beside>| relay.map(|b| format!(", {}", b.label())).unwrap_or_default();
    let writers = 16;
    // All but the unkeyed message with NOTIFY off: without the outbox, an unkeyed and a keyed message
    // with NOTIFY on (the library's default), a keyed one with NOTIFY off.
    let unkeyed_without_notify = Variant::Outbox {
        keyed: false,
        notify: false,
    };
    // Without a relay, every variant and three references: what one more round trip costs, what
    // writing the message's bytes into a plain table costs, and what a key's counter row costs.
    let variants: Vec<Variant> = if relays.iter().all(Option::is_none) {
        VARIANTS
            .into_iter()
            .chain([Variant::RoundTrip, Variant::PlainRow, Variant::KeyCounter])
            .collect()
    } else {
        VARIANTS.into_iter().filter(|v| *v != unkeyed_without_notify).collect()
    };
    let load = |outbox: Outbox| Load {
        outbox,
        pool: &db.pool,
        shape: Shape::Order,
        writers,
        dur,
    };
    load(Outbox::new())
        .warm_up(Variant::Outbox {
            keyed: true,
            notify: true,
        })
        .await?;
    // tps[setting][variant]: one list of rounds each.
    let mut tps: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); variants.len()]; relays.len()];
    for round in 0..rounds {
        for i in 0..relays.len() {
            let r = (i + round) % relays.len();
            if relays[r].is_none() {
                sqlx::query("TRUNCATE bench_orders, bench_order_lines, bench_events, outbox_messages")
                    .execute(&db.pool)
                    .await?;
            }
            if matches!(relays[r], Some(Beside::Removal(_))) {
                // No relay listens: writers send no NOTIFY, as after a relay released its lanes.
                sqlx::query("UPDATE outbox_leases SET idle = false")
                    .execute(&db.pool)
                    .await?;
            }
            let outbox = Outbox::new();
            let running = relays[r].map(|b| start_relay(b, &outbox));
            let what = format!("order transaction, {writers} writers{}", label(relays[r]));
            load(outbox)
                .round(&variants, (round, rounds), &what, &mut tps[r])
                .await?;
            if let Some(running) = running {
                running.stop().await?;
            }
        }
    }
    let mut rows = Vec::new();
    for (r, relay) in relays.iter().enumerate() {
        rows.extend(variant_rows(
            &format!("order transaction, {writers} writers{}", label(*relay)),
            &variants,
            &tps[r],
            |_| (!matches!(relay, Some(Beside::Removal(_)))).then_some(Target::AtLeast(0.90)),
            if matches!(relay, Some(Beside::Removal(_))) {
                "a reference: the least database work of removing the rows at this cadence, no relay"
            } else {
                "8 statements without the outbox, 9 with it; see the references beside it (one SELECT 1 more; the same bytes into a plain table; the key's counter row alone)"
            },
        ));
    }
    Ok(rows)
}

/// The removal reference ([`Beside::Removal`]): every `every`, one statement reads and deletes every
/// committed outbox row, until `stopped`.
async fn remove_every(
    pool: PgPool,
    every: Duration,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopped => return Ok(()),
        }
        sqlx::query(
            "WITH s AS (SELECT set_config('synchronous_commit', 'off', true)) \
             DELETE FROM outbox_messages WHERE (SELECT true FROM s) \
             RETURNING id, topic, key, seq, payload, headers",
        )
        .fetch_all(&pool)
        .await?;
    }
}
