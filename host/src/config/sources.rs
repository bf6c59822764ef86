//! Where settings come from and how their text becomes a [`Config`]: defaults, then the file, then
//! the environment, then flags, each value remembered with its origin so an error can name it.

use super::policy::{self, PluginPolicy};
use super::settings::{
    IGNORED_ENV, Key, MAX_BATCH_SIZE, MAX_IN_FLIGHT, MAX_PLUGIN_MEMORY_MIB, SETTINGS,
    declared_default,
};
use super::{Config, DatabaseTimeouts};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parses a configuration file. A syntax error names the file, line and column and what is
/// wrong, but never quotes the line: it may be the one holding a password.
pub(super) fn parse_toml(text: &str, file: &Path) -> Result<toml::Table> {
    text.parse::<toml::Table>().map_err(|error| {
        let at = error.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
            format!(" at line {line}, column {column}")
        });
        anyhow::anyhow!(
            "configuration file {} is not valid TOML{at}: {}",
            file.display(),
            error.message().trim()
        )
    })
}

/// Where a raw value came from, so an error can name it.
#[derive(Clone, Debug)]
pub(super) enum Origin {
    File(PathBuf),
    Env(&'static str),
    Flag(Key),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Env(var) => write!(f, "from environment variable {var}"),
            Origin::Flag(key) => write!(f, "from flag --{}", key.name().replace('_', "-")),
        }
    }
}

/// Settings as text, by key, each with where it came from; then resolved into a [`Config`].
#[derive(Default)]
pub(super) struct RawSettings {
    values: BTreeMap<Key, (String, Origin)>,
    pub(super) plugins: BTreeMap<String, PluginPolicy>,
}

impl RawSettings {
    pub(super) fn set(&mut self, key: Key, value: String, origin: Origin) {
        self.values.insert(key, (value, origin));
    }

