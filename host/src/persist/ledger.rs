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

use crate::streams::EntryId;
use anyhow::{Context, Result};
use sqlx::{PgConnection, PgPool};
use std::collections::{HashMap, HashSet};
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
    /// As the ledger's `outcome` column holds it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::DeadLettered => "dead-lettered",
        }
    }

    /// The outcome a ledger row holds (`None` for a value this host does not write).
    pub fn parse(text: &str) -> Option<Outcome> {
        [Outcome::Processed, Outcome::DeadLettered]
            .into_iter()
            .find(|outcome| outcome.as_str() == text)
    }
}

/// The handler an entry is recorded against: the plugin's name, its manifest version, and its
/// build (the first 12 hex digits of the file's SHA-256), since every build during development
/// carries the same version.
#[derive(Clone, Copy, Debug)]
pub struct Handler<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub build: &'a str,
}

/// An inserted ledger row's entry id, and the stream's horizon (`<ms>-<seq>`) as committed after
/// the insert (see [`unforget`]).
type Inserted = (String, Option<String>);

/// A claim's inserted entry ids, and the stream's horizon as committed after the insert.
type Claimed = (Vec<String>, Option<String>);

/// Records an entry as finished. Returns `false` when it was already recorded (by an earlier
/// delivery or by another host that won the race), or when a prune that raced this insert has
/// just forgotten it (see [`forgotten`]), in which case the caller must not apply its effects.
pub async fn record(
    conn: &mut PgConnection,
    source: &str,
    stream: &str,
    entry_id: &str,
    handler: Handler<'_>,
    outcome: Outcome,
) -> Result<bool, sqlx::Error> {
    let done: Result<Option<Inserted>, sqlx::Error> = sqlx::query_as(
        "WITH recorded AS (
             INSERT INTO processed_entries (source, stream, entry_id, plugin, plugin_version, plugin_build, outcome)
             VALUES ($6, $1, $2, $3, $4, $7, $5) ON CONFLICT (source, stream, entry_id) DO NOTHING
             RETURNING entry_id)
         SELECT entry_id, ledger_horizon_now($6, $1, ARRAY[entry_id]) FROM recorded",
    )
    .bind(stream)
    .bind(entry_id)
    .bind(handler.name)
    .bind(handler.version)
    .bind(outcome.as_str())
    .bind(source)
    .bind(handler.build)
    .fetch_optional(&mut *conn)
    .await;
    super::answers::answered();
    let Some((id, horizon)) = done? else {
        return Ok(false);
    };
    let claimed = unforget(conn, source, stream, vec![id], horizon).await?;
    Ok(!claimed.is_empty())
}

/// Claims the ledger rows of a whole batch in one statement: `(entry id, outcome)` pairs in, the
/// ids that were newly recorded out. An id not returned was finished before (an earlier delivery,
/// another host that won the race, or an entry at or before the stream's [horizon](horizons)
/// whose row was pruned): its effects must not be applied again. Ids are inserted in
/// sorted order so concurrent batches lock ledger rows in the same order.
pub async fn claim(
    conn: &mut PgConnection,
    source: &str,
    stream: &str,
    handler: Handler<'_>,
    entries: &[(String, Outcome)],
) -> Result<HashSet<String>, sqlx::Error> {
    if entries.is_empty() {
        return Ok(HashSet::new());
    }
    let (ids, outcomes) = sorted(entries);
    let claimed: Result<Claimed, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH claimed AS ({} RETURNING entry_id) {}",
        claim_rows(["$3", "$4", "$5"], "$6", "$7"),
        WITH_HORIZON_NOW
    )))
    .bind(source)
    .bind(stream)
    .bind(handler.name)
    .bind(handler.version)
    .bind(handler.build)
    .bind(ids)
    .bind(outcomes)
    .fetch_one(&mut *conn)
    .await;
    super::answers::answered();
    let (claimed, horizon) = claimed?;
    unforget(conn, source, stream, claimed, horizon).await
}

