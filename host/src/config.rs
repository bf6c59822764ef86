//! Configuration: defaults, then an optional TOML file, then environment variables (environment
//! wins), then command-line flags.
//!
//! Every setting is declared once in [`SETTINGS`], default included; the TOML keys, the
//! environment variables, the `--help` text, the README's configuration reference and the values
//! used when nothing is set all follow from that table, so they cannot drift apart. (Two defaults
//! are computed: the consumer name and the plugin deadline.) Unknown TOML keys, unknown
//! `KALEIDOSCOPE_*` variables and invalid values are errors that name the key or variable they
//! came from.

use crate::plugin::policy;
pub use crate::plugin::policy::PluginPolicy;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configurable setting: its TOML key, its environment variable and what it means.
pub struct Setting {
    /// Key in the TOML file.
    pub key: &'static str,
    /// Environment variable (the seed's names where the seed has one).
    pub env: &'static str,
    /// Default, as shown to users.
    pub default: &'static str,
    /// One line for `--help` and the README.
    pub help: &'static str,
}

/// Every setting the host reads. The order is the order of the documentation.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "redis_url",
        env: "REDIS_URL",
        default: "redis://127.0.0.1:6379",
        help: "Redis connection URL; a database index (`/3`) selects that database. Overrides redis_host/redis_port/redis_password.",
    },
    Setting {
        key: "redis_host",
        env: "REDIS_HOST",
        default: "127.0.0.1",
        help: "Redis host, used when no URL is given (seed variable).",
    },
    Setting {
        key: "redis_port",
        env: "REDIS_PORT",
        default: "6379",
        help: "Redis port, used when no URL is given (seed variable).",
    },
    Setting {
        key: "redis_password",
        env: "REDIS_PASSWORD",
        default: "",
        help: "Redis password, used when no URL is given (seed variable).",
    },
    Setting {
        key: "database_url",
        env: "DATABASE_URL",
        default: "postgres://postgres@127.0.0.1:5432/kaleidoscope",
        help: "PostgreSQL connection URL. The database is created if it does not exist.",
    },
    Setting {
        key: "retry_attempts",
        env: "ML_RETRY_ATTEMPTS",
        default: "3",
        help: "Deliveries of an entry before it is dead-lettered as retries-exhausted (seed variable).",
    },
    Setting {
        key: "timeout_seconds",
        env: "ML_TIMEOUT_SECONDS",
        default: "30",
        help: "ML timeout in seconds; also the default deadline of one plugin call (seed variable).",
    },
    Setting {
        key: "processing_enabled",
        env: "ML_PROCESSING_ENABLED",
        default: "true",
        help: "Whether requests are published to the ML services (seed variable).",
    },
    Setting {
        key: "plugins_dir",
        env: "KALEIDOSCOPE_PLUGINS_DIR",
        default: "target/plugins",
        help: "Directory of handler plugins (`*.wasm` components).",
    },
    Setting {
        key: "consumer_group",
        env: "KALEIDOSCOPE_CONSUMER_GROUP",
        default: "backend-group",
        help: "Consumer group joined on every inbound stream.",
    },
    Setting {
        key: "consumer_name",
        env: "KALEIDOSCOPE_CONSUMER_NAME",
        default: "<host name>",
        help: "This instance's consumer name; keep it stable across restarts so the instance finds its own pending entries.",
    },
    Setting {
        key: "reclaim_idle_ms",
        env: "KALEIDOSCOPE_RECLAIM_IDLE_MS",
        default: "60000",
        help: "Idle time after which a pending entry (of any consumer) is reclaimed and retried.",
    },
    Setting {
        key: "dlq_stream",
        env: "KALEIDOSCOPE_DLQ_STREAM",
        default: "ml-results-dlq",
        help: "Dead-letter stream.",
    },
    Setting {
        key: "batch_size",
        env: "KALEIDOSCOPE_BATCH_SIZE",
        default: "10",
        help: "Entries asked for by the first XREADGROUP of a stream (seed: batch-size); while reads come back full (a backlog), each read asks for twice as many, up to max_batch_size. At most 10,000.",
    },
    Setting {
        key: "max_batch_size",
        env: "KALEIDOSCOPE_MAX_BATCH_SIZE",
        default: "250",
        help: "The most entries one read (and so one batch transaction) takes when a stream has a backlog. At most 10,000.",
    },
    Setting {
        key: "max_in_flight",
        env: "KALEIDOSCOPE_MAX_IN_FLIGHT",
        default: "2",
        help: "Batches per stream between read and acknowledgement at once: the next batch is read and handled while earlier ones commit. At most 64.",
    },
    Setting {
        key: "poll_timeout_ms",
        env: "KALEIDOSCOPE_POLL_TIMEOUT_MS",
        default: "1000",
        help: "How long one XREADGROUP blocks waiting for entries (seed: poll-timeout).",
    },
    Setting {
        key: "stream_prefix",
        env: "KALEIDOSCOPE_STREAM_PREFIX",
        default: "",
        help: "Prefix added to every Redis stream key the host touches (namespacing; tests use it for isolation).",
    },
    Setting {
        key: "plugin_timeout_ms",
        env: "KALEIDOSCOPE_PLUGIN_TIMEOUT_MS",
        default: "timeout_seconds × 1000",
        help: "Deadline of one handler call; a plugin past it is stopped and the entry fails as `timeout`.",
    },
    Setting {
        key: "plugin_memory_mib",
        env: "KALEIDOSCOPE_PLUGIN_MEMORY_MIB",
        default: "64",
        help: "Linear-memory cap of one handler instance, in MiB.",
    },
    Setting {
        key: "migrate",
        env: "KALEIDOSCOPE_MIGRATE",
        default: "true",
        help: "Whether `run` applies database migrations at start-up.",
    },
    Setting {
        key: "watch_plugins",
        env: "KALEIDOSCOPE_WATCH_PLUGINS",
        default: "true",
        help: "Whether `run` watches the plugins directory and swaps changed plugins in without a restart.",
    },
    Setting {
        key: "http_addr",
        env: "KALEIDOSCOPE_HTTP_ADDR",
        default: "127.0.0.1:9464",
        help: "Address for /metrics, /healthz and /readyz: this machine only by default; 0.0.0.0:9464 for a container or a remote Prometheus; empty for no HTTP endpoint. Bound before anything else, so a busy port fails at once.",
    },
    Setting {
        key: "critical_streams",
        env: "KALEIDOSCOPE_CRITICAL_STREAMS",
        default: "post-image-processing,profile-picture-processing",
        help: "Request streams whose publishing failure is an error to the caller (comma-separated); failures on other streams are logged and retried by the request tracker.",
    },
    Setting {
        key: "wait_for_deps_ms",
        env: "KALEIDOSCOPE_WAIT_FOR_DEPS_MS",
        default: "0",
        help: "At start-up, how long to keep trying PostgreSQL and Redis before giving up (0: give up at once). For a container started beside its database; `run --wait-for-deps 60s` sets it.",
    },
    Setting {
        key: "shutdown_timeout_ms",
        env: "KALEIDOSCOPE_SHUTDOWN_TIMEOUT_MS",
        default: "10000",
        help: "On SIGTERM/Ctrl-C, how long batches in flight may take to finish before the host exits anyway (their entries stay pending). A second signal exits at once.",
    },
    Setting {
        key: "consumer_expiry_ms",
        env: "KALEIDOSCOPE_CONSUMER_EXPIRY_MS",
        default: "3600000",
        help: "Consumers of the group idle for longer than this with no pending entries (hosts gone for good) are removed.",
    },
    Setting {
        key: "ledger_retention_ms",
        env: "KALEIDOSCOPE_LEDGER_RETENTION_MS",
        default: "86400000",
        help: "How long the processed-entry ledger remembers a finished entry (it makes redelivery harmless). Older rows are pruned in small chunks, except those of entries still pending in their group.",
    },
    Setting {
        key: "pg_statement_timeout_ms",
        env: "KALEIDOSCOPE_PG_STATEMENT_TIMEOUT_MS",
        default: "30000",
        help: "PostgreSQL `statement_timeout` of the host's connections: a statement running longer is cancelled, and its entries are retried (a bounded number of times) like any other failed statement. The host also gives up on a batch whose database work gets no answer within four times this (a half-open connection) and retries it as an outage.",
    },
    Setting {
        key: "pg_lock_timeout_ms",
        env: "KALEIDOSCOPE_PG_LOCK_TIMEOUT_MS",
        default: "10000",
        help: "PostgreSQL `lock_timeout`: a batch waiting longer for a row or table lock fails that statement, and is retried.",
    },
    Setting {
        key: "pg_idle_in_transaction_timeout_ms",
        env: "KALEIDOSCOPE_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        default: "60000",
        help: "PostgreSQL `idle_in_transaction_session_timeout`: the server ends a session of this host that sits in an open transaction this long (a stuck host never holds locks for good).",
    },
    Setting {
        key: "pg_keepalive_idle_ms",
        env: "KALEIDOSCOPE_PG_KEEPALIVE_IDLE_MS",
        default: "30000",
        help: "TCP keepalive of the host's PostgreSQL sessions (`tcp_keepalives_idle`, then 3 probes 10 s apart): the server notices a host that vanished and releases its locks.",
    },
    Setting {
        key: "migrations_dir",
        env: "KALEIDOSCOPE_MIGRATIONS_DIR",
        default: "",
        help: "Directory of the operator's own SQL migrations (`*.sql`, applied once each in name order, at start-up, by `migrate` and whenever the plugins are reloaded, unless migrations are off): how a plugin gets a new table without a new host build. None when empty.",
    },
    Setting {
        key: "cache_dir",
        env: "KALEIDOSCOPE_CACHE_DIR",
        default: "target/plugin-cache",
        help: "Directory of compiled plugins, keyed by content hash, so restarts and reloads of unchanged files do not recompile. Only the host should write it.",
    },
];

