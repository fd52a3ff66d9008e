//! The producer's settings: the defaults the publisher fills in, the ones it refuses (they would
//! break confirm-before-mark or key order), and the values never shown (secrets).

use std::collections::BTreeMap;

use outbox::redact::is_secret;
use rdkafka::error::KafkaError;

/// Settings the publisher applies unless the configuration sets them: the broker must have every
/// in-sync replica's copy before we mark a row, and producer retries must not reorder or duplicate.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    // Same partition for the same key as the Java client.
    ("partitioner", "murmur2_random"),
    // A batch waits at most this long for its reports; then the rows are retried (possibly
    // persisted: the consumer deduplicates).
    ("message.timeout.ms", "30000"),
    // The relay hands over a claimed batch at once and waits for all of it: librdkafka's own
    // 5 ms of batching would be added to every batch's latency (BENCHMARKS.md, figures 2 and 3).
    ("linger.ms", "1"),
];

/// librdkafka's other names for settings the publisher cares about: (main name, alias).
const ALIASES: &[(&str, &str)] = &[
    ("acks", "request.required.acks"),
    ("message.timeout.ms", "delivery.timeout.ms"),
    ("max.in.flight.requests.per.connection", "max.in.flight"),
    ("linger.ms", "queue.buffering.max.ms"),
];

/// The settings with secret values replaced by `***`.
pub fn redacted(settings: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    settings
        .iter()
        .map(|(k, v)| (k.clone(), if is_secret(k) { "***".into() } else { v.clone() }))
        .collect()
}

/// `settings` with [`PRODUCER_DEFAULTS`] filled in where neither a setting nor its alias is given,
/// checked ([`check_delivery_invariants`]) and with the metadata propagation wait filled in.
pub(super) fn effective(mut map: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, KafkaError> {
    for (k, v) in PRODUCER_DEFAULTS {
        // A setting given under its alias is not filled in under its main name.
        let given = ALIASES
            .iter()
            .any(|(main, alias)| main == k && map.contains_key(*alias));
        if !given {
            map.entry((*k).to_owned()).or_insert_with(|| (*v).to_owned());
        }
    }
    check_delivery_invariants(&map)?;
    fill_propagation(&mut map);
    Ok(map)
}

/// librdkafka's configuration errors name the value they refused: never a secret's.
pub(super) fn redact_error(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(res, desc, key, value) if is_secret(&key) => {
            let desc = desc.replace(&value, "***");
            KafkaError::ClientConfig(res, desc, key, "***".into())
        }
        e => e,
    }
}

/// Refuses settings under which a delivery report no longer means "every in-sync replica has it"
/// or producer retries may reorder a key: the relay marks a row on its report, so these would turn
/// into lost or reordered messages. The error names the setting.
fn check_delivery_invariants(settings: &BTreeMap<String, String>) -> Result<(), KafkaError> {
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| settings.get(*k).map(|v| ((*k).to_owned(), v.trim().to_owned())))
    };
    // Every setting under any of `keys`, a topic setting also with librdkafka's `topic.` prefix
    // (applied over the global one, so each must keep the invariant).
    let all = |keys: &[&str]| -> Vec<(String, String)> {
        keys.iter()
            .flat_map(|k| [(*k).to_owned(), format!("topic.{k}")])
            .filter_map(|k| settings.get(&k).map(|v| (k.clone(), v.trim().to_owned())))
            .collect()
    };
    let refuse = |key: String, value: String, why: &str| {
        Err(KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            format!("refused: {why}"),
            key,
            value,
        ))
    };
    for (k, v) in all(&["acks", "request.required.acks"]) {
        if !matches!(v.as_str(), "all" | "-1") {
            return refuse(
                k,
                v,
                "the relay marks a row only once every in-sync replica has it; set acks=all",
            );
        }
    }
    let idempotent = get(&["enable.idempotence"]).is_some_and(|(_, v)| v == "true");
    if !idempotent {
        let in_flight = get(&["max.in.flight.requests.per.connection", "max.in.flight"]);
        if in_flight.as_ref().is_none_or(|(_, v)| v != "1") {
            let (k, v) = in_flight.unwrap_or((
                "max.in.flight.requests.per.connection".into(),
                "(default 1000000)".into(),
            ));
            return refuse(
                k,
                v,
                "without enable.idempotence=true a retried request can overtake a later one of the same key; \
                 keep enable.idempotence=true or set max.in.flight.requests.per.connection=1",
            );
        }
    }
    for (k, v) in all(&["partitioner"]) {
        if v == "random" {
            return refuse(
                k,
                v,
                "a key's messages must go to one partition, in order; the random partitioner ignores the key \
                 (murmur2_random, consistent_random and fnv1a_random spread only messages without a key)",
            );
        }
    }
    for (k, v) in all(&["message.timeout.ms", "delivery.timeout.ms"]) {
        if v.parse::<u64>().map_or(true, |ms| ms == 0) {
            return refuse(
                k,
                v,
                "a batch must get its delivery reports in bounded time; use a positive timeout",
            );
        }
    }
    Ok(())
}

/// librdkafka's name for how long a topic the cluster does not report is taken for one still being
/// created: only after it does librdkafka fail the topic's messages as unknown.
const PROPAGATION: &str = "topic.metadata.propagation.max.ms";

/// Unless set, [`PROPAGATION`] is a third of the delivery timeout, at most 10 s. librdkafka's
/// default (30 s) is as long as our default `message.timeout.ms`, so a message to a topic that does
/// not exist timed out instead ("possibly persisted": `Unavailable`, backed off and sent again for
/// ever, never dead-lettered) and the lane stalled for the whole timeout on each try. A third leaves
/// the unknown-topic failure (`Permanent`) time to come first.
fn fill_propagation(settings: &mut BTreeMap<String, String>) {
    if settings.contains_key(PROPAGATION) {
        return;
    }
    let timeout_ms = ["message.timeout.ms", "delivery.timeout.ms"]
        .iter()
        .find_map(|k| settings.get(*k))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(30_000);
    settings.insert(PROPAGATION.to_owned(), (timeout_ms / 3).clamp(1, 10_000).to_string());
}
