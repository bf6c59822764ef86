//! Step 4: the batch transaction — set-based first, entry by entry when a statement fails.

use super::{Decision, Handlers, Item, Role};
use crate::dead_letter::{DeadLetter, FailureKind};
use crate::failure::{self, Class, Contention, Dependency, StatementError, Unreachable};
use crate::persist::batch::{self, PlanFailure};
use crate::persist::execute;
use crate::persist::ledger::{self, Outcome};
use crate::persist::outbox::{self, OutboxMessage};
use crate::persist::plan::{self, Stage};
use crate::persist::schema::Links;
use crate::persist::validate::Statement;
use crate::plugin::Plugin;
use crate::rollout::Mode;
use crate::state::HostState;
use anyhow::{Context as _, Result};
use sqlx::PgConnection;
use tracing::debug;

/// How many set-based attempts a batch gets (each one decides at least one entry whose update
/// found no row) before it is run entry by entry.
const SET_BASED_ATTEMPTS: usize = 4;

/// How a set-based attempt at the batch transaction ended.
enum SetBased {
    /// Committed; these outbox messages are to be published.
    Committed(Vec<OutboxMessage>),
    /// Rolled back: these entries (batch positions) need a row that is not there.
    Missing(Vec<(usize, StatementError)>),
    /// Rolled back: a statement failed inside the database, entry unknown.
    Failed(String),
}

/// An error from a set-based step: an outage stops the batch, anything else sends it to the
/// entry-by-entry pass.
fn set_based_error(error: StatementError, step: &str) -> Result<SetBased> {
    match error {
        StatementError::Unavailable(error) => Err(error).with_context(|| {
            format!("the database failed while writing {step}; nothing was acknowledged")
        }),
        StatementError::Retry(reason) | StatementError::Permanent(reason) => {
            Ok(SetBased::Failed(format!("{step}: {reason}")))
        }
    }
}

impl HostState {
    /// The batch transaction. Returns the outbox messages to publish after commit.
    ///
    /// First set-based (see [`crate::persist::plan`]): a constant number of statements however
    /// large the batch. When updates that need their row find none, those entries are decided
    /// (retry or dead letter) and the batch runs again without them. When a statement fails
    /// inside the database, the batch is run entry by entry with a savepoint each, so that the
    /// failing entry is rolled back alone and decided.
    pub(super) async fn commit(
        &self,
        stream: &str,
        handlers: Handlers<'_>,
        items: &mut [Item],
    ) -> Result<Vec<OutboxMessage>> {
        for _ in 0..SET_BASED_ATTEMPTS {
            match self.commit_set_based(stream, handlers, items).await? {
                SetBased::Committed(messages) => return Ok(messages),
                SetBased::Missing(culprits) => {
                    for (index, error) in culprits {
                        let deliveries = items[index].entry.deliveries;
                        items[index].decision = Some(match error {
                            StatementError::Permanent(reason) => {
                                Decision::DeadLetter(FailureKind::Database, reason)
                            }
                            StatementError::Retry(reason) => self.retry_or_give_up(
                                FailureKind::RetriesExhausted,
                                reason,
                                deliveries,
                            ),
                            StatementError::Unavailable(error) => self.retry_or_give_up(
                                FailureKind::RetriesExhausted,
                                error.to_string(),
                                deliveries,
                            ),
                        });
                    }
                }
                SetBased::Failed(reason) => {
                    debug!(
                        stream,
                        "a set-based statement failed ({reason}); running the batch again entry by entry"
                    );
                    self.metrics
                        .batches_entry_by_entry
                        .get_or_create(&crate::metrics::ByStream::new(stream))
                        .inc();
                    break;
                }
            }
        }
        self.commit_with_savepoints(stream, handlers, items).await
    }

