//! The protocol for entries a reprocessing run ([`crate::reprocess`]) reads again from the
//! stream's history, where it differs from live delivery:
//!
//! - **identity**: each entry is recorded in the ledger as `<entry id>/reprocess:<run>`, so the
//!   run applies it once however often it is resumed, the live delivery's row is left alone,
//!   and a new run applies it again on purpose. The ledger's horizon (for live redeliveries)
//!   does not apply.
//! - **no acknowledgement**: the entries were acknowledged long ago, or are pending for the live
//!   consumers, whose business they stay;
//! - **emits** are left out unless the run allows them (a backfill must not send ten thousand
//!   requests to the ML services again), and counted;
//! - **dead letters** carry the run's id;
//! - what the run finished is added to the run's counts in the batch transaction;
//! - a **dry run** reads the rows its statements write before and after them, in the batch
//!   transaction, and rolls the transaction back ([`crate::persist::changes`]).
//!
//! Validation, grants, set-based commit and the entry-by-entry fallback are the live ones.

use super::{Decision, Item, PreparedBatch};
use crate::persist::changes::{self, Changes, Lookups, Snapshot};
use crate::persist::reprocess_runs;
use crate::persist::validate::Statement;
use crate::plugin::Plugin;
use crate::state::HostState;
use crate::streams::StreamEntry;
use anyhow::Result;
use sqlx::PgConnection;
use std::sync::{Arc, Mutex};

/// What marks a run's ledger identities: `<entry id>/reprocess:<run>`.
pub const LEDGER_MARK: &str = "/reprocess:";

/// A reprocessing run, as the delivery protocol needs to know it.
#[derive(Debug)]
pub struct Reprocessing {
    /// The run's id (what its ledger identities and dead letters carry).
    pub run: i64,
    /// Whether the handler's emits are published (off by default).
    pub emit: bool,
    /// For a dry run: what its batches would change. Its transactions are rolled back.
    pub dry_run: Option<Mutex<Changes>>,
}

impl Reprocessing {
    /// The ledger identity of `identity` (an entry's own, or a replayed dead letter's original)
    /// in this run.
    pub fn ledger_id(&self, identity: &str) -> String {
        format!("{identity}{LEDGER_MARK}{}", self.run)
    }

    /// What the dry run found so far (empty for a real run).
    pub fn changes(&self, examples: usize) -> changes::Summary {
        self.dry_run
            .as_ref()
            .map(|changes| lock(changes).summary(examples))
            .unwrap_or_default()
    }
}

/// The entry id a ledger identity stands for: a run's (`<id>/reprocess:<run>`) or a replayed
/// dead letter's (`<id>/replay`) without its mark. Entry ids hold no `/`.
pub fn entry_of_identity(identity: &str) -> &str {
    identity
        .split_once('/')
        .map_or(identity, |(entry, _)| entry)
}

fn lock(changes: &Mutex<Changes>) -> std::sync::MutexGuard<'_, Changes> {
    changes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `run` lets handlers' emits through (live delivery always does).
pub(super) fn emits_allowed(run: Option<&Reprocessing>) -> bool {
    run.is_none_or(|run| run.emit)
}

/// The emits of the entries `items` persists (what a run without `--emit` leaves out).
fn emits_of(items: &[Item]) -> i64 {
    let emits = items
        .iter()
        .filter_map(|item| match &item.decision {
            Some(Decision::Persist(statements)) => Some(
                statements
                    .iter()
                    .filter(|s| matches!(s, Statement::Emit { .. }))
                    .count(),
            ),
            _ => None,
        })
        .sum::<usize>();
    i64::try_from(emits).unwrap_or(i64::MAX)
}

/// A dry run's look at the rows a batch writes, before its statements run.
pub(super) struct DryRunBefore {
    lookups: Lookups,
    before: Snapshot,
}

impl HostState {
    /// Prepares entries of `stream` read again by reprocessing `run` through `plugin`: triage
    /// and handler calls as for live delivery, under the run's ledger identities.
    pub async fn prepare_reprocessing(
        &self,
        stream: &str,
        plugin: Arc<Plugin>,
        run: Arc<Reprocessing>,
        entries: Vec<StreamEntry>,
    ) -> Result<PreparedBatch> {
        self.prepare_with(stream, plugin, Some(run), entries).await
    }

    /// Adds what a run's batch finished to the run's counts (in the batch transaction).
    pub(super) async fn tally_run(
        &self,
        tx: &mut PgConnection,
        run: Option<&Reprocessing>,
        items: &[Item],
    ) -> Result<(), sqlx::Error> {
        let Some(run) = run.filter(|run| run.dry_run.is_none()) else {
            return Ok(());
        };
        let count = |outcome| {
            items
                .iter()
                .filter(|i| i.finished() == Some(outcome))
                .count()
        };
        use crate::persist::ledger::Outcome;
        let processed = count(Outcome::Processed);
        let dead_lettered = count(Outcome::DeadLettered);
        let suppressed = if run.emit { 0 } else { emits_of(items) };
        if processed + dead_lettered == 0 && suppressed == 0 {
            return Ok(());
        }
        reprocess_runs::tally(
            tx,
            run.run,
            i64::try_from(processed).unwrap_or(i64::MAX),
            i64::try_from(dead_lettered).unwrap_or(i64::MAX),
            suppressed,
        )
        .await
    }

    /// For a dry run: reads the rows the batch's statements write, before they run.
    pub(super) async fn dry_run_before(
        &self,
        tx: &mut PgConnection,
        run: Option<&Reprocessing>,
        items: &[Item],
    ) -> Result<Option<DryRunBefore>, sqlx::Error> {
        if run.is_none_or(|run| run.dry_run.is_none()) {
            return Ok(None);
        }
        let lookups = Lookups::of(items.iter().flat_map(|item| match &item.decision {
            Some(Decision::Persist(statements)) => statements.as_slice(),
            _ => &[],
        }));
        let before = changes::snapshot(tx, &lookups).await?;
        Ok(Some(DryRunBefore { lookups, before }))
    }

    /// For a dry run: reads the rows again after the statements ran and adds the difference to
    /// the run's changes. The caller then rolls the transaction back.
    pub(super) async fn dry_run_after(
        &self,
        tx: &mut PgConnection,
        run: Option<&Reprocessing>,
        before: DryRunBefore,
    ) -> Result<(), sqlx::Error> {
        let Some(changes) = run.and_then(|run| run.dry_run.as_ref()) else {
            return Ok(());
        };
        let after = changes::snapshot(tx, &before.lookups).await?;
        lock(changes).add(&before.lookups, &before.before, &after);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_identity_names_the_entry_and_the_run() {
        let run = Reprocessing {
            run: 7,
            emit: false,
            dry_run: None,
        };
        let identity = run.ledger_id("1700000000000-3");
        assert_eq!(identity, "1700000000000-3/reprocess:7");
        assert_eq!(entry_of_identity(&identity), "1700000000000-3");
        assert_eq!(entry_of_identity("5-0"), "5-0");
        assert_eq!(entry_of_identity("5-0/replay"), "5-0");
        assert_eq!(
            entry_of_identity(&run.ledger_id("5-0/replay")),
            "5-0",
            "a run's identity of a replayed dead letter"
        );
    }
}
