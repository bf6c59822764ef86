//! The fleet's plugin store (`plugin_store`): the plugins deployed with `kaleidoscope plugin
//! deploy`, kept in PostgreSQL so that every host of a fleet runs the same builds, whatever its
//! own plugins directory holds, and a host started later gets them at start.
//!
//! A fleet is the hosts of one stream prefix and consumer group ([`fleet`]), the same hosts whose
//! heartbeats a deploy waits for. Each plugin name has one row: deploying replaces it, and a
//! refused deploy puts the previous row back ([`restore`]).

use anyhow::{Context, Result};
use sqlx::PgPool;

/// The PostgreSQL channel a change of the store is announced on (the fleet as the payload), so
/// hosts sync at once rather than at their next periodic round.
pub const CHANGES: &str = "kaleidoscope_plugin_store";

/// Announces a change of `fleet`'s plugins or rollouts (delivered when `executor`'s transaction
/// commits).
pub(super) async fn announce<'c, E: sqlx::PgExecutor<'c>>(executor: E, fleet: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES)
        .bind(fleet)
        .execute(executor)
        .await
        .context("cannot announce the change of the plugin store")?;
    Ok(())
}

/// The fleet a host or tool belongs to: its stream prefix and consumer group, the hosts whose
/// heartbeats a deploy waits for.
pub fn fleet(config: &crate::config::Config) -> String {
    format!("{}{}", config.stream_prefix, config.consumer_group)
}

/// One deployed plugin, without its bytes.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct Stored {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub streams: Vec<String>,
    pub deployed_by: String,
    /// RFC 3339, from the database's clock; tells a redeploy of the same bytes from the deploy
    /// before it (hosts try a refused file again on every deploy).
    pub deployed_at: String,
}

/// A stored plugin with its bytes: what a deploy replaced, to put back when it is refused.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct StoredBuild {
    #[sqlx(flatten)]
    pub plugin: Stored,
    pub bytes: Vec<u8>,
}

const COLUMNS: &str = "name, version, sha256, streams, deployed_by,
    to_char(deployed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS deployed_at";

/// Every plugin deployed to `fleet`, by name.
pub async fn list(pool: &PgPool, fleet: &str) -> Result<Vec<Stored>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM plugin_store WHERE fleet = $1 ORDER BY name"
    )))
    .bind(fleet)
    .fetch_all(pool)
    .await
    .context("cannot read the plugin store")
}

/// The bytes of `name` as deployed now, if it still is with the hash `sha256`.
pub async fn bytes(
    pool: &PgPool,
    fleet: &str,
    name: &str,
    sha256: &str,
) -> Result<Option<Vec<u8>>> {
    sqlx::query_scalar(
        "SELECT bytes FROM plugin_store WHERE fleet = $1 AND name = $2 AND sha256 = $3",
    )
    .bind(fleet)
    .bind(name)
    .bind(sha256)
    .fetch_optional(pool)
    .await
    .with_context(|| format!("cannot read plugin {name:?} from the plugin store"))
}

/// Deploys `plugin` (its `deployed_at` is ignored: the database's clock sets it) with `bytes`,
/// replacing the row of the same name. Returns the row now stored and the one it replaced.
pub async fn put(
    pool: &PgPool,
    fleet: &str,
    plugin: &Stored,
    bytes: &[u8],
) -> Result<(Stored, Option<StoredBuild>)> {
    let context = || format!("cannot deploy plugin {:?} to the plugin store", plugin.name);
    let mut tx = pool.begin().await.with_context(context)?;
    let put = put_in(&mut tx, fleet, plugin, bytes).await?;
    tx.commit().await.with_context(context)?;
    Ok(put)
}

/// [`put`] inside the caller's transaction (a rollout's promotion writes the store and ends the
/// rollout in one).
pub(super) async fn put_in(
    tx: &mut sqlx::PgConnection,
    fleet: &str,
    plugin: &Stored,
    bytes: &[u8],
) -> Result<(Stored, Option<StoredBuild>)> {
    let context = || format!("cannot deploy plugin {:?} to the plugin store", plugin.name);
    let previous: Option<StoredBuild> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS}, bytes FROM plugin_store WHERE fleet = $1 AND name = $2 FOR UPDATE"
    )))
    .bind(fleet)
    .bind(&plugin.name)
    .fetch_optional(&mut *tx)
    .await
    .with_context(context)?;
    let stored: Stored = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO plugin_store (fleet, name, version, sha256, streams, bytes, deployed_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (fleet, name) DO UPDATE SET version = EXCLUDED.version,
             sha256 = EXCLUDED.sha256, streams = EXCLUDED.streams, bytes = EXCLUDED.bytes,
             deployed_by = EXCLUDED.deployed_by, deployed_at = clock_timestamp()
         RETURNING {COLUMNS}"
    )))
    .bind(fleet)
    .bind(&plugin.name)
    .bind(&plugin.version)
    .bind(&plugin.sha256)
    .bind(&plugin.streams)
    .bind(bytes)
    .bind(&plugin.deployed_by)
    .fetch_one(&mut *tx)
    .await
    .with_context(context)?;
    announce(&mut *tx, fleet).await?;
    Ok((stored, previous))
}

/// Undoes the deploy that stored `deployed`: puts `previous` back (or removes the plugin when
/// there was none) — unless another deploy has replaced `deployed` since, which then stands.
/// Returns whether anything was undone.
pub async fn restore(
    pool: &PgPool,
    fleet: &str,
    deployed: &Stored,
    previous: Option<&StoredBuild>,
) -> Result<bool> {
    let context = || format!("cannot undo the deploy of plugin {:?}", deployed.name);
    let same_deploy = "fleet = $1 AND name = $2 AND sha256 = $3
        AND deployed_at = $4::timestamptz";
    let done = match previous {
        None => sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM plugin_store WHERE {same_deploy}"
        )))
        .bind(fleet)
        .bind(&deployed.name)
        .bind(&deployed.sha256)
        .bind(&deployed.deployed_at)
        .execute(pool)
        .await
        .with_context(context)?,
        Some(previous) => sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE plugin_store SET version = $5, sha256 = $6, streams = $7, bytes = $8,
                    deployed_by = $9, deployed_at = clock_timestamp()
              WHERE {same_deploy}"
        )))
        .bind(fleet)
        .bind(&deployed.name)
        .bind(&deployed.sha256)
        .bind(&deployed.deployed_at)
        .bind(&previous.plugin.version)
        .bind(&previous.plugin.sha256)
        .bind(&previous.plugin.streams)
        .bind(&previous.bytes)
        .bind(&previous.plugin.deployed_by)
        .execute(pool)
        .await
        .with_context(context)?,
    };
    announce(pool, fleet).await?;
    Ok(done.rows_affected() == 1)
}

/// Removes `name` from the fleet's store. Returns whether it was there.
pub async fn remove(pool: &PgPool, fleet: &str, name: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM plugin_store WHERE fleet = $1 AND name = $2")
        .bind(fleet)
        .bind(name)
        .execute(pool)
        .await
        .with_context(|| format!("cannot remove plugin {name:?} from the plugin store"))?;
    announce(pool, fleet).await?;
    Ok(done.rows_affected() == 1)
}
