//! The publisher conformance suite against nats-server: the shared server of `.ci/nats` and
//! dedicated servers of the tests' own behind a TCP proxy.

mod common;

use common::NatsFixture;

outbox_tests::publisher_suite!(
    shared = NatsFixture::shared().await,
    dedicated = NatsFixture::dedicated().await,
);