/// [`claim`] for a batch two versions handled (a canary rollout): each version's entries are
/// recorded against its own build, and what was newly claimed is added to the rollout's tally
/// (`rollout_id`, this `host`; see [`super::rollouts`]) — in one statement, so a canary costs
/// the batch no extra round trip, and the tally counts exactly the rows the ledger took.
#[allow(clippy::too_many_arguments)]
pub async fn claim_canary(
    conn: &mut PgConnection,
    source: &str,
    stream: &str,
    (live, live_entries): (Handler<'_>, &[(String, Outcome)]),
    (candidate, candidate_entries): (Handler<'_>, &[(String, Outcome)]),
    rollout_id: i64,
    host: &str,
) -> Result<HashSet<String>, sqlx::Error> {
    let (live_ids, live_outcomes) = sorted(live_entries);
    let (candidate_ids, candidate_outcomes) = sorted(candidate_entries);
    let claimed: Result<Claimed, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH live AS ({} RETURNING entry_id, outcome),
              candidate AS ({} RETURNING entry_id, outcome),
              tally AS (
                INSERT INTO rollout_tallies (rollout_id, host, shard, role, outcome, entries)
                SELECT $13, $14, $15, role, outcome, count(*)
                  FROM (SELECT 'live' AS role, outcome FROM live
                        UNION ALL SELECT 'candidate', outcome FROM candidate) AS claimed
                 GROUP BY role, outcome ORDER BY role, outcome
                ON CONFLICT (rollout_id, host, shard, role, outcome)
                DO UPDATE SET entries = rollout_tallies.entries + EXCLUDED.entries),
              claimed AS (SELECT entry_id FROM live UNION ALL SELECT entry_id FROM candidate)
         {}",
        claim_rows(["$3", "$4", "$5"], "$6", "$7"),
        claim_rows(["$8", "$9", "$10"], "$11", "$12"),
        WITH_HORIZON_NOW
    )))
    .bind(source)
    .bind(stream)
    .bind(live.name)
    .bind(live.version)
    .bind(live.build)
    .bind(live_ids)
    .bind(live_outcomes)
    .bind(candidate.name)
    .bind(candidate.version)
    .bind(candidate.build)
    .bind(candidate_ids)
    .bind(candidate_outcomes)
    .bind(rollout_id)
    .bind(host)
    .bind(super::rollouts::next_shard())
    .fetch_one(&mut *conn)
    .await;
    super::answers::answered();
    let (claimed, horizon) = claimed?;
    unforget(conn, source, stream, claimed, horizon).await
}

/// The tail of a claim's statement, after a CTE `claimed` of the inserted `entry_id`s: the ids,
/// and the stream's horizon as committed once they are in (`ledger_horizon_now` takes them as
/// its argument so that it runs after the insert, with a snapshot of its own).
const WITH_HORIZON_NOW: &str =
    ", ids AS (SELECT coalesce(array_agg(entry_id), '{}') AS ids FROM claimed)
     SELECT ids, ledger_horizon_now($1, $2, ids) FROM ids";

/// The ids of `inserted` the ledger may take as new: those after the stream's `horizon` as it
/// stood once they were inserted (`<ms>-<seq>`, as `ledger_horizon_now` returns it).
///
/// A claim's insert that met the row of an entry a concurrent prune was deleting waited for
/// the prune and inserted the row again; its own snapshot predates the prune's new horizon, so
/// its `WHERE` let the entry through. Such ids (at or before the horizon) were finished before
/// and must not run again: their new rows are deleted and they are left out. A race of a rewind
/// with pruning; nearly always nothing to do. (Under a canary the rollout's tally, added in the
/// claim's statement, still counts them: a rare overcount of one batch, left as it is.)
async fn unforget(
    conn: &mut PgConnection,
    source: &str,
    stream: &str,
    inserted: Vec<String>,
    horizon: Option<String>,
) -> Result<HashSet<String>, sqlx::Error> {
    let horizon = horizon.as_deref().and_then(EntryId::parse);
    let (taken, forgotten) = forgotten(inserted, horizon);
    if !forgotten.is_empty() {
        tracing::warn!(
            stream,
            count = forgotten.len(),
            "entries delivered again while the ledger pruned them were finished before; they are acknowledged without running"
        );
        sqlx::query(
            "DELETE FROM processed_entries WHERE source = $1 AND stream = $2 AND entry_id = ANY($3)",
        )
        .bind(source)
        .bind(stream)
        .bind(&forgotten)
        .execute(&mut *conn)
        .await?;
    }
    Ok(taken)
}