    /// One set-based attempt at the batch transaction: claim the ledger rows, run the plan, write
    /// the outbox, commit. Entries the ledger already had become [`Decision::Redelivered`].
    async fn commit_set_based(
        &self,
        stream: &str,
        handlers: Handlers<'_>,
        items: &mut [Item],
    ) -> Result<SetBased> {
        let claims = ledger_claims(items);
        if claims.is_empty() {
            return Ok(SetBased::Committed(Vec::new()));
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .context("cannot begin the batch transaction")?;
        let claimed = match self.claim(&mut tx, stream, handlers, claims).await {
            Ok(claimed) => claimed,
            Err(error) => return set_based_error(execute::statement_failed(error), "the ledger"),
        };
        mark_redelivered(items, &claimed);
        let dry_run = match self.dry_run_before(&mut tx, handlers.run, items).await {
            Ok(before) => before,
            Err(error) => return set_based_error(execute::statement_failed(error), "the dry run"),
        };

        let catalog = self.catalog();
        let (plan, emits) = plan::plan(
            items
                .iter()
                .enumerate()
                .filter_map(|(index, item)| match &item.decision {
                    Some(Decision::Persist(statements)) => Some((index, statements.as_slice())),
                    _ => None,
                }),
            catalog.links(),
        );
        let locks = batch::table_locks(&plan, &catalog);
        let outcome = match batch::lock_tables(&mut tx, &locks).await {
            Ok(()) => batch::run(&mut tx, &plan, &catalog).await,
            Err(error) => Err(PlanFailure::from(error)),
        };
        match outcome {
            Ok(()) => {}
            Err(PlanFailure::Statement(error)) => return set_based_error(error, "the batch"),
            Err(PlanFailure::Missing(culprits)) => {
                return Ok(SetBased::Missing(certain_culprits(&plan, culprits)));
            }
        }

        let mut outbox = Vec::new();
        if super::reprocessing::emits_allowed(handlers.run) {
            for emit in emits {
                outbox.push((self.config.stream_key(&emit.target), emit.fields));
            }
        }
        for item in items.iter() {
            if let Some(Decision::DeadLetter(kind, reason)) = &item.decision {
                let letter = dead_letter(stream, handlers, item, *kind, reason);
                outbox.push((self.config.dlq_key(), letter.to_stream_fields()));
            }
        }
        let messages = match outbox::enqueue_all(&mut tx, outbox).await {
            Ok(messages) => messages,
            Err(error) => return set_based_error(execute::statement_failed(error), "the outbox"),
        };
        // A canary's tally was added by its claim; a shadow's is added here.
        let shadow = handlers.rollout.filter(|r| r.mode == Mode::Shadow);
        if let Err(error) = self.tally_rollout(&mut tx, stream, shadow, items).await {
            return set_based_error(execute::statement_failed(error), "the rollout's tally");
        }
        if let Err(error) = self.tally_run(&mut tx, handlers.run, items).await {
            return set_based_error(execute::statement_failed(error), "the run's tally");
        }
        if let Some(before) = dry_run {
            // A dry run: what the batch changed is read, and nothing of it stays.
            if let Err(error) = self.dry_run_after(&mut tx, handlers.run, before).await {
                return set_based_error(execute::statement_failed(error), "the dry run");
            }
            return match tx.rollback().await {
                Ok(()) => Ok(SetBased::Committed(Vec::new())),
                Err(error) => set_based_error(execute::statement_failed(error), "ROLLBACK"),
            };
        }
        // COMMIT can fail for reasons of the batch's own (a deferred constraint, a serialisation
        // failure): like any other statement, that sends the batch to the entry-by-entry pass.
        match tx.commit().await {
            Ok(()) => Ok(SetBased::Committed(messages)),
            Err(error) => set_based_error(execute::statement_failed(error), "COMMIT"),
        }
    }

    /// Claims the ledger rows of `claims` (by the version that handled them): one statement,
    /// which under a canary also adds the rollout's tally. Returns the ids newly claimed.
    async fn claim(
        &self,
        tx: &mut PgConnection,
        stream: &str,
        handlers: Handlers<'_>,
        mut claims: Claims,
    ) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        let source = &self.source;
        let canary = handlers.rollout.filter(|r| r.mode == Mode::Canary);
        let Some(rollout) = canary else {
            let live = claims.remove(&Role::Live).unwrap_or_default();
            return ledger::claim(tx, source, stream, handler(handlers.live), &live).await;
        };
        let live = claims.remove(&Role::Live).unwrap_or_default();
        let candidate = claims.remove(&Role::Candidate).unwrap_or_default();
        ledger::claim_canary(
            tx,
            source,
            stream,
            (handler(handlers.live), &live),
            (handler(&rollout.candidate), &candidate),
            rollout.row.id,
            &self.config.consumer_name,
        )
        .await
    }

