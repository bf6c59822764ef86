//! Configuration: defaults, then an optional TOML file, then environment variables (environment
//! wins), then command-line flags.
//!
//! Every setting is declared once in [`SETTINGS`], default included; the TOML keys, the
//! environment variables, the `--help` text, the README's configuration reference and the values
//! used when nothing is set all follow from that table, so they cannot drift apart. (Two defaults
//! are computed: the consumer name and the plugin deadline.) Unknown TOML keys, unknown
//! `KALEIDOSCOPE_*` variables and invalid values are errors that name the key or variable they
//! came from.

mod policy;
mod settings;
mod sources;

use crate::plugin::{PluginRuntime, SandboxLimits};
use anyhow::{Context, Result};
pub use policy::{HOST_TABLES, PluginPolicy};
pub use settings::{
    Key, MAX_BATCH_SIZE, MAX_IN_FLIGHT, MAX_PLUGIN_MEMORY_MIB, SETTINGS, SETTINGS_POINTER, Setting,
    env_help,
};
use sources::{Origin, RawSettings, parse_toml};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shipped plugins' grants and limits (`config/default-plugins.toml`).
const DEFAULT_PLUGINS: &str = include_str!("../../../config/default-plugins.toml");

/// The session limits of the host's PostgreSQL connections, so that no lock wait, runaway
/// statement, forgotten transaction or vanished peer can hold a batch (or another host's batch)
/// without limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatabaseTimeouts {
    /// `statement_timeout`.
    pub statement: Duration,
    /// `lock_timeout`.
    pub lock: Duration,
    /// `idle_in_transaction_session_timeout`.
    pub idle_in_transaction: Duration,
    /// `tcp_keepalives_idle` (probes then go out every 10 s, 3 at most).
    pub keepalive_idle: Duration,
}

impl Default for DatabaseTimeouts {
    fn default() -> Self {
        DatabaseTimeouts {
            statement: Duration::from_secs(30),
            lock: Duration::from_secs(10),
            idle_in_transaction: Duration::from_secs(60),
            keepalive_idle: Duration::from_secs(30),
        }
    }
}

impl DatabaseTimeouts {
    /// How long a batch's database work may go without an answer (see [`crate::persist::answers`]) before the
    /// host assumes the connection is lost: well past the point where the server would have
    /// cancelled any one statement.
    pub fn response_deadline(&self) -> Duration {
        self.statement * 4 + self.lock
    }
}

/// The resolved configuration of one host process.
#[derive(Clone, Debug)]
pub struct Config {
    pub redis_url: String,
    /// Seed nodes (`host:port`) of the Redis Cluster to run against; empty for one server.
    pub redis_cluster_nodes: Vec<String>,
    pub database_url: String,
    pub retry_attempts: u32,
    pub timeout_seconds: u64,
    pub processing_enabled: bool,
    pub plugins_dir: PathBuf,
    pub consumer_group: String,
    pub consumer_name: String,
    pub reclaim_idle: Duration,
    pub dlq_stream: String,
    pub batch_size: usize,
    pub max_batch_size: usize,
    /// The most field bytes one read of a backlog asks for (see `consumer::ReadSize`).
    pub max_batch_bytes: usize,
    pub max_in_flight: usize,
    pub poll_timeout: Duration,
    pub stream_prefix: String,
    pub plugin_timeout: Duration,
    pub plugin_memory_bytes: usize,
    pub migrate: bool,
    pub watch_plugins: bool,
    pub shutdown_timeout: Duration,
    /// How long start-up keeps trying PostgreSQL and Redis.
    pub wait_for_deps: Duration,
    pub consumer_expiry: Duration,
    pub ledger_retention: Duration,
    /// Session timeouts and keepalive of every PostgreSQL connection the host opens.
    pub database_timeouts: DatabaseTimeouts,
    pub critical_streams: Vec<String>,
    pub http_addr: Option<String>,
    /// The operator's migrations (see [`crate::persist::operator_migrations`]).
    pub migrations_dir: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// Grants and limits per plugin name; a plugin without an entry may write nothing. (A running
    /// host re-reads the grants from [`Config::file`] when it changes: see
    /// [`crate::state::HostState::policy`].)
    pub plugins: BTreeMap<String, PluginPolicy>,
    /// The configuration file the settings were read from, if any.
    pub file: Option<PathBuf>,
    /// The command-line overrides the settings were resolved with, so a running host can resolve
    /// its file again exactly as its next start would (see
    /// [`crate::state::HostState::reload_policies`]).
    pub flags: BTreeMap<Key, String>,
}

