//! The consumer runner's settings.

use std::time::Duration;

use derive_setters::Setters;
#[cfg(doc)]
use outbox_inbox::Inbox;

/// Consumer runner settings, each with a setter of its name.
#[derive(Debug, Clone, Setters)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Handler attempts before the message is dead-lettered. Defaults to 5.
    #[setters(skip)]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter. Defaults to 100 ms.
    pub backoff_base: Duration,
    /// Retry delay cap. Defaults to 5 s.
    pub backoff_max: Duration,
    /// Dead-letter topic; by default `<topic>.dlq`.
    #[setters(strip_option, into)]
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

outbox_inbox::impl_retry_settings!(ConsumerConfig);
