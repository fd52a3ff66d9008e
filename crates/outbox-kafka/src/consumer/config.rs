//! The consumer runner's settings.

use std::time::Duration;

use outbox::{Backoff, InvalidBackoff};
#[cfg(doc)]
use outbox_inbox::Inbox;

/// Consumer runner settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Handler attempts before the message is dead-lettered. Defaults to 5.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter. Defaults to 100 ms.
    pub backoff_base: Duration,
    /// Retry delay cap. Defaults to 5 s.
    pub backoff_max: Duration,
    /// Dead-letter topic; by default `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
    /// How often the runner deletes the inbox's expired records ([`Inbox::cleanup`]); `None`
    /// leaves it to the application. Defaults to every 10 minutes.
    pub cleanup_interval: Option<Duration>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            dead_letter_topic: None,
            cleanup_interval: Some(Duration::from_secs(10 * 60)),
        }
    }
}

impl ConsumerConfig {
    /// Sets [`ConsumerConfig::max_attempts`].
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Sets [`ConsumerConfig::backoff_base`].
    pub fn backoff_base(mut self, d: Duration) -> Self {
        self.backoff_base = d;
        self
    }
    /// Sets [`ConsumerConfig::backoff_max`].
    pub fn backoff_max(mut self, d: Duration) -> Self {
        self.backoff_max = d;
        self
    }
    /// Sets [`ConsumerConfig::cleanup_interval`].
    pub fn cleanup_interval(mut self, every: Option<Duration>) -> Self {
        self.cleanup_interval = every;
        self
    }
    /// Sets [`ConsumerConfig::dead_letter_topic`].
    pub fn dead_letter_topic(mut self, t: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(t.into());
        self
    }

    /// The retry delays, from [`ConsumerConfig::backoff_base`] doubling up to
    /// [`ConsumerConfig::backoff_max`], jittered.
    pub fn retry_backoff(&self) -> Result<Backoff, InvalidBackoff> {
        Backoff::new(self.backoff_base, self.backoff_max)
    }
}
