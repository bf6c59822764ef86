//! The set of loaded plugins, and which plugin handles which stream.
//!
//! The whole set is an immutable snapshot behind one lock: a batch takes the snapshot (an `Arc`)
//! when it starts and keeps using that plugin version until it finishes, while a reload builds a
//! new snapshot and swaps it in atomically. Readers never wait for a compile.

use super::{Plugin, PluginRuntime, SandboxLimits};
use crate::logging::List;
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The largest plugin file the host will load.
pub const MAX_PLUGIN_BYTES: usize = 64 << 20;

/// A plugin file that could not be loaded, and why.
#[derive(Clone, Debug)]
pub struct LoadFailure {
    /// The file.
    pub file: PathBuf,
    /// The reason, with its causes.
    pub reason: String,
    /// SHA-256 of the file's content when it was read, so an unchanged broken file is not
    /// retried on every scan.
    pub sha256: Option<String>,
    /// When the file was last written, as read with it: a file written again (a redeploy of the
    /// same bytes, a `touch`) is tried again, whatever its content.
    pub modified: Option<std::time::SystemTime>,
    /// The file loaded, but its name or a stream of it was taken by another plugin. Such a
    /// failure depends on the rest of the set, not on the file, so it is tried again at every
    /// scan: once the other plugin is gone, it loads.
    pub clash: bool,
}

impl LoadFailure {
    /// Whether this failure can be reported again for the file as it is now (its content
    /// `sha256`, written at `modified`) without trying it: only a failure of the file itself, of
    /// the same bytes, not written since.
    fn still_holds(&self, sha256: Option<&str>, modified: Option<std::time::SystemTime>) -> bool {
        !self.clash
            && self.sha256.is_some()
            && self.sha256.as_deref() == sha256
            && self.modified.is_some()
            && self.modified == modified
    }
}

/// An immutable snapshot of the loaded plugins.
#[derive(Default, Debug)]
pub struct PluginSet {
    by_stream: BTreeMap<String, Arc<Plugin>>,
    plugins: Vec<Arc<Plugin>>,
    failures: Vec<LoadFailure>,
    /// When the scan that made this set began: every file in place by then was seen by it. How
    /// `plugin deploy` tells an answer about its file from an older one.
    scanned_at: Option<std::time::SystemTime>,
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

    /// The files that failed to load (the previous version of such a file, if any, is still
    /// serving).
    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    /// When the scan that made this set began (`None` for a set no scan made).
    pub fn scanned_at(&self) -> Option<std::time::SystemTime> {
        self.scanned_at
    }

    fn loaded_from(&self, file: &Path) -> Option<&Arc<Plugin>> {
        self.plugins.iter().find(|p| p.file == file)
    }

