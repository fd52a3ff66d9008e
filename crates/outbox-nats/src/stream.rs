//! Streams for the outbox's subjects: [`ensure_stream`] creates one the way the publisher needs it
//! (file storage, a duplicate window that covers the relay's re-sends) unless it exists.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::NatsError;

/// The duplicate window [`ensure_stream`] gives a stream: 2 minutes (also nats-server's default).
///
/// A re-send with the same `Nats-Msg-Id` inside the window is acknowledged without being stored
/// again. The relay re-sends a message it has no ack for (an ack timeout, a lost connection, a
/// relay restart before it marked the row), after its backoff: it needs the window to be longer
/// than the ack timeout ([`NatsConfig::ack_timeout`](crate::NatsConfig::ack_timeout),
/// 10 s) plus the relay's backoff cap (`RelayConfig::backoff_max`, 60 s) plus, for a relay crash,
/// its lease TTL (`RelayConfig::lease_ttl`, 30 s): about 100 s with the defaults, hence 2 minutes.
/// A re-send later than the window (an outage longer than it) is stored again; the consumer's
/// inbox recognises it.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Creates stream `name` taking `subjects` (e.g. `["orders.*"]`), with file storage and the
/// [`DEFAULT_DUPLICATE_WINDOW`], unless a stream of that name exists (it is then left as it is).
/// Returns the stream's configuration as the server has it.
pub async fn ensure_stream(
    client: &async_nats::Client,
    name: &str,
    subjects: &[&str],
) -> Result<stream::Config, NatsError> {
    let js = jetstream::new(client.clone());
    let mut s = js
        .get_or_create_stream(stream::Config {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            storage: stream::StorageType::File,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| NatsError::jetstream(&format!("stream {name}"), e))?;
    let info = s
        .info()
        .await
        .map_err(|e| NatsError::jetstream(&format!("stream {name}"), e))?;
    Ok(info.config.clone())
}
