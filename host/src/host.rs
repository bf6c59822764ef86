//! Starting and stopping the host: connections, migrations, plugins and their hot reload, one
//! consumer task per stream, the outbox relay and the status heartbeat.

use crate::config::Config;
use crate::consumer;
use crate::health::{self, Dependency};
use crate::persist::{self, ledger, schema::Catalog};
use crate::plugin::{PluginRegistry, PluginRuntime, PluginSet, SandboxLimits, watch};
use crate::publish;
use crate::state::HostState;
use crate::status;
use crate::streams;
use anyhow::{Context, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Mutex, watch as signal};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// How often the relay looks for outbox messages that were not published after their commit.
const RELAY_INTERVAL: Duration = Duration::from_secs(5);
/// How old an outbox message must be before the relay takes it over from the host that wrote it.
const RELAY_MIN_AGE: Duration = Duration::from_secs(30);
/// Quiet time after a file event before the plugins directory is rescanned (a copy produces
/// several events).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(250);
/// The longest pause between two rounds of ledger pruning.
const LEDGER_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Rescan the plugins directory this often even without events (missed events, network file
/// systems). Cheap: unchanged files are only hashed.
const RESCAN_INTERVAL: Duration = Duration::from_secs(10);

/// One running consumer task and the switch that stops it.
struct Consumer {
    stop: signal::Sender<bool>,
    task: JoinHandle<()>,
}

/// The parts of a running host that reloads and shutdown act on.
struct Supervisor {
    delivery: Arc<HostState>,
    runtime: Arc<PluginRuntime>,
    client: redis::Client,
    consumers: Mutex<BTreeMap<String, Consumer>>,
    /// Consumers told to stop (their stream lost its plugin) that may still be finishing their
    /// batches; shutdown waits for them. Nothing else ever waits for a consumer, so a stuck one
    /// cannot hold up a reload or the heartbeat.
    stopping: Mutex<Vec<(String, JoinHandle<()>)>>,
    /// Serialises reloads (a watch event and the periodic rescan may coincide).
    reloading: Mutex<()>,
    started_at: SystemTime,
}

/// A started host. Dropping it does not stop it; call [`RunningHost::shutdown`].
pub struct RunningHost {
    supervisor: Arc<Supervisor>,
    http_addr: Option<std::net::SocketAddr>,
    stop: signal::Sender<bool>,
    background: Vec<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl RunningHost {
    /// Connects to PostgreSQL (creating the database if needed) and Redis, applies migrations
    /// unless disabled, loads the plugins, creates the consumer groups and starts consuming.
    pub async fn start(config: Config) -> Result<RunningHost> {
        let config = Arc::new(config);
        let pool = persist::connect(&config.database_url, 16, &config.database_timeouts).await?;
        if config.migrate {
            persist::migrate(&pool).await?;
        }
        let catalog = Catalog::load(&pool).await?;

        let client = redis::Client::open(config.redis_url.as_str())
            .with_context(|| format!("invalid Redis URL {}", persist::redact(&config.redis_url)))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let mut redis = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to Redis at {}",
                    persist::redact(&config.redis_url)
                )
            })?;
        let _: () = redis::cmd("PING")
            .query_async(&mut redis)
            .await
            .with_context(|| {
                format!(
                    "Redis at {} does not answer PING",
                    persist::redact(&config.redis_url)
                )
            })?;

        let source = streams::source_identity(&mut redis, &config.source_identity_key()).await?;
        let adopted = crate::persist::ledger::adopt_legacy_rows(&pool, &source).await?;
        if adopted > 0 {
            info!(
                adopted,
                source, "adopted ledger rows written before the ledger recorded their source"
            );
        }

        let runtime = Arc::new(PluginRuntime::for_config(&config, Some(&config.cache_dir))?);
        let plugins = {
            let runtime = runtime.clone();
            let config = config.clone();
            tokio::task::spawn_blocking(move || {
                PluginSet::load_dir(&runtime, &config.plugins_dir, &|name| {
                    SandboxLimits::for_plugin(&config, name)
                })
            })
            .await
            .context("the plugin loading thread failed")??
        };
        if plugins.plugins().is_empty() {
            warn!(dir = %config.plugins_dir.display(), "no plugin loaded; no stream will be consumed until one is added");
        }
        let registry = Arc::new(PluginRegistry::new(plugins));
        let delivery = Arc::new(HostState::new(
            config.clone(),
            source,
            pool,
            redis,
            registry,
            catalog,
        ));

        let supervisor = Arc::new(Supervisor {
            delivery: delivery.clone(),
            runtime,
            client,
            consumers: Mutex::new(BTreeMap::new()),
            stopping: Mutex::new(Vec::new()),
            reloading: Mutex::new(()),
            started_at: SystemTime::now(),
        });
        supervisor.reconcile_consumers().await?;
        supervisor.publish_status().await;

        let (stop, _) = signal::channel(false);
        let mut background = vec![
            tokio::spawn(relay_outbox(delivery.clone(), stop.subscribe())),
            tokio::spawn(heartbeat(supervisor.clone(), stop.subscribe())),
            tokio::spawn(probe(supervisor.clone(), stop.subscribe())),
            tokio::spawn(track_requests(delivery.clone(), stop.subscribe())),
            tokio::spawn(prune_ledger(delivery.clone(), stop.subscribe())),
        ];
        let mut http_addr = None;
        if let Some(addr) = &config.http_addr {
            let listener = crate::http::bind(addr).await?;
            http_addr = Some(listener.local_addr()?);
            info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
            background.push(tokio::spawn(crate::http::serve(
                listener,
                delivery.clone(),
                stop.subscribe(),
            )));
        }
        let mut watcher = None;
        if config.watch_plugins {
            let (plugin_watcher, changes) = watch::watch(&config.plugins_dir)?;
            watcher = Some(plugin_watcher);
            background.push(tokio::spawn(watch_plugins(
                supervisor.clone(),
                changes,
                stop.subscribe(),
            )));
        }
        Ok(RunningHost {
            supervisor,
            http_addr,
            stop,
            background,
            _watcher: watcher,
        })
    }

    /// The streams being consumed (logical names), including those whose consumer was told to
    /// stop and is still finishing its last read or batch.
    pub async fn streams(&self) -> Vec<String> {
        let mut streams: Vec<String> = self
            .supervisor
            .consumers
            .lock()
            .await
            .keys()
            .cloned()
            .collect();
        for (stream, task) in self.supervisor.stopping.lock().await.iter() {
            if !task.is_finished() && !streams.contains(stream) {
                streams.push(stream.clone());
            }
        }
        streams.sort();
        streams
    }

    /// Where the HTTP endpoint listens, when enabled.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    /// The shared protocol state (configuration, pool, registry).
    pub fn delivery(&self) -> &Arc<HostState> {
        &self.supervisor.delivery
    }

    /// Rescans the plugins directory now (the watcher does this on its own; tests and operators
    /// may want it synchronously).
    pub async fn reload_plugins(&self) -> Result<()> {
        self.supervisor.reload().await
    }

    /// Stops reading, lets every batch in flight finish (commit and acknowledge), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let consumers = std::mem::take(&mut *self.supervisor.consumers.lock().await);
        for consumer in consumers.values() {
            let _ = consumer.stop.send(true);
        }
        let stopping = std::mem::take(&mut *self.supervisor.stopping.lock().await);
        let tasks = consumers
            .into_iter()
            .map(|(stream, consumer)| (stream, consumer.task))
            .chain(stopping);
        for (stream, task) in tasks {
            if let Err(error) = task.await {
                warn!(stream, "consumer task ended abnormally: {error}");
            }
        }
        for task in self.background {
            let _ = task.await;
        }
        status::withdraw(&self.supervisor.delivery).await;
        self.supervisor.delivery.pool.close().await;
    }
}

