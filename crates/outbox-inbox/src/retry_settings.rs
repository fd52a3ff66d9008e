//! The retry and cleanup settings every consumer runner's configuration has, and their setters.

/// Implements, on a consumer runner's settings struct with the fields `max_attempts: u32`,
/// `backoff_base: Duration`, `backoff_max: Duration` and `cleanup_interval: Option<Duration>`, the
/// setters of those fields (`max_attempts` at least 1) and `retry_backoff`, the retry delays.
///
/// The crate using it depends on `outbox` (for `outbox::Backoff`).
#[doc(hidden)]
#[macro_export]
macro_rules! impl_retry_settings {
    ($config:ident) => {
        impl $config {
            #[doc = concat!("Sets [`", stringify!($config), "::max_attempts`] (at least 1).")]
            pub fn max_attempts(mut self, n: u32) -> Self {
                self.max_attempts = n.max(1);
                self
            }
            #[doc = concat!("Sets [`", stringify!($config), "::backoff_base`].")]
            pub fn backoff_base(mut self, d: ::std::time::Duration) -> Self {
                self.backoff_base = d;
                self
            }
            #[doc = concat!("Sets [`", stringify!($config), "::backoff_max`].")]
            pub fn backoff_max(mut self, d: ::std::time::Duration) -> Self {
                self.backoff_max = d;
                self
            }
            #[doc = concat!("Sets [`", stringify!($config), "::cleanup_interval`].")]
            pub fn cleanup_interval(mut self, every: Option<::std::time::Duration>) -> Self {
                self.cleanup_interval = every;
                self
            }
            #[doc = concat!("The retry delays, from [`", stringify!($config), "::backoff_base`] doubling up")]
            #[doc = concat!("to [`", stringify!($config), "::backoff_max`], jittered.")]
            pub fn retry_backoff(&self) -> Result<::outbox::Backoff, ::outbox::InvalidBackoff> {
                ::outbox::Backoff::new(self.backoff_base, self.backoff_max)
            }
        }
    };
}
