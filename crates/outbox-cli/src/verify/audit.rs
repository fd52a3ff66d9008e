//! The audit of one source's keyed messages as a topic delivers them, and of its unkeyed ids when
//! published rows are kept. Memory grows with keys (and open gaps), never with messages.
//!
//! Per (source, key), in the order each topic holds them (a key lives on one partition):
//! - **duplicate**: a seq seen before (on any verified topic). At-least-once delivery allows it: it
//!   is reported, it does not fail the audit;
//! - **reordered**: a seq seen for the first time that is lower than one already seen for the key
//!   on the same topic (a swapped pair `4, 3` is one reordered message, the `3`);
//! - **missing**: a seq from the first one seen (the first retained) up to the key's counter that
//!   never appeared and is neither pending nor dead-lettered.
//!
//! Seqs above the counter read at start were enqueued after it and are not judged.

use std::collections::HashMap;

use serde::Serialize;

/// How many seqs (or ranges) of one kind are listed per key; the counts are always complete.
const LISTED: usize = 10;

/// What the database says about one key, read before the topic (a consistent start point).
#[derive(Debug, Default, Clone)]
pub(crate) struct KeyDb {
    /// The key's counter: the last seq handed out.
    pub(crate) counter: i64,
    /// Seqs still in the outbox (not published yet), sorted.
    pub(crate) pending: Vec<i64>,
    /// Dead-lettered seqs, sorted.
    pub(crate) dead: Vec<i64>,
}

/// One kept published unkeyed row: where the broker confirmed it.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    /// Index of the topic in the verified list.
    pub(crate) topic: usize,
    /// Kafka partition.
    pub(crate) partition: i32,
    /// Kafka offset.
    pub(crate) offset: i64,
    /// Seen on the topic.
    pub(crate) seen: bool,
}

/// The per-key state while reading.
#[derive(Debug)]
struct KeyState {
    /// Lowest seq seen.
    first: i64,
    /// Highest seq seen.
    max: i64,
    /// Seqs in `first..=max` not seen yet: sorted, disjoint, inclusive ranges.
    gaps: Vec<(i64, i64)>,
    /// Highest seq seen per topic index.
    high: Vec<(usize, i64)>,
    duplicates: u64,
    duplicate_seqs: Vec<i64>,
    reordered: u64,
    reordered_seqs: Vec<i64>,
}

impl KeyState {
    fn new(topic: usize, seq: i64) -> Self {
        KeyState {
            first: seq,
            max: seq,
            gaps: Vec::new(),
            high: vec![(topic, seq)],
            duplicates: 0,
            duplicate_seqs: Vec::new(),
            reordered: 0,
            reordered_seqs: Vec::new(),
        }
    }

    fn observe(&mut self, topic: usize, seq: i64) {
        let high = self.high.iter_mut().find(|(t, _)| *t == topic);
        let behind = high.as_ref().is_some_and(|(_, h)| seq < *h);
        match high {
            Some((_, h)) => *h = (*h).max(seq),
            None => self.high.push((topic, seq)),
        }
        let fresh = if seq > self.max {
            if seq > self.max + 1 {
                self.gaps.push((self.max + 1, seq - 1));
            }
            self.max = seq;
            true
        } else if seq < self.first {
            if seq + 1 < self.first {
                self.gaps.insert(0, (seq + 1, self.first - 1));
            }
            self.first = seq;
            true
        } else {
            self.fill(seq)
        };
        if !fresh {
            self.duplicates += 1;
            push_listed(&mut self.duplicate_seqs, seq);
        } else if behind {
            self.reordered += 1;
            push_listed(&mut self.reordered_seqs, seq);
        }
    }

