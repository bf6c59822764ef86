//! Plugin reloads and the consumer tasks that follow them: the part of a running host that
//! changes while it runs.

use crate::consumer;
use crate::heartbeat;
use crate::plugin::{PluginRuntime, PluginSet};
use crate::shutdown::{Shutdown, StopSwitch};
use crate::state::HostState;
use crate::streams;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{error, info};

/// Quiet time after a file event before the plugins directory is rescanned (a copy produces
/// several events).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(250);
/// Rescan the plugins directory this often even without events (missed events, network file
/// systems). Cheap: unchanged files are only hashed.
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);

/// One running consumer task and the switch that stops it.
pub(super) struct Consumer {
    pub(super) stop: StopSwitch,
    pub(super) task: JoinHandle<()>,
}

/// The parts of a running host that reloads and shutdown act on.
pub(super) struct Supervisor {
    pub(super) state: Arc<HostState>,
    pub(super) runtime: Arc<PluginRuntime>,
    pub(super) client: crate::redis_connection::RedisClient,
    /// Writes the fleet's deployed plugins into the plugins directory.
    pub(super) store: super::store_sync::StoreSync,
    pub(super) consumers: Mutex<BTreeMap<String, Consumer>>,
    /// Consumers told to stop (their stream lost its plugin) that may still be finishing their
    /// batches; shutdown waits for them. Nothing else ever waits for a consumer, so a stuck one
    /// cannot hold up a reload or the heartbeat.
    pub(super) stopping: Mutex<Vec<(String, JoinHandle<()>)>>,
    /// Serialises reloads (a watch event and the periodic rescan may coincide).
    pub(super) reloading: Mutex<()>,
    /// Serialises rounds of following the rollouts.
    pub(super) following: Mutex<()>,
    pub(super) started_at: SystemTime,
}

impl Supervisor {
    /// Rescans the plugins directory, swaps the new set in, and starts or stops consumers for
    /// streams that appeared or disappeared. Grants are re-read from the configuration file and
    /// the operator's new migrations applied first, so a plugin, its grant and its table can
    /// arrive together.
    pub(super) async fn reload(&self) -> Result<()> {
        self.reload_given_up(&[]).await
    }

    /// [`Self::reload`], where the fleet's plugin store took the plugins of `given_up` streams
    /// back on purpose: those the new set no longer serves are forgotten as consumed just before
    /// it is swapped in, so readiness never shows them as lost, not even between the two.
    async fn reload_given_up(&self, given_up: &[String]) -> Result<()> {
        let _one_at_a_time = self.reloading.lock().await;
        self.state.reload_policies();
        self.state.apply_operator_migrations().await;
        let current = self.state.registry.snapshot();
        let runtime = self.runtime.clone();
        let state = self.state.clone();
        let previous = current.clone();
        let deployed = self.store.files();
        // Limits as the configuration file says now (re-read above), like the grants.
        let next = tokio::task::spawn_blocking(move || {
            let config = &state.config;
            PluginSet::rescan(
                &runtime,
                &config.plugins_dir,
                &current,
                &deployed,
                &|name| config.limits_under(&state.policy(name)),
            )
        })
        .await
        .context("the plugin loading thread failed")??;
        let new_failures = next.failures().iter().filter(|f| {
            !previous
                .failures()
                .iter()
                .any(|old| old.file == f.file && old.sha256 == f.sha256)
        });
        for failure in new_failures {
            count_load_failure(&self.state, failure);
        }
        for stream in given_up {
            if next.for_stream(stream).is_none() {
                self.state.forget_consumed(stream);
            }
        }
        self.state.registry.replace(next);
        self.state.warn_unmatched_plugin_sections();
        self.reconcile_consumers().await?;
        self.write_heartbeat().await;
        Ok(())
    }

