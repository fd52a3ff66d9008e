//! The variants of figure 3: how the relay is woken and configured, or the raw producer at a
//! `linger.ms`.

use std::time::Duration;

use outbox_relay::RelayConfig;

/// How the relay is woken and configured for one latency run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Case {
    /// NOTIFY in the writers' transactions.
    pub(super) notify: bool,
    /// The relay's poll interval.
    pub(super) poll: Duration,
    /// librdkafka `linger.ms` (None: the relay's default, 1 ms).
    pub(super) linger_ms: Option<u32>,
    /// How long the relay's lanes linger after running dry ([`RelayConfig::linger`]).
    pub(super) lanes_linger: Duration,
    /// How often lingering lanes are looked at ([`RelayConfig::linger_poll_interval`]).
    pub(super) watch: Duration,
    /// The longest between two looks while the relay slows commits
    /// ([`RelayConfig::linger_poll_max`]).
    pub(super) watch_max: Duration,
    /// Batches in flight per lane ([`RelayConfig::pipeline`]).
    pub(super) pipeline: usize,
    /// The relay listens for the writers' in-process wake-up (`Relay::wake_on`), so their
    /// `Outbox::commit` wakes its lanes at once.
    pub(super) local: bool,
    /// [`RelayConfig::adaptive_pace`].
    pub(super) pace: bool,
}

impl Case {
    /// The defaults: NOTIFY, lanes linger, one batch in flight per lane, adaptive pace.
    pub(super) fn defaults() -> Case {
        let d = RelayConfig::default();
        Case {
            notify: true,
            poll: d.poll_interval,
            linger_ms: None,
            lanes_linger: d.linger,
            watch: d.linger_poll_interval,
            watch_max: d.linger_poll_max,
            pipeline: d.pipeline,
            local: false,
            pace: d.adaptive_pace,
        }
    }

    pub(super) fn label(&self) -> String {
        let mut parts = vec![match (self.local, self.notify) {
            (true, _) => "relay woken in-process by Outbox::commit".to_owned(),
            (false, true) => "relay woken by NOTIFY".to_owned(),
            (false, false) => format!("relay polling every {} ms (NOTIFY off)", self.poll.as_millis()),
        }];
        let d = Case::defaults();
        if let Some(l) = self.linger_ms {
            parts.push(format!("linger.ms={l}"));
        }
        if self.lanes_linger != d.lanes_linger {
            parts.push(format!("lanes linger {} ms", self.lanes_linger.as_millis()));
        }
        if self.watch != d.watch {
            parts.push(format!("lingering lanes watched every {} ms", self.watch.as_millis()));
        }
        if self.watch_max != d.watch_max {
            parts.push(format!(
                "lingering lanes looked at up to {} ms apart while the relay slows the writers",
                self.watch_max.as_millis()
            ));
        }
        if self.pipeline != d.pipeline {
            parts.push(format!("pipeline {}", self.pipeline));
        }
        if self.pace != d.pace {
            parts.push(format!("adaptive pace {}", if self.pace { "on" } else { "off" }));
        }
        parts.join(", ")
    }
}

/// One measured variant: the raw producer at a `linger.ms`, the writers' transaction without the
/// outbox followed by that producer (a dual write), or the relay.
#[derive(Debug, Clone, Copy)]
pub(super) enum Variant {
    Raw(Option<u32>),
    DualWrite(Option<u32>),
    Relay(Case),
}

impl Variant {
    pub(super) fn label(&self) -> String {
        match self {
            Variant::Raw(None) => "raw producer send -> report, the relay's producer settings (broker floor)".into(),
            Variant::Raw(Some(l)) => format!("raw producer send -> report, linger.ms={l}"),
            Variant::DualWrite(None) => {
                "dual write: the same transaction without the outbox, then the raw producer, commit -> report".into()
            }
            Variant::DualWrite(Some(l)) => format!(
                "dual write: the same transaction without the outbox, then the raw producer, commit -> report, linger.ms={l}"
            ),
            Variant::Relay(c) => c.label(),
        }
    }
}
