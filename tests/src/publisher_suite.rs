//! The publisher conformance suite: what every [`outbox::Publisher`] must guarantee, checked against
//! its real broker through a [`BrokerFixture`]. A broker adapter passes it with one macro call:
//!
//! ```ignore
//! outbox_tests::publisher_suite!(
//!     shared = MyFixture::shared().await,
//!     dedicated = MyFixture::dedicated().await,
//! );
//! ```
//!
//! Each expression is evaluated inside the async body of every generated test (so it may use
//! `.await`); its value is any type that implements [`BrokerFixture`]: a fixture struct, or an
//! `Arc<dyn BrokerFixture>` (the trait is implemented for `Arc<T>`). `shared` is built once per
//! test on the server every test uses (only [`BrokerFixture::destination`] isolates the tests);
//! `dedicated` is a server of the test's own, which the test kills, restarts, cuts and restores. At
//! most [`dedicated_parallelism`] dedicated fixtures exist at a time in one test binary.
//!
//! The generated tests (one per guarantee, each named `publisher_...`):
//!
//! | test | fixture | guarantee |
//! |------|---------|-----------|
//! | `publisher_confirms_before_the_relay_marks` | dedicated | no row is marked while the server is cut; all arrive after restore |
//! | `publisher_keeps_key_order_through_a_cut` | dedicated | per-key seqs in order through a cut mid-stream, duplicates bounded |
//! | `publisher_restart_mid_stream_loses_nothing` | dedicated | server SIGKILLed and restarted while writers commit: 0 lost, order kept |
//! | `publisher_killed_server_is_unavailable` | dedicated | every outcome `Unavailable` within a bound, then `Ok` after start |
//! | `publisher_cut_connection_is_unavailable_then_recovers` | dedicated | same for a cut connection |
//! | `publisher_oversize_is_permanent` | shared | a payload the broker refuses as too large is `Permanent` |
//! | `publisher_missing_destination_is_permanent` | shared | a destination the broker does not have is `Permanent` |
//! | `publisher_mixed_batch_fails_only_the_bad_message` | shared | one bad destination in a batch fails that message only |
//! | `publisher_mixed_batch_through_the_relay` | shared | the relay dead-letters the bad one, the others arrive in order |
//! | `publisher_carries_headers_end_to_end` | shared | id, key, seq, source, traceparent, a user header and raw payload bytes |
//!
//! `Retryable` is the classification left to each adapter's own tests: no failure provokes it the
//! same way on every broker. The suite checks that none of the failures above is reported as
//! `Retryable` (an outage must not count attempts, a poison message must not be retried).

mod delivery;

/// The suite's test bodies, called by the tests [`publisher_suite!`] generates.
pub mod cases;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use outbox::Publisher;

pub(crate) use delivery::commit_rounds;
pub use delivery::{check_delivery, read_ids, stored};

/// A message as an independent reader of the broker saw it (not the adapter's own consumer).
#[derive(Debug, Clone)]
pub struct Received {
    /// `outbox-id` header.
    pub id: uuid::Uuid,
    /// `outbox-key` header (or the broker's key/subject part).
    pub key: Option<String>,
    /// `outbox-seq` header.
    pub seq: Option<i64>,
    /// `outbox-source` header.
    pub source: Option<String>,
    /// Every header as sent.
    pub headers: Vec<(String, String)>,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// What the suite needs from one broker. Tests run in parallel: `destination()` is unique per call.
#[async_trait::async_trait]
pub trait BrokerFixture: Send + Sync + 'static {
    /// "kafka", "rabbitmq", "nats": used in names and logs.
    fn name(&self) -> &'static str;
    /// Creates a fresh destination (topic / exchange+queue binding / stream subject) that an outbox
    /// message names in `Message::new(destination, ..)`; the reader can read it back from the start.
    async fn destination(&self) -> String;
    /// A destination the broker refuses as missing (no such topic with auto-create off, unroutable,
    /// no stream): publishing there must be a Permanent failure.
    async fn missing_destination(&self) -> String;
    /// A new publisher under test connected to this fixture's server, with short timeouts suitable
    /// for tests (a confirmation that does not come within ~5 s is Unavailable).
    async fn publisher(&self) -> std::sync::Arc<dyn outbox::Publisher>;
    /// Everything on `destination` so far, in broker order per key, read by an independent client;
    /// waits until at least `at_least` messages are there or `timeout` passed, then returns what it has.
    async fn read(&self, destination: &str, at_least: usize, timeout: std::time::Duration) -> Vec<Received>;
    /// A payload size in bytes that the broker refuses as too large.
    fn oversize(&self) -> usize;
    /// Kills the server abruptly (SIGKILL). Only called on a dedicated fixture.
    async fn kill(&self);
    /// Starts the killed server again on the same storage and port; returns when it takes publishes.
    async fn start(&self);
    /// Cuts the publisher off (e.g. a TcpProxy in front of the server is closed: open connections
    /// drop, new ones are refused). Only called on a dedicated fixture.
    async fn cut(&self);
    /// Restores what `cut` took away.
    async fn restore(&self);
    /// How long a publish may take to report a failure when the server is gone (killed or cut):
    /// the publisher's confirmation timeout plus slack. Defaults to 30 s.
    fn failure_bound(&self) -> Duration {
        Duration::from_secs(30)
    }
}

