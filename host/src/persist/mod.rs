//! Everything the host does with PostgreSQL.
//!
//! - [`answers`]: when PostgreSQL last answered a batch's work (the response deadline counts from
//!   there);
//! - [`schema`]: the live catalogue of tables, columns and unique keys that commands are checked
//!   against;
//! - [`validate`]: turns a plugin's commands into checked statements, or rejects them naming
//!   plugin, table and column;
//! - [`plan`]: gathers the statements of a whole batch into a few set-based stages, equal in
//!   effect to running the entries one by one;
//! - [`batch`]: runs a plan as one statement per stage and column shape, rows passed as arrays;
//! - [`execute`]: runs single checked statements (parameterised SQL, identifiers from the
//!   catalogue) — the per-entry fallback when a set-based statement fails;
//! - [`ledger`]: the processed-entry ledger, which makes redelivery harmless;
//! - [`operator_migrations`]: the operator's own SQL migrations, for plugins' new tables;
//! - [`outbox`]: the transactional outbox, which makes publishing after commit safe, and its relay;
//! - [`plugin_store`]: the fleet's deployed plugins;
//! - [`rollouts`]: the fleet's rollouts of candidate versions, their tallies and differences.

pub mod answers;
pub mod batch;
pub mod changes;
pub mod execute;
pub mod ledger;
mod merged_upsert;
pub mod operator_migrations;
pub mod outbox;
pub mod plan;
pub mod plugin_store;
pub mod reprocess_runs;
pub mod rollouts;
pub mod schema;
mod statement_arrays;
pub mod validate;

use crate::config::DatabaseTimeouts;
use crate::text::redact;
use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The session options that carry `timeouts` to every connection the host opens.
fn session_options(timeouts: &DatabaseTimeouts) -> [(&'static str, String); 6] {
    [
        (
            "statement_timeout",
            timeouts.statement.as_millis().to_string(),
        ),
        ("lock_timeout", timeouts.lock.as_millis().to_string()),
        (
            "idle_in_transaction_session_timeout",
            timeouts.idle_in_transaction.as_millis().to_string(),
        ),
        (
            "tcp_keepalives_idle",
            timeouts.keepalive_idle.as_secs().max(1).to_string(),
        ),
        ("tcp_keepalives_interval", "10".to_string()),
        ("tcp_keepalives_count", "3".to_string()),
    ]
}

/// Connects to the database of `url`, creating the database first if it does not exist (so a
/// fresh machine needs no manual set-up). Every session gets `timeouts`.
pub async fn connect(
    url: &str,
    max_connections: u32,
    timeouts: &DatabaseTimeouts,
) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url).map_err(|error| {
        anyhow::anyhow!(
            "DATABASE_URL {} is not a valid PostgreSQL URL: {}",
            redact(url),
            redact(&error.to_string())
        )
    })?;
    ensure_database(&options).await?;
    // Batches wait for each other's table locks by design; sqlx would log each wait over a
    // second as a "slow statement" warning. Statement timing lives in the metrics instead.
    let options = options
        .disable_statement_logging()
        .options(session_options(timeouts));
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))
}

/// One connection of its own for the health probe, made on first use: the delivery path's pool
/// may be busy (every connection held by batches), which says nothing about whether PostgreSQL
/// answers. `None` for a URL that does not parse (the caller then probes through its pool).
pub fn probe_pool(url: &str, timeouts: &DatabaseTimeouts, wait: Duration) -> Option<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .ok()?
        .disable_statement_logging()
        .options(session_options(timeouts));
    Some(
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(wait)
            .connect_lazy_with(options),
    )
}

/// A small pool on an existing database, for tools that only read (`kaleidoscope status`):
/// never creates the database, and gives up within seconds so the tool can carry on without it.
pub async fn connect_existing(url: &str, timeouts: &DatabaseTimeouts) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|error| {
            anyhow::anyhow!(
                "DATABASE_URL {} is not a valid PostgreSQL URL: {}",
                redact(url),
                redact(&error.to_string())
            )
        })?
        .disable_statement_logging()
        .options(session_options(timeouts));
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))
}

/// `url` with its database name replaced (the demo and the bench derive their own database from
/// `DATABASE_URL` this way, keeping host, user and parameters).
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// Applies the embedded migrations.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("cannot apply database migrations")
}

/// Drops the database of `url` (if it exists) so the next [`connect`] creates it afresh. For the
/// demo and the bench, which start from nothing every time: refuses a database whose name does
/// not contain `guard` (`"demo"`, `"bench"`), so a mistyped URL can never drop real data.
pub async fn drop_database(url: &str, guard: &str) -> Result<()> {
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("invalid {guard} database URL {:?}", redact(url)))?;
    let name = options.get_database().unwrap_or_default().to_string();
    if !name.contains(guard) {
        anyhow::bail!(
            "refusing to drop and recreate database {name:?}: the {guard} database's name must contain \"{guard}\""
        );
    }
    let mut admin = options
        .database("postgres")
        .disable_statement_logging()
        .connect()
        .await
        .with_context(|| {
            format!("cannot connect to PostgreSQL to recreate the {guard} database")
        })?;
    // Audited: the name is quoted as an identifier.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    )))
    .execute(&mut admin)
    .await
    .with_context(|| format!("cannot drop the {guard} database {name:?}"))?;
    let _ = admin.close().await;
    Ok(())
}

async fn ensure_database(options: &PgConnectOptions) -> Result<()> {
    let Some(name) = options.get_database().map(str::to_string) else {
        return Ok(());
    };
    match options.connect().await {
        Ok(connection) => {
            let _ = connection.close().await;
            Ok(())
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("3D000") => {
            let mut admin = options
                .clone()
                .database("postgres")
                .connect()
                .await
                .with_context(|| {
                    format!("database {name:?} does not exist, and connecting to database \"postgres\" to create it failed")
                })?;
            let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            match // Audited: the name is quoted as an identifier.
            sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut admin).await {
                Ok(_) => tracing::info!(database = %name, "created database"),
                // Another host created it meanwhile.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => return Err(e).with_context(|| format!("cannot create database {name:?}")),
            }
            let _ = admin.close().await;
            Ok(())
        }
        Err(error) => Err(error).with_context(|| {
            format!(
                "cannot connect to PostgreSQL database {name:?} at {}:{}",
                options.get_host(),
                options.get_port()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_replaces_only_the_database_name() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/app?sslmode=disable", "demo"),
            "postgres://u:p@h:5432/demo?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "demo"), "postgres://h/demo");
        assert_eq!(with_database("postgres://h/", "demo"), "postgres://h/demo");
    }
}
