//! The consumer runner's settings.

use std::time::Duration;

#[cfg(doc)]
use outbox_inbox::Inbox;

use derive_setters::Setters;
use educe::Educe;

use crate::config::DEFAULT_URL;

/// Consumer runner settings, each with a setter of its name.
#[derive(Clone, Educe, Setters)]
#[educe(Debug)]
#[non_exhaustive]
pub struct RabbitConsumerConfig {
    /// AMQP URI; never logged with its password. Defaults to
    /// [`DEFAULT_URL`](crate::DEFAULT_URL).
    #[educe(Debug(method(outbox::redact::debug_url)))]
    #[setters(into)]
    pub url: String,
    /// The queue consumed. No default: [`RabbitConsumerConfig::new`] takes it.
    #[setters(into)]
    pub queue: String,
    /// When true, the runner declares the queue (durable, `x-single-active-consumer`), binds it
    /// to [`exchange`](Self::exchange) for each of [`bindings`](Self::bindings), and declares the
    /// dead-letter queue when dead letters go to the default exchange. A queue that already exists
    /// with other arguments is an error. Defaults to true.
    pub declare: bool,
    /// Exchange the queue is bound to. Defaults to `""` (the default exchange, which needs no
    /// binding: the queue takes the messages whose topic is its name).
    #[setters(into)]
    pub exchange: String,
    /// Routing keys (outbox topics) the queue is bound with. Defaults to none.
    pub bindings: Vec<String>,
    /// Deliveries the server sends ahead of the acks (`basic.qos`). Defaults to 32.
    #[setters(skip)]
    pub prefetch: u16,
    /// Handler attempts before the message is dead-lettered. Defaults to 5.
    #[setters(skip)]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter. Defaults to 100 ms.
    pub backoff_base: Duration,
    /// Retry delay cap, also the wait before connecting again. Defaults to 5 s.
    pub backoff_max: Duration,
    /// Exchange dead letters are published to. Defaults to `""` (the default exchange).
    #[setters(into)]
    pub dead_letter_exchange: String,
    /// Routing key of dead letters; by default `<queue>.dlq` (with the default exchange: the
    /// dead-letter queue's name).
    #[setters(strip_option, into)]
    pub dead_letter_routing_key: Option<String>,
    /// How often the runner deletes the inbox's expired records ([`Inbox::cleanup`]); `None`
    /// leaves it to the application. Defaults to every 10 minutes.
    pub cleanup_interval: Option<Duration>,
    /// How long opening the connection may take. Defaults to 10 s.
    pub connect_timeout: Duration,
}

outbox_inbox::impl_retry_settings!(RabbitConsumerConfig);

impl RabbitConsumerConfig {
    /// The defaults for consuming `queue` at `url`.
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> Self {
        RabbitConsumerConfig {
            url: url.into(),
            queue: queue.into(),
            declare: true,
            exchange: String::new(),
            bindings: Vec::new(),
            prefetch: 32,
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            dead_letter_exchange: String::new(),
            dead_letter_routing_key: None,
            cleanup_interval: Some(Duration::from_secs(10 * 60)),
            connect_timeout: Duration::from_secs(10),
        }
    }
    /// The defaults for consuming `queue` on the local server ([`DEFAULT_URL`]).
    pub fn local(queue: impl Into<String>) -> Self {
        Self::new(DEFAULT_URL, queue)
    }
    /// Sets [`RabbitConsumerConfig::exchange`] and adds `routing_key` to the bindings.
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self.bindings.push(routing_key.into());
        self
    }
    /// Sets [`RabbitConsumerConfig::prefetch`].
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// Sets [`RabbitConsumerConfig::dead_letter_exchange`] and
    /// [`RabbitConsumerConfig::dead_letter_routing_key`].
    pub fn dead_letter(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.dead_letter_exchange = exchange.into();
        self.dead_letter_routing_key = Some(routing_key.into());
        self
    }

    /// The routing key dead letters are published with.
    pub fn dead_letter_key(&self) -> String {
        self.dead_letter_routing_key
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue))
    }
}
