//! Starting and stopping the host: connections, migrations, plugins, one consumer task per
//! stream, and the outbox relay.

use crate::config::Config;
use crate::consumer;
use crate::delivery::Delivery;
use crate::persist::{self, ledger, schema::Catalog};
use crate::plugin::{PluginRegistry, PluginRuntime, PluginSet, SandboxLimits};
use crate::streams;
use anyhow::{Context, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How often the relay looks for outbox messages that were not published after their commit.
const RELAY_INTERVAL: Duration = Duration::from_secs(5);
/// How old an outbox message must be before the relay takes it over from the host that wrote it.
const RELAY_MIN_AGE: Duration = Duration::from_secs(30);

/// A started host. Dropping it does not stop it; call [`RunningHost::shutdown`].
pub struct RunningHost {
    delivery: Arc<Delivery>,
    runtime: Arc<PluginRuntime>,
    client: redis::Client,
    stop: watch::Sender<bool>,
    consumers: BTreeMap<String, JoinHandle<()>>,
    relay: JoinHandle<()>,
}

impl RunningHost {
    /// Connects to PostgreSQL (creating the database if needed) and Redis, applies migrations
    /// unless disabled, loads the plugins, creates the consumer groups and starts consuming.
    pub async fn start(config: Config) -> Result<RunningHost> {
        let config = Arc::new(config);
        let pool = persist::connect(&config.database_url, 16).await?;
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

        let runtime = Arc::new(PluginRuntime::new(SandboxLimits {
            call_timeout: config.plugin_timeout,
            memory_bytes: config.plugin_memory_bytes,
        })?);
        let plugins = {
            let runtime = runtime.clone();
            let dir = config.plugins_dir.clone();
            tokio::task::spawn_blocking(move || PluginSet::load_dir(&runtime, &dir))
                .await
                .context("the plugin loading thread failed")??
        };
        if plugins.plugins().is_empty() {
            warn!(dir = %config.plugins_dir.display(), "no plugin loaded; no stream will be consumed");
        }
        let registry = Arc::new(PluginRegistry::new(plugins));
        let delivery = Arc::new(Delivery::new(
            config.clone(),
            pool,
            redis,
            registry,
            catalog,
        ));

        let (stop, _) = watch::channel(false);
        let relay = tokio::spawn(relay_outbox(delivery.clone(), stop.subscribe()));
        let mut host = RunningHost {
            delivery,
            runtime,
            client,
            stop,
            consumers: BTreeMap::new(),
            relay,
        };
        host.reconcile_consumers().await?;
        Ok(host)
    }

    /// Starts a consumer for every stream a loaded plugin declares that has none yet (creating
    /// its group), and stops consumers of streams no plugin declares any more.
    pub async fn reconcile_consumers(&mut self) -> Result<()> {
        let snapshot = self.delivery.registry.snapshot();
        let wanted: Vec<String> = snapshot.streams().map(str::to_string).collect();
        for stream in &wanted {
            if self.consumers.contains_key(stream) {
                continue;
            }
            let mut redis = self.delivery.redis.clone();
            streams::ensure_group(
                &mut redis,
                &self.delivery.config.stream_key(stream),
                &self.delivery.config.consumer_group,
            )
            .await?;
            let task = tokio::spawn(consumer::consume(
                self.delivery.clone(),
                self.client.clone(),
                stream.clone(),
                self.stop.subscribe(),
            ));
            self.consumers.insert(stream.clone(), task);
        }
        let gone: Vec<String> = self
            .consumers
            .keys()
            .filter(|s| !wanted.contains(s))
            .cloned()
            .collect();
        for stream in gone {
            if let Some(task) = self.consumers.remove(&stream) {
                info!(
                    stream,
                    "no plugin handles this stream any more; its entries wait in Redis"
                );
                task.abort();
            }
        }
        Ok(())
    }

    /// The streams being consumed (logical names).
    pub fn streams(&self) -> Vec<String> {
        self.consumers.keys().cloned().collect()
    }

    /// The shared protocol state (configuration, pool, registry).
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// The plugin runtime (for loading further plugins).
    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    /// Stops reading, lets every batch in flight finish (commit and acknowledge), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for (stream, task) in self.consumers {
            if let Err(error) = task.await {
                warn!(stream, "consumer task ended abnormally: {error}");
            }
        }
        let _ = self.relay.await;
        self.delivery.pool.close().await;
    }
}

/// Runs the host until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let host = RunningHost::start(config).await?;
    info!(streams = ?host.streams(), "host is serving");
    shutdown.await;
    info!("shutting down: finishing the batches in flight");
    host.shutdown().await;
    Ok(())
}

/// Publishes outbox messages whose host did not publish them after commit (it crashed, or Redis
/// failed at that moment).
async fn relay_outbox(delivery: Arc<Delivery>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELAY_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        if let Err(error) = relay_once(&delivery).await {
            warn!("outbox relay: {error:#}");
        }
    }
}

async fn relay_once(delivery: &Delivery) -> Result<()> {
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
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    info!(
        count = ids.len(),
        "relayed outbox messages left unpublished"
    );
    Ok(())
}
