//! `kaleidoscope dlq list`, `dlq show` and `dlq replay`: inspecting dead letters and re-running
//! them on their source stream (typically after a fixed plugin has been deployed).
//!
//! A replayed entry is re-published with its original fields (a new entry id) and only then
//! removed from the dead-letter stream, so a failure in between can duplicate a dead letter but
//! never lose one. It also carries the id of the entry that was dead-lettered
//! ([`REPLAY_OF_FIELD`]), under which the host records it in the ledger: however many copies of
//! one dead letter are replayed, however often, it is applied once.

use super::StoredDeadLetter;
use crate::config::Config;
use crate::dead_letter::{REPLAY_OF_FIELD, REPLAY_PROOF_FIELD};
use anyhow::{Context, Result};
use redis::aio::ConnectionLike;
use serde::Serialize;

/// Entries read per XRANGE page.
const PAGE: usize = 500;

/// Which dead letters to act on.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only these dead-letter ids (empty: any).
    pub ids: Vec<String>,
    /// Only dead letters from this source stream.
    pub stream: Option<String>,
    /// Only this failure kind.
    pub kind: Option<String>,
}

impl Filter {
    /// A filter, refusing a `kind` that is not a failure kind (naming the kinds there are), so a
    /// typo does not quietly match nothing.
    pub fn new(ids: Vec<String>, stream: Option<String>, kind: Option<String>) -> Result<Filter> {
        if let Some(kind) = &kind {
            super::FailureKind::parse(kind).map_err(anyhow::Error::msg)?;
        }
        Ok(Filter { ids, stream, kind })
    }

    /// Whether the filter names nothing at all (every dead letter would match).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.stream.is_none() && self.kind.is_none()
    }

    fn matches(&self, entry: &StoredDeadLetter) -> bool {
        (self.ids.is_empty() || self.ids.contains(&entry.id))
            && self
                .stream
                .as_ref()
                .is_none_or(|s| *s == entry.source_stream)
            && self.kind.as_ref().is_none_or(|k| *k == entry.failure_kind)
    }
}

/// The dead letters matching `filter`, oldest first (at most `limit`).
pub async fn list<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<StoredDeadLetter>> {
    let key = config.dlq_key();
    let mut found = Vec::new();
    let mut start = "-".to_string();
    loop {
        let page: super::RawEntries = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await
            .with_context(|| format!("cannot read the dead-letter stream {key:?}"))?;
        let page = super::decode_lossy(page);
        let done = page.len() < PAGE;
        if let Some((last, _)) = page.last() {
            start = format!("({last}");
        }
        for (id, fields) in page {
            let entry = StoredDeadLetter::from_stream_fields(id, fields);
            if filter.matches(&entry) {
                found.push(entry);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
        }
        if done {
            return Ok(found);
        }
    }
}

/// The dead letters a replay should act on. Refuses an empty filter unless `all` is set (a
/// replay of everything must be asked for), and an id that matches no dead letter (a typo must
/// not pass as "replayed 0").
pub async fn select_for_replay<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
    filter: &Filter,
    all: bool,
) -> Result<Vec<StoredDeadLetter>> {
    if filter.is_empty() && !all {
        anyhow::bail!(
            "say which dead letters to replay: ids, --stream STREAM, --kind KIND, or --all"
        );
    }
    let entries = list(conn, config, filter, usize::MAX).await?;
    if let Some(missing) = filter
        .ids
        .iter()
        .find(|id| !entries.iter().any(|e| &e.id == *id))
    {
        anyhow::bail!(
            "no dead letter with id {missing} (matching the filters) in {:?}",
            config.dlq_key()
        );
    }
    Ok(entries)
}

/// The outcome of replaying one dead letter.
#[derive(Debug, Serialize)]
pub struct Replayed {
    pub dead_letter_id: String,
    pub source_stream: String,
    /// The id of the re-published entry.
    pub new_id: String,
}

