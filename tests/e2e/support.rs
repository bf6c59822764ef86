//! The test harness: a real host against the real Redis and PostgreSQL of this machine, with real
//! plugin components, isolated per test by a unique stream prefix and a fresh database.
//!
//! Plugins must have been built with `./scripts/build-plugins` (the test command does that once
//! per run).

#![allow(dead_code)]

use kaleidoscope::config::Config;
use kaleidoscope::host::RunningHost;
use kaleidoscope::redis_connection::{RedisClient, RedisConnection};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(45);
/// The admin connection used to create and drop test databases.
pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test in this run (process id, counter, clock).
pub fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000
    )
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built plugin component: a shipped one from `target/plugins`, a test fixture from
/// `target/test-plugins`, or a Python example from `target/examples`.
pub fn plugin_file(name: &str) -> PathBuf {
    for dir in ["target/plugins", "target/test-plugins", "target/examples"] {
        let file = workspace().join(dir).join(format!("{name}.wasm"));
        if file.exists() {
            return file;
        }
    }
    panic!(
        "plugin {name}.wasm is not built: run ./scripts/build-plugins first (the test command does)"
    );
}

/// Polls `probe` until it yields `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, probe).await
}

/// [`eventually`] with a deadline of its own, for the few waits that span whole builds (a
/// Python environment made, a component built and compiled) on a machine busy with the rest
/// of the suite.
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Grants for the test fixtures (the shipped plugins have theirs built in). The trespasser gets
/// none on purpose.
const FIXTURE_GRANTS: &[(&str, &str)] = &[
    (
        "scripted",
        "tables = [\"ml_processing_errors\"]\nemit = [\"scripted-out\"]",
    ),
    ("panicking", "tables = [\"ml_processing_errors\"]"),
    ("looping", "tables = [\"ml_processing_errors\"]"),
    ("memory-hog", "tables = [\"ml_processing_errors\"]"),
    (
        "slow",
        "tables = [\"ml_processing_errors\"]\nemit = [\"slow-out\"]",
    ),
    ("contract-v0-1", "tables = [\"ml_processing_errors\"]"),
    ("rival", "tables = [\"ml_processing_errors\"]"),
    ("python-raising", "tables = [\"ml_processing_errors\"]"),
];

/// Settings a test may change before the host starts.
pub struct Options {
    pub plugins: Vec<&'static str>,
    pub env: BTreeMap<String, String>,
    /// `[plugins.<name>]` sections of the configuration file: lines per plugin.
    pub plugin_sections: BTreeMap<String, Vec<String>>,
    /// Give the host an operator migrations directory (`<plugins dir>/migrations`).
    pub operator_migrations: bool,
}