/// Splits `ids` into those after `horizon` and those at or before it (ids that are not
/// `<ms>-<seq>`, such as replays', are never behind a horizon).
fn forgotten(ids: Vec<String>, horizon: Option<EntryId>) -> (HashSet<String>, Vec<String>) {
    let Some(horizon) = horizon else {
        return (ids.into_iter().collect(), Vec::new());
    };
    let (forgotten, taken): (Vec<String>, Vec<String>) = ids
        .into_iter()
        .partition(|id| EntryId::parse(id).is_some_and(|id| id <= horizon));
    (taken.into_iter().collect(), forgotten)
}

/// The ids and outcomes of `entries`, sorted by id: concurrent batches lock ledger rows in the
/// same order.
fn sorted(entries: &[(String, Outcome)]) -> (Vec<&str>, Vec<&str>) {
    let mut sorted: Vec<&(String, Outcome)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
        .iter()
        .map(|(id, outcome)| (id.as_str(), outcome.as_str()))
        .unzip()
}

/// The `INSERT` of a claim (`$1` the source, `$2` the stream; the handler's name, version and
/// build, and the ids' and outcomes' arrays, at the placeholders given), without its
/// `RETURNING`: rows already there, or at or before the stream's horizon, are not inserted.
fn claim_rows(handler: [&str; 3], ids: &str, outcomes: &str) -> String {
    let [name, version, build] = handler;
    format!(
        "INSERT INTO processed_entries (source, stream, entry_id, plugin, plugin_version, plugin_build, outcome)
         SELECT $1, $2, u.id, {name}, {version}, {build}, u.outcome
           FROM unnest({ids}::text[], {outcomes}::text[]) WITH ORDINALITY AS u(id, outcome, n)
           LEFT JOIN ledger_horizons h ON h.source = $1 AND h.stream = $2
          WHERE h.through IS NULL OR NOT COALESCE(
                    CASE WHEN u.id ~ '^[0-9]{{1,20}}-[0-9]{{1,20}}$'
                         THEN ARRAY[split_part(u.id, '-', 1)::numeric,
                                    split_part(u.id, '-', 2)::numeric] END <= h.through,
                    false)
          ORDER BY u.n
         ON CONFLICT (source, stream, entry_id) DO NOTHING"
    )
}

