//! The delivery protocol for one batch of entries from one stream (BRIEF §3).
//!
//! 1. `init` sentinels are acknowledged and skipped.
//! 2. Entries already in the ledger (redeliveries) are acknowledged without running anything.
//! 3. Every other entry goes to the handler plugin of its stream, on a blocking thread, each on a
//!    fresh instance: a trap, timeout or memory-limit hit fails that entry only.
//! 4. Commands are validated against the live schema.
//! 5. One transaction: per entry, the ledger row, the commands and the outbox messages (emits).
//!    When an entry fails inside the database, the transaction is rolled back and run again with
//!    a savepoint per entry, so the error rolls back that entry only. Dead letters are
//!    written to the ledger and the outbox in the same transaction.
//! 6. After commit: outbox messages are published, then the finished entries are acknowledged.
//!
//! Entries that should be retried are not acknowledged; they stay pending and the reclaim loop
//! delivers them again after the idle time, until `ML_RETRY_ATTEMPTS` deliveries, when they are
//! dead-lettered with their last error.

use crate::config::Config;
use crate::deadletter::{DeadLetter, FailureKind};
use crate::metrics::{Metrics, labels};
use crate::persist::batch::{self, PlanFailure};
use crate::persist::execute::{self, ExecError};
use crate::persist::ledger::{self, OutboxMessage, Outcome};
use crate::persist::plan::{self, Stage};
use crate::persist::schema::Catalog;
use crate::persist::validate::{self, Statement};
use crate::plugin::{HandlerOutcome, Plugin, PluginRegistry, wit};
use crate::streams::{self, StreamEntry};
use anyhow::{Context as _, Result};
use redis::aio::ConnectionManager;
use sqlx::{PgConnection, PgPool};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::{Instrument, debug, info, warn};

/// How often the catalogue may be re-read when a command names an unknown table or column
/// (a migration may have added it since start-up).
const CATALOG_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// What the protocol needs, shared by every stream's consumer task.
pub struct Delivery {
    pub config: Arc<Config>,
    /// Outages of PostgreSQL and Redis, for readiness.
    pub health: crate::health::Health,
    /// Counters and latency histograms for `/metrics`.
    pub metrics: Metrics,
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub registry: Arc<PluginRegistry>,
    catalog: RwLock<(Arc<Catalog>, Instant)>,
}

/// Counts of what happened to one batch (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub sentinels: usize,
    pub processed: usize,
    pub redelivered: usize,
    pub dead_lettered: usize,
    pub retrying: usize,
}

/// How many set-based attempts a batch gets (each one decides at least one entry whose update
/// found no row) before it is run entry by entry.
const SET_BASED_ATTEMPTS: usize = 4;

/// How a set-based attempt at the batch transaction ended.
enum SetBased {
    /// Committed; these outbox messages are to be published.
    Committed(Vec<OutboxMessage>),
    /// Rolled back: these entries (batch positions) need a row that is not there.
    Missing(Vec<(usize, ExecError)>),
    /// Rolled back: a statement failed inside the database, entry unknown.
    Failed(String),
}

/// An error from a set-based step: an outage stops the batch, anything else sends it to the
/// entry-by-entry pass.
fn set_based_error(error: ExecError, step: &str) -> Result<SetBased> {
    match error {
        ExecError::Unavailable(error) => Err(error).with_context(|| {
            format!("the database failed while writing {step}; nothing was acknowledged")
        }),
        ExecError::Retry(reason) | ExecError::Permanent(reason) => Ok(SetBased::Failed(reason)),
    }
}

/// What the protocol decided for one entry.
enum Decision {
    /// Run these statements (and record the entry as processed).
    Persist(Vec<Statement>),
    /// Send to the dead-letter stream.
    DeadLetter(FailureKind, String),
    /// Leave pending for another delivery.
    Retry(FailureKind, String),
    /// Acknowledge without doing anything (already in the ledger).
    Redelivered,
}