    /// Takes `seq` out of the gaps; false when it was not in one (seen before).
    fn fill(&mut self, seq: i64) -> bool {
        let Some(i) = self.gaps.iter().position(|&(a, b)| a <= seq && seq <= b) else {
            return false;
        };
        let (a, b) = self.gaps[i];
        match (a == seq, b == seq) {
            (true, true) => {
                self.gaps.remove(i);
            }
            (true, false) => self.gaps[i].0 = seq + 1,
            (false, true) => self.gaps[i].1 = seq - 1,
            (false, false) => {
                self.gaps[i].1 = seq - 1;
                self.gaps.insert(i + 1, (seq + 1, b));
            }
        }
        true
    }
}

fn push_listed(list: &mut Vec<i64>, seq: i64) {
    if list.len() < LISTED {
        list.push(seq);
    }
}

/// Reads records one at a time; [`Audit::finish`] compares with the database.
#[derive(Debug, Default)]
pub(crate) struct Audit {
    keys: HashMap<Vec<u8>, KeyState>,
    /// Kept published unkeyed rows of the verified topics, by id.
    kept: HashMap<uuid::Uuid, Kept>,
    /// Counters of what was read.
    pub(crate) counts: Counts,
}

/// What was read, by kind.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Counts {
    /// Records read.
    pub(crate) records: u64,
    /// Keyed records of this source.
    pub(crate) keyed: u64,
    /// Unkeyed records of this source.
    pub(crate) unkeyed: u64,
    /// Records of another outbox database (`outbox-source` differs).
    pub(crate) other_source: u64,
    /// Records without an `outbox-id` header: not written by a relay.
    pub(crate) foreign: u64,
    /// Records with `outbox-key` but no valid `outbox-seq`.
    pub(crate) malformed: u64,
    /// Unkeyed records seen twice (only known for kept published rows).
    pub(crate) unkeyed_duplicates: u64,
}

impl Audit {
    /// An audit that also checks these kept published unkeyed rows.
    pub(crate) fn new(kept: HashMap<uuid::Uuid, Kept>) -> Self {
        Audit {
            kept,
            ..Audit::default()
        }
    }

    /// A keyed record of this source on topic number `topic`.
    pub(crate) fn keyed(&mut self, topic: usize, key: &[u8], seq: i64) {
        self.counts.keyed += 1;
        match self.keys.get_mut(key) {
            Some(state) => state.observe(topic, seq),
            None => {
                self.keys.insert(key.to_vec(), KeyState::new(topic, seq));
            }
        }
    }

    /// An unkeyed record of this source.
    pub(crate) fn unkeyed(&mut self, id: uuid::Uuid) {
        self.counts.unkeyed += 1;
        if let Some(k) = self.kept.get_mut(&id) {
            if k.seen {
                self.counts.unkeyed_duplicates += 1;
            }
            k.seen = true;
        }
    }

    /// Compares what was read with the database. `db` holds every key's counter, pending and
    /// dead-lettered seqs; `window` tells whether a (topic, partition, offset) was within the read
    /// (retained at start and below the end point): kept rows outside it are not judged.
    pub(crate) fn finish(self, db: &HashMap<Vec<u8>, KeyDb>, window: impl Fn(usize, i32, i64) -> bool) -> Findings {
        let mut f = Findings {
            keys: self.keys.len() as u64,
            unkeyed_checked: self
                .kept
                .values()
                .filter(|k| window(k.topic, k.partition, k.offset))
                .count() as u64,
            ..Findings::default()
        };
        let empty = KeyDb::default();
        for (key, st) in self.keys {
            let known = db.get(&key);
            if known.is_none() {
                f.unknown_keys += 1;
            }
            let kdb = known.unwrap_or(&empty);
            // An unknown key is judged up to what was seen.
            let counter = if known.is_some() { kdb.counter } else { st.max };
            if st.max > counter {
                f.after_start += 1;
            }
            let mut holes: Vec<(i64, i64)> = st
                .gaps
                .iter()
                .filter(|(a, _)| *a <= counter)
                .map(|&(a, b)| (a, b.min(counter)))
                .collect();
            if st.max < counter {
                holes.push((st.max + 1, counter));
            }
            let (missing, missing_seqs) = subtract(&holes, &kdb.pending, &kdb.dead);
            if missing == 0 && st.duplicates == 0 && st.reordered == 0 {
                continue;
            }
            f.missing += missing;
            f.duplicates += st.duplicates;
            f.reordered += st.reordered;
            f.problems.push(KeyFinding {
                key: String::from_utf8_lossy(&key).into_owned(),
                first: st.first,
                last: st.max,
                counter: known.map(|k| k.counter),
                missing,
                missing_seqs,
                reordered: st.reordered,
                reordered_seqs: st.reordered_seqs,
                duplicates: st.duplicates,
                duplicate_seqs: st.duplicate_seqs,
            });
        }
        f.problems.sort_by(|a, b| a.key.cmp(&b.key));
        let mut lost: Vec<uuid::Uuid> = self
            .kept
            .iter()
            .filter(|(_, k)| !k.seen && window(k.topic, k.partition, k.offset))
            .map(|(id, _)| *id)
            .collect();
        lost.sort();
        f.unkeyed_missing = lost.len() as u64;
        lost.truncate(LISTED * 10);
        f.unkeyed_missing_ids = lost;
        f
    }
}

