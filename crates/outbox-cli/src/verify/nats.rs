//! Reading NATS JetStream for `verify`: per topic, the stream holding `<prefix><topic>.>` from its first
//! message to the last one stored when the read starts, through an ordered consumer (no acks, nothing
//! left behind on the server but an ephemeral consumer that expires).

use std::collections::HashMap;

use anyhow::Context;
use futures::StreamExt;
use outbox_nats::async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use outbox_nats::NatsConfig;

use super::audit::{self, Audit};
use super::{progress, record, TopicRead, Windows, STALL};

/// Reads each topic's messages in stream order, feeding the audit. The window of topic `t` is
/// `(t, 0)`: the relay records a JetStream message as partition 0, offset = its stream sequence.
pub(super) async fn read_topics(
    cfg: &NatsConfig,
    topics: &[String],
    source: &str,
    kept: HashMap<uuid::Uuid, audit::Kept>,
) -> anyhow::Result<(Audit, Vec<TopicRead>, Windows)> {
    // The relay's own client: the URL's credentials and every server of it.
    let client = cfg
        .client("outbox-relay verify")
        .await
        .with_context(|| format!("connecting to NATS at {}", outbox::redact::redact_url(&cfg.url)))?;
    let js = jetstream::new(client);
    let mut audit = Audit::new(kept);
    let (mut reads, mut windows) = (Vec::new(), Windows::new());
    for (t, topic) in topics.iter().enumerate() {
        let filter = format!("{}{topic}.>", cfg.subject_prefix);
        let name = js
            .stream_by_subject(filter.clone())
            .await
            .with_context(|| format!("no stream takes {filter}"))?;
        let mut stream = js.get_stream(&name).await?;
        let state = stream.info().await?.state.clone();
        windows.insert((t, 0), (state.first_sequence as i64, state.last_sequence as i64 + 1));
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::All,
                ..OrderedConfig::default()
            })
            .await
            .with_context(|| format!("reading stream {name}"))?;
        let before = audit.counts.records;
        let mut left = consumer.cached_info().num_pending;
        let bar = progress(left);
        let mut messages = consumer.messages().await?;
        while left > 0 {
            let next = tokio::time::timeout(STALL, messages.next()).await;
            let msg = match next {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => anyhow::bail!("reading stream {name}: {e}"),
                Ok(None) => anyhow::bail!("reading stream {name}: the consumer ended"),
                Err(_) => anyhow::bail!("no progress reading stream {name} for {}s", STALL.as_secs()),
            };
            let info = msg.info().map_err(|e| anyhow::anyhow!("reading stream {name}: {e}"))?;
            if info.stream_sequence > state.last_sequence {
                break; // published after the read started: not judged
            }
            left = info.pending;
            audit.counts.records += 1;
            bar.inc(1);
            let headers = msg.headers.iter().flat_map(|h| h.iter()).flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values.iter().map(move |v| (name, v.as_str().as_bytes()))
            });
            record(&mut audit, t, source, headers);
            if info.stream_sequence == state.last_sequence {
                break;
            }
        }
        bar.finish_and_clear();
        reads.push(TopicRead {
            topic: topic.clone(),
            partitions: 1,
            records: audit.counts.records - before,
        });
    }
    Ok((audit, reads, windows))
}
