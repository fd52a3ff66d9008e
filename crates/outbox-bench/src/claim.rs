//! Figure 8, where the claim runs: the SQL-only drain with a pool as a service makes it (the store
//! claims on up to two connections of its own, started with JIT off) against a pool whose
//! connections start with JIT off (the store claims on it), same rounds, rotating order. Each claim
//! is one statement either way; until `d5db381` the first claimed in a transaction of its own
//! (BEGIN, `SET LOCAL jit = off`, the claim, COMMIT), the figure's first rows in BENCHMARKS.md.

use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;

use crate::common::{fill_backlog, print_figure, BenchDb, Env, Figure, Row};
use crate::drain::{drain_config, relay_drain, Drained, Sink};

pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let n = env.pick(500_000usize, 20_000);
    let rounds = env.rounds(5, 1);
    let limit = Duration::from_secs(env.pick(600, 120));
    let (mut tx, mut one) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for i in 0..2 {
            let pool_jit_off = (i + round) % 2 == 0;
            let mut db = BenchDb::create(env, 20).await?;
            fill_backlog(&db.pool, "bench-claim", n).await?;
            if pool_jit_off {
                let opts = db.pool.connect_options().as_ref().clone().options([("jit", "off")]);
                db.pool = PgPoolOptions::new().max_connections(20).connect_with(opts).await?;
            }
            let d = relay_drain(&db, drain_config(), Sink::Null(Duration::ZERO), None, n as u64, limit).await?;
            db.drop_db().await;
            eprintln!(
                "claim: round {}/{rounds}, {}: {:.0} msg/s, claim {:.1} us/msg",
                round + 1,
                if pool_jit_off {
                    "pool with JIT off"
                } else {
                    "default pool"
                },
                d.rate(),
                d.phases_us.0
            );
            if pool_jit_off { &mut one } else { &mut tx }.push(d);
        }
    }
    let rate = |v: &[Drained]| v.iter().map(Drained::rate).collect::<Vec<f64>>();
    let claim_us = |v: &[Drained]| v.iter().map(|d| d.phases_us.0).collect::<Vec<f64>>();
    let tx_row = Row::rate(
        "SQL-only drain, default pool (claims on the store's own connections, JIT off)",
        rate(&tx),
    );
    let tx_claim = Row::new("claim time per message, default pool", "us", claim_us(&tx));
    let rows = vec![
        Row::rate("SQL-only drain, pool with jit=off (claims on it)", rate(&one))
            .vs(&tx_row)
            .note("pool with JIT off / default pool, same round"),
        tx_row,
        Row::new("claim time per message, pool with JIT off", "us", claim_us(&one))
            .vs(&tx_claim)
            .note("pool with JIT off / default pool, same round"),
        tx_claim,
    ];
    let fig = Figure {
        id: "claim".into(),
        title: "8. Where the claim runs".into(),
        setup: format!(
            "Backlog of {n} keyed rows ({} keys) per drain; relay embedded with defaults and a publisher that \
             confirms at once (the SQL-only drain of figure 2); claim time summed over the 32 lanes.",
            crate::common::KEYS
        ),
        rounds,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}
