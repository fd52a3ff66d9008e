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
    check_all_and_only(prefix, &arrivals, expect);
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

/// Like [`check_arrivals`] (nothing skipped), for a run in which messages timed out in the
/// producer's queue (Kafka's `message.timeout.ms`): librdkafka may then write a key's later message
/// and not the earlier one that timed out (its documented gap), so first arrivals may step ahead.
/// What the relay still owes is to send the key's later messages again after the earlier one: per
/// key, the last copy of each seq arrives after the last copy of the seq before it, which is the
/// order an inbox under `GapPolicy::Hold` applies them in. Returns the number of duplicates.
pub fn check_last_copies<'a>(
    prefix: &str,
    arrivals: impl IntoIterator<Item = Arrival<'a>>,
    expect: &HashSet<Uuid>,
) -> usize {
    let arrivals: Vec<Arrival<'a>> = arrivals.into_iter().collect();
    check_all_and_only(prefix, &arrivals, expect);
    // Each (key, seq)'s last copy, at its place in the arrivals.
    let mut last: HashMap<(&str, i64), usize> = HashMap::new();
    for (at, (_, key, seq)) in arrivals.iter().enumerate() {
        if let (Some(k), Some(q)) = (*key, *seq) {
            last.insert((k, q), at);
        }
    }
    let mut by_key: HashMap<&str, Vec<(i64, usize)>> = HashMap::new();
    for ((k, q), at) in last {
        by_key.entry(k).or_default().push((q, at));
    }
    for (k, mut seqs) in by_key {
        seqs.sort_unstable();
        for pair in seqs.windows(2) {
            let ((q0, at0), (q1, at1)) = (pair[0], pair[1]);
            assert_eq!(
                q1,
                q0 + 1,
                "{prefix}key {k}: seq {q1} arrived, seq {} never did",
                q0 + 1
            );
            assert!(
                at1 > at0,
                "{prefix}key {k}: the last copy of seq {q1} arrived before the last copy of seq {q0}"
            );
        }
        assert_eq!(seqs[0].0, 1, "{prefix}key {k}: seq 1 never arrived");
    }
    let distinct: HashSet<Uuid> = arrivals.iter().map(|(id, _, _)| *id).collect();
    arrivals.len() - distinct.len()
}

/// Every expected id arrived and nothing else did.
fn check_all_and_only(prefix: &str, arrivals: &[Arrival<'_>], expect: &HashSet<Uuid>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arrivals of key `k` with these seqs (ids from the seqs), and the ids expected.
    fn of(seqs: &[i64]) -> (Vec<Arrival<'static>>, HashSet<Uuid>) {
        let id = |q: i64| Uuid::from_u128(q as u128);
        let arrivals = seqs.iter().map(|&q| (id(q), Some("k"), Some(q))).collect();
        (arrivals, seqs.iter().map(|&q| id(q)).collect())
    }

    fn last_copies(seqs: &[i64]) -> std::thread::Result<usize> {
        let (arrivals, expect) = of(seqs);
        std::panic::catch_unwind(|| check_last_copies("", arrivals, &expect))
    }

    #[test]
    fn a_later_seq_written_first_passes_when_sent_again_after_its_predecessor() {
        assert_eq!(last_copies(&[1, 3, 2, 3]).unwrap(), 1);
        assert_eq!(last_copies(&[1, 2, 3, 1, 2, 3]).unwrap(), 3);
    }

    #[test]
    fn a_later_seq_not_sent_again_or_a_seq_missing_fails() {
        assert!(last_copies(&[1, 3, 2]).is_err());
        assert!(last_copies(&[1, 2, 4]).is_err());
        assert!(last_copies(&[2, 3]).is_err());
        assert!(last_copies(&[1, 2, 3, 2]).is_err());
    }

    #[test]
    fn first_arrivals_out_of_order_fail_the_strict_check() {
        let (arrivals, expect) = of(&[1, 3, 2, 3]);
        let strict = std::panic::catch_unwind(|| check_arrivals("", arrivals, &expect, &HashSet::new()));
        assert!(strict.is_err());
    }
}
