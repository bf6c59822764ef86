//! Reprocessing runs in PostgreSQL (`reprocess_runs`): what a run selected, which build it
//! applies (with the bytes, so a resumed run goes on with the same one), how far it got and what
//! it did. What a run *is* is [`crate::reprocess`]'s.
//!
//! The counts of what a run applied are added in each batch's own transaction ([`tally`]), so
//! they stay exact through crashes and resumes; its position is written after each batch, and
//! can only lag behind (a resume then reads a few entries the run's ledger rows turn into
//! skips).

use anyhow::{Context, Result};
use sqlx::{PgConnection, PgPool};

/// One run as stored, without its plugin's bytes.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub stream: String,
    pub plugin: String,
    pub plugin_version: String,
    pub plugin_sha256: String,
    /// The selection as given (`--from 0`, `--handled-by faces@1.4.0`, …).
    pub selection: String,
    #[serde(skip)]
    pub selection_spec: sqlx::types::Json<serde_json::Value>,
    pub emit: bool,
    pub rate: Option<f64>,
    /// `running`, `interrupted`, `finished`, `cancelled` or `failed`.
    pub state: String,
    pub reason: Option<String>,
    pub position: Option<String>,
    pub selected: i64,
    pub missing: i64,
    pub processed: i64,
    pub dead_lettered: i64,
    pub emits_suppressed: i64,
    pub skipped: i64,
    pub started_by: String,
    /// RFC 3339, from the database's clock.
    pub started_at: String,
    pub updated_at: String,
    /// Seconds since the run last wrote anything: a `running` run that has been silent for long
    /// is a process that died (see [`RunRow::stalled`]).
    pub silent_seconds: f64,
    /// Seconds since the run finished or was cancelled (`None` while not ended).
    pub ended_seconds_ago: Option<f64>,
}

/// The states a run's metrics name (`stalled`: `running`, but silent for
/// [`STALLED_AFTER_SECONDS`]).
pub const STATES: [&str; 6] = [
    "running",
    "stalled",
    "interrupted",
    "failed",
    "finished",
    "cancelled",
];

/// A `running` run silent for this long has lost its process (a run writes its position after
/// every batch, at most seconds apart).
pub const STALLED_AFTER_SECONDS: f64 = 60.0;

impl RunRow {
    /// Entries the run has finished (applied, dead-lettered, or found applied by itself before).
    pub fn done(&self) -> i64 {
        self.processed + self.dead_lettered + self.skipped
    }

    /// Whether the run says it is running but its process has stopped writing (killed).
    pub fn stalled(&self) -> bool {
        self.state == "running" && self.silent_seconds > STALLED_AFTER_SECONDS
    }

    /// Whether `reprocess --resume` can take the run up again: one that stopped before its end,
    /// or a finished one (read again from its start under its own identity, it applies nothing
    /// twice). A cancelled run stays cancelled.
    pub fn resumable(&self) -> bool {
        matches!(
            self.state.as_str(),
            "running" | "interrupted" | "failed" | "finished"
        )
    }

    /// The run in one line: `run 7 of ml-insights-results: --from 0 through insights 0.2.0
    /// (build …), interrupted at 1700000000000-3: 1200/20000`.
    pub fn summary(&self) -> String {
        let state = if self.stalled() {
            "running, but silent (its process is gone?)".to_string()
        } else {
            self.state.clone()
        };
        format!(
            "run {} of {}: {} through {} {} (build {}), {state}, {}/{} done{}",
            self.id,
            self.stream,
            self.selection,
            self.plugin,
            self.plugin_version,
            crate::plugin::build_of(&self.plugin_sha256),
            self.done(),
            self.selected,
            self.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )
    }
}

/// A run to start.
#[derive(Clone, Debug)]
pub struct NewRun<'a> {
    pub fleet: &'a str,
    pub source: &'a str,
    pub stream: &'a str,
    pub plugin: &'a str,
    pub plugin_version: &'a str,
    pub plugin_sha256: &'a str,
    pub plugin_bytes: &'a [u8],
    pub selection: &'a str,
    pub selection_spec: serde_json::Value,
    pub emit: bool,
    pub rate: Option<f64>,
    pub started_by: &'a str,
}

const COLUMNS: &str =
    "id, stream, plugin, plugin_version, plugin_sha256, selection, selection_spec,
    emit, rate, state, reason, position, selected, missing, processed, dead_lettered,
    emits_suppressed, skipped, started_by,
    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS started_at,
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS updated_at,
    extract(epoch FROM clock_timestamp() - updated_at)::float8 AS silent_seconds,
    extract(epoch FROM clock_timestamp() - finished_at)::float8 AS ended_seconds_ago";

/// Records a new run (state `running`).
pub async fn start(pool: &PgPool, run: &NewRun<'_>) -> Result<RunRow> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO reprocess_runs (fleet, source, stream, plugin, plugin_version, plugin_sha256,
            plugin_bytes, selection, selection_spec, emit, rate, started_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         RETURNING {COLUMNS}"
    )))
    .bind(run.fleet)
    .bind(run.source)
    .bind(run.stream)
    .bind(run.plugin)
    .bind(run.plugin_version)
    .bind(run.plugin_sha256)
    .bind(run.plugin_bytes)
    .bind(run.selection)
    .bind(sqlx::types::Json(&run.selection_spec))
    .bind(run.emit)
    .bind(run.rate)
    .bind(run.started_by)
    .fetch_one(pool)
    .await
    .context("cannot record the reprocessing run")
}