impl Supervisor {
    /// Rescans the plugins directory, swaps the new set in, and starts or stops consumers for
    /// streams that appeared or disappeared.
    async fn reload(&self) -> Result<()> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.delivery.registry.snapshot();
        let runtime = self.runtime.clone();
        let config = self.delivery.config.clone();
        let previous = current.clone();
        let next = tokio::task::spawn_blocking(move || {
            PluginSet::rescan(&runtime, &config.plugins_dir, &current, &|name| {
                SandboxLimits::for_plugin(&config, name)
            })
        })
        .await
        .context("the plugin loading thread failed")??;
        let new_failures = next
            .failures()
            .iter()
            .filter(|f| {
                !previous
                    .failures()
                    .iter()
                    .any(|old| old.file == f.file && old.sha256 == f.sha256)
            })
            .count();
        self.delivery.metrics.add(
            "kaleidoscope_plugin_load_failures_total",
            Vec::new(),
            new_failures as u64,
        );
        self.delivery.registry.replace(next);
        self.reconcile_consumers().await?;
        self.publish_status().await;
        Ok(())
    }

    /// Starts a consumer for every stream a loaded plugin declares that has none yet (creating
    /// its group), and tells consumers of streams no plugin declares any more to stop; they
    /// finish their batches in flight on their own. No lock is held across a Redis call or a
    /// wait for a consumer.
    async fn reconcile_consumers(&self) -> Result<()> {
        let snapshot = self.delivery.registry.snapshot();
        let wanted: Vec<String> = snapshot.streams().map(str::to_string).collect();
        let config = &self.delivery.config;
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
            let _ = consumer.stop.send(true);
            let mut stopping = self.stopping.lock().await;
            stopping.retain(|(_, task)| !task.is_finished());
            stopping.push((stream, consumer.task));
        }
        for stream in missing {
            let mut redis = self.delivery.redis.clone();
            streams::ensure_group(
                &mut redis,
                &config.stream_key(&stream),
                &config.consumer_group,
            )
            .await?;
            let (stop, stopped) = signal::channel(false);
            let task = tokio::spawn(consumer::consume(
                self.delivery.clone(),
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

    async fn publish_status(&self) {
        let streams: Vec<String> = self.consumers.lock().await.keys().cloned().collect();
        status::publish(&self.delivery, &streams, self.started_at).await;
    }
}

/// Runs the host until `shutdown` completes, then stops gracefully: no new reads, batches in
/// flight finish, commit and are acknowledged. Gives up (with an error) when that takes longer
/// than the configured shutdown timeout or when `force` completes (a second signal); entries not
/// finished then simply stay pending for this or another consumer.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    force: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let timeout = config.shutdown_timeout;
    let host = RunningHost::start(config).await?;
    info!(streams = ?host.streams().await, "host is serving");
    shutdown.await;
    info!(timeout = ?timeout, "shutting down: finishing the batches in flight (signal again to exit at once)");
    tokio::select! {
        _ = host.shutdown() => {
            info!("shut down cleanly");
            Ok(())
        }
        _ = tokio::time::sleep(timeout) => Err(anyhow::anyhow!(
            "batches in flight did not finish within {timeout:?}; exiting anyway (their entries stay pending and will be reclaimed)"
        )),
        _ = force => Err(anyhow::anyhow!(
            "second signal: exiting at once (entries not finished stay pending and will be reclaimed)"
        )),
    }
}

/// Reloads the plugins after file events (debounced) and every [`RESCAN_INTERVAL`].
async fn watch_plugins(
    supervisor: Arc<Supervisor>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<()>,
    mut stop: signal::Receiver<bool>,
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
            _ = stop.changed() => return,
        }
        if let Err(error) = supervisor.reload().await {
            error!("reloading plugins failed: {}", crate::text::causes(&error));
        }
    }
}

