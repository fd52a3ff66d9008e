//! Test harness shared by the end-to-end tests: a fresh database per test on the servers running on
//! this machine (override with `OUTBOX_TEST_PG`), and the broker helpers.
#![allow(missing_docs)]

pub mod arrivals;
pub mod conformance;
pub mod consuming;
pub mod daemon;
pub mod db;
pub mod effects;
pub mod embedded;
pub mod inbox_suite;
pub mod kafka;
pub mod proxy;
pub mod publisher_suite;
pub mod wait;
