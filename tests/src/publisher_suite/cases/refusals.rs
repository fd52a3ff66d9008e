//! The cases on the shared server: what the broker refuses (too large, no such destination, one
//! bad message in a batch, directly and through the relay) and the headers carried end to end.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{FailureKind, Message, Publisher, StoreAdmin, StoredMessage};
use uuid::Uuid;

use crate::embedded::{drained, start, test_config};
use crate::publisher_suite::delivery::{outbox_db, publish_until_ok};
use crate::publisher_suite::{check_delivery, read_ids, stored, BrokerFixture, Received};

/// A payload the broker refuses as too large is `Permanent` (dead-lettered, never retried),
/// and the publisher goes on publishing.
pub async fn oversize_is_permanent(fixture: Arc<dyn BrokerFixture>) {
    let name = fixture.name();
    let dest = fixture.destination().await;
    let publisher = fixture.publisher().await;
    let big = stored(1, &dest, Some("big"), Some(1), vec![b'x'; fixture.oversize()]);
    assert_permanent(name, &*publisher, big, "an oversize payload").await;
    publish_until_ok(&*publisher, &dest, Duration::from_secs(30)).await;
}

/// Publishing to a destination the broker does not have is `Permanent`, within a bound.
pub async fn missing_destination_is_permanent(fixture: Arc<dyn BrokerFixture>) {
    let name = fixture.name();
    let missing = fixture.missing_destination().await;
    let publisher = fixture.publisher().await;
    let row = stored(1, &missing, Some("k"), Some(1), b"nowhere".to_vec());
    let started = Instant::now();
    assert_permanent(name, &*publisher, row, "a missing destination").await;
    eprintln!("{name}: missing destination Permanent after {:.1?}", started.elapsed());
}

/// Publishes `row` alone; asserts it fails `Permanent` (for `why`) within 60 s.
async fn assert_permanent(name: &str, publisher: &dyn Publisher, row: StoredMessage, why: &str) {
    let out = tokio::time::timeout(Duration::from_secs(60), publisher.publish(&[row]))
        .await
        .unwrap_or_else(|_| panic!("{name}: a publish with {why} did not return within 60 s"));
    match &out[0] {
        Err(e) if e.kind == FailureKind::Permanent => {}
        other => panic!("{name}: {why} must be Permanent, was {other:?}"),
    }
}

/// One batch, one message of it to a missing destination: only that one fails (`Permanent`);
/// a later message of its key is delivered or held back; every other message is delivered.
pub async fn mixed_batch(fixture: Arc<dyn BrokerFixture>) {
    let name = fixture.name();
    let dest = fixture.destination().await;
    let missing = fixture.missing_destination().await;
    let publisher = fixture.publisher().await;
    let batch = vec![
        stored(1, &dest, Some("a"), Some(1), b"a1".to_vec()),
        stored(2, &dest, Some("b"), Some(1), b"b1".to_vec()),
        stored(3, &missing, Some("c"), Some(1), b"c1".to_vec()),
        stored(4, &dest, Some("a"), Some(2), b"a2".to_vec()),
        stored(5, &dest, Some("c"), Some(2), b"c2".to_vec()),
        stored(6, &dest, None, None, b"unkeyed".to_vec()),
        stored(7, &dest, Some("b"), Some(2), b"b2".to_vec()),
    ];
    let out = tokio::time::timeout(Duration::from_secs(60), publisher.publish(&batch))
        .await
        .expect("the batch returns");
    assert_eq!(out.len(), batch.len(), "{name}: one outcome per message");
    let mut expect = HashSet::new();
    for (i, (row, r)) in batch.iter().zip(&out).enumerate() {
        match (i, r) {
            (2, Err(e)) if e.kind == FailureKind::Permanent => {}
            (2, other) => panic!("{name}: the message to a missing destination must be Permanent: {other:?}"),
            (4, Err(e)) if e.kind == FailureKind::HeldBack => {}
            (_, Ok(d)) => {
                assert_eq!(d.pos, row.pos, "{name}: the outcome names its row");
                expect.insert(row.id);
            }
            (_, other) => panic!("{name}: message {i} ({:?}) must be delivered: {other:?}", row.key),
        }
    }
    let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
    let ids: HashSet<Uuid> = seen.iter().map(|r| r.id).collect();
    assert_eq!(
        ids, expect,
        "{name}: exactly the delivered messages are on the destination"
    );
}

