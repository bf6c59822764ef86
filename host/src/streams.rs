//! The Redis Streams commands the host uses, with replies parsed into plain types.
//!
//! Replies are parsed by hand rather than through the `redis` crate's stream types because those
//! keep fields in a hash map: the handler contract promises fields in the order the producer wrote
//! them, and values as raw bytes so non-UTF-8 input can be reported instead of mangled.

use crate::redis_connection::RedisConnection;
use anyhow::{Context, Result, anyhow, bail};
use redis::Value;
use redis::aio::ConnectionLike;
use std::collections::HashMap;
use std::time::Duration;

/// One entry as read from a stream.
#[derive(Clone, Debug)]
pub struct StreamEntry {
    pub id: String,
    /// Field names and raw values, in the producer's order. A name that is not UTF-8 is held
    /// with U+FFFD in place of its bad bytes, and listed in `lossy_names`.
    pub fields: Vec<(String, Vec<u8>)>,
    /// Field names (as held in `fields`) whose bytes were not UTF-8: such an entry is malformed,
    /// since no handler can be told the name the producer wrote.
    pub lossy_names: Vec<String>,
    /// How many times the group has delivered this entry, including this delivery.
    pub deliveries: u32,
}

/// A stream entry id, `<milliseconds>-<sequence>`, ordered as Redis orders them: the ledger's
/// horizons compare ids, and text comparison would put `10-0` before `9-0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    /// The milliseconds part (the producer's clock, for ids Redis made).
    pub ms: u64,
    /// The sequence within the millisecond.
    pub seq: u64,
}

impl EntryId {
    /// Parses `<ms>-<seq>`; `None` for anything else.
    pub fn parse(id: &str) -> Option<EntryId> {
        let (ms, seq) = id.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Errors a caller reacts to differently from "Redis failed".
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The consumer group (or the stream) vanished; recreate it ([`crate::failure::Class::LostGroup`]).
    #[error("consumer group missing on {key}")]
    NoGroup {
        key: String,
        #[source]
        source: redis::RedisError,
    },
    /// Redis failed or could not be reached (an outage for [`crate::failure::classify`] when it
    /// could not be reached). The error itself is the source, so the classification sees it.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered with a shape this host does not understand (a bug or another server).
    #[error("unexpected reply from Redis: {0}")]
    Protocol(String),
}

impl StreamError {
    fn from_redis(error: redis::RedisError, key: &str) -> Self {
        if crate::failure::is_lost_group(&error) {
            StreamError::NoGroup {
                key: key.to_string(),
                source: error,
            }
        } else {
            StreamError::Redis(error)
        }
    }
}

/// Creates the consumer group just after `after` (the ledger's horizon of the stream, see
/// [`crate::persist::ledger::horizons`]), or at id 0 when there is none, so entries written
/// before the group existed are read but none the ledger has forgotten; creates the stream if
/// needed. An existing group is left as it is.
pub async fn ensure_group<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
    after: Option<EntryId>,
) -> Result<()> {
    let start = after.map_or_else(|| "0".to_string(), |id| id.to_string());
    let result: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg(&start)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match result {
        Ok(()) => {
            tracing::info!(stream = key, group, after = %start, "created consumer group");
            Ok(())
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e)
            .with_context(|| format!("cannot create consumer group {group:?} on stream {key:?}")),
    }
}

/// Reads up to `count` entries of `key` from `start` to `end` (`XRANGE` bounds: an id, `(id`
/// for after it, `-`, `+`), outside any consumer group: history, as a reprocessing run reads it.
/// Each comes as its first delivery.
pub async fn range<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    start: &str,
    end: &str,
    count: usize,
) -> Result<Vec<StreamEntry>, StreamError> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    entries_of(reply)
}

/// The entries of each id of `ids` in `key` (`None` where the stream no longer has it), in one
/// pipelined round trip.
pub async fn by_ids<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    ids: &[String],
) -> Result<Vec<Option<StreamEntry>>, StreamError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("XRANGE").arg(key).arg(id).arg(id);
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    replies
        .into_iter()
        .map(|reply| Ok(entries_of(reply)?.into_iter().next()))
        .collect()
}

