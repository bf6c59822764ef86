//! Rollouts in PostgreSQL (`rollouts`, `rollout_tallies`, `rollout_differences`): the plan every
//! host of a fleet follows (which candidate build of which plugin runs beside the live one, how,
//! on what share of the entries, and when to give up on it), what the hosts finished under it,
//! and a sample of the differences a shadow found.
//!
//! Every change of a plan raises its `revision` and is announced on the plugin store's channel
//! ([`super::plugin_store::CHANGES`]), so hosts follow at once, and a tool can wait until every
//! host reports that very revision. What a rollout *means* is [`crate::rollout`]'s.

use super::plugin_store::{self, Stored};
use anyhow::{Context, Result, bail};
use sqlx::{PgConnection, PgPool};

/// One rollout as stored, without the candidate's bytes.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct RolloutRow {
    pub id: i64,
    pub plugin: String,
    pub live_version: String,
    pub live_sha256: String,
    pub candidate_version: String,
    pub candidate_sha256: String,
    pub candidate_streams: Vec<String>,
    /// `shadow` or `canary`.
    pub mode: String,
    pub percent: f64,
    pub key_field: Option<String>,
    pub max_failure_points: f64,
    pub window_entries: i32,
    pub max_latency_factor: f64,
    pub max_difference_percent: Option<f64>,
    /// `running`, `promoted`, `aborted` or `rolled-back`.
    pub state: String,
    pub reason: Option<String>,
    pub revision: i32,
    pub started_by: String,
    /// RFC 3339, from the database's clock.
    pub started_at: String,
    pub updated_at: String,
}

impl RolloutRow {
    /// The rollout in one line: `rollout 3 of faces: 1.2.0 → 1.3.0 (build …), canary on 25% by
    /// mediaId`.
    pub fn summary(&self) -> String {
        format!(
            "rollout {} of {}: {} → {} (build {}), {} on {}% by {}",
            self.id,
            self.plugin,
            self.live_version,
            self.candidate_version,
            crate::plugin::build_of(&self.candidate_sha256),
            self.mode,
            self.percent,
            self.key_field.as_deref().unwrap_or("entry id")
        )
    }

    /// Why a change that needs the plugin without a running rollout was refused (`what` says
    /// what did not happen), and what to do.
    pub fn in_the_way(&self, what: &str) -> String {
        format!(
            "rollout {} of {} ({} → {}, {}) is running; {what} (`kaleidoscope rollout promote {}` or `rollout abort {}` first)",
            self.id,
            self.plugin,
            self.live_version,
            self.candidate_version,
            self.mode,
            self.plugin,
            self.plugin
        )
    }
}

const COLUMNS: &str = "id, plugin, live_version, live_sha256, candidate_version, candidate_sha256,
    candidate_streams, mode, percent, key_field, max_failure_points, window_entries,
    max_latency_factor, max_difference_percent, state, reason, revision, started_by,
    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS started_at,
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS updated_at";

/// A rollout to start: the row's fields a starter chooses (the rest the database sets).
#[derive(Clone, Debug)]
pub struct NewRollout {
    pub plugin: String,
    pub live_version: String,
    pub live_sha256: String,
    pub candidate_version: String,
    pub candidate_sha256: String,
    pub candidate_streams: Vec<String>,
    pub mode: String,
    pub percent: f64,
    pub key_field: Option<String>,
    pub max_failure_points: f64,
    pub window_entries: i32,
    pub max_latency_factor: f64,
    pub max_difference_percent: Option<f64>,
    pub started_by: String,
}

/// The running rollouts of `fleet`, by plugin.
pub async fn running(pool: &PgPool, fleet: &str) -> Result<Vec<RolloutRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rollouts WHERE fleet = $1 AND state = 'running' ORDER BY plugin"
    )))
    .bind(fleet)
    .fetch_all(pool)
    .await
    .context("cannot read the rollouts")
}

/// The latest rollout of each plugin of `fleet` (running or finished), or of `plugin` only.
pub async fn latest(pool: &PgPool, fleet: &str, plugin: Option<&str>) -> Result<Vec<RolloutRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT ON (plugin) {COLUMNS} FROM rollouts
          WHERE fleet = $1 AND ($2::text IS NULL OR plugin = $2)
          ORDER BY plugin, id DESC"
    )))
    .bind(fleet)
    .bind(plugin)
    .fetch_all(pool)
    .await
    .context("cannot read the rollouts")
}

