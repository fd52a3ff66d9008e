//! The check every delivery test makes of what an independent reader saw of a destination.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

/// One message as a reader saw it: its `outbox-id`, `outbox-key` and `outbox-seq` headers.
pub type Arrival<'a> = (Uuid, Option<&'a str>, Option<i64>);

/// Checks `arrivals`, in broker order: every expected id arrived, nothing else did, and per key the
/// first arrival of each seq is the one after the key's last, stepping over only the (key, seq) in
/// `skipped` (dead-lettered on purpose, never published); duplicates may repeat earlier seqs. Each
/// failure message starts with `prefix`. Returns the number of duplicates.
pub fn check_arrivals<'a>(
    prefix: &str,
    arrivals: impl IntoIterator<Item = Arrival<'a>>,
    expect: &HashSet<Uuid>,
    skipped: &HashSet<(String, i64)>,
) -> usize {
    let arrivals: Vec<Arrival<'a>> = arrivals.into_iter().collect();
    let ids: HashSet<Uuid> = arrivals.iter().map(|(id, _, _)| *id).collect();
    let missing: Vec<_> = expect.difference(&ids).collect();
    assert!(
        missing.is_empty(),
        "{prefix}{} committed messages never arrived, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let unexpected: Vec<_> = ids.difference(expect).collect();
    assert!(
        unexpected.is_empty(),
        "{prefix}messages that were never committed arrived: {unexpected:?}"
    );
    let mut high: HashMap<&str, i64> = HashMap::new();
    let mut first: HashSet<Uuid> = HashSet::new();
    for (id, key, seq) in &arrivals {
        if !first.insert(*id) {
            continue;
        }
        if let (Some(k), Some(q)) = (*key, *seq) {
            let h = high.entry(k).or_insert(0);
            let mut next = *h + 1;
            while skipped.contains(&(k.to_owned(), next)) {
                next += 1;
            }
            assert_eq!(
                q, next,
                "{prefix}key {k}: seq {q} arrived first after seq {h} (gap or reordering)"
            );
            *h = q;
        }
    }
    arrivals.len() - first.len()
}
