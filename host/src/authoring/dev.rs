//! `plugin dev DIR`: the inner loop. Builds the project, deploys the component to the running
//! hosts (through the fleet's plugin store, as `plugin deploy` does) and shows what each host made
//! of it, then shows how the new entries of the plugin come out (processed, or dead-lettered with
//! the reason) — and starts again on every save.

use crate::config::Config;
use anyhow::{Context, Result};
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a burst of file events (an editor's save) is let settle before rebuilding.
const SETTLE: Duration = Duration::from_millis(300);
/// How often new outcomes are looked for.
const OUTCOMES_EVERY: Duration = Duration::from_secs(1);
/// The most outcome lines printed per look, so a backlog does not flood the terminal.
const OUTCOME_LINES: i64 = 20;

/// Runs until interrupted.
pub async fn run(config: &Config, dir: &Path, deploy_timeout: Duration) -> Result<()> {
    let (_watcher, mut changes) = watch_sources(dir)?;
    let pool = crate::persist::connect_existing(&config.database_url, &config.database_timeouts)
        .await
        .ok();
    if pool.is_none() {
        println!(
            "(cannot reach {}: entry outcomes will not be shown)",
            crate::text::redact(&config.database_url)
        );
    }
    loop {
        let deployed = build_and_deploy(config, dir, deploy_timeout).await;
        // The sources as built (after the build: cargo itself rewrites `Cargo.lock` when the
        // version changes). Events that leave them so — the build's own writes, an editor
        // touching a file — do not start another build.
        let mut built_from = fingerprint(dir);
        let mut since = database_now(pool.as_ref()).await;
        println!("watching {} for changes (Ctrl-C to stop)", dir.display());
        loop {
            tokio::select! {
                changed = changes.recv() => {
                    changed.context("the file watcher stopped")?;
                    // Let the burst of events of one save settle.
                    tokio::time::sleep(SETTLE).await;
                    while changes.try_recv().is_ok() {}
                    let now = fingerprint(dir);
                    if now != built_from {
                        break;
                    }
                    built_from = now;
                }
                _ = tokio::time::sleep(OUTCOMES_EVERY) => {
                    if let (Some(pool), Some(name)) = (&pool, &deployed) {
                        since = print_outcomes(pool, name, since).await;
                    }
                }
            }
        }
    }
}

/// Builds and deploys; returns the plugin's name when some host loaded it.
async fn build_and_deploy(config: &Config, dir: &Path, timeout: Duration) -> Option<String> {
    println!("building {}", dir.display());
    let project = dir.to_path_buf();
    let built = tokio::task::spawn_blocking(move || super::build(&project)).await;
    let file = match built {
        Ok(Ok(file)) => file,
        Ok(Err(error)) => {
            println!("build failed: {error:#}");
            return None;
        }
        Err(error) => {
            println!("build failed: {error}");
            return None;
        }
    };
    match crate::deploy::deploy(config, &file, timeout).await {
        Ok(deployed) => {
            println!(
                "deployed {} {} (build {})",
                deployed.name,
                deployed.version,
                crate::plugin::build_of(&deployed.sha256)
            );
            print!("{}", deployed.report(config));
            deployed.ok().then_some(deployed.name)
        }
        Err(error) => {
            println!("deploy failed: {error:#}");
            None
        }
    }
}

/// The database's clock (the ledger's), or nothing without a database.
async fn database_now(pool: Option<&sqlx::PgPool>) -> Option<String> {
    let pool = pool?;
    sqlx::query_scalar("SELECT now()::text")
        .fetch_one(pool)
        .await
        .ok()
}

/// Prints the ledger's outcomes for `plugin` after `since`; returns the new `since`.
async fn print_outcomes(
    pool: &sqlx::PgPool,
    plugin: &str,
    since: Option<String>,
) -> Option<String> {
    let since = since?;
    let rows: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT stream, entry_id, plugin_version || COALESCE(' build ' || plugin_build, ''), outcome, processed_at::text FROM processed_entries
          WHERE plugin = $1 AND processed_at > $2::timestamptz ORDER BY processed_at LIMIT $3",
    )
    .bind(plugin)
    .bind(&since)
    .bind(OUTCOME_LINES)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let mut latest = since;
    for (stream, entry_id, version, outcome, at) in rows {
        let dead_lettered = crate::persist::ledger::Outcome::parse(&outcome)
            == Some(crate::persist::ledger::Outcome::DeadLettered);
        let hint = if dead_lettered {
            format!("  (kaleidoscope dlq list --stream {stream})")
        } else {
            String::new()
        };
        println!("{stream} {entry_id}: {outcome} by {plugin}@{version}{hint}");
        latest = at;
    }
    Some(latest)
}

/// A hash of the sources' names, sizes and modification times.
fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let files: Vec<_> = super::build::source_files(dir)
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            let size = meta.as_ref().map(|m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (path, size, modified)
        })
        .collect();
    files.hash(&mut hasher);
    hasher.finish()
}

/// Watches the project's sources: every change outside `target/`, `.venv/`, `__pycache__/` and
/// `.git/` sends a unit.
fn watch_sources(dir: &Path) -> Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let ignored =
        move |path: &Path| super::build::not_a_source(path.strip_prefix(&root).unwrap_or(path));
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !matches!(event.kind, EventKind::Access(_))
            && event.paths.iter().any(|p| !ignored(p))
        {
            let _ = tx.send(());
        }
    })
    .context("cannot create a file watcher")?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok((watcher, rx))
}