/// The entries of an `XRANGE` reply.
fn entries_of(reply: Value) -> Result<Vec<StreamEntry>, StreamError> {
    let Value::Array(items) = reply else {
        return Err(StreamError::Protocol(format!("XRANGE replied {reply:?}")));
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        if let Ok(entry) = parse_entry(item, 1)? {
            entries.push(entry);
        }
    }
    Ok(entries)
}

/// Reads up to `count` new entries for `consumer`, blocking up to `block`.
pub async fn read_new<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
    consumer: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<StreamEntry>, StreamError> {
    let entries = read_new_from(conn, &[key.to_string()], group, consumer, count, block).await?;
    Ok(entries.into_iter().map(|(_, entry)| entry).collect())
}

/// Reads up to `count` new entries per stream from several streams at once; each entry comes
/// with the key of its stream.
pub async fn read_new_from<C: ConnectionLike>(
    conn: &mut C,
    keys: &[String],
    group: &str,
    consumer: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<(String, StreamEntry)>, StreamError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(keys);
    for _ in keys {
        cmd.arg(">");
    }
    let reply: Value = cmd
        .query_async(conn)
        .await
        .map_err(|e| StreamError::from_redis(e, &keys.join(" ")))?;
    parse_read_reply(reply)
}

/// Parses an `XREADGROUP` reply (RESP2 `[[key, entries]…]` or RESP3 `{key: entries}`) into
/// `(key, entry)` pairs; `Nil` (the block timed out) is no entries.
fn parse_read_reply(reply: Value) -> Result<Vec<(String, StreamEntry)>, StreamError> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams,
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        other => {
            return Err(StreamError::Protocol(format!(
                "XREADGROUP returned {other:?}"
            )));
        }
    };
    let mut entries = Vec::new();
    for stream in streams {
        let Value::Array(mut pair) = stream else {
            return Err(StreamError::Protocol(
                "XREADGROUP stream is not [key, entries]".into(),
            ));
        };
        if pair.len() != 2 {
            return Err(StreamError::Protocol(
                "XREADGROUP stream is not [key, entries]".into(),
            ));
        }
        let items = pair.remove(1);
        let key = text(&pair[0]).unwrap_or_default();
        if let Value::Array(items) = items {
            for item in items {
                // `>` only returns entries that exist.
                if let Ok(entry) = parse_entry(item, 1)? {
                    entries.push((key.clone(), entry));
                }
            }
        }
    }
    Ok(entries)
}

/// Sets the idle time of entries pending with `consumer` (`XCLAIM … IDLE … JUSTID`, which leaves
/// their delivery counts alone). Two uses: zero, for entries this consumer is still working on,
/// so that no reclaim — this host's or another's — takes them over while a long batch is still
/// committing; the reclaim idle time, to hand entries back that this host cannot run (their
/// stream's plugin left it after the read), so that the next reclaim of a consumer that serves
/// the stream takes them.
pub async fn set_idle<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
    consumer: &str,
    ids: &[String],
    idle: std::time::Duration,
) -> Result<(), StreamError> {
    if ids.is_empty() {
        return Ok(());
    }
    let _: Value = redis::cmd("XCLAIM")
        .arg(key)
        .arg(group)
        .arg(consumer)
        .arg(0)
        .arg(ids)
        .arg("IDLE")
        .arg(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX))
        .arg("JUSTID")
        .query_async(conn)
        .await
        .map_err(|e| StreamError::from_redis(e, key))?;
    Ok(())
}

/// What one XAUTOCLAIM round returned.
pub struct Claimed {
    /// Where the next round starts; `0-0` when the scan is complete.
    pub next: String,
    pub entries: Vec<StreamEntry>,
    /// Pending ids whose entries were trimmed from the stream; Redis has dropped them from the
    /// pending list.
    pub deleted: Vec<String>,
}

/// Claims up to `count` entries pending for longer than `min_idle` (from any consumer, including
/// crashed ones and this one), and looks up their delivery counts.
pub async fn autoclaim<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
    start: &str,
    count: usize,
) -> Result<Claimed, StreamError> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(key)
        .arg(group)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(start)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .map_err(|e| StreamError::from_redis(e, key))?;
    let Claimed {
        next,
        mut entries,
        deleted,
    } = parse_autoclaim_reply(reply)?;
    if !entries.is_empty() {
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let counts = delivery_counts(conn, key, group, consumer, &ids).await?;
        for entry in &mut entries {
            // XAUTOCLAIM has just incremented the count. An entry missing from XPENDING was
            // acknowledged meanwhile by someone else, so it is in the ledger and will only be
            // acknowledged; its count is unknown, and taken as past any cap rather than under it.
            entry.deliveries = counts.get(&entry.id).copied().unwrap_or(u32::MAX).max(1);
        }
    }
    Ok(Claimed {
        next,
        entries,
        deleted,
    })
}