impl Options {
    pub fn new(plugins: &[&'static str]) -> Self {
        let mut env = BTreeMap::new();
        env.insert("KALEIDOSCOPE_POLL_TIMEOUT_MS".into(), "200".into());
        // No HTTP endpoint unless a test asks (parallel hosts would clash on the default port).
        env.insert("KALEIDOSCOPE_HTTP_ADDR".into(), String::new());
        // Compiled components are shared between tests (content-addressed, written atomically).
        env.insert(
            "KALEIDOSCOPE_CACHE_DIR".into(),
            workspace()
                .join("target/test-plugin-cache")
                .display()
                .to_string(),
        );
        Self {
            plugins: plugins.to_vec(),
            env,
            plugin_sections: FIXTURE_GRANTS
                .iter()
                .map(|(name, lines)| (name.to_string(), vec![lines.to_string()]))
                .collect(),
            operator_migrations: false,
        }
    }

    /// Gives the host an operator migrations directory, [`TestEnv::migrations_dir`].
    pub fn operator_migrations(mut self) -> Self {
        self.operator_migrations = true;
        self
    }

    /// Adds a line (e.g. `timeout_ms = 300`) to the `[plugins.<plugin>]` section.
    pub fn plugin_setting(mut self, plugin: &str, line: &str) -> Self {
        self.plugin_sections
            .entry(plugin.to_string())
            .or_default()
            .push(line.to_string());
        self
    }

    fn config_toml(&self) -> String {
        self.plugin_sections
            .iter()
            .map(|(name, lines)| format!("[plugins.{name}]\n{}\n", lines.join("\n")))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Sets a configuration variable (as the environment would).
    pub fn set(mut self, name: &str, value: impl ToString) -> Self {
        self.env.insert(name.into(), value.to_string());
        self
    }

    /// Runs against the Redis Cluster `cluster` instead of the machine's Redis.
    pub fn on_cluster(self, cluster: &crate::redis_cluster::RedisCluster) -> Self {
        self.set("REDIS_CLUSTER_NODES", cluster.seeds())
    }

    /// Fast retries: reclaim after `idle_ms`, dead-letter after `attempts` deliveries.
    pub fn retries(self, attempts: u32, idle_ms: u64) -> Self {
        self.set("ML_RETRY_ATTEMPTS", attempts)
            .set("KALEIDOSCOPE_RECLAIM_IDLE_MS", idle_ms)
    }
}

/// One isolated environment: database, stream prefix, plugins directory, and a running host.
pub struct TestEnv {
    pub prefix: String,
    pub database: String,
    pub database_url: String,
    pub plugins_dir: PathBuf,
    pub config_file: PathBuf,
    pub config: Config,
    pub pool: PgPool,
    /// A connection to the environment's Redis (its cluster, on a cluster), as patient as the
    /// tests need.
    pub redis: RedisConnection,
    pub host: Option<RunningHost>,
    /// Set by [`TestEnv::finish`]; otherwise (a failed test) dropping the environment removes
    /// its database, keys and files.
    cleaned: bool,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A failed assertion unwinds through here: clean up without the test's runtime.
        let (prefix, database, plugins_dir, redis_url, cluster_nodes) = (
            self.prefix.clone(),
            self.database.clone(),
            self.plugins_dir.clone(),
            self.config.redis_url.clone(),
            self.config.redis_cluster_nodes.clone(),
        );
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(client) = RedisClient::new(&redis_url, &cluster_nodes)
                    && let Ok(mut redis) = client.dedicated(Duration::from_secs(10)).await
                {
                    remove_keys(&mut redis, &prefix).await;
                }
                drop_database(&database).await;
            });
            remove_files(&plugins_dir);
        })
        .join();
    }
}

/// Deletes every Redis key under `prefix`.
async fn remove_keys(redis: &mut RedisConnection, prefix: &str) {
    let _ = redis.delete_keys_with_prefix(prefix).await;
}

