//! What a failure means, decided in one place.
//!
//! Every error the host meets on its way from Redis to PostgreSQL and back falls into one of four
//! classes, and each class has one remedy:
//!
//! | [`Class`]                 | what happened                                    | remedy                                           |
//! |---------------------------|--------------------------------------------------|--------------------------------------------------|
//! | [`Class::Outage`]         | PostgreSQL or Redis cannot be reached            | wait it out, without limit; no entry pays for it |
//! | [`Class::LostGroup`]      | the consumer group (or its stream) vanished      | recreate the group, then go on                   |
//! | [`Class::Retryable`]      | contention or a passing condition                | retry, counted against the entry's attempts      |
//! | [`Class::Permanent`]      | the work can never succeed as written            | dead-letter the entry, with the reason           |
//!
//! The consumer, the commit and the outbox relay ask [`classify`] (or, for one SQL statement,
//! [`classify_statement`]) instead of deciding for themselves, and what they find an outage is
//! what [`crate::health`] reports, so an outage means the same thing everywhere. README's "Outages and everything else" tells operators
//! the same in their terms.

use std::time::Duration;

/// A dependency a host needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dependency {
    /// PostgreSQL: where results are persisted.
    Database,
    /// Redis: where entries are read and acknowledged.
    Redis,
}

impl Dependency {
    /// Both dependencies, in the order reports list them.
    pub const ALL: [Dependency; 2] = [Dependency::Database, Dependency::Redis];

    /// The name operators know it by.
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Database => "PostgreSQL",
            Dependency::Redis => "Redis",
        }
    }
}

/// What a failure means for the work that hit it (see the module docs for each remedy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The dependency cannot be reached.
    Outage(Dependency),
    /// The consumer group, or its stream, does not exist (any more).
    LostGroup,
    /// May pass if tried again.
    Retryable,
    /// Can never succeed as written.
    Permanent,
}

/// The class of `error`, from the first cause in its chain that says something: an outage
/// ([`Unreachable`], [`Unanswered`], a lost or refused connection to PostgreSQL or Redis), a lost
/// group (`NOGROUP`), contention ([`Contention`]) or a SQL error by its SQLSTATE. An error nothing
/// here recognises is taken for the work's own, [`Class::Permanent`]; before an entry is
/// dead-lettered for one, the entry-by-entry pass makes sure PostgreSQL answers, so an outage no
/// rule foresaw never costs an entry its place.
pub fn classify(error: &anyhow::Error) -> Class {
    // The host's own verdicts, wherever they are: as the error, or as context added to another.
    if let Some(Unreachable(dependency, _)) = error.downcast_ref::<Unreachable>() {
        return Class::Outage(*dependency);
    }
    if error.downcast_ref::<Unanswered>().is_some() {
        return Class::Outage(Dependency::Database);
    }
    if error.downcast_ref::<Contention>().is_some() {
        return Class::Retryable;
    }
    error
        .chain()
        .find_map(|cause| {
            if let Some(Unreachable(dependency, _)) = cause.downcast_ref::<Unreachable>() {
                Some(Class::Outage(*dependency))
            } else if cause.downcast_ref::<Unanswered>().is_some() {
                Some(Class::Outage(Dependency::Database))
            } else if cause.downcast_ref::<Contention>().is_some() {
                Some(Class::Retryable)
            } else if let Some(error) = cause.downcast_ref::<sqlx::Error>() {
                Some(sql_class(error))
            } else if let Some(error) = cause.downcast_ref::<redis::RedisError>() {
                redis_class(error)
            } else {
                None
            }
        })
        .unwrap_or(Class::Permanent)
}

/// The unreachable dependency, if `error` is an outage.
pub fn outage(error: &anyhow::Error) -> Option<Dependency> {
    match classify(error) {
        Class::Outage(dependency) => Some(dependency),
        _ => None,
    }
}

/// Whether `error` is a wait for one of the pool's connections that timed out: the host's own
/// connections are all busy. Classified as an outage (waited out, costing no entry an attempt),
/// but not reported as one: the probe, on a connection of its own, tells whether PostgreSQL
/// answers.
pub fn pool_busy(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolTimedOut)
        )
    })
}

/// Whether a Redis error is `NOGROUP`: the consumer group (or its stream) does not exist.
pub fn is_lost_group(error: &redis::RedisError) -> bool {
    error.code() == Some("NOGROUP")
}