/// The same through the relay (dead letters skipped): the message to the missing destination is
/// dead-lettered, every other message arrives, each key in order (its key's later message too).
pub async fn mixed_batch_relay(fixture: Arc<dyn BrokerFixture>) {
    let name = fixture.name();
    let dest = fixture.destination().await;
    let missing = fixture.missing_destination().await;
    let publisher = fixture.publisher().await;
    let (pool, store) = outbox_db().await;
    let bad = Message::new(missing, "to nowhere").key("key-bad");
    let mut msgs = vec![Message::new(&dest, "first").key("key-bad")];
    msgs.push(bad.clone());
    for i in 0..20 {
        msgs.push(Message::new(&dest, format!("{i}")).key(format!("key-{}", i % 4)));
    }
    msgs.push(Message::new(&dest, "after").key("key-bad"));
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue_batch(&mut tx, &msgs).await.unwrap();
    tx.commit().await.unwrap();
    let relay = start(
        store.clone(),
        publisher,
        test_config().dead_letter_policy(outbox_relay::DeadLetterPolicy::Skip),
    );
    drained(&store, Duration::from_secs(120)).await;
    relay.stop().await;
    let dead = store.dead_letters(10).await.unwrap();
    assert_eq!(
        dead.len(),
        1,
        "{name}: exactly the bad message is dead-lettered: {dead:?}"
    );
    assert_eq!(dead[0].id, bad.id());
    let expect: HashSet<Uuid> = msgs.iter().map(|m| m.id()).filter(|id| *id != bad.id()).collect();
    let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
    let ids: HashSet<Uuid> = seen.iter().map(|r| r.id).collect();
    assert_eq!(ids, expect, "{name}: every other message arrived");
    // key-bad: seq 1 then seq 3 (seq 2 was the dead letter).
    let bad_key: Vec<i64> = seen
        .iter()
        .filter(|r| r.key.as_deref() == Some("key-bad"))
        .filter_map(|r| r.seq)
        .collect();
    assert_eq!(bad_key.first(), Some(&1), "{name}: key-bad in order: {bad_key:?}");
    assert_eq!(
        bad_key.iter().find(|s| **s != 1),
        Some(&3),
        "{name}: key-bad in order: {bad_key:?}"
    );
    let good: Vec<Received> = seen
        .into_iter()
        .filter(|r| r.key.as_deref() != Some("key-bad"))
        .collect();
    let good_ids: HashSet<Uuid> = good.iter().map(|r| r.id).collect();
    check_delivery(name, &good, &good_ids);
}

/// Through the relay: id, key, seq, source, a `traceparent` and a user header arrive unchanged,
/// payload bytes too (non-UTF-8 included); an unkeyed message carries no key and no seq.
pub async fn headers_end_to_end(fixture: Arc<dyn BrokerFixture>) {
    let name = fixture.name();
    let dest = fixture.destination().await;
    let publisher = fixture.publisher().await;
    let (pool, store) = outbox_db().await;
    let source: String = sqlx::query_scalar("SELECT id FROM outbox_source")
        .fetch_one(&pool)
        .await
        .unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let payload: Vec<u8> = vec![0x00, 0xff, 0xfe, b'{', 0x80, 0xc3, 0x28, b'}', 0x00];
    let keyed = Message::new(&dest, payload.clone())
        .key("order-42")
        .header("traceparent", traceparent)
        .header("x-user", "caf\u{e9} \u{1f600}");
    let second = Message::new(&dest, "second").key("order-42");
    let unkeyed = Message::new(&dest, Vec::<u8>::new()).header("x-user", "plain");
    let mut tx = pool.begin().await.unwrap();
    for m in [&keyed, &second, &unkeyed] {
        outbox::enqueue(&mut tx, m).await.unwrap();
    }
    tx.commit().await.unwrap();
    let relay = start(store.clone(), publisher, test_config());
    drained(&store, Duration::from_secs(60)).await;
    relay.stop().await;
    let expect = HashSet::from([keyed.id(), second.id(), unkeyed.id()]);
    let seen = read_ids(&*fixture, &dest, &expect, Duration::from_secs(60)).await;
    check_delivery(name, &seen, &expect);
    let find = |id: Uuid| seen.iter().find(|r| r.id == id).expect("read back").clone();
    let header = |r: &Received, h: &str| {
        r.headers
            .iter()
            .filter(|(n, _)| n == h)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };

    let r = find(keyed.id());
    assert_eq!(r.key.as_deref(), Some("order-42"), "{name}: key");
    assert_eq!(r.seq, Some(1), "{name}: seq");
    assert_eq!(r.source.as_deref(), Some(source.as_str()), "{name}: source");
    assert_eq!(r.payload, payload, "{name}: payload bytes");
    assert_eq!(header(&r, "traceparent"), [traceparent], "{name}: traceparent");
    assert_eq!(header(&r, "x-user"), ["caf\u{e9} \u{1f600}"], "{name}: user header");
    assert_eq!(
        header(&r, outbox::HEADER_ID),
        [keyed.id().to_string()],
        "{name}: id header"
    );
    assert_eq!(header(&r, outbox::HEADER_KEY), ["order-42"], "{name}: key header");
    assert_eq!(header(&r, outbox::HEADER_SEQ), ["1"], "{name}: seq header");
    assert_eq!(
        header(&r, outbox::HEADER_SOURCE),
        std::slice::from_ref(&source),
        "{name}: source header"
    );

    let r = find(second.id());
    assert_eq!((r.key.as_deref(), r.seq), (Some("order-42"), Some(2)), "{name}: second");
    assert_eq!(r.payload, b"second", "{name}: second payload");

    let r = find(unkeyed.id());
    assert_eq!(r.key, None, "{name}: an unkeyed message has no key");
    assert_eq!(r.seq, None, "{name}: an unkeyed message has no seq");
    assert_eq!(r.source.as_deref(), Some(source.as_str()), "{name}: source (unkeyed)");
    assert!(r.payload.is_empty(), "{name}: empty payload");
    assert_eq!(header(&r, "x-user"), ["plain"], "{name}: user header (unkeyed)");
}
