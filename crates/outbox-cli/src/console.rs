//! The console: a server-rendered page on the admin port.

use std::sync::Arc;

use axum::Router;

use crate::admin::AdminState;

/// The console's routes.
pub(crate) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
}
