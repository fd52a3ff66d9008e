//! One classifier of database errors, used by the write path ([`Error::is_retryable`](crate::Error::is_retryable)),
//! the relay and the inbox: is this trouble that trying again later can get past (the connection,
//! a conflict with another transaction, a server that is busy, read-only during a failover or
//! shutting down), or a statement that will fail the same way every time?
//!
//! Each backend is read in its own terms: PostgreSQL by SQLSTATE, MySQL/MariaDB by the server's
//! error number (its SQLSTATE is a generic `HY000` for most errors, lock wait timeouts included),
//! SQLite by the primary result code under the extended one (`SQLITE_BUSY_SNAPSHOT` is 517).

/// True when the same operation can succeed if tried again later.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => database(db.as_ref()),
        _ => false,
    }
}

/// True when the database refused a value the statement was given, as it will every time: text
/// it cannot hold (PostgreSQL: a NUL character), a value too long for its column or for an index
/// entry. The values are at fault (say, a message's key or topic), not the database.
pub fn is_refused_value(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    #[cfg(feature = "mysql")]
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return refused_by_mysql(my.number());
    }
    #[cfg(feature = "sqlite")]
    if let Some(lite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        use sqlx::error::DatabaseError as _;
        return lite
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(refused_by_sqlite);
    }
    db.code().is_some_and(|c| refused_sqlstate(&c))
}

/// PostgreSQL: character not in repertoire (a NUL in text, 22021), untranslatable character
/// (22P05), string data right truncation (a value longer than its `varchar`, 22001), program limit
/// exceeded (an index row too large, 54000).
fn refused_sqlstate(code: &str) -> bool {
    matches!(code, "22021" | "22P05" | "22001" | "54000")
}

/// MySQL/MariaDB: data too long for column (1406), incorrect string value (1366), key too long
/// (1071).
#[cfg(feature = "mysql")]
fn refused_by_mysql(number: u16) -> bool {
    matches!(number, 1406 | 1366 | 1071)
}

/// SQLite: string or blob too big (18), whatever the extended code.
#[cfg(feature = "sqlite")]
fn refused_by_sqlite(extended: i32) -> bool {
    extended & 0xff == 18
}

fn database(db: &dyn sqlx::error::DatabaseError) -> bool {
    #[cfg(feature = "mysql")]
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return mysql(my.number());
    }
    #[cfg(feature = "sqlite")]
    if let Some(lite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        use sqlx::error::DatabaseError as _;
        return lite.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(sqlite);
    }
    db.code().is_some_and(|c| sqlstate(&c))
}

/// PostgreSQL's SQLSTATEs: serialization failure, deadlock, lock not available, statement timeout
/// or cancel, admin/crash shutdown, cannot connect now, read-only transaction (a standby during a
/// failover), any connection exception (08) and any insufficient resources (53: too many
/// connections, disk full, out of memory).
fn sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "25006"
    ) || code.starts_with("08")
        || code.starts_with("53")
}

/// MySQL/MariaDB error numbers: lock wait timeout (1205), deadlock (1213), too many connections
/// (1040, 1203), server shutdown (1053), read-only server or transaction (1290, 1792), connection
/// killed (1927), statement timeouts (3024 MySQL, 1969 MariaDB), disk full (1021).
#[cfg(feature = "mysql")]
fn mysql(number: u16) -> bool {
    matches!(
        number,
        1205 | 1213 | 1040 | 1203 | 1053 | 1290 | 1792 | 1927 | 3024 | 1969 | 1021
    )
}

/// SQLite: busy (5) or locked (6), whatever the extended code (e.g. 517 `SQLITE_BUSY_SNAPSHOT`,
/// 261 `SQLITE_BUSY_RECOVERY`, 262 `SQLITE_LOCKED_SHAREDCACHE`).
#[cfg(feature = "sqlite")]
fn sqlite(extended: i32) -> bool {
    matches!(extended & 0xff, 5 | 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert!(sqlstate("40P01") && sqlstate("08006") && sqlstate("53100") && sqlstate("25006"));
        assert!(!sqlstate("23505") && !sqlstate("42601"));
        #[cfg(feature = "mysql")]
        assert!(mysql(1205) && mysql(1213) && !mysql(1062) && !mysql(1366));
        #[cfg(feature = "sqlite")]
        assert!(sqlite(5) && sqlite(517) && sqlite(262) && !sqlite(19) && !sqlite(2067));
    }

    #[test]
    fn refused_values() {
        assert!(refused_sqlstate("22021") && refused_sqlstate("54000") && refused_sqlstate("22001"));
        assert!(!refused_sqlstate("40P01") && !refused_sqlstate("23505") && !refused_sqlstate("08006"));
        #[cfg(feature = "mysql")]
        assert!(refused_by_mysql(1406) && refused_by_mysql(1366) && !refused_by_mysql(1213) && !refused_by_mysql(1062));
        #[cfg(feature = "sqlite")]
        assert!(refused_by_sqlite(18) && !refused_by_sqlite(5) && !refused_by_sqlite(19));
        assert!(!is_refused_value(&sqlx::Error::PoolTimedOut));
    }
}