#[async_trait::async_trait]
impl<T: BrokerFixture + ?Sized> BrokerFixture for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    async fn destination(&self) -> String {
        (**self).destination().await
    }
    async fn missing_destination(&self) -> String {
        (**self).missing_destination().await
    }
    async fn publisher(&self) -> Arc<dyn Publisher> {
        (**self).publisher().await
    }
    async fn read(&self, destination: &str, at_least: usize, timeout: Duration) -> Vec<Received> {
        (**self).read(destination, at_least, timeout).await
    }
    fn oversize(&self) -> usize {
        (**self).oversize()
    }
    async fn kill(&self) {
        (**self).kill().await
    }
    async fn start(&self) {
        (**self).start().await
    }
    async fn cut(&self) {
        (**self).cut().await
    }
    async fn restore(&self) {
        (**self).restore().await
    }
    fn failure_bound(&self) -> Duration {
        (**self).failure_bound()
    }
}

/// What a fixture keeps for each destination it made (a stream's name, a reader), by destination.
pub struct PerDestination<T>(std::sync::Mutex<std::collections::HashMap<String, T>>);

impl<T> Default for PerDestination<T> {
    fn default() -> Self {
        PerDestination(Default::default())
    }
}

impl<T: Clone> PerDestination<T> {
    pub fn insert(&self, destination: &str, value: T) {
        self.0.lock().unwrap().insert(destination.to_owned(), value);
    }

    /// What was kept for `destination`; panics for a destination the fixture did not make.
    pub fn get(&self, destination: &str) -> T {
        self.0
            .lock()
            .unwrap()
            .get(destination)
            .cloned()
            .expect("a destination of this fixture")
    }
}

/// Expands to one `#[tokio::test]` per guarantee of the publisher conformance suite (see the
/// [`publisher_suite`](crate::publisher_suite) module for the list and the fixture expressions).
/// The calling crate needs `outbox-tests` and `tokio` (with `macros` and `rt-multi-thread`).
#[macro_export]
macro_rules! publisher_suite {
    (shared = $shared:expr, dedicated = $dedicated:expr $(,)?) => {
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_confirms_before_the_relay_marks,
            confirm_before_mark
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_keeps_key_order_through_a_cut,
            key_order_through_a_cut
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_restart_mid_stream_loses_nothing,
            restart_mid_stream
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_killed_server_is_unavailable,
            killed_is_unavailable
        );
        $crate::__publisher_case!(
            dedicated,
            $dedicated,
            publisher_cut_connection_is_unavailable_then_recovers,
            cut_is_unavailable
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_oversize_is_permanent,
            oversize_is_permanent
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_missing_destination_is_permanent,
            missing_destination_is_permanent
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_mixed_batch_fails_only_the_bad_message,
            mixed_batch
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_mixed_batch_through_the_relay,
            mixed_batch_relay
        );
        $crate::__publisher_case!(
            shared,
            $shared,
            publisher_carries_headers_end_to_end,
            headers_end_to_end
        );
    };
}

/// One generated test of [`publisher_suite!`] (not for direct use).
#[doc(hidden)]
#[macro_export]
macro_rules! __publisher_case {
    (shared, $fixture:expr, $test:ident, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let fixture = $crate::publisher_suite::fixture($fixture);
            $crate::publisher_suite::cases::$case(fixture).await;
        }
    };
    (dedicated, $fixture:expr, $test:ident, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let _slot = $crate::publisher_suite::dedicated_slot().await;
            let fixture = $crate::publisher_suite::fixture($fixture);
            $crate::publisher_suite::cases::$case(fixture).await;
        }
    };
}

/// The fixture as the cases take it.
pub fn fixture<F: BrokerFixture>(f: F) -> Arc<dyn BrokerFixture> {
    Arc::new(f)
}

/// How many dedicated fixtures (servers of a test's own) may exist at once in one test binary:
/// `OUTBOX_SUITE_DEDICATED`, default 2 (a broker server is heavy on a small machine).
pub fn dedicated_parallelism() -> usize {
    std::env::var("OUTBOX_SUITE_DEDICATED")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// Waits for a turn to build a dedicated fixture; the turn ends when the permit is dropped.
pub async fn dedicated_slot() -> tokio::sync::SemaphorePermit<'static> {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    SLOTS
        .get_or_init(|| tokio::sync::Semaphore::new(dedicated_parallelism()))
        .acquire()
        .await
        .expect("never closed")
}

/// Rows per lane per relay round in the suite's relays: also the duplicate bound per lane.
pub const BATCH: usize = 50;