/// Re-publishes each dead letter's original fields onto its source stream, then deletes the
/// dead letter. Stops at the first failure (what was replayed so far stays replayed).
///
/// Refuses, before replaying anything, a dead letter whose original bytes were lost (a value that
/// was not UTF-8 is stored with U+FFFD in its place): replaying it would process corrupted text as
/// if it were the producer's. `force` replays it anyway.
///
/// Each replay carries the id of the entry it replays and its proof, made with the deployment's
/// `replay_secret` (see [`crate::persist::ledger::replay_proof`]).
pub async fn replay<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
    replay_secret: &str,
    entries: &[StoredDeadLetter],
    force: bool,
) -> Result<Vec<Replayed>> {
    if !force && let Some(lossy) = entries.iter().find(|e| !e.bytes_lost.is_empty()) {
        anyhow::bail!(
            "dead letter {} (entry {} of {}) lost the original bytes of field(s) {}: they were not UTF-8 and are stored with U+FFFD in their place, or too large for a dead letter and cut; replaying would process that text as the producer's. Have the producer send the entry again, or replay with --force",
            lossy.id,
            lossy.source_id,
            lossy.source_stream,
            lossy
                .bytes_lost
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // A run's dead letter stands for an entry live delivery finished long ago: replayed on the
    // stream, the ledger would find it processed and apply nothing. The run takes it again.
    let (runs, entries): (Vec<&StoredDeadLetter>, Vec<&StoredDeadLetter>) =
        entries.iter().partition(|e| e.reprocess_run.is_some());
    for letter in &runs {
        eprintln!(
            "skipped dead letter {} (entry {} of {}): reprocessing run {} wrote it, and replaying it on the live stream would apply nothing; take it again with `kaleidoscope reprocess --stream {} --ids {}`",
            letter.id,
            letter.source_id,
            letter.source_stream,
            letter.reprocess_run.unwrap_or_default(),
            letter.source_stream,
            letter.source_id
        );
    }
    if entries.is_empty() && !runs.is_empty() {
        anyhow::bail!(
            "nothing replayed: every selected dead letter was written by a reprocessing run (see above)"
        );
    }
    let dlq = config.dlq_key();
    let mut replayed = Vec::new();
    for entry in entries {
        if entry.source_stream.is_empty() || entry.fields.is_empty() {
            anyhow::bail!(
                "dead letter {} has no source stream or no original fields; cannot replay it",
                entry.id
            );
        }
        let mut fields: Vec<(String, String)> = entry
            .fields
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_string),
                )
            })
            .collect();
        fields.push((REPLAY_OF_FIELD.to_string(), entry.source_id.clone()));
        fields.push((
            REPLAY_PROOF_FIELD.to_string(),
            crate::persist::ledger::replay_proof(
                replay_secret,
                &entry.source_stream,
                &entry.source_id,
            ),
        ));
        let target = config.stream_key(&entry.source_stream);
        let new_id = crate::streams::add(conn, &target, &fields)
            .await
            .with_context(|| format!("cannot re-publish dead letter {} to {target:?}", entry.id))?;
        let _: i64 = redis::cmd("XDEL")
            .arg(&dlq)
            .arg(&entry.id)
            .query_async(conn)
            .await
            .with_context(|| {
                format!(
                    "re-published dead letter {} as {new_id}, but cannot delete it from {dlq:?}",
                    entry.id
                )
            })?;
        tracing::info!(dead_letter = %entry.id, stream = %entry.source_stream, %new_id, "replayed");
        replayed.push(Replayed {
            dead_letter_id: entry.id.clone(),
            source_stream: entry.source_stream.clone(),
            new_id,
        });
    }
    Ok(replayed)
}

/// Dead letters as a human-readable table: one line per dead letter, its whole error on the
/// lines below it (wrapped, never cut), so the reason is readable without `--json`.
pub fn render(entries: &[StoredDeadLetter]) -> String {
    let mut out = format!(
        "{:<17} {:<28} {:<17} {:<18} {:>5}  failed at\n",
        "id", "source stream", "source id", "kind", "tries"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<17} {:<28} {:<17} {:<18} {:>5}  {}\n",
            e.id, e.source_stream, e.source_id, e.failure_kind, e.deliveries, e.failed_at
        ));
        for line in wrap(&e.error, ERROR_WIDTH) {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out.push_str(&format!("{} dead letter(s)\n", entries.len()));
    out
}

/// One dead letter in full, for `dlq show`: every field, the original entry's fields one per
/// line.
pub fn render_one(letter: &StoredDeadLetter) -> String {
    let mut out = String::new();
    for (name, value) in [
        ("id", letter.id.as_str()),
        ("source stream", &letter.source_stream),
        ("source id", &letter.source_id),
        ("kind", &letter.failure_kind),
        ("plugin", &letter.plugin),
        ("plugin version", &letter.plugin_version),
        ("plugin build", &letter.plugin_build),
        ("failed at", &letter.failed_at),
    ] {
        out.push_str(&format!("{name:<15} {value}\n"));
    }
    out.push_str(&format!("{:<15} {}\n", "deliveries", letter.deliveries));
    out.push_str("error\n");
    for line in wrap(&letter.error, ERROR_WIDTH) {
        out.push_str(&format!("    {line}\n"));
    }
    out.push_str("fields\n");
    for (name, value) in &letter.fields {
        let value = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_string);
        out.push_str(&format!("    {name} = {value}\n"));
    }
    out
}

/// Width of the wrapped error text.
const ERROR_WIDTH: usize = 96;

/// `text` in lines of at most `width` characters, broken at spaces where possible (a word longer
/// than the width is cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split(' ') {
            let mut word = word.to_string();
            while word.chars().count() > width {
                if !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
                let head: String = word.chars().take(width).collect();
                word = word.chars().skip(width).collect();
                lines.push(head);
            }
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&word);
        }
        lines.push(line);
    }
    lines
}

/// The dead letter with id `id`, or an error naming it and the dead-letter stream.
pub async fn show<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
    id: &str,
) -> Result<StoredDeadLetter> {
    let key = config.dlq_key();
    let found: super::RawEntries = redis::cmd("XRANGE")
        .arg(&key)
        .arg(id)
        .arg(id)
        .query_async(conn)
        .await
        .with_context(|| {
            format!("cannot read dead letter {id:?} from {key:?} (ids look like 1764000000000-0)")
        })?;
    super::decode_lossy(found)
        .into_iter()
        .next()
        .map(|(id, fields)| StoredDeadLetter::from_stream_fields(id, fields))
        .with_context(|| format!("no dead letter with id {id} in {key:?}"))
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn errors_are_wrapped_at_spaces_and_never_cut() {
        let text = "plugin `p` command 3 (upsert on table `media`): column `caption` (text): a long reason";
        let lines = wrap(text, 30);
        assert!(lines.iter().all(|l| l.chars().count() <= 30), "{lines:?}");
        assert_eq!(lines.join(" "), text);
        assert_eq!(wrap(&"x".repeat(65), 30).concat(), "x".repeat(65));
        assert_eq!(wrap("two\nlines", 30), vec!["two", "lines"]);
    }
}
