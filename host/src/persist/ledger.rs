//! The processed-entry ledger and the transactional outbox.
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
//! The outbox is what makes publishing after commit safe: messages (plugin `emit`s and dead
//! letters) are rows written in the entry's transaction and sent to Redis afterwards, then
//! deleted. A crash in between leaves the rows for [`claim_stale`] to publish.

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

/// A message waiting in the outbox.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    pub id: i64,
    /// The Redis key of the target stream (prefix applied).
    pub stream_key: String,
    pub fields: Vec<(String, String)>,
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

/// Writes many messages to the outbox in one statement, in the caller's transaction; returns
/// them with their ids, in the order given.
pub async fn enqueue_all(
    conn: &mut PgConnection,
    messages: Vec<(String, Vec<(String, String)>)>,
) -> Result<Vec<OutboxMessage>, sqlx::Error> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let streams: Vec<&str> = messages.iter().map(|(s, _)| s.as_str()).collect();
    let fields: Vec<String> = messages
        .iter()
        .map(|(_, f)| serde_json::to_string(f).unwrap_or_else(|_| "[]".into()))
        .collect();
    let mut ids: Vec<(i64,)> = sqlx::query_as(
        "INSERT INTO outbox (stream, fields)
         SELECT u.stream, CAST(u.fields AS json)
           FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(stream, fields, n)
          ORDER BY u.n
         RETURNING id",
    )
    .bind(streams)
    .bind(fields)
    .fetch_all(conn)
    .await?;
    // Ids come from one sequence in insertion order, so sorted ids follow the order given.
    ids.sort_unstable();
    Ok(ids
        .into_iter()
        .zip(messages)
        .map(|((id,), (stream_key, fields))| OutboxMessage {
            id,
            stream_key,
            fields,
        })
        .collect())
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

/// Writes a message to the outbox in the caller's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    stream_key: &str,
    fields: Vec<(String, String)>,
) -> Result<OutboxMessage, sqlx::Error> {
    let json = serde_json::to_string(&fields).unwrap_or_else(|_| "[]".into());
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO outbox (stream, fields) VALUES ($1, CAST($2 AS json)) RETURNING id",
    )
    .bind(stream_key)
    .bind(json)
    .fetch_one(conn)
    .await?;
    Ok(OutboxMessage {
        id,
        stream_key: stream_key.to_string(),
        fields,
    })
}

/// Removes published messages.
pub async fn remove<'c, E: sqlx::PgExecutor<'c>>(executor: E, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(executor)
        .await
        .context("cannot delete published outbox messages")?;
    Ok(())
}

/// Messages older than `age` (left behind by a crash or a failed publish), locked for this
/// transaction so two hosts do not publish the same rows at once.
pub async fn claim_stale(
    conn: &mut PgConnection,
    age: Duration,
    limit: i64,
) -> Result<Vec<OutboxMessage>> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, stream, fields::text FROM outbox
          WHERE created_at < now() - make_interval(secs => $1)
          ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(age.as_secs_f64())
    .bind(limit)
    .fetch_all(conn)
    .await
    .context("cannot read the outbox")?;
    Ok(to_messages(rows))
}

/// The outbox messages with these ids (those of a committed transaction).
pub async fn fetch(pool: &PgPool, ids: &[i64]) -> Result<Vec<OutboxMessage>> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, stream, fields::text FROM outbox WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .context("cannot read the outbox")?;
    Ok(to_messages(rows))
}

fn to_messages(rows: Vec<(i64, String, String)>) -> Vec<OutboxMessage> {
    rows.into_iter()
        .map(|(id, stream_key, fields)| OutboxMessage {
            id,
            stream_key,
            fields: serde_json::from_str(&fields).unwrap_or_default(),
        })
        .collect()
}
