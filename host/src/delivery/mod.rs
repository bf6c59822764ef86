//! The delivery protocol: what happens to one batch of entries read from one stream. This is the
//! one telling of its steps; README's "The delivery protocol" summarises it for operators.
//!
//! Reading is [`crate::consumer`]'s job (one task per stream; up to `max_in_flight` batches in
//! flight, so one batch commits while the next is read and handled). From there a batch goes
//! through:
//!
//! 1. **triage** (`triage.rs`): `init` sentinels (the original backend's start-up marker) are set
//!    aside, acknowledged and never recorded. An entry with a field name or value that is not
//!    UTF-8 or holds a NUL, or delivered more often than `ML_RETRY_ATTEMPTS`, is decided without
//!    a handler (dead letter `malformed` / `retries-exhausted`). A replayed dead letter with a
//!    valid proof from `dlq replay` gets the ledger identity of the entry it replays.
//! 2. **dispatch** (`dispatch.rs`): every other entry goes to the handler plugin of its stream, on
//!    a blocking thread, one call after the other on one instance of the plugin (at most 32
//!    instances per plugin at once; a batch waits for one rather than fail). A trap, timeout or
//!    memory-limit hit retires the instance and fails that entry only; what each outcome means
//!    is [`outcome`]. The commands returned are checked against the live schema and the plugin's
//!    grants ([`crate::persist::validate`]); a failed check, or an answer over 16 MiB, is a dead
//!    letter `forbidden-command` naming plugin, table and column. The batch stops calling its
//!    handler once its commands reach 32 MiB, or after a call that ran to its deadline: the part
//!    handled so far commits, then the rest is handled ([`HostState::handle_rest`]). Under a
//!    rollout of the plugin ([`crate::rollout`], `candidate.rs`), a canary's share of the
//!    entries goes to the candidate version instead, and a shadow's candidate runs beside the
//!    live one on copies of the entries, its commands compared and dropped.
//! 3. **plan** ([`crate::persist::plan`]): the commands of all entries become a few set-based
//!    stages (same kind, same table; two commands on one key folded into one row), equal in
//!    effect to applying the entries one by one in stream order. A command never moves ahead of
//!    one on a related table (foreign keys); stages of unrelated tables run in table-name order.
//! 4. **commit** (`commit.rs`): one transaction takes the batch's table locks (advisory, in name
//!    order, so concurrent batches and hosts never deadlock), claims the ledger rows (an entry
//!    already there is a redelivery and runs nothing), runs the plan, and writes the outbox (emits
//!    and dead letters), and under a rollout its tally. An `update` that needs its row and finds none decides its entry (retry or
//!    dead letter) and the batch runs again without it; a statement failing inside the database
//!    sends the batch to a savepoint per entry, so the failing entry is rolled back and decided
//!    alone. What a failure means is [`crate::failure`]'s to say.
//! 5. **ack** (`ack.rs`): after commit, the batch's outbox rows are locked while their messages are
//!    published, then the finished entries are acknowledged, in one pipelined round trip. What
//!    could not be published is left to the outbox relay.
//!
//! A reprocessing run ([`crate::reprocess`]) sends entries it reads from the stream's history
//! through the same steps, with the differences `reprocessing.rs` lists (the run's own ledger
//! identities, no acknowledgement, emits left out, its dead letters tagged, a dry run's
//! transactions rolled back).
//!
//! Steps 1–2 ([`HostState::prepare`]) need no database, so a consumer runs them for the next batch
//! while steps 3–5 ([`HostState::finish`]) run for the previous one. Entries that should be
//! retried are not acknowledged; they stay pending and the reclaim loop delivers them again after
//! the idle time, until `ML_RETRY_ATTEMPTS` deliveries, when they are dead-lettered with their
//! last error. A batch whose transaction keeps failing for a reason no statement was blamed for is
//! committed entry by entry, each in a transaction of its own ([`HostState::finish_each_alone`]);
//! through an outage it waits, costing no entry an attempt (`consumer/finish.rs`).

mod ack;
mod candidate;
pub use candidate::DIFFERENCES_KEPT;
mod commit;
mod dispatch;
pub mod outcome;
mod reprocessing;
pub use reprocessing::{LEDGER_MARK, Reprocessing, entry_of_identity};
mod triage;