    /// The last resort for a batch whose transaction keeps failing for a reason no single
    /// statement was blamed for (say an error at COMMIT, or a dead letter that cannot be
    /// written): every entry gets a transaction of its own. An entry whose own transaction still
    /// fails is dead-lettered as `database` with the error, so the rest commit and the stream goes
    /// on. Only an outage (PostgreSQL unreachable) stops the pass; what committed before it stays
    /// committed, and the ledger makes it a redelivery next time.
    pub(super) async fn commit_each_alone(
        &self,
        stream: &str,
        handlers: Handlers<'_>,
        items: &mut [Item],
    ) -> Result<Vec<OutboxMessage>> {
        let mut messages = Vec::new();
        for index in 0..items.len() {
            let item = &mut items[index..=index];
            let error = match self.commit_with_savepoints(stream, handlers, item).await {
                Ok(committed) => {
                    messages.extend(committed);
                    continue;
                }
                Err(error) => error,
            };
            match failure::classify(&error) {
                Class::Outage(_) => return Err(error),
                // Contention (a lock wait past `lock_timeout`, a deadlock, a serialisation
                // failure) is nobody's fault: the entry is retried, counting against its
                // attempts, and only then given up.
                Class::Retryable => {
                    let reason = crate::text::causes(&error);
                    let deliveries = item[0].entry.deliveries;
                    item[0].decision = Some(self.retry_or_give_up(
                        FailureKind::RetriesExhausted,
                        reason.clone(),
                        deliveries,
                    ));
                    tracing::warn!(stream, entry = %item[0].entry.id, "{reason}; the entry is retried");
                    if matches!(item[0].decision, Some(Decision::DeadLetter(..))) {
                        let pending = Decision::Retry(FailureKind::RetriesExhausted, reason);
                        messages.extend(
                            self.commit_dead_letter_alone(stream, handlers, item, pending)
                                .await?,
                        );
                    }
                    continue;
                }
                Class::Permanent | Class::LostGroup => {}
            }
            // Before blaming the entry, make sure the database itself answers: an error no
            // classification foresaw may still be an outage, and an outage must never cost an
            // entry its place.
            if let Err(probe) = self.database_answers().await {
                return Err(anyhow::Error::new(Unreachable(
                    Dependency::Database,
                    format!(
                        "{probe} (the batch waits; its last error: {})",
                        crate::text::causes(&error)
                    ),
                )));
            }
            let reason = crate::text::sanitize(format!(
                "the entry's own transaction failed: {}",
                crate::text::causes(&error)
            ));
            tracing::warn!(stream, entry = %item[0].entry.id, "{reason}; dead-lettering it");
            item[0].decision = Some(Decision::DeadLetter(FailureKind::Database, reason.clone()));
            let pending = Decision::Retry(FailureKind::Database, reason);
            messages.extend(
                self.commit_dead_letter_alone(stream, handlers, item, pending)
                    .await?,
            );
        }
        Ok(messages)
    }

    /// Commits the dead letter of the one entry in `item` in a transaction of its own. When not
    /// even that can be written (and PostgreSQL is not down), the entry stays pending as
    /// `pending`, delivered again after the reclaim idle time.
    async fn commit_dead_letter_alone(
        &self,
        stream: &str,
        handlers: Handlers<'_>,
        item: &mut [Item],
        pending: Decision,
    ) -> Result<Vec<OutboxMessage>> {
        match self.commit_with_savepoints(stream, handlers, item).await {
            Ok(committed) => Ok(committed),
            Err(error) if failure::outage(&error).is_some() => Err(error),
            Err(error) => {
                tracing::error!(stream, entry = %item[0].entry.id,
                    "cannot dead-letter the entry either, it stays pending: {}", crate::text::causes(&error));
                item[0].decision = Some(pending);
                Ok(Vec::new())
            }
        }
    }

