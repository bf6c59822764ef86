//! Starting and stopping the host: connections, migrations, plugins, one consumer task per
//! stream, and the background chores.
//!
//! - this file: [`RunningHost::start`], [`RunningHost::shutdown`] and [`run`] (start, wait for a
//!   signal, stop gracefully);
//! - `supervisor.rs`: plugin reloads and the consumer tasks that follow them;
//! - `background.rs`: the heartbeat, dependency probe, request tracker, ledger pruning and outbox
//!   relay, each run every so often until the host stops.

mod background;
mod rollout_sync;
mod store_sync;
mod supervisor;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::heartbeat;
use crate::persist::{self, ledger, schema::Catalog};
use crate::plugin::{PluginRegistry, PluginRuntime, PluginSet, watch};
use crate::redis_connection;
use crate::shutdown::StopSwitch;
use crate::state::HostState;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use supervisor::Supervisor;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// A started host. Dropping it does not stop it; call [`RunningHost::shutdown`].
pub struct RunningHost {
    supervisor: Arc<Supervisor>,
    http_addr: Option<std::net::SocketAddr>,
    stop: StopSwitch,
    background: Vec<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl RunningHost {
    /// Connects to PostgreSQL (creating the database if needed) and Redis, applies migrations
    /// unless disabled, loads the plugins, creates the consumer groups and starts consuming.
    ///
    /// The HTTP port is bound first, so a busy port fails before anything is created; with
    /// `wait_for_deps`, PostgreSQL and Redis are retried until they answer or it runs out.
    pub async fn start(config: Config) -> Result<RunningHost> {
        let config = Arc::new(config);
        let listener = match &config.http_addr {
            Some(addr) => Some(crate::http::bind(addr).await?),
            None => None,
        };
        let (state, client, runtime, store) = connect_and_load(&config).await?;
        state.warn_unmatched_plugin_sections();
        for failure in state.registry.snapshot().failures() {
            supervisor::count_load_failure(&state, failure);
        }
        let supervisor = Arc::new(Supervisor {
            state: state.clone(),
            runtime,
            client,
            store,
            consumers: Mutex::new(BTreeMap::new()),
            stopping: Mutex::new(Vec::new()),
            reloading: Mutex::new(()),
            following: Mutex::new(()),
            started_at: SystemTime::now(),
        });
        // Before any consumer reads: a host restarted in the middle of a rollout resumes it.
        supervisor.sync_rollouts().await;
        supervisor.reconcile_consumers().await?;
        supervisor.write_heartbeat().await;

        let stop = StopSwitch::new();
        let mut background = background::spawn_all(&supervisor, &stop);
        let mut http_addr = None;
        if let Some(listener) = listener {
            http_addr = Some(listener.local_addr()?);
            info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
            background.push(tokio::spawn(crate::http::serve(
                listener,
                state.clone(),
                stop.subscribe(),
            )));
        }
        let mut watcher = None;
        if config.watch_plugins {
            let (plugin_watcher, changes) = watch::watch(
                &config.plugins_dir,
                config.file.as_deref(),
                config.migrations_dir.as_deref(),
            )?;
            watcher = Some(plugin_watcher);
            background.push(tokio::spawn(supervisor::watch_plugins(
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
    pub fn state(&self) -> &Arc<HostState> {
        &self.supervisor.state
    }

    /// Rescans the plugins directory now (the watcher does this on its own; tests and operators
    /// may want it synchronously).
    pub async fn reload_plugins(&self) -> Result<()> {
        self.supervisor.reload().await
    }

    /// Stops reading, lets every batch in flight finish (commit and acknowledge), then returns.
    pub async fn shutdown(self) {
        self.stop.stop();
        let consumers = std::mem::take(&mut *self.supervisor.consumers.lock().await);
        for consumer in consumers.values() {
            consumer.stop.stop();
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
        heartbeat::withdraw(&self.supervisor.state).await;
        self.supervisor.state.pool.close().await;
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
    info!(streams = %crate::logging::List(&host.streams().await), "host is serving");
    shutdown.await;
    info!(
        timeout_ms = timeout.as_millis() as u64,
        "shutting down: finishing the batches in flight (signal again to exit at once)"
    );
    tokio::select! {
        _ = host.shutdown() => {
            info!("shut down cleanly");
            Ok(())
        }
        _ = tokio::time::sleep(timeout) => Err(anyhow::anyhow!(
            "batches in flight did not finish within {}; exiting anyway (their entries stay pending and will be reclaimed)",
            humantime::format_duration(timeout)
        )),
        _ = force => Err(anyhow::anyhow!(
            "second signal: exiting at once (entries not finished stay pending and will be reclaimed)"
        )),
    }
}

/// Start-up's first half: waits for PostgreSQL and Redis, migrates, reads the catalogue and the
/// ledger identity, writes the fleet's deployed plugins into the plugins directory and loads the
/// plugins; the shared state, the Redis client the consumers read with, the plugin runtime and
/// the store's sync.
async fn connect_and_load(
    config: &Arc<Config>,
) -> Result<(
    Arc<HostState>,
    redis_connection::RedisClient,
    Arc<PluginRuntime>,
    store_sync::StoreSync,
)> {
    let deadline = std::time::Instant::now() + config.wait_for_deps;
    let pool = wait_for("PostgreSQL", deadline, || {
        persist::connect(&config.database_url, 16, &config.database_timeouts)
    })
    .await?;
    if config.migrate {
        persist::migrate(&pool).await?;
        if let Some(dir) = &config.migrations_dir {
            persist::operator_migrations::apply(&pool, dir).await?;
        }
    }
    let catalog = Catalog::load(&pool).await?;
    let client = redis_connection::RedisClient::of(config)?;
    let mut redis = wait_for("Redis", deadline, || client.shared()).await?;
    let source = ledger::identity_of(&pool, &mut redis, config).await?;
    let adopted = ledger::adopt_legacy_rows(&pool, &source).await?;
    if adopted > 0 {
        info!(
            adopted,
            source, "adopted ledger rows written before the ledger recorded their source"
        );
    }
    let store = store_sync::StoreSync::new(
        persist::plugin_store::fleet(config),
        config.plugins_dir.clone(),
    );
    store
        .sync(&pool, &PluginSet::default())
        .await
        .context("cannot write the fleet's deployed plugins into the plugins directory")?;
    let runtime = Arc::new(config.plugin_runtime(Some(&config.cache_dir))?);
    let plugins = load_plugins(&runtime, config, store.files()).await?;
    let registry = Arc::new(PluginRegistry::new(plugins));
    let replay_secret = ledger::replay_secret(&pool, &source).await?;
    let state = Arc::new(HostState::new(
        config.clone(),
        source,
        replay_secret,
        pool,
        redis,
        registry,
        catalog,
    ));
    Ok((state, client, runtime, store))
}

/// Loads every plugin in the configured directory (on a blocking thread: compiling a component
/// takes seconds of CPU), warning when there is none.
async fn load_plugins(
    runtime: &Arc<PluginRuntime>,
    config: &Arc<Config>,
    deployed: std::collections::BTreeSet<std::path::PathBuf>,
) -> Result<PluginSet> {
    let plugins = {
        let runtime = runtime.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            PluginSet::load_dir(&runtime, &config.plugins_dir, &deployed, &|name| {
                config.sandbox_limits(name)
            })
        })
        .await
        .context("the plugin loading thread failed")??
    };
    if plugins.plugins().is_empty() {
        warn!(dir = %config.plugins_dir.display(), "no plugin loaded; no stream will be consumed until one is added");
    }
    Ok(plugins)
}

/// Tries `connect` until it succeeds or `deadline` passes (then its last error); `what` names the
/// dependency in the log. Tried once when the deadline has passed already (no waiting asked for).
async fn wait_for<T, F, Fut>(what: &str, deadline: std::time::Instant, mut connect: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
    loop {
        match connect().await {
            Ok(connected) => return Ok(connected),
            Err(error) if std::time::Instant::now() + backoff.upcoming() < deadline => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                warn!(
                    "waiting for {what} ({}s left): {}",
                    left.as_secs(),
                    crate::text::causes(&error)
                );
                tokio::time::sleep(backoff.pause()).await;
            }
            Err(error) => return Err(error),
        }
    }
}
