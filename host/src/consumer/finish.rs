//! Finishing a batch: commit and acknowledge it, through outages (waited out, costing no entry an
//! attempt) and failures (retried, then entry by entry, then given up to the reclaim), deciding
//! by the one failure taxonomy ([`crate::failure`]).

use super::{BACKOFF, FINISH_ATTEMPTS, OUTAGE_POLL};
use crate::delivery::PreparedBatch;
use crate::failure::{self, Class, Dependency, Unanswered};
use crate::shutdown::Shutdown;
use crate::state::HostState;
use anyhow::Result;
use std::time::Duration;
use tracing::{error, warn};

/// Commits and acknowledges `batch`. Through an outage (PostgreSQL or Redis unreachable, see
/// [`failure::classify`]) it retries until it succeeds or the host stops (its entries then stay
/// pending, to be delivered again). Any other failure is retried [`FINISH_ATTEMPTS`] times, then
/// the batch is committed entry by entry, each in a transaction of its own, so that the entry
/// at fault is dead-lettered alone; if even that fails, the batch is given up and its entries
/// stay pending, to be delivered again (counting against their attempts) after the reclaim time.
/// Returns whether the batch was finished (`false`: given up, or the host is stopping).
pub(crate) async fn finish_until_done(
    state: &HostState,
    batch: &mut PreparedBatch,
    mut stop: Shutdown,
) -> bool {
    let stream = batch.stream().to_string();
    let deadline = state.config.database_timeouts.response_deadline();
    let mut backoff = BACKOFF;
    let mut failures = 0;
    loop {
        let pass = if failures >= FINISH_ATTEMPTS {
            Pass::EachAlone
        } else {
            Pass::SetBased
        };
        let error = match finish_once(state, batch, pass, deadline).await {
            Ok(report) => {
                tracing::debug!(
                    stream,
                    processed = report.processed,
                    redelivered = report.redelivered,
                    dead_lettered = report.dead_lettered,
                    retrying = report.retrying,
                    sentinels = report.sentinels,
                    "batch done"
                );
                state.health.observe(Dependency::Database, Ok(()));
                return true;
            }
            Err(error) => error,
        };
        state
            .metrics
            .batch_failures
            .get_or_create(&crate::metrics::ByStream::new(&stream))
            .inc();
        let next = AfterFailure::of(&error, pass);
        report_failure(state, batch, &error, next, failures + 1, backoff.upcoming());
        match next {
            AfterFailure::GiveUp => return false,
            AfterFailure::Retry => failures += 1,
            AfterFailure::WaitOutOutage(_) | AfterFailure::WaitForPool => {}
        }
        if stop.requested() {
            warn!(
                stream,
                entries = batch.len(),
                "stopping with a batch unfinished; its entries stay pending"
            );
            return false;
        }
        wait_to_retry(state, backoff.pause(), &mut stop).await;
    }
}

/// How a batch is committed: set-based first; entry by entry, each entry in a transaction of its
/// own, once set-based attempts keep failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pass {
    SetBased,
    EachAlone,
}

/// What a failed attempt at a batch leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AfterFailure {
    /// An outage of the dependency: waited out without limit, costing no entry an attempt.
    WaitOutOutage(Dependency),
    /// Every connection of the pool is in use: waited out like an outage, but PostgreSQL is not
    /// down because this host is busy (the health probe, on a connection of its own, says
    /// whether it is).
    WaitForPool,
    /// Tried again: set-based while attempts remain, then entry by entry.
    Retry,
    /// Even entry by entry it failed: the entries stay pending, delivered again after the
    /// reclaim idle time.
    GiveUp,
}

impl AfterFailure {
    /// The decision after `error` on a `pass`.
    fn of(error: &anyhow::Error, pass: Pass) -> Self {
        match failure::classify(error) {
            Class::Outage(_) if failure::pool_busy(error) => AfterFailure::WaitForPool,
            Class::Outage(dependency) => AfterFailure::WaitOutOutage(dependency),
            _ if pass == Pass::EachAlone => AfterFailure::GiveUp,
            _ => AfterFailure::Retry,
        }
    }
}

