//! Consumer-side idempotency (work in progress).
