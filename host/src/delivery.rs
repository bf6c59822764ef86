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
use crate::persist::execute::{self, ExecError};
use crate::persist::ledger::{self, OutboxMessage, Outcome};
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

    /// Runs the protocol on `entries` of `stream` (a logical stream name). An `Err` means the
    /// infrastructure failed (database or Redis unreachable): nothing of the batch was
    /// acknowledged and its entries stay pending.
    pub async fn process_batch(
        &self,
        stream: &str,
        entries: Vec<StreamEntry>,
    ) -> Result<BatchReport> {
        let started = Instant::now();
        let Some(plugin) = self.registry.snapshot().for_stream(stream) else {
            warn!(
                stream,
                count = entries.len(),
                "no plugin handles this stream any more; entries stay pending"
            );
            return Ok(BatchReport::default());
        };
        let span = tracing::info_span!("batch", stream, plugin = %plugin.name, version = %plugin.version, size = entries.len());
        let report = self
            .run_protocol(stream, &plugin, entries)
            .instrument(span)
            .await?;
        self.metrics.observe(
            "kaleidoscope_batch_duration_seconds",
            labels(&[("stream", stream)]),
            started.elapsed(),
        );
        Ok(report)
    }

    /// [`Delivery::process_batch`] once the plugin is known.
    async fn run_protocol(
        &self,
        stream: &str,
        plugin: &Arc<Plugin>,
        entries: Vec<StreamEntry>,
    ) -> Result<BatchReport> {
        let key = self.config.stream_key(stream);
        let mut report = BatchReport::default();

        let mut acks = Vec::new();
        let mut items = Vec::new();
        for entry in entries {
            if is_init_sentinel(&entry) {
                report.sentinels += 1;
                acks.push(entry.id);
                continue;
            }
            items.push(self.triage(entry));
        }

        let undecided: Vec<String> = items
            .iter()
            .filter(|item| item.decision.is_none())
            .map(|item| item.entry.id.clone())
            .collect();
        let finished = ledger::already_finished(&self.pool, stream, &undecided).await?;
        for item in &mut items {
            if item.decision.is_none() && finished.contains(&item.entry.id) {
                item.decision = Some(Decision::Redelivered);
            }
        }

        self.run_handlers(stream, plugin, &mut items).await?;
        let messages = self.commit(stream, plugin, &mut items).await?;

        for item in &items {
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
        self.count(stream, plugin, &items, report.sentinels);
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
    async fn commit(
        &self,
        stream: &str,
        plugin: &Plugin,
        items: &mut [Item],
    ) -> Result<Vec<OutboxMessage>> {
        // Optimistically all entries in one go; only when one of them fails inside the database
        // is the batch run again with a savepoint per entry (two more round trips per entry), so
        // that the failing entry is rolled back alone.
        if let Some(messages) = self.commit_pass(stream, plugin, items, false).await? {
            return Ok(messages);
        }
        debug!(
            stream,
            "an entry failed inside the batch; running it again with one savepoint per entry"
        );
        self.commit_pass(stream, plugin, items, true)
            .await?
            .context("the isolated pass asked for isolation")
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