    /// The batch transaction entry by entry: each entry runs in a savepoint, so a failing entry
    /// is rolled back alone and decided (retry or dead letter) while the rest commit.
    async fn commit_with_savepoints(
        &self,
        stream: &str,
        handlers: Handlers<'_>,
        items: &mut [Item],
    ) -> Result<Vec<OutboxMessage>> {
        let needs_db = items.iter().any(|item| {
            matches!(
                item.decision,
                Some(Decision::Persist(_) | Decision::DeadLetter(..))
            )
        });
        if !needs_db {
            return Ok(Vec::new());
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .context("cannot begin the batch transaction")?;
        lock_every_table(&mut tx, items, self.catalog().links()).await?;
        let dry_run = self
            .dry_run_before(&mut tx, handlers.run, items)
            .await
            .map_err(|error| pass_failed(execute::statement_failed(error), "the dry run"))?;
        let emits = super::reprocessing::emits_allowed(handlers.run);
        let mut messages = Vec::new();
        for item in items.iter_mut() {
            if let Some(Decision::Persist(statements)) = &item.decision {
                savepoint(&mut tx, "SAVEPOINT entry").await?;
                let plugin = handlers.of_item(item);
                let outcome = self
                    .persist_entry(&mut tx, stream, plugin, &item.ledger_id, statements, emits)
                    .await;
                match outcome {
                    Ok(Some(emitted)) => {
                        savepoint(&mut tx, "RELEASE SAVEPOINT entry").await?;
                        messages.extend(emitted);
                    }
                    // Already in the ledger: nothing of this entry was written.
                    Ok(None) => {
                        savepoint(&mut tx, "RELEASE SAVEPOINT entry").await?;
                        item.decision = Some(Decision::Redelivered);
                    }
                    Err(StatementError::Unavailable(error)) => {
                        return Err(error).context(
                            "the database failed during the batch; nothing was acknowledged",
                        );
                    }
                    Err(StatementError::Retry(reason)) => {
                        savepoint(&mut tx, "ROLLBACK TO SAVEPOINT entry").await?;
                        item.decision = Some(self.retry_or_give_up(
                            FailureKind::RetriesExhausted,
                            reason,
                            item.entry.deliveries,
                        ));
                    }
                    Err(StatementError::Permanent(reason)) => {
                        savepoint(&mut tx, "ROLLBACK TO SAVEPOINT entry").await?;
                        item.decision = Some(Decision::DeadLetter(FailureKind::Database, reason));
                    }
                }
            }
            if matches!(item.decision, Some(Decision::DeadLetter(..))) {
                messages.extend(
                    self.record_dead_letter(&mut tx, stream, handlers, item)
                        .await?,
                );
            }
        }
        self.tally_rollout(&mut tx, stream, handlers.rollout, items)
            .await
            .map_err(|error| {
                pass_failed(
                    execute::statement_failed(error),
                    "cannot count the batch in its rollout's tally",
                )
            })?;
        self.tally_run(&mut tx, handlers.run, items)
            .await
            .map_err(|error| {
                pass_failed(
                    execute::statement_failed(error),
                    "cannot count the batch in its run's tally",
                )
            })?;
        if let Some(before) = dry_run {
            self.dry_run_after(&mut tx, handlers.run, before)
                .await
                .map_err(|error| pass_failed(execute::statement_failed(error), "the dry run"))?;
            tx.rollback()
                .await
                .map_err(|error| pass_failed(execute::statement_failed(error), "ROLLBACK"))?;
            return Ok(Vec::new());
        }
        tx.commit().await.map_err(|error| {
            pass_failed(
                execute::statement_failed(error),
                "cannot commit the batch transaction",
            )
        })?;
        Ok(messages)
    }

    /// Records a dead-lettered entry in the ledger and writes its dead letter to the outbox; an
    /// entry the ledger already had becomes [`Decision::Redelivered`] and writes nothing.
    async fn record_dead_letter(
        &self,
        tx: &mut PgConnection,
        stream: &str,
        handlers: Handlers<'_>,
        item: &mut Item,
    ) -> Result<Option<OutboxMessage>> {
        let Some(Decision::DeadLetter(kind, reason)) = &item.decision else {
            return Ok(None);
        };
        let plugin = handlers.of_item(item);
        let recorded = ledger::record(
            &mut *tx,
            &self.source,
            stream,
            &item.ledger_id,
            handler(plugin),
            Outcome::DeadLettered,
        )
        .await
        .context("cannot record a dead letter in the ledger")?;
        if !recorded {
            item.decision = Some(Decision::Redelivered);
            return Ok(None);
        }
        let letter = dead_letter(stream, handlers, item, *kind, reason);
        let message = outbox::enqueue(tx, &self.config.dlq_key(), letter.to_stream_fields())
            .await
            .context("cannot write a dead letter to the outbox")?;
        Ok(Some(message))
    }

    /// Ledger row (under `entry_id`, the entry's ledger identity), statements and emits (unless
    /// a reprocessing run leaves them out: `emits` false) of one entry. `Ok(None)`: the ledger
    /// already had it.
    async fn persist_entry(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        plugin: &Plugin,
        entry_id: &str,
        statements: &[Statement],
        emits: bool,
    ) -> Result<Option<Vec<OutboxMessage>>, StatementError> {
        let recorded = ledger::record(
            conn,
            &self.source,
            stream,
            entry_id,
            handler(plugin),
            Outcome::Processed,
        )
        .await
        .map_err(execute::statement_failed)?;
        if !recorded {
            return Ok(None);
        }
        let mut emitted = Vec::new();
        for statement in statements {
            match statement {
                Statement::Emit { .. } if !emits => {}
                Statement::Emit { target, fields } => {
                    let message =
                        outbox::enqueue(conn, &self.config.stream_key(target), fields.clone())
                            .await
                            .map_err(execute::statement_failed)?;
                    emitted.push(message);
                }
                other => execute::execute(conn, other).await?,
            }
        }
        Ok(Some(emitted))
    }
}

/// A step of an entry-by-entry pass (`what` it was doing) that failed in the database,
/// classified: contention is retried, an outage waited out, anything else is the pass's own
/// failure.
fn pass_failed(error: StatementError, what: &str) -> anyhow::Error {
    match error {
        StatementError::Retry(reason) => {
            anyhow::Error::new(Contention(format!("{what}: {reason}")))
        }
        StatementError::Unavailable(error) => {
            anyhow::Error::new(error).context(format!("{what}; nothing was acknowledged"))
        }
        StatementError::Permanent(reason) => {
            anyhow::Error::new(StatementError::Permanent(format!("{what}: {reason}")))
        }
    }
}

/// The ledger's record of the plugin that handled an entry.
fn handler(plugin: &Plugin) -> ledger::Handler<'_> {
    ledger::Handler {
        name: &plugin.name,
        version: &plugin.version,
        build: plugin.build(),
    }
}