    /// Starts a consumer for every stream a loaded plugin declares that has none yet (creating
    /// its group), and tells consumers of streams no plugin declares any more to stop; they
    /// finish their batches in flight on their own. No lock is held across a Redis call or a
    /// wait for a consumer.
    pub(super) async fn reconcile_consumers(&self) -> Result<()> {
        let snapshot = self.state.registry.snapshot();
        let wanted: Vec<String> = snapshot.streams().map(str::to_string).collect();
        let config = &self.state.config;
        let (missing, gone) = {
            let mut consumers = self.consumers.lock().await;
            let missing: Vec<String> = wanted
                .iter()
                .filter(|s| !consumers.contains_key(*s))
                .cloned()
                .collect();
            let gone_streams: Vec<String> = consumers
                .keys()
                .filter(|s| !wanted.contains(s))
                .cloned()
                .collect();
            let gone: Vec<(String, Consumer)> = gone_streams
                .into_iter()
                .filter_map(|s| consumers.remove(&s).map(|c| (s, c)))
                .collect();
            (missing, gone)
        };
        for (stream, consumer) in gone {
            info!(
                stream,
                "no plugin handles this stream any more; its entries wait in Redis"
            );
            consumer.stop.stop();
            let mut stopping = self.stopping.lock().await;
            stopping.retain(|(_, task)| !task.is_finished());
            stopping.push((stream, consumer.task));
        }
        // Groups are created just after the ledger's horizons, read once for all of them.
        if !missing.is_empty() {
            self.state.refresh_horizons().await?;
        }
        for stream in missing {
            let mut redis = self.state.redis.clone();
            let horizon = self.state.horizon(&stream);
            streams::ensure_group(
                &mut redis,
                &config.stream_key(&stream),
                &config.consumer_group,
                horizon,
            )
            .await?;
            self.state.note_consumed(&stream);
            if let Some(plugin) = snapshot.for_stream(&stream) {
                crate::metrics::touch_stream(&self.state.metrics, &stream, &plugin.name);
            }
            let stop = StopSwitch::new();
            let stopped = stop.subscribe();
            let task = tokio::spawn(consumer::consume(
                self.state.clone(),
                self.client.clone(),
                stream.clone(),
                stopped,
            ));
            self.consumers
                .lock()
                .await
                .insert(stream, Consumer { stop, task });
        }
        Ok(())
    }

    /// Writes what the fleet's plugin store deployed or removed since the last round into the
    /// plugins directory, and reloads when that changed anything; then follows the fleet's
    /// rollouts (after the reload, so a promoted candidate is live before its rollout is let go).
    pub(super) async fn sync_store(&self) {
        let serving = self.state.registry.snapshot();
        match self.store.sync(&self.state.pool, &serving).await {
            Ok(synced) if !synced.changed => {}
            // The reload writes the heartbeat, with the streams given up on purpose forgotten.
            Ok(synced) => {
                if let Err(error) = self.reload_given_up(&synced.removed_streams).await {
                    error!("reloading plugins failed: {}", crate::text::causes(&error));
                }
            }
            Err(error) => tracing::warn!(
                "plugin store not synced (the plugins loaded keep serving): {}",
                crate::text::causes(&error)
            ),
        }
        if self.sync_rollouts().await {
            self.write_heartbeat().await;
        }
    }

    /// Follows the fleet's rollouts; whether what this host follows changed.
    pub(super) async fn sync_rollouts(&self) -> bool {
        let _one_at_a_time = self.following.lock().await;
        match super::rollout_sync::sync(&self.state, &self.runtime).await {
            Ok(changed) => changed,
            Err(error) => {
                tracing::warn!(
                    "rollouts not followed this round (what this host follows stays as it was): {}",
                    crate::text::causes(&error)
                );
                false
            }
        }
    }

    /// Writes this host's heartbeat with the streams it consumes now.
    pub(super) async fn write_heartbeat(&self) {
        let streams: Vec<String> = self.consumers.lock().await.keys().cloned().collect();
        heartbeat::write(&self.state, &streams, self.started_at).await;
    }
}

/// Reloads the plugins after file events (debounced) and every [`RESCAN_INTERVAL`].
pub(super) async fn watch_plugins(
    supervisor: Arc<Supervisor>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<()>,
    mut stop: Shutdown,
) {
    loop {
        tokio::select! {
            event = changes.recv() => {
                if event.is_none() {
                    return;
                }
                // Let the writer finish: wait until the events stop for a moment.
                loop {
                    tokio::select! {
                        more = changes.recv() => if more.is_none() { return },
                        _ = tokio::time::sleep(RELOAD_DEBOUNCE) => break,
                    }
                }
            }
            _ = tokio::time::sleep(RESCAN_INTERVAL) => {}
            _ = stop.wait() => return,
        }
        if let Err(error) = supervisor.reload().await {
            error!("reloading plugins failed: {}", crate::text::causes(&error));
        }
    }
}

/// Counts a failed load of a plugin file, labelled by the file's name (the plugin's own name is
/// unknown when its manifest could not be read).
pub(super) fn count_load_failure(state: &HostState, failure: &crate::plugin::LoadFailure) {
    let file = failure
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    state
        .metrics
        .load_failures
        .get_or_create(&crate::metrics::ByFile { file })
        .inc();
}