use crate::dead_letter::FailureKind;
use crate::persist::validate::Statement;
use crate::plugin::Plugin;
use crate::rollout::Active;
use crate::state::HostState;
use crate::streams::{EntryId, StreamEntry};
use anyhow::Result;
use std::sync::Arc;
use std::time::Instant;
use tracing::{Instrument, warn};

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
#[derive(Debug)]
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
    /// The rollout of the plugin this batch follows, taken once with the plugin (see
    /// `candidate.rs`).
    rollout: Option<Arc<Active>>,
    /// The reprocessing run the batch belongs to (`None`: live delivery); see
    /// `reprocessing.rs`.
    run: Option<Arc<Reprocessing>>,
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

    /// The entries of the batch to be tried again (their decision a retry), each with one more
    /// delivery: a reprocessing run, which has no consumer group to deliver them again, hands
    /// them to [`HostState::prepare_reprocessing`] itself. `originals` are the entries as
    /// read (the batch keeps their decoded fields only).
    pub fn retries(&self, originals: &[StreamEntry]) -> Vec<StreamEntry> {
        let retry: std::collections::HashSet<&str> = self
            .items
            .iter()
            .filter(|item| matches!(item.decision, Some(Decision::Retry(..))))
            .map(|item| item.entry.id.as_str())
            .collect();
        originals
            .iter()
            .filter(|entry| retry.contains(entry.id.as_str()))
            .map(|entry| StreamEntry {
                deliveries: entry.deliveries + 1,
                ..entry.clone()
            })
            .collect()
    }

    /// How many entries of the batch this pass finished: `(persisted, dead-lettered)`.
    pub fn finished_counts(&self) -> (usize, usize) {
        use crate::persist::ledger::Outcome;
        let count = |outcome| {
            self.items
                .iter()
                .filter(|item| item.finished() == Some(outcome))
                .count()
        };
        (count(Outcome::Processed), count(Outcome::DeadLettered))
    }

    /// How many entries of the batch the ledger found finished before (by this run, for a
    /// reprocessing run).
    pub fn redelivered(&self) -> usize {
        self.items
            .iter()
            .filter(|item| matches!(item.decision, Some(Decision::Redelivered)))
            .count()
    }

    /// Why each dead-lettered entry of the batch was, by entry id (a dry run's report of what
    /// it would dead-letter).
    pub fn dead_letters(&self) -> Vec<(String, String)> {
        self.items
            .iter()
            .filter_map(|item| match &item.decision {
                Some(Decision::DeadLetter(kind, reason)) => Some((
                    item.entry.id.clone(),
                    format!("{}: {reason}", kind.as_str()),
                )),
                _ => None,
            })
            .collect()
    }

    /// How many entries the batch holds.
    pub fn len(&self) -> usize {
        self.items.len() + self.sentinels.len()
    }

    /// Whether the batch holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether entries of the batch are still to be handled: their handler calls were put off
    /// because the batch's commands reached [`crate::plugin::output::MAX_BATCH_OUTPUT_BYTES`] or
    /// a call ran to its deadline.
    /// See [`HostState::handle_rest`].
    pub fn has_unhandled(&self) -> bool {
        self.items.iter().any(|item| item.decision.is_none())
    }
}

/// One entry on its way through the batch.
struct Item {
    entry: StreamEntry,
    /// The entry's identity in the ledger: its id, or for a replayed dead letter the identity of
    /// the entry it replays (see [`triage`]), so the same dead letter replayed twice is applied
    /// once.
    ledger_id: String,
    /// Decoded fields (lossy for dead letters of non-UTF-8 entries).
    fields: Vec<(String, String)>,
    correlation_id: String,
    decision: Option<Decision>,
    /// Fields whose value was not UTF-8: their text in `fields` has U+FFFD where bytes were, and
    /// the original bytes are gone. A dead letter says so, and replay refuses it.
    lossy_fields: Vec<String>,
    /// Which version handles the entry: the live one, or a canary's candidate.
    role: Role,
    /// In a shadow rollout: the candidate's run on the entry beside the live one.
    shadow: Option<candidate::Shadow>,
}

impl Item {
    /// How this batch finishes the entry in the ledger: persisted or dead-lettered (`None`:
    /// retried, redelivered, or not decided yet). What the ledger claims, and what a rollout's
    /// tally and metrics count.
    fn finished(&self) -> Option<crate::persist::ledger::Outcome> {
        use crate::persist::ledger::Outcome;
        match self.decision {
            Some(Decision::Persist(_)) => Some(Outcome::Processed),
            Some(Decision::DeadLetter(..)) => Some(Outcome::DeadLettered),
            _ => None,
        }
    }
}

/// Which version of the plugin handles an entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    #[default]
    Live,
    /// A canary rollout's candidate.
    Candidate,
}

impl Role {
    /// As rollout tallies and metrics name it.
    fn as_str(self) -> &'static str {
        match self {
            Role::Live => "live",
            Role::Candidate => "candidate",
        }
    }
}