/// Parses an `XAUTOCLAIM` reply `[next, entries, deleted ids]` (the third part from Redis 7 on;
/// before, trimmed entries come back without fields and are counted as deleted here). Delivery
/// counts are left at 0 for the caller to fill in.
fn parse_autoclaim_reply(reply: Value) -> Result<Claimed, StreamError> {
    let Value::Array(mut parts) = reply else {
        return Err(StreamError::Protocol(format!(
            "XAUTOCLAIM returned {reply:?}"
        )));
    };
    if parts.len() < 2 {
        return Err(StreamError::Protocol("XAUTOCLAIM reply too short".into()));
    }
    let deleted = if parts.len() >= 3 {
        match parts.remove(2) {
            Value::Array(ids) => ids.into_iter().filter_map(|v| text(&v)).collect(),
            _ => Vec::new(),
        }
    } else {
        Vec::new()
    };
    let mut deleted = deleted;
    let items = parts.remove(1);
    let next = text(&parts[0]).ok_or_else(|| StreamError::Protocol("XAUTOCLAIM cursor".into()))?;
    let mut entries = Vec::new();
    if let Value::Array(items) = items {
        for item in items {
            match parse_entry(item, 0)? {
                Ok(entry) => entries.push(entry),
                // Redis before 7 returns trimmed entries with no fields.
                Err(trimmed_id) => deleted.push(trimmed_id),
            }
        }
    }
    Ok(Claimed {
        next,
        entries,
        deleted,
    })
}

/// The exact delivery count of each of `ids` pending for `consumer`: one `XPENDING` per id, all
/// in one round trip, so no other pending entry of the consumer can crowd one out.
async fn delivery_counts<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
    consumer: &str,
    ids: &[&str],
) -> Result<HashMap<String, u32>, StreamError> {
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("XPENDING")
            .arg(key)
            .arg(group)
            .arg(*id)
            .arg(*id)
            .arg(1)
            .arg(consumer);
    }
    let replies: Vec<Value> = pipe
        .query_async(conn)
        .await
        .map_err(|e| StreamError::from_redis(e, key))?;
    Ok(parse_delivery_counts(replies))
}

/// Parses the replies of extended `XPENDING` (`[[id, consumer, idle, deliveries]…]`) into
/// delivery counts by id; rows of any other shape are skipped.
fn parse_delivery_counts(replies: Vec<Value>) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    for reply in replies {
        let Value::Array(rows) = reply else { continue };
        for row in rows {
            if let Value::Array(cols) = row
                && cols.len() >= 4
                && let (Some(id), Value::Int(n)) = (text(&cols[0]), &cols[3])
            {
                counts.insert(id, u32::try_from(*n).unwrap_or(u32::MAX));
            }
        }
    }
    counts
}

/// The millisecond part of the id of the oldest entry pending in `group` on `key`; `None` when
/// nothing is pending (or the stream or group does not exist).
pub async fn oldest_pending<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
) -> Result<Option<u64>> {
    let reply: Value = match redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query_async(conn)
        .await
    {
        Ok(reply) => reply,
        Err(error) if error.code() == Some("NOGROUP") => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| format!("XPENDING on {key:?} failed"));
        }
    };
    let Value::Array(parts) = reply else {
        return Ok(None);
    };
    let oldest = match (parts.first(), parts.get(1)) {
        (Some(Value::Int(count)), Some(id)) if *count > 0 => text(id),
        _ => None,
    };
    Ok(oldest.and_then(|id| EntryId::parse(&id)).map(|id| id.ms))
}

/// Acknowledges entries.
pub async fn ack<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
    ids: &[String],
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let _: i64 = redis::cmd("XACK")
        .arg(key)
        .arg(group)
        .arg(ids)
        .query_async(conn)
        .await
        .with_context(|| format!("XACK on {key:?} failed"))?;
    Ok(())
}