/// The shipped plugins' grants and limits (`config/default-plugins.toml`).
const DEFAULT_PLUGINS: &str = include_str!("../../config/default-plugins.toml");

/// The resolved configuration of one host process.
#[derive(Clone, Debug)]
pub struct Config {
    pub redis_url: String,
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
    pub database_timeouts: crate::persist::Timeouts,
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

    /// Resolves the configuration from a file, an environment and flag overrides (keyed by TOML
    /// key), passed in so tests need not mutate the process environment.
    pub fn from_sources(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: &BTreeMap<&'static str, String>,
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
            raw.set(key, value.clone(), Origin::Flag(key));
        }
        let mut config = raw.resolve()?;
        config.file = file.map(Path::to_path_buf);
        Ok(config)
    }

    /// Every setting as resolved from `file`, `env` and `flags`, with where its value came from
    /// (`kaleidoscope config check`). Fails, naming the setting, exactly where the host would.
    /// Passwords are masked.
    pub fn resolved_settings(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: &BTreeMap<&'static str, String>,
    ) -> Result<Vec<ResolvedSetting>> {
        // The same sources, the same checks: what resolves here is what the host runs with.
        Config::from_sources(file, env, flags)?;
        let mut raw = RawSettings::default();
        if let Some(path) = file {
            raw.read_file(path)?;
        }
        raw.read_env(env)?;
        for (key, value) in flags {
            raw.set(key, value.clone(), Origin::Flag(key));
        }
        Ok(SETTINGS
            .iter()
            .map(|setting| {
                let (value, origin) = raw.value(setting.key).unwrap_or_default();
                let value = match setting.key {
                    "redis_password" if !value.is_empty() => "***".to_string(),
                    "redis_url" | "database_url" => crate::persist::redact(&value),
                    "plugins_dir" | "cache_dir" | "migrations_dir" if !value.is_empty() => raw
                        .path(setting.key)
                        .map(|path| path.display().to_string())
                        .unwrap_or(value),
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

/// Parses a configuration file. A syntax error names the file, line and column and what is
/// wrong, but never quotes the line: it may be the one holding a password.
fn parse_toml(text: &str, file: &Path) -> Result<toml::Table> {
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
enum Origin {
    File(PathBuf),
    Env(&'static str),
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Env(var) => write!(f, "from environment variable {var}"),
            Origin::Flag(key) => write!(f, "from flag --{}", key.replace('_', "-")),
        }
    }
}

#[derive(Default)]
struct RawSettings {
    values: BTreeMap<&'static str, (String, Origin)>,
    plugins: BTreeMap<String, PluginPolicy>,
}

impl RawSettings {
    fn set(&mut self, key: &'static str, value: String, origin: Origin) {
        self.values.insert(key, (value, origin));
    }

    fn read_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        let table = parse_toml(&text, path)?;
        policy::read_plugins_table(&mut self.plugins, &table, path)?;
        for (key, value) in table {
            if key == "plugins" {
                continue;
            }
            let setting = SETTINGS.iter().find(|s| s.key == key).with_context(|| {
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
            self.set(setting.key, text, Origin::File(path.to_path_buf()));
        }
        Ok(())
    }

    fn read_env(&mut self, env: &BTreeMap<String, String>) -> Result<()> {
        for (name, value) in env {
            match SETTINGS.iter().find(|s| s.env == name) {
                Some(setting) => self.set(setting.key, value.clone(), Origin::Env(setting.env)),
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

    fn get(&self, key: &str) -> Option<&(String, Origin)> {
        self.values.get(key)
    }

    /// The value of `key` and where it came from: as set, else its default as declared in
    /// [`SETTINGS`]. `None` only for a setting whose default is computed.
    fn value(&self, key: &str) -> Option<(String, String)> {
        match self.get(key) {
            Some((value, origin)) => Some((value.clone(), origin.to_string())),
            None => declared_default(key)
                .map(|default| (default.to_string(), "(the built-in default)".to_string())),
        }
    }

    fn string(&self, key: &str) -> String {
        self.value(key).map(|(v, _)| v).unwrap_or_default()
    }

    fn parse<T: std::str::FromStr>(&self, key: &str, expected: &str) -> Result<T> {
        let Some((value, origin)) = self.value(key) else {
            bail!("`{key}` has no value and no default");
        };
        value.trim().parse().map_err(|_| {
            anyhow::anyhow!("invalid value {value:?} for `{key}` {origin}: expected {expected}")
        })
    }

    fn positive<T>(&self, key: &str) -> Result<T>
    where
        T: std::str::FromStr + PartialOrd + From<u8>,
    {
        let value: T = self.parse(key, "a positive integer")?;
        if value < T::from(1) {
            let (text, origin) = self.value(key).unwrap_or_default();
            bail!("invalid value {text:?} for `{key}` {origin}: expected a positive integer");
        }
        Ok(value)
    }

    /// A positive integer no larger than `max`: settings that size queues, semaphores and
    /// buffers, where an absurd value would not fail here but panic or exhaust memory later.
    fn positive_at_most(&self, key: &str, max: usize, why: &str) -> Result<usize> {
        let value: usize = self.positive(key)?;
        if value > max {
            let (text, origin) = self.value(key).unwrap_or_default();
            bail!("invalid value {text:?} for `{key}` {origin}: at most {max} ({why})");
        }
        Ok(value)
    }

    fn boolean(&self, key: &str) -> Result<bool> {
        let (value, origin) = self.value(key).unwrap_or_default();
        match value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => bail!("invalid value {value:?} for `{key}` {origin}: expected true or false"),
        }
    }

    fn non_empty(&self, key: &str) -> Result<String> {
        let (value, origin) = self.value(key).unwrap_or_default();
        let value = value.trim().to_string();
        if value.is_empty() {
            bail!("invalid value \"\" for `{key}` {origin}: must not be empty");
        }
        Ok(value)
    }

    /// A directory setting as an absolute path: relative to the configuration file's directory
    /// when the file gave it (so a file means the same wherever the host is started), to the
    /// working directory when a variable or flag did, and for the built-in defaults to
    /// [`default_base`].
    fn path(&self, key: &str) -> Result<PathBuf> {
        let value = PathBuf::from(self.non_empty(key)?);
        let base = match self.get(key) {
            Some((_, Origin::File(file))) => file.parent().map(Path::to_path_buf),
            Some(_) => None,
            None => default_base(),
        };
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
        let from_env = |key: &str| {
            matches!(
                self.get(key),
                Some((_, Origin::Env(_)) | (_, Origin::Flag(_)))
            )
        };
        let parts_from_env = ["redis_host", "redis_port", "redis_password"]
            .iter()
            .any(|k| from_env(k));
        let url_given = self.get("redis_url").is_some();
        if url_given && (from_env("redis_url") || !parts_from_env) {
            let url = self.string("redis_url");
            redis::parse_redis_url(&url).with_context(|| {
                let origin = self
                    .get("redis_url")
                    .map(|(_, o)| o.to_string())
                    .unwrap_or_default();
                format!(
                    "invalid value {:?} for `redis_url` {origin}: not a redis:// URL",
                    crate::persist::redact(&url)
                )
            })?;
            return Ok(url);
        }
        let host = self.non_empty("redis_host")?;
        let port: u16 = self.parse("redis_port", "a port number (1-65535)")?;
        let password = self.string("redis_password");
        Ok(if password.is_empty() {
            format!("redis://{host}:{port}")
        } else {
            format!("redis://:{}@{host}:{port}", percent_encode(&password))
        })
    }

    fn resolve(&self) -> Result<Config> {
        let timeout_seconds: u64 = self.positive("timeout_seconds")?;
        let plugin_timeout_ms: u64 = match self.get("plugin_timeout_ms") {
            Some(_) => self.positive("plugin_timeout_ms")?,
            None => timeout_seconds * 1000,
        };
        let plugin_memory_mib: usize = self.positive("plugin_memory_mib")?;
        if plugin_memory_mib > MAX_PLUGIN_MEMORY_MIB {
            let (text, origin) = self.value("plugin_memory_mib").unwrap_or_default();
            bail!(
                "invalid value {text:?} for `plugin_memory_mib` {origin}: at most {MAX_PLUGIN_MEMORY_MIB} (a 32-bit WebAssembly memory cannot grow past 4 GiB)"
            );
        }
        Ok(Config {
            redis_url: self.redis_url()?,
            database_url: self.non_empty("database_url")?,
            retry_attempts: self.positive("retry_attempts")?,
            timeout_seconds,
            processing_enabled: self.boolean("processing_enabled")?,
            plugins_dir: self.path("plugins_dir")?,
            consumer_group: self.non_empty("consumer_group")?,
            consumer_name: match self.get("consumer_name") {
                Some(_) => self.non_empty("consumer_name")?,
                None => default_consumer_name(),
            },
            reclaim_idle: Duration::from_millis(self.positive("reclaim_idle_ms")?),
            dlq_stream: self.non_empty("dlq_stream")?,
            batch_size: self.positive_at_most(
                "batch_size",
                MAX_BATCH_SIZE,
                "one batch is one transaction held in memory",
            )?,
            max_batch_size: self.positive_at_most(
                "max_batch_size",
                MAX_BATCH_SIZE,
                "one batch is one transaction held in memory",
            )?,
            max_in_flight: self.positive_at_most(
                "max_in_flight",
                MAX_IN_FLIGHT,
                "each batch in flight holds its entries and their commands in memory",
            )?,
            poll_timeout: Duration::from_millis(self.positive("poll_timeout_ms")?),
            stream_prefix: self.string("stream_prefix"),
            plugin_timeout: Duration::from_millis(plugin_timeout_ms),
            plugin_memory_bytes: plugin_memory_mib
                .checked_mul(1 << 20)
                .context("`plugin_memory_mib` is too large")?,
            migrate: self.boolean("migrate")?,
            watch_plugins: self.boolean("watch_plugins")?,
            shutdown_timeout: Duration::from_millis(self.positive("shutdown_timeout_ms")?),
            wait_for_deps: Duration::from_millis(
                self.parse("wait_for_deps_ms", "a number of milliseconds")?,
            ),
            http_addr: Some(self.string("http_addr").trim().to_string()).filter(|a| !a.is_empty()),
            migrations_dir: match self.string("migrations_dir").trim() {
                "" => None,
                _ => Some(self.path("migrations_dir")?),
            },
            critical_streams: self
                .string("critical_streams")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            consumer_expiry: Duration::from_millis(self.positive("consumer_expiry_ms")?),
            ledger_retention: Duration::from_millis(self.positive("ledger_retention_ms")?),
            database_timeouts: crate::persist::Timeouts {
                statement: Duration::from_millis(self.positive("pg_statement_timeout_ms")?),
                lock: Duration::from_millis(self.positive("pg_lock_timeout_ms")?),
                idle_in_transaction: Duration::from_millis(
                    self.positive("pg_idle_in_transaction_timeout_ms")?,
                ),
                keepalive_idle: Duration::from_millis(self.positive("pg_keepalive_idle_ms")?),
            },
            cache_dir: self.path("cache_dir")?,
            plugins: self.plugins.clone(),
            file: None,
        })
    }
}

/// The largest `batch_size` and `max_batch_size`: with the per-batch output cap this bounds what
/// one batch holds in memory.
pub const MAX_BATCH_SIZE: usize = 10_000;

/// The largest `max_in_flight`: batches in flight per stream each hold a batch in memory.
pub const MAX_IN_FLIGHT: usize = 64;

/// The default of `key` as declared in [`SETTINGS`], when it is a value; `None` when it is
/// computed (written as `<host name>` or as a formula such as `timeout_seconds × 1000`).
fn declared_default(key: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .map(|s| s.default)
        .filter(|d| !d.starts_with('<') && !d.contains(' '))
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

/// The largest memory cap a plugin can have, in MiB: a 32-bit WebAssembly memory (what
/// `wasm32-wasip2` builds) cannot grow past 4 GiB.
pub const MAX_PLUGIN_MEMORY_MIB: usize = 4096;

/// `KALEIDOSCOPE_*` variables that are not settings but are read elsewhere (the CLI's
/// `--config` default), and so must not be reported as unknown.
const IGNORED_ENV: &[&str] = &[
    "KALEIDOSCOPE_CONFIG",
    "KALEIDOSCOPE_LOG_FORMAT",
    "KALEIDOSCOPE_COMPONENTIZE_PY",
];

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

/// The environment-variable reference shown at the end of `kaleidoscope run --help`.
/// What subcommands' `--help` says about settings: where to find them, not all ~50 of them.
pub const SETTINGS_POINTER: &str = "Settings (Redis, PostgreSQL, streams, limits) come from the environment and the --config file, \
the same for every command: `kaleidoscope run --help` lists them all, `kaleidoscope config check` shows \
the values in force and where each came from, README.md \"Configuration\" is the reference.";

pub fn env_help() -> String {
    let mut text = String::from(
        "Configuration (environment wins over the --config file; flags win over both):\n",
    );
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            "none"
        } else {
            s.default
        };
        text.push_str(&format!(
            "  {} (file key `{}`, default: {default})\n      {}\n",
            s.env, s.key, s.help
        ));
    }
    text.push_str("  KALEIDOSCOPE_CONFIG\n      Path of the TOML file (same as --config).\n");
    text.push_str(
        "  RUST_LOG\n      Log filter, e.g. `info,kaleidoscope=debug` (default: info).\n",
    );
    text
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
    fn every_default_is_declared_once_and_valid() {
        // Only these two are computed; every other default is a value in SETTINGS, and an empty
        // configuration resolves to exactly those values.
        let computed: Vec<&str> = SETTINGS
            .iter()
            .filter(|s| super::declared_default(s.key).is_none())
            .map(|s| s.key)
            .collect();
        assert_eq!(computed, ["consumer_name", "plugin_timeout_ms"]);
        let config = load(&[]).unwrap();
        assert_eq!(config.plugin_timeout, Duration::from_secs(30));
        assert_eq!(config.consumer_group, "backend-group");
        assert_eq!(config.max_batch_size, 250);
        assert_eq!(config.ledger_retention, Duration::from_millis(86_400_000));
        assert_eq!(
            config.critical_streams,
            ["post-image-processing", "profile-picture-processing"]
        );
        assert_eq!(config.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(
            config.database_timeouts,
            crate::persist::Timeouts::default()
        );
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
        let flags = BTreeMap::from([("consumer_name", "flag".to_string())]);
        let config = Config::from_sources(Some(&file), &environment, &flags).unwrap();
        assert_eq!(config.consumer_name, "flag");
        assert_eq!(
            config.plugins_dir,
            std::env::current_dir().unwrap().join("env-dir")
        );
        assert_eq!(config.batch_size, 5);
        assert_eq!(
            config.consumer_group,
            declared_default("consumer_group").unwrap()
        );
        // A bad flag value is named as a flag.
        let flags = BTreeMap::from([("migrate", "perhaps".to_string())]);
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
        assert!(config.cache_dir.ends_with("target/plugin-cache"));
    }
}
