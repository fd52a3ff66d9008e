//! One connection to the server: its channels, what it declares, its consumer.

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use outbox_inbox::{Backend, Handler};

use super::{ConsumerError, RabbitConsumerRunner};
use crate::config::connect;
use outbox::redact::redact_url;

/// The open connection and its two channels.
pub(super) struct Session {
    pub(super) conn: Connection,
    /// Consumes (manual acks, prefetch).
    pub(super) consume: Channel,
    /// Publishes dead letters, with confirms.
    pub(super) dead: Channel,
    /// The deliveries (none when the session only declared).
    pub(super) consumer: Option<lapin::Consumer>,
}

/// Why the runner could not start consuming.
pub(super) enum Fatal {
    /// Stops the runner.
    Setup(ConsumerError),
    /// Try again later (server away, connection lost).
    Retry(String),
}

impl<DB: Backend, H: Handler<DB>> RabbitConsumerRunner<DB, H> {
    /// Connects, declares what `declare` asks for, and starts consuming (unless `consume` is
    /// false: then the session has no consumer).
    pub(super) async fn open(&self, consume_too: bool) -> Result<Session, Fatal> {
        let retry = |e: lapin::Error| Fatal::Retry(e.to_string());
        let conn = connect(&self.cfg.url, self.cfg.connect_timeout).await.map_err(retry)?;
        let consume = conn.create_channel().await.map_err(retry)?;
        let dead = conn.create_channel().await.map_err(retry)?;
        dead.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(retry)?;
        let setup = |e: lapin::Error| match e {
            lapin::Error::ProtocolError(_) => Fatal::Setup(ConsumerError::Setup {
                queue: self.cfg.queue.clone(),
                source: e,
            }),
            e => Fatal::Retry(e.to_string()),
        };
        consume
            .basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(retry)?;
        if self.cfg.declare {
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            let mut args = FieldTable::default();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            consume
                .queue_declare(&self.cfg.queue, durable, args)
                .await
                .map_err(setup)?;
            for key in &self.cfg.bindings {
                consume
                    .queue_bind(
                        &self.cfg.queue,
                        &self.cfg.exchange,
                        key,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(setup)?;
            }
            if self.cfg.dead_letter_exchange.is_empty() {
                dead.queue_declare(&self.cfg.dead_letter_key(), durable, FieldTable::default())
                    .await
                    .map_err(setup)?;
            }
        }
        if !consume_too {
            return Ok(Session {
                conn,
                consume,
                dead,
                consumer: None,
            });
        }
        let consumer = consume
            .basic_consume(
                &self.cfg.queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup)?;
        tracing::info!(url = %redact_url(&self.cfg.url), queue = %self.cfg.queue, "consuming");
        Ok(Session {
            conn,
            consume,
            dead,
            consumer: Some(consumer),
        })
    }
}
