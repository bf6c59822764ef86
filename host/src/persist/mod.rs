//! Everything the host does with PostgreSQL.
//!
//! - [`schema`]: the live catalogue of tables, columns and unique keys that commands are checked
//!   against;
//! - [`validate`]: turns a plugin's commands into checked statements, or rejects them naming
//!   plugin, table and column;
//! - [`plan`]: gathers the statements of a whole batch into a few set-based stages, equal in
//!   effect to running the entries one by one;
//! - [`batch`]: runs a plan as one statement per stage and column shape, rows passed as arrays;
//! - [`execute`]: runs single checked statements (parameterised SQL, identifiers from the
//!   catalogue) — the per-entry fallback when a set-based statement fails;
//! - [`ledger`]: the processed-entry ledger and the transactional outbox.

pub mod batch;
pub mod execute;
pub mod ledger;
pub mod plan;
pub mod schema;
pub mod validate;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects to the database of `url`, creating the database first if it does not exist (so a
/// fresh machine needs no manual set-up).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("DATABASE_URL {url:?} is not a valid PostgreSQL URL"))?;
    ensure_database(&options).await?;
    // Batches wait for each other's table locks by design; sqlx would log each wait over a
    // second as a "slow statement" warning. Statement timing lives in the metrics instead.
    let options = options.disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))
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
        .with_context(|| format!("invalid {guard} database URL {url:?}"))?;
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

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
