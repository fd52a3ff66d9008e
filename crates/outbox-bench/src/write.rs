//! Figure 1: the write overhead. A business transaction inserts one row into `bench_orders`; the
//! variants add one outbox message in the same transaction (keyed or not, NOTIFY on or off). The
//! order transaction also runs two references without the outbox: one statement more that writes
//! nothing, and the message's bytes into a plain table; and beside the relay settings, one in the
//! relay's place: the committed rows read and deleted by one statement at a fixed cadence.

mod order;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{Message, Outbox};
use sqlx::PgPool;

use self::order::{create_order_tables, order_rows};
use crate::common::{key, payload, print_figure, BenchDb, Env, Figure, Row, Target, KEYS};

/// The figure's variants: no outbox, then an unkeyed and a keyed message, each with NOTIFY on and off.
const VARIANTS: [Variant; 5] = [
    Variant::NoOutbox,
    Variant::Outbox {
        keyed: false,
        notify: true,
    },
    Variant::Outbox {
        keyed: false,
        notify: false,
    },
    Variant::Outbox {
        keyed: true,
        notify: true,
    },
    Variant::Outbox {
        keyed: true,
        notify: false,
    },
];

/// The business transactions' outbox topic.
const TOPIC: &str = "bench.order.placed";

/// What a business transaction does besides its own row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// Nothing: the baseline.
    NoOutbox,
    /// A reference, no outbox: one statement more that writes nothing (`SELECT 1`), the cost of a
    /// round trip alone.
    RoundTrip,
    /// A reference, no outbox: the message's key and payload inserted into a plain table of the
    /// service's own (`bench_events`: an identity key, the key, the payload), the cost of writing
    /// the same bytes without any outbox bookkeeping.
    PlainRow,
    /// A reference, no outbox: a per-key counter row of the service's own (`bench_key_counters`,
    /// one row per key, every key's row there) incremented as a keyed message's counter is, the
    /// cost of the contiguous per-key sequence alone.
    KeyCounter,
    /// One outbox message.
    Outbox {
        /// With an ordering key (per-key counter row).
        keyed: bool,
        /// PostgreSQL NOTIFY in the transaction.
        notify: bool,
    },
}

impl Variant {
    fn name(self) -> String {
        match self {
            Variant::NoOutbox => "no outbox".into(),
            Variant::RoundTrip => "no outbox, one SELECT 1 more (reference)".into(),
            Variant::PlainRow => "no outbox, the keyed message's bytes into a plain table (reference)".into(),
            Variant::KeyCounter => {
                "no outbox, a per-key counter row incremented as a keyed message's (reference)".into()
            }
            Variant::Outbox { keyed, notify } => format!(
                "{} message, NOTIFY {}",
                if keyed { "keyed" } else { "unkeyed" },
                if notify { "on" } else { "off" }
            ),
        }
    }
}

/// The business transaction around the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One `bench_orders` insert.
    Minimal,
    /// A flash-sale order: read and decrement a product's stock (`SELECT ... FOR UPDATE`, `UPDATE`),
    /// insert the order and three order lines.
    Order,
}

/// Products of the `Order` shape (stock rows): contention only as often as two writers pick one.
const PRODUCTS: usize = 1000;