/// The versions that handle a batch's entries: the live plugin, and a rollout's candidate.
#[derive(Clone, Copy)]
struct Handlers<'a> {
    live: &'a Plugin,
    rollout: Option<&'a Active>,
    run: Option<&'a Reprocessing>,
}

impl<'a> Handlers<'a> {
    /// A batch's handlers (its fields, so the batch's items can be borrowed beside them).
    fn of(
        live: &'a Arc<Plugin>,
        rollout: &'a Option<Arc<Active>>,
        run: &'a Option<Arc<Reprocessing>>,
    ) -> Handlers<'a> {
        Handlers {
            live,
            rollout: rollout.as_deref(),
            run: run.as_deref(),
        }
    }

    /// The plugin that handled `item` (what its ledger row and dead letter name).
    fn of_item(&self, item: &Item) -> &'a Plugin {
        match (item.role, self.rollout) {
            (Role::Candidate, Some(rollout)) => &rollout.candidate,
            _ => self.live,
        }
    }
}

impl HostState {
    /// Runs the protocol on `entries` of `stream` (a logical stream name): [`HostState::prepare`]
    /// then [`HostState::finish`]. An `Err` means the infrastructure failed (database or Redis
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
    /// the entries then stay pending, for the caller to hand back to a host that serves it.
    ///
    /// Separate from [`HostState::finish`] so that a consumer can prepare the next batch while
    /// the previous one commits.
    pub async fn prepare(
        &self,
        stream: &str,
        entries: Vec<StreamEntry>,
    ) -> Result<Option<PreparedBatch>> {
        let Some(plugin) = self.registry.snapshot().for_stream(stream) else {
            warn!(
                stream,
                count = entries.len(),
                "no plugin handles this stream any more; its entries stay pending"
            );
            return Ok(None);
        };
        self.prepare_with(stream, plugin, None, entries)
            .await
            .map(Some)
    }

    /// [`HostState::prepare`] with `plugin`, for live delivery or for reprocessing `run`.
    async fn prepare_with(
        &self,
        stream: &str,
        plugin: Arc<Plugin>,
        run: Option<Arc<Reprocessing>>,
        entries: Vec<StreamEntry>,
    ) -> Result<PreparedBatch> {
        let started = Instant::now();
        let span = match &run {
            None => {
                tracing::info_span!("batch", stream, plugin = %plugin.name, version = %plugin.version, size = entries.len())
            }
            Some(run) => {
                tracing::info_span!("batch", stream, plugin = %plugin.name, version = %plugin.version, size = entries.len(), run = run.run)
            }
        };
        let mut sentinels = Vec::new();
        let mut items: Vec<Item> = Vec::new();
        let mut identities = std::collections::HashSet::new();
        // A run's identities are its own: the horizon of live redeliveries does not apply.
        let horizon = self.horizon(stream).filter(|_| run.is_none());
        let mut behind_horizon = 0;
        for entry in entries {
            if triage::is_init_sentinel(&entry) {
                sentinels.push(entry.id);
                continue;
            }
            let mut item = self.triage(stream, entry);
            if let Some(run) = &run {
                item.ledger_id = run.ledger_id(&item.ledger_id);
            }
            // Two copies of one replayed dead letter share a ledger identity: the batch's single
            // ledger claim would return it once and let both apply. The first copy is the entry;
            // the others are redeliveries of it, whatever becomes of the first.
            if !identities.insert(item.ledger_id.clone()) {
                item.decision = Some(Decision::Redelivered);
            }
            // At or before the ledger's horizon: finished long ago, and the ledger no longer
            // knows it. Delivered again only by a rewind (`XGROUP SETID`), which must not
            // apply it twice.
            if let (Some(horizon), Some(id)) = (&horizon, EntryId::parse(&item.entry.id))
                && id <= *horizon
            {
                behind_horizon += 1;
                item.decision = Some(Decision::Redelivered);
            }
            items.push(item);
        }
        if behind_horizon > 0 {
            warn!(
                stream,
                count = behind_horizon,
                horizon = %horizon.map(|h| h.to_string()).unwrap_or_default(),
                "entries at or before the ledger's horizon were delivered again (the group was rewound past the ledger retention?); they were finished before and are acknowledged without running"
            );
        }
        // A run applies the build it chose, never a rollout's candidate.
        let rollout = match run {
            None => self.rollouts.snapshot().for_live(&plugin),
            Some(_) => None,
        };
        self.handle(stream, &plugin, rollout.as_ref(), &mut items)
            .instrument(span.clone())
            .await?;
        Ok(PreparedBatch {
            stream: stream.to_string(),
            plugin,
            rollout,
            run,
            items,
            sentinels,
            started,
            span,
        })
    }