impl Config {
    /// The Redis key of a logical stream name (applies [`Config::stream_prefix`]).
    pub fn stream_key(&self, stream: &str) -> String {
        format!("{}{}", self.stream_prefix, stream)
    }

    /// The Redis key holding this deployment's ledger identity (under the stream prefix, so each
    /// prefix and each Redis database is a deployment of its own).
    pub fn source_identity_key(&self) -> String {
        self.stream_key("kaleidoscope:ledger-source")
    }

    /// The Redis key of the dead-letter stream.
    pub fn dlq_key(&self) -> String {
        self.stream_key(&self.dlq_stream)
    }

    /// The grants and limits of the plugin called `name` (empty grants if it has none).
    pub fn policy(&self, name: &str) -> PluginPolicy {
        self.plugins.get(name).cloned().unwrap_or_default()
    }

    /// The sandbox limits of the plugin called `name`: its `[plugins.<name>]` overrides, else the
    /// defaults.
    pub fn sandbox_limits(&self, name: &str) -> SandboxLimits {
        self.limits_under(&self.policy(name))
    }

    /// The limits `policy` (a plugin's `[plugins.<name>]` section as in force now) gives, else
    /// the defaults: one source for a plugin's limits, at start and on every reload.
    pub fn limits_under(&self, policy: &PluginPolicy) -> SandboxLimits {
        SandboxLimits {
            call_timeout: policy.timeout.unwrap_or(self.plugin_timeout),
            memory_bytes: policy.memory_bytes.unwrap_or(self.plugin_memory_bytes),
        }
    }

    /// A plugin runtime for this configuration: its default limits, memory slots large enough
    /// for every plugin's own cap, and compiled components cached in `cache_dir` when given.
    pub fn plugin_runtime(&self, cache_dir: Option<&Path>) -> Result<PluginRuntime> {
        let defaults = SandboxLimits {
            call_timeout: self.plugin_timeout,
            memory_bytes: self.plugin_memory_bytes,
        };
        let largest = self
            .plugins
            .values()
            .filter_map(|p| p.memory_bytes)
            .max()
            .unwrap_or(0);
        PluginRuntime::new(defaults, largest, cache_dir)
    }

    /// Resolves the configuration from a file, an environment and flag overrides (keyed by TOML
    /// key), passed in so tests need not mutate the process environment.
    pub fn from_sources(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: &BTreeMap<Key, String>,
    ) -> Result<Config> {
        let mut raw = RawSettings::default();
        policy::read_plugins_table(
            &mut raw.plugins,
            &DEFAULT_PLUGINS
                .parse()
                .context("config/default-plugins.toml is not valid TOML")?,
            Path::new("config/default-plugins.toml"),
        )?;
        if let Some(path) = file {
            raw.read_file(path)?;
        }
        raw.read_env(env)?;
        for (key, value) in flags {
            raw.set(*key, value.clone(), Origin::Flag(*key));
        }
        let mut config = raw.resolve()?;
        config.file = file.map(Path::to_path_buf);
        config.flags = flags.clone();
        Ok(config)
    }