/// The candidate's bytes of rollout `id`.
pub async fn candidate_bytes(pool: &PgPool, id: i64) -> Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT candidate_bytes FROM rollouts WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("cannot read the candidate of rollout {id}"))
}

/// The newest candidate of `plugin` in `fleet` whose version (or build, a prefix of its hash)
/// is `version`: `(version, sha256, bytes)`. A rolled-back candidate stays here, which is how a
/// reprocessing run can name the version that wrote what it repairs, or one never promoted.
pub async fn candidate_build(
    pool: &PgPool,
    fleet: &str,
    plugin: &str,
    version: &str,
) -> Result<Option<(String, String, Vec<u8>)>> {
    sqlx::query_as(
        "SELECT candidate_version, candidate_sha256, candidate_bytes FROM rollouts
          WHERE fleet = $1 AND plugin = $2
            AND (candidate_version = $3 OR (length($3) >= 6 AND candidate_sha256 LIKE $3 || '%'))
          ORDER BY id DESC LIMIT 1",
    )
    .bind(fleet)
    .bind(plugin)
    .bind(version)
    .fetch_optional(pool)
    .await
    .with_context(|| format!("cannot read the rollouts of {plugin}"))
}

/// Starts a rollout in `fleet`; refused while another rollout of the plugin runs.
pub async fn start(
    pool: &PgPool,
    fleet: &str,
    new: &NewRollout,
    bytes: &[u8],
) -> Result<RolloutRow> {
    let mut tx = pool.begin().await.context("cannot start the rollout")?;
    if let Some(running) = running_of(&mut tx, fleet, &new.plugin).await? {
        bail!("{}", running.in_the_way("no other rollout was started"));
    }
    let row: RolloutRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO rollouts (fleet, plugin, live_version, live_sha256, candidate_version,
             candidate_sha256, candidate_streams, candidate_bytes, mode, percent, key_field,
             max_failure_points, window_entries, max_latency_factor, max_difference_percent,
             started_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         RETURNING {COLUMNS}"
    )))
    .bind(fleet)
    .bind(&new.plugin)
    .bind(&new.live_version)
    .bind(&new.live_sha256)
    .bind(&new.candidate_version)
    .bind(&new.candidate_sha256)
    .bind(&new.candidate_streams)
    .bind(bytes)
    .bind(&new.mode)
    .bind(new.percent)
    .bind(&new.key_field)
    .bind(new.max_failure_points)
    .bind(new.window_entries)
    .bind(new.max_latency_factor)
    .bind(new.max_difference_percent)
    .bind(&new.started_by)
    .fetch_one(&mut *tx)
    .await
    .context("cannot start the rollout")?;
    plugin_store::announce(&mut *tx, fleet).await?;
    tx.commit().await.context("cannot start the rollout")?;
    Ok(row)
}

/// The running rollout of `plugin`, locked for a change.
async fn running_of(
    tx: &mut PgConnection,
    fleet: &str,
    plugin: &str,
) -> Result<Option<RolloutRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rollouts WHERE fleet = $1 AND plugin = $2 AND state = 'running'
         FOR UPDATE"
    )))
    .bind(fleet)
    .bind(plugin)
    .fetch_optional(&mut *tx)
    .await
    .with_context(|| format!("cannot read the rollout of {plugin}"))
}

/// The running rollout of `plugin` in `fleet`, or an error saying there is none.
async fn require_running(tx: &mut PgConnection, fleet: &str, plugin: &str) -> Result<RolloutRow> {
    match running_of(tx, fleet, plugin).await? {
        Some(row) => Ok(row),
        None => bail!("no rollout of {plugin:?} is running in fleet {fleet:?}"),
    }
}

