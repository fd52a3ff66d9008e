//! The partitions paused at a message that waits for its retry: the runner keeps polling the
//! others meanwhile.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

/// Partitions paused at a message that waits for a retry, and the handler failures of the message
/// each partition is at.
#[derive(Default)]
pub(super) struct Waiting {
    /// (topic, partition) -> (offset of the waiting message, handler failures so far, resume at);
    /// resume at is `None` once the partition is resumed and the message is being read again.
    at: HashMap<(String, i32), (i64, u32, Option<Instant>)>,
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
    }

    /// Pauses the partition and rewinds it to the waiting message.
    pub(super) fn pause(
        &mut self,
        consumer: &StreamConsumer,
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

    /// Resumes the partitions whose delay is over, rewound to their waiting message again (the
    /// partition may have been revoked and assigned back meanwhile).
    pub(super) fn resume_due(&mut self, consumer: &StreamConsumer) {
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

fn seek(consumer: &StreamConsumer, tp: &(String, i32), offset: i64) {
    if let Err(e) = consumer.seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(5)) {
        // Not assigned any more: its next owner starts from the committed offset, before it.
        tracing::debug!(error = %e, topic = tp.0, partition = tp.1, "seek failed");
    }
}
