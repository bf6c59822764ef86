//! The set of loaded plugins, and which plugin handles which stream.
//!
//! The whole set is an immutable snapshot behind one lock: a batch takes the snapshot (an `Arc`)
//! when it starts and keeps using that plugin version until it finishes, while a reload builds a
//! new snapshot and swaps it in atomically. Readers never wait for a compile.

use super::runtime::{Plugin, PluginRuntime};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// A plugin file that could not be loaded, and why.
#[derive(Clone, Debug)]
pub struct LoadFailure {
    /// The file.
    pub file: PathBuf,
    /// The reason, with its causes.
    pub reason: String,
}

/// An immutable snapshot of the loaded plugins.
#[derive(Default, Debug)]
pub struct PluginSet {
    by_stream: BTreeMap<String, Arc<Plugin>>,
    plugins: Vec<Arc<Plugin>>,
    failures: Vec<LoadFailure>,
}

impl PluginSet {
    /// The plugin that handles `stream` (a logical stream name), if any.
    pub fn for_stream(&self, stream: &str) -> Option<Arc<Plugin>> {
        self.by_stream.get(stream).cloned()
    }

    /// Every stream some loaded plugin declares.
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.by_stream.keys().map(String::as_str)
    }

    /// The loaded plugins, in file-name order.
    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    /// The files that failed to load.
    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    /// Adds `plugin` unless its name or one of its streams is already taken.
    pub fn insert(&mut self, plugin: Plugin) -> Result<(), LoadFailure> {
        let clash = |reason: String| LoadFailure {
            file: plugin.file.clone(),
            reason,
        };
        if let Some(other) = self.plugins.iter().find(|p| p.name == plugin.name) {
            return Err(clash(format!(
                "plugin name {:?} is already used by {}",
                plugin.name,
                other.file.display()
            )));
        }
        for stream in &plugin.streams {
            if let Some(other) = self.by_stream.get(stream) {
                return Err(clash(format!(
                    "stream {stream:?} is already handled by plugin {:?} ({})",
                    other.name,
                    other.file.display()
                )));
            }
        }
        let plugin = Arc::new(plugin);
        for stream in &plugin.streams {
            self.by_stream.insert(stream.clone(), plugin.clone());
        }
        self.plugins.push(plugin);
        Ok(())
    }

    /// Records a file that failed to load.
    pub fn record_failure(&mut self, failure: LoadFailure) {
        self.failures.push(failure);
    }

    /// Loads every `*.wasm` file of `dir` in name order. A file that fails is recorded (and
    /// logged) and the others still load. Blocking: compiles components.
    pub fn load_dir(runtime: &PluginRuntime, dir: &Path) -> Result<PluginSet> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the plugins directory {}: {e} (build the plugins with ./scripts/build-plugins, or set KALEIDOSCOPE_PLUGINS_DIR)",
                    dir.display()
                )
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
            .collect();
        files.sort();

        let mut set = PluginSet::default();
        for file in files {
            let outcome = runtime
                .load(&file)
                .map_err(|error| LoadFailure {
                    file: file.clone(),
                    reason: format!("{error:#}"),
                })
                .and_then(|plugin| {
                    let summary = format!(
                        "{}@{} streams={:?} compiled in {:?}",
                        plugin.name, plugin.version, plugin.streams, plugin.compile_time
                    );
                    set.insert(plugin).map(|()| summary)
                });
            match outcome {
                Ok(summary) => tracing::info!(file = %file.display(), "loaded plugin {summary}"),
                Err(failure) => {
                    tracing::error!(file = %failure.file.display(), reason = %failure.reason, "plugin failed to load");
                    set.record_failure(failure);
                }
            }
        }
        Ok(set)
    }
}

/// The current [`PluginSet`], replaceable as a whole.
#[derive(Default)]
pub struct PluginRegistry {
    current: RwLock<Arc<PluginSet>>,
}

impl PluginRegistry {
    /// A registry serving `set`.
    pub fn new(set: PluginSet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// The current snapshot; hold it for the duration of one batch.
    pub fn snapshot(&self) -> Arc<PluginSet> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the snapshot; batches already holding the old one finish on it.
    pub fn replace(&self, set: PluginSet) {
        let set = Arc::new(set);
        match self.current.write() {
            Ok(mut guard) => *guard = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }
}
