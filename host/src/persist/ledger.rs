//! The processed-entry ledger and the transactional outbox.
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

/// The ids among `entry_ids` of `stream` that the ledger already has.
pub async fn already_finished(
    pool: &PgPool,
    stream: &str,
    entry_ids: &[String],
) -> Result<HashSet<String>> {
    if entry_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT entry_id FROM processed_entries WHERE stream = $1 AND entry_id = ANY($2)",
    )
    .bind(stream)
    .bind(entry_ids)
    .fetch_all(pool)
    .await
    .context("cannot read the processed-entry ledger")?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Records an entry as finished. Returns `false` when it was already recorded (by an earlier
/// delivery or by another host that won the race), in which case the caller must not apply its
/// effects.
pub async fn record(
    conn: &mut PgConnection,
    stream: &str,
    entry_id: &str,
    plugin: &str,
    plugin_version: &str,
    outcome: Outcome,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO processed_entries (stream, entry_id, plugin, plugin_version, outcome)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream, entry_id) DO NOTHING",
    )
    .bind(stream)
    .bind(entry_id)
    .bind(plugin)
    .bind(plugin_version)
    .bind(outcome.as_str())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes a message to the outbox in the caller's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    stream_key: &str,
    fields: Vec<(String, String)>,
) -> Result<OutboxMessage, sqlx::Error> {
    let json = serde_json::to_string(&fields).unwrap_or_else(|_| "[]".into());
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO outbox (stream, fields) VALUES ($1, CAST($2 AS jsonb)) RETURNING id",
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
