//! `RabbitPublisher`: the relay's [`Publisher`] on lapin. One confirm channel per lane, persistent
//! `mandatory` messages; a row counts as delivered only when the broker confirmed it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use outbox::{Delivered, FailureKind, PublishError, Publisher, StoredMessage};
use outbox::{HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_SOURCE};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{connect, redact_url, RabbitConfig};
use crate::RabbitError;

/// AMQP delivery mode of a message written to disk by durable queues.
const PERSISTENT: u8 = 2;

/// Publishes outbox rows to RabbitMQ. Shared by all lanes of a relay; reconnects by itself.
///
/// Each row goes to [`RabbitConfig::exchange`] with its topic as the routing key, `mandatory`
/// (a row no queue takes comes back and fails permanently), persistent, with `message_id` = the
/// outbox id and the `outbox-*` headers beside the row's own. A lane's batch is published in order
/// on the lane's own confirm channel, then the confirms are awaited.
pub struct RabbitPublisher {
    cfg: RabbitConfig,
    /// The connection; `None` or not connected: the next publish connects again.
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Each lane's confirm channel, taken out while the lane publishes.
    channels: Mutex<HashMap<i32, Channel>>,
}

impl std::fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitPublisher").field("cfg", &self.cfg).finish()
    }
}

/// Decides what the relay does with a row the broker failed, from lapin's error.
///
/// The connection (refused, closed, reset, heartbeat missed, closed by the server) or an exchange
/// that is gone: [`FailureKind::Unavailable`], whatever the message. The server closing the channel
/// for the message itself, when it was the only one in flight: `PRECONDITION_FAILED` (too large,
/// invalid headers), `ACCESS_REFUSED` (no write permission for the routing key), `CONTENT_TOO_LARGE`,
/// `NO_ROUTE`: [`FailureKind::Permanent`]. Anything else is [`FailureKind::Retryable`].
pub fn classify(e: &lapin::Error) -> PublishError {
    use lapin::Error as E;
    match e {
        E::IOError(_)
        | E::InvalidConnectionState(_)
        | E::MissingHeartbeatError
        | E::ChannelsLimitReached
        | E::InvalidProtocolVersion(_) => PublishError::unavailable(format!("connection: {e}")),
        E::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Hard(_) => PublishError::unavailable(format!("connection closed by the server: {e}")),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => PublishError::unavailable(format!("exchange missing: {e}")),
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::CONTENTTOOLARGE
                | AMQPSoftError::NOROUTE,
            ) => PublishError::permanent(e.to_string()),
            AMQPErrorKind::Soft(_) => PublishError::retryable(e.to_string()),
        },
        _ => PublishError::retryable(e.to_string()),
    }
}

/// True when `e` means the server closed the channel (or it is closing), not the connection: the
/// message that caused it is one of those in flight on the channel, not necessarily this one.
fn channel_closed(e: &lapin::Error) -> bool {
    match e {
        lapin::Error::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Soft(_)),
        lapin::Error::InvalidChannelState(_) => true,
        _ => false,
    }
}

/// The AMQP headers of a row: the `outbox-*` ones, then the row's own.
fn headers(row: &StoredMessage) -> FieldTable {
    let mut t = FieldTable::default();
    let mut put = |k: &str, v: String| t.insert(ShortString::from(k), AMQPValue::LongString(LongString::from(v)));
    put(HEADER_ID, row.id.to_string());
    if let Some(k) = &row.key {
        put(HEADER_KEY, k.clone());
    }
    if let Some(s) = row.seq {
        put(HEADER_SEQ, s.to_string());
    }
    if let Some(s) = &row.source {
        put(HEADER_SOURCE, s.clone());
    }
    for (k, v) in &row.headers {
        put(k, v.clone());
    }
    t
}

fn properties(row: &StoredMessage) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(ShortString::from(row.id.to_string()))
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or(0))
        .with_headers(headers(row));
    if let Some((_, ct)) = row.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        p = p.with_content_type(ShortString::from(ct.clone()));
    }
    p
}

/// What became of one row of a pipelined batch.
enum Sent {
    Done(Result<Delivered, PublishError>),
    /// The channel was closed while the row was unconfirmed: sent again alone to find out whether
    /// it was the cause.
    Again,
}

impl RabbitPublisher {
    /// Connects (checking that the exchange exists) and returns the publisher. Fails when the
    /// settings are invalid, the server cannot be reached or refuses the login, or the exchange
    /// does not exist. Later connection losses are repaired by the next publish.
    pub async fn connect(cfg: RabbitConfig) -> Result<Self, RabbitError> {
        cfg.validate().map_err(RabbitError::Config)?;
        let p = RabbitPublisher {
            cfg,
            conn: tokio::sync::Mutex::new(None),
            channels: Mutex::default(),
        };
        p.connection().await.map_err(|e| RabbitError::Connect(e.message))?;
        Ok(p)
    }

    /// The settings.
    pub fn config(&self) -> &RabbitConfig {
        &self.cfg
    }

    fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.confirm_timeout_ms)
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection>, PublishError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        self.channels.lock().expect("channels lock").clear();
        let url = redact_url(&self.cfg.url);
        let conn = connect(&self.cfg.url, Duration::from_millis(self.cfg.connect_timeout_ms))
            .await
            .map_err(|e| PublishError::unavailable(format!("cannot connect to {url}: {e}")))?;
        if !self.cfg.exchange.is_empty() {
            let ch = conn.create_channel().await.map_err(|e| classify(&e))?;
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            ch.exchange_declare(&self.cfg.exchange, ExchangeKind::Direct, passive, FieldTable::default())
                .await
                .map_err(|e| PublishError::unavailable(format!("exchange {:?} on {url}: {e}", self.cfg.exchange)))?;
            let _ = ch.close(200, "checked").await;
        }
        tracing::info!(url = %url, "connected to RabbitMQ");
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the connection `used` (if it is still the current one): the next publish reconnects.
    async fn drop_connection(&self, used: &Arc<Connection>) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, used)) {
            *slot = None;
            self.channels.lock().expect("channels lock").clear();
        }
    }

    /// The lane's confirm channel, or a new one.
    async fn channel(&self, conn: &Connection, lane: i32) -> Result<Channel, PublishError> {
        let kept = self.channels.lock().expect("channels lock").remove(&lane);
        if let Some(ch) = kept.filter(|ch| ch.status().connected()) {
            return Ok(ch);
        }
        let ch = conn.create_channel().await.map_err(|e| classify(&e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| classify(&e))?;
        Ok(ch)
    }

    fn keep_channel(&self, lane: i32, ch: Channel) {
        if ch.status().connected() {
            self.channels.lock().expect("channels lock").insert(lane, ch);
        }
    }

    async fn send(&self, ch: &Channel, row: &StoredMessage) -> Result<PublisherConfirm, lapin::Error> {
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        ch.basic_publish(&self.cfg.exchange, &row.topic, opts, &row.payload, properties(row))
            .await
    }

    fn outcome(&self, row: &StoredMessage, c: Confirmation) -> Result<Delivered, PublishError> {
        match c {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Delivered::new(row.pos)),
            Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => Err(PublishError::permanent(format!(
                "unroutable: {} {} (exchange {:?}, routing key {:?}: no queue is bound to take it)",
                ret.reply_code, ret.reply_text, self.cfg.exchange, row.topic
            ))),
            Confirmation::Nack(None) => Err(PublishError::retryable("nacked by the broker")),
        }
    }

    /// Publishes the rows in order on `ch`, then awaits every confirm until the deadline.
    async fn pipelined(&self, ch: &Channel, batch: &[StoredMessage]) -> Vec<Sent> {
        let deadline = Instant::now() + self.confirm_timeout();
        let mut pending: Vec<Result<PublisherConfirm, Sent>> = Vec::with_capacity(batch.len());
        // Keys whose row was not sent: the rest of the key is held back so it cannot overtake it.
        let mut held: HashSet<&str> = HashSet::new();
        let mut broken: Option<lapin::Error> = None;
        for row in batch {
            let key = row.key.as_deref();
            if key.is_some_and(|k| held.contains(k)) {
                pending.push(Err(Sent::Done(Err(PublishError::held_back(
                    "held back: an earlier message of its key failed",
                )))));
                continue;
            }
            let refused = if row.payload.len() > self.cfg.max_message_size {
                Some(Sent::Done(Err(PublishError::permanent(format!(
                    "message too large: {} bytes, more than max_message_size {}",
                    row.payload.len(),
                    self.cfg.max_message_size
                )))))
            } else if let Some(e) = &broken {
                Some(if channel_closed(e) {
                    Sent::Again
                } else {
                    Sent::Done(Err(classify(e)))
                })
            } else {
                let span = tracing::debug_span!("publish", outbox.id = %row.id);
                match tokio::time::timeout_at(deadline, self.send(ch, row).instrument(span)).await {
                    Ok(Ok(confirm)) => {
                        pending.push(Ok(confirm));
                        continue;
                    }
                    Ok(Err(e)) => {
                        let again = channel_closed(&e);
                        let res = if again {
                            Sent::Again
                        } else {
                            Sent::Done(Err(classify(&e)))
                        };
                        broken = Some(e);
                        Some(res)
                    }
                    Err(_) => {
                        let e = lapin::Error::IOError(Arc::new(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "publish blocked (connection blocked by a resource alarm?)",
                        )));
                        broken = Some(e.clone());
                        Some(Sent::Done(Err(classify(&e))))
                    }
                }
            };
            if let (Some(k), Some(Sent::Done(Err(_)))) = (key, &refused) {
                held.insert(k);
            }
            pending.extend(refused.map(Err));
        }
        let mut out = Vec::with_capacity(batch.len());
        for (row, p) in batch.iter().zip(pending) {
            out.push(match p {
                Err(sent) => sent,
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(Ok(c)) => Sent::Done(self.outcome(row, c)),
                    Ok(Err(e)) if channel_closed(&e) => Sent::Again,
                    Ok(Err(e)) => Sent::Done(Err(classify(&e))),
                    Err(_) => Sent::Done(Err(PublishError::unavailable(format!(
                        "no confirm within {:?} (possibly persisted; will resend, consumers deduplicate)",
                        self.confirm_timeout()
                    )))),
                },
            });
        }
        out
    }

    /// Sends one row alone on a fresh channel and awaits its confirm: when the server closes the
    /// channel now, this row is the cause.
    async fn alone(&self, conn: &Connection, row: &StoredMessage) -> Result<Delivered, PublishError> {
        let ch = conn.create_channel().await.map_err(|e| classify(&e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| classify(&e))?;
        let res = match tokio::time::timeout(self.confirm_timeout(), async {
            let confirm = self.send(&ch, row).await?;
            confirm.await
        })
        .await
        {
            Ok(Ok(c)) => self.outcome(row, c),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(PublishError::unavailable(format!(
                "no confirm within {:?} (possibly persisted; will resend, consumers deduplicate)",
                self.confirm_timeout()
            ))),
        };
        if ch.status().connected() {
            let _ = ch.close(200, "done").await;
        }
        res
    }
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish(&self, batch: &[StoredMessage]) -> Vec<Result<Delivered, PublishError>> {
        let Some(first) = batch.first() else {
            return Vec::new();
        };
        let lane = first.lane;
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
        };
        let ch = match self.channel(&conn, lane).await {
            Ok(ch) => ch,
            Err(e) => {
                if e.kind == FailureKind::Unavailable {
                    self.drop_connection(&conn).await;
                }
                return batch.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let sent = self.pipelined(&ch, batch).await;
        let timed_out = sent
            .iter()
            .any(|s| matches!(s, Sent::Done(Err(e)) if e.kind == FailureKind::Unavailable));
        // A channel with confirms still outstanding is not reused: late confirms would be
        // meaningless, and the next batch starts on a clean channel.
        if timed_out {
            let _ = ch.close(200, "abandoned").await;
        } else {
            self.keep_channel(lane, ch);
        }
        // Rows in flight when the server closed the channel: one of them caused it. Each is sent
        // again alone, in order, so the one the server refuses is found and the others go through.
        // (They may be on the wire twice: the consumers' inbox deduplicates.)
        let mut out = Vec::with_capacity(batch.len());
        let mut held: HashSet<&str> = HashSet::new();
        let mut unavailable: Option<PublishError> = None;
        for (row, s) in batch.iter().zip(sent) {
            let res = match s {
                Sent::Done(r) => r,
                Sent::Again if row.key.as_deref().is_some_and(|k| held.contains(k)) => Err(PublishError::held_back(
                    "held back: an earlier message of its key failed",
                )),
                Sent::Again => match &unavailable {
                    Some(e) => Err(e.clone()),
                    None => {
                        let r = self.alone(&conn, row).await;
                        if let Err(e) = &r {
                            if e.kind == FailureKind::Unavailable {
                                unavailable = Some(e.clone());
                            }
                        }
                        r
                    }
                },
            };
            if let (Err(e), Some(k)) = (&res, row.key.as_deref()) {
                if e.kind != FailureKind::HeldBack {
                    held.insert(k);
                }
            }
            out.push(res);
        }
        if out
            .iter()
            .any(|r| matches!(r, Err(e) if e.kind == FailureKind::Unavailable))
            && !conn.status().connected()
        {
            tracing::warn!("connection to RabbitMQ lost; the next publish reconnects");
            self.drop_connection(&conn).await;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPHardError};

    fn amqp(kind: AMQPErrorKind) -> lapin::Error {
        lapin::Error::ProtocolError(AMQPError::new(kind, "test".into()))
    }

    #[test]
    fn classification() {
        let refused = lapin::Error::IOError(Arc::new(std::io::ErrorKind::ConnectionRefused.into()));
        assert_eq!(classify(&refused).kind, FailureKind::Unavailable);
        assert_eq!(
            classify(&lapin::Error::MissingHeartbeatError).kind,
            FailureKind::Unavailable
        );
        let forced = amqp(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED));
        assert_eq!(classify(&forced).kind, FailureKind::Unavailable);
        let too_large = amqp(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED));
        assert_eq!(classify(&too_large).kind, FailureKind::Permanent);
        assert!(channel_closed(&too_large));
        let denied = amqp(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED));
        assert_eq!(classify(&denied).kind, FailureKind::Permanent);
        let no_exchange = amqp(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND));
        assert_eq!(classify(&no_exchange).kind, FailureKind::Unavailable);
        let locked = amqp(AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED));
        assert_eq!(classify(&locked).kind, FailureKind::Retryable);
        assert!(!channel_closed(&refused));
    }
}