/// One business transaction of shape `shape` and variant `v` by writer `w`, number `i`, committed
/// with `outbox` (which wakes an embedded relay given its `local_wakeup`; a plain commit otherwise).
pub(crate) async fn business_tx(
    outbox: &Outbox,
    pool: &PgPool,
    topic: &str,
    shape: Shape,
    v: Variant,
    (w, i): (usize, u64),
    body: &[u8],
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let customer = (w * 1000 + (i % 1000) as usize) as i32;
    let amount = i as i64 * 7 % 10_000;
    let note = "order placed by the benchmark, two items, standard shipping";
    match shape {
        Shape::Minimal => {
            sqlx::query("INSERT INTO bench_orders (customer, amount, note) VALUES ($1, $2, $3)")
                .bind(customer)
                .bind(amount)
                .bind(note)
                .execute(&mut *tx)
                .await?;
        }
        Shape::Order => {
            let product = ((w * 7919 + i as usize * 31) % PRODUCTS) as i32;
            let stock: i64 = sqlx::query_scalar("SELECT stock FROM bench_stock WHERE product = $1 FOR UPDATE")
                .bind(product)
                .fetch_one(&mut *tx)
                .await?;
            anyhow::ensure!(stock > 0, "product {product} sold out");
            sqlx::query("UPDATE bench_stock SET stock = stock - 1 WHERE product = $1")
                .bind(product)
                .execute(&mut *tx)
                .await?;
            let order: i64 = sqlx::query_scalar(
                "INSERT INTO bench_orders (customer, amount, note) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(customer)
            .bind(amount)
            .bind(note)
            .fetch_one(&mut *tx)
            .await?;
            for line in 0..3 {
                sqlx::query(
                    "INSERT INTO bench_order_lines (order_id, line, product, qty, price) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(order)
                .bind(line)
                .bind((product + line) % PRODUCTS as i32)
                .bind(1 + line)
                .bind(amount / 3)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    // Spread over the keys, different per writer: contention only as often as keys collide.
    let msg_key = || key((w * 7919 + i as usize * 104_729) % KEYS);
    match v {
        Variant::NoOutbox => {}
        Variant::RoundTrip => {
            sqlx::query("SELECT 1").execute(&mut *tx).await?;
        }
        Variant::PlainRow => {
            sqlx::query("INSERT INTO bench_events (key, payload) VALUES ($1, $2)")
                .bind(msg_key())
                .bind(body)
                .execute(&mut *tx)
                .await?;
        }
        Variant::KeyCounter => {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO bench_key_counters AS c (key, seq) VALUES ($1, 1) \
                 ON CONFLICT (key) DO UPDATE SET seq = c.seq + 1 RETURNING seq",
            )
            .bind(msg_key())
            .fetch_one(&mut *tx)
            .await?;
        }
        Variant::Outbox { keyed, notify } => {
            let mut m = Message::new(topic, body.to_vec());
            if keyed {
                m = m.key(msg_key());
            }
            outbox.clone().notify(notify).enqueue(&mut tx, &m).await?;
        }
    }
    outbox.commit(tx).await?;
    Ok(())
}

/// Runs `writers` concurrent writers of variant `v` for `dur`, committing with `outbox`; returns
/// transactions per second.
pub(crate) async fn throughput(
    outbox: &Outbox,
    pool: &PgPool,
    topic: &str,
    shape: Shape,
    v: Variant,
    writers: usize,
    dur: Duration,
) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let body = Arc::new(payload());
    let mut tasks = Vec::new();
    let started = Instant::now();
    for w in 0..writers {
        let (outbox, pool, count, stop, body, topic) = (
            outbox.clone(),
            pool.clone(),
            count.clone(),
            stop.clone(),
            body.clone(),
            topic.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                business_tx(&outbox, &pool, &topic, shape, v, (w, i), &body).await?;
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(dur).await;
    // Count what committed within the window; transactions still in flight finish outside it.
    let n = count.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / secs)
}

/// `writers` concurrent business transactions of shape `shape` on `pool`, each variant measured
/// for `dur`, committed with `outbox`.
struct Load<'a> {
    outbox: Outbox,
    pool: &'a PgPool,
    shape: Shape,
    writers: usize,
    dur: Duration,
}

impl Load<'_> {
    /// Half a second of variant `v`, not measured: connections, plans, caches.
    async fn warm_up(&self, v: Variant) -> anyhow::Result<()> {
        throughput(
            &self.outbox,
            self.pool,
            TOPIC,
            self.shape,
            v,
            self.writers,
            Duration::from_millis(500),
        )
        .await?;
        Ok(())
    }

    /// One round: every variant for `dur` in turn, starting with number `round` (rotating start),
    /// each one's transactions per second pushed onto its list in `tps`; then logs the round under
    /// `what`.
    async fn round(
        &self,
        variants: &[Variant],
        (round, rounds): (usize, usize),
        what: &str,
        tps: &mut [Vec<f64>],
    ) -> anyhow::Result<()> {
        for j in 0..variants.len() {
            let k = (j + round) % variants.len();
            let t = throughput(
                &self.outbox,
                self.pool,
                TOPIC,
                self.shape,
                variants[k],
                self.writers,
                self.dur,
            );
            tps[k].push(t.await?);
        }
        eprintln!(
            "write: {what}, round {}/{rounds}: {}",
            round + 1,
            tps.iter()
                .map(|v| format!("{:.0}", v.last().unwrap_or(&0.0)))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        Ok(())
    }
}

/// The rows of one setting `what`: the first variant's transactions per second, then every other
/// variant's as a ratio to it, the outbox's held to `target` (none: a reference setting).
fn variant_rows(
    what: &str,
    variants: &[Variant],
    tps: &[Vec<f64>],
    target: impl Fn(Variant) -> Option<Target>,
    note: &str,
) -> Vec<Row> {
    let base = Row::new(format!("{what}: {}", variants[0].name()), "tx/s", tps[0].clone());
    let mut rows = vec![base.clone()];
    rows.extend(variants.iter().zip(tps).skip(1).map(|(v, t)| {
        let row = Row::new(format!("{what}: {}", v.name()), "tx/s", t.clone()).vs(&base);
        match v {
            Variant::Outbox { .. } => match target(*v) {
                Some(t) => row.target(t).note(note),
                None => row.note(note),
            },
            _ => row,
        }
    }));
    rows
}

/// A counter row at 0 for each of the [`KEYS`] keys in `table` (`key`, `seq`).
async fn counter_rows(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {table} (key, seq) SELECT 'key-' || lpad(k::text, 5, '0'), 0 FROM generate_series(0, $1 - 1) k"
    ))
    .bind(KEYS as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// Runs figure 1.
pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let rounds = env.rounds(7, 2);
    let dur = Duration::from_millis(env.pick(1500, 700));
    let db = BenchDb::create(env, 20).await?;
    // Every key already has its counter row, as in a service that has been running.
    counter_rows(&db.pool, "outbox_keys").await?;
    // Since NOTIFY goes only to lanes whose relay is idle (outbox_leases.idle) and holds them, mark
    // every lane idle and held, as a live relay with nothing to do leaves them: the NOTIFY-on variants
    // then pay for NOTIFY on every transaction (its worst case). Schemas without the column always
    // notify.
    let idle_lanes: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
         WHERE table_name = 'outbox_leases' AND column_name = 'idle')",
    )
    .fetch_one(&db.pool)
    .await?;
    if idle_lanes {
        sqlx::query("UPDATE outbox_leases SET idle = true, expires_at = 'infinity'")
            .execute(&db.pool)
            .await?;
    }
    create_order_tables(&db.pool).await?;
    let mut rows = Vec::new();
    // `--only`: "minimal", "order" (no relay) and the relay settings by their labels.
    let minimal = if env.keeps("minimal") { &[1usize, 16][..] } else { &[] };
    for &writers in minimal {
        let load = Load {
            outbox: Outbox::new(),
            pool: &db.pool,
            shape: Shape::Minimal,
            writers,
            dur,
        };
        load.warm_up(Variant::Outbox {
            keyed: true,
            notify: false,
        })
        .await?;
        let what = format!("{writers} writer(s)");
        let mut tps: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
        for round in 0..rounds {
            sqlx::query("TRUNCATE bench_orders, outbox_messages")
                .execute(&db.pool)
                .await?;
            sqlx::query("VACUUM ANALYZE outbox_keys").execute(&db.pool).await?;
            // Interleaved, starting with a different variant each round.
            load.round(&VARIANTS, (round, rounds), &what, &mut tps).await?;
        }
        rows.extend(variant_rows(
            &what,
            &VARIANTS,
            &tps,
            |v| {
                Some(Target::AtLeast(if matches!(v, Variant::Outbox { keyed: true, .. }) {
                    0.75
                } else {
                    0.85
                }))
            },
            "minimal transaction: BEGIN, INSERT, COMMIT; the enqueue adds one statement (round-trip bound 3/4)",
        ));
    }
    if env.keeps("order") {
        rows.extend(order_rows(&db, rounds, dur, &[None]).await?);
    }
    // The lanes' linger (writers skip NOTIFY while it lasts) against none, in the same rounds.
    let linger = outbox_relay::RelayConfig::DEFAULT_LINGER;
    // And the embedded relay woken in-process by the writers' commits (no NOTIFY needed), linger 0.
    // The defaults look at the lingering lanes every 5 ms; beside them the look that may go up to
    // 100 ms apart while the relay slows the writers' commits (`linger_poll_max`), and the look
    // every 1 ms and every 2 ms.
    let every = outbox_relay::RelayConfig::DEFAULT_LINGER_POLL_INTERVAL;
    let max = outbox_relay::RelayConfig::DEFAULT_LINGER_POLL_MAX;
    let gathered = Duration::from_millis(100);
    let beside = |linger, every, max, local| {
        Some(order::Beside::Relay(order::RelaySetting {
            linger,
            every,
            max,
            local,
        }))
    };
    let settings = [
        beside(Duration::ZERO, every, max, false),
        beside(linger, every, max, false),
        beside(linger, every, gathered, false),
        beside(linger, Duration::from_millis(1), max, false),
        beside(linger, Duration::from_millis(2), max, false),
        beside(Duration::ZERO, every, max, true),
        // The least database work of any relay that removes what it sent, at the defaults' look
        // and at a slow one.
        Some(order::Beside::Removal(every)),
        Some(order::Beside::Removal(Duration::from_millis(100))),
    ];
    let settings: Vec<_> = settings
        .into_iter()
        .filter(|s| s.is_some_and(|b| env.keeps(&b.label())))
        .collect();
    if !settings.is_empty() {
        rows.extend(order_rows(&db, rounds, dur, &settings).await?);
    }
    db.drop_db().await;
    let fig = Figure {
        id: "write".into(),
        title: "1. Write overhead".into(),
        setup: format!(
            "Minimal business transaction = BEGIN; INSERT one bench_orders row; [outbox enqueue of one {}-byte message]; COMMIT. \
             Order transaction = BEGIN; SELECT a product's stock FOR UPDATE ({PRODUCTS} products); UPDATE it; INSERT the order; \
             INSERT three order lines; [enqueue]; COMMIT, 16 writers; without a relay also three references in place of the \
             enqueue: one SELECT 1 more (a round trip alone), the keyed message's key and payload into a plain table \
             (bench_events: identity key, key, payload), the cost of writing the same bytes without outbox bookkeeping, \
             and a counter row of the key incremented (bench_key_counters, the keyed message's upsert), the cost of the \
             contiguous per-key sequence alone. \
             Beside the relay settings, a reference in the relay's place: every 5 or 100 ms one statement reads and deletes \
             every committed outbox row (DELETE ... RETURNING, synchronous_commit off as the relay's marks), the least \
             database work of any relay that removes what it sent. \
             {:.1} s per variant per round, variants interleaved (rotating start), 1 and 16 concurrent writers on a pool \
             of 20; keyed messages spread over {KEYS} keys whose counter rows exist; synchronous_commit=on.{}",
            crate::common::PAYLOAD_BYTES,
            dur.as_secs_f64(),
            if idle_lanes {
                " Every lane marked idle and held (outbox_leases.idle, expires_at), so NOTIFY-on variants notify on every transaction."
            } else {
                ""
            }
        ),
        rounds,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}
