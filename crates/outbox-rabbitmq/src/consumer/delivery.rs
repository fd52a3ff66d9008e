//! One try at a delivery, its dead letter, and its headers as the inbox reads them.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use outbox_inbox::{Backend, Handler, Parked, RetryInPlace, Step};

use super::{
    RabbitConsumerRunner, HEADER_ATTEMPTS, HEADER_ERROR, HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_QUEUE,
    HEADER_ORIGINAL_TOPIC,
};

impl<DB: Backend, H: Handler<DB>> RabbitConsumerRunner<DB, H> {
    /// One try at a delivery: applied (or a duplicate, parked, or dead-lettered) means done;
    /// anything else means try again after a delay. `attempts` counts the handler's earlier
    /// failures only. A delivery that cannot be dead-lettered waits (and is tried again) rather
    /// than being dropped.
    pub(super) async fn attempt(&self, dead: &Channel, d: &Delivery, attempts: u32, retry: &RetryInPlace) -> Step {
        let headers = header_bytes(&d.properties);
        let topic = d.routing_key.as_str();
        let headers = headers.iter().map(|(k, v)| (k.as_str(), &v[..]));
        let tried = self
            .core
            .try_once(
                topic,
                &d.data,
                headers,
                attempts,
                self.cfg.max_attempts,
                |incoming, traceparent| {
                    tracing::info_span!("inbox.process", outbox.id = %incoming.id, queue = %self.cfg.queue,
                    topic, redelivered = d.redelivered, traceparent)
                },
            )
            .await;
        self.core
            .step(tried, attempts, retry, |error, attempts, parked| async move {
                self.dead_letter(dead, d, &error, attempts, parked).await
            })
            .await
    }

    /// Publishes the dead letter of `d`, or of `parked` (a parked message `d` brought along that
    /// failed every try: its headers as the inbox kept them, its other properties left unset).
    async fn dead_letter(
        &self,
        dead: &Channel,
        d: &Delivery,
        error: &str,
        attempts: u32,
        parked: Option<Parked>,
    ) -> Result<(), String> {
        let (origin, payload, props, mut headers) = match &parked {
            None => (
                d.routing_key.as_str(),
                &d.data[..],
                d.properties.clone(),
                d.properties.headers().clone().unwrap_or_default(),
            ),
            Some(p) => {
                let mut headers = FieldTable::default();
                for (k, v) in &p.headers {
                    headers.insert(
                        ShortString::from(k.as_str()),
                        AMQPValue::LongString(LongString::from(&v[..])),
                    );
                }
                (p.topic.as_str(), &p.payload[..], BasicProperties::default(), headers)
            }
        };
        let mut put = |k: &str, v: &str| {
            headers.insert(ShortString::from(k), AMQPValue::LongString(LongString::from(v)));
        };
        put(HEADER_ERROR, error);
        put(HEADER_ORIGINAL_TOPIC, origin);
        put(HEADER_ORIGINAL_EXCHANGE, d.exchange.as_str());
        put(HEADER_ORIGINAL_QUEUE, &self.cfg.queue);
        put(HEADER_ATTEMPTS, &attempts.to_string());
        let props: BasicProperties = props.with_headers(headers).with_delivery_mode(2);
        let routing_key = self.cfg.dead_letter_key();
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = dead
            .basic_publish(&self.cfg.dead_letter_exchange, &routing_key, opts, payload, props)
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(30), confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                return Err(format!(
                    "dead letter unroutable: no queue bound to exchange {:?} with routing key {routing_key:?}",
                    self.cfg.dead_letter_exchange
                ))
            }
            Ok(Ok(c)) => return Err(format!("dead letter not confirmed: {c:?}")),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("dead letter not confirmed within 30 s".into()),
        }
        Ok(())
    }
}

/// The delivery's headers as (name, bytes): strings as they are, numbers as decimal text, other
/// kinds left out.
pub(crate) fn header_bytes(p: &BasicProperties) -> Vec<(String, Vec<u8>)> {
    let Some(table) = p.headers() else {
        return Vec::new();
    };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let bytes = match v {
                AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
                AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
                AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
                AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
                AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
                AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
                AMQPValue::LongInt(n) => n.to_string().into_bytes(),
                AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
                AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
                _ => return None,
            };
            Some((k.as_str().to_owned(), bytes))
        })
        .collect()
}
