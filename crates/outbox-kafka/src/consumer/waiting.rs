//! The partitions paused at a message that waits for its retry: the runner keeps polling the
//! others meanwhile.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::time::Instant;

/// The runner's consumer: its context notes the partitions each rebalance revokes.
pub(super) type RunnerConsumer = StreamConsumer<Rebalances>;

/// Notes the partitions a rebalance revokes, for the runner to forget what waits in them.
#[derive(Default)]
pub(super) struct Rebalances {
    revoked: std::sync::Mutex<Vec<(String, i32)>>,
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut revoked = self.revoked.lock().expect("revoked lock");
            revoked.extend(tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())));
        }
    }
}

/// Partitions paused at a message that waits for a retry, and the handler failures of the message
/// each partition is at.
#[derive(Default)]
pub(super) struct Waiting {
    /// (topic, partition) -> (offset of the waiting message, handler failures so far, resume at);
    /// resume at is `None` once the partition is resumed and the message is being read again.
    at: HashMap<(String, i32), (i64, u32, Option<Instant>)>,
    /// Successful rewinds of a resumed partition that was read past its waiting message (see
    /// [`Waiting::read_past`]), per partition.
    rewinds: HashMap<(String, i32), u32>,
}

/// How often a partition read past its waiting message is rewound to it (the seek succeeded:
/// librdkafka then passes no message fetched before it) and still read past it before the message
/// is taken for gone (the log now starts after it).
const MAX_REWINDS: u32 = 3;

/// What to do with a message of a partition that waits at an earlier one.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadPast {
    /// Nothing waits before it: process it.
    No,
    /// Skip it and rewind the partition to the waiting message at this offset.
    Rewind(i64),
    /// Rewound [`MAX_REWINDS`] times and still read past it: the waiting message at this offset is
    /// gone from the log (retention deleted it meanwhile); process this one.
    Gone(i64),
}

impl Waiting {
    pub(super) fn next_resume(&self) -> Option<Instant> {
        self.at.values().filter_map(|(_, _, r)| *r).min()
    }

    pub(super) fn is_paused(&self, tp: &(String, i32)) -> bool {
        self.at.get(tp).is_some_and(|(_, _, r)| r.is_some())
    }

    /// Handler failures so far of the message at `offset` (0 for any other message).
    pub(super) fn attempts(&self, tp: &(String, i32), offset: i64) -> u32 {
        match self.at.get(tp) {
            Some((o, n, _)) if *o == offset => *n,
            _ => 0,
        }
    }

    pub(super) fn done(&mut self, tp: &(String, i32)) {
        self.at.remove(tp);
        self.rewinds.remove(tp);
    }

    /// Whether the message at `offset` of a resumed partition lies past the message it waits at.
    /// Storing its offset would skip the waiting one and every one between them, so it is not
    /// processed: the partition is read from the waiting message again. That happens when the seek
    /// back to it failed (the fetch went on from where it was), or when the partition came back
    /// after a rebalance at a later committed offset (then the messages between are read again,
    /// and the inbox recognises them).
    pub(super) fn read_past(&mut self, tp: &(String, i32), offset: i64) -> ReadPast {
        let waiting = match self.at.get(tp) {
            Some((o, _, None)) if offset > *o => *o,
            _ => return ReadPast::No,
        };
        if self.rewinds.get(tp).is_some_and(|n| *n >= MAX_REWINDS) {
            self.done(tp);
            return ReadPast::Gone(waiting);
        }
        ReadPast::Rewind(waiting)
    }

    /// Reads the partition from `offset` again.
    pub(super) fn rewind(&mut self, consumer: &RunnerConsumer, tp: &(String, i32), offset: i64) {
        if seek(consumer, tp, offset) {
            self.rewound(tp);
        }
    }

    /// Counts a successful rewind of the partition.
    fn rewound(&mut self, tp: &(String, i32)) {
        *self.rewinds.entry(tp.clone()).or_default() += 1;
    }