/// A batch whose handlers have run, waiting for its transaction and acknowledgement.
pub struct PreparedBatch {
    stream: String,
    plugin: Arc<Plugin>,
    items: Vec<Item>,
    /// Ids of `init` sentinels, acknowledged with the rest.
    sentinels: Vec<String>,
    started: Instant,
    span: tracing::Span,
}

impl PreparedBatch {
    /// The stream the batch was read from (logical name).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// How many entries the batch holds.
    pub fn len(&self) -> usize {
        self.items.len() + self.sentinels.len()
    }

    /// Whether the batch holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One entry on its way through the batch.
struct Item {
    entry: StreamEntry,
    /// Decoded fields (lossy for dead letters of non-UTF-8 entries).
    fields: Vec<(String, String)>,
    correlation_id: String,
    decision: Option<Decision>,
}

impl Delivery {
    /// Shares the connections, configuration, plugins and catalogue among consumer tasks.
    pub fn new(
        config: Arc<Config>,
        pool: PgPool,
        redis: ConnectionManager,
        registry: Arc<PluginRegistry>,
        catalog: Catalog,
    ) -> Self {
        Self {
            config,
            health: crate::health::Health::default(),
            metrics: Metrics::default(),
            pool,
            redis,
            registry,
            catalog: RwLock::new((Arc::new(catalog), Instant::now())),
        }
    }