/// A Redis error's class: an outage when Redis cannot be reached (rather than refused a command),
/// a lost group on `NOGROUP`; `None` (the work's own, see [`classify`]) for a refused command.
fn redis_class(error: &redis::RedisError) -> Option<Class> {
    if is_lost_group(error) {
        return Some(Class::LostGroup);
    }
    let unreachable = error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || error.kind() == redis::ErrorKind::ClusterConnectionNotFound
        // A cluster between topologies (a failover, slots moving): waited out like a restart.
        || matches!(
            error.code(),
            Some("LOADING" | "MASTERDOWN" | "TRYAGAIN" | "BUSY" | "CLUSTERDOWN" | "MOVED" | "ASK")
        );
    unreachable.then_some(Class::Outage(Dependency::Redis))
}

/// Whether `error` means PostgreSQL cannot be reached: the connection failed or was lost, or the
/// server is shutting down or refuses connections. Only this is an outage, waited out without
/// limit; every other error is about the work itself and is retried a bounded number of times.
pub fn database_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // connection_exception; admin_shutdown, crash_shutdown, cannot_connect_now;
            // too_many_connections; and what refuses a new connection: authentication failed,
            // the database does not exist, or does not accept connections (`ALLOW_CONNECTIONS
            // false`: SQLSTATE 55000 raised by the server's connection check, told by the
            // routine that raised it, which unlike the message is never translated).
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "53300" | "28000" | "28P01" | "3D000"
                )
                || (code == "55000"
                    && db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|e| e.routine())
                        == Some("CheckMyDatabase"))
        }),
        _ => false,
    }
}

/// The class of a PostgreSQL error by its SQLSTATE.
fn sql_class(error: &sqlx::Error) -> Class {
    if database_unreachable(error) {
        return Class::Outage(Dependency::Database);
    }
    let sqlx::Error::Database(db) = error else {
        // Decoding a row, a closed pool's sibling errors: not the entry's fault as far as anyone
        // can tell.
        return Class::Retryable;
    };
    match db.code().as_deref().unwrap_or_default() {
        code if SCHEMA_CHANGED.contains(&code) => Class::Retryable,
        // foreign_key_violation: the referenced row (e.g. the media) may appear later.
        // serialization_failure, deadlock_detected, lock_not_available: transient contention.
        // query_canceled (statement_timeout), idle_in_transaction_session_timeout, and the
        // server's own trouble (insufficient resources, system errors, internal errors): may
        // pass, but each retry counts against the entry's attempts.
        "23503" | "40001" | "40P01" | "55P03" | "57014" | "25P03" => Class::Retryable,
        c if c.starts_with("53") || c.starts_with("58") || c.starts_with("XX") => Class::Retryable,
        _ => Class::Permanent,
    }
}

/// Whether a PostgreSQL error says the schema changed under a checked command (a column or table
/// gone, a key no longer unique, a type changed): the catalogue must be read again.
pub fn schema_changed(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    db.code()
        .is_some_and(|code| SCHEMA_CHANGED.contains(&code.as_ref()))
}

/// undefined_column, undefined_table, invalid_column_reference (an ON CONFLICT key that is no
/// longer unique), datatype_mismatch: the schema changed since the catalogue was read, so a
/// command checked against it failed; read it again and retry.
const SCHEMA_CHANGED: [&str; 4] = ["42703", "42P01", "42P10", "42804"];

/// Why one statement (and so its entry) failed inside the database.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// May succeed later ([`Class::Retryable`]): a referenced row does not exist yet, an `update`
    /// with `if-missing = retry` found no row, contention, or a changed schema.
    #[error("{0}")]
    Retry(String),
    /// Can never succeed as written ([`Class::Permanent`]): a constraint or data error,
    /// `if-missing = fail`, an insert conflict with `on-conflict = error`.
    #[error("{0}")]
    Permanent(String),
    /// The database itself is unreachable or failing ([`Class::Outage`]); the whole batch is
    /// abandoned unacknowledged.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
}