/// Drops a test database, whoever is still connected to it.
async fn drop_database(database: &str) {
    if let Ok(admin) = PgPool::connect(ADMIN_URL).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

/// Removes the plugins directory and the configuration file and host logs next to it
/// (`<name>.toml`, `<name>.<host>.log`).
fn remove_files(plugins_dir: &Path) {
    let _ = std::fs::remove_dir_all(plugins_dir);
    if let (Some(dir), Some(name)) = (plugins_dir.parent(), plugins_dir.file_name()) {
        let prefix = format!("{}.", name.to_string_lossy());
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// A `kaleidoscope run` child process that is killed when dropped, so a failed test never leaves
/// a host running (a looping plugin would keep a core busy).
pub struct HostProcess(std::process::Child);

impl HostProcess {
    /// Starts `command` (typically `kaleidoscope run`, built with [`TestEnv::binary`]).
    pub fn spawn(command: &mut std::process::Command) -> HostProcess {
        HostProcess(command.spawn().expect("start a host process"))
    }
}

impl std::ops::Deref for HostProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for HostProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl TestEnv {
    /// Creates the database and plugins directory, migrates, and starts the host.
    pub async fn start(options: Options) -> TestEnv {
        let env = Self::prepare(options).await;
        env.with_host().await
    }

    /// Like [`TestEnv::start`] but without starting the host (for tests that run the binary or
    /// need rows in place first).
    pub async fn prepare(options: Options) -> TestEnv {
        let name = unique("kt");
        let prefix = format!("{name}:");
        let database = name.clone();
        let database_url = format!("postgres://postgres@127.0.0.1:5432/{database}");
        let plugins_dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&plugins_dir).expect("create the plugins directory");
        for plugin in &options.plugins {
            std::fs::copy(
                plugin_file(plugin),
                plugins_dir.join(format!("{plugin}.wasm")),
            )
            .expect("copy plugin");
        }

        let config_file = plugins_dir.with_extension("toml");
        std::fs::write(&config_file, options.config_toml()).expect("write the configuration file");
        let mut env = options.env.clone();
        // Unique, so fault tests can find this host's Redis connections by name.
        env.entry("KALEIDOSCOPE_CONSUMER_NAME".into())
            .or_insert_with(|| format!("host-{name}"));
        env.insert("DATABASE_URL".into(), database_url.clone());
        let redis_url = env
            .entry("REDIS_URL".into())
            .or_insert_with(|| REDIS_URL.into())
            .clone();
        env.insert("KALEIDOSCOPE_STREAM_PREFIX".into(), prefix.clone());
        if options.operator_migrations {
            let dir = plugins_dir.join("migrations");
            std::fs::create_dir_all(&dir).expect("create the migrations directory");
            env.insert(
                "KALEIDOSCOPE_MIGRATIONS_DIR".into(),
                dir.display().to_string(),
            );
        }
        env.insert(
            "KALEIDOSCOPE_PLUGINS_DIR".into(),
            plugins_dir.display().to_string(),
        );
        let config = Config::from_sources(Some(&config_file), &env, &BTreeMap::new())
            .expect("test configuration");

        let pool = kaleidoscope::persist::connect(&database_url, 4, &Default::default())
            .await
            .expect("create the test database");
        kaleidoscope::persist::migrate(&pool)
            .await
            .expect("migrate the test database");
        // Patient: fault tests pause Redis for everyone for a moment.
        let redis = RedisClient::new(&redis_url, &config.redis_cluster_nodes)
            .expect("redis url")
            .dedicated(Duration::from_secs(30))
            .await
            .expect("connect to Redis");
        TestEnv {
            prefix,
            database,
            database_url,
            plugins_dir,
            config_file,
            config,
            pool,
            redis,
            host: None,
            cleaned: false,
        }
    }

    /// Starts the in-process host.
    pub async fn with_host(mut self) -> TestEnv {
        let host = RunningHost::start(self.config.clone())
            .await
            .expect("start the host");
        self.host = Some(host);
        self
    }

    /// The running in-process host.
    pub fn host(&self) -> &RunningHost {
        self.host.as_ref().expect("the host is running")
    }

    /// Copies the built plugin `plugin` into the plugins directory as `<file_name>.wasm`,
    /// atomically (write elsewhere, then rename), as a deployment would.
    pub fn install_plugin(&self, plugin: &str, file_name: &str) {
        let staging = self.plugins_dir.join(format!(".{file_name}.partial"));
        std::fs::copy(plugin_file(plugin), &staging).expect("stage the plugin");
        std::fs::rename(&staging, self.plugins_dir.join(format!("{file_name}.wasm")))
            .expect("install the plugin");
    }

    /// The name and version of the plugin serving `stream` right now, if any.
    pub fn serving(&self, stream: &str) -> Option<(String, String)> {
        self.host()
            .state()
            .registry
            .snapshot()
            .for_stream(stream)
            .map(|p| (p.name.clone(), p.version.clone()))
    }

    /// Waits until `stream` is served by `version` of a plugin.
    pub async fn await_serving(&self, stream: &str, version: &str) {
        eventually(
            &format!("{stream} to be served by version {version}"),
            || async {
                (self.serving(stream).map(|(_, v)| v).as_deref() == Some(version)).then_some(())
            },
        )
        .await;
    }

    /// The plugin version the ledger recorded for an entry.
    pub async fn ledger_version(&self, stream: &str, entry_id: &str) -> Option<String> {
        self.ledger_field("plugin_version", stream, entry_id).await
    }

    /// A value of the test database that a `SELECT count(*) ...` returns.
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The `kaleidoscope` binary set up with this environment's configuration.
    pub fn binary(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kaleidoscope"));
        command
            .args(args)
            // Off unless a test asks: hosts of parallel tests would clash on the default port.
            .env("KALEIDOSCOPE_HTTP_ADDR", "")
            .env("KALEIDOSCOPE_CONFIG", &self.config_file)
            .env("DATABASE_URL", &self.database_url)
            .env("KALEIDOSCOPE_STREAM_PREFIX", &self.prefix)
            .env("KALEIDOSCOPE_PLUGINS_DIR", &self.plugins_dir)
            .env("KALEIDOSCOPE_CONSUMER_NAME", &self.config.consumer_name)
            .env("KALEIDOSCOPE_CACHE_DIR", &self.config.cache_dir)
            .env(
                "KALEIDOSCOPE_POLL_TIMEOUT_MS",
                self.config.poll_timeout.as_millis().to_string(),
            )
            .env(
                "KALEIDOSCOPE_RECLAIM_IDLE_MS",
                self.config.reclaim_idle.as_millis().to_string(),
            )
            .env("ML_RETRY_ATTEMPTS", self.config.retry_attempts.to_string())
            .env("REDIS_URL", &self.config.redis_url)
            .env(
                "REDIS_CLUSTER_NODES",
                self.config.redis_cluster_nodes.join(","),
            );
        command
    }

    /// Runs `kaleidoscope <args>`: whether it succeeded, and what it printed (stdout, then
    /// stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let output = self.command(args);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    }

    /// Runs the `kaleidoscope` binary with this environment's configuration.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        self.binary(args)
            .output_by_deadline()
            .expect("run kaleidoscope")
    }

    /// Starts `kaleidoscope run` as a separate process with its own consumer name; its log goes
    /// to a file next to the plugins directory (kept for a failed test's post-mortem).
    pub fn spawn_host(&self, consumer: &str) -> HostProcess {
        let log = std::fs::File::create(self.host_log(consumer)).expect("host log file");
        HostProcess::spawn(
            self.binary(&["run"])
                .env("KALEIDOSCOPE_CONSUMER_NAME", consumer)
                .stdout(std::process::Stdio::null())
                .stderr(log),
        )
    }

    /// A plugins directory of its own next to the environment's (removed with it), holding
    /// copies of `plugins`: what a host on another machine has.
    pub fn directory_of(&self, host: &str, plugins: &[&str]) -> PathBuf {
        let name = self.plugins_dir.file_name().unwrap().to_string_lossy();
        let dir = self
            .plugins_dir
            .with_file_name(format!("{name}.{host}-plugins"));
        std::fs::create_dir_all(&dir).expect("a plugins directory");
        for plugin in plugins {
            std::fs::copy(plugin_file(plugin), dir.join(format!("{plugin}.wasm")))
                .expect("copy a plugin");
        }
        dir
    }

    /// Starts `kaleidoscope run` as `consumer` on the plugins directory `dir`.
    pub fn spawn_on(&self, consumer: &str, dir: &Path) -> HostProcess {
        self.spawn_with(consumer, dir, &[])
    }

    /// [`TestEnv::spawn_on`] with more settings (`name`, `value`), which win.
    pub fn spawn_with(&self, consumer: &str, dir: &Path, settings: &[(&str, &str)]) -> HostProcess {
        let log = std::fs::File::create(self.host_log(consumer)).expect("host log file");
        let mut command = self.binary(&["run"]);
        command
            .env("KALEIDOSCOPE_CONSUMER_NAME", consumer)
            .env("KALEIDOSCOPE_PLUGINS_DIR", dir)
            .stdout(std::process::Stdio::null())
            .stderr(log);
        for (name, value) in settings {
            command.env(name, value);
        }
        HostProcess::spawn(&mut command)
    }

    /// Waits until a call of `plugin` is running in the handler (the calls-in-flight gauge): in
    /// the handler, not only delivered, which is what a test racing a reload must wait for.
    pub async fn await_call_running(&self, plugin: &str) {
        let calls = self
            .host()
            .state()
            .metrics
            .calls_in_flight
            .get_or_create_owned(&kaleidoscope::metrics::ByPluginName {
                plugin: plugin.to_string(),
            });
        eventually(&format!("a call of {plugin} to be in the handler"), || {
            let calls = calls.clone();
            async move { (calls.get() >= 1).then_some(()) }
        })
        .await;
    }

    /// `kaleidoscope plugin deploy FILE --timeout 30`: whether it succeeded, and what it printed
    /// (stdout, then stderr).
    pub fn deploy(&self, file: &Path) -> (bool, String) {
        let output = self.command(&[
            "plugin",
            "deploy",
            file.to_str().expect("a UTF-8 path"),
            "--timeout",
            "30",
        ]);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    }

    /// `kaleidoscope dlq replay <selection> --json`, which must succeed: the new entry ids.
    pub fn replay(&self, selection: &[&str]) -> Vec<String> {
        let mut args = vec!["dlq", "replay"];
        args.extend_from_slice(selection);
        args.push("--json");
        let replay = self.command(&args);
        assert!(
            replay.status.success(),
            "{}",
            String::from_utf8_lossy(&replay.stderr)
        );
        let replayed: serde_json::Value = serde_json::from_slice(&replay.stdout).unwrap();
        replayed
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["new_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// The operator migrations directory of [`Options::operator_migrations`].
    pub fn migrations_dir(&self) -> PathBuf {
        self.plugins_dir.join("migrations")
    }

    /// Where [`TestEnv::spawn_host`] writes the log of host `consumer`.
    pub fn host_log(&self, consumer: &str) -> PathBuf {
        self.plugins_dir.with_extension(format!("{consumer}.log"))
    }

    /// Rows of `table` (one with `created_at` and an `updated_at` trigger) changed after the
    /// transaction that inserted them: what applying an entry a second time leaves behind, even
    /// where unique keys keep the row count right. Tests that write each row once expect 0.
    pub async fn rows_written_again(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table} WHERE updated_at <> created_at");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"))
    }

    /// How many entries of `stream` are pending for consumer `name` (0 when it has none or the
    /// group does not exist yet).
    pub async fn pending_for(&self, stream: &str, name: &str) -> i64 {
        let consumers: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.key(stream))
            .arg(&self.config.consumer_group)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap_or_default();
        consumers
            .iter()
            .filter(|c| matches!(c.get("name"), Some(redis::Value::BulkString(n)) if n == name.as_bytes()))
            .map(|c| match c.get("pending") {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            })
            .sum()
    }

    /// Number of entries the ledger has for `stream`.
    pub async fn ledger_count(&self, stream: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM processed_entries WHERE stream = $1")
            .bind(stream)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }

    /// Publishes many entries in pipelined chunks; returns their ids in order.
    pub async fn publish_many(
        &self,
        stream: &str,
        entries: &[Vec<(String, String)>],
    ) -> Vec<String> {
        let mut ids = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(100) {
            let mut pipe = redis::pipe();
            for fields in chunk {
                let cmd = pipe.cmd("XADD").arg(self.key(stream)).arg("*");
                for (k, v) in fields {
                    cmd.arg(k).arg(v);
                }
            }
            let chunk_ids: Vec<String> = pipe
                .query_async(&mut self.redis.clone())
                .await
                .expect("XADD pipeline");
            ids.extend(chunk_ids);
        }
        ids
    }

    /// `kaleidoscope status --json` for this environment, with its exit status.
    pub fn status(&self) -> (serde_json::Value, bool) {
        let output = self.command(&["status", "--json"]);
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (report, output.status.success())
    }

    /// The Redis key of a logical stream.
    pub fn key(&self, stream: &str) -> String {
        format!("{}{stream}", self.prefix)
    }

    /// Adds an entry to a logical stream and returns its id.
    pub async fn publish(&self, stream: &str, fields: &[(&str, &str)]) -> String {
        let fields: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        self.publish_bytes(stream, &fields).await
    }

    /// Adds an entry whose field values are raw bytes.
    pub async fn publish_bytes(&self, stream: &str, fields: &[(&str, &[u8])]) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.key(stream)).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query_async(&mut self.redis.clone())
            .await
            .expect("XADD")
    }

    /// The group's pending count on a logical stream (0 while the group does not exist; any
    /// other Redis error fails the test rather than passing for "nothing pending").
    pub async fn pending(&self, stream: &str) -> i64 {
        let reply: redis::Value = match redis::cmd("XPENDING")
            .arg(self.key(stream))
            .arg(&self.config.consumer_group)
            .query_async(&mut self.redis.clone())
            .await
        {
            Ok(reply) => reply,
            // No group yet (a host still starting): nothing is pending.
            Err(error) if error.code() == Some("NOGROUP") => redis::Value::Nil,
            Err(error) => panic!("XPENDING on {stream} failed: {error}"),
        };
        match reply {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Waits until the group has nothing pending on `stream`.
    pub async fn await_no_pending(&self, stream: &str) {
        eventually(&format!("no pending entries on {stream}"), || async {
            (self.pending(stream).await == 0).then_some(())
        })
        .await;
    }

    /// Waits until the group has read every entry of `stream` and has nothing pending: the host
    /// is done with the stream.
    pub async fn await_drained(&self, stream: &str) {
        eventually(&format!("{stream} drained"), || async {
            let last: redis::Value = redis::cmd("XREVRANGE")
                .arg(self.key(stream))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut self.redis.clone())
                .await
                .ok()?;
            let last_id = match last {
                redis::Value::Array(items) => match items.into_iter().next() {
                    Some(redis::Value::Array(mut entry)) if !entry.is_empty() => {
                        text(entry.swap_remove(0))
                    }
                    _ => String::new(),
                },
                _ => String::new(),
            };
            let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(self.key(stream))
                .query_async(&mut self.redis.clone())
                .await
                .ok()?;
            let group = groups.into_iter().find(|g| {
                g.get("name").map(|v| text(v.clone())) == Some(self.config.consumer_group.clone())
            })?;
            let delivered = group.get("last-delivered-id").map(|v| text(v.clone()))?;
            let pending = match group.get("pending") {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            };
            (delivered == last_id && pending == 0).then_some(())
        })
        .await;
    }

    /// Every entry of a logical stream, oldest first: id and fields in order.
    pub async fn entries(&self, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
        redis::cmd("XRANGE")
            .arg(self.key(stream))
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis.clone())
            .await
            .unwrap_or_else(|e| panic!("XRANGE on {stream}: {e}"))
    }

    /// The entries of the dead-letter stream, as field maps.
    pub async fn dead_letters(&self) -> Vec<HashMap<String, String>> {
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(self.key(&self.config.dlq_stream))
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis.clone())
            .await
            .expect("XRANGE on the dead-letter stream");
        entries.into_iter().map(|(_, fields)| fields).collect()
    }

    /// Waits for the dead letter of `entry_id` of `stream` and returns it. (Entry ids are only
    /// unique within a stream.)
    pub async fn await_dead_letter(&self, stream: &str, entry_id: &str) -> HashMap<String, String> {
        eventually(
            &format!("a dead letter for {stream} {entry_id}"),
            || async {
                self.dead_letters().await.into_iter().find(|d| {
                    d.get("sourceId").map(String::as_str) == Some(entry_id)
                        && d.get("sourceStream").map(String::as_str) == Some(stream)
                })
            },
        )
        .await
    }

    /// Whether the ledger has `entry_id` of `stream`, and with which outcome.
    pub async fn ledger_outcome(&self, stream: &str, entry_id: &str) -> Option<String> {
        self.ledger_field("outcome", stream, entry_id).await
    }

    async fn ledger_field(
        &self,
        column: &'static str,
        stream: &str,
        entry_id: &str,
    ) -> Option<String> {
        let sql = match column {
            "outcome" => {
                "SELECT outcome FROM processed_entries WHERE stream = $1 AND entry_id = $2"
            }
            _ => "SELECT plugin_version FROM processed_entries WHERE stream = $1 AND entry_id = $2",
        };
        sqlx::query_scalar(sql)
            .bind(stream)
            .bind(entry_id)
            .fetch_optional(&self.pool)
            .await
            .expect("ledger query")
    }

    /// Waits until the ledger records `entry_id` as processed.
    pub async fn await_processed(&self, stream: &str, entry_id: &str) {
        eventually(&format!("{stream} entry {entry_id} processed"), || async {
            match self.ledger_outcome(stream, entry_id).await.as_deref() {
                Some("processed") => Some(()),
                Some(other) => {
                    panic!("{stream} entry {entry_id} ended as {other}, expected processed")
                }
                None => None,
            }
        })
        .await;
    }

    /// Creates a user, a post and media rows (the backend's job in production).
    pub async fn seed_media(&self, post_id: i64, media_ids: &[i64]) {
        sqlx::query(
            "INSERT INTO users (user_id, username) VALUES (1, 'author') ON CONFLICT DO NOTHING",
        )
        .execute(&self.pool)
        .await
        .expect("seed user");
        sqlx::query("INSERT INTO posts (post_id, author_id) VALUES ($1, 1) ON CONFLICT DO NOTHING")
            .bind(post_id)
            .execute(&self.pool)
            .await
            .expect("seed post");
        for media_id in media_ids {
            sqlx::query("INSERT INTO post_media (media_id, post_id, media_url) VALUES ($1, $2, 'https://cdn/x.jpg') ON CONFLICT DO NOTHING")
                .bind(media_id)
                .bind(post_id)
                .execute(&self.pool)
                .await
                .expect("seed media");
        }
    }

    /// Creates a user.
    pub async fn seed_user(&self, user_id: i64, username: &str) {
        sqlx::query("INSERT INTO users (user_id, username) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(user_id)
            .bind(username)
            .execute(&self.pool)
            .await
            .expect("seed user");
    }

    /// Stops the host and removes the database, the streams and the plugins directory.
    pub async fn finish(mut self) {
        if let Some(host) = self.host.take() {
            host.shutdown().await;
        }
        self.pool.close().await;
        remove_keys(&mut self.redis, &self.prefix).await;
        drop_database(&self.database).await;
        remove_files(&self.plugins_dir);
        self.cleaned = true;
    }
}

