//! Every setting the host reads, declared once: TOML key, environment variable, default and help
//! text, and the limits some of them are held to.

/// One configurable setting: its TOML key, its environment variable and what it means.
pub struct Setting {
    /// The setting, for the code that reads it.
    pub id: Key,
    /// Key in the TOML file.
    pub key: &'static str,
    /// Environment variable (the seed's names where the seed has one).
    pub env: &'static str,
    /// Default, as shown to users.
    pub default: &'static str,
    /// One line for `--help` and the README.
    pub help: &'static str,
}

/// Declares every setting once: the [`Key`] the code reads it by and its row of [`SETTINGS`]
/// (key, variable, default, help), in the same order, so a key the table lacks cannot be asked for.
macro_rules! settings {
    ($($id:ident { key: $key:literal, env: $env:literal, default: $default:expr, help: $help:expr $(,)? },)*) => {
        /// A setting, as the code asks for it: a typo is a compile error, not a missing value at
        /// run time. Its TOML key, variable and default are its row of [`SETTINGS`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Key {
            $($id,)*
        }

        /// Every setting the host reads. The order is the order of the documentation.
        pub const SETTINGS: &[Setting] = &[
            $(Setting { id: Key::$id, key: $key, env: $env, default: $default, help: $help },)*
        ];
    };
}