    /// Adds `plugin` unless its name or one of its streams is already taken.
    pub fn insert(&mut self, plugin: Arc<Plugin>) -> Result<(), LoadFailure> {
        let clash = |reason: String| LoadFailure {
            file: plugin.file.clone(),
            reason,
            sha256: Some(plugin.sha256.clone()),
            modified: None,
            clash: true,
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
        for stream in &plugin.streams {
            self.by_stream.insert(stream.clone(), plugin.clone());
        }
        self.plugins.push(plugin);
        self.plugins.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(())
    }

    fn fail(&mut self, failure: LoadFailure) {
        tracing::error!(file = %failure.file.display(), reason = %failure.reason, "plugin failed to load; the previous version (if any) keeps serving");
        self.failures.push(failure);
    }

    /// Loads every `*.wasm` file of `dir`. Blocking: compiles components.
    pub fn load_dir(
        runtime: &PluginRuntime,
        dir: &Path,
        preferred: &BTreeSet<PathBuf>,
        limits_for: &dyn Fn(&str) -> SandboxLimits,
    ) -> Result<PluginSet> {
        Self::rescan(runtime, dir, &PluginSet::default(), preferred, limits_for)
    }

    /// The set that should serve after the files in `dir` changed, given the `current` one:
    /// unchanged files keep their loaded plugin (no recompilation), new and changed files are
    /// loaded and validated, removed files are unloaded. A file that fails any check is recorded
    /// with the reason, and its previous version, if any, keeps serving. Blocking.
    ///
    /// Who gets a stream (or a plugin name) two files claim is never decided by file order: a
    /// plugin serving it keeps it; else a `preferred` file (one the fleet's plugin store
    /// deployed) gets it; else none of the new claimants does, each refused naming the others,
    /// until one is removed. So a restart cannot hand a stream to a plugin that was refused it.
    pub fn rescan(
        runtime: &PluginRuntime,
        dir: &Path,
        current: &PluginSet,
        preferred: &BTreeSet<PathBuf>,
        limits_for: &dyn Fn(&str) -> SandboxLimits,
    ) -> Result<PluginSet> {
        let mut next = PluginSet {
            scanned_at: Some(std::time::SystemTime::now()),
            ..PluginSet::default()
        };
        // Unchanged files first, so a new file can never take a stream from a serving plugin.
        let changed = next.keep_unchanged(runtime, dir, current, limits_for)?;
        let loaded = changed
            .into_iter()
            .map(|change| load_change(runtime, current, change, limits_for))
            .collect();
        next.admit(loaded, current, preferred);
        for old in &current.plugins {
            if next.loaded_from(&old.file).is_none() && !old.file.exists() {
                tracing::info!(file = %old.file.display(), plugin = %old.name, version = %old.version,
                    streams = %List(&old.streams), "unloaded plugin {}@{} (file removed); its streams wait in Redis", old.name, old.version);
            }
        }
        Ok(next)
    }

    /// Puts the plugins of `dir`'s files that `current` serves unchanged into this set; returns
    /// the other files (new, changed or unreadable) with what was read of them.
    fn keep_unchanged(
        &mut self,
        runtime: &PluginRuntime,
        dir: &Path,
        current: &PluginSet,
        limits_for: &dyn Fn(&str) -> SandboxLimits,
    ) -> Result<Vec<Change>> {
        let mut changed = Vec::new();
        for file in wasm_files(dir)? {
            let modified = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
            let bytes = match read_limited(&file) {
                Ok(bytes) => bytes,
                Err(reason) => {
                    changed.push((file, Err(reason), None, modified));
                    continue;
                }
            };
            let sha256 = super::sha256_hex(&bytes);
            match current.loaded_from(&file) {
                Some(old) if old.sha256 == sha256 => {
                    let plugin = with_current_limits(runtime, old, limits_for(&old.name));
                    match self.insert(plugin) {
                        Err(failure) => self.fail(failure),
                        // The file failed before (a broken build over it) and holds the serving
                        // build again: say the failure is over, as a new load would.
                        Ok(()) if current.failures.iter().any(|f| f.file == file) => {
                            tracing::info!(file = %file.display(), plugin = %old.name, version = %old.version,
                                build = %old.build(), "plugin file repaired: it holds the build that serves again");
                        }
                        Ok(()) => {}
                    }
                }
                _ => changed.push((file, Ok(bytes), Some(sha256), modified)),
            }
        }
        Ok(changed)
    }

    /// Adds the new and changed plugins that may serve: the fleet's deployed builds first, then
    /// new versions of serving files (so a new file cannot take their streams), then new files;
    /// stable, otherwise in file-name order, which decides nothing (see `contested`). A plugin
    /// that may not is recorded as a failure, and the version it would have replaced keeps
    /// serving.
    fn admit(
        &mut self,
        mut loaded: Vec<Loaded>,
        current: &PluginSet,
        preferred: &BTreeSet<PathBuf>,
    ) {
        loaded.sort_by_key(|(file, old, _)| (!preferred.contains(file), old.is_none()));
        let contested = contested(&loaded, current, preferred);
        for (file, old, outcome) in loaded {
            let outcome = outcome.and_then(|plugin| match contested.get(&file) {
                Some(reason) => Err(LoadFailure {
                    file: file.clone(),
                    reason: reason.clone(),
                    sha256: Some(plugin.sha256.clone()),
                    modified: None,
                    clash: true,
                }),
                None => self.insert(plugin.clone()).map(|()| plugin),
            });
            match outcome {
                Ok(plugin) => log_loaded(old.as_deref(), &plugin),
                Err(failure) => {
                    if known_failure_reported(current, &failure) {
                        self.failures.push(failure);
                    } else {
                        self.fail(failure);
                    }
                    if let Some(old) = old
                        && let Err(clash) = self.insert(old)
                    {
                        self.fail(clash);
                    }
                }
            }
        }
    }
}

/// A file of the plugins directory that is not served unchanged: its path, its bytes (or why they
/// could not be read), their SHA-256 and the file's modification time.
type Change = (
    PathBuf,
    Result<Vec<u8>, String>,
    Option<String>,
    Option<std::time::SystemTime>,
);

/// Loads a changed file (`current` says what it replaces), unless it failed before on its own
/// and was not written since: that failure is reported again without recompiling.
fn load_change(
    runtime: &PluginRuntime,
    current: &PluginSet,
    (file, bytes, sha256, modified): Change,
    limits_for: &dyn Fn(&str) -> SandboxLimits,
) -> Loaded {
    let old = current.loaded_from(&file).cloned();
    let known_failure = current
        .failures
        .iter()
        .find(|f| f.file == file && f.still_holds(sha256.as_deref(), modified));
    let outcome = match (known_failure, bytes) {
        (Some(failure), _) => Err(failure.clone()),
        (None, Err(reason)) => Err(LoadFailure {
            file: file.clone(),
            reason,
            sha256,
            modified,
            clash: false,
        }),
        (None, Ok(bytes)) => load_changed(runtime, &bytes, sha256, modified, &file, limits_for),
    };
    (file, old, outcome)
}

/// An unchanged plugin with the limits the configuration gives it now (`wanted`, as far as the
/// runtime can honour them): itself when they are the same, else a copy with the new limits.
fn with_current_limits(
    runtime: &PluginRuntime,
    old: &Arc<Plugin>,
    wanted: SandboxLimits,
) -> Arc<Plugin> {
    if old.limits() == runtime.fit(wanted) {
        return old.clone();
    }
    let limits = runtime.apply_limits(&old.name, wanted);
    tracing::info!(
        plugin = old.name,
        timeout_ms = limits.call_timeout.as_millis() as u64,
        memory_mib = limits.memory_bytes >> 20,
        "plugin limits changed"
    );
    Arc::new(old.with_limits(limits))
}

/// A new or changed plugin's outcome in a rescan: its file, the version it replaces, and the
/// plugin or why it did not load.
type Loaded = (
    PathBuf,
    Option<Arc<Plugin>>,
    Result<Arc<Plugin>, LoadFailure>,
);

/// The new plugins of a rescan refused because another new one claims the same stream or name
/// and neither is `preferred` nor served by anyone (`current`): file → reason. Picking one
/// would let file-name order decide what serves production.
fn contested(
    loaded: &[Loaded],
    current: &PluginSet,
    preferred: &BTreeSet<PathBuf>,
) -> BTreeMap<PathBuf, String> {
    let served = |stream: &str| current.by_stream.contains_key(stream);
    let decided_stream = |stream: &str| {
        loaded.iter().any(|(file, _, outcome)| {
            preferred.contains(file)
                && outcome
                    .as_ref()
                    .is_ok_and(|p| p.streams.iter().any(|s| s == stream))
        })
    };
    let candidates: Vec<&Arc<Plugin>> = loaded
        .iter()
        .filter(|(file, _, _)| !preferred.contains(file))
        .filter_map(|(_, _, outcome)| outcome.as_ref().ok())
        .collect();
    let mut refused = BTreeMap::new();
    for plugin in &candidates {
        let rivals: Vec<&&Arc<Plugin>> = candidates
            .iter()
            .filter(|other| other.file != plugin.file)
            .filter(|other| {
                (other.name == plugin.name
                    && !current.plugins.iter().any(|p| p.name == plugin.name))
                    || other
                        .streams
                        .iter()
                        .any(|s| plugin.streams.contains(s) && !served(s) && !decided_stream(s))
            })
            .collect();
        if rivals.is_empty() {
            continue;
        }
        let named: Vec<String> = std::iter::once(plugin)
            .chain(rivals.iter().copied())
            .map(|p| format!("{:?} ({})", p.name, p.file.display()))
            .collect();
        refused.insert(
            plugin.file.clone(),
            format!(
                "plugins {} claim the same stream or name and none serves it yet: none of them loads until all but one are removed (file order never decides; deploy the one you want with `kaleidoscope plugin deploy`)",
                named.join(" and ")
            ),
        );
    }
    refused
}

/// Compiles and checks a new or changed plugin file; a failure names the file.
fn load_changed(
    runtime: &PluginRuntime,
    bytes: &[u8],
    sha256: Option<String>,
    modified: Option<std::time::SystemTime>,
    file: &Path,
    limits_for: &dyn Fn(&str) -> SandboxLimits,
) -> Result<Arc<Plugin>, LoadFailure> {
    runtime
        .load_bytes(bytes, sha256.clone(), file, limits_for)
        .and_then(|plugin| {
            named_after_its_file(&plugin)?;
            Ok(Arc::new(plugin))
        })
        .map_err(|error| LoadFailure {
            file: file.to_path_buf(),
            reason: crate::text::causes(&error),
            sha256,
            modified,
            clash: false,
        })
}

/// The `.wasm` files of the plugins directory, in name order.
fn wasm_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
    Ok(files)
}

