//! Watching the plugins directory, so a dropped-in, replaced or deleted `.wasm` file is noticed
//! without a restart.

use anyhow::{Context, Result};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::path::Path;
use tokio::sync::mpsc;

/// Starts watching `dir`. Every create, modify, rename or remove of a `*.wasm` file sends a unit
/// on the returned channel (many per change; the receiver debounces). Keep the watcher alive for
/// as long as events are wanted.
pub fn watch(dir: &Path) -> Result<(RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) => {
                let relevant = !matches!(event.kind, EventKind::Access(_))
                    && event
                        .paths
                        .iter()
                        .any(|p| p.extension().is_some_and(|ext| ext == "wasm"));
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
    Ok((watcher, rx))
}