/// Appends one entry to a stream and returns its id.
pub async fn add<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    fields: &[(String, String)],
) -> Result<String> {
    if fields.is_empty() {
        bail!("cannot add an entry without fields to {key:?}");
    }
    xadd(key, fields)
        .query_async(conn)
        .await
        .with_context(|| format!("XADD to {key:?} failed"))
}

/// `XADD key * field value …`: one new entry with an id Redis chooses.
pub fn xadd(key: &str, fields: &[(String, String)]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (k, v) in fields {
        cmd.arg(k).arg(v);
    }
    cmd
}

/// [`add`], then `WAIT replicas timeout` on the same connection (one pipeline, so on a cluster
/// both go to the stream's primary): the new entry's id and how many replicas hold it.
pub async fn add_and_wait(
    conn: &mut RedisConnection,
    key: &str,
    fields: &[(String, String)],
    replicas: u32,
    timeout: std::time::Duration,
) -> Result<(String, u32)> {
    if fields.is_empty() {
        bail!("cannot add an entry without fields to {key:?}");
    }
    let mut pipe = redis::pipe();
    pipe.add_command(xadd(key, fields));
    pipe.cmd("WAIT")
        .arg(replicas)
        .arg(timeout.as_millis() as u64);
    let (entry_id, held): (String, u32) = pipe
        .query_async(conn)
        .await
        .with_context(|| format!("XADD to {key:?} and WAIT for {replicas} replica(s) failed"))?;
    Ok((entry_id, held))
}

/// Publishes messages and then acknowledges entries, in one round trip (a pipeline keeps the
/// order: every XADD runs before the XACK; on a cluster, where the streams sit on several nodes,
/// the XADDs go first, one pipeline per node, and the XACK once they are answered). Returns the
/// messages Redis refused (their positions and Redis's error), e.g. an XADD to a key that holds
/// another type: the others are published all the same. An `Err` is Redis failing as a whole,
/// or refusing the XACK.
pub async fn publish_outbox_then_ack(
    conn: &mut RedisConnection,
    messages: &[(String, Vec<(String, String)>)],
    key: &str,
    group: &str,
    ids: &[String],
) -> Result<Vec<(usize, String)>> {
    if messages.is_empty() && ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut commands: Vec<redis::Cmd> = messages
        .iter()
        .map(|(stream_key, fields)| xadd(stream_key, fields))
        .collect();
    let ack = (!ids.is_empty()).then(|| redis::cmd("XACK").arg(key).arg(group).arg(ids).clone());
    let failed = || {
        format!(
            "publishing {} message(s) and acknowledging {} entr(ies) of {key:?} failed",
            messages.len(),
            ids.len()
        )
    };
    let mut replies: Vec<Value> = if conn.is_cluster() && !commands.is_empty() {
        let mut replies = conn.pipelined(commands).await.with_context(failed)?;
        if let Some(ack) = ack {
            replies.extend(conn.pipelined(vec![ack]).await.with_context(failed)?);
        }
        replies
    } else {
        commands.extend(ack);
        conn.pipelined(commands).await.with_context(failed)?
    };
    if !ids.is_empty()
        && let Some(Value::ServerError(error)) = replies.pop()
    {
        let error = redis::RedisError::from(error);
        return Err(StreamError::from_redis(error, key))
            .with_context(|| format!("XACK of {} entr(ies) of {key:?} failed", ids.len()));
    }
    Ok(replies
        .into_iter()
        .enumerate()
        .filter_map(|(at, reply)| match reply {
            Value::ServerError(error) => Some((at, error.to_string())),
            _ => None,
        })
        .collect())
}

/// Parses `[id, [field, value, ...]]`; an entry without fields (trimmed while pending) is
/// `Ok(Err(id))`.
fn parse_entry(item: Value, deliveries: u32) -> Result<Result<StreamEntry, String>, StreamError> {
    let Value::Array(mut parts) = item else {
        return Err(StreamError::Protocol(format!("stream entry is {item:?}")));
    };
    if parts.len() != 2 {
        return Err(StreamError::Protocol(
            "stream entry is not [id, fields]".into(),
        ));
    }
    let raw_fields = parts.remove(1);
    let id = text(&parts[0])
        .ok_or_else(|| anyhow!("entry id"))
        .map_err(|e| StreamError::Protocol(e.to_string()))?;
    let values = match raw_fields {
        // A pending entry trimmed from the stream.
        Value::Nil => return Ok(Err(id)),
        Value::Array(values) => values,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        other => {
            return Err(StreamError::Protocol(format!(
                "fields of {id} are {other:?}"
            )));
        }
    };
    let mut fields = Vec::with_capacity(values.len() / 2);
    let mut lossy_names = Vec::new();
    let mut values = values.into_iter();
    while let (Some(name), Some(value)) = (values.next(), values.next()) {
        let name = match String::from_utf8(bytes(name)) {
            Ok(name) => name,
            Err(error) => {
                let name = String::from_utf8_lossy(error.as_bytes()).into_owned();
                lossy_names.push(name.clone());
                name
            }
        };
        fields.push((name, bytes(value)));
    }
    Ok(Ok(StreamEntry {
        id,
        fields,
        lossy_names,
        deliveries,
    }))
}

