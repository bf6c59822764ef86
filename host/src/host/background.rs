//! The periodic chores of a running host, each one round of work run [`every`] so often until
//! the host stops: the heartbeat, the plugin store's sync, the dependency probe, the request
//! tracker, ledger pruning and the outbox relay.

use super::supervisor::Supervisor;
use crate::health;
use crate::heartbeat;
use crate::persist::{ledger, outbox};
use crate::requests;
use crate::shutdown::{Shutdown, StopSwitch};
use crate::state::HostState;
use crate::streams;
use anyhow::Result;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How often the relay looks for outbox messages that were not published after their commit.
const RELAY_INTERVAL: Duration = Duration::from_secs(5);
/// The longest pause between two rounds of ledger pruning.
const LEDGER_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Starts every chore; each ends when `stop` turns true.
pub(super) fn spawn_all(supervisor: &Arc<Supervisor>, stop: &StopSwitch) -> Vec<JoinHandle<()>> {
    let state = &supervisor.state;
    let config = &state.config;
    let tracking = (Duration::from_secs(config.timeout_seconds) / 4)
        .clamp(Duration::from_millis(250), Duration::from_secs(10));
    let pruning =
        (config.ledger_retention / 4).clamp(Duration::from_millis(100), LEDGER_PRUNE_INTERVAL);
    vec![
        tokio::spawn(every(heartbeat::HEARTBEAT, stop.subscribe(), {
            let supervisor = supervisor.clone();
            move || write_heartbeat(supervisor.clone())
        })),
        tokio::spawn(every(super::store_sync::SYNC_INTERVAL, stop.subscribe(), {
            let supervisor = supervisor.clone();
            move || sync_store(supervisor.clone())
        })),
        tokio::spawn(every(health::PROBE_INTERVAL, stop.subscribe(), {
            let supervisor = supervisor.clone();
            move || probe(supervisor.clone())
        })),
        tokio::spawn(every(tracking, stop.subscribe(), {
            let state = state.clone();
            move || track_requests(state.clone())
        })),
        tokio::spawn(every(pruning, stop.subscribe(), {
            let state = state.clone();
            let stop = stop.subscribe();
            move || prune_ledger(state.clone(), stop.clone())
        })),
        tokio::spawn(every(RELAY_INTERVAL, stop.subscribe(), {
            let state = state.clone();
            move || relay_outbox(state.clone())
        })),
        tokio::spawn(watch_for_stalls(state.clone(), stop.subscribe())),
        tokio::spawn(listen_for_deploys(supervisor.clone(), stop.subscribe())),
    ]
}

/// Notices the host's own stalls (a tick that comes seconds late: the process was stopped,
/// swapped out or starved), so the timeouts they cause are not reported as outages of Redis or
/// PostgreSQL (see [`crate::health::Health::tick`]).
async fn watch_for_stalls(state: Arc<HostState>, mut stop: Shutdown) {
    state.health.tick();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(health::STALL_TICK) => state.health.tick(),
            _ = stop.wait() => return,
        }
    }
}

/// Runs `round` after every `interval` until `stop` turns true (or its sender goes). A round in
/// progress is finished, never cut off; the next interval starts when it ends.
pub(super) async fn every<F, R>(interval: Duration, mut stop: Shutdown, mut round: F)
where
    F: FnMut() -> R,
    R: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait() => return,
        }
        if stop.requested() {
            return;
        }
        round().await;
    }
}

/// Keeps this host's heartbeat fresh for `kaleidoscope status`.
async fn write_heartbeat(supervisor: Arc<Supervisor>) {
    supervisor.write_heartbeat().await;
}

