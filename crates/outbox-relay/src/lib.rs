//! The outbox relay engine: claims committed outbox rows lane by lane, publishes them, waits for
//! the broker's confirmation, then marks them; retries with backoff, keeps per-key order,
//! dead-letters poison messages, wakes on commit. Embeddable; the `outbox-relay` binary wraps it.

pub mod admin;
pub mod backend;
mod config;
mod engine;
mod failpoint;
mod lane;
pub mod metrics;
pub mod settings;

pub use config::{ClaimAhead, DeadLetterPolicy, RelayConfig};
pub use engine::{Relay, RelayError};