/// The longest a command a test runs may take (a plugin build included) before the test fails
/// and the command is killed: one hung command must not hang the suite.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// [`std::process::Command::output`] under [`COMMAND_DEADLINE`], for tests that are not async.
pub trait OutputByDeadline {
    /// Runs the command to completion with its output captured (stdin empty, as `output` has it);
    /// panics, killing the process, when it has not exited within [`COMMAND_DEADLINE`].
    fn output_by_deadline(&mut self) -> std::io::Result<std::process::Output>;

    /// The same with the standard streams as the caller set them up: only those set to
    /// `Stdio::piped()` are captured (say, stderr, while stdout goes into a closed pipe).
    fn finish_by_deadline(&mut self) -> std::io::Result<std::process::Output>;
}

impl OutputByDeadline for std::process::Command {
    fn output_by_deadline(&mut self) -> std::io::Result<std::process::Output> {
        use std::process::Stdio;
        self.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .finish_by_deadline()
    }

    fn finish_by_deadline(&mut self) -> std::io::Result<std::process::Output> {
        use std::io::Read;
        let mut child = self.spawn()?;
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() > COMMAND_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{self:?} did not finish within {COMMAND_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

/// Runs `command` to completion and returns its output, failing the test (and killing the
/// process) if it has not exited within [`DEADLINE`].
pub async fn output_within_deadline(command: &mut std::process::Command) -> std::process::Output {
    let dir = std::env::temp_dir().join(unique("kt_output"));
    std::fs::create_dir_all(&dir).expect("output directory");
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = HostProcess::spawn(
        command
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file")),
    );
    let status = await_exit(&mut child).await;
    let output = std::process::Output {
        status,
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: std::fs::read(&err).unwrap_or_default(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    output
}

/// Sends `signal` (e.g. `TERM`, `KILL`) to a child process.
pub fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

/// Waits (up to [`DEADLINE`]) for a child process to exit.
pub async fn await_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let child = std::sync::Mutex::new(child);
    eventually("the host process to exit", || {
        let exited = child.lock().unwrap().try_wait().unwrap();
        async move { exited }
    })
    .await
}

fn text(value: redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::SimpleString(s) => s,
        redis::Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

/// `GET path` from the host's HTTP endpoint at `addr`: the status and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The scripted mock plugin's stream: each entry's `action` field says what the handler does.
pub const SCRIPTED: &str = "scripted";

/// Publishes a harmless entry after a culprit and waits until it is stored: the stream goes on.
pub async fn stream_goes_on(env: &TestEnv) {
    let next = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "after")])
        .await;
    env.await_processed(SCRIPTED, &next).await;
}

/// A face-detection result with two faces for `media`.
pub fn detection(media: i64) -> Vec<(String, String)> {
    vec![
        ("mediaId".into(), media.to_string()),
        ("postId".into(), "1".into()),
        ("facesDetected".into(), "2".into()),
        (
            "faces".into(),
            format!(
                r#"[{{"faceId": "{media}-a", "bbox": [0, 0, 10, 10], "confidence": 0.9}}, {{"faceId": "{media}-b", "bbox": [20, 20, 40, 40], "confidence": 0.8}}]"#
            ),
        ),
        ("correlationId".into(), format!("c-{media}")),
    ]
}

/// Publishes `entries` of `stream` in chunks of 100 until the host `victim` (consumer `name`)
/// holds an entry, kills it with SIGKILL there, and publishes the rest: a kill that leaves the
/// others something to reclaim.
pub async fn kill_while_it_holds_entries(
    env: &TestEnv,
    stream: &str,
    victim: &mut HostProcess,
    name: &str,
    entries: &[Vec<(String, String)>],
) {
    let mut chunks = entries.chunks(100);
    let deadline = Instant::now() + DEADLINE;
    while env.pending_for(stream, name).await == 0 {
        assert!(Instant::now() < deadline, "{name} never held an entry");
        if let Some(chunk) = chunks.next() {
            env.publish_many(stream, chunk).await;
        }
        tokio::task::yield_now().await;
    }
    signal(victim, "KILL");
    await_exit(victim).await;
    for chunk in chunks {
        env.publish_many(stream, chunk).await;
    }
}