/// Keeps this host's status entry fresh for `kaleidoscope status`.
async fn heartbeat(supervisor: Arc<Supervisor>, mut stop: signal::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(status::HEARTBEAT) => supervisor.publish_status().await,
            _ = stop.changed() => return,
        }
    }
}

/// Checks PostgreSQL and Redis every [`health::PROBE_INTERVAL`] so readiness reflects an outage
/// even without traffic; publishes the status when readiness changes.
async fn probe(supervisor: Arc<Supervisor>, mut stop: signal::Receiver<bool>) {
    let delivery = &supervisor.delivery;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(health::PROBE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let before = delivery.health.problems().len();
        let unanswered = |_| "no answer within the probe interval".to_string();
        let database = tokio::time::timeout(
            health::PROBE_INTERVAL,
            sqlx::query("SELECT 1").execute(&delivery.pool),
        )
        .await
        .map_err(unanswered)
        .and_then(|done| done.map(drop).map_err(|e| e.to_string()));
        delivery.health.observe(Dependency::Database, database);
        let mut redis = delivery.redis.clone();
        let ping = tokio::time::timeout(
            health::PROBE_INTERVAL,
            redis::cmd("PING").query_async::<()>(&mut redis),
        )
        .await
        .map_err(unanswered)
        .and_then(|done| done.map_err(|e| e.to_string()));
        delivery.health.observe(Dependency::Redis, ping);
        if delivery.health.problems().len() != before {
            supervisor.publish_status().await;
        }
    }
}