    pub(super) fn read_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        let table = parse_toml(&text, path)?;
        policy::read_plugins_table(&mut self.plugins, &table, path)?;
        for (key, value) in table {
            if key == "plugins" {
                continue;
            }
            let setting = Key::from_name(&key).with_context(|| {
                format!(
                    "unknown key `{key}` in {} (known keys: {})",
                    path.display(),
                    SETTINGS
                        .iter()
                        .map(|s| s.key)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!(
                    "key `{key}` in {}: expected a string, number or boolean, got {}",
                    path.display(),
                    other.type_str()
                ),
            };
            self.set(setting, text, Origin::File(path.to_path_buf()));
        }
        Ok(())
    }

    pub(super) fn read_env(&mut self, env: &BTreeMap<String, String>) -> Result<()> {
        for (name, value) in env {
            match SETTINGS.iter().find(|s| s.env == name) {
                Some(setting) => self.set(setting.id, value.clone(), Origin::Env(setting.env)),
                None if name.starts_with("KALEIDOSCOPE_")
                    && !IGNORED_ENV.contains(&name.as_str()) =>
                {
                    bail!(
                        "unknown environment variable {name} (known: {})",
                        SETTINGS
                            .iter()
                            .map(|s| s.env)
                            .filter(|e| e.starts_with("KALEIDOSCOPE_"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
                None => {}
            }
        }
        Ok(())
    }

    fn get(&self, key: Key) -> Option<&(String, Origin)> {
        self.values.get(&key)
    }

    /// The value of `key` and where it came from: as set, else its default as declared in
    /// [`SETTINGS`]. `None` only for a setting whose default is computed.
    pub(super) fn value(&self, key: Key) -> Option<(String, String)> {
        match self.get(key) {
            Some((value, origin)) => Some((value.clone(), origin.to_string())),
            None => declared_default(key)
                .map(|default| (default.to_string(), "(the built-in default)".to_string())),
        }
    }

    fn string(&self, key: Key) -> String {
        self.value(key).map(|(v, _)| v).unwrap_or_default()
    }

    fn parse<T: std::str::FromStr>(&self, key: Key, expected: &str) -> Result<T> {
        let name = key.name();
        let Some((value, origin)) = self.value(key) else {
            bail!("`{name}` has no value and no default");
        };
        value.trim().parse().map_err(|_| {
            anyhow::anyhow!("invalid value {value:?} for `{name}` {origin}: expected {expected}")
        })
    }

    fn positive<T>(&self, key: Key) -> Result<T>
    where
        T: std::str::FromStr + PartialOrd + From<u8>,
    {
        let name = key.name();
        let value: T = self.parse(key, "a positive integer")?;
        if value < T::from(1) {
            let (text, origin) = self.value(key).unwrap_or_default();
            bail!("invalid value {text:?} for `{name}` {origin}: expected a positive integer");
        }
        Ok(value)
    }

    /// A positive integer no larger than `max`: settings that size queues, semaphores and
    /// buffers, where an absurd value would not fail here but panic or exhaust memory later.
    fn positive_at_most(&self, key: Key, max: usize, why: &str) -> Result<usize> {
        let name = key.name();
        let value: usize = self.positive(key)?;
        if value > max {
            let (text, origin) = self.value(key).unwrap_or_default();
            bail!("invalid value {text:?} for `{name}` {origin}: at most {max} ({why})");
        }
        Ok(value)
    }

    fn boolean(&self, key: Key) -> Result<bool> {
        let name = key.name();
        let (value, origin) = self.value(key).unwrap_or_default();
        match value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => bail!("invalid value {value:?} for `{name}` {origin}: expected true or false"),
        }
    }

    fn non_empty(&self, key: Key) -> Result<String> {
        let name = key.name();
        let (value, origin) = self.value(key).unwrap_or_default();
        let value = value.trim().to_string();
        if value.is_empty() {
            bail!("invalid value \"\" for `{name}` {origin}: must not be empty");
        }
        Ok(value)
    }

    /// A directory setting as an absolute path: relative to the configuration file's directory
    /// when the file gave it (so a file means the same wherever the host is started), to the
    /// working directory when a variable or flag did, and for the built-in defaults to
    /// [`default_base`].
    pub(super) fn path(&self, key: Key) -> Result<PathBuf> {
        let value = PathBuf::from(self.non_empty(key)?);
        let base = match self.get(key) {
            Some((_, Origin::File(file))) => file.parent().map(Path::to_path_buf),
            Some(_) => None,
            None => default_base(),
        };
        // An installed binary's compiled cache goes to the user's cache directory, not into
        // whatever directory a tool (`plugin check`, `deploy`) happens to run in.
        if key == Key::CacheDir
            && self.get(key).is_none()
            && base.is_none()
            && let Some(cache) = user_cache_dir()
        {
            return Ok(cache.join("kaleidoscope/plugin-cache"));
        }
        let joined = match base {
            Some(base) if value.is_relative() => base.join(value),
            _ => value,
        };
        // Absolute, so `status` and the heartbeat show a path that means something elsewhere.
        Ok(std::path::absolute(&joined).unwrap_or(joined))
    }

    /// The Redis URL: `REDIS_URL` from the environment, else the seed's host/port/password
    /// variables, else the file's URL, else the file's parts, else the default.
    fn redis_url(&self) -> Result<String> {
        let from_env = |key: Key| {
            matches!(
                self.get(key),
                Some((_, Origin::Env(_)) | (_, Origin::Flag(_)))
            )
        };
        let parts_from_env = [Key::RedisHost, Key::RedisPort, Key::RedisPassword]
            .iter()
            .any(|k| from_env(*k));
        let url_given = self.get(Key::RedisUrl).is_some();
        if url_given && (from_env(Key::RedisUrl) || !parts_from_env) {
            let url = self.string(Key::RedisUrl);
            redis::parse_redis_url(&url).with_context(|| {
                let origin = self
                    .get(Key::RedisUrl)
                    .map(|(_, o)| o.to_string())
                    .unwrap_or_default();
                format!(
                    "invalid value {:?} for `redis_url` {origin}: not a redis:// URL",
                    crate::text::redact(&url)
                )
            })?;
            return Ok(url);
        }
        let host = self.non_empty(Key::RedisHost)?;
        let port: u16 = self.parse(Key::RedisPort, "a port number (1-65535)")?;
        let password = self.string(Key::RedisPassword);
        Ok(if password.is_empty() {
            format!("redis://{host}:{port}")
        } else {
            format!("redis://:{}@{host}:{port}", percent_encode(&password))
        })
    }

    /// The seed nodes of a Redis Cluster (none: one Redis server), each checked, with the URL
    /// every node is reached with (credentials, database 0).
    fn redis_cluster_nodes(&self) -> Result<Vec<String>> {
        let nodes: Vec<String> = self
            .string(Key::RedisClusterNodes)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if !nodes.is_empty() {
            let origin = self
                .get(Key::RedisClusterNodes)
                .map(|(_, o)| o.to_string())
                .unwrap_or_default();
            super::check_cluster_url(&self.redis_url()?)?;
            for node in &nodes {
                super::split_cluster_node(node)
                    .with_context(|| format!("invalid value for `redis_cluster_nodes` {origin}"))?;
            }
        }
        Ok(nodes)
    }

    /// The configuration these settings give, each checked as it is read (an error names the
    /// setting and where its value came from). Long on purpose: one line per field of
    /// [`Config`], in the order of its declaration, so a setting cannot be forgotten unseen.
    pub(super) fn resolve(&self) -> Result<Config> {
        let timeout_seconds: u64 = self.positive(Key::TimeoutSeconds)?;
        let plugin_timeout_ms: u64 = match self.get(Key::PluginTimeoutMs) {
            Some(_) => self.positive(Key::PluginTimeoutMs)?,
            None => timeout_seconds * 1000,
        };
        let plugin_memory_mib: usize = self.positive(Key::PluginMemoryMib)?;
        if plugin_memory_mib > MAX_PLUGIN_MEMORY_MIB {
            let (text, origin) = self.value(Key::PluginMemoryMib).unwrap_or_default();
            bail!(
                "invalid value {text:?} for `plugin_memory_mib` {origin}: at most {MAX_PLUGIN_MEMORY_MIB} (a 32-bit WebAssembly memory cannot grow past 4 GiB)"
            );
        }
        Ok(Config {
            redis_url: self.redis_url()?,
            redis_cluster_nodes: self.redis_cluster_nodes()?,
            database_url: self.non_empty(Key::DatabaseUrl)?,
            retry_attempts: self.positive(Key::RetryAttempts)?,
            timeout_seconds,
            processing_enabled: self.boolean(Key::ProcessingEnabled)?,
            plugins_dir: self.path(Key::PluginsDir)?,
            consumer_group: self.non_empty(Key::ConsumerGroup)?,
            consumer_name: match self.get(Key::ConsumerName) {
                Some(_) => self.non_empty(Key::ConsumerName)?,
                None => default_consumer_name(),
            },
            reclaim_idle: Duration::from_millis(self.positive(Key::ReclaimIdleMs)?),
            dlq_stream: self.non_empty(Key::DlqStream)?,
            batch_size: self.positive_at_most(
                Key::BatchSize,
                MAX_BATCH_SIZE,
                "one batch is one transaction held in memory",
            )?,
            max_batch_size: self.positive_at_most(
                Key::MaxBatchSize,
                MAX_BATCH_SIZE,
                "one batch is one transaction held in memory",
            )?,
            max_batch_bytes: self.positive(Key::MaxBatchBytes)?,
            max_in_flight: self.positive_at_most(
                Key::MaxInFlight,
                MAX_IN_FLIGHT,
                "each batch in flight holds its entries and their commands in memory",
            )?,
            poll_timeout: Duration::from_millis(self.positive(Key::PollTimeoutMs)?),
            stream_prefix: self.string(Key::StreamPrefix),
            plugin_timeout: Duration::from_millis(plugin_timeout_ms),
            plugin_memory_bytes: plugin_memory_mib
                .checked_mul(1 << 20)
                .context("`plugin_memory_mib` is too large")?,
            migrate: self.boolean(Key::Migrate)?,
            watch_plugins: self.boolean(Key::WatchPlugins)?,
            shutdown_timeout: Duration::from_millis(self.positive(Key::ShutdownTimeoutMs)?),
            wait_for_deps: Duration::from_millis(
                self.parse(Key::WaitForDepsMs, "a number of milliseconds")?,
            ),
            http_addr: Some(self.string(Key::HttpAddr).trim().to_string())
                .filter(|a| !a.is_empty()),
            migrations_dir: match self.string(Key::MigrationsDir).trim() {
                "" => None,
                _ => Some(self.path(Key::MigrationsDir)?),
            },
            critical_streams: self
                .string(Key::CriticalStreams)
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            consumer_expiry: Duration::from_millis(self.positive(Key::ConsumerExpiryMs)?),
            ledger_retention: Duration::from_millis(self.positive(Key::LedgerRetentionMs)?),
            database_timeouts: DatabaseTimeouts {
                statement: Duration::from_millis(self.positive(Key::PgStatementTimeoutMs)?),
                lock: Duration::from_millis(self.positive(Key::PgLockTimeoutMs)?),
                idle_in_transaction: Duration::from_millis(
                    self.positive(Key::PgIdleInTransactionTimeoutMs)?,
                ),
                keepalive_idle: Duration::from_millis(self.positive(Key::PgKeepaliveIdleMs)?),
            },
            cache_dir: self.path(Key::CacheDir)?,
            plugins: self.plugins.clone(),
            file: None,
            flags: BTreeMap::new(),
        })
    }
}

/// Where the built-in relative defaults (`target/plugins`, `target/plugin-cache`) resolve: the
/// checkout the binary was built in, when it runs from there (`<checkout>/target/release/`),
/// so `kaleidoscope run` finds what `./scripts/build-plugins` built from any working directory;
/// else (an installed binary) the working directory.
fn default_base() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let target = exe.parent()?.parent()?;
    if target.file_name()? == "target" {
        target.parent().map(Path::to_path_buf)
    } else {
        None
    }
}

/// The user's cache directory (`$XDG_CACHE_HOME`, else `~/.cache`), if there is one.
fn user_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
}

/// The host name: stable across restarts of one instance, distinct between machines.
fn default_consumer_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "kaleidoscope".to_string())
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