/// Sorts a database error from one statement into retry, permanent or unavailable, keeping
/// PostgreSQL's message and detail (which names the table, constraint and key).
pub fn classify_statement(error: sqlx::Error) -> StatementError {
    let class = sql_class(&error);
    if let Class::Outage(_) = class {
        return StatementError::Unavailable(error);
    }
    let sqlx::Error::Database(db) = &error else {
        return StatementError::Retry(format!("{error}"));
    };
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let detail = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|e| e.detail())
        .map(|d| format!(" ({d})"))
        .unwrap_or_default();
    let message = crate::text::sanitize(format!("{}{detail} [SQLSTATE {code}]", db.message()));
    if schema_changed(&error) {
        return StatementError::Retry(format!("the schema changed under the command: {message}"));
    }
    match class {
        Class::Permanent => StatementError::Permanent(message),
        _ => StatementError::Retry(message),
    }
}

/// A dependency found not answering (a failed probe), whatever the error it gave: an outage even
/// if its cause is not one [`classify`] would recognise.
#[derive(Debug, thiserror::Error)]
#[error("{name} does not answer: {detail}", name = .0.name(), detail = .1)]
pub struct Unreachable(pub Dependency, pub String);

/// A batch's work got no answer for the deadline, long after the server would have cancelled any
/// one statement: the connection is lost without an error (half-open). An outage.
#[derive(Debug, thiserror::Error)]
#[error(
    "PostgreSQL gave no answer to the batch's work for {0:?}; the connection is presumed lost and nothing was acknowledged"
)]
pub struct Unanswered(pub Duration);

/// A transaction failed on contention with other transactions (a lock wait past `lock_timeout`,
/// a deadlock, a serialisation failure at COMMIT), not on anything its entries hold: retried,
/// never dead-lettered as an entry's fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Contention(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(code: &str) -> redis::RedisError {
        redis::make_extension_error(code.to_string(), Some("from the server".to_string()))
    }

    #[test]
    fn a_refused_or_dropped_connection_is_an_outage_of_its_dependency() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let database = anyhow::Error::new(sqlx::Error::Io(io)).context("cannot begin");
        assert_eq!(classify(&database), Class::Outage(Dependency::Database));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let redis = anyhow::Error::new(redis::RedisError::from(io)).context("XREADGROUP failed");
        assert_eq!(classify(&redis), Class::Outage(Dependency::Redis));
        assert_eq!(outage(&redis), Some(Dependency::Redis));
    }

    #[test]
    fn a_probe_verdict_and_a_silent_connection_are_outages_whatever_caused_them() {
        let probed = anyhow::anyhow!("something odd")
            .context(Unreachable(Dependency::Database, "no answer".into()));
        assert_eq!(classify(&probed), Class::Outage(Dependency::Database));
        let silent = anyhow::Error::new(Unanswered(Duration::from_secs(130)));
        assert_eq!(classify(&silent), Class::Outage(Dependency::Database));
    }

    #[test]
    fn nogroup_is_a_lost_group_and_a_refused_command_is_not_an_outage() {
        let lost = anyhow::Error::new(server_error("NOGROUP")).context("XREADGROUP failed");
        assert_eq!(classify(&lost), Class::LostGroup);
        let refused = anyhow::Error::new(server_error("WRONGTYPE"));
        assert_eq!(classify(&refused), Class::Permanent);
        assert_eq!(outage(&refused), None);
    }

    #[test]
    fn a_cluster_between_topologies_is_an_outage_of_redis() {
        for code in ["CLUSTERDOWN", "TRYAGAIN", "MOVED"] {
            let error = anyhow::Error::new(server_error(code)).context("XADD failed");
            assert_eq!(classify(&error), Class::Outage(Dependency::Redis), "{code}");
        }
    }

    #[test]
    fn contention_is_retryable_and_an_unknown_error_is_the_works_own() {
        let contention = anyhow::Error::new(Contention("lock timeout".into())).context("commit");
        assert_eq!(classify(&contention), Class::Retryable);
        assert_eq!(classify(&anyhow::anyhow!("who knows")), Class::Permanent);
    }

    #[test]
    fn only_a_timed_out_pool_wait_is_a_busy_pool() {
        let busy = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("cannot begin");
        assert!(pool_busy(&busy));
        assert_eq!(classify(&busy), Class::Outage(Dependency::Database));
        let closed = anyhow::Error::new(sqlx::Error::PoolClosed);
        assert!(!pool_busy(&closed));
    }

    #[test]
    fn a_statement_error_off_the_wire_keeps_its_class() {
        assert!(matches!(
            classify_statement(sqlx::Error::PoolClosed),
            StatementError::Unavailable(_)
        ));
        assert!(matches!(
            classify_statement(sqlx::Error::RowNotFound),
            StatementError::Retry(_)
        ));
    }
}
