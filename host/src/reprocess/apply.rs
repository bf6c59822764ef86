//! Applying a run: reading its selection page by page from where it stands, each page as a
//! batch through the delivery protocol (its entries to be retried as batches of their own),
//! recording the run's position, honouring a rate, a stop and a cancel, and showing progress.

use super::{Counts, Ended, select};
use crate::delivery::Reprocessing;
use crate::persist::reprocess_runs;
use crate::plugin::Plugin;
use crate::progress::Progress;
use crate::shutdown::Shutdown;
use crate::state::HostState;
use crate::streams::{EntryId, StreamEntry};
use anyhow::Result;
use select::{Selection, Survey};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One run being applied.
pub(super) struct Applying<'a> {
    pub(super) state: &'a Arc<HostState>,
    pub(super) plugin: Arc<Plugin>,
    pub(super) run: Arc<Reprocessing>,
    pub(super) stream: &'a str,
    pub(super) key: &'a str,
    pub(super) selection: &'a Selection,
    pub(super) rate: Option<f64>,
    pub(super) batch: usize,
    /// The run's id when it is recorded (`None`: a dry run).
    pub(super) record: Option<i64>,
}

/// How many of a dry run's dead letters are kept for its report.
const DEAD_LETTERS_SHOWN: usize = 20;

impl Applying<'_> {
    /// Reads the selection after `position` page by page and applies each, until the end,
    /// `stop`, or a cancel. `already`: the entries the run finished before `position`.
    pub(super) async fn apply(
        &self,
        mut position: Option<EntryId>,
        already: u64,
        survey: &Survey,
        label: &str,
        stop: Shutdown,
    ) -> Result<(Ended, Counts, Vec<(String, String)>)> {
        let mut redis = self.state.redis.clone();
        let mut counts = Counts::default();
        let mut dead_letters = Vec::new();
        let mut progress = Progress::new(label, survey.selected, "entries");
        let started = Instant::now();
        let mut read = 0u64;
        // Under a rate, pages of a tenth of a second's entries at most, so the run goes evenly
        // rather than in bursts of a batch followed by long pauses.
        let page_size = match self.rate {
            Some(rate) => self.batch.min(((rate / 10.0).ceil() as usize).max(1)),
            None => self.batch,
        };
        loop {
            if stop.requested() {
                progress.finish(already + counts.done(), survey.selected, "interrupted");
                return Ok((Ended::Interrupted, counts, dead_letters));
            }
            let Some(page) =
                select::next_page(&mut redis, self.key, self.selection, position, page_size)
                    .await?
            else {
                break;
            };
            counts.missing += page.missing;
            let entries = page.entries.len() as u64;
            let before = counts;
            if !page.entries.is_empty()
                && !self
                    .apply_page(page.entries, &stop, &mut counts, &mut dead_letters)
                    .await?
            {
                let ended = if stop.requested() {
                    Ended::Interrupted
                } else {
                    Ended::Failed
                };
                progress.finish(already + counts.done(), survey.selected, "stopped");
                return Ok((ended, counts, dead_letters));
            }
            position = Some(page.last);
            if let Some(id) = self.record {
                let skipped = counts.skipped - before.skipped;
                let state = reprocess_runs::advance(
                    &self.state.pool,
                    id,
                    &page.last.to_string(),
                    i64::try_from(skipped).unwrap_or(i64::MAX),
                    i64::try_from(page.missing).unwrap_or(i64::MAX),
                )
                .await?;
                if state == "cancelled" {
                    progress.finish(already + counts.done(), survey.selected, "cancelled");
                    return Ok((Ended::Cancelled, counts, dead_letters));
                }
            }
            read += entries;
            let message = progress_message(&counts, read, started.elapsed(), survey, already);
            progress.update(already + counts.done(), survey.selected.max(read), &message);
            if let Some(rate) = self.rate {
                let due = started + Duration::from_secs_f64(read as f64 / rate);
                let mut stopping = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = stopping.wait() => {}
                }
            }
        }
        let message = progress_message(&counts, read, started.elapsed(), survey, already);
        progress.finish(
            already + counts.done(),
            survey.selected.max(already + read),
            &message,
        );
        Ok((Ended::Finished, counts, dead_letters))
    }

    /// Applies one page's entries: a batch, then its entries to be retried as batches of their
    /// own (with one more delivery each) until they are finished or dead-lettered. `false` when
    /// a batch could not be finished (stopping, or given up).
    async fn apply_page(
        &self,
        entries: Vec<StreamEntry>,
        stop: &Shutdown,
        counts: &mut Counts,
        dead_letters: &mut Vec<(String, String)>,
    ) -> Result<bool> {
        let mut originals = entries;
        let mut pause = Duration::from_millis(100);
        loop {
            let mut batch = self
                .state
                .prepare_reprocessing(
                    self.stream,
                    self.plugin.clone(),
                    self.run.clone(),
                    originals.clone(),
                )
                .await?;
            let mut retries = Vec::new();
            loop {
                if !crate::consumer::finish_until_done(self.state, &mut batch, stop.clone()).await {
                    return Ok(false);
                }
                let (processed, dead_lettered) = batch.finished_counts();
                counts.processed += processed as u64;
                counts.dead_lettered += dead_lettered as u64;
                counts.skipped += batch.redelivered() as u64;
                for letter in batch.dead_letters() {
                    if dead_letters.len() < DEAD_LETTERS_SHOWN {
                        dead_letters.push(letter);
                    }
                }
                retries.extend(batch.retries(&originals));
                if !batch.has_unhandled() || stop.requested() {
                    break;
                }
                self.state.handle_rest(&mut batch).await?;
            }
            if retries.is_empty() || stop.requested() {
                return Ok(retries.is_empty());
            }
            // Entries asked to be tried again (a row not there yet, a call that timed out): after
            // a pause, as the reclaim loop would deliver them again.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            originals = retries;
        }
    }
}

/// The progress line's message: what was applied and the time left.
fn progress_message(
    counts: &Counts,
    read: u64,
    elapsed: Duration,
    survey: &Survey,
    already: u64,
) -> String {
    let rate = read as f64 / elapsed.as_secs_f64().max(1e-3);
    let left = survey.selected.saturating_sub(already + read);
    let eta = if rate > 0.0 && left > 0 {
        let seconds = (left as f64 / rate).ceil() as u64;
        format!(
            ", ETA {}",
            humantime::format_duration(Duration::from_secs(seconds))
        )
    } else {
        String::new()
    };
    format!(
        "{} applied, {} dead-lettered, {} skipped{eta}",
        counts.processed, counts.dead_lettered, counts.skipped
    )
}