/// The dead letter of `item` (tagged with the reprocessing run, if the batch is one's).
fn dead_letter(
    stream: &str,
    handlers: Handlers<'_>,
    item: &Item,
    kind: FailureKind,
    reason: &str,
) -> DeadLetter {
    let plugin = handlers.of_item(item);
    DeadLetter {
        reprocess_run: handlers.run.map(|run| run.run),
        source_stream: stream.to_string(),
        source_id: item.entry.id.clone(),
        kind,
        error: reason.to_string(),
        plugin: plugin.name.clone(),
        plugin_version: plugin.version.clone(),
        plugin_build: plugin.build().to_string(),
        deliveries: item.entry.deliveries,
        fields: item.fields.clone(),
        lossy_fields: item.lossy_fields.clone(),
    }
}

async fn savepoint(conn: &mut PgConnection, sql: &'static str) -> Result<()> {
    let done = sqlx::query(sql).execute(conn).await;
    crate::persist::answers::answered();
    done.with_context(|| format!("`{sql}` failed"))?;
    Ok(())
}

/// The ledger rows of a batch, by the version that handled their entries.
type Claims = std::collections::BTreeMap<Role, Vec<(String, Outcome)>>;

/// The ledger rows a batch claims: every entry decided to be persisted or dead-lettered, by the
/// version that handled it.
fn ledger_claims(items: &[Item]) -> Claims {
    let mut claims = Claims::new();
    for item in items {
        let Some(outcome) = item.finished() else {
            continue;
        };
        claims
            .entry(item.role)
            .or_default()
            .push((item.ledger_id.clone(), outcome));
    }
    claims
}

/// Entries whose ledger row was not newly `claimed` were finished before (an earlier delivery,
/// or another host that won the race): they become [`Decision::Redelivered`] and run nothing.
fn mark_redelivered(items: &mut [Item], claimed: &std::collections::HashSet<String>) {
    for item in items.iter_mut() {
        let finished = matches!(
            item.decision,
            Some(Decision::Persist(_) | Decision::DeadLetter(..))
        );
        if finished && !claimed.contains(&item.ledger_id) {
            item.decision = Some(Decision::Redelivered);
        }
    }
}

