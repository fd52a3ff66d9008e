//! Where a message goes: the subject made of the prefix, the topic and the key token. The key is in
//! the subject so that a stream, a consumer filter or a subscriber can select one key (or room, or
//! order); the exact key always travels in the `outbox-key` header too.

/// The last token of an unkeyed message's subject.
pub const NO_KEY_TOKEN: &str = "_";

/// Keys longer than this (in bytes, once encoded) are replaced by a hash in the subject.
const MAX_TOKEN: usize = 128;

/// The subject of a message: `<prefix><topic>.<key token>`, e.g. `orders.order-42`, or
/// `orders._` ([`NO_KEY_TOKEN`]) for an unkeyed message. Every message of a topic has the same
/// number of tokens, so a stream that takes `<prefix><topic>.*` (or `.>`) takes all of them.
///
/// The key token ([`key_token`]) is the key itself when it is 1 to 128 characters of
/// `[A-Za-z0-9_-]` (and not `_`); any other key (dots, spaces, `*`, `>`, non-ASCII...) is
/// written as `~` and its UTF-8 bytes in hex (`order.42` -> `~6f726465722e3432`), and a key whose
/// hex would pass 128 characters as `~x` and a 64-bit FNV-1a hash of it (two such keys may share a
/// subject; they still keep their order, each in its own key's sequence). The mapping never
/// changes for a key, so a key always lands on one subject.
///
/// Fails when the result is not a valid subject: a topic with an empty token (`a..b`, a leading
/// or trailing dot) or a prefix with a space or a wildcard.
///
/// ```
/// assert_eq!(outbox_nats::subject_for("", "orders", Some("order-42")).unwrap(), "orders.order-42");
/// assert_eq!(outbox_nats::subject_for("outbox.", "chat.room-1", None).unwrap(), "outbox.chat.room-1._");
/// assert_eq!(outbox_nats::subject_for("", "orders", Some("a b")).unwrap(), "orders.~612062");
/// ```
pub fn subject_for(prefix: &str, topic: &str, key: Option<&str>) -> Result<String, String> {
    let token = key.map_or(std::borrow::Cow::Borrowed(NO_KEY_TOKEN), key_token);
    let subject = format!("{prefix}{topic}.{token}");
    let bad = subject
        .split('.')
        .find(|t| t.is_empty() || t.contains(['*', '>']) || t.bytes().any(|b| b <= b' ' || b == 0x7f));
    match bad {
        Some(t) => Err(format!(
            "subject {subject:?} (prefix {prefix:?}, topic {topic:?}) is not a valid NATS subject: token {t:?}"
        )),
        None => Ok(subject),
    }
}

/// The subject token for `key` (see [`subject_for`]).
pub fn key_token(key: &str) -> std::borrow::Cow<'_, str> {
    let plain = !key.is_empty()
        && key != NO_KEY_TOKEN
        && key.len() <= MAX_TOKEN
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        return std::borrow::Cow::Borrowed(key);
    }
    if 2 * key.len() < MAX_TOKEN {
        let mut t = String::with_capacity(1 + 2 * key.len());
        t.push('~');
        for b in key.bytes() {
            t.push_str(&format!("{b:02x}"));
        }
        return std::borrow::Cow::Owned(t);
    }
    // FNV-1a, 64 bits: fixed here for good (a key must always map to the same subject).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    std::borrow::Cow::Owned(format!("~x{h:016x}"))
}

/// The outbox topic of a delivered subject: the subject without its last token (the key token),
/// as the consumer runner hands it to the inbox (with the publisher's prefix, if any).
pub(crate) fn topic_of(subject: &str) -> &str {
    subject.rsplit_once('.').map_or(subject, |(topic, _)| topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_one_token_each() {
        assert_eq!(key_token("order-42"), "order-42");
        assert_eq!(key_token("Room_7"), "Room_7");
        assert_eq!(key_token("_"), "~5f");
        assert_eq!(key_token("a.b"), "~612e62");
        assert_eq!(key_token("*"), "~2a");
        assert_eq!(key_token("é"), "~c3a9");
        let long = "k".repeat(200);
        let t = key_token(&long);
        assert!(t.starts_with("~x") && t.len() == 18, "{t}");
        assert_eq!(t, key_token(&long), "stable");
        // Pinned: subjects already on streams depend on it.
        assert_eq!(key_token(&"a.".repeat(40)), "~xf589e48df7a1fbf5");
        assert_eq!(key_token(&"k".repeat(128)), "k".repeat(128));
        assert!(key_token(&"k".repeat(129)).starts_with("~x"));
    }

    #[test]
    fn subjects_are_checked() {
        assert_eq!(subject_for("", "a.b", Some("k")).unwrap(), "a.b.k");
        assert_eq!(subject_for("p.", "t", None).unwrap(), "p.t._");
        assert!(subject_for("", "a..b", None).is_err());
        assert!(subject_for("", ".a", None).is_err());
        assert!(subject_for("bad prefix.", "t", None).is_err());
        assert!(subject_for("*.", "t", None).is_err());
        assert_eq!(topic_of("outbox.orders.order-42"), "outbox.orders");
    }
}