/// This deployment's identity in the ledger: a random id kept in Redis at `key` (under the stream
/// prefix), so every host reading the same Redis database with the same prefix shares it, and a
/// deployment on another Redis, database or prefix has its own (two deployments sharing one
/// PostgreSQL never take each other's entries for processed).
///
/// It is also remembered in PostgreSQL (`ledger_sources`) under `deployment` (see
/// [`deployment`]): when Redis lost its data, a starting host restores the remembered identity
/// instead of making a new one, so the entries recorded under it are still recognised. A change
/// of identity all the same (Redis lost it and a host of another address made one) is logged as
/// an error.
pub async fn identity<C: redis::aio::ConnectionLike>(
    pool: &PgPool,
    redis: &mut C,
    key: &str,
    deployment: &str,
) -> Result<String> {
    let in_redis: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(redis)
        .await
        .with_context(|| format!("cannot read the ledger identity at {key:?}"))?;
    let identity = match in_redis {
        Some(identity) => identity,
        None => {
            let remembered: Option<String> =
                sqlx::query_scalar("SELECT source FROM ledger_sources WHERE deployment = $1")
                    .bind(deployment)
                    .fetch_optional(pool)
                    .await
                    .context("cannot read the remembered ledger identity")?;
            let candidate = remembered.clone().unwrap_or_else(new_identity);
            let _: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(&candidate)
                .arg("NX")
                .query_async(redis)
                .await
                .with_context(|| format!("cannot create the ledger identity at {key:?}"))?;
            let identity: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(redis)
                .await
                .with_context(|| format!("cannot read the ledger identity at {key:?}"))?;
            let identity = identity.unwrap_or(candidate);
            if remembered.as_deref() == Some(identity.as_str()) {
                tracing::warn!(
                    key,
                    source = identity,
                    "Redis had lost the ledger identity (and with it, its data?); restored the one PostgreSQL remembers for this deployment"
                );
            }
            identity
        }
    };
    let previous: Option<Option<String>> = sqlx::query_scalar(
        "WITH before AS (SELECT source FROM ledger_sources WHERE deployment = $1)
         INSERT INTO ledger_sources (deployment, source) VALUES ($1, $2)
         ON CONFLICT (deployment) DO UPDATE SET source = EXCLUDED.source, seen_at = now()
         RETURNING (SELECT source FROM before)",
    )
    .bind(deployment)
    .bind(&identity)
    .fetch_optional(pool)
    .await
    .context("cannot remember the ledger identity")?;
    if let Some(Some(previous)) = previous
        && previous != identity
    {
        tracing::error!(
            deployment,
            previous,
            source = identity,
            "the ledger identity of this deployment changed: entries recorded under the previous one are not recognised as finished (a rewind or a lost consumer group would run them again)"
        );
    }
    Ok(identity)
}

/// [`identity`] of the deployment `config` describes (its Redis server, database and stream
/// prefix): what a host and a reprocessing run record entries under.
pub async fn identity_of<C: redis::aio::ConnectionLike>(
    pool: &PgPool,
    redis: &mut C,
    config: &crate::config::Config,
) -> Result<String> {
    identity(
        pool,
        redis,
        &config.source_identity_key(),
        &match config.redis_cluster_nodes.as_slice() {
            [] => deployment(&config.redis_url, &config.stream_prefix),
            nodes => cluster_deployment(nodes, &config.stream_prefix),
        },
    )
    .await
}

