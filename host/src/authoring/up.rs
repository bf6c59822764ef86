//! `plugin up DIR`: the author's whole loop from an empty shell, like `spin up` or `wash dev`. A
//! host of the project's own runs in this process — its database (`kaleidoscope_dev_<project>`
//! on the configured server) and stream prefix (`dev:<project>:`) made for it, the project's
//! migrations and its `kaleidoscope.toml` grants applied — and `plugin dev` builds and deploys the
//! project into it on every save. Once the plugin serves, the `XADD` to try is printed, with the
//! project's first recorded entry.
//!
//! Nothing of an operator's deployment is touched: another database, another prefix, no HTTP
//! port.

use crate::config::{Config, Key};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The settings of the project's own host: `env` as given (where Redis and PostgreSQL are, a
/// cache directory), the project's `kaleidoscope.toml` (its grants), and the project's own
/// database, prefix, plugins and migrations directories.
pub fn config(dir: &Path, env: &BTreeMap<String, String>) -> Result<Config> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot find the project {}", dir.display()))?;
    let project = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let file = Some(dir.join("kaleidoscope.toml")).filter(|f| f.is_file());
    let base = Config::from_sources(file.as_deref(), env, &BTreeMap::new())?;
    let database = format!(
        "kaleidoscope_dev_{}",
        project
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            })
            .collect::<String>()
    );
    let own = dir.join("target/kaleidoscope-up");
    let mut flags = BTreeMap::from([
        (
            Key::DatabaseUrl,
            crate::persist::with_database(&base.database_url, &database),
        ),
        (Key::StreamPrefix, format!("dev:{project}:")),
        (Key::PluginsDir, own.join("plugins").display().to_string()),
        (
            Key::MigrationsDir,
            dir.join("migrations").display().to_string(),
        ),
        (Key::ConsumerName, "up".to_string()),
        (Key::HttpAddr, String::new()),
    ]);
    if !env.contains_key("KALEIDOSCOPE_CACHE_DIR") {
        flags.insert(Key::CacheDir, own.join("cache").display().to_string());
    }
    std::fs::create_dir_all(own.join("plugins"))
        .with_context(|| format!("cannot create {}", own.display()))?;
    std::fs::create_dir_all(dir.join("migrations"))
        .with_context(|| format!("cannot create {}", dir.join("migrations").display()))?;
    Config::from_sources(file.as_deref(), env, &flags)
}

/// Runs the project's host and `plugin dev` on it until `stop` completes.
pub async fn run(
    config: Config,
    dir: &Path,
    deploy_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    println!(
        "starting a host of its own for {}: database {}, stream prefix {:?}",
        dir.display(),
        crate::text::redact(&config.database_url),
        config.stream_prefix
    );
    let host = crate::host::RunningHost::start(config.clone())
        .await
        .context("the project's host did not start")?;
    let registry = host.state().registry.clone();
    let try_it = async {
        let plugin = loop {
            if let Some(plugin) = registry.snapshot().plugins().first().cloned() {
                break plugin;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let fields = first_recorded_entry(dir);
        println!("try it:");
        for stream in &plugin.streams {
            println!(
                "  redis-cli -u {} XADD '{}{stream}' '*' {}",
                config.redis_url, config.stream_prefix, fields
            );
        }
        println!(
            "  psql {} -c \"SELECT * FROM processed_entries ORDER BY processed_at DESC LIMIT 5\"",
            crate::text::redact(&config.database_url)
        );
        std::future::pending::<()>().await
    };
    let outcome = tokio::select! {
        outcome = super::dev::run(&config, dir, deploy_timeout, false) => outcome,
        () = try_it => Ok(()),
        () = stop => Ok(()),
    };
    host.shutdown().await;
    outcome
}

/// The fields of the project's first recorded entry (`tests/*.jsonl`), as `name value` pairs
/// quoted for a shell; an example pair when there is none.
fn first_recorded_entry(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tests"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "jsonl")
                && !p.to_string_lossy().ends_with(".expected.jsonl")
        })
        .collect();
    files.sort();
    let first = files
        .first()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|text| {
            text.lines()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        });
    let pairs: Vec<String> = first
        .as_ref()
        .and_then(|entry| entry["fields"].as_object())
        .map(|fields| {
            fields
                .iter()
                .map(|(name, value)| {
                    let value = value.as_str().map_or(value.to_string(), str::to_string);
                    format!("{} {}", quoted(name), quoted(&value))
                })
                .collect()
        })
        .unwrap_or_default();
    if pairs.is_empty() {
        "field value".to_string()
    } else {
        pairs.join(" ")
    }
}

/// `text` quoted for a POSIX shell.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
