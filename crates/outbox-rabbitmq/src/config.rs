//! The publisher's settings (`RabbitConfig`, read from a file with serde) and the one place a
//! connection is opened: on tokio, within a deadline, with the URL's password never shown.

use std::time::Duration;

use derive_setters::Setters;
use educe::Educe;
use lapin::{Connection, ConnectionProperties};
use outbox::redact::redact_url;
use serde::Deserialize;

/// The URL used when none is given: the local server's default virtual host as `guest`.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Default time a batch waits for its confirms: 30 s.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time opening the connection may take: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest message RabbitMQ accepts by default (`max_message_size`, 128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// Publisher settings. In a file (`[rabbitmq]` of the relay's TOML) every field is optional and an
/// unknown field is an error.
///
/// ```
/// let cfg: outbox_rabbitmq::RabbitConfig = toml::from_str(r#"
///     url = "amqp://relay:secret@broker:5672/%2f"
///     exchange = "events"
///     confirm_timeout_ms = 10000
/// "#).unwrap();
/// assert_eq!(cfg.exchange, "events");
/// assert!(!format!("{cfg:?}").contains("secret"));
/// ```
#[derive(Clone, Deserialize, PartialEq, Eq, Educe, Setters)]
#[educe(Debug)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// AMQP URI (`amqp://` or `amqps://`, user and password in it, virtual host as the path).
    /// Never logged with its password. Defaults to [`DEFAULT_URL`].
    #[educe(Debug(method(outbox::redact::debug_url)))]
    #[setters(into)]
    pub url: String,
    /// Exchange every message is published to, with the message's topic as the routing key. The
    /// exchange must exist (checked on connect). Defaults to `""`, the default exchange: the topic
    /// is then the name of the queue the message goes to.
    #[setters(into)]
    pub exchange: String,
    /// How long a batch waits for the broker's confirms (`confirm_timeout_ms` in a file); what is
    /// unconfirmed then is reported unavailable (possibly persisted: it is sent again and consumers
    /// deduplicate). Defaults to 30 s ([`DEFAULT_CONFIRM_TIMEOUT`]).
    #[serde(rename = "confirm_timeout_ms", deserialize_with = "outbox::millis::deserialize")]
    pub confirm_timeout: Duration,
    /// How long opening the connection may take (`connect_timeout_ms` in a file). Defaults to 10 s
    /// ([`DEFAULT_CONNECT_TIMEOUT`]).
    #[serde(rename = "connect_timeout_ms", deserialize_with = "outbox::millis::deserialize")]
    pub connect_timeout: Duration,
    /// Largest message (payload plus headers) sent; a larger one fails permanently without being
    /// sent. Set it to the server's `max_message_size`. Defaults to 128 MiB
    /// ([`DEFAULT_MAX_MESSAGE_SIZE`], RabbitMQ's default).
    pub max_message_size: usize,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig {
            url: DEFAULT_URL.to_owned(),
            exchange: String::new(),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

impl RabbitConfig {
    /// The defaults with `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RabbitConfig {
            url: url.into(),
            ..RabbitConfig::default()
        }
    }
    /// Refuses settings under which a batch could wait for ever or nothing could be sent.
    pub fn validate(&self) -> Result<(), String> {
        if self.confirm_timeout.is_zero() {
            return Err("confirm_timeout_ms must be positive: a batch must get its confirms in bounded time".into());
        }
        if self.connect_timeout.is_zero() {
            return Err("connect_timeout_ms must be positive".into());
        }
        check_url(&self.url)
    }
}

/// Refuses a URL that is not `amqp://` or `amqps://`; the error shows it without its password.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        Ok(())
    } else {
        Err(format!("url {} is not an amqp:// or amqps:// URI", redact_url(url)))
    }
}

/// Opens a connection on the current tokio runtime, within `timeout`. The error names the server
/// (never the password).
pub(crate) async fn connect(url: &str, timeout: Duration) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    match tokio::time::timeout(timeout, Connection::connect(url, props)).await {
        Ok(res) => res,
        Err(_) => Err(lapin::Error::IOError(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?}"),
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let d = RabbitConfig::default();
        assert_eq!(d.url, DEFAULT_URL);
        assert_eq!(d.exchange, "");
        assert_eq!(d.confirm_timeout, std::time::Duration::from_secs(30));
        assert_eq!(d.connect_timeout, std::time::Duration::from_secs(10));
        assert_eq!(d.max_message_size, 128 * 1024 * 1024);
        d.validate().unwrap();
    }

    #[test]
    fn timeouts_are_read_as_milliseconds() {
        let cfg: RabbitConfig = toml::from_str("confirm_timeout_ms = 1500\nconnect_timeout_ms = 0").unwrap();
        assert_eq!(cfg.confirm_timeout, std::time::Duration::from_millis(1500));
        assert!(cfg.validate().unwrap_err().contains("connect_timeout_ms"));
        let err = toml::from_str::<RabbitConfig>("confirm_timeout_ms = \"30s\"").unwrap_err();
        assert!(err.to_string().contains("whole number of milliseconds"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<RabbitConfig>("exchnage = \"x\"").unwrap_err();
        assert!(err.to_string().contains("exchnage"), "{err}");
        let cfg: RabbitConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, RabbitConfig::default());
    }

    #[test]
    fn passwords_are_redacted() {
        let cfg = RabbitConfig::new("amqp://relay:s3cret@h/%2f");
        assert!(!format!("{cfg:?}").contains("s3cret"));
        let err = RabbitConfig::new("http://u:s3cret@h").validate().unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(RabbitConfig::default()
            .confirm_timeout(Duration::ZERO)
            .validate()
            .is_err());
    }
}
