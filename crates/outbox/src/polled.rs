//! What the polled databases (MySQL / MariaDB and SQLite: no LISTEN) share: the store struct (a
//! pool, and whether published rows are kept), and how a row of a multi-row enqueue is bound.

use sqlx::query::Query;
use sqlx::{Database, Encode, Type};
use uuid::Uuid;

use crate::{Enqueued, Message};

/// Defines the store struct `$store` over a `$pool` (the attributes before its name are its own,
/// e.g. its doc comment) with `new`, `keep_published` and `pool`. Published rows are deleted unless
/// `keep_published` says otherwise.
#[allow(unused_macros)] // used by the backends compiled in
macro_rules! polled_store {
    ($(#[$attr:meta])* $store:ident, $pool:ty) => {
        $(#[$attr])*
        #[derive(Debug, Clone)]
        pub struct $store {
            pool: $pool,
            keep_published: bool,
        }

        impl $store {
            /// A store on `pool`. Published rows are deleted.
            pub fn new(pool: $pool) -> Self {
                $store {
                    pool,
                    keep_published: false,
                }
            }

            /// Keep published rows in `outbox_published` with their partition and offset (audit)
            /// instead of deleting them. Defaults to false.
            pub fn keep_published(mut self, keep: bool) -> Self {
                self.keep_published = keep;
                self
            }

            /// The pool.
            pub fn pool(&self) -> &$pool {
                &self.pool
            }
        }
    };
}

#[allow(unused_imports)] // used by the backends compiled in
pub(crate) use polled_store;

/// Binds `m`, enqueued as `e`, as the next row of a multi-row `enqueue` statement: (lane, id, topic,
/// payload, headers, available_at, delay in microseconds, key, seq). `available_at` is `m`'s
/// `available_at` as the database stores times.
#[allow(dead_code)] // used by the backends compiled in
pub(crate) fn bind_row<'q, DB, T>(
    q: Query<'q, DB, <DB as Database>::Arguments<'q>>,
    m: &'q Message,
    e: &Enqueued,
    available_at: Option<T>,
) -> Query<'q, DB, <DB as Database>::Arguments<'q>>
where
    DB: Database,
    T: 'q,
    i32: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
    Uuid: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    &'q [u8]: Encode<'q, DB> + Type<DB>,
    Option<String>: Encode<'q, DB> + Type<DB>,
    Option<T>: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
    Option<i64>: Encode<'q, DB> + Type<DB>,
{
    q.bind(e.lane)
        .bind(m.id)
        .bind(m.topic.as_str())
        .bind(m.payload.as_slice())
        .bind(m.headers_column())
        .bind(available_at)
        .bind(m.delay_millis().saturating_mul(1000))
        .bind(m.key.as_deref())
        .bind(e.seq)
}
