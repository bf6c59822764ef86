//! The processed-entry ledger.
//!
//! The ledger only has to remember an entry while Redis may deliver it again, that is while it
//! is in its group's pending list (or an operator rewinds the group): [`prune`] removes rows older
//! than the retention setting that no pending entry still needs.
//!
//! The ledger is what makes redelivery harmless: an entry is recorded in the same transaction as
//! its effects, so "effects committed" and "recorded as done" are one fact. An entry found in the
//! ledger is acknowledged without running its commands again; two hosts racing on the same entry
//! serialise on the ledger's primary key and only one of them writes.
//!
//! Its companion, the transactional outbox, is [`super::outbox`].

use anyhow::{Context, Result};
use sqlx::{PgConnection, PgPool};
use std::collections::HashSet;
use std::time::Duration;

/// How an entry was finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its commands committed.
    Processed,
    /// It went to the dead-letter stream.
    DeadLettered,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::DeadLettered => "dead-lettered",
        }
    }
}

/// Records an entry as finished. Returns `false` when it was already recorded (by an earlier
/// delivery or by another host that won the race), in which case the caller must not apply its
/// effects.
pub async fn record(
    conn: &mut PgConnection,
    source: &str,
    stream: &str,
    entry_id: &str,
    plugin: &str,
    plugin_version: &str,
    outcome: Outcome,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO processed_entries (source, stream, entry_id, plugin, plugin_version, outcome)
         VALUES ($6, $1, $2, $3, $4, $5) ON CONFLICT (source, stream, entry_id) DO NOTHING",
    )
    .bind(stream)
    .bind(entry_id)
    .bind(plugin)
    .bind(plugin_version)
    .bind(outcome.as_str())
    .bind(source)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Claims the ledger rows of a whole batch in one statement: `(entry id, outcome)` pairs in, the
/// ids that were newly recorded out. An id not returned was finished before (an earlier delivery,
/// or another host that won the race): its effects must not be applied again. Ids are inserted in
/// sorted order so concurrent batches lock ledger rows in the same order.
pub async fn claim(
    conn: &mut PgConnection,
    source: &str,
    stream: &str,
    plugin: &str,
    plugin_version: &str,
    entries: &[(String, Outcome)],
) -> Result<HashSet<String>, sqlx::Error> {
    if entries.is_empty() {
        return Ok(HashSet::new());
    }
    let mut sorted: Vec<&(String, Outcome)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let ids: Vec<&str> = sorted.iter().map(|(id, _)| id.as_str()).collect();
    let outcomes: Vec<&str> = sorted.iter().map(|(_, o)| o.as_str()).collect();
    let rows: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO processed_entries (source, stream, entry_id, plugin, plugin_version, outcome)
         SELECT $6, $1, u.id, $2, $3, u.outcome
           FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS u(id, outcome, n)
          ORDER BY u.n
         ON CONFLICT (source, stream, entry_id) DO NOTHING
         RETURNING entry_id",
    )
    .bind(stream)
    .bind(plugin)
    .bind(plugin_version)
    .bind(ids)
    .bind(outcomes)
    .bind(source)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// How many ledger rows one pruning statement deletes at most; small, so pruning never holds
/// many locks or competes with the delivery path for long.
pub const PRUNE_CHUNK: i64 = 5_000;

/// Takes over the ledger rows written before rows had a source (an upgrade from a ledger
/// without the column): the first host to start afterwards claims them for its deployment.
/// Returns how many it took.
pub async fn adopt_legacy_rows(pool: &PgPool, source: &str) -> Result<u64> {
    let done = sqlx::query("UPDATE processed_entries SET source = $1 WHERE source = ''")
        .bind(source)
        .execute(pool)
        .await
        .context("cannot adopt the ledger rows written before sources were recorded")?;
    Ok(done.rows_affected())
}

/// The streams the ledger has rows of `source` for. A loose index scan over the primary key: one
/// probe per stream, however many rows there are.
pub async fn streams(pool: &PgPool, source: &str) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "WITH RECURSIVE s(stream) AS (
             (SELECT stream FROM processed_entries WHERE source = $1 ORDER BY stream LIMIT 1)
             UNION ALL
             SELECT (SELECT p.stream FROM processed_entries p
                      WHERE p.source = $1 AND p.stream > s.stream
                      ORDER BY p.stream LIMIT 1)
               FROM s WHERE s.stream IS NOT NULL)
         SELECT stream FROM s WHERE stream IS NOT NULL",
    )
    .bind(source)
    .fetch_all(pool)
    .await
    .context("cannot list the ledger's streams")?;
    Ok(rows.into_iter().map(|(s,)| s).collect())
}

/// Deletes up to [`PRUNE_CHUNK`] ledger rows older than `retention`, except rows of entries that
/// may still be delivered again: `oldest_pending` gives, per stream, the millisecond part of its
/// oldest pending entry id, and no row of that stream at or after it is touched. Returns how many
/// rows went.
pub async fn prune(
    pool: &PgPool,
    source: &str,
    retention: Duration,
    oldest_pending: &[(String, i64)],
) -> Result<u64> {
    let streams: Vec<&str> = oldest_pending.iter().map(|(s, _)| s.as_str()).collect();
    let oldest: Vec<i64> = oldest_pending.iter().map(|(_, ms)| *ms).collect();
    let done = sqlx::query(
        "DELETE FROM processed_entries WHERE ctid = ANY(ARRAY(
             SELECT l.ctid FROM processed_entries l
              WHERE l.source = $5
                AND l.processed_at < now() - make_interval(secs => $1)
                AND NOT EXISTS (
                    SELECT 1 FROM unnest($2::text[], $3::int8[]) AS p(stream, oldest)
                     WHERE p.stream = l.stream
                       AND (l.entry_id !~ '^[0-9]+-[0-9]+'
                            OR split_part(l.entry_id, '-', 1)::int8 >= p.oldest))
              LIMIT $4
              FOR UPDATE SKIP LOCKED))",
    )
    .bind(retention.as_secs_f64())
    .bind(streams)
    .bind(oldest)
    .bind(PRUNE_CHUNK)
    .bind(source)
    .execute(pool)
    .await
    .context("cannot prune the processed-entry ledger")?;
    Ok(done.rows_affected())
}
