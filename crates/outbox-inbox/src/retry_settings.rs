//! The retry settings every consumer runner's configuration has.

/// Implements, on a consumer runner's settings struct with the fields `max_attempts: u32`,
/// `backoff_base: Duration` and `backoff_max: Duration`, the setter of `max_attempts` (at least 1;
/// skip it in the struct's derived setters) and `retry_backoff`, the retry delays.
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
            #[doc = concat!("The retry delays, from [`", stringify!($config), "::backoff_base`] doubling up")]
            #[doc = concat!("to [`", stringify!($config), "::backoff_max`], jittered.")]
            pub fn retry_backoff(&self) -> Result<::outbox::Backoff, ::outbox::InvalidBackoff> {
                ::outbox::Backoff::new(self.backoff_base, self.backoff_max)
            }
        }
    };
}