settings! {
    RedisUrl {
        key: "redis_url",
        env: "REDIS_URL",
        default: "redis://127.0.0.1:6379",
        help: "Redis connection URL; a database index (`/3`) selects that database. Overrides redis_host/redis_port/redis_password.",
    },
    RedisClusterNodes {
        key: "redis_cluster_nodes",
        env: "REDIS_CLUSTER_NODES",
        default: "",
        help: "Seed nodes of a Redis Cluster (`host:port,host:port,…`, like Spring's spring.data.redis.cluster.nodes); when set, the host runs against that cluster and redis_url gives only the scheme and credentials for every node.",
    },
    RedisHost {
        key: "redis_host",
        env: "REDIS_HOST",
        default: "127.0.0.1",
        help: "Redis host, used when no URL is given (seed variable).",
    },
    RedisPort {
        key: "redis_port",
        env: "REDIS_PORT",
        default: "6379",
        help: "Redis port, used when no URL is given (seed variable).",
    },
    RedisPassword {
        key: "redis_password",
        env: "REDIS_PASSWORD",
        default: "",
        help: "Redis password, used when no URL is given (seed variable).",
    },
    DatabaseUrl {
        key: "database_url",
        env: "DATABASE_URL",
        default: "postgres://postgres@127.0.0.1:5432/kaleidoscope",
        help: "PostgreSQL connection URL. The database is created if it does not exist.",
    },
    RetryAttempts {
        key: "retry_attempts",
        env: "ML_RETRY_ATTEMPTS",
        default: "3",
        help: "Deliveries of an entry before it is dead-lettered as retries-exhausted (seed variable).",
    },
    TimeoutSeconds {
        key: "timeout_seconds",
        env: "ML_TIMEOUT_SECONDS",
        default: "30",
        help: "ML timeout in seconds; also the default deadline of one plugin call (seed variable).",
    },
    ProcessingEnabled {
        key: "processing_enabled",
        env: "ML_PROCESSING_ENABLED",
        default: "true",
        help: "Whether requests are published to the ML services (seed variable).",
    },
    PluginsDir {
        key: "plugins_dir",
        env: "KALEIDOSCOPE_PLUGINS_DIR",
        default: "target/plugins",
        help: "Directory of handler plugins (`*.wasm` components).",
    },
    ConsumerGroup {
        key: "consumer_group",
        env: "KALEIDOSCOPE_CONSUMER_GROUP",
        default: "backend-group",
        help: "Consumer group joined on every inbound stream.",
    },
    ConsumerName {
        key: "consumer_name",
        env: "KALEIDOSCOPE_CONSUMER_NAME",
        default: "<host name>",
        help: "This instance's consumer name; keep it stable across restarts so the instance finds its own pending entries.",
    },
    ReclaimIdleMs {
        key: "reclaim_idle_ms",
        env: "KALEIDOSCOPE_RECLAIM_IDLE_MS",
        default: "60000",
        help: "Idle time after which a pending entry (of any consumer) is reclaimed and retried.",
    },
    DlqStream {
        key: "dlq_stream",
        env: "KALEIDOSCOPE_DLQ_STREAM",
        default: "ml-results-dlq",
        help: "Dead-letter stream.",
    },
    BatchSize {
        key: "batch_size",
        env: "KALEIDOSCOPE_BATCH_SIZE",
        default: "10",
        help: "Entries asked for by the first XREADGROUP of a stream (seed: batch-size); while reads come back full (a backlog), each read asks for twice as many, up to max_batch_size, and a short read keeps the size (a read returns what is there at once, so a large size never delays an entry). At most 10,000.",
    },
    MaxBatchSize {
        key: "max_batch_size",
        env: "KALEIDOSCOPE_MAX_BATCH_SIZE",
        default: "1000",
        help: "The most entries one read (and so one batch transaction) takes when a stream has a backlog. At most 10,000.",
    },
    MaxBatchBytes {
        key: "max_batch_bytes",
        env: "KALEIDOSCOPE_MAX_BATCH_BYTES",
        default: "2097152",
        help: "The most bytes of entries (field names and values) one read asks for, at the size per entry of the last read that found any: large entries (embeddings) make smaller batches, so memory stays bounded while small entries reach max_batch_size.",
    },
    MaxInFlight {
        key: "max_in_flight",
        env: "KALEIDOSCOPE_MAX_IN_FLIGHT",
        default: "3",
        help: "Batches per stream between read and acknowledgement at once: the next batch is read and handled while earlier ones commit. At most 64.",
    },
    PollTimeoutMs {
        key: "poll_timeout_ms",
        env: "KALEIDOSCOPE_POLL_TIMEOUT_MS",
        default: "1000",
        help: "How long one XREADGROUP blocks waiting for entries (seed: poll-timeout).",
    },
    StreamPrefix {
        key: "stream_prefix",
        env: "KALEIDOSCOPE_STREAM_PREFIX",
        default: "",
        help: "Prefix added to every Redis stream key the host touches (namespacing; tests use it for isolation).",
    },
    PluginTimeoutMs {
        key: "plugin_timeout_ms",
        env: "KALEIDOSCOPE_PLUGIN_TIMEOUT_MS",
        default: "timeout_seconds × 1000",
        help: "Deadline of one handler call; a plugin past it is stopped and the entry fails as `timeout`.",
    },
    PluginMemoryMib {
        key: "plugin_memory_mib",
        env: "KALEIDOSCOPE_PLUGIN_MEMORY_MIB",
        default: "64",
        help: "Linear-memory cap of one handler instance, in MiB.",
    },
    Migrate {
        key: "migrate",
        env: "KALEIDOSCOPE_MIGRATE",
        default: "true",
        help: "Whether `run` applies database migrations at start-up.",
    },
    WatchPlugins {
        key: "watch_plugins",
        env: "KALEIDOSCOPE_WATCH_PLUGINS",
        default: "true",
        help: "Whether `run` watches the plugins directory and swaps changed plugins in without a restart.",
    },
    HttpAddr {
        key: "http_addr",
        env: "KALEIDOSCOPE_HTTP_ADDR",
        default: "127.0.0.1:9464",
        help: "Address for /metrics, /healthz and /readyz: this machine only by default; 0.0.0.0:9464 for a container or a remote Prometheus; empty for no HTTP endpoint. Bound before anything else, so a busy port fails at once.",
    },
    CriticalStreams {
        key: "critical_streams",
        env: "KALEIDOSCOPE_CRITICAL_STREAMS",
        default: "post-image-processing,profile-picture-processing",
        help: "Request streams whose publishing failure is an error to the caller (comma-separated); failures on other streams are logged and retried by the request tracker.",
    },
    WaitForDepsMs {
        key: "wait_for_deps_ms",
        env: "KALEIDOSCOPE_WAIT_FOR_DEPS_MS",
        default: "0",
        help: "At start-up, how long to keep trying PostgreSQL and Redis before giving up (0: give up at once). For a container started beside its database; `run --wait-for-deps 60s` sets it.",
    },
    ShutdownTimeoutMs {
        key: "shutdown_timeout_ms",
        env: "KALEIDOSCOPE_SHUTDOWN_TIMEOUT_MS",
        default: "10000",
        help: "On SIGTERM/Ctrl-C, how long batches in flight may take to finish before the host exits anyway (their entries stay pending). A second signal exits at once.",
    },
    ConsumerExpiryMs {
        key: "consumer_expiry_ms",
        env: "KALEIDOSCOPE_CONSUMER_EXPIRY_MS",
        default: "3600000",
        help: "Consumers of the group idle for longer than this with no pending entries (hosts gone for good) are removed.",
    },
    LedgerRetentionMs {
        key: "ledger_retention_ms",
        env: "KALEIDOSCOPE_LEDGER_RETENTION_MS",
        default: "86400000",
        help: "How long the processed-entry ledger remembers a finished entry (it makes redelivery harmless). Older rows are pruned in small chunks, except those of entries still pending in their group.",
    },
    PgStatementTimeoutMs {
        key: "pg_statement_timeout_ms",
        env: "KALEIDOSCOPE_PG_STATEMENT_TIMEOUT_MS",
        default: "30000",
        help: "PostgreSQL `statement_timeout` of the host's connections: a statement running longer is cancelled, and its entries are retried (a bounded number of times) like any other failed statement. The host also gives up on a batch whose database work gets no answer within four times this (a half-open connection) and retries it as an outage.",
    },
    PgLockTimeoutMs {
        key: "pg_lock_timeout_ms",
        env: "KALEIDOSCOPE_PG_LOCK_TIMEOUT_MS",
        default: "10000",
        help: "PostgreSQL `lock_timeout`: a batch waiting longer for a row or table lock fails that statement, and is retried.",
    },
    PgIdleInTransactionTimeoutMs {
        key: "pg_idle_in_transaction_timeout_ms",
        env: "KALEIDOSCOPE_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        default: "60000",
        help: "PostgreSQL `idle_in_transaction_session_timeout`: the server ends a session of this host that sits in an open transaction this long (a stuck host never holds locks for good).",
    },
    PgKeepaliveIdleMs {
        key: "pg_keepalive_idle_ms",
        env: "KALEIDOSCOPE_PG_KEEPALIVE_IDLE_MS",
        default: "30000",
        help: "TCP keepalive of the host's PostgreSQL sessions (`tcp_keepalives_idle`, then 3 probes 10 s apart): the server notices a host that vanished and releases its locks.",
    },
    MigrationsDir {
        key: "migrations_dir",
        env: "KALEIDOSCOPE_MIGRATIONS_DIR",
        default: "",
        help: "Directory of the operator's own SQL migrations (`*.sql`, applied once each in name order, at start-up, by `migrate` and whenever the plugins are reloaded, unless migrations are off): how a plugin gets a new table without a new host build. None when empty.",
    },
    CacheDir {
        key: "cache_dir",
        env: "KALEIDOSCOPE_CACHE_DIR",
        default: "target/plugin-cache",
        help: "Directory of compiled plugins (keyed by content hash) and of their compiled functions, so restarts, reloads and the plugin tools never recompile an unchanged file and a changed build compiles only the functions that changed. Only the host and its tools should write it.",
    },
}

