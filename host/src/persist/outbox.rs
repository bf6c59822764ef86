//! The transactional outbox: what makes publishing after commit safe.
//!
//! Messages (plugin `emit`s, dead letters, processing requests) are rows written in the same
//! transaction as the effects they announce, sent to Redis after the commit, then deleted. A
//! crash or a Redis failure in between leaves the rows behind; [`relay`], run periodically by
//! every host, publishes rows older than [`RELAY_MIN_AGE`] and deletes them, so a message is sent
//! at least once and never before its transaction committed.

use crate::redis_connection::RedisConnection;
use crate::streams;
use anyhow::{Context, Result};
use sqlx::{PgConnection, PgPool};
use std::time::Duration;

/// How old an outbox message must be before the relay takes it over from the host that wrote
/// it (which normally publishes it within milliseconds of its commit).
pub const RELAY_MIN_AGE: Duration = Duration::from_secs(30);
/// How many messages one relay round publishes at most.
const RELAY_BATCH: i64 = 100;

/// A message waiting in the outbox.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    pub id: i64,
    /// The Redis key of the target stream (prefix applied).
    pub stream_key: String,
    pub fields: Vec<(String, String)>,
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
    let ids: Result<Vec<(i64,)>, _> = sqlx::query_as(
        "INSERT INTO outbox (stream, fields)
         SELECT u.stream, CAST(u.fields AS json)
           FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(stream, fields, n)
          ORDER BY u.n
         RETURNING id",
    )
    .bind(streams)
    .bind(fields)
    .fetch_all(conn)
    .await;
    super::answers::answered();
    let mut ids = ids?;
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

/// Writes a message to the outbox in the caller's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    stream_key: &str,
    fields: Vec<(String, String)>,
) -> Result<OutboxMessage, sqlx::Error> {
    let json = serde_json::to_string(&fields).unwrap_or_else(|_| "[]".into());
    let id: Result<(i64,), _> = sqlx::query_as(
        "INSERT INTO outbox (stream, fields) VALUES ($1, CAST($2 AS json)) RETURNING id",
    )
    .bind(stream_key)
    .bind(json)
    .fetch_one(conn)
    .await;
    super::answers::answered();
    let (id,) = id?;
    Ok(OutboxMessage {
        id,
        stream_key: stream_key.to_string(),
        fields,
    })
}

/// Locks the outbox rows `ids` for the caller's transaction and returns those it got: rows the
/// relay holds (or has published and removed) are not returned.
pub async fn lock(conn: &mut PgConnection, ids: &[i64]) -> Result<std::collections::HashSet<i64>> {
    let rows: Vec<(i64,)> =
        sqlx::query_as("SELECT id FROM outbox WHERE id = ANY($1) FOR UPDATE SKIP LOCKED")
            .bind(ids)
            .fetch_all(conn)
            .await
            .context("cannot lock the batch's outbox messages")?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
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

/// Messages older than `age` (left behind by a crash or a failed publish) and not waiting out a
/// refusal (see [`refused`]), locked for this transaction so two hosts do not publish the same
/// rows at once.
pub async fn claim_stale(
    conn: &mut PgConnection,
    age: Duration,
    limit: i64,
) -> Result<Vec<OutboxMessage>> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, stream, fields::text FROM outbox
          WHERE created_at < now() - make_interval(secs => $1)
            AND (retry_at IS NULL OR retry_at <= now())
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

/// One relay round: publishes up to `RELAY_BATCH` messages their writer did not publish
/// after commit (it crashed, or Redis failed at that moment), then deletes them. Rows are locked
/// while they are published, so two hosts never relay the same message at once. Returns how
/// many went out.
///
/// A message Redis refuses (not an outage: an answer, such as `WRONGTYPE`) does not stop the
/// round: it is marked ([`refused`]) and tried again later, and the messages behind it go out.
pub async fn relay(pool: &PgPool, redis: &RedisConnection) -> Result<usize> {
    let mut tx = pool.begin().await?;
    let messages = claim_stale(&mut tx, RELAY_MIN_AGE, RELAY_BATCH).await?;
    if messages.is_empty() {
        return Ok(0);
    }
    let mut redis = redis.clone();
    let mut published = Vec::new();
    for message in &messages {
        match streams::add(&mut redis, &message.stream_key, &message.fields).await {
            Ok(_) => published.push(message.id),
            Err(error) if crate::failure::outage(&error).is_some() => {
                // Redis is gone: keep what went out, stop the round.
                remove(&mut *tx, &published).await?;
                tx.commit().await?;
                return Err(error);
            }
            Err(error) => refused(&mut *tx, message.id, &crate::text::causes(&error)).await?,
        }
    }
    remove(&mut *tx, &published).await?;
    tx.commit().await?;
    Ok(published.len())
}

/// Records that Redis refused outbox message `id` with `error`: it is tried again after a pause
/// that doubles with each refusal (from 5 s up to an hour), and the refusal is logged with the
/// target stream, so an operator can mend the key.
pub async fn refused<'c, E: sqlx::PgExecutor<'c>>(executor: E, id: i64, error: &str) -> Result<()> {
    let row: Option<(String, i32)> = sqlx::query_as(
        "UPDATE outbox
            SET refusals = refusals + 1, last_error = $2,
                retry_at = now() + make_interval(secs => least(3600, 5 * 2 ^ least(refusals, 12)))
          WHERE id = $1
          RETURNING stream, refusals",
    )
    .bind(id)
    .bind(error)
    .fetch_optional(executor)
    .await
    .context("cannot mark a refused outbox message")?;
    if let Some((stream, refusals)) = row {
        tracing::warn!(
            outbox_id = id,
            stream,
            refusals,
            "Redis refused an outbox message; it is kept and tried again later, the messages behind it go on: {error}"
        );
    }
    Ok(())
}