/// Republishes requests without results and times them out (see [`publish::sweep`]).
async fn track_requests(delivery: Arc<HostState>, mut stop: signal::Receiver<bool>) {
    let config = &delivery.config;
    let every = (Duration::from_secs(config.timeout_seconds) / 4)
        .clamp(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if !config.processing_enabled {
            continue;
        }
        if let Err(error) = publish::sweep(&delivery.pool, &delivery.redis, config).await {
            warn!("request tracker: {}", crate::text::causes(&error));
        }
    }
}

/// Keeps the processed-entry ledger to its retention window (see [`ledger::prune`]): every
/// interval, deletes old rows chunk by chunk, yielding between chunks.
async fn prune_ledger(delivery: Arc<HostState>, mut stop: signal::Receiver<bool>) {
    let retention = delivery.config.ledger_retention;
    let every = (retention / 4).clamp(Duration::from_millis(100), LEDGER_PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match prune_once(&delivery, &mut stop).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned the processed-entry ledger"),
            Err(error) => warn!("ledger pruning: {}", crate::text::causes(&error)),
        }
    }
}

async fn prune_once(delivery: &HostState, stop: &mut signal::Receiver<bool>) -> Result<u64> {
    let config = &delivery.config;
    let mut redis = delivery.redis.clone();
    let mut oldest_pending = Vec::new();
    for stream in ledger::streams(&delivery.pool, &delivery.source).await? {
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
            &delivery.pool,
            &delivery.source,
            config.ledger_retention,
            &oldest_pending,
        )
        .await?;
        total += pruned;
        if pruned < ledger::PRUNE_CHUNK as u64 || *stop.borrow() {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// Publishes outbox messages whose host did not publish them after commit (it crashed, or Redis
/// failed at that moment).
async fn relay_outbox(delivery: Arc<HostState>, mut stop: signal::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELAY_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        if let Err(error) = relay_once(&delivery).await {
            warn!("outbox relay: {}", crate::text::causes(&error));
        }
    }
}

async fn relay_once(delivery: &HostState) -> Result<()> {
    let mut tx = delivery.pool.begin().await?;
    let messages = ledger::claim_stale(&mut tx, RELAY_MIN_AGE, 100).await?;
    if messages.is_empty() {
        return Ok(());
    }
    let mut redis = delivery.redis.clone();
    for message in &messages {
        streams::add(&mut redis, &message.stream_key, &message.fields).await?;
    }
    let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
    ledger::remove(&mut *tx, &ids).await?;
    tx.commit().await?;
    info!(
        count = ids.len(),
        "relayed outbox messages left unpublished"
    );
    Ok(())
}