/// Sets the share of the running rollout of `plugin` (and its mode, when given).
pub async fn set(
    pool: &PgPool,
    fleet: &str,
    plugin: &str,
    mode: Option<&str>,
    percent: f64,
) -> Result<RolloutRow> {
    let mut tx = pool.begin().await.context("cannot change the rollout")?;
    let running = require_running(&mut tx, fleet, plugin).await?;
    let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE rollouts SET percent = $2, mode = COALESCE($3, mode), revision = revision + 1,
                updated_at = clock_timestamp()
          WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(running.id)
    .bind(percent)
    .bind(mode)
    .fetch_one(&mut *tx)
    .await
    .context("cannot change the rollout")?;
    plugin_store::announce(&mut *tx, fleet).await?;
    tx.commit().await.context("cannot change the rollout")?;
    Ok(row)
}

/// Ends rollout `id` as `state` (`aborted` or `rolled-back`) for `reason`, if it still runs.
/// Returns the row as it is now (`None`: no such rollout).
pub async fn finish(
    pool: &PgPool,
    fleet: &str,
    id: i64,
    state: &str,
    reason: &str,
) -> Result<Option<(RolloutRow, bool)>> {
    let mut tx = pool.begin().await.context("cannot end the rollout")?;
    let ended: Option<RolloutRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE rollouts SET state = $2, reason = $3, revision = revision + 1,
                updated_at = clock_timestamp()
          WHERE id = $1 AND state = 'running' RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(state)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await
    .context("cannot end the rollout")?;
    let row = match ended {
        Some(row) => {
            plugin_store::announce(&mut *tx, fleet).await?;
            Some((row, true))
        }
        None => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM rollouts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .context("cannot read the rollout")?
        .map(|row| (row, false)),
    };
    tx.commit().await.context("cannot end the rollout")?;
    Ok(row)
}

/// Makes the candidate of `plugin`'s running rollout the live build of the fleet: in one
/// transaction, the plugin store gets the candidate and the rollout ends as `promoted`, so every
/// host moves from the rollout to the promoted build on one announcement.
pub async fn promote(
    pool: &PgPool,
    fleet: &str,
    plugin: &str,
    deployed_by: &str,
) -> Result<(RolloutRow, Stored)> {
    let context = || format!("cannot promote the candidate of {plugin}");
    let mut tx = pool.begin().await.with_context(context)?;
    let running = require_running(&mut tx, fleet, plugin).await?;
    let bytes: Vec<u8> = sqlx::query_scalar("SELECT candidate_bytes FROM rollouts WHERE id = $1")
        .bind(running.id)
        .fetch_one(&mut *tx)
        .await
        .with_context(context)?;
    let candidate = Stored {
        name: running.plugin.clone(),
        version: running.candidate_version.clone(),
        sha256: running.candidate_sha256.clone(),
        streams: running.candidate_streams.clone(),
        deployed_by: deployed_by.to_string(),
        deployed_at: String::new(),
    };
    let (stored, _) = plugin_store::put_in(&mut tx, fleet, &candidate, &bytes).await?;
    let row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE rollouts SET state = 'promoted', reason = $2, revision = revision + 1,
                updated_at = clock_timestamp()
          WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(running.id)
    .bind(format!("promoted by {deployed_by}"))
    .fetch_one(&mut *tx)
    .await
    .with_context(context)?;
    tx.commit().await.with_context(context)?;
    Ok((row, stored))
}

/// One count of a rollout's tally: what one host finished, by role and outcome.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct Tally {
    pub rollout_id: i64,
    pub host: String,
    pub role: String,
    pub outcome: String,
    pub entries: i64,
}

/// How many counter rows a host spreads its tally over (see the migration).
const SHARDS: u64 = 16;

/// The tally shard of the next batch: consecutive batches take different ones, so the batches a
/// host has in flight never wait on one counter row.
pub fn next_shard() -> i16 {
    static BATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    (BATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS) as i16
}