/// The secret with which `dlq replay` proves a replay mark to the hosts of deployment `source`
/// (see [`replay_proof`]); made on first use, kept in PostgreSQL, which producers cannot read.
pub async fn replay_secret(pool: &PgPool, source: &str) -> Result<String> {
    sqlx::query("INSERT INTO replay_secrets (source) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(source)
        .execute(pool)
        .await
        .context("cannot create the replay secret")?;
    sqlx::query_scalar("SELECT secret FROM replay_secrets WHERE source = $1")
        .bind(source)
        .fetch_one(pool)
        .await
        .context("cannot read the replay secret")
}

/// The proof that entry `original` of `stream` is being replayed by `dlq replay`, made with the
/// deployment's [`replay_secret`].
pub fn replay_proof(secret: &str, stream: &str, original: &str) -> String {
    crate::plugin::sha256_hex(
        format!("kaleidoscope replay\n{secret}\n{stream}\n{original}").as_bytes(),
    )
}

/// A fresh random ledger identity.
fn new_identity() -> String {
    let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
    let mut identity = crate::plugin::sha256_hex(seed.as_bytes());
    identity.truncate(16);
    identity
}

/// The deployment a ledger identity belongs to: the Redis server and database as configured,
/// without credentials or options, and the stream prefix.
pub fn deployment(redis_url: &str, stream_prefix: &str) -> String {
    let (scheme, rest) = redis_url.split_once("://").unwrap_or(("", redis_url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}/{path} prefix={stream_prefix}")
}

/// The deployment a ledger identity belongs to on a Redis Cluster: its seed nodes (sorted, so
/// the order they are listed in does not matter) and the stream prefix.
pub fn cluster_deployment(nodes: &[String], stream_prefix: &str) -> String {
    let mut nodes = nodes.to_vec();
    nodes.sort();
    format!("cluster://{} prefix={stream_prefix}", nodes.join(","))
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
/// oldest pending entry id, and no row of that stream at or after it is touched. Rows of replayed
/// dead letters (`<id>/replay`) are kept: they are few, and their identity says nothing about
/// where in the stream the replay sits. Returns how many rows went.
///
/// In the same statement the stream's [horizon](horizons) moves up to the newest id deleted, so
/// what the ledger forgets is never run again. Ids are compared as numbers (Redis ids are
/// unsigned 64-bit, past `bigint`).
pub async fn prune(
    pool: &PgPool,
    source: &str,
    retention: Duration,
    oldest_pending: &[(String, u64)],
) -> Result<u64> {
    let streams: Vec<&str> = oldest_pending.iter().map(|(s, _)| s.as_str()).collect();
    let oldest: Vec<String> = oldest_pending
        .iter()
        .map(|(_, ms)| ms.to_string())
        .collect();
    let (pruned,): (i64,) = sqlx::query_as(
        "WITH gone AS (
             DELETE FROM processed_entries WHERE ctid = ANY(ARRAY(
                 SELECT l.ctid FROM processed_entries l
                  WHERE l.source = $5
                    AND l.processed_at < now() - make_interval(secs => $1)
                    AND l.entry_id ~ '^[0-9]{1,20}-[0-9]{1,20}$'
                    AND NOT EXISTS (
                        SELECT 1 FROM unnest($2::text[], $3::text[]::numeric[]) AS p(stream, oldest)
                         WHERE p.stream = l.stream
                           AND split_part(l.entry_id, '-', 1)::numeric >= p.oldest)
                  LIMIT $4
                  FOR UPDATE SKIP LOCKED))
             RETURNING stream, entry_id),
         horizon AS (
             INSERT INTO ledger_horizons (source, stream, through)
             SELECT $5, stream, max(ARRAY[split_part(entry_id, '-', 1)::numeric,
                                          split_part(entry_id, '-', 2)::numeric])
               FROM gone GROUP BY stream
             ON CONFLICT (source, stream)
             DO UPDATE SET through = GREATEST(ledger_horizons.through, EXCLUDED.through))
         SELECT count(*) FROM gone",
    )
    .bind(retention.as_secs_f64())
    .bind(streams)
    .bind(oldest)
    .bind(PRUNE_CHUNK)
    .bind(source)
    .fetch_one(pool)
    .await
    .context("cannot prune the processed-entry ledger")?;
    Ok(pruned as u64)
}

/// Per stream of `source`, the newest entry id whose ledger row was pruned: every entry at or
/// before it was finished, and the ledger can no longer tell a redelivery of one of them (see
/// migration `ledger_horizon`). Streams that never lost a row are absent.
pub async fn horizons(pool: &PgPool, source: &str) -> Result<HashMap<String, EntryId>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT stream, through[1]::text || '-' || through[2]::text FROM ledger_horizons WHERE source = $1",
    )
    .bind(source)
    .fetch_all(pool)
    .await
    .context("cannot read the ledger's horizons")?;
    Ok(rows
        .into_iter()
        .filter_map(|(stream, through)| Some((stream, EntryId::parse(&through)?)))
        .collect())
}

/// The entries of `stream` the ledger of `source` says `plugin` at `version` (its manifest
/// version, or its build) finished: live deliveries, replays and reprocessing runs alike, by
/// entry id (each once, in no particular order). What `reprocess --handled-by` repairs.
pub async fn handled_by(
    pool: &PgPool,
    source: &str,
    stream: &str,
    plugin: &str,
    version: &str,
) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT split_part(entry_id, '/', 1) FROM processed_entries
          WHERE source = $1 AND stream = $2 AND plugin = $3
            AND (plugin_version = $4 OR plugin_build = $4)",
    )
    .bind(source)
    .bind(stream)
    .bind(plugin)
    .bind(version)
    .fetch_all(pool)
    .await
    .with_context(|| format!("cannot read which entries of {stream} {plugin} {version} handled"))
}

