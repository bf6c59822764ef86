//! Which build a run applies: the live one (the fleet's plugin store, else the plugins
//! directory), or a named one (`--with`): a version or build held by the store, a rollout's
//! candidate (a rolled-back one too) or the plugins directory, or a `.wasm` file.

use crate::config::Config;
use crate::persist::{plugin_store, rollouts};
use crate::plugin::{Plugin, PluginSet};
use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A build chosen for a run, loaded, with the bytes its run record keeps.
pub struct Chosen {
    pub plugin: Arc<Plugin>,
    pub bytes: Vec<u8>,
    /// Where it came from, for the report (`the plugin store`, `rollout 3's candidate`, …).
    pub from: String,
}

/// The plugin name and streams a run concerns: the plugin `--handled-by` names, or whatever
/// serves `stream`.
pub struct Wanted<'a> {
    pub stream: Option<&'a str>,
    pub plugin: Option<&'a str>,
}

impl Wanted<'_> {
    fn matches(&self, name: &str, streams: &[String]) -> bool {
        self.plugin.is_none_or(|plugin| plugin == name)
            && self
                .stream
                .is_none_or(|stream| streams.iter().any(|s| s == stream))
    }

    fn describe(&self) -> String {
        match (self.plugin, self.stream) {
            (Some(plugin), _) => format!("plugin {plugin}"),
            (None, Some(stream)) => format!("the plugin of stream {stream}"),
            (None, None) => "a plugin".to_string(),
        }
    }
}

/// Finds and loads the build: `with` a version, a build (hash prefix) or a `.wasm` file, or
/// the live build when `None`. Blocking parts (compiling) run on a blocking thread.
pub async fn choose(
    config: &Arc<Config>,
    pool: &PgPool,
    wanted: &Wanted<'_>,
    with: Option<&str>,
) -> Result<Chosen> {
    if let Some(file) = with.filter(|w| w.ends_with(".wasm") || Path::new(w).is_file()) {
        let bytes = std::fs::read(file).with_context(|| format!("--with: cannot read {file}"))?;
        let chosen = load(config, bytes, PathBuf::from(file), format!("file {file}")).await?;
        if !wanted.matches(&chosen.plugin.name, &chosen.plugin.streams) {
            bail!(
                "--with {file} is {} {} declaring {:?}, not {}",
                chosen.plugin.name,
                chosen.plugin.version,
                chosen.plugin.streams,
                wanted.describe()
            );
        }
        return Ok(chosen);
    }
    let fleet = plugin_store::fleet(config);
    let matches_version = |version: &str, sha256: &str, with: &str| {
        version == with || (with.len() >= 6 && sha256.starts_with(with))
    };
    let mut known = Vec::new();
    let stored = plugin_store::list(pool, &fleet)
        .await?
        .into_iter()
        .find(|p| wanted.matches(&p.name, &p.streams));
    if let Some(stored) = &stored {
        known.push(format!("{} in the plugin store", stored.version));
        if with.is_none_or(|with| matches_version(&stored.version, &stored.sha256, with))
            && let Some(bytes) =
                plugin_store::bytes(pool, &fleet, &stored.name, &stored.sha256).await?
        {
            let path = config.plugins_dir.join(format!("{}.wasm", stored.name));
            return load(config, bytes, path, "the plugin store".to_string()).await;
        }
    }
    if let (Some(with), Some(name)) = (
        with,
        stored.as_ref().map(|s| s.name.as_str()).or(wanted.plugin),
    ) && let Some((version, _, bytes)) =
        rollouts::candidate_build(pool, &fleet, name, with).await?
    {
        let path = config.plugins_dir.join(format!("{name}-{version}.wasm"));
        return load(
            config,
            bytes,
            path,
            format!("a rollout's candidate ({version})"),
        )
        .await;
    }
    // The plugins directory: single-machine set-ups and plugins shipped in the image.
    let directory = directory(config).await?;
    let mut in_directory = directory
        .plugins()
        .iter()
        .filter(|p| wanted.matches(&p.name, &p.streams));
    if let Some(plugin) =
        in_directory.find(|p| with.is_none_or(|with| matches_version(&p.version, &p.sha256, with)))
    {
        let bytes = std::fs::read(&plugin.file)
            .with_context(|| format!("cannot read {}", plugin.file.display()))?;
        return load(
            config,
            bytes,
            plugin.file.clone(),
            plugin.file.display().to_string(),
        )
        .await;
    }
    known.extend(
        directory
            .plugins()
            .iter()
            .filter(|p| wanted.matches(&p.name, &p.streams))
            .map(|p| format!("{} in {}", p.version, p.file.display())),
    );
    let known = if known.is_empty() {
        "nothing".to_string()
    } else {
        known.join(", ")
    };
    match with {
        Some(with) => bail!(
            "--with {with}: no build of {} has that version or build (known: {known}); give the .wasm file instead (--with FILE.wasm)",
            wanted.describe()
        ),
        None => bail!(
            "no live build of {} (neither the plugin store nor {} holds one); name one with --with FILE.wasm",
            wanted.describe(),
            config.plugins_dir.display()
        ),
    }
}

/// Loads the plugins directory (compiling through the cache).
async fn directory(config: &Arc<Config>) -> Result<PluginSet> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let runtime = config.plugin_runtime(Some(&config.cache_dir))?;
        PluginSet::load_dir(&runtime, &config.plugins_dir, &BTreeSet::new(), &|name| {
            config.sandbox_limits(name)
        })
    })
    .await
    .context("the plugin loading thread failed")?
}

/// Loads `bytes` as a host would; `path` names it in messages.
pub async fn load(
    config: &Arc<Config>,
    bytes: Vec<u8>,
    path: PathBuf,
    from: String,
) -> Result<Chosen> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let runtime = config.plugin_runtime(Some(&config.cache_dir))?;
        let plugin = runtime
            .load_bytes(&bytes, None, &path, &|name| config.sandbox_limits(name))
            .with_context(|| format!("{from} would not load"))?;
        Ok(Chosen {
            plugin: Arc::new(plugin),
            bytes,
            from,
        })
    })
    .await
    .context("the plugin loading thread failed")?
}
