//! `Millis`: a duration written as a whole number of milliseconds, the unit of every `*_ms` key of
//! the relay's and the brokers' settings files and of the daemon's flags.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

/// A duration given in whole milliseconds: `poll_interval_ms = 1000` in the file,
/// `--poll-interval-ms 1000` or `OUTBOX_POLL_INTERVAL_MS=1000`. A negative number, a fraction or a
/// string is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub Duration);

/// What a `*_ms` value must be, for error messages.
const EXPECTED: &str = "a whole number of milliseconds (0 or more)";

impl From<Millis> for Duration {
    fn from(m: Millis) -> Duration {
        m.0
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MillisVisitor;
        impl Visitor<'_> for MillisVisitor {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Millis, E> {
                Ok(Millis(Duration::from_millis(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Millis, E> {
                u64::try_from(v)
                    .map(|v| Millis(Duration::from_millis(v)))
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_u64(MillisVisitor)
    }
}

/// Reads a `Duration` field from a `*_ms` key: `#[serde(rename = "ack_timeout_ms", deserialize_with =
/// "outbox::millis::deserialize")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Millis::deserialize(d).map(Duration::from)
}

/// Reads an `Option<Duration>` field from a `*_ms` key where 0 means never (`None`).
pub fn deserialize_zero_never<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize(d).map(|every| Some(every).filter(|d| !d.is_zero()))
}

/// The flags' and environment variables' parser (clap picks it up as the value parser).
impl FromStr for Millis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<u64>()
            .map(|v| Millis(Duration::from_millis(v)))
            .map_err(|_| format!("expected {EXPECTED}, got {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        poll_interval_ms: Millis,
    }

    #[test]
    fn reads_whole_milliseconds() {
        let s: Section = toml::from_str("poll_interval_ms = 1500").unwrap();
        assert_eq!(s.poll_interval_ms, Millis(Duration::from_millis(1500)));
        let s: Section = toml::from_str("poll_interval_ms = 0").unwrap();
        assert_eq!(Duration::from(s.poll_interval_ms), Duration::ZERO);
        assert_eq!("250".parse(), Ok(Millis(Duration::from_millis(250))));
    }

    #[test]
    fn a_bad_value_names_the_key() {
        for bad in ["-1", "\"1s\"", "1.5", "true"] {
            let err = toml::from_str::<Section>(&format!("poll_interval_ms = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("poll_interval_ms"), "{bad}: {err}");
            assert!(err.contains(EXPECTED), "{bad}: {err}");
        }
        for bad in ["-1", "1s", "1.5", ""] {
            let err = bad.parse::<Millis>().unwrap_err();
            assert!(err.contains(EXPECTED), "{bad}: {err}");
        }
    }
}