impl Key {
    /// The row of [`SETTINGS`] that declares this setting.
    pub fn setting(self) -> &'static Setting {
        &SETTINGS[self as usize]
    }

    /// The TOML key, as messages name the setting.
    pub fn name(self) -> &'static str {
        self.setting().key
    }

    /// The setting whose TOML key is `key`.
    pub fn from_name(key: &str) -> Option<Key> {
        SETTINGS.iter().find(|s| s.key == key).map(|s| s.id)
    }
}

/// The largest `batch_size` and `max_batch_size`: with the per-batch output cap this bounds what
/// one batch holds in memory.
pub const MAX_BATCH_SIZE: usize = 10_000;

/// The largest `max_in_flight`: batches in flight per stream each hold a batch in memory.
pub const MAX_IN_FLIGHT: usize = 64;

/// The default of `key` as declared in [`SETTINGS`], when it is a value; `None` when it is
/// computed (written as `<host name>` or as a formula such as `timeout_seconds × 1000`).
pub(super) fn declared_default(key: Key) -> Option<&'static str> {
    Some(key.setting().default).filter(|d| !d.starts_with('<') && !d.contains(' '))
}

/// The largest memory cap a plugin can have, in MiB: a 32-bit WebAssembly memory (what
/// `wasm32-wasip2` builds) cannot grow past 4 GiB.
pub const MAX_PLUGIN_MEMORY_MIB: usize = 4096;

/// `KALEIDOSCOPE_*` variables that are not settings but are read elsewhere (the CLI's
/// `--config` default), and so must not be reported as unknown.
pub(super) const IGNORED_ENV: &[&str] = &[
    "KALEIDOSCOPE_CONFIG",
    "KALEIDOSCOPE_LOG_FORMAT",
    "KALEIDOSCOPE_COMPONENTIZE_PY",
];

/// What subcommands' `--help` says about settings: where to find them, not all ~50 of them.
pub const SETTINGS_POINTER: &str = "Settings (Redis, PostgreSQL, streams, limits) come from the environment and the --config file, \
the same for every command: `kaleidoscope run --help` lists them all, `kaleidoscope config check` shows \
the values in force and where each came from, README.md \"Configuration\" is the reference.";

/// The environment-variable reference shown at the end of `kaleidoscope run --help`.
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
