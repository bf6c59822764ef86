//! What `kaleidoscope reprocess` prints when a run (or dry run) ends, and a run in one line for
//! `status`.

use super::{Ended, Outcome};
use crate::persist::changes::Summary;
use std::fmt::Write as _;

/// The report of `outcome`, for a terminal or a log.
pub fn text(outcome: &Outcome) -> String {
    let mut out = String::new();
    let dry = outcome.changes.is_some();
    let what = match &outcome.run {
        Some(run) => format!("run {}", run.id),
        None if dry => "dry run".to_string(),
        None => "run".to_string(),
    };
    let _ = writeln!(
        out,
        "{what} of {}: {} through {} {} (build {}, from {})",
        outcome.stream,
        outcome.selection,
        outcome.plugin,
        outcome.version,
        outcome.build,
        outcome.from
    );
    let survey = &outcome.survey;
    let missing = outcome
        .run
        .as_ref()
        .map_or(survey.missing + outcome.counts.missing, |run| {
            u64::try_from(run.missing).unwrap_or(0)
        });
    let _ = write!(out, "selected: {} in the stream", survey.selected);
    if missing > 0 {
        let _ = write!(
            out,
            "; {missing} no longer there (trimmed or deleted; the stream now starts at {}) — they cannot be reprocessed",
            survey
                .stream_starts
                .as_deref()
                .unwrap_or("nothing: it is empty")
        );
    }
    out.push('\n');
    if let Some(horizon) = &survey.ledger_forgot_through {
        let _ = writeln!(
            out,
            "note: the ledger has forgotten the entries up to {horizon} (KALEIDOSCOPE_LEDGER_RETENTION_MS); any the version handled before then are not selected — select them by time with --from/--to"
        );
    }
    match &outcome.run {
        Some(run) => {
            let _ = writeln!(
                out,
                "applied: {} entries, {} dead-lettered (tagged reprocessRun={}), {} applied by this run before",
                run.processed, run.dead_lettered, run.id, run.skipped
            );
            if run.emit {
                out.push_str("emits: published (--emit)\n");
            } else {
                let _ = writeln!(
                    out,
                    "emits: {} left out (a run publishes none unless --emit)",
                    run.emits_suppressed
                );
            }
        }
        None => {
            let counts = &outcome.counts;
            let _ = writeln!(
                out,
                "would apply: {} entries, dead-letter {}; nothing was written",
                counts.processed, counts.dead_lettered
            );
        }
    }
    for (entry, reason) in &outcome.dead_letters {
        let _ = writeln!(out, "  would dead-letter {entry}: {reason}");
    }
    if let Some(changes) = &outcome.changes {
        out.push_str(&changes_text(changes));
    }
    let ended = match (outcome.ended, &outcome.run) {
        (Ended::Finished, _) => "finished".to_string(),
        (Ended::Cancelled, _) => "cancelled".to_string(),
        (Ended::Interrupted, Some(run)) => format!(
            "interrupted: resume with `kaleidoscope reprocess --resume {}`",
            run.id
        ),
        (Ended::Failed, Some(run)) => format!(
            "stopped: a batch could not be committed (see above); resume with `kaleidoscope reprocess --resume {}`",
            run.id
        ),
        (_, None) => "stopped before the end".to_string(),
    };
    let _ = writeln!(out, "{what} {ended}");
    out
}

/// A dry run's changes per table and column, old → new.
pub fn changes_text(summary: &Summary) -> String {
    let mut out = String::new();
    if summary.tables.is_empty() {
        out.push_str("changes: none (no row written)\n");
        return out;
    }
    for (table, changes) in &summary.tables {
        let _ = writeln!(
            out,
            "{table}: {} rows written — {} changed, {} added, {} removed, {} unchanged",
            changes.rows, changes.changed, changes.added, changes.removed, changes.unchanged
        );
        for (column, column_changes) in &changes.columns {
            let _ = writeln!(out, "  {table}.{column}: {} rows", column_changes.rows);
            for example in &column_changes.examples {
                let _ = writeln!(
                    out,
                    "    {}: {} → {}",
                    example.key, example.before, example.after
                );
            }
        }
    }
    out
}