    /// Pauses the partition and rewinds it to the waiting message.
    pub(super) fn pause(
        &mut self,
        consumer: &RunnerConsumer,
        tp: (String, i32),
        offset: i64,
        attempts: u32,
        delay: Duration,
    ) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        if let Err(e) = consumer.pause(&tpl) {
            tracing::warn!(error = %e, topic = tp.0, partition = tp.1, "pause failed");
        }
        seek(consumer, &tp, offset);
        self.at.insert(tp, (offset, attempts, Some(Instant::now() + delay)));
    }

    /// Forgets the partitions revoked since the last call: the message waiting in one is its next
    /// owner's (read from the committed offset, which it may have moved past it meanwhile), and
    /// so is the partition if it comes back. Kept, a partition assigned back later was rewound to
    /// a message its other owner had dead-lettered. Their pause is lifted (librdkafka keeps it
    /// across a revoke and an assignment).
    pub(super) fn forget_revoked(&mut self, consumer: &RunnerConsumer) {
        let revoked = std::mem::take(&mut *consumer.context().revoked.lock().expect("revoked lock"));
        let mut tpl = TopicPartitionList::new();
        for tp in revoked {
            if let Some((_, _, resume_at)) = self.at.get(&tp) {
                if resume_at.is_some() {
                    tpl.add_partition(&tp.0, tp.1);
                }
                tracing::info!(
                    topic = tp.0,
                    partition = tp.1,
                    "partition revoked; its waiting message is its next owner's"
                );
                self.done(&tp);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(error = %e, "resume of revoked partitions failed");
            }
        }
    }

    /// Resumes the partitions whose delay is over, rewound to their waiting message again (the
    /// partition may have been revoked and assigned back meanwhile).
    pub(super) fn resume_due(&mut self, consumer: &RunnerConsumer) {
        let now = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for (tp, (offset, _, resume_at)) in self.at.iter_mut() {
            if resume_at.is_some_and(|r| r <= now) {
                *resume_at = None;
                seek(consumer, tp, *offset);
                tpl.add_partition(&tp.0, tp.1);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(error = %e, "resume failed");
            }
        }
    }
}

/// True when the seek succeeded.
fn seek(consumer: &RunnerConsumer, tp: &(String, i32), offset: i64) -> bool {
    match consumer.seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(5)) {
        Ok(()) => true,
        Err(e) => {
            // Not assigned any more: its next owner starts from the committed offset, before it.
            // Still assigned (a timeout): the runner does not process a message past it.
            tracing::debug!(error = %e, topic = tp.0, partition = tp.1, "seek failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_read_past_the_waiting_one_rewinds_until_that_one_is_taken_for_gone() {
        let tp = ("orders".to_owned(), 0);
        let mut waiting = Waiting::default();
        // Paused: nothing is read from it (the runner drops what was fetched before the pause).
        waiting.at.insert(tp.clone(), (10, 1, Some(Instant::now())));
        assert_eq!(waiting.read_past(&tp, 12), ReadPast::No);
        // Resumed: the waiting message, or an earlier one, is processed; a later one is not.
        waiting.at.insert(tp.clone(), (10, 1, None));
        assert_eq!(waiting.read_past(&tp, 10), ReadPast::No);
        assert_eq!(waiting.read_past(&tp, 9), ReadPast::No);
        assert_eq!(waiting.read_past(&(tp.0.clone(), 1), 12), ReadPast::No);
        // A seek that failed counts nothing: rewound again, however often.
        for _ in 0..2 * MAX_REWINDS {
            assert_eq!(waiting.read_past(&tp, 12), ReadPast::Rewind(10));
        }
        for _ in 0..MAX_REWINDS {
            assert_eq!(waiting.read_past(&tp, 12), ReadPast::Rewind(10));
            waiting.rewound(&tp);
            assert_eq!(waiting.attempts(&tp, 10), 1);
        }
        assert_eq!(waiting.read_past(&tp, 12), ReadPast::Gone(10));
        assert_eq!(waiting.attempts(&tp, 10), 0);
        assert_eq!(waiting.read_past(&tp, 13), ReadPast::No);
        // A message done clears its partition's rewinds.
        waiting.at.insert(tp.clone(), (20, 1, None));
        assert_eq!(waiting.read_past(&tp, 21), ReadPast::Rewind(20));
        waiting.rewound(&tp);
        waiting.done(&tp);
        waiting.at.insert(tp.clone(), (30, 1, None));
        for _ in 0..MAX_REWINDS {
            assert_eq!(waiting.read_past(&tp, 31), ReadPast::Rewind(30));
            waiting.rewound(&tp);
        }
        assert_eq!(waiting.read_past(&tp, 31), ReadPast::Gone(30));
    }
}