/// Run `id` of `fleet`.
pub async fn get(pool: &PgPool, fleet: &str, id: i64) -> Result<Option<RunRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM reprocess_runs WHERE fleet = $1 AND id = $2"
    )))
    .bind(fleet)
    .bind(id)
    .fetch_optional(pool)
    .await
    .with_context(|| format!("cannot read reprocessing run {id}"))
}

/// The bytes of the build run `id` applies.
pub async fn plugin_bytes(pool: &PgPool, id: i64) -> Result<Vec<u8>> {
    sqlx::query_scalar("SELECT plugin_bytes FROM reprocess_runs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .with_context(|| format!("cannot read the plugin of reprocessing run {id}"))
}

/// The runs of `fleet` not ended (running, interrupted or failed: resumable), and those ended
/// within the last `recent_hours`, newest first.
pub async fn recent(pool: &PgPool, fleet: &str, recent_hours: f64) -> Result<Vec<RunRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM reprocess_runs
          WHERE fleet = $1
            AND (state IN ('running', 'interrupted', 'failed')
                 OR updated_at > clock_timestamp() - make_interval(secs => $2))
          ORDER BY id DESC"
    )))
    .bind(fleet)
    .bind(recent_hours * 3600.0)
    .fetch_all(pool)
    .await
    .context("cannot read the reprocessing runs")
}

/// Adds what a batch of run `id` finished, in the batch's transaction: entries applied and
/// dead-lettered, and emits left out.
pub async fn tally(
    conn: &mut PgConnection,
    id: i64,
    processed: i64,
    dead_lettered: i64,
    emits_suppressed: i64,
) -> Result<(), sqlx::Error> {
    let done = sqlx::query(
        "UPDATE reprocess_runs
            SET processed = processed + $2, dead_lettered = dead_lettered + $3,
                emits_suppressed = emits_suppressed + $4, updated_at = clock_timestamp()
          WHERE id = $1",
    )
    .bind(id)
    .bind(processed)
    .bind(dead_lettered)
    .bind(emits_suppressed)
    .execute(conn)
    .await;
    super::answers::answered();
    done.map(drop)
}

/// Moves run `id` past `position` (the last entry of a finished batch), adding `skipped`
/// entries it found applied by itself before and `missing` selected ones the stream no longer
/// had. Returns the run's state now (a `cancel` from another process shows here).
pub async fn advance(
    pool: &PgPool,
    id: i64,
    position: &str,
    skipped: i64,
    missing: i64,
) -> Result<String> {
    sqlx::query_scalar(
        "UPDATE reprocess_runs
            SET position = $2, skipped = skipped + $3, missing = missing + $4,
                updated_at = clock_timestamp()
          WHERE id = $1 RETURNING state",
    )
    .bind(id)
    .bind(position)
    .bind(skipped)
    .bind(missing)
    .fetch_one(pool)
    .await
    .with_context(|| format!("cannot record the progress of reprocessing run {id}"))
}

/// Records how many entries of run `id`'s selection are in the stream, and how many are gone.
pub async fn selected(pool: &PgPool, id: i64, selected: i64, missing: i64) -> Result<()> {
    sqlx::query("UPDATE reprocess_runs SET selected = $2, missing = $3 WHERE id = $1")
        .bind(id)
        .bind(selected)
        .bind(missing)
        .execute(pool)
        .await
        .with_context(|| format!("cannot record the selection of reprocessing run {id}"))?;
    Ok(())
}

/// Sets run `id`'s state (with a reason): `running` again on resume, `interrupted`, `finished`,
/// `cancelled` or `failed`. Returns `false` when the run was not in one of `from`.
pub async fn set_state(
    pool: &PgPool,
    id: i64,
    from: &[&str],
    state: &str,
    reason: Option<&str>,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE reprocess_runs
            SET state = $2, reason = $3, updated_at = clock_timestamp(),
                finished_at = CASE WHEN $2 IN ('finished', 'cancelled') THEN clock_timestamp() END
          WHERE id = $1 AND state = ANY($4)",
    )
    .bind(id)
    .bind(state)
    .bind(reason)
    .bind(from)
    .execute(pool)
    .await
    .with_context(|| format!("cannot set reprocessing run {id} {state}"))?;
    Ok(done.rows_affected() == 1)
}

/// The advisory lock's class for runs (the other int of the pair is the run id): one process
/// applies a run at a time.
const RUN_LOCK_CLASS: i32 = 0x5250_0001;

/// Takes run `id` for this process: a session lock on a connection of its own (out of the pool,
/// so the lock ends with the connection, however the process ends). `None` when another process
/// holds it (the run goes on there).
pub async fn take(pool: &PgPool, id: i64) -> Result<Option<PgConnection>> {
    let mut conn = pool
        .acquire()
        .await
        .context("cannot connect to take the run")?;
    let key = i32::try_from(id).context("run id out of range")?;
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(RUN_LOCK_CLASS)
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .with_context(|| format!("cannot lock reprocessing run {id}"))?;
    Ok(taken.then(|| conn.detach()))
}

/// Adds `more` to run `id`'s missing entries (trimmed from the stream since it was started).
pub async fn advance_missing(pool: &PgPool, id: i64, more: i64) -> Result<()> {
    sqlx::query("UPDATE reprocess_runs SET missing = missing + $2 WHERE id = $1")
        .bind(id)
        .bind(more)
        .execute(pool)
        .await
        .with_context(|| format!("cannot record the missing entries of reprocessing run {id}"))?;
    Ok(())
}
