//! Watching the plugins directory, so a dropped-in, replaced or deleted `.wasm` file is noticed
//! without a restart — and the configuration file and the operator's migrations directory, so a
//! changed grant or a new table is too.

use anyhow::{Context, Result};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Starts watching `dir` (and `config_file` and `migrations_dir`, when given). Every create,
/// modify, rename or remove of a `*.wasm` file, of the configuration file or of a `*.sql` file
/// sends a unit on the returned channel (many per change; the receiver debounces). Keep the
/// watcher alive for as long as events are wanted.
pub fn watch(
    dir: &Path,
    config_file: Option<&Path>,
    migrations_dir: Option<&Path>,
) -> Result<(RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    // Editors replace a file by renaming a new one over it: watch its directory, match its name.
    let config_file: Option<PathBuf> =
        config_file.map(|f| std::path::absolute(f).unwrap_or_else(|_| f.to_path_buf()));
    let config_name = config_file
        .as_ref()
        .and_then(|f| f.file_name().map(|n| n.to_os_string()));
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) => {
                let relevant = !matches!(event.kind, EventKind::Access(_))
                    && event.paths.iter().any(|p| {
                        p.extension()
                            .is_some_and(|ext| ext == "wasm" || ext == "sql")
                            || (config_name.is_some() && p.file_name() == config_name.as_deref())
                    });
                if relevant {
                    let _ = tx.send(());
                }
            }
            Err(error) => tracing::warn!("plugin directory watch error: {error}"),
        })
        .context("cannot create a file watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch the plugins directory {}", dir.display()))?;
    if let Some(parent) = config_file.as_deref().and_then(Path::parent) {
        watcher
            .watch(parent, RecursiveMode::NonRecursive)
            .with_context(|| {
                format!(
                    "cannot watch the configuration file's directory {}",
                    parent.display()
                )
            })?;
    }
    if let Some(migrations) = migrations_dir {
        watcher
            .watch(migrations, RecursiveMode::NonRecursive)
            .with_context(|| {
                format!(
                    "cannot watch the migrations directory {}",
                    migrations.display()
                )
            })?;
    }
    Ok((watcher, rx))
}
