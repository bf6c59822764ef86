//! What a run reads: its selection of a stream's history, page by page in stream order from
//! where it stands, and what of the selection the stream no longer has.

use crate::persist::ledger;
use crate::streams::{self, EntryId, StreamEntry};
use anyhow::{Context, Result, bail};
use redis::Value;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// A selection as stored with its run, so a resumed run selects the same entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spec {
    /// Entries from `from` to `to` (both inclusive; `None`: the stream's start or end).
    Range {
        from: Option<String>,
        to: Option<String>,
    },
    /// The entries the ledger says `plugin` at `version` (or build) finished.
    HandledBy { plugin: String, version: String },
    /// These entries.
    Ids { ids: Vec<String> },
}

impl Spec {
    /// The range `--from`/`--to` give (ids, milliseconds or RFC 3339 times).
    pub fn range(from: Option<&str>, to: Option<&str>) -> Result<Spec> {
        let from = from.map(|text| bound("--from", text, false)).transpose()?;
        let to = to.map(|text| bound("--to", text, true)).transpose()?;
        if let (Some(Some(from)), Some(Some(to))) = (&from, &to)
            && from > to
        {
            bail!("--from {from} is after --to {to}: the selection is empty");
        }
        Ok(Spec::Range {
            from: from.flatten().map(|id| id.to_string()),
            to: to.flatten().map(|id| id.to_string()),
        })
    }

    /// `--handled-by NAME@VERSION`.
    pub fn handled_by(text: &str) -> Result<Spec> {
        match text.split_once('@') {
            Some((plugin, version)) if !plugin.is_empty() && !version.is_empty() => {
                Ok(Spec::HandledBy {
                    plugin: plugin.to_string(),
                    version: version.to_string(),
                })
            }
            _ => bail!(
                "--handled-by {text:?} is not NAME@VERSION (e.g. insights@1.4.0, or a build: insights@3f2a1c9d0b7e)"
            ),
        }
    }

    /// A range without an end ends at `last` (the stream's last entry when the run starts).
    pub fn ending_at(self, last: Option<&str>) -> Spec {
        match self {
            Spec::Range { from, to: None } => Spec::Range {
                from,
                to: Some(last.unwrap_or("0-0").to_string()),
            },
            other => other,
        }
    }

    /// `--ids A,B,…`: each an entry id.
    pub fn ids(ids: &[String]) -> Result<Spec> {
        let mut parsed = Vec::new();
        for id in ids.iter().flat_map(|list| list.split(',')) {
            let id = id.trim();
            if id.is_empty() {
                continue;
            }
            let Some(parsed_id) = EntryId::parse(id) else {
                bail!("--ids: {id:?} is not an entry id (like 1700000000000-0)");
            };
            parsed.push(parsed_id.to_string());
        }
        if parsed.is_empty() {
            bail!("--ids names no entry");
        }
        Ok(Spec::Ids { ids: parsed })
    }

    /// The selection as the command line gave it, for the run's record.
    pub fn describe(&self) -> String {
        match self {
            Spec::Range { from, to } => {
                let from = from.as_deref().unwrap_or("the start");
                let to = to.as_deref().unwrap_or("the end");
                format!("from {from} to {to}")
            }
            Spec::HandledBy { plugin, version } => format!("handled by {plugin}@{version}"),
            Spec::Ids { ids } if ids.len() <= 3 => format!("ids {}", ids.join(",")),
            Spec::Ids { ids } => format!("{} ids from {}", ids.len(), ids[0]),
        }
    }
}

/// One end of a range: an entry id, milliseconds, or an RFC 3339 time (`None`: the stream's
/// start, `0`/`-`, or end, `+`). A time or milliseconds at the `end` of a range takes in the
/// whole millisecond.
fn bound(flag: &str, text: &str, end: bool) -> Result<Option<EntryId>> {
    let text = text.trim();
    if matches!(text, "-" | "+" | "0" | "0-0") {
        return Ok(None);
    }
    if let Some(id) = EntryId::parse(text) {
        return Ok(Some(id));
    }
    let ms = match text.parse::<u64>() {
        Ok(ms) => ms,
        Err(_) => {
            let time = humantime::parse_rfc3339_weak(text).with_context(|| {
                format!(
                    "{flag} {text:?} is neither an entry id (1700000000000-0), milliseconds, nor an RFC 3339 time (2026-12-01T10:00:00Z)"
                )
            })?;
            let since = time
                .duration_since(std::time::UNIX_EPOCH)
                .with_context(|| format!("{flag} {text:?} is before 1970"))?;
            u64::try_from(since.as_millis()).context("time out of range")?
        }
    };
    Ok(Some(EntryId {
        ms,
        seq: if end { u64::MAX } else { 0 },
    }))
}

/// A selection resolved against the ledger: a range, or ids in stream order.
#[derive(Clone, Debug)]
pub enum Selection {
    Range {
        from: Option<EntryId>,
        to: Option<EntryId>,
    },
    Ids(Vec<EntryId>),
}