/// The file's bytes, refusing (before reading it) a file over [`MAX_PLUGIN_BYTES`].
fn read_limited(file: &Path) -> Result<Vec<u8>, String> {
    let size = std::fs::metadata(file)
        .map_err(|error| format!("cannot read the file: {error}"))?
        .len();
    if size > MAX_PLUGIN_BYTES as u64 {
        return Err(format!(
            "file of {size} bytes is larger than the limit of {MAX_PLUGIN_BYTES} bytes"
        ));
    }
    std::fs::read(file).map_err(|error| format!("cannot read the file: {error}"))
}

/// Logs a plugin loaded, or replacing `old`, and how (compiled or from the cache).
fn log_loaded(old: Option<&Plugin>, plugin: &Plugin) {
    let how = if plugin.from_cache {
        "loaded from the compiled cache"
    } else {
        "compiled"
    };
    let took = format!("{:.1?}", plugin.load_time);
    match old {
        Some(old) => {
            tracing::info!(file = %plugin.file.display(), plugin = %plugin.name, version = %plugin.version,
                build = %plugin.build(), streams = %List(&plugin.streams), replaced_version = %old.version, load_ms = plugin.load_time.as_millis() as u64,
                "replaced plugin {}@{} with {}@{} ({how} in {took})", old.name, old.version, plugin.name, plugin.version)
        }
        None => {
            tracing::info!(file = %plugin.file.display(), plugin = %plugin.name, version = %plugin.version,
                build = %plugin.build(), streams = %List(&plugin.streams), load_ms = plugin.load_time.as_millis() as u64,
                "loaded plugin {}@{} ({how} in {took})", plugin.name, plugin.version)
        }
    }
}

fn known_failure_reported(current: &PluginSet, failure: &LoadFailure) -> bool {
    current
        .failures
        .iter()
        .any(|f| f.file == failure.file && f.sha256 == failure.sha256 && f.reason == failure.reason)
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

/// A plugin's grants and limits (`[plugins.<name>]`) are bound to its name, so the name must be
/// one the operator chose: the file's. A file `team-b.wasm` whose manifest says `ml-errors`
/// would otherwise take `ml-errors`'s grants. Cargo's `_` for `-` is accepted
/// (`my_plugin.wasm` holds `my-plugin`).
fn named_after_its_file(plugin: &Plugin) -> anyhow::Result<()> {
    let stem = plugin
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().replace('_', "-"))
        .unwrap_or_default();
    if stem == plugin.name.replace('_', "-") {
        return Ok(());
    }
    anyhow::bail!(
        "the file {} holds the plugin {:?}; a plugin's file must be named after it ({}.wasm), because its grants and limits are bound to the name",
        plugin.file.display(),
        plugin.name,
        plugin.name
    )
}
