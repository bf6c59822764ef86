//! Step 5: after commit, publish the outbox and acknowledge what is finished.

use super::{BatchReport, Decision, Item, PreparedBatch};
use crate::persist::outbox::{self, OutboxMessage};
use crate::plugin::Plugin;
use crate::state::HostState;
use crate::streams;
use anyhow::{Context as _, Result};
use tracing::{debug, warn};

impl HostState {
    /// After commit: logs each entry's outcome, publishes the outbox messages, acknowledges what
    /// is finished in one pipelined round trip, and deletes the published outbox rows. Entries to
    /// be retried are left pending.
    pub(super) async fn acknowledge(
        &self,
        batch: &PreparedBatch,
        messages: Vec<OutboxMessage>,
    ) -> Result<BatchReport> {
        let stream = batch.stream.as_str();
        let plugin = &batch.plugin;
        let key = self.config.stream_key(stream);
        let mut report = BatchReport {
            sentinels: batch.sentinels.len(),
            ..BatchReport::default()
        };
        let mut acks = batch.sentinels.clone();
        let items = &batch.items;

        for item in items {
            if self.report_decision(stream, plugin, item, &mut report) {
                acks.push(item.entry.id.clone());
            }
        }
        // A reprocessing run reads history: the live consumers acknowledged these entries, or
        // will; they are not the run's to acknowledge.
        if batch.run.is_some() {
            acks.clear();
        }

        // The batch's outbox rows, locked for as long as they are published: the relay skips
        // locked rows, so a row it could already take (its transaction began long ago) is
        // published once, by one of them. Rows the relay holds or has published are left to it.
        let mut claim = None;
        let messages = if messages.is_empty() {
            messages
        } else {
            let mut tx = self
                .pool
                .begin()
                .await
                .context("cannot begin the outbox transaction; the entries are committed and acknowledged on redelivery")?;
            let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
            let mine = outbox::lock(&mut tx, &ids).await?;
            claim = Some(tx);
            messages
                .into_iter()
                .filter(|m| mine.contains(&m.id))
                .collect()
        };
        let to_publish: Vec<(String, Vec<(String, String)>)> = messages
            .iter()
            .map(|m| (m.stream_key.clone(), m.fields.clone()))
            .collect();
        let mut redis = self.redis.clone();
        let refused = streams::publish_outbox_then_ack(&mut redis, &to_publish, &key, &self.config.consumer_group, &acks)
            .await
            .context("entries are committed; their outbox messages will be published by the relay and the entries acknowledged on redelivery")?;
        if let Some(tx) = claim {
            settle_outbox(tx, &messages, &refused).await;
        }
        self.count(stream, plugin, items, report.sentinels);
        super::candidate::count(&self.metrics, batch.rollout.as_deref(), items);
        Ok(report)
    }

    /// Counts and logs `item`'s decision in `report`; whether the entry is to be acknowledged.
    fn report_decision(
        &self,
        stream: &str,
        plugin: &Plugin,
        item: &Item,
        report: &mut BatchReport,
    ) -> bool {
        let entry = &item.entry;
        let correlation_id = item.correlation_id.as_str();
        let _entry = tracing::info_span!("entry", entry = %entry.id, correlation_id).entered();
        match &item.decision {
            Some(Decision::Persist(_)) => {
                report.processed += 1;
                debug!(stream, entry = %entry.id, correlation_id, plugin = %plugin.name, version = %plugin.version, "processed");
                true
            }
            Some(Decision::Redelivered) => {
                report.redelivered += 1;
                debug!(stream, entry = %entry.id, correlation_id, "already processed; acknowledged without running again");
                true
            }
            Some(Decision::DeadLetter(kind, reason)) => {
                report.dead_lettered += 1;
                warn!(stream, entry = %entry.id, correlation_id, kind = %kind, deliveries = entry.deliveries, "dead-lettered: {reason}");
                true
            }
            Some(Decision::Retry(kind, reason)) => {
                report.retrying += 1;
                warn!(stream, entry = %entry.id, correlation_id, gives_up_as = %kind, deliveries = entry.deliveries,
                    attempts = self.config.retry_attempts,
                    "attempt {} of {} failed; retrying after the reclaim idle time ({}): {reason}",
                    entry.deliveries, self.config.retry_attempts, humantime::format_duration(self.config.reclaim_idle));
                false
            }
            None => false,
        }
    }

    /// Updates the counters once a batch is acknowledged.
    fn count(&self, stream: &str, plugin: &Plugin, items: &[Item], sentinels: usize) {
        use crate::metrics::{ByKind, ByPlugin, ByReason, ByStream};
        let m = &self.metrics;
        if sentinels > 0 {
            m.sentinels
                .get_or_create(&ByStream::new(stream))
                .inc_by(sentinels as u64);
        }
        let processed = items
            .iter()
            .filter(|item| matches!(item.decision, Some(Decision::Persist(_))))
            .count();
        if processed > 0 {
            let labels = ByPlugin {
                stream: stream.to_string(),
                plugin: plugin.name.clone(),
            };
            m.processed.get_or_create(&labels).inc_by(processed as u64);
        }
        for item in items {
            match &item.decision {
                Some(Decision::Redelivered) => {
                    m.redelivered.get_or_create(&ByStream::new(stream)).inc();
                }
                Some(Decision::DeadLetter(kind, _)) => {
                    let labels = ByKind {
                        stream: stream.to_string(),
                        plugin: plugin.name.clone(),
                        kind: kind.as_str(),
                    };
                    m.dead_lettered.get_or_create(&labels).inc();
                }
                Some(Decision::Retry(kind, _)) => {
                    let labels = ByReason {
                        stream: stream.to_string(),
                        plugin: plugin.name.clone(),
                        reason: crate::metrics::retry_reason(*kind),
                    };
                    m.retried.get_or_create(&labels).inc();
                }
                Some(Decision::Persist(_)) | None => {}
            }
        }
    }
}

/// After publishing: a message Redis refused stays in the outbox, marked, for the relay to try
/// again later; the rest went out and are removed. Failing here is harmless: the relay publishes
/// them again later (at-least-once).
async fn settle_outbox(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    messages: &[OutboxMessage],
    refused: &[(usize, String)],
) {
    // A message Redis refused stays in the outbox, marked, for the relay to try again
    // later; the rest went out.
    for (at, error) in refused {
        if let Err(failure) = outbox::refused(&mut *tx, messages[*at].id, error).await {
            warn!("{}", crate::text::causes(&failure));
        }
    }
    let published: Vec<i64> = messages
        .iter()
        .enumerate()
        .filter(|(at, _)| !refused.iter().any(|(r, _)| r == at))
        .map(|(_, m)| m.id)
        .collect();
    let removed = async {
        outbox::remove(&mut *tx, &published).await?;
        tx.commit()
            .await
            .context("cannot commit the outbox's removals")
    };
    if let Err(error) = removed.await {
        // Harmless: the relay publishes them again later (at-least-once).
        warn!("{}", crate::text::causes(&error));
    }
}
