//! The independent reader of the topic and what it saw.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_tests::kafka::{client, reader, seen, Seen};

/// What the independent reader saw, folded as it reads (per key, first arrivals in seq order).
#[derive(Default)]
pub(crate) struct Wire {
    /// Ids seen at least once, with where they first arrived (partition, offset, key, seq).
    pub(crate) seen: HashMap<uuid::Uuid, (i32, i64, Option<String>, Option<i64>)>,
    /// Records read (duplicates included).
    pub(crate) records: u64,
    /// Per key, the seq of the latest first arrival.
    pub(crate) high: HashMap<String, i64>,
    /// First arrivals whose seq was not the key's previous first arrival + 1.
    pub(crate) inversions: u64,
    /// A few of them, for the report.
    pub(crate) examples: Vec<String>,
}

impl Wire {
    fn record(&mut self, seen: Seen) {
        let Seen {
            id,
            key,
            seq,
            partition,
            offset,
            ..
        } = seen;
        self.records += 1;
        if self.seen.contains_key(&id) {
            return;
        }
        self.seen.insert(id, (partition, offset, key.clone(), seq));
        if let (Some(k), Some(q)) = (key, seq) {
            let h = self.high.entry(k.clone()).or_insert(0);
            if q != *h + 1 {
                self.inversions += 1;
                if self.examples.len() < 5 {
                    self.examples.push(format!(
                        "key {k}: seq {q} arrived first after seq {h} (p{partition}@{offset})"
                    ));
                }
            }
            *h = (*h).max(q);
        }
    }
}

pub(crate) fn spawn_reader(
    bootstrap: &str,
    topic: &str,
    wire: Arc<Mutex<Wire>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let consumer = reader(&client(bootstrap), topic);
    tokio::spawn(async move {
        while !stop.load(Relaxed) {
            let Ok(res) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await else {
                continue;
            };
            let Ok(m) = res else { continue };
            wire.lock().unwrap().record(seen(&m));
        }
    })
}