    /// The second half: the batch transaction, then publishing its outbox messages and
    /// acknowledging what is finished. May be called again for the same batch after an `Err`
    /// (an outage): decisions already taken stay valid, and the ledger turns whatever did
    /// commit into redeliveries.
    pub async fn finish(&self, batch: &mut PreparedBatch) -> Result<BatchReport> {
        let span = batch.span.clone();
        let report = self.commit_and_ack(batch).instrument(span).await?;
        self.metrics
            .batch_duration
            .get_or_create(&crate::metrics::ByStream::new(&batch.stream))
            .observe(batch.started.elapsed().as_secs_f64());
        Ok(report)
    }

    /// After [`HostState::finish`] of a batch whose handler calls stopped early (the output
    /// budget, a call that ran to its deadline):
    /// drops the finished entries (and their commands) and handles the rest, ready for another
    /// `finish`. In stream order, so the batch still equals applying its entries one by one.
    pub async fn handle_rest(&self, batch: &mut PreparedBatch) -> Result<()> {
        batch.items.retain(|item| item.decision.is_none());
        batch.sentinels.clear();
        let span = batch.span.clone();
        let plugin = batch.plugin.clone();
        let rollout = batch.rollout.clone();
        self.handle(&batch.stream, &plugin, rollout.as_ref(), &mut batch.items)
            .instrument(span)
            .await
    }

    /// [`HostState::finish`] for a batch that failed it repeatedly for a reason other than an
    /// outage: each entry is committed in a transaction of its own, and an entry that fails alone
    /// is dead-lettered with the error, so one bad entry cannot hold up the rest.
    pub async fn finish_each_alone(&self, batch: &mut PreparedBatch) -> Result<BatchReport> {
        let span = batch.span.clone();
        async {
            let handlers = Handlers::of(&batch.plugin, &batch.rollout, &batch.run);
            let messages = self
                .commit_each_alone(&batch.stream, handlers, &mut batch.items)
                .await?;
            self.acknowledge(batch, messages).await
        }
        .instrument(span)
        .await
    }

    /// [`HostState::finish`] inside the batch's span: [`commit`](HostState::commit), then
    /// [`acknowledge`](HostState::acknowledge).
    async fn commit_and_ack(&self, batch: &mut PreparedBatch) -> Result<BatchReport> {
        let handlers = Handlers::of(&batch.plugin, &batch.rollout, &batch.run);
        let messages = self
            .commit(&batch.stream, handlers, &mut batch.items)
            .await?;
        self.acknowledge(batch, messages).await
    }

    /// A retry while attempts remain, else a dead letter of `kind` with the last error.
    fn retry_or_give_up(&self, kind: FailureKind, reason: String, deliveries: u32) -> Decision {
        retry_or_give_up(self.config.retry_attempts, kind, reason, deliveries)
    }
}

/// A retry while the entry's `deliveries` are fewer than `attempts`, else a dead letter of
/// `kind` with the last error and how often it was tried.
fn retry_or_give_up(attempts: u32, kind: FailureKind, reason: String, deliveries: u32) -> Decision {
    if deliveries < attempts {
        return Decision::Retry(kind, reason);
    }
    let times = if deliveries == 1 {
        "delivery"
    } else {
        "deliveries"
    };
    Decision::DeadLetter(
        kind,
        format!("{reason} (gave up after {deliveries} {times})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_retried_until_its_last_attempt_then_dead_lettered_saying_so() {
        let kind = FailureKind::RetriesExhausted;
        assert!(matches!(
            retry_or_give_up(3, kind, "not yet".into(), 2),
            Decision::Retry(FailureKind::RetriesExhausted, reason) if reason == "not yet"
        ));
        let Decision::DeadLetter(given_up, reason) = retry_or_give_up(3, kind, "not yet".into(), 3)
        else {
            panic!("the third delivery of three is the last");
        };
        assert_eq!(given_up, FailureKind::RetriesExhausted);
        assert_eq!(reason, "not yet (gave up after 3 deliveries)");
    }

    #[test]
    fn a_single_attempt_gives_up_at_once_in_the_singular() {
        let Decision::DeadLetter(kind, reason) =
            retry_or_give_up(1, FailureKind::PluginTrap, "boom".into(), 1)
        else {
            panic!("one attempt means no retry");
        };
        assert_eq!(kind, FailureKind::PluginTrap);
        assert_eq!(reason, "boom (gave up after 1 delivery)");
    }
}
