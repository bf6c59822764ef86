//! The shared state of a running host: configuration, connections, loaded plugins, health,
//! metrics and the live schema catalogue. One value, behind an `Arc`, is shared by every
//! consumer task, the HTTP endpoint, the heartbeat and the background loops; the delivery
//! protocol ([`crate::delivery`]) is written as its methods.

use crate::config::{Config, PluginPolicy};
use crate::failure::Dependency;
use crate::health::PROBE_INTERVAL;
use crate::metrics::Metrics;
use crate::persist::schema::Catalog;
use crate::plugin::PluginRegistry;
use crate::redis_connection::RedisConnection;
use crate::streams::EntryId;
use anyhow::Result;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How often the catalogue may be re-read when a command names an unknown table or column
/// (a migration may have added it since start-up).
const CATALOG_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// What every part of a running host shares.
pub struct HostState {
    pub config: Arc<Config>,
    /// This deployment's identity in the processed-entry ledger (see
    /// [`crate::persist::ledger::identity`]): entries are recorded as (source, stream, id).
    pub source: String,
    /// The secret that proves `dlq replay`'s marks (see
    /// [`crate::persist::ledger::replay_secret`]).
    pub replay_secret: String,
    /// Outages of PostgreSQL and Redis, for readiness.
    pub health: crate::health::Health,
    /// Counters and latency histograms for `/metrics`.
    pub metrics: Metrics,
    pub pool: PgPool,
    /// The health probe's own connection (see [`crate::persist::probe_pool`]).
    probe: PgPool,
    pub redis: RedisConnection,
    pub registry: Arc<PluginRegistry>,
    /// The rollouts of candidate versions this host follows (see [`crate::rollout`]).
    pub rollouts: crate::rollout::Rollouts,
    catalog: RwLock<(Arc<Catalog>, Instant)>,
    /// The plugins' grants: [`Config::plugins`] at start, then whatever the configuration file
    /// says after each change (see [`HostState::reload_policies`]).
    policies: RwLock<Arc<BTreeMap<String, PluginPolicy>>>,
    /// Every stream this host has consumed since it started: one that loses its plugin stays
    /// here, so readiness says its entries wait unread.
    consumed: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The unmatched `[plugins.<name>]` sections at the last warning: a section is warned about
    /// when it becomes one, not at every rescan.
    warned_unmatched: std::sync::Mutex<Vec<String>>,
    /// The `[plugins.<name>]` section names of the configuration file, read with the grants
    /// (at start and at each reload) rather than at every heartbeat.
    plugin_sections: RwLock<Arc<std::collections::BTreeSet<String>>>,
    /// When this host last wrote its heartbeat (its start, before the first).
    heartbeat_written: std::sync::Mutex<Instant>,
    /// Per stream, the newest entry id the ledger has forgotten (see
    /// [`crate::persist::ledger::horizons`]); refreshed by every pruning round and whenever a
    /// group is created.
    horizons: RwLock<std::collections::HashMap<String, EntryId>>,
    /// Failures that do not stop this host but would stop its next start (a configuration file
    /// that no longer parses, an operator migration that fails), by cause: reported now, in
    /// readiness, a metric and `status`, instead of as a crash loop at the next restart.
    latent: std::sync::Mutex<BTreeMap<Latent, String>>,
}

/// What a latent failure is about (see [`HostState::latent_failures`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Latent {
    /// The configuration file does not parse, or holds an invalid value.
    Configuration,
    /// An operator migration fails.
    Migration,
}

impl Latent {
    /// The name metrics label it with.
    pub fn as_str(self) -> &'static str {
        match self {
            Latent::Configuration => "configuration",
            Latent::Migration => "migration",
        }
    }

    /// Every cause, so each has a series (0 or 1).
    pub const ALL: [Latent; 2] = [Latent::Configuration, Latent::Migration];
}

