//! `RabbitPublisher`: the relay's [`Publisher`] on lapin. One confirm channel per lane, persistent
//! `mandatory` messages; a row counts as delivered only when the broker confirmed it.

mod classify;
mod properties;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use outbox::{Delivered, FailureKind, PublishError, Publisher, StoredMessage};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{connect, RabbitConfig};
use crate::RabbitError;
use classify::channel_closed;
pub use classify::classify;
use outbox::redact::redact_url;
use properties::properties;

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
        let p = Self::unconnected(cfg)?;
        p.connection().await.map_err(|e| RabbitError::Connect(e.message))?;
        Ok(p)
    }

    /// The publisher without a connection yet: the first publish connects, and until a connection
    /// is made every publish answers [`Unavailable`](outbox::FailureKind::Unavailable) (the relay
    /// backs off; no attempt is counted). Fails only when the settings are invalid.
    pub fn unconnected(cfg: RabbitConfig) -> Result<Self, RabbitError> {
        cfg.validate().map_err(RabbitError::Config)?;
        Ok(RabbitPublisher {
            cfg,
            conn: tokio::sync::Mutex::new(None),
            channels: Mutex::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RabbitConfig {
        &self.cfg
    }

    fn confirm_timeout(&self) -> Duration {
        self.cfg.confirm_timeout
    }

    /// A row whose confirm did not come within the confirm timeout.
    fn unconfirmed(&self) -> PublishError {
        PublishError::unavailable(format!(
            "no confirm within {:?} (possibly persisted; will resend, consumers deduplicate)",
            self.confirm_timeout()
        ))
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
        let conn = connect(&self.cfg.url, self.cfg.connect_timeout)
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
        confirm_channel(conn, self.confirm_timeout()).await
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

    /// The outcome of `row` from its confirm, and the returns the broker sent so far (from
    /// [`Returns::keep`]): a returned row is unroutable whatever its confirm says.
    fn outcome(&self, row: &StoredMessage, acked: bool, returns: &Returns) -> Result<Delivered, PublishError> {
        if let Some(ret) = returns.of(row) {
            return Err(PublishError::permanent(format!(
                "unroutable: {} {} (exchange {:?}, routing key {:?}: no queue is bound to take it)",
                ret.reply_code, ret.reply_text, self.cfg.exchange, row.topic
            )));
        }
        if acked {
            Ok(Delivered::new(row.pos))
        } else {
            // The broker's state, not the message's (a full queue with `x-overflow =
            // reject-publish`, a queue without its leader): the relay backs off, no attempt counted.
            Err(PublishError::unavailable(
                "nacked by the broker (a queue that refuses more, or is unavailable)",
            ))
        }
    }

    /// Publishes the rows in order on `ch`, then awaits every confirm until the deadline.
    /// `frame_max` is the connection's: a row whose properties do not fit one frame is refused.
    async fn pipelined(&self, ch: &Channel, frame_max: usize, batch: &[StoredMessage]) -> Vec<Sent> {
        let deadline = Instant::now() + self.confirm_timeout();
        let mut pending: Vec<Result<PublisherConfirm, Sent>> = Vec::with_capacity(batch.len());
        // Keys whose row was not sent, and how it failed: the rest of the key is not sent either,
        // so it cannot overtake it.
        let mut held: HashMap<&str, FailureKind> = HashMap::new();
        let mut broken: Option<lapin::Error> = None;
        for row in batch {
            let key = row.key.as_deref();
            if let Some(kind) = key.and_then(|k| held.get(k)) {
                pending.push(Err(Sent::Done(Err(PublishError::behind(*kind)))));
                continue;
            }
            let refused = if row.payload.len() > self.cfg.max_message_size {
                Some(Sent::Done(Err(PublishError::permanent(format!(
                    "message too large: {} bytes, more than max_message_size {}",
                    row.payload.len(),
                    self.cfg.max_message_size
                )))))
            } else if let Some(why) = properties::unsendable(row, frame_max) {
                // Sent, it would break the connection (every lane's rows on it) at every try.
                Some(Sent::Done(Err(PublishError::permanent(why))))
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
            if let (Some(k), Some(Sent::Done(Err(e)))) = (key, &refused) {
                held.insert(k, e.kind);
            }
            pending.extend(refused.map(Err));
        }
        // Every confirm first, then the outcomes: a row's return may come with another row's
        // confirm, a later one included.
        let mut returns = Returns::default();
        let mut confirmed = Vec::with_capacity(batch.len());
        for p in pending {
            confirmed.push(match p {
                Err(sent) => Err(sent),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(Ok(c)) => Ok(returns.keep(c)),
                    Ok(Err(e)) if channel_closed(&e) => Err(Sent::Again),
                    Ok(Err(e)) => Err(Sent::Done(Err(classify(&e)))),
                    Err(_) => Err(Sent::Done(Err(self.unconfirmed()))),
                },
            });
        }
        batch
            .iter()
            .zip(confirmed)
            .map(|(row, c)| match c {
                Ok(acked) => Sent::Done(self.outcome(row, acked, &returns)),
                Err(sent) => sent,
            })
            .collect()
    }

    /// Sends one row alone on a fresh channel and awaits its confirm: when the server closes the
    /// channel now, this row is the cause.
    async fn alone(&self, conn: &Connection, row: &StoredMessage) -> Result<Delivered, PublishError> {
        let ch = confirm_channel(conn, self.confirm_timeout()).await?;
        let res = match tokio::time::timeout(self.confirm_timeout(), async {
            let confirm = self.send(&ch, row).await?;
            confirm.await
        })
        .await
        {
            Ok(Ok(c)) => {
                let mut returns = Returns::default();
                let acked = returns.keep(c);
                self.outcome(row, acked, &returns)
            }
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(self.unconfirmed()),
        };
        if ch.status().connected() {
            // Bounded: on a blocked connection the close is never written (see `publish`).
            let _ = tokio::time::timeout(self.confirm_timeout(), ch.close(200, "done")).await;
        }
        res
    }
}

/// The messages the broker returned (`basic.return`: mandatory and unroutable), by message id.
///
/// lapin hands a return to the next confirm it completes, not to the returned message's own: when
/// one ack covers several messages, it completes them in any order, and an ack of another message
/// can come between a return and its own ack (a routable message was reported unroutable). The
/// message id the publisher sets on every message (`properties`) says whose a return is.
#[derive(Default)]
struct Returns(HashMap<String, BasicReturnMessage>);

impl Returns {
    /// Keeps the return that came with `c`, if any; true when `c` is an ack.
    fn keep(&mut self, c: Confirmation) -> bool {
        let acked = !matches!(c, Confirmation::Nack(_));
        if let Some(ret) = c.take_message() {
            let id = ret
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned());
            self.0.insert(id.unwrap_or_default(), ret);
        }
        acked
    }

    /// The return of `row`, if the broker returned it.
    fn of(&self, row: &StoredMessage) -> Option<&BasicReturnMessage> {
        self.0.get(&row.id.to_string())
    }
}

/// A new channel on `conn` in confirm mode, within `timeout`: on a connection the server blocked (a resource
/// alarm) lapin writes nothing, and the channel would never open; that is `Unavailable`.
async fn confirm_channel(conn: &Connection, timeout: Duration) -> Result<Channel, PublishError> {
    let open = async {
        let ch = conn.create_channel().await.map_err(|e| classify(&e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| classify(&e))?;
        Ok(ch)
    };
    tokio::time::timeout(timeout, open).await.unwrap_or_else(|_| {
        Err(PublishError::unavailable(format!(
            "no confirm channel within {timeout:?} (connection blocked by a resource alarm?)"
        )))
    })
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
        // A resource alarm (memory, disk) blocks the connection: nothing sent on it gets through
        // until the server unblocks it. Answered at once, and the connection kept: a new one
        // would be blocked in turn, one more for every try while the alarm lasts.
        if conn.status().blocked() {
            let e = PublishError::unavailable("the server blocked the connection (a resource alarm: memory or disk)");
            return batch.iter().map(|_| Err(e.clone())).collect();
        }
        let ch = match self.channel(&conn, lane).await {
            Ok(ch) => ch,
            Err(e) => {
                if e.kind == FailureKind::Unavailable && !conn.status().blocked() {
                    self.drop_connection(&conn).await;
                }
                return batch.iter().map(|_| Err(e.clone())).collect();
            }
        };
        // 0: no limit was negotiated.
        let frame_max = match conn.configuration().frame_max() {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let sent = self.pipelined(&ch, frame_max, batch).await;
        let timed_out = sent
            .iter()
            .any(|s| matches!(s, Sent::Done(Err(e)) if e.kind == FailureKind::Unavailable));
        // A channel with confirms still outstanding is not reused: late confirms would be
        // meaningless, and the next batch starts on a clean channel.
        if timed_out {
            // A connection the server blocked (a resource alarm) writes nothing, this close
            // included: not waited for past the confirm timeout. A blocked connection is kept (see
            // above); one that did not close the channel otherwise is given up (the next publish
            // opens another).
            let closed = tokio::time::timeout(self.confirm_timeout(), ch.close(200, "abandoned")).await;
            if closed.is_err() && !conn.status().blocked() {
                self.drop_connection(&conn).await;
            }
        } else {
            self.keep_channel(lane, ch);
        }
        // Rows in flight when the server closed the channel: one of them caused it. Each is sent
        // again alone, in order, so the one the server refuses is found and the others go through.
        // (They may be on the wire twice: the consumers' inbox deduplicates.)
        let mut out = Vec::with_capacity(batch.len());
        let mut held: HashMap<&str, FailureKind> = HashMap::new();
        let mut unavailable: Option<PublishError> = None;
        for (row, s) in batch.iter().zip(sent) {
            let res = match (s, row.key.as_deref().and_then(|k| held.get(k))) {
                (Sent::Done(r), _) => r,
                (Sent::Again, Some(kind)) => Err(PublishError::behind(*kind)),
                (Sent::Again, None) => match &unavailable {
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
                    held.entry(k).or_insert(e.kind);
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
