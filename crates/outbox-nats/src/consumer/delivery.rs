//! One delivery to its end: acked once the inbox committed, nak'd with a delay for a retry, held
//! (`+WPI`) while the database is away, or published to its dead-letter subject and terminated.

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::{self, AckKind};
use outbox_inbox::{Backend, Disposition, Handler, Parked, ParkedFailure, Tried};
use tokio::time::Instant;

use super::{
    NatsConsumerRunner, HEADER_DELIVERIES, HEADER_ERROR, HEADER_ORIGINAL_SEQUENCE, HEADER_ORIGINAL_STREAM,
    HEADER_ORIGINAL_SUBJECT,
};
use crate::subject::topic_of;

/// Where a delivery stands in its stream: its sequence and how many times it was delivered.
#[derive(Clone, Copy)]
struct Delivery {
    stream_seq: u64,
    delivered: i64,
}

impl<DB: Backend, H: Handler<DB>> NatsConsumerRunner<DB, H> {
    /// Processes one delivery to its end: acked, nak'd for a retry, or dead-lettered. Returns true
    /// when shutdown came while it waited (the message was handed back).
    pub(super) async fn handle(
        &self,
        msg: &jetstream::Message,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let at = match msg.info() {
            Ok(i) => Delivery {
                stream_seq: i.stream_sequence,
                delivered: i.delivered,
            },
            Err(e) => {
                tracing::warn!(error = %e, "not a JetStream delivery; ignored");
                return false;
            }
        };
        let Delivery { stream_seq, delivered } = at;
        let headers: Vec<(&str, &[u8])> = msg
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .flat_map(|(k, vs)| vs.iter().map(move |v| (AsRef::<str>::as_ref(k), v.as_str().as_bytes())))
            .collect();
        let subject = msg.subject.as_str();
        let failed_before = u32::try_from(delivered.max(1) - 1).unwrap_or(u32::MAX);
        let max = u32::try_from(self.cfg.max_deliver).unwrap_or(u32::MAX);
        let mut outage = 0u32;
        loop {
            let tried = self
                .core
                .try_once(topic_of(subject), &msg.payload, headers.iter().copied(), failed_before, max, |incoming, _| {
                    tracing::info_span!("inbox.process", outbox.id = %incoming.id, subject, stream_seq, delivered)
                });
            let tried = self.in_progress(msg, tried).await;
            let (id, disposition, error, parked) = match tried {
                Tried::Unreadable { error } => {
                    return self.dead_letter_until_done(msg, &error, at, None, shutdown).await
                }
                Tried::Decided {
                    id,
                    disposition,
                    error,
                    parked,
                } => (id, disposition, error, parked),
            };
            match disposition {
                Disposition::Done => {
                    // Committed: now the ack. A lost ack means one more delivery, which the inbox
                    // recognises.
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(outbox.id = %id, error = %e, "ack not sent; the message will be delivered again");
                    }
                    return false;
                }
                Disposition::WaitForDatabase => {
                    // The database, not the message: keep it and wait, however long it takes.
                    outage += 1;
                    if self.hold(msg, self.backoff.delay(outage), shutdown).await {
                        return true;
                    }
                }
                Disposition::Retry { attempt } => {
                    let delay = self.backoff.delay(attempt);
                    tracing::debug!(outbox.id = %id, delivered, ?delay, "delivered again after the delay");
                    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                        tracing::warn!(error = %e, "nak not sent; the message comes back after ack_wait");
                    }
                    return false;
                }
                Disposition::DeadLetter { .. } => {
                    return self
                        .dead_letter_until_done(msg, &error, at, parked.as_ref(), shutdown)
                        .await;
                }
            }
        }
    }

    /// Runs `work` on `msg` while telling the server, every third of `ack_wait`, that the message
    /// is being worked on: a try longer than `ack_wait` (a slow handler or database) had the server
    /// deliver the message again meanwhile, each copy a delivery counted against it.
    async fn in_progress<T>(&self, msg: &jetstream::Message, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let beat = self.progress_every();
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep(beat) => {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "progress not sent");
                    }
                }
            }
        }
    }

    /// How often the server hears that a message is still being worked on: a third of `ack_wait`.
    fn progress_every(&self) -> Duration {
        (self.cfg.ack_wait / 3).max(Duration::from_millis(1))
    }

    /// Waits `delay` while telling the server the message is still being worked on. True when
    /// shutdown came first: the message is then handed back with a nak.
    async fn hold(
        &self,
        msg: &jetstream::Message,
        delay: Duration,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let until = Instant::now() + delay;
        let beat = self.progress_every();
        loop {
            if let Err(e) = msg.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "progress not sent");
            }
            let wake = (Instant::now() + beat).min(until);
            tokio::select! {
                _ = &mut *shutdown => {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    return true;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= until {
                return false;
            }
        }
    }

    /// Publishes the message to its dead-letter subject and terminates it; while that subject
    /// cannot be written, the message waits (held) and it is tried again. With `parked`, the
    /// message was applied and the parked message it brought along failed every try: that one is
    /// dead-lettered instead ([`outbox_inbox::RunnerCore::dead_letter_parked`]), and the message
    /// is acked.
    async fn dead_letter_until_done(
        &self,
        msg: &jetstream::Message,
        error: &str,
        at: Delivery,
        parked: Option<&ParkedFailure>,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let mut tries = 0u32;
        loop {
            let written = match parked {
                None => self.dead_letter(msg, error, at, None).await.map(|()| true),
                Some(failed) => {
                    self.core
                        .dead_letter_parked(failed, |p| self.dead_letter(msg, error, at, Some(p)))
                        .await
                }
            };
            match written {
                Ok(written) => {
                    if written {
                        self.core.dead_lettered();
                    }
                    let (kind, lost) = match parked {
                        None => (
                            AckKind::Term,
                            "the message comes back and is dead-lettered again (the dead-letter stream drops the copy)",
                        ),
                        Some(_) => (AckKind::Ack, "the message comes back, a duplicate"),
                    };
                    if let Err(e) = msg.ack_with(kind).await {
                        tracing::warn!(error = %e, "{kind:?} not sent; {lost}");
                    }
                    return false;
                }
                Err(e) => {
                    self.core.stats().infrastructure_retries.fetch_add(1, Relaxed);
                    tries += 1;
                    tracing::error!(error = %e, "dead letter not written; the message waits and is retried");
                    if self.hold(msg, self.backoff.delay(tries), shutdown).await {
                        return true;
                    }
                }
            }
        }
    }

    /// Publishes the dead letter of `msg`, or of `parked` (a parked message of `msg`'s key that
    /// failed every try: on its own subject, its stream sequence and deliveries unknown).
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        error: &str,
        at: Delivery,
        parked: Option<Parked>,
    ) -> Result<(), String> {
        // Where the message was in its stream, known for the delivered message only.
        let (origin, mut headers, payload, id, position) = match parked {
            None => (
                msg.subject.to_string(),
                msg.headers.clone().unwrap_or_default(),
                msg.payload.clone(),
                // The dead letter's own id: a re-send of this consumer's dead letter is dropped by
                // the stream's duplicate window, another consumer's of the same message is kept.
                format!("dlq:{}:{}:{}", self.cfg.durable, self.cfg.stream, at.stream_seq),
                Some((at.stream_seq.to_string(), at.delivered.to_string())),
            ),
            Some(p) => {
                // The parked message has the delivered one's key: the same key token.
                let token = msg.subject.rsplit_once('.').map_or("", |(_, token)| token);
                let mut headers = async_nats::HeaderMap::new();
                for (k, v) in &p.headers {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_str(k),
                        HeaderValue::from_str(&String::from_utf8_lossy(v)),
                    ) {
                        headers.append(k, v);
                    }
                }
                let id = format!("dlq:{}:{}:parked:{}", self.cfg.durable, self.cfg.stream, p.id);
                (format!("{}.{token}", p.topic), headers, p.payload.into(), id, None)
            }
        };
        let subject = format!("{}.{origin}", self.cfg.dead_letter_prefix);
        // One line: a header value cannot hold a line break.
        let error = error.replace(['\r', '\n'], " ");
        let mut put = vec![
            (HEADER_ERROR, error.as_str()),
            (HEADER_ORIGINAL_SUBJECT, origin.as_str()),
            (HEADER_ORIGINAL_STREAM, self.cfg.stream.as_str()),
            (async_nats::header::NATS_MESSAGE_ID.as_ref(), id.as_str()),
        ];
        if let Some((sequence, deliveries)) = &position {
            put.extend([
                (HEADER_ORIGINAL_SEQUENCE, sequence.as_str()),
                (HEADER_DELIVERIES, deliveries.as_str()),
            ]);
        }
        for (k, v) in put {
            if let (Ok(k), Ok(v)) = (HeaderName::from_str(k), HeaderValue::from_str(v)) {
                headers.insert(k, v);
            }
        }
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| format!("{subject}: {e}"))?;
        ack.await.map_err(|e| format!("{subject}: {e}"))?;
        Ok(())
    }
}
