#![doc = include_str!("../README.md")]

mod backend;
pub mod dead_letter;
mod error;
mod handler;
mod inbox;
mod incoming;
mod parked;
mod retry_settings;
mod runner;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use backend::{Backend, Recorded};
pub use error::InboxError;
pub use handler::Handler;
pub use inbox::{GapPolicy, Inbox, Outcome, DEFAULT_RETENTION};
pub use incoming::{Incoming, MAX_SOURCE_LEN};
pub use parked::Parked;
pub use runner::{CleanupSchedule, Disposition, ParkedFailure, RetryInPlace, RunnerCore, RunnerStats, Step, Tried};