impl HostState {
    /// Whether PostgreSQL answers, asked on the probe's own connection.
    pub async fn database_answers(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.probe).await.map(drop)
    }

    /// Shares the connections, configuration, plugins and catalogue among consumer tasks.
    pub fn new(
        config: Arc<Config>,
        source: String,
        replay_secret: String,
        pool: PgPool,
        redis: RedisConnection,
        registry: Arc<PluginRegistry>,
        catalog: Catalog,
    ) -> Self {
        let plugin_sections = config
            .file
            .as_deref()
            .and_then(|file| Config::plugin_section_names(file).ok())
            .unwrap_or_default();
        let probe = crate::persist::probe_pool(
            &config.database_url,
            &config.database_timeouts,
            PROBE_INTERVAL,
        )
        .unwrap_or_else(|| pool.clone());
        Self {
            probe,
            policies: RwLock::new(Arc::new(config.plugins.clone())),
            source,
            replay_secret,
            health: crate::health::Health::default(),
            metrics: Metrics::default(),
            pool,
            redis,
            registry,
            rollouts: Default::default(),
            catalog: RwLock::new((Arc::new(catalog), Instant::now())),
            config,
            consumed: Default::default(),
            warned_unmatched: Default::default(),
            heartbeat_written: std::sync::Mutex::new(Instant::now()),
            plugin_sections: RwLock::new(Arc::new(plugin_sections)),
            horizons: RwLock::default(),
            latent: Default::default(),
        }
    }

    /// The latent failures now: what would stop this host's next start, by cause.
    pub fn latent_failures(&self) -> BTreeMap<Latent, String> {
        match self.latent.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Records (`Some`) or clears (`None`) the latent failure of `cause`, logging a change: an
    /// ERROR when it appears or changes, INFO when it is mended.
    pub fn note_latent(&self, cause: Latent, failure: Option<String>) {
        let mut latent = match self.latent.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match failure {
            Some(failure) => {
                if latent.get(&cause) != Some(&failure) {
                    tracing::error!(cause = cause.as_str(), "{failure}");
                    latent.insert(cause, failure);
                }
            }
            None => {
                if latent.remove(&cause).is_some() {
                    tracing::info!(
                        cause = cause.as_str(),
                        "mended: the next start would no longer fail on the {}",
                        cause.as_str()
                    );
                }
            }
        }
    }

    /// The ledger's horizon of `stream` as last read: entries at or before it were finished and
    /// must not run again, whatever Redis delivers.
    pub fn horizon(&self, stream: &str) -> Option<EntryId> {
        self.horizons
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .copied()
    }

    /// Reads every stream's horizon from the ledger again (other hosts' pruning moves them too);
    /// [`HostState::horizon`] then answers from it.
    pub async fn refresh_horizons(&self) -> Result<()> {
        let horizons = crate::persist::ledger::horizons(&self.pool, &self.source).await?;
        *self.horizons.write().unwrap_or_else(|p| p.into_inner()) = horizons;
        Ok(())
    }

    /// Notes that the heartbeat was just written (see [`HostState::heartbeat_age`]).
    pub fn note_heartbeat_written(&self) {
        let mut written = self
            .heartbeat_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *written = Instant::now();
    }

    /// Time since this host last wrote its heartbeat: `status` calls a host stale past
    /// [`crate::heartbeat::STALE_AFTER`], so `/metrics` exports the same age for alerts.
    pub fn heartbeat_age(&self) -> Duration {
        self.heartbeat_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Every stream this host has consumed since it started, served or not now: what `/metrics`
    /// keeps series for, so a stream that lost its plugin still shows its lag and pending entries.
    pub fn consumed_streams(&self) -> Vec<String> {
        let consumed = match self.consumed.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        consumed.iter().cloned().collect()
    }

    /// Forgets that this host consumed `stream`: its plugin was taken out of the fleet's plugin
    /// store on purpose (`plugin remove`, or a refused deploy undone), so its entries waiting
    /// unread is what was asked for, not a fault to page anyone about.
    pub fn forget_consumed(&self, stream: &str) {
        let mut consumed = match self.consumed.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if consumed.remove(stream) {
            tracing::info!(
                stream,
                "no longer consumed here: its plugin was taken out of the plugin store"
            );
        }
    }

    /// Records that this host consumes `stream` (see [`HostState::not_ready`]).
    pub fn note_consumed(&self, stream: &str) {
        let mut consumed = match self.consumed.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        consumed.insert(stream.to_string());
    }

    /// What plugin `name` may write now (no grants if it has none).
    pub fn policy(&self, name: &str) -> PluginPolicy {
        let policies = match self.policies.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        policies.get(name).cloned().unwrap_or_default()
    }

    /// Re-reads the grants from the configuration file (when there is one) and applies them to
    /// the next batches. A file that does not parse is reported and the grants in force stay.
    /// Returns whether anything changed.
    pub fn reload_policies(&self) -> bool {
        let Some(file) = &self.config.file else {
            return false;
        };
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let restart = Config::from_sources(Some(file), &env, &self.config.flags).err();
        self.note_latent(
            Latent::Configuration,
            restart.map(|error| {
                format!(
                    "the configuration file {} would stop the next start: {} (this host goes on with the configuration it has)",
                    file.display(),
                    crate::text::causes(&error)
                )
            }),
        );
        let fresh = match Config::read_policies(file) {
            Ok(fresh) => fresh,
            Err(error) => {
                tracing::debug!(
                    "plugin grants not reloaded, the ones in force stay: {}",
                    crate::text::causes(&error)
                );
                return false;
            }
        };
        if let Ok(names) = Config::plugin_section_names(file) {
            let mut sections = match self.plugin_sections.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            *sections = Arc::new(names);
        }
        let mut guard = match self.policies.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if **guard == fresh {
            return false;
        }
        *guard = Arc::new(fresh);
        tracing::info!(file = %file.display(), "plugin grants reloaded");
        true
    }

    /// `[plugins.<name>]` sections of the operator's configuration file that name no loaded
    /// plugin: a typo in the name, or a plugin not deployed yet. Reported (heartbeat, `status`,
    /// a warning at each load), never an error: granting before deploying is the usual order.
    pub fn unmatched_plugin_sections(&self) -> Vec<String> {
        let names = match self.plugin_sections.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let snapshot = self.registry.snapshot();
        names
            .iter()
            .filter(|name| !snapshot.plugins().iter().any(|p| &p.name == *name))
            .cloned()
            .collect()
    }

    /// Logs a warning for each section of [`HostState::unmatched_plugin_sections`] that has just
    /// become one (it was not at the last call), not for the same section at every rescan.
    pub fn warn_unmatched_plugin_sections(&self) {
        let unmatched = self.unmatched_plugin_sections();
        let newly: Vec<String> = {
            let mut warned = match self.warned_unmatched.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            let newly = unmatched
                .iter()
                .filter(|name| !warned.contains(name))
                .cloned()
                .collect();
            warned.clone_from(&unmatched);
            newly
        };
        if newly.is_empty() {
            return;
        }
        let loaded: Vec<String> = self
            .registry
            .snapshot()
            .plugins()
            .iter()
            .map(|p| p.name.clone())
            .collect();
        for name in newly {
            tracing::warn!(
                file = %self.config.file.as_deref().map(|f| f.display().to_string()).unwrap_or_default(),
                "[plugins.{name}] names no loaded plugin (loaded: {}): a typo, or a plugin not deployed yet",
                loaded.join(", ")
            );
        }
    }

    /// Why this host is not ready to do its work (empty when it is): PostgreSQL or Redis out, no
    /// plugin loaded, a [latent failure](Self::latent_failures) that would stop its next start,
    /// or a stream this host consumed that lost its plugin (its entries wait). The
    /// one readiness of the host: `/readyz`, the `kaleidoscope_ready` gauge and the heartbeat that
    /// `kaleidoscope status` reads all answer from it.
    ///
    /// A plugin file that did not load is not a reason: a refused deploy leaves the host serving
    /// what it served, and must not page anyone (it shows in `status`, in
    /// `kaleidoscope_plugin_files_failing` and in the deploy's own answer).
    pub fn not_ready(&self) -> Vec<String> {
        let mut problems = self.health.problems();
        let plugins = self.registry.snapshot();
        if plugins.plugins().is_empty() {
            problems.push("no plugin is loaded".to_string());
        }
        problems.extend(self.latent_failures().into_values());
        for stream in self.consumed_streams() {
            if plugins.for_stream(&stream).is_none() {
                problems.push(format!(
                    "stream {stream} has no loaded plugin any more: its entries wait unread"
                ));
            }
        }
        problems
    }

    /// Asks PostgreSQL (on a connection of the probe's own, not the delivery path's pool) and
    /// Redis whether they answer (within [`PROBE_INTERVAL`] each) and
    /// records the result in [`Self::health`], so readiness reflects an outage even when no
    /// traffic arrives to hit it. Returns whether readiness changed.
    pub async fn probe_dependencies(&self) -> bool {
        let before = self.health.problems().len();
        let unanswered = |_| "no answer within the probe interval".to_string();
        let database =
            tokio::time::timeout(PROBE_INTERVAL, sqlx::query("SELECT 1").execute(&self.probe))
                .await
                .map_err(unanswered)
                .and_then(|done| done.map(drop).map_err(|e| e.to_string()));
        self.health.observe(Dependency::Database, database);
        let mut redis = self.redis.clone();
        let ping = tokio::time::timeout(
            PROBE_INTERVAL,
            redis::cmd("PING").query_async::<()>(&mut redis),
        )
        .await
        .map_err(unanswered)
        .and_then(|done| done.map_err(|e| e.to_string()));
        self.health.observe(Dependency::Redis, ping);
        self.health.problems().len() != before
    }

    /// Applies the operator's new migrations (when a directory is configured and the host
    /// migrates at all: `KALEIDOSCOPE_MIGRATE=false` leaves the schema alone) and, if any was
    /// applied, re-reads the catalogue at once, so a plugin's commands on a new table pass as
    /// soon as the table exists. A failing migration is reported; the host goes on serving.
    pub async fn apply_operator_migrations(&self) {
        let Some(dir) = self
            .config
            .migrations_dir
            .as_ref()
            .filter(|_| self.config.migrate)
        else {
            return;
        };
        match crate::persist::operator_migrations::apply(&self.pool, dir).await {
            Ok(applied) => {
                self.note_latent(Latent::Migration, None);
                if !applied.is_empty()
                    && let Err(error) = self.reload_catalog().await
                {
                    tracing::warn!("cannot re-read the schema: {}", crate::text::causes(&error));
                }
            }
            Err(error) => self.note_latent(
                Latent::Migration,
                Some(format!(
                    "{} (the next start would stop on it; this host goes on serving)",
                    crate::text::causes(&error)
                )),
            ),
        }
    }

    /// Whether the catalogue the host checks commands against has `table` (for tools and tests
    /// that must know a new table has reached the host, not only the database).
    pub fn knows_table(&self, table: &str) -> bool {
        self.catalog().table(table).is_some()
    }

    /// The live catalogue that commands are checked against.
    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Re-reads the catalogue unless that happened recently; returns whether it did.
    pub(crate) async fn refresh_catalog(&self) -> Result<bool> {
        let stale = match self.catalog.read() {
            Ok(guard) => guard.1.elapsed() >= CATALOG_REFRESH_INTERVAL,
            Err(_) => true,
        };
        if !stale {
            return Ok(false);
        }
        self.reload_catalog().await?;
        Ok(true)
    }

    /// Re-reads the catalogue now (after the schema changed under the host's own hands).
    pub(crate) async fn reload_catalog(&self) -> Result<()> {
        let fresh = Arc::new(Catalog::load(&self.pool).await?);
        match self.catalog.write() {
            Ok(mut guard) => *guard = (fresh, Instant::now()),
            Err(poisoned) => *poisoned.into_inner() = (fresh, Instant::now()),
        }
        Ok(())
    }
}