/// The entries certain to miss their row on their own, among those that missed it in the batch.
/// Without deletes or single statements, an entry's missing row cannot have been removed by a
/// neighbour, so every culprit would miss its row alone too; otherwise only the first one is
/// certain, and the next attempt finds the others.
fn certain_culprits(
    plan: &plan::Plan,
    mut culprits: Vec<(usize, StatementError)>,
) -> Vec<(usize, StatementError)> {
    let exact = !plan
        .stages
        .iter()
        .any(|s| matches!(s, Stage::Delete { .. } | Stage::Single { .. }));
    culprits.sort_by_key(|(index, _)| *index);
    culprits.dedup_by_key(|(index, _)| *index);
    if !exact {
        culprits.truncate(1);
    }
    culprits
}

/// Takes every table the batch writes exclusively: entry by entry, rows are not locked in key
/// order, so concurrent batches must not interleave on them.
async fn lock_every_table(tx: &mut PgConnection, items: &[Item], links: &Links) -> Result<()> {
    let tables = items.iter().flat_map(|item| match &item.decision {
        Some(Decision::Persist(statements)) => statements
            .iter()
            .filter(|s| !matches!(s, Statement::Emit { .. }))
            .map(plan::statement_table)
            .collect::<Vec<_>>(),
        _ => Vec::new(),
    });
    let locks = batch::entry_by_entry_locks(tables, links);
    batch::lock_tables(tx, &locks)
        .await
        .map_err(|error| pass_failed(error, "cannot lock the batch's tables"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::StreamEntry;
    use std::collections::HashSet;

    fn item(id: &str, decision: Option<Decision>) -> Item {
        Item {
            entry: StreamEntry {
                id: id.to_string(),
                fields: Vec::new(),
                lossy_names: Vec::new(),
                deliveries: 1,
            },
            ledger_id: id.to_string(),
            fields: Vec::new(),
            correlation_id: String::new(),
            decision,
            lossy_fields: Vec::new(),
            role: Role::Live,
            shadow: None,
        }
    }

    fn persist() -> Option<Decision> {
        Some(Decision::Persist(Vec::new()))
    }

    #[test]
    fn the_ledger_claims_what_is_persisted_or_dead_lettered_and_nothing_else() {
        let items = [
            item("1-0", persist()),
            item(
                "2-0",
                Some(Decision::DeadLetter(FailureKind::Malformed, "x".into())),
            ),
            item(
                "3-0",
                Some(Decision::Retry(FailureKind::Timeout, "x".into())),
            ),
            item("4-0", Some(Decision::Redelivered)),
            item("5-0", None),
        ];
        let claims = ledger_claims(&items);
        assert_eq!(
            claims,
            Claims::from([(
                Role::Live,
                vec![
                    ("1-0".to_string(), Outcome::Processed),
                    ("2-0".to_string(), Outcome::DeadLettered)
                ]
            )])
        );
    }

    #[test]
    fn entries_the_ledger_did_not_newly_claim_become_redeliveries() {
        let mut items = [
            item("1-0", persist()),
            item("2-0", persist()),
            item(
                "3-0",
                Some(Decision::Retry(FailureKind::Timeout, "x".into())),
            ),
        ];
        let claimed: HashSet<String> = ["1-0".to_string()].into();
        mark_redelivered(&mut items, &claimed);
        assert!(matches!(items[0].decision, Some(Decision::Persist(_))));
        assert!(matches!(items[1].decision, Some(Decision::Redelivered)));
        // Not finished by this batch, so not the ledger's to decide.
        assert!(matches!(items[2].decision, Some(Decision::Retry(..))));
    }

    fn culprits(indexes: &[usize]) -> Vec<(usize, StatementError)> {
        indexes
            .iter()
            .map(|&i| (i, StatementError::Retry(format!("no row for {i}"))))
            .collect()
    }

    #[test]
    fn without_deletes_every_entry_that_missed_its_row_is_certain_to_miss_it_alone() {
        let plan = plan::Plan {
            stages: Vec::new(),
            in_table_order: true,
        };
        let certain = certain_culprits(&plan, culprits(&[4, 1, 4, 2]));
        let indexes: Vec<usize> = certain.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 2, 4], "sorted, each once");
    }

    #[test]
    fn with_a_delete_in_the_batch_only_the_first_culprit_is_certain() {
        let plan = plan::Plan {
            stages: vec![Stage::Delete {
                table: "media".into(),
                key_columns: vec!["id".into()],
                rows: Vec::new(),
            }],
            in_table_order: true,
        };
        let certain = certain_culprits(&plan, culprits(&[3, 1]));
        let indexes: Vec<usize> = certain.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1]);
    }
}