fn bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        Value::Okay => b"OK".to_vec(),
        _ => Vec::new(),
    }
}

/// A Redis string reply as text (`None` for anything else or for bytes that are not UTF-8).
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &[u8])]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| [bulk(k), Value::BulkString(v.to_vec())])
                    .collect(),
            ),
        ])
    }

    #[test]
    fn a_read_reply_in_either_protocol_gives_key_entry_pairs_with_bytes_kept() {
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                entry("1-0", &[("a", b"x"), ("b", &[0xff, 0])]),
                entry("2-0", &[]),
            ]),
        ])]);
        let resp3 = Value::Map(vec![(
            bulk("s"),
            Value::Array(vec![
                entry("1-0", &[("a", b"x"), ("b", &[0xff, 0])]),
                entry("2-0", &[]),
            ]),
        )]);
        for reply in [resp2, resp3] {
            let entries = parse_read_reply(reply).expect("valid reply");
            assert_eq!(entries.len(), 2);
            let (key, first) = &entries[0];
            assert_eq!(key, "s");
            assert_eq!(first.id, "1-0");
            assert_eq!(first.deliveries, 1);
            assert_eq!(
                first.fields,
                vec![
                    ("a".to_string(), b"x".to_vec()),
                    ("b".to_string(), vec![0xff, 0])
                ]
            );
            assert!(entries[1].1.fields.is_empty());
        }
        assert!(parse_read_reply(Value::Nil).expect("timeout").is_empty());
        assert!(parse_read_reply(Value::Int(1)).is_err());
        assert!(parse_read_reply(Value::Array(vec![Value::Array(vec![bulk("s")])])).is_err());
    }

    #[test]
    fn an_autoclaim_reply_separates_claimed_entries_from_trimmed_ones() {
        // Redis 7: [next, entries, deleted ids]; Redis 6 returns a trimmed entry without fields.
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![
                entry("1-0", &[("a", b"x")]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
            Value::Array(vec![bulk("3-0")]),
        ]);
        let claimed = parse_autoclaim_reply(reply).expect("valid reply");
        assert_eq!(claimed.next, "5-0");
        assert_eq!(claimed.entries.len(), 1);
        assert_eq!(claimed.entries[0].id, "1-0");
        assert_eq!(claimed.deleted, vec!["3-0".to_string(), "2-0".to_string()]);

        let redis6 = Value::Array(vec![bulk("0-0"), Value::Array(vec![])]);
        let claimed = parse_autoclaim_reply(redis6).expect("valid reply");
        assert_eq!(claimed.next, "0-0");
        assert!(claimed.entries.is_empty() && claimed.deleted.is_empty());

        assert!(parse_autoclaim_reply(Value::Array(vec![bulk("0-0")])).is_err());
        assert!(parse_autoclaim_reply(Value::Nil).is_err());
    }

    #[test]
    fn delivery_counts_come_from_extended_xpending_rows_and_odd_rows_are_skipped() {
        let row = |id: &str, count: i64| {
            Value::Array(vec![
                bulk(id),
                bulk("consumer"),
                Value::Int(10),
                Value::Int(count),
            ])
        };
        let counts = parse_delivery_counts(vec![
            Value::Array(vec![row("1-0", 3)]),
            Value::Array(vec![]),
            Value::Array(vec![row("2-0", i64::MAX)]),
            Value::Array(vec![Value::Array(vec![bulk("4-0")])]),
            Value::Nil,
        ]);
        assert_eq!(counts.len(), 2);
        assert_eq!(counts["1-0"], 3);
        assert_eq!(counts["2-0"], u32::MAX);
    }
}
