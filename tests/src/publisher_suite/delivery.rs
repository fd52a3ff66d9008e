//! Rows for direct publishes, the outbox database of a case, the writers committing rounds of
//! keyed messages, and the reading back and checking of what reached the broker.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox::{Message, Publisher, StoredMessage};
use uuid::Uuid;

use super::{BrokerFixture, Received};

/// A row as the relay would claim it, for direct `Publisher::publish` calls.
pub fn stored(pos: i64, destination: &str, key: Option<&str>, seq: Option<i64>, payload: Vec<u8>) -> StoredMessage {
    let id = Uuid::now_v7();
    let row = StoredMessage::new(pos, id, outbox::lane_of(key, id, outbox::LANES), destination, payload);
    match (key, seq) {
        (Some(key), Some(seq)) => row.key(key, seq),
        _ => row,
    }
}

/// Reads `destination` until every id of `expect` is there or `timeout` passed (the reader may
/// return duplicates, so one read of `expect.len()` messages is not always enough).
pub async fn read_ids(
    fixture: &dyn BrokerFixture,
    destination: &str,
    expect: &HashSet<Uuid>,
    timeout: Duration,
) -> Vec<Received> {
    let start = Instant::now();
    let mut at_least = expect.len();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let seen = fixture.read(destination, at_least, left).await;
        let ids: HashSet<Uuid> = seen.iter().map(|r| r.id).collect();
        let missing = expect.difference(&ids).count();
        if missing == 0 || start.elapsed() >= timeout {
            return seen;
        }
        at_least = seen.len() + missing;
    }
}

/// Checks what a reader saw: every expected id arrived, nothing else did, and per key the first
/// arrival of each seq is 1, 2, 3... in broker order (duplicates may repeat earlier seqs).
/// Returns the number of duplicates.
pub fn check_delivery(name: &str, seen: &[Received], expect: &HashSet<Uuid>) -> usize {
    let arrivals = seen.iter().map(|s| (s.id, s.key.as_deref(), s.seq));
    crate::arrivals::check_arrivals(&format!("{name}: "), arrivals, expect, &HashSet::new())
}

/// A fresh outbox database for one test.
pub(super) async fn outbox_db() -> (sqlx::PgPool, outbox::postgres::PgStore) {
    let (pool, store) = crate::db::fresh_pg_store().await;
    (pool, store)
}

/// Commits `per_key` messages for each of `keys` keys, one transaction per round (one message per
/// key), one round every `every`; returns the ids in commit order.
pub(crate) async fn commit_rounds(
    pool: &sqlx::PgPool,
    destination: &str,
    keys: usize,
    per_key: usize,
    every: Duration,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(every);
    for round in 0..per_key {
        tick.tick().await;
        let msgs: Vec<Message> = (0..keys)
            .map(|k| Message::new(destination, format!("r{round}k{k}")).key(format!("key-{k}")))
            .collect();
        crate::db::commit_batch(pool, &msgs).await;
        ids.extend(msgs.iter().map(|m| m.id()));
    }
    ids
}

/// Publishes one message directly until the broker confirms it (used to know the publisher is
/// connected, and that the server takes publishes again after an outage).
pub(super) async fn publish_until_ok(publisher: &dyn Publisher, destination: &str, within: Duration) -> Uuid {
    let start = Instant::now();
    let mut pos = 0;
    loop {
        pos += 1;
        let row = stored(pos, destination, None, None, b"probe".to_vec());
        match publisher.publish(std::slice::from_ref(&row)).await.remove(0) {
            Ok(_) => return row.id,
            Err(e) => {
                assert!(
                    start.elapsed() < within,
                    "the broker did not confirm a publish within {within:?}: last {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
