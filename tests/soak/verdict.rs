//! The end of the run: waiting for the reader and the consumers, then the comparison of what
//! arrived and what was applied with what the writers committed.

use std::collections::{HashMap, HashSet};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outbox::{StoreAdmin, LANES};

use crate::wire::Wire;

/// Let the reader and the consumers catch up (bounded: stop when nothing moves for 3 minutes; a
/// consumer group can sit out a coordinator's failover and the rebalance after it for a minute).
pub(crate) async fn catch_up(committed: &HashSet<uuid::Uuid>, wire: &Mutex<Wire>, dst: &sqlx::PgPool) {
    let mut last = (0usize, 0i64, Instant::now());
    loop {
        let seen_all = committed.iter().all(|id| wire.lock().unwrap().seen.contains_key(id));
        let applied: i64 = sqlx::query_scalar("SELECT count(DISTINCT message_id) FROM effects")
            .fetch_one(dst)
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
}

/// What the run did, for the verdict.
pub(crate) struct Run {
    /// What the independent reader saw.
    pub(crate) wire: Wire,
    /// Ids the writers committed.
    pub(crate) committed: HashSet<uuid::Uuid>,
    /// Ids the writers enqueued and rolled back.
    pub(crate) rolled_back: HashSet<uuid::Uuid>,
    /// Relay kills.
    pub(crate) kills: u64,
    /// Broker kills.
    pub(crate) broker_kills: u64,
    /// The relay's batch size.
    pub(crate) batch: usize,
    /// When the run started.
    pub(crate) started: Instant,
    /// How the last relay exited.
    pub(crate) relay_exit: ExitStatus,
}

/// Compares what arrived on the topic and what the consumer applied (in `dst`) with what the
/// writers committed, prints the counts; true if any is above zero (or the wire duplicates above
/// their bound, rows left in `store`, the last relay not exiting cleanly): the run failed.
pub(crate) async fn judge(run: Run, dst: &sqlx::PgPool, store: &outbox::postgres::PgStore) -> bool {
    let Run {
        wire,
        committed,
        rolled_back,
        kills,
        broker_kills,
        batch,
        started,
        relay_exit,
    } = run;
    let lost_wire = committed.iter().filter(|id| !wire.seen.contains_key(id)).count();
    let leaked_wire = wire.seen.keys().filter(|id| !committed.contains(id)).count();
    let rows: Vec<(uuid::Uuid, Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT message_id, key, seq FROM effects ORDER BY n")
            .fetch_all(dst)
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
    let bound = (kills + broker_kills) * (batch as u64) * LANES as u64;

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
        batch
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
    failed
}