/// Syncs the plugin store as soon as a deploy announces a change of this fleet's plugins, so a
/// deploy reaches every host in milliseconds, not at its next periodic round. A listener that
/// cannot be set up is retried; the periodic round covers the gap.
async fn listen_for_deploys(supervisor: Arc<Supervisor>, mut stop: Shutdown) {
    use crate::persist::plugin_store::CHANGES;
    loop {
        let listening = async {
            let mut listener =
                sqlx::postgres::PgListener::connect_with(&supervisor.state.pool).await?;
            listener.listen(CHANGES).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listening.await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(
                    "cannot listen for plugin deploys (the periodic sync goes on): {error}"
                );
                tokio::select! {
                    _ = tokio::time::sleep(super::store_sync::SYNC_INTERVAL) => continue,
                    _ = stop.wait() => return,
                }
            }
        };
        loop {
            tokio::select! {
                announced = listener.recv() => match announced {
                    Ok(change) if change.payload() == supervisor.store.fleet() => {
                        supervisor.sync_store().await
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!("stopped listening for plugin deploys: {error}");
                        break;
                    }
                },
                _ = stop.wait() => return,
            }
        }
    }
}

/// Brings the plugins directory in step with the fleet's plugin store.
async fn sync_store(supervisor: Arc<Supervisor>) {
    supervisor.sync_store().await;
}

/// Checks PostgreSQL and Redis, so readiness reflects an outage even without traffic; writes
/// the heartbeat when readiness changed.
async fn probe(supervisor: Arc<Supervisor>) {
    if supervisor.state.probe_dependencies().await {
        supervisor.write_heartbeat().await;
    }
}

/// Republishes requests without results and times them out (see [`requests::sweep`]).
async fn track_requests(state: Arc<HostState>) {
    let config = &state.config;
    if !config.processing_enabled {
        return;
    }
    if let Err(error) = requests::sweep(&state.pool, &state.redis, config).await {
        warn!("request tracker: {}", crate::text::causes(&error));
    }
}

/// Keeps the processed-entry ledger to its retention window (see [`ledger::prune`]).
async fn prune_ledger(state: Arc<HostState>, stop: Shutdown) {
    match prune_expired(&state, &stop).await {
        Ok(0) => {}
        Ok(pruned) => tracing::debug!(pruned, "pruned the processed-entry ledger"),
        Err(error) => warn!("ledger pruning: {}", crate::text::causes(&error)),
    }
    // However pruning went, learn how far every stream's ledger reaches now, including what
    // other hosts pruned: entries before that are refused (see `HostState::prepare`).
    if let Err(error) = state.refresh_horizons().await {
        warn!("ledger horizons: {}", crate::text::causes(&error));
    }
}

/// Deletes expired ledger rows chunk by chunk, yielding between chunks, keeping the rows of
/// entries still pending. Returns how many went.
async fn prune_expired(state: &HostState, stop: &Shutdown) -> Result<u64> {
    let config = &state.config;
    let mut redis = state.redis.clone();
    let mut oldest_pending = Vec::new();
    for stream in ledger::streams(&state.pool, &state.source).await? {
        let key = config.stream_key(&stream);
        if let Some(oldest) =
            streams::oldest_pending(&mut redis, &key, &config.consumer_group).await?
        {
            oldest_pending.push((stream, oldest));
        }
    }
    let mut total = 0;
    loop {
        let pruned = ledger::prune(
            &state.pool,
            &state.source,
            config.ledger_retention,
            &oldest_pending,
        )
        .await?;
        total += pruned;
        if pruned < ledger::PRUNE_CHUNK as u64 || stop.requested() {
            break;
        }
        tokio::task::yield_now().await;
    }
    loop {
        let pruned =
            ledger::prune_runs(&state.pool, &state.source, config.ledger_retention).await?;
        total += pruned;
        if pruned < ledger::PRUNE_CHUNK as u64 || stop.requested() {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// Publishes outbox messages their writer left unpublished (see [`outbox::relay`]).
async fn relay_outbox(state: Arc<HostState>) {
    match outbox::relay(&state.pool, &state.redis).await {
        Ok(0) => {}
        Ok(count) => info!(count, "relayed outbox messages left unpublished"),
        Err(error) => warn!("outbox relay: {}", crate::text::causes(&error)),
    }
}