    /// Every setting as resolved from `file`, `env` and `flags`, with where its value came from
    /// (`kaleidoscope config check`). Fails, naming the setting, exactly where the host would.
    /// Passwords are masked.
    pub fn resolved_settings(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: &BTreeMap<Key, String>,
    ) -> Result<Vec<ResolvedSetting>> {
        // The same sources, the same checks: what resolves here is what the host runs with.
        Config::from_sources(file, env, flags)?;
        let mut raw = RawSettings::default();
        if let Some(path) = file {
            raw.read_file(path)?;
        }
        raw.read_env(env)?;
        for (key, value) in flags {
            raw.set(*key, value.clone(), Origin::Flag(*key));
        }
        Ok(SETTINGS
            .iter()
            .map(|setting| {
                let (value, origin) = raw.value(setting.id).unwrap_or_default();
                let value = match setting.id {
                    Key::RedisPassword if !value.is_empty() => "***".to_string(),
                    Key::RedisUrl | Key::DatabaseUrl => crate::text::redact(&value),
                    Key::PluginsDir | Key::CacheDir | Key::MigrationsDir if !value.is_empty() => {
                        raw.path(setting.id)
                            .map(|path| path.display().to_string())
                            .unwrap_or(value)
                    }
                    _ => value,
                };
                ResolvedSetting {
                    key: setting.key,
                    env: setting.env,
                    value,
                    origin,
                }
            })
            .collect())
    }

    /// The names of the `[plugins.<name>]` sections of `file` (not the shipped defaults).
    pub fn plugin_section_names(file: &Path) -> Result<BTreeSet<String>> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let table = parse_toml(&text, file)?;
        Ok(table
            .get("plugins")
            .and_then(toml::Value::as_table)
            .map(|plugins| plugins.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// The plugin grants and limits as `file` says now: the shipped defaults, then its
    /// `[plugins.<name>]` sections. How a running host picks up a grant without a restart.
    pub fn read_policies(file: &Path) -> Result<BTreeMap<String, PluginPolicy>> {
        let mut policies = BTreeMap::new();
        policy::read_plugins_table(
            &mut policies,
            &DEFAULT_PLUGINS
                .parse()
                .context("config/default-plugins.toml is not valid TOML")?,
            Path::new("config/default-plugins.toml"),
        )?;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read configuration file {}", file.display()))?;
        let table = parse_toml(&text, file)?;
        policy::read_plugins_table(&mut policies, &table, file)?;
        Ok(policies)
    }
}

/// One setting as `kaleidoscope config check` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ResolvedSetting {
    /// The configuration-file key.
    pub key: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// The value in force (passwords masked; empty when unset and without default).
    pub value: String,
    /// Where it came from: a file, a variable, a flag, or the built-in default.
    pub origin: String,
}

/// `host` and `port` of a node written `host:port` (`[v6]:port` for an IPv6 address).
pub fn split_cluster_node(node: &str) -> Result<(&str, u16)> {
    let (host, port) = node.rsplit_once(':').ok_or_else(|| {
        anyhow::anyhow!(
            "invalid Redis Cluster node {node:?}: expected host:port, e.g. 10.0.0.5:6379"
        )
    })?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| anyhow::anyhow!("invalid port in Redis Cluster node {node:?}"))?;
    if host.is_empty() {
        anyhow::bail!("invalid Redis Cluster node {node:?}: no host");
    }
    Ok((host, port))
}

