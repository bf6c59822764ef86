//! The entries a consumer has read and not yet finished, and keeping them fresh in the pending
//! list so that no host reclaims an entry that is still being worked on.

use crate::state::HostState;
use crate::streams;
use std::sync::Arc;
use std::time::Duration;

/// Touches the entries of this consumer's batches in flight every `every` (a quarter of the
/// reclaim idle time), so no host reclaims an entry that is still being worked on: not while a
/// slow batch runs, not while every slot is busy and the consumer's loop waits for one, not while
/// a batch waits out a PostgreSQL outage (which must never cost an entry an attempt). Touching
/// (`XCLAIM ... JUSTID`) does not count as a delivery.
pub(super) async fn keep_in_flight_fresh(
    state: Arc<HostState>,
    stream: String,
    entries_in_flight: EntriesInFlight,
    every: Duration,
) {
    let config = &state.config;
    let key = config.stream_key(&stream);
    let mut redis = state.redis.clone();
    loop {
        tokio::time::sleep(every).await;
        let mine: Vec<String> = lock(&entries_in_flight).iter().cloned().collect();
        if mine.is_empty() {
            continue;
        }
        if let Err(error) = streams::set_idle(
            &mut redis,
            &key,
            &config.consumer_group,
            &config.consumer_name,
            &mine,
            Duration::ZERO,
        )
        .await
        {
            // A lost group is the consumer loop's to recreate; an outage its to report.
            tracing::debug!(
                stream,
                "cannot keep the entries in flight fresh (XCLAIM): {error}"
            );
        }
    }
}

/// Entries registered in [`EntriesInFlight`] for as long as this value lives.
pub(super) struct HeldEntries {
    pub(super) entries_in_flight: EntriesInFlight,
    pub(super) ids: Vec<String>,
}

impl Drop for HeldEntries {
    fn drop(&mut self) {
        let mut entries_in_flight = lock(&self.entries_in_flight);
        for id in &self.ids {
            entries_in_flight.remove(id);
        }
    }
}

/// The ids of the entries this consumer has read and not yet finished.
pub(super) type EntriesInFlight = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

pub(super) fn lock(
    entries_in_flight: &EntriesInFlight,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    entries_in_flight
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
