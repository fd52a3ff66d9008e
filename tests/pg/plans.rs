//! The plans PostgreSQL picks for the relay's hottest statements while the outbox table's
//! statistics lag behind its contents, as they do between two autovacuums of a busy queue table.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox::{Message, Store};
use outbox_tests::db::exec;

/// `{1,2,3}`: an array literal for `EXECUTE`, which takes no bound parameters.
fn array<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("'{{{}}}'", items.join(","))
}

/// Between two autovacuums the statistics of `outbox_messages` say it holds a few rows while it
/// holds thousands (and many dead ones). With the lane taken from the lease rows, PostgreSQL then
/// planned the mark's delete as one probe of the primary key on `pos` alone per delivered row, a
/// scan of the whole index each time (seen with auto_explain beside the latency benchmark: marks of
/// 150-700 ms, every lane waiting on them, p99 of seconds at 5,000 msg/s). Each delivered row
/// carries its lane, so the probe is on (lane, pos) whatever the estimates.
#[tokio::test]
async fn the_mark_probes_each_row_by_lane_and_position_when_the_statistics_are_stale() {
    for keep in [false, true] {
        let pool = outbox_tests::db::fresh_pg().await;
        exec(&pool, "ALTER TABLE outbox_messages SET (autovacuum_enabled = false)").await;
        let mut tx = pool.begin().await.unwrap();
        let msgs: Vec<Message> = (0..3000).map(|i| Message::new("t", "x").key(format!("k{i}"))).collect();
        outbox::Outbox::new().enqueue_batch(&mut tx, &msgs).await.unwrap();
        tx.commit().await.unwrap();
        // What the benchmark's database had: a vacuum counted few live rows (an idle moment),
        // then the writers filled the table again.
        exec(&pool, "VACUUM outbox_messages").await;
        exec(
            &pool,
            "UPDATE pg_class SET reltuples = 120 WHERE relname IN ('outbox_messages', 'outbox_messages_pkey')",
        )
        .await;

        let store = outbox::postgres::PgStore::new(pool.clone()).keep_published(keep);
        let leases = store.acquire("relay", 64, Duration::from_secs(60)).await.unwrap();
        let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT lane, pos FROM outbox_messages ORDER BY pos LIMIT 600")
            .fetch_all(&pool)
            .await
            .unwrap();
        let ord: BTreeMap<i32, usize> = leases.iter().enumerate().map(|(i, l)| (l.lane, i + 1)).collect();
        let mut args = vec![
            array(leases.iter().map(|l| l.lane)),
            array(leases.iter().map(|l| format!("\"{}\"", l.owner))),
            array(leases.iter().map(|l| l.epoch)),
            array(rows.iter().map(|(lane, _)| ord[lane])),
            array(rows.iter().map(|(lane, _)| lane)),
            array(rows.iter().map(|(_, pos)| pos)),
        ];
        if keep {
            args.push(array(rows.iter().map(|_| 0)));
            args.push(array(rows.iter().map(|_| 0)));
        }
        let mut conn = pool.acquire().await.unwrap();
        exec(&mut *conn, &format!("PREPARE mark AS {}", store.mark_published_sql())).await;
        for mode in ["force_custom_plan", "force_generic_plan"] {
            exec(&mut *conn, &format!("SET plan_cache_mode = {mode}")).await;
            let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE mark({})", args.join(", ")))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
            let plan = plan.join("\n");
            // The lines under the delete node (indented deeper than it).
            let depth = |l: &str| l.len() - l.trim_start().len();
            let mut lines = plan.lines().skip_while(|l| !l.contains("Delete on outbox_messages"));
            let delete = depth(lines.next().unwrap_or_default());
            let probes: Vec<&str> = lines
                .take_while(|l| depth(l) > delete)
                .filter(|l| l.contains("Index Cond") || l.contains("Recheck Cond"))
                .collect();
            assert!(
                !probes.is_empty(),
                "keep {keep}, {mode}: the delete does not probe an index:\n{plan}"
            );
            for p in probes {
                assert!(
                    p.contains("lane = ") && p.contains("pos = "),
                    "keep {keep}, {mode}: a probe not on (lane, pos): {p}\n{plan}"
                );
            }
        }
    }
}
