//! The outbox relay engine: claims committed outbox rows lane by lane, publishes them, waits for
//! the broker's confirmation, then marks them; retries with backoff, keeps per-key order,
//! dead-letters poison messages, wakes on commit. Embed it with any [`outbox::Store`] and
//! [`outbox::Publisher`]; the `outbox-relay` daemon (crate `outbox-cli`) wraps it with a
//! configuration file, a broker and an admin endpoint.

mod batch;
mod config;
mod engine;
mod failpoint;
mod flight;
mod health;
mod lane;
mod linger;
pub mod metrics;
mod pace;
mod shared;
mod waits;
mod writers;

pub use config::{ClaimAhead, DeadLetterPolicy, RelayConfig};
pub use engine::{Relay, RelayError};
pub use health::{RelayHealth, StoreFailing};
