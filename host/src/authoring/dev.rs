//! `plugin dev DIR`: the inner loop. Builds the project, deploys the component to the running
//! hosts (through the fleet's plugin store, as `plugin deploy` does) and shows what each host made
//! of it, then shows how the new entries of the plugin come out (processed, or dead-lettered with
//! the reason) — and starts again on every save.
//!
//! With `--shadow`, each build is rolled out as a shadow of the live version instead (see
//! [`crate::rollout`]): the hosts run it beside the live one on production entries, nothing of it
//! is written, and the loop prints how its outcomes differ, per table and column. Each save
//! replaces the session's shadow; Ctrl-C ends it.

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

/// Runs until interrupted; with `shadow`, deploys each build as a shadow rollout (ended when
/// interrupted) instead of as the live version.
pub async fn run(
    config: &Config,
    dir: &Path,
    deploy_timeout: Duration,
    shadow: bool,
) -> Result<()> {
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
    let mut session = Shadowing::default();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let deployed = if shadow {
            session.start(config, dir, deploy_timeout).await
        } else {
            build_and_deploy(config, dir, deploy_timeout).await
        };
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
                    match (&pool, &deployed) {
                        (Some(pool), Some(_)) if shadow => session.print_differences(pool).await,
                        (Some(pool), Some(name)) => since = print_outcomes(pool, name, since).await,
                        _ => {}
                    }
                }
                _ = &mut interrupted => {
                    session.end(config, "ended by plugin dev").await;
                    return Ok(());
                }
            }
        }
    }
}

/// Builds the project; the component, or nothing (the failure printed).
async fn build(dir: &Path) -> Option<std::path::PathBuf> {
    println!("building {}", dir.display());
    let project = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || super::build(&project)).await {
        Ok(Ok(file)) => Some(file),
        Ok(Err(error)) => {
            println!("build failed: {error:#}");
            None
        }
        Err(error) => {
            println!("build failed: {error}");
            None
        }
    }
}

/// Builds and deploys; returns the plugin's name when some host loaded it.
async fn build_and_deploy(config: &Config, dir: &Path, timeout: Duration) -> Option<String> {
    let file = build(dir).await?;
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

/// The shadow rollout a `plugin dev --shadow` session runs, and how much of its sample of
/// differences it has printed.
#[derive(Default)]
struct Shadowing {
    rollout: Option<i64>,
    shown: usize,
    compared: String,
}

impl Shadowing {
    /// Builds the project and rolls it out as a shadow, ending the session's previous one;
    /// returns the plugin's name when the hosts follow it.
    async fn start(&mut self, config: &Config, dir: &Path, timeout: Duration) -> Option<String> {
        let file = build(dir).await?;
        self.end(config, "replaced by a newer build from plugin dev")
            .await;
        let plan = crate::deploy::rollout::Plan {
            mode: crate::rollout::Mode::Shadow,
            percent: 100.0,
            key_field: Some("mediaId".to_string()),
            thresholds: Default::default(),
        };
        match crate::deploy::rollout::start(config, &file, &plan, timeout).await {
            Ok(changed) => {
                println!("started {}", changed.rollout.summary());
                print!("{}", changed.report());
                self.rollout = Some(changed.rollout.id);
                self.shown = 0;
                self.compared.clear();
                changed.ok().then(|| changed.rollout.plugin.clone())
            }
            Err(error) => {
                println!("shadow not started: {error:#}");
                None
            }
        }
    }

    /// Ends the session's shadow, if it runs (the live version goes on alone).
    async fn end(&mut self, config: &Config, why: &str) {
        let Some(id) = self.rollout.take() else {
            return;
        };
        let fleet = crate::persist::plugin_store::fleet(config);
        let ended = async {
            let pool =
                crate::persist::connect_existing(&config.database_url, &config.database_timeouts)
                    .await?;
            let ended = crate::persist::rollouts::finish(&pool, &fleet, id, "aborted", why).await;
            pool.close().await;
            ended
        };
        match ended.await {
            Ok(_) => println!("ended shadow rollout {id} ({why})"),
            Err(error) => println!(
                "could not end shadow rollout {id}: {error:#} (`kaleidoscope rollout abort` ends it)"
            ),
        }
    }

    /// Prints the differences sampled since the last look, and the counts when they changed.
    async fn print_differences(&mut self, pool: &sqlx::PgPool) {
        use crate::persist::rollouts;
        let Some(id) = self.rollout else { return };
        let limit = crate::delivery::DIFFERENCES_KEPT;
        let differences = rollouts::differences(pool, id, limit)
            .await
            .unwrap_or_default();
        for d in differences.iter().skip(self.shown) {
            for line in crate::rollout::diff::render(
                &d.stream,
                &d.entry_id,
                &d.verdict,
                &d.live,
                &d.candidate,
            ) {
                println!("{line}");
            }
        }
        self.shown = self.shown.max(differences.len());
        let tallies = rollouts::tallies(pool, &[id]).await.unwrap_or_default();
        let compared = crate::status::rollouts::compared(&tallies);
        if !compared.is_empty() && compared != self.compared {
            println!("compared with the live version so far: {compared}");
            self.compared = compared;
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