/// Adds `counts` (role, outcome, entries) to `host`'s tally of rollout `id`, in the caller's
/// transaction (the one that finishes the entries counted).
pub async fn add_tallies(
    conn: &mut PgConnection,
    id: i64,
    host: &str,
    counts: &[(&str, &str, i64)],
) -> Result<(), sqlx::Error> {
    let roles: Vec<&str> = counts.iter().map(|(role, _, _)| *role).collect();
    let outcomes: Vec<&str> = counts.iter().map(|(_, outcome, _)| *outcome).collect();
    let entries: Vec<i64> = counts.iter().map(|(_, _, n)| *n).collect();
    let done = sqlx::query(
        "INSERT INTO rollout_tallies (rollout_id, host, shard, role, outcome, entries)
         SELECT $1, $2, $6, u.role, u.outcome, u.entries
           FROM unnest($3::text[], $4::text[], $5::bigint[]) AS u(role, outcome, entries)
          ORDER BY u.role, u.outcome
         ON CONFLICT (rollout_id, host, shard, role, outcome)
         DO UPDATE SET entries = rollout_tallies.entries + EXCLUDED.entries",
    )
    .bind(id)
    .bind(host)
    .bind(roles)
    .bind(outcomes)
    .bind(entries)
    .bind(next_shard())
    .execute(conn)
    .await;
    super::answers::answered();
    done.map(drop)
}

/// Every host's tally of the rollouts `ids`.
pub async fn tallies(pool: &PgPool, ids: &[i64]) -> Result<Vec<Tally>> {
    sqlx::query_as(
        "SELECT rollout_id, host, role, outcome, sum(entries)::bigint AS entries
           FROM rollout_tallies WHERE rollout_id = ANY($1)
          GROUP BY rollout_id, host, role, outcome ORDER BY rollout_id, host, role, outcome",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .context("cannot read the rollouts' tallies")
}

/// One entry whose outcomes differed in a shadow.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct Difference {
    pub stream: String,
    pub entry_id: String,
    pub verdict: String,
    pub live: serde_json::Value,
    pub candidate: serde_json::Value,
    pub host: String,
}

/// Keeps `differences` in rollout `id`'s sample while it holds fewer than `limit`, in the caller's
/// transaction. (Two hosts adding at once may take it a little past `limit`; bounded all the
/// same.)
pub async fn sample_differences(
    conn: &mut PgConnection,
    id: i64,
    host: &str,
    limit: i64,
    differences: &[Difference],
) -> Result<(), sqlx::Error> {
    let column =
        |f: &dyn Fn(&Difference) -> String| -> Vec<String> { differences.iter().map(f).collect() };
    let done = sqlx::query(
        "INSERT INTO rollout_differences (rollout_id, stream, entry_id, verdict, live, candidate, host)
         SELECT $1, u.stream, u.entry_id, u.verdict, u.live::jsonb, u.candidate::jsonb, $2
           FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                WITH ORDINALITY AS u(stream, entry_id, verdict, live, candidate, n)
          WHERE u.n <= $8 - (SELECT count(*) FROM rollout_differences WHERE rollout_id = $1)
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(host)
    .bind(column(&|d| d.stream.clone()))
    .bind(column(&|d| d.entry_id.clone()))
    .bind(column(&|d| d.verdict.clone()))
    .bind(column(&|d| d.live.to_string()))
    .bind(column(&|d| d.candidate.to_string()))
    .bind(limit)
    .execute(conn)
    .await;
    super::answers::answered();
    done.map(drop)
}

/// The sampled differences of rollout `id`, oldest first.
pub async fn differences(pool: &PgPool, id: i64, limit: i64) -> Result<Vec<Difference>> {
    sqlx::query_as(
        "SELECT stream, entry_id, verdict, live, candidate, host FROM rollout_differences
          WHERE rollout_id = $1 ORDER BY recorded_at, stream, entry_id LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("cannot read the rollout's differences")
}

/// What the ledger says each build of `plugin` finished since rollout `row` started: (build,
/// outcome, entries). The ledger records the build that handled every entry; this is that record
/// read per rollout.
pub async fn ledger_counts(pool: &PgPool, row: &RolloutRow) -> Result<Vec<(String, String, i64)>> {
    sqlx::query_as(
        "SELECT coalesce(plugin_build, ''), outcome, count(*) FROM processed_entries
          WHERE plugin = $1 AND processed_at >= $2::timestamptz
            AND plugin_build IN ($3, $4)
          GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(&row.plugin)
    .bind(&row.started_at)
    .bind(crate::plugin::build_of(&row.live_sha256))
    .bind(crate::plugin::build_of(&row.candidate_sha256))
    .fetch_all(pool)
    .await
    .context("cannot read the ledger's counts for the rollout")
}