impl Selection {
    /// Resolves `spec` (reading the ledger of `source` for `--handled-by`).
    pub async fn resolve(pool: &PgPool, source: &str, stream: &str, spec: &Spec) -> Result<Self> {
        let parse = |id: &String| EntryId::parse(id);
        Ok(match spec {
            Spec::Range { from, to } => Selection::Range {
                from: from.as_ref().and_then(parse),
                to: to.as_ref().and_then(parse),
            },
            Spec::Ids { ids } => Selection::Ids(sorted(ids.iter().filter_map(parse))),
            Spec::HandledBy { plugin, version } => {
                let ids = ledger::handled_by(pool, source, stream, plugin, version).await?;
                Selection::Ids(sorted(ids.iter().filter_map(parse)))
            }
        })
    }
}

fn sorted(ids: impl Iterator<Item = EntryId>) -> Vec<EntryId> {
    let mut ids: Vec<EntryId> = ids.collect();
    ids.sort();
    ids.dedup();
    ids
}

/// What the stream holds of a selection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Survey {
    /// Entries of the selection in the stream (for ids, before any found deleted while read).
    pub selected: u64,
    /// Entries of the selection the stream no longer has (trimmed or deleted), as far as known:
    /// for a range, what the ledger recorded (or Redis counted) before the stream's start.
    pub missing: u64,
    /// The stream's first entry now (`None`: the stream is empty).
    pub stream_starts: Option<String>,
    /// Its last entry now: where a range without `--to` ends, so a run does not chase the
    /// entries the live consumers are handling.
    pub stream_ends: Option<String>,
    /// For a selection by the ledger (`--handled-by`): the newest entry the ledger has forgotten
    /// (its retention), if any. Entries the version handled up to there are not selected.
    pub ledger_forgot_through: Option<String>,
}

/// The stream's length, first and last entry, and how many entries it was ever given (Redis 7;
/// `None` before).
struct StreamInfo {
    length: u64,
    first: Option<EntryId>,
    last: Option<EntryId>,
    added: Option<u64>,
}

async fn stream_info<C: ConnectionLike>(redis: &mut C, key: &str) -> Result<StreamInfo> {
    let reply: Value = match redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(redis)
        .await
    {
        Ok(reply) => reply,
        Err(error) if error.to_string().contains("no such key") => {
            return Ok(StreamInfo {
                length: 0,
                first: None,
                last: None,
                added: None,
            });
        }
        Err(error) => return Err(error).with_context(|| format!("XINFO STREAM {key} failed")),
    };
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut items = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        other => bail!("XINFO STREAM {key} replied {other:?}"),
    };
    let mut info = StreamInfo {
        length: 0,
        first: None,
        last: None,
        added: None,
    };
    let entry_id = |value: &Value| match value {
        Value::Array(parts) => parts
            .first()
            .and_then(streams::text)
            .and_then(|id| EntryId::parse(&id)),
        _ => None,
    };
    for (name, value) in &pairs {
        match streams::text(name).as_deref() {
            Some("length") => info.length = int(value).unwrap_or(0),
            Some("entries-added") => info.added = int(value),
            Some("first-entry") => info.first = entry_id(value),
            Some("last-entry") => info.last = entry_id(value),
            _ => {}
        }
    }
    Ok(info)
}

fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => streams::text(other)?.parse().ok(),
    }
}

/// Counts what the stream holds of `selection`, and what it no longer has; selected ids
/// before the stream's start (trimmed) are taken out of the selection, counted as missing.
pub async fn survey<C: ConnectionLike>(
    redis: &mut C,
    pool: &PgPool,
    source: &str,
    stream: &str,
    key: &str,
    selection: &mut Selection,
) -> Result<Survey> {
    let info = stream_info(redis, key).await?;
    let stream_starts = info.first.map(|id| id.to_string());
    let Some(first) = info.first else {
        // An empty stream: every selected entry is gone.
        let missing = match selection {
            Selection::Ids(ids) => std::mem::take(ids).len() as u64,
            Selection::Range { from, to } => {
                let end = to.unwrap_or(EntryId {
                    ms: u64::MAX,
                    seq: u64::MAX,
                });
                ledger::count_between(pool, source, stream, *from, end).await?
            }
        };
        return Ok(Survey {
            selected: 0,
            missing,
            stream_starts,
            stream_ends: info.last.map(|id| id.to_string()),
            ledger_forgot_through: None,
        });
    };
    match selection {
        Selection::Ids(ids) => {
            let before = ids.len();
            ids.retain(|id| *id >= first);
            let missing = (before - ids.len()) as u64;
            Ok(Survey {
                selected: ids.len() as u64,
                missing,
                stream_starts,
                stream_ends: info.last.map(|id| id.to_string()),
                ledger_forgot_through: None,
            })
        }
        Selection::Range { from, to } => {
            let whole = from.is_none_or(|from| from <= first)
                && to.is_none_or(|to| info.last.is_none_or(|last| to >= last));
            let selected = if whole {
                info.length
            } else {
                count_range(redis, key, *from, *to).await?
            };
            let mut missing = 0;
            if from.is_none_or(|from| from < first) {
                let before = to.map_or(first, |to| first.min(successor(to)));
                missing = ledger::count_between(pool, source, stream, *from, before).await?;
                // The ledger forgets (retention); Redis counts every entry it was given.
                if from.is_none()
                    && to.is_none()
                    && let Some(added) = info.added
                {
                    missing = missing.max(added.saturating_sub(info.length));
                }
            }
            Ok(Survey {
                selected,
                missing,
                stream_starts,
                stream_ends: info.last.map(|id| id.to_string()),
                ledger_forgot_through: None,
            })
        }
    }
}