    fn catalog(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Re-reads the catalogue unless that happened recently; returns whether it did.
    async fn refresh_catalog(&self) -> Result<bool> {
        let stale = match self.catalog.read() {
            Ok(guard) => guard.1.elapsed() >= CATALOG_REFRESH_INTERVAL,
            Err(_) => true,
        };
        if !stale {
            return Ok(false);
        }
        let fresh = Arc::new(Catalog::load(&self.pool).await?);
        match self.catalog.write() {
            Ok(mut guard) => *guard = (fresh, Instant::now()),
            Err(poisoned) => *poisoned.into_inner() = (fresh, Instant::now()),
        }
        Ok(true)
    }

    /// Runs the protocol on `entries` of `stream` (a logical stream name): [`Delivery::prepare`]
    /// then [`Delivery::finish`]. An `Err` means the infrastructure failed (database or Redis
    /// unreachable): nothing of the batch was acknowledged and its entries stay pending.
    pub async fn process_batch(
        &self,
        stream: &str,
        entries: Vec<StreamEntry>,
    ) -> Result<BatchReport> {
        match self.prepare(stream, entries).await? {
            Some(mut batch) => self.finish(&mut batch).await,
            None => Ok(BatchReport::default()),
        }
    }

    /// The first half of the protocol, which needs no database: triage, then the handlers and
    /// the validation of their commands. `None` when no plugin handles the stream (any more);
    /// the entries then stay pending for when one does.
    ///
    /// Separate from [`Delivery::finish`] so that a consumer can prepare the next batch while
    /// the previous one commits.
    pub async fn prepare(
        &self,
        stream: &str,
        entries: Vec<StreamEntry>,
    ) -> Result<Option<PreparedBatch>> {
        let started = Instant::now();
        let Some(plugin) = self.registry.snapshot().for_stream(stream) else {
            warn!(
                stream,
                count = entries.len(),
                "no plugin handles this stream any more; entries stay pending"
            );
            return Ok(None);
        };
        let span = tracing::info_span!("batch", stream, plugin = %plugin.name, version = %plugin.version, size = entries.len());
        let mut sentinels = Vec::new();
        let mut items = Vec::new();
        for entry in entries {
            if is_init_sentinel(&entry) {
                sentinels.push(entry.id);
                continue;
            }
            items.push(self.triage(entry));
        }
        self.run_handlers(stream, &plugin, &mut items)
            .instrument(span.clone())
            .await?;
        Ok(Some(PreparedBatch {
            stream: stream.to_string(),
            plugin,
            items,
            sentinels,
            started,
            span,
        }))
    }

    /// The second half: the batch transaction, then publishing its outbox messages and
    /// acknowledging what is finished. May be called again for the same batch after an `Err`
    /// (an outage): decisions already taken stay valid, and the ledger turns whatever did
    /// commit into redeliveries.
    pub async fn finish(&self, batch: &mut PreparedBatch) -> Result<BatchReport> {
        let span = batch.span.clone();
        let report = self.commit_and_ack(batch).instrument(span).await?;
        self.metrics.observe(
            "kaleidoscope_batch_duration_seconds",
            labels(&[("stream", &batch.stream)]),
            batch.started.elapsed(),
        );
        Ok(report)
    }

    /// [`Delivery::finish`] inside the batch's span.
    async fn commit_and_ack(&self, batch: &mut PreparedBatch) -> Result<BatchReport> {
        let stream = batch.stream.as_str();
        let plugin = &batch.plugin;
        let key = self.config.stream_key(stream);
        let mut report = BatchReport {
            sentinels: batch.sentinels.len(),
            ..BatchReport::default()
        };
        let mut acks = batch.sentinels.clone();
        let messages = self.commit(stream, plugin, &mut batch.items).await?;
        let items = &batch.items;

        for item in items {
            let entry = &item.entry;
            let correlation_id = item.correlation_id.as_str();
            let _entry = tracing::info_span!("entry", entry = %entry.id, correlation_id).entered();
            match &item.decision {
                Some(Decision::Persist(_)) => {
                    report.processed += 1;
                    acks.push(entry.id.clone());
                    debug!(stream, entry = %entry.id, correlation_id, plugin = %plugin.name, version = %plugin.version, "processed");
                }
                Some(Decision::Redelivered) => {
                    report.redelivered += 1;
                    acks.push(entry.id.clone());
                    debug!(stream, entry = %entry.id, correlation_id, "already processed; acknowledged without running again");
                }
                Some(Decision::DeadLetter(kind, reason)) => {
                    report.dead_lettered += 1;
                    acks.push(entry.id.clone());
                    warn!(stream, entry = %entry.id, correlation_id, kind = %kind, deliveries = entry.deliveries, "dead-lettered: {reason}");
                }
                Some(Decision::Retry(kind, reason)) => {
                    report.retrying += 1;
                    info!(stream, entry = %entry.id, correlation_id, gives_up_as = %kind, deliveries = entry.deliveries,
                        attempts = self.config.retry_attempts, "will retry after the reclaim idle time: {reason}");
                }
                None => {}
            }
        }

        let to_publish: Vec<(String, Vec<(String, String)>)> = messages
            .iter()
            .map(|m| (m.stream_key.clone(), m.fields.clone()))
            .collect();
        let mut redis = self.redis.clone();
        streams::publish_then_ack(&mut redis, &to_publish, &key, &self.config.consumer_group, &acks)
            .await
            .context("entries are committed; their outbox messages will be published by the relay and the entries acknowledged on redelivery")?;
        let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
        if let Err(error) = ledger::remove(&self.pool, &ids).await {
            // Harmless: the relay publishes them again later (at-least-once).
            warn!("{error:#}");
        }
        self.count(stream, plugin, items, report.sentinels);
        Ok(report)
    }

    /// Updates the counters once a batch is acknowledged.
    fn count(&self, stream: &str, plugin: &Plugin, items: &[Item], sentinels: usize) {
        let m = &self.metrics;
        m.add(
            "kaleidoscope_sentinels_total",
            labels(&[("stream", stream)]),
            sentinels as u64,
        );
        for item in items {
            match &item.decision {
                Some(Decision::Persist(_)) => m.add(
                    "kaleidoscope_entries_processed_total",
                    labels(&[("stream", stream), ("plugin", &plugin.name)]),
                    1,
                ),
                Some(Decision::Redelivered) => m.add(
                    "kaleidoscope_entries_redelivered_total",
                    labels(&[("stream", stream)]),
                    1,
                ),
                Some(Decision::DeadLetter(kind, _)) => m.add(
                    "kaleidoscope_entries_dead_lettered_total",
                    labels(&[
                        ("stream", stream),
                        ("plugin", &plugin.name),
                        ("kind", kind.as_str()),
                    ]),
                    1,
                ),
                Some(Decision::Retry(kind, _)) => m.add(
                    "kaleidoscope_entries_retried_total",
                    labels(&[
                        ("stream", stream),
                        ("plugin", &plugin.name),
                        ("kind", kind.as_str()),
                    ]),
                    1,
                ),
                None => {}
            }
        }
    }

    /// Decodes an entry and decides what needs no handler: non-UTF-8 values and entries delivered
    /// more often than allowed (e.g. ones that crashed a host every time).
    fn triage(&self, entry: StreamEntry) -> Item {
        let mut bad_field = None;
        let fields: Vec<(String, String)> = entry
            .fields
            .iter()
            .map(|(name, value)| match std::str::from_utf8(value) {
                Ok(text) => (name.clone(), text.to_string()),
                Err(_) => {
                    bad_field.get_or_insert_with(|| name.clone());
                    (name.clone(), String::from_utf8_lossy(value).into_owned())
                }
            })
            .collect();
        let correlation_id = fields
            .iter()
            .find(|(k, _)| k == "correlationId")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let decision = if let Some(field) = bad_field {
            Some(Decision::DeadLetter(
                FailureKind::Malformed,
                format!("field `{field}` is not valid UTF-8"),
            ))
        } else if entry.deliveries > self.config.retry_attempts {
            Some(Decision::DeadLetter(
                FailureKind::RetriesExhausted,
                format!(
                    "delivered {} times, more than ML_RETRY_ATTEMPTS = {}, without being finished (did the host stop while handling it?)",
                    entry.deliveries, self.config.retry_attempts
                ),
            ))
        } else {
            None
        };
        Item {
            entry,
            fields,
            correlation_id,
            decision,
        }
    }

    /// Calls the handler for every undecided entry (on a blocking thread) and validates the
    /// commands it returns.
    async fn run_handlers(
        &self,
        stream: &str,
        plugin: &Arc<Plugin>,
        items: &mut [Item],
    ) -> Result<()> {
        let inputs: Vec<(usize, wit::Entry)> = items
            .iter()
            .enumerate()
            .filter(|(_, item)| item.decision.is_none())
            .map(|(index, item)| {
                (
                    index,
                    wit::Entry {
                        source: stream.to_string(),
                        id: item.entry.id.clone(),
                        fields: item.fields.clone(),
                        deliveries: item.entry.deliveries,
                    },
                )
            })
            .collect();
        if inputs.is_empty() {
            return Ok(());
        }
        let handler = plugin.clone();
        let batch_span = tracing::Span::current();
        let outcomes = tokio::task::spawn_blocking(move || {
            inputs
                .into_iter()
                .map(|(index, entry)| {
                    let correlation_id = entry.fields.iter().find(|(k, _)| k == "correlationId").map(|(_, v)| v.as_str()).unwrap_or("");
                    let _entry = tracing::info_span!(parent: &batch_span, "entry", entry = %entry.id, correlation_id).entered();
                    let started = Instant::now();
                    let outcome = handler.handle(&entry);
                    (index, outcome, started.elapsed())
                })
                .collect::<Vec<_>>()
        })
        .await
        .context("the plugin call thread failed")?;

        let mut catalog = self.catalog();
        let policy = self.config.policy(&plugin.name);
        for (index, outcome, elapsed) in outcomes {
            self.metrics.observe(
                "kaleidoscope_handler_duration_seconds",
                labels(&[("plugin", &plugin.name)]),
                elapsed,
            );
            let deliveries = items[index].entry.deliveries;
            let decision = match outcome {
                HandlerOutcome::Commands(commands) => {
                    let mut checked = validate::validate(&plugin.name, &policy, commands.clone(), &catalog);
                    if matches!(&checked, Err(reason) if reason.contains("does not exist")) && self.refresh_catalog().await? {
                        catalog = self.catalog();
                        checked = validate::validate(&plugin.name, &policy, commands, &catalog);
                    }
                    match checked {
                        Ok(statements) => Decision::Persist(statements),
                        Err(reason) => Decision::DeadLetter(FailureKind::ForbiddenCommand, reason),
                    }
                }
                HandlerOutcome::Malformed(reason) => Decision::DeadLetter(FailureKind::Malformed, reason),
                HandlerOutcome::Retry(reason) => self.retry_or_give_up(FailureKind::RetriesExhausted, reason, deliveries),
                HandlerOutcome::Trap(message) => {
                    self.retry_or_give_up(FailureKind::PluginTrap, format!("plugin trapped: {message}"), deliveries)
                }
                HandlerOutcome::Timeout(after) => self.retry_or_give_up(
                    FailureKind::Timeout,
                    format!("plugin did not return within {after:?}"),
                    deliveries,
                ),
                HandlerOutcome::MemoryLimit { requested } => self.retry_or_give_up(
                    FailureKind::MemoryLimit,
                    format!(
                        "plugin tried to grow its memory to {requested} bytes, over the cap of {} bytes",
                        plugin.limits().memory_bytes
                    ),
                    deliveries,
                ),
            };
            items[index].decision = Some(decision);
        }
        Ok(())
    }

    /// A retry while attempts remain, else a dead letter of `kind` with the last error.
    fn retry_or_give_up(&self, kind: FailureKind, reason: String, deliveries: u32) -> Decision {
        if deliveries >= self.config.retry_attempts {
            Decision::DeadLetter(
                kind,
                format!("{reason} (gave up after {deliveries} deliveries)"),
            )
        } else {
            Decision::Retry(kind, reason)
        }
    }

    /// The batch transaction. Returns the outbox messages to publish after commit.
    ///
    /// First set-based (see [`crate::persist::plan`]): a constant number of statements however
    /// large the batch. When updates that need their row find none, those entries are decided
    /// (retry or dead letter) and the batch runs again without them. When a statement fails
    /// inside the database, the batch is run entry by entry with a savepoint each, so that the
    /// failing entry is rolled back alone and decided.
    async fn commit(
        &self,
        stream: &str,
        plugin: &Plugin,
        items: &mut [Item],
    ) -> Result<Vec<OutboxMessage>> {
        for _ in 0..SET_BASED_ATTEMPTS {
            match self.commit_set_based(stream, plugin, items).await? {
                SetBased::Committed(messages) => return Ok(messages),
                SetBased::Missing(culprits) => {
                    for (index, error) in culprits {
                        let deliveries = items[index].entry.deliveries;
                        items[index].decision = Some(match error {
                            ExecError::Permanent(reason) => {
                                Decision::DeadLetter(FailureKind::Database, reason)
                            }
                            ExecError::Retry(reason) => self.retry_or_give_up(
                                FailureKind::RetriesExhausted,
                                reason,
                                deliveries,
                            ),
                            ExecError::Unavailable(error) => self.retry_or_give_up(
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
                    break;
                }
            }
        }
        self.commit_pass(stream, plugin, items, true)
            .await?
            .context("the isolated pass asked for isolation")
    }

    /// One set-based attempt at the batch transaction: claim the ledger rows, run the plan, write
    /// the outbox, commit. Entries the ledger already had become [`Decision::Redelivered`].
    async fn commit_set_based(
        &self,
        stream: &str,
        plugin: &Plugin,
        items: &mut [Item],
    ) -> Result<SetBased> {
        let claims: Vec<(String, Outcome)> = items
            .iter()
            .filter_map(|item| match item.decision {
                Some(Decision::Persist(_)) => Some((item.entry.id.clone(), Outcome::Processed)),
                Some(Decision::DeadLetter(..)) => {
                    Some((item.entry.id.clone(), Outcome::DeadLettered))
                }
                _ => None,
            })
            .collect();
        if claims.is_empty() {
            return Ok(SetBased::Committed(Vec::new()));
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .context("cannot begin the batch transaction")?;
        let claimed =
            match ledger::claim(&mut tx, stream, &plugin.name, &plugin.version, &claims).await {
                Ok(claimed) => claimed,
                Err(error) => return set_based_error(execute::classify(error), "the ledger"),
            };
        for item in items.iter_mut() {
            let finished = matches!(
                item.decision,
                Some(Decision::Persist(_) | Decision::DeadLetter(..))
            );
            if finished && !claimed.contains(&item.entry.id) {
                item.decision = Some(Decision::Redelivered);
            }
        }

        let (plan, emits) =
            plan::plan(
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(index, item)| match &item.decision {
                        Some(Decision::Persist(statements)) => Some((index, statements.as_slice())),
                        _ => None,
                    }),
            );
        let outcome = match batch::lock_tables(&mut tx, plan.tables()).await {
            Ok(()) => batch::run(&mut tx, &plan).await,
            Err(error) => Err(PlanFailure::from(error)),
        };
        match outcome {
            Ok(()) => {}
            Err(PlanFailure::Unavailable(error)) => {
                return Err(error)
                    .context("the database failed during the batch; nothing was acknowledged");
            }
            Err(PlanFailure::Failed(reason)) => return Ok(SetBased::Failed(reason)),
            Err(PlanFailure::Missing(mut culprits)) => {
                // Without deletes or single statements, an entry's missing row cannot have been
                // removed by a neighbour, so every culprit would miss its row on its own too.
                // Otherwise only the first one is certain; the next attempt finds the others.
                let exact = !plan
                    .stages
                    .iter()
                    .any(|s| matches!(s, Stage::Delete { .. } | Stage::Single { .. }));
                culprits.sort_by_key(|(index, _)| *index);
                culprits.dedup_by_key(|(index, _)| *index);
                if !exact {
                    culprits.truncate(1);
                }
                return Ok(SetBased::Missing(culprits));
            }
        }

        let mut outbox = Vec::new();
        for emit in emits {
            outbox.push((self.config.stream_key(&emit.target), emit.fields));
        }
        for item in items.iter() {
            if let Some(Decision::DeadLetter(kind, reason)) = &item.decision {
                let letter = DeadLetter {
                    source_stream: stream.to_string(),
                    source_id: item.entry.id.clone(),
                    kind: *kind,
                    error: reason.clone(),
                    plugin: plugin.name.clone(),
                    plugin_version: plugin.version.clone(),
                    deliveries: item.entry.deliveries,
                    fields: item.fields.clone(),
                };
                outbox.push((self.config.dlq_key(), letter.to_stream_fields()));
            }
        }
        let messages = match ledger::enqueue_all(&mut tx, outbox).await {
            Ok(messages) => messages,
            Err(error) => return set_based_error(execute::classify(error), "the outbox"),
        };
        tx.commit()
            .await
            .context("cannot commit the batch transaction")?;
        Ok(SetBased::Committed(messages))
    }

    /// One attempt at the batch transaction. Without `isolate`, returns `None` (and rolls back)
    /// as soon as an entry fails inside the database; with it, each entry runs in a savepoint
    /// and a failing entry is rolled back alone and decided (retry or dead letter).
    async fn commit_pass(
        &self,
        stream: &str,
        plugin: &Plugin,
        items: &mut [Item],
        isolate: bool,
    ) -> Result<Option<Vec<OutboxMessage>>> {
        let needs_db = items.iter().any(|item| {
            matches!(
                item.decision,
                Some(Decision::Persist(_) | Decision::DeadLetter(..))
            )
        });
        if !needs_db {
            return Ok(Some(Vec::new()));
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .context("cannot begin the batch transaction")?;
        // The same table locks as the set-based pass, so the two never wait on each other's rows.
        let tables = items.iter().flat_map(|item| match &item.decision {
            Some(Decision::Persist(statements)) => statements
                .iter()
                .filter(|s| !matches!(s, Statement::Emit { .. }))
                .map(plan::statement_table)
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        });
        if let Err(error) = batch::lock_tables(&mut tx, tables).await {
            return match error {
                ExecError::Unavailable(error) => Err(error)
                    .context("the database failed during the batch; nothing was acknowledged"),
                ExecError::Retry(reason) | ExecError::Permanent(reason) => {
                    Err(anyhow::anyhow!("cannot lock the batch's tables: {reason}"))
                }
            };
        }
        let mut messages = Vec::new();
        for item in items.iter_mut() {
            if let Some(Decision::Persist(statements)) = &item.decision {
                if isolate {
                    savepoint(&mut tx, "SAVEPOINT entry").await?;
                }
                let outcome = self
                    .persist_entry(&mut tx, stream, plugin, &item.entry.id, statements)
                    .await;
                match outcome {
                    Ok(Some(emitted)) => {
                        if isolate {
                            savepoint(&mut tx, "RELEASE SAVEPOINT entry").await?;
                        }
                        messages.extend(emitted);
                    }
                    // Already in the ledger: nothing of this entry was written.
                    Ok(None) => {
                        if isolate {
                            savepoint(&mut tx, "RELEASE SAVEPOINT entry").await?;
                        }
                        item.decision = Some(Decision::Redelivered);
                    }
                    Err(ExecError::Unavailable(error)) => {
                        return Err(error).context(
                            "the database failed during the batch; nothing was acknowledged",
                        );
                    }
                    // The transaction is aborted; dropping it rolls back.
                    Err(ExecError::Retry(_) | ExecError::Permanent(_)) if !isolate => {
                        return Ok(None);
                    }
                    Err(ExecError::Retry(reason)) => {
                        savepoint(&mut tx, "ROLLBACK TO SAVEPOINT entry").await?;
                        item.decision = Some(self.retry_or_give_up(
                            FailureKind::RetriesExhausted,
                            reason,
                            item.entry.deliveries,
                        ));
                    }
                    Err(ExecError::Permanent(reason)) => {
                        savepoint(&mut tx, "ROLLBACK TO SAVEPOINT entry").await?;
                        item.decision = Some(Decision::DeadLetter(FailureKind::Database, reason));
                    }
                }
            }
            if let Some(Decision::DeadLetter(kind, reason)) = &item.decision {
                let recorded = ledger::record(
                    &mut tx,
                    stream,
                    &item.entry.id,
                    &plugin.name,
                    &plugin.version,
                    Outcome::DeadLettered,
                )
                .await
                .context("cannot record a dead letter in the ledger")?;
                if !recorded {
                    item.decision = Some(Decision::Redelivered);
                    continue;
                }
                let letter = DeadLetter {
                    source_stream: stream.to_string(),
                    source_id: item.entry.id.clone(),
                    kind: *kind,
                    error: reason.clone(),
                    plugin: plugin.name.clone(),
                    plugin_version: plugin.version.clone(),
                    deliveries: item.entry.deliveries,
                    fields: item.fields.clone(),
                };
                let message =
                    ledger::enqueue(&mut tx, &self.config.dlq_key(), letter.to_stream_fields())
                        .await
                        .context("cannot write a dead letter to the outbox")?;
                messages.push(message);
            }
        }
        tx.commit()
            .await
            .context("cannot commit the batch transaction")?;
        Ok(Some(messages))
    }

    /// Ledger row, statements and emits of one entry. `Ok(None)`: the ledger already had it.
    async fn persist_entry(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        plugin: &Plugin,
        entry_id: &str,
        statements: &[Statement],
    ) -> Result<Option<Vec<OutboxMessage>>, ExecError> {
        let recorded = ledger::record(
            conn,
            stream,
            entry_id,
            &plugin.name,
            &plugin.version,
            Outcome::Processed,
        )
        .await
        .map_err(execute::classify)?;
        if !recorded {
            return Ok(None);
        }
        let mut emitted = Vec::new();
        for statement in statements {
            match statement {
                Statement::Emit { target, fields } => {
                    let message =
                        ledger::enqueue(conn, &self.config.stream_key(target), fields.clone())
                            .await
                            .map_err(execute::classify)?;
                    emitted.push(message);
                }
                other => execute::execute(conn, other).await?,
            }
        }
        Ok(Some(emitted))
    }
}

async fn savepoint(conn: &mut PgConnection, sql: &'static str) -> Result<()> {
    sqlx::query(sql)
        .execute(conn)
        .await
        .with_context(|| format!("`{sql}` failed"))?;
    Ok(())
}

/// The Java backend wrote `init = "true"` into empty streams at start-up; such an entry carries
/// no result.
fn is_init_sentinel(entry: &StreamEntry) -> bool {
    entry.fields.len() == 1 && entry.fields[0].0 == "init"
}