/// Refuses a cluster configuration that cannot work, naming the setting: a cluster has only
/// database 0.
pub fn check_cluster_url(url: &str) -> Result<()> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .with_context(|| format!("invalid Redis URL {}", crate::text::redact(url)))?;
    if info.redis_settings().db() != 0 {
        anyhow::bail!(
            "`redis_url` {} selects database {}, but a Redis Cluster has only database 0 (remove the `/{}` or `redis_cluster_nodes`)",
            crate::text::redact(url),
            info.redis_settings().db(),
            info.redis_settings().db()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Config> {
        Config::from_sources(None, &env(pairs), &BTreeMap::new())
    }

    #[test]
    fn every_key_names_its_own_row_of_the_table() {
        for setting in SETTINGS {
            assert_eq!(setting.id.setting().key, setting.key);
            assert_eq!(Key::from_name(setting.key), Some(setting.id));
        }
        assert_eq!(Key::from_name("batch_sise"), None);
    }

    #[test]
    fn every_default_is_declared_once_and_valid() {
        // Only these two are computed; every other default is a value in SETTINGS, and an empty
        // configuration resolves to exactly those values.
        let computed: Vec<&str> = SETTINGS
            .iter()
            .filter(|s| settings::declared_default(s.id).is_none())
            .map(|s| s.key)
            .collect();
        assert_eq!(computed, ["consumer_name", "plugin_timeout_ms"]);
        let config = load(&[]).unwrap();
        assert_eq!(config.plugin_timeout, Duration::from_secs(30));
        assert_eq!(config.consumer_group, "backend-group");
        assert_eq!(config.max_batch_size, 1000);
        assert_eq!(config.ledger_retention, Duration::from_millis(86_400_000));
        assert_eq!(
            config.critical_streams,
            ["post-image-processing", "profile-picture-processing"]
        );
        assert_eq!(config.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(config.database_timeouts, DatabaseTimeouts::default());
        assert_eq!(config.http_addr.as_deref(), Some("127.0.0.1:9464"));
    }

    #[test]
    fn seed_defaults() {
        let config = load(&[]).unwrap();
        assert_eq!(config.batch_size, 10);
        assert_eq!(config.poll_timeout, Duration::from_millis(1000));
        assert_eq!(config.consumer_group, "backend-group");
        assert_eq!(config.retry_attempts, 3);
        assert_eq!(config.reclaim_idle, Duration::from_secs(60));
        assert_eq!(config.plugin_timeout, Duration::from_secs(30));
        assert_eq!(config.dlq_stream, "ml-results-dlq");
        assert_eq!(config.redis_url, "redis://127.0.0.1:6379");
    }

    #[test]
    fn seed_redis_variables_build_the_url() {
        let config = load(&[
            ("REDIS_HOST", "cache"),
            ("REDIS_PORT", "6380"),
            ("REDIS_PASSWORD", "p@ss"),
        ])
        .unwrap();
        assert_eq!(config.redis_url, "redis://:p%40ss@cache:6380");
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let error = load(&[("KALEIDOSCOPE_BATCH_SIZE", "ten")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("KALEIDOSCOPE_BATCH_SIZE") && error.contains("ten"),
            "{error}"
        );
        let error = load(&[("ML_RETRY_ATTEMPTS", "0")]).unwrap_err().to_string();
        assert!(error.contains("ML_RETRY_ATTEMPTS"), "{error}");
    }

    #[test]
    fn unknown_variables_and_keys_are_errors() {
        let error = load(&[("KALEIDOSCOPE_BACTH_SIZE", "5")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("KALEIDOSCOPE_BACTH_SIZE"), "{error}");

        let dir = std::env::temp_dir().join(format!("kaleidoscope-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "batch_size = 5\npoll_timeout = 3\n").unwrap();
        let error = Config::from_sources(Some(&file), &env(&[]), &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("poll_timeout") && error.contains("bad.toml"),
            "{error}"
        );
    }

    #[test]
    fn shipped_plugins_have_default_grants_that_a_file_can_extend() {
        let config = load(&[]).unwrap();
        assert!(
            config
                .policy("insights")
                .tables
                .contains("media_ai_insights")
        );
        assert!(config.policy("unknown-plugin").tables.is_empty());

        let dir =
            std::env::temp_dir().join(format!("kaleidoscope-config-grants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("grants.toml");
        std::fs::write(&file, "[plugins.insights]\ntimeout_ms = 250\n[plugins.mine]\ntables = [\"t\"]\nemit = [\"s\"]\n").unwrap();
        let config = Config::from_sources(Some(&file), &env(&[]), &BTreeMap::new()).unwrap();
        let insights = config.policy("insights");
        assert!(
            insights.tables.contains("media_ai_insights"),
            "a partial section keeps the shipped grants"
        );
        assert_eq!(insights.timeout, Some(Duration::from_millis(250)));
        assert_eq!(config.policy("mine").emit.iter().collect::<Vec<_>>(), ["s"]);

        std::fs::write(&file, "[plugins.mine]\ntables = [\"outbox\"]\n").unwrap();
        let error = Config::from_sources(Some(&file), &env(&[]), &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("plugins.mine.tables") && error.contains("outbox"),
            "{error}"
        );
        std::fs::write(&file, "[plugins.mine]\ntabels = [\"t\"]\n").unwrap();
        let error = Config::from_sources(Some(&file), &env(&[]), &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("plugins.mine.tabels"), "{error}");
    }

    #[test]
    fn environment_wins_over_file() {
        let dir =
            std::env::temp_dir().join(format!("kaleidoscope-config-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ok.toml");
        std::fs::write(&file, "batch_size = 5\nconsumer_group = \"from-file\"\n").unwrap();
        let config = Config::from_sources(
            Some(&file),
            &env(&[("KALEIDOSCOPE_BATCH_SIZE", "7")]),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(config.batch_size, 7);
        assert_eq!(config.consumer_group, "from-file");
    }

    #[test]
    fn flags_win_over_environment_which_wins_over_file_which_wins_over_defaults() {
        let dir =
            std::env::temp_dir().join(format!("kaleidoscope-config-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("all.toml");
        std::fs::write(
            &file,
            "consumer_name = \"file\"\nplugins_dir = \"file-dir\"\nbatch_size = 5\n",
        )
        .unwrap();
        let environment = env(&[
            ("KALEIDOSCOPE_CONSUMER_NAME", "env"),
            ("KALEIDOSCOPE_PLUGINS_DIR", "env-dir"),
        ]);
        let flags = BTreeMap::from([(Key::ConsumerName, "flag".to_string())]);
        let config = Config::from_sources(Some(&file), &environment, &flags).unwrap();
        assert_eq!(config.consumer_name, "flag");
        assert_eq!(
            config.plugins_dir,
            std::env::current_dir().unwrap().join("env-dir")
        );
        assert_eq!(config.batch_size, 5);
        assert_eq!(
            config.consumer_group,
            settings::declared_default(Key::ConsumerGroup).unwrap()
        );
        // A bad flag value is named as a flag.
        let flags = BTreeMap::from([(Key::Migrate, "perhaps".to_string())]);
        let error = Config::from_sources(None, &env(&[]), &flags)
            .unwrap_err()
            .to_string();
        assert!(error.contains("--migrate"), "{error}");
    }

    #[test]
    fn relative_directories_resolve_against_the_file_that_names_them() {
        let dir =
            std::env::temp_dir().join(format!("kaleidoscope-config-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("host.toml");
        std::fs::write(
            &file,
            "plugins_dir = \"plugins\"\nmigrations_dir = \"sql\"\ncache_dir = \"/var/cache/k\"\n",
        )
        .unwrap();
        let config = Config::from_sources(Some(&file), &env(&[]), &BTreeMap::new()).unwrap();
        // From the file's directory, not the working directory; absolute paths stay as given.
        assert_eq!(config.plugins_dir, dir.join("plugins"));
        assert_eq!(config.migrations_dir, Some(dir.join("sql")));
        assert_eq!(config.cache_dir, PathBuf::from("/var/cache/k"));
        // A variable's relative path is the working directory's, as on any command line.
        let environment = env(&[("KALEIDOSCOPE_PLUGINS_DIR", "here")]);
        let config = Config::from_sources(Some(&file), &environment, &BTreeMap::new()).unwrap();
        assert_eq!(
            config.plugins_dir,
            std::env::current_dir().unwrap().join("here")
        );
        // The defaults are absolute too (`status` shows them to people on other machines).
        let config = Config::from_sources(None, &env(&[]), &BTreeMap::new()).unwrap();
        assert!(config.plugins_dir.is_absolute() && config.plugins_dir.ends_with("target/plugins"));
        // From a checkout's `target/<profile>/` beside the plugins; elsewhere (this test
        // binary lives in `target/debug/deps/`, like an installed one) in the user's cache.
        assert!(config.cache_dir.is_absolute() && config.cache_dir.ends_with("plugin-cache"));
    }
}