/// The id just after `id`.
fn successor(id: EntryId) -> EntryId {
    match id.seq.checked_add(1) {
        Some(seq) => EntryId { ms: id.ms, seq },
        None => EntryId {
            ms: id.ms.saturating_add(1),
            seq: 0,
        },
    }
}

/// Counts the entries of a part of the stream by reading it (Redis has no cheaper way).
async fn count_range<C: ConnectionLike>(
    redis: &mut C,
    key: &str,
    from: Option<EntryId>,
    to: Option<EntryId>,
) -> Result<u64> {
    let end = to.map_or_else(|| "+".to_string(), |id| id.to_string());
    let mut start = from.map_or_else(|| "-".to_string(), |id| id.to_string());
    let mut count = 0;
    loop {
        let page = streams::range(redis, key, &start, &end, 10_000)
            .await
            .with_context(|| format!("cannot count the selection in {key}"))?;
        let Some(last) = page.last() else {
            return Ok(count);
        };
        count += page.len() as u64;
        start = format!("({}", last.id);
    }
}

/// One page of a selection.
pub struct Page {
    pub entries: Vec<StreamEntry>,
    /// Selected ids the stream did not have.
    pub missing: u64,
    /// Where the run stands after the page.
    pub last: EntryId,
}

/// Reads a selection page by page after `position`.
pub async fn next_page<C: ConnectionLike>(
    redis: &mut C,
    key: &str,
    selection: &Selection,
    position: Option<EntryId>,
    size: usize,
) -> Result<Option<Page>> {
    match selection {
        Selection::Range { from, to } => {
            let start = match (position, from) {
                (Some(position), _) => format!("({position}"),
                (None, Some(from)) => from.to_string(),
                (None, None) => "-".to_string(),
            };
            let end = to.map_or_else(|| "+".to_string(), |id| id.to_string());
            let entries = streams::range(redis, key, &start, &end, size)
                .await
                .with_context(|| format!("cannot read {key} from {start}"))?;
            let Some(last) = entries.last().and_then(|e| EntryId::parse(&e.id)) else {
                return Ok(None);
            };
            Ok(Some(Page {
                entries,
                missing: 0,
                last,
            }))
        }
        Selection::Ids(ids) => {
            let after = position.map_or(0, |position| ids.partition_point(|id| *id <= position));
            let chunk = &ids[after..ids.len().min(after + size)];
            let Some(last) = chunk.last().copied() else {
                return Ok(None);
            };
            let texts: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let found = streams::by_ids(redis, key, &texts)
                .await
                .with_context(|| format!("cannot read the selected entries of {key}"))?;
            let missing = found.iter().filter(|entry| entry.is_none()).count() as u64;
            Ok(Some(Page {
                entries: found.into_iter().flatten().collect(),
                missing,
                last,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_takes_ids_milliseconds_and_times_and_a_time_ends_with_its_millisecond() {
        let Spec::Range { from, to } = Spec::range(Some("0"), Some("+")).unwrap() else {
            panic!("a range");
        };
        assert_eq!((from, to), (None, None));
        let Spec::Range { from, to } =
            Spec::range(Some("2023-11-14T22:13:20Z"), Some("1700000000000")).unwrap()
        else {
            panic!("a range");
        };
        assert_eq!(from.as_deref(), Some("1700000000000-0"));
        assert_eq!(
            to.as_deref(),
            Some(format!("1700000000000-{}", u64::MAX).as_str())
        );
        let error = Spec::range(Some("yesterday"), None).unwrap_err();
        assert!(
            error.to_string().contains("--from \"yesterday\""),
            "{error}"
        );
        assert!(Spec::range(Some("5-0"), Some("4-0")).is_err());
    }

    #[test]
    fn handled_by_needs_a_name_and_a_version() {
        assert_eq!(
            Spec::handled_by("faces@1.4.0").unwrap(),
            Spec::HandledBy {
                plugin: "faces".into(),
                version: "1.4.0".into()
            }
        );
        assert!(Spec::handled_by("faces").is_err());
        assert!(Spec::handled_by("@1.0").is_err());
    }

    #[test]
    fn ids_are_checked_and_may_come_comma_separated() {
        let Spec::Ids { ids } = Spec::ids(&["1-0,2-0".into(), "3-1".into()]).unwrap() else {
            panic!("ids");
        };
        assert_eq!(ids, ["1-0", "2-0", "3-1"]);
        let error = Spec::ids(&["1-0,x".into()]).unwrap_err();
        assert!(error.to_string().contains("\"x\""), "{error}");
    }
}
