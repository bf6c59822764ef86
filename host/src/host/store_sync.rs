//! Keeping this host's plugins directory in step with the fleet's plugin store
//! ([`crate::persist::plugin_store`]): every deployed plugin is written into the directory as
//! `<name>.wasm` (atomically: see [`crate::plugin::write_atomically`]), a plugin removed from
//! the store is removed from it, and the usual rescan loads what changed. So every host of the
//! fleet runs the store's builds whatever its directory held, and one started later has them
//! before it loads anything.
//!
//! Files the store did not write are left alone (single-machine use and development drop files
//! in by hand), except another file holding a deployed plugin's name (a cargo-named build
//! `my_plugin.wasm`, an older copy): the deployed build replaces the plugin of that name.

use crate::persist::plugin_store::{self, Stored};
use crate::plugin::PluginSet;
use anyhow::{Context, Result};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How often a running host reads the store besides when a deploy announces a change (see
/// [`plugin_store::CHANGES`]): the bound on how late a host can be when an announcement was
/// missed (its listening connection was being re-established).
pub(super) const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// A deployed build as written into the directory: its SHA-256 and deploy time, and the file's
/// modification time after writing, so a file changed by hand is noticed (and replaced: the
/// store decides what runs under its names) without hashing every file every round.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    sha256: String,
    deployed_at: String,
    modified: Option<std::time::SystemTime>,
    streams: Vec<String>,
}

/// What one round of [`StoreSync::sync`] did.
#[derive(Debug, Default)]
pub(super) struct Synced {
    /// The plugins directory changed: a reload is due.
    pub(super) changed: bool,
    /// The streams of plugins the store no longer has (removed, or a refused deploy undone).
    pub(super) removed_streams: Vec<String>,
}

/// What this host last wrote from the store.
pub(super) struct StoreSync {
    fleet: String,
    dir: PathBuf,
    /// Plugin name → the build last written for it.
    written: Mutex<BTreeMap<String, Written>>,
    /// One round at a time (an announced deploy and the periodic round may coincide).
    round: tokio::sync::Mutex<()>,
}

impl StoreSync {
    /// The fleet whose store this host follows.
    pub(super) fn fleet(&self) -> &str {
        &self.fleet
    }

    pub(super) fn new(fleet: String, dir: PathBuf) -> StoreSync {
        StoreSync {
            fleet,
            dir,
            written: Mutex::new(BTreeMap::new()),
            round: tokio::sync::Mutex::new(()),
        }
    }

    /// The files of deployed plugins: they win a stream or name over files dropped in by hand
    /// (see [`PluginSet::rescan`]).
    pub(super) fn files(&self) -> BTreeSet<PathBuf> {
        self.written()
            .keys()
            .map(|name| self.file_of(name))
            .collect()
    }

    fn written(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Written>> {
        match self.written.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    /// One round: writes what the store deployed since the last round, removes what it no
    /// longer has, and removes other files holding a deployed plugin's name (`serving` says
    /// which file holds which plugin).
    pub(super) async fn sync(&self, pool: &PgPool, serving: &PluginSet) -> Result<Synced> {
        let _one_at_a_time = self.round.lock().await;
        let stored = plugin_store::list(pool, &self.fleet).await?;
        let before = self.written().clone();
        let mut changed = false;
        for plugin in &stored {
            let target = self.file_of(&plugin.name);
            let last = before.get(&plugin.name);
            let unchanged = last.is_some_and(|last| {
                last.sha256 == plugin.sha256
                    && last.deployed_at == plugin.deployed_at
                    && last.modified.is_some()
                    && last.modified == modified(&target)
            });
            if !unchanged {
                // New to this host or deployed again: rescan even when the file already held
                // the bytes, so the deploy gets its answer at once (and a refused file is tried
                // again).
                self.write(pool, plugin, &target, last.is_some()).await?;
                changed = true;
                self.written().insert(
                    plugin.name.clone(),
                    Written {
                        sha256: plugin.sha256.clone(),
                        deployed_at: plugin.deployed_at.clone(),
                        modified: modified(&target),
                        streams: plugin.streams.clone(),
                    },
                );
            }
            changed |= self.remove_other_copies(plugin, &target, serving);
        }
        let mut removed_streams = Vec::new();
        for (
            name,
            Written {
                sha256, streams, ..
            },
        ) in &before
        {
            if stored.iter().any(|p| &p.name == name) {
                continue;
            }
            self.written().remove(name);
            removed_streams.extend(streams.iter().cloned());
            let file = self.file_of(name);
            // Only the build the store wrote: a file put there by hand since stays.
            if file_sha256(&file).as_deref() == Some(sha256.as_str()) {
                remove(
                    &file,
                    &format!("plugin {name} was removed from the plugin store"),
                );
                changed = true;
            }
        }
        Ok(Synced {
            changed,
            removed_streams,
        })
    }

    /// Writes `plugin`'s deployed build to `target` unless (on this host's first sight of it)
    /// the file there already holds it. A build seen before is written again even when its bytes
    /// are the same: a redeploy tries a refused file again (its modification time changes).
    async fn write(
        &self,
        pool: &PgPool,
        plugin: &Stored,
        target: &Path,
        seen_before: bool,
    ) -> Result<()> {
        if !seen_before && file_sha256(target).as_deref() == Some(plugin.sha256.as_str()) {
            return Ok(());
        }
        let Some(bytes) =
            plugin_store::bytes(pool, &self.fleet, &plugin.name, &plugin.sha256).await?
        else {
            // Replaced since the list was read: the next round writes the newer one.
            return Ok(());
        };
        std::fs::create_dir_all(&self.dir).with_context(|| {
            format!("cannot create the plugins directory {}", self.dir.display())
        })?;
        crate::plugin::write_atomically(target, &bytes)
            .with_context(|| format!("cannot write {}", target.display()))?;
        tracing::info!(file = %target.display(), plugin = %plugin.name, version = %plugin.version,
            build = %crate::plugin::build_of(&plugin.sha256), deployed_by = %plugin.deployed_by,
            "wrote plugin {}@{} from the plugin store", plugin.name, plugin.version);
        Ok(())
    }

    /// Removes files other than `target` that hold `plugin` (by the loaded set, or by cargo's
    /// name for its build). Returns whether any went.
    fn remove_other_copies(&self, plugin: &Stored, target: &Path, serving: &PluginSet) -> bool {
        let cargo_named = self.file_of(&plugin.name.replace('-', "_"));
        let mut others: BTreeSet<PathBuf> = serving
            .plugins()
            .iter()
            .filter(|p| p.name == plugin.name && p.file != target)
            .map(|p| p.file.clone())
            .collect();
        if cargo_named != target && cargo_named.exists() {
            others.insert(cargo_named);
        }
        for file in &others {
            remove(
                file,
                &format!(
                    "the plugin store deploys {} as {}",
                    plugin.name,
                    target.display()
                ),
            );
        }
        !others.is_empty()
    }
}

/// When a file was last written, if it can be read.
fn modified(file: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
}

/// The SHA-256 of a file's content, if it can be read.
fn file_sha256(file: &Path) -> Option<String> {
    std::fs::read(file)
        .ok()
        .map(|bytes| crate::plugin::sha256_hex(&bytes))
}

/// Removes a plugin file, saying why (a file that cannot be removed is reported, not fatal).
fn remove(file: &Path, why: &str) {
    match std::fs::remove_file(file) {
        Ok(()) => tracing::info!(file = %file.display(), "removed plugin file: {why}"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::error!(file = %file.display(), "cannot remove plugin file ({why}): {error}")
        }
    }
}