/// The seqs of `holes` that are neither pending nor dead: how many, and the first ranges.
fn subtract(holes: &[(i64, i64)], pending: &[i64], dead: &[i64]) -> (u64, Vec<(i64, i64)>) {
    let mut excluded: Vec<i64> = pending.iter().chain(dead).copied().collect();
    excluded.sort_unstable();
    excluded.dedup();
    let mut count = 0u64;
    let mut ranges = Vec::new();
    for &(a, b) in holes {
        let lo = excluded.partition_point(|&s| s < a);
        let hi = excluded.partition_point(|&s| s <= b);
        let mut start = a;
        for &s in excluded[lo..hi].iter().chain(std::iter::once(&(b + 1))) {
            if s > start {
                count += (s - start) as u64;
                if ranges.len() < LISTED {
                    ranges.push((start, s - 1));
                }
            }
            start = s + 1;
        }
    }
    (count, ranges)
}

/// The audit's result.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Findings {
    /// Keys seen on the topics.
    pub(crate) keys: u64,
    /// Lost keyed messages.
    pub(crate) missing: u64,
    /// Reordered keyed messages.
    pub(crate) reordered: u64,
    /// Duplicated keyed messages (allowed by at-least-once delivery).
    pub(crate) duplicates: u64,
    /// Keys seen on the topics that the database has no counter for.
    pub(crate) unknown_keys: u64,
    /// Keys with a seq above the counter read at start (enqueued since).
    pub(crate) after_start: u64,
    /// Kept published unkeyed rows whose offset was within the read.
    pub(crate) unkeyed_checked: u64,
    /// Of those, rows whose id never appeared.
    pub(crate) unkeyed_missing: u64,
    /// Their ids (the first hundred).
    pub(crate) unkeyed_missing_ids: Vec<uuid::Uuid>,
    /// Keys with a finding, sorted by key.
    pub(crate) problems: Vec<KeyFinding>,
}

/// Findings for one key.
#[derive(Debug, Serialize)]
pub(crate) struct KeyFinding {
    /// The key (invalid UTF-8 replaced).
    pub(crate) key: String,
    /// Lowest seq seen.
    pub(crate) first: i64,
    /// Highest seq seen.
    pub(crate) last: i64,
    /// The key's counter at start (`None`: unknown to the database).
    pub(crate) counter: Option<i64>,
    /// Lost messages.
    pub(crate) missing: u64,
    /// The first ranges of lost seqs, inclusive.
    pub(crate) missing_seqs: Vec<(i64, i64)>,
    /// Reordered messages.
    pub(crate) reordered: u64,
    /// The first reordered seqs.
    pub(crate) reordered_seqs: Vec<i64>,
    /// Duplicated messages.
    pub(crate) duplicates: u64,
    /// The first duplicated seqs.
    pub(crate) duplicate_seqs: Vec<i64>,
}

#[cfg(test)]
mod tests;