/// Logs (and for an outage, reports to health) the `attempt`th failed attempt in a row at
/// `batch`.
pub(super) fn report_failure(
    state: &HostState,
    batch: &PreparedBatch,
    error: &anyhow::Error,
    next: AfterFailure,
    attempt: u32,
    retry_in: Duration,
) {
    let stream = batch.stream();
    let entries = batch.len();
    let retry_in_ms = retry_in.as_millis() as u64;
    let causes = crate::text::causes(error);
    match next {
        AfterFailure::WaitForPool => warn!(
            stream,
            retry_in_ms,
            entries,
            "every connection to PostgreSQL is busy; the batch waits for one: {causes}"
        ),
        AfterFailure::WaitOutOutage(dependency) => {
            state.health.failed(dependency, &causes);
            error!(stream, retry_in_ms, entries, "{causes}");
        }
        AfterFailure::GiveUp => error!(
            stream,
            entries,
            "giving up on the batch after {FINISH_ATTEMPTS} attempts and an entry-by-entry pass; its entries stay pending and are delivered again after the reclaim idle time: {causes}"
        ),
        AfterFailure::Retry => {
            let next = if attempt >= FINISH_ATTEMPTS {
                "committing it entry by entry next"
            } else {
                "retrying it"
            };
            warn!(
                stream,
                entries, attempt, "the batch failed, {next}: {causes}"
            );
        }
    }
}

/// One attempt at finishing `batch` by `pass`. Work that gets no answer for `deadline` (since
/// its last statement was answered, see [`crate::persist::answers`]) is an [`Unanswered`] error:
/// a statement would have been cancelled by the server long ago, so the connection is lost
/// without an error (half-open), an outage.
pub(super) async fn finish_once(
    state: &HostState,
    batch: &mut PreparedBatch,
    pass: Pass,
    deadline: Duration,
) -> Result<crate::delivery::BatchReport> {
    let attempt = async {
        match pass {
            Pass::SetBased => state.finish(batch).await,
            Pass::EachAlone => state.finish_each_alone(batch).await,
        }
    };
    match crate::persist::answers::watch(deadline, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow::Error::new(Unanswered(deadline))),
    }
}

/// Waits `backoff`, then for as long as PostgreSQL is known to be down; a stop ends the wait.
pub(super) async fn wait_to_retry(state: &HostState, backoff: Duration, stop: &mut Shutdown) {
    let waited = async {
        tokio::time::sleep(backoff).await;
        while state.health.outage(Dependency::Database).is_some() {
            tokio::time::sleep(OUTAGE_POLL).await;
        }
    };
    tokio::select! {
        _ = waited => {}
        _ = stop.wait() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::{Contention, Unreachable};

    #[test]
    fn an_outage_is_waited_out_on_either_pass_and_never_costs_an_attempt() {
        let outage = anyhow::Error::new(Unreachable(Dependency::Database, "refused".into()));
        for pass in [Pass::SetBased, Pass::EachAlone] {
            assert_eq!(
                AfterFailure::of(&outage, pass),
                AfterFailure::WaitOutOutage(Dependency::Database)
            );
        }
        let silent = anyhow::Error::new(Unanswered(Duration::from_secs(130)));
        assert_eq!(
            AfterFailure::of(&silent, Pass::EachAlone),
            AfterFailure::WaitOutOutage(Dependency::Database)
        );
    }

    #[test]
    fn a_busy_pool_is_waited_for_and_not_reported_as_an_outage() {
        let busy = anyhow::Error::new(sqlx::Error::PoolTimedOut).context("cannot begin");
        assert_eq!(
            AfterFailure::of(&busy, Pass::SetBased),
            AfterFailure::WaitForPool
        );
    }

    #[test]
    fn any_other_failure_is_retried_set_based_and_given_up_after_the_entry_by_entry_pass() {
        for error in [
            anyhow::Error::new(Contention("deadlock".into())),
            anyhow::anyhow!("a deferred constraint failed at COMMIT"),
        ] {
            assert_eq!(
                AfterFailure::of(&error, Pass::SetBased),
                AfterFailure::Retry
            );
            assert_eq!(
                AfterFailure::of(&error, Pass::EachAlone),
                AfterFailure::GiveUp
            );
        }
    }
}