/// How many entries of `stream` with ids from `from` (inclusive) to `before` (exclusive) the
/// ledger of `source` recorded as finished: what a stream trimmed below `before` had there, as
/// far as the ledger still remembers.
pub async fn count_between(
    pool: &PgPool,
    source: &str,
    stream: &str,
    from: Option<EntryId>,
    before: EntryId,
) -> Result<u64> {
    let from = from.unwrap_or(EntryId { ms: 0, seq: 0 });
    let (count,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM processed_entries
          WHERE source = $1 AND stream = $2 AND entry_id ~ '^[0-9]{1,20}-[0-9]{1,20}$'
            AND ARRAY[split_part(entry_id, '-', 1)::numeric, split_part(entry_id, '-', 2)::numeric]
                >= ARRAY[$3::numeric, $4::numeric]
            AND ARRAY[split_part(entry_id, '-', 1)::numeric, split_part(entry_id, '-', 2)::numeric]
                < ARRAY[$5::numeric, $6::numeric]",
    )
    .bind(source)
    .bind(stream)
    .bind(from.ms.to_string())
    .bind(from.seq.to_string())
    .bind(before.ms.to_string())
    .bind(before.seq.to_string())
    .fetch_one(pool)
    .await
    .with_context(|| format!("cannot count the ledger's entries of {stream}"))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Deletes up to [`PRUNE_CHUNK`] ledger rows of reprocessing runs (`<id>/reprocess:<run>`) that
/// ended (finished or cancelled: no longer resumable) longer than `retention` ago. [`prune`]
/// keeps every identity that is not a plain entry id, so without this a backfill of millions
/// of entries would stay in the ledger for good. Returns how many rows went.
pub async fn prune_runs(pool: &PgPool, source: &str, retention: Duration) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM processed_entries WHERE ctid = ANY(ARRAY(
             SELECT l.ctid FROM processed_entries l
               JOIN reprocess_runs r
                 ON r.id::text = substring(l.entry_id FROM '/reprocess:([0-9]{1,18})$')
              WHERE l.source = $1 AND l.entry_id LIKE '%/reprocess:%'
                AND r.state IN ('finished', 'cancelled')
                AND r.finished_at < now() - make_interval(secs => $2)
              LIMIT $3
              FOR UPDATE OF l SKIP LOCKED))",
    )
    .bind(source)
    .bind(retention.as_secs_f64())
    .bind(PRUNE_CHUNK)
    .execute(pool)
    .await
    .context("cannot prune the ledger rows of ended reprocessing runs")?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_at_or_before_the_horizon_are_forgotten_and_the_rest_taken() {
        let ids = ["9-9", "10-0", "10-1", "11-0", "10-0/replay"]
            .map(String::from)
            .to_vec();
        let (taken, behind) = forgotten(ids.clone(), EntryId::parse("10-0"));
        assert_eq!(behind, ["9-9", "10-0"]);
        assert_eq!(
            taken,
            ["10-1", "11-0", "10-0/replay"].map(String::from).into()
        );
        let (taken, behind) = forgotten(ids.clone(), None);
        assert!(behind.is_empty());
        assert_eq!(taken.len(), ids.len());
    }

    #[test]
    fn a_deployment_is_named_without_credentials_or_options() {
        assert_eq!(
            deployment("redis://:hunter2@cache:6380/2?protocol=resp3", "kt:"),
            "redis://cache:6380/2 prefix=kt:"
        );
        assert_eq!(
            deployment("redis://127.0.0.1:6379", ""),
            "redis://127.0.0.1:6379/ prefix="
        );
        assert_eq!(
            deployment("redis+unix:///run/redis.sock?pass=x", "p"),
            "redis+unix:///run/redis.sock prefix=p"
        );
    }
}
