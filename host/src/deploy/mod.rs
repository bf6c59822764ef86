//! `kaleidoscope plugin deploy` (and `plugin dev`): deploy a plugin to every host of the fleet
//! through the plugin store, and wait for them to say whether they loaded it.
//!
//! The file is first loaded here as a host would load it ([`inspect`]): a file no host could
//! load is refused before anything changes. Its manifest names it: it is deployed as that
//! plugin, whatever the file was called (cargo's `my_plugin.wasm` upgrades `my-plugin`). It is
//! then written to the fleet's [plugin store](crate::persist::plugin_store), from which every
//! host writes it into its own plugins directory and loads it. The answer comes from the hosts'
//! [heartbeats](crate::heartbeat), which they rewrite right after every reload: a host has loaded
//! the build when it reports the plugin loaded from `<name>.wasm` with the build's SHA-256, and
//! has refused it when it reports a failed load of that file with that hash — in a heartbeat
//! whose plugin scan began after the deploy, so an answer about an earlier copy of the same bytes
//! is never taken for this one. A host whose heartbeat is stale (paused, stopped, gone) is named
//! as such and not counted; a deploy no live host answered is not a success.
//!
//! A deploy some host refused is undone ([`undo`]): the store gets the previous build back (or
//! loses the plugin if it is new), so every host, and every host started later, keeps serving
//! what it served.

pub mod rollout;

use crate::config::Config;
use crate::heartbeat;
use crate::persist::plugin_store::{self, Stored, StoredBuild};
use crate::redis_connection::RedisConnection;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the heartbeats are read while waiting.
const POLL: Duration = Duration::from_millis(200);

/// Whether a host took the deployed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The host runs the plugin from the file now.
    Loaded,
    /// The host refused the file (the detail says why) and keeps what it ran.
    Failed,
    /// The host's heartbeat is older than [`heartbeat::STALE_AFTER`]: it is paused, stopped or
    /// gone, and cannot answer; it is not counted.
    Stale,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Outcome::Loaded => "loaded",
            Outcome::Failed => "failed",
            Outcome::Stale => "stale",
        })
    }
}

/// What one host made of the deployed file.
#[derive(Debug, Serialize)]
pub struct HostAnswer {
    pub host: String,
    pub outcome: Outcome,
    /// The plugin's name, version and streams when loaded, the reason when not.
    pub detail: String,
    /// The name of the plugin loaded from the file (`None` when refused).
    #[serde(skip)]
    pub plugin: Option<String>,
}

/// The outcome of a deploy.
#[derive(Debug, Serialize)]
pub struct Deployed {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// One answer per running host (none when no host is running).
    pub hosts: Vec<HostAnswer>,
    /// Set when a host refused the build and the deploy was undone: what the store holds now.
    pub undone: Option<String>,
}

impl Deployed {
    /// Whether the deploy took: at least one live host loaded the build and none refused it.
    pub fn ok(&self) -> bool {
        self.hosts.iter().any(|h| h.outcome == Outcome::Loaded)
            && !self.hosts.iter().any(|h| h.outcome == Outcome::Failed)
    }

    /// Each host's answer, one per line, and what a refusal or silence means.
    pub fn report(&self, config: &Config) -> String {
        let mut lines: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("{}: {} {}", h.host, h.outcome, h.detail))
            .collect();
        if let Some(undone) = &self.undone {
            lines.push(format!("refused: {undone}"));
        } else if !self.answered() {
            lines.push(format!(
                "no live host of group {:?} (stream prefix {:?}) answered; the plugin store keeps the build for the next host to start",
                config.consumer_group, config.stream_prefix
            ));
        }
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Whether some live host answered (loaded or refused).
    pub fn answered(&self) -> bool {
        self.hosts.iter().any(|h| h.outcome != Outcome::Stale)
    }
}

/// Deploys the plugin file `source` to the fleet and waits (up to `timeout`) for every live
/// host's answer; undoes the deploy when a host refused it. An error when the file would not
/// load, when another deployed plugin handles one of its streams (nothing changed then), or when
/// some live host did not answer in time (the deploy stands: it will load it).
pub async fn deploy(config: &Config, source: &Path, timeout: Duration) -> Result<Deployed> {
    let candidate = {
        let config = config.clone();
        let source = source.to_path_buf();
        tokio::task::spawn_blocking(move || inspect(&config, &source))
            .await
            .context("the plugin loading thread failed")??
    };
    let pool = crate::persist::connect_existing(&config.database_url, &config.database_timeouts)
        .await
        .context("plugin deploy keeps plugins in the plugin store, in PostgreSQL")?;
    let deployed = deploy_candidate(&pool, config, &candidate, timeout).await;
    pool.close().await;
    deployed
}

async fn deploy_candidate(
    pool: &PgPool,
    config: &Config,
    candidate: &Candidate,
    timeout: Duration,
) -> Result<Deployed> {
    let deploy = store(pool, config, candidate).await?;
    let mut conn = crate::redis_connection::open(config).await?;
    let hosts = await_hosts(&mut conn, config, &deploy.installed, timeout).await?;
    let mut deployed = Deployed {
        name: deploy.stored.name.clone(),
        version: deploy.stored.version.clone(),
        sha256: deploy.stored.sha256.clone(),
        hosts,
        undone: None,
    };
    if deployed.hosts.iter().any(|h| h.outcome == Outcome::Failed) {
        deployed.undone = Some(undo(pool, config, &deploy).await?);
    }
    Ok(deployed)
}

/// A plugin deployed to the store, as the hosts will write it into their directories.
#[derive(Debug)]
pub struct Installed {
    /// Its file in a host's plugins directory (`<name>.wasm`; only the file name is compared).
    pub file: PathBuf,
    pub sha256: String,
    /// Taken just before the store was written: a plugin scan that began at or after it and
    /// reports on the file has seen this deploy (one that began earlier, only an older one).
    pub at: std::time::SystemTime,
}

/// A plugin file checked the way a host will load it: what the store keeps of it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub plugin: Stored,
    pub bytes: Vec<u8>,
}

/// Reads and loads `source` as a host would (compiling it, through the compiled cache, and
/// reading its manifest): a file no host could load is refused here, before anything changes.
/// Blocking: compiles.
pub fn inspect(config: &Config, source: &Path) -> Result<Candidate> {
    if source.extension().is_none_or(|e| e != "wasm") {
        bail!("{} is not a .wasm file", source.display());
    }
    let bytes =
        std::fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
    let sha256 = crate::plugin::sha256_hex(&bytes);
    let plugin = config
        .plugin_runtime(Some(&config.cache_dir))?
        .load_bytes(&bytes, Some(sha256.clone()), source, &|name| {
            config.sandbox_limits(name)
        })
        .with_context(|| format!("{} would not load; nothing was deployed", source.display()))?;
    Ok(Candidate {
        plugin: Stored {
            name: plugin.name.clone(),
            version: plugin.version.clone(),
            sha256,
            streams: plugin.streams.clone(),
            deployed_by: deployer(),
            deployed_at: String::new(),
        },
        bytes,
    })
}

/// Who deploys (or starts a run): `user@machine`, for the record.
pub fn deployer() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{machine}")
}

/// A deploy written to the store, and what it replaced (put back if a host refuses it).
#[derive(Debug)]
pub struct Deploy {
    pub stored: Stored,
    pub previous: Option<StoredBuild>,
    pub installed: Installed,
}

/// Writes `candidate` to the fleet's plugin store, unless another deployed plugin handles one of
/// its streams (then nothing changes: two plugins for one stream is never decided by chance).
pub async fn store(pool: &PgPool, config: &Config, candidate: &Candidate) -> Result<Deploy> {
    let fleet = plugin_store::fleet(config);
    let deployed = plugin_store::list(pool, &fleet).await?;
    let plugin = &candidate.plugin;
    for other in deployed.iter().filter(|other| other.name != plugin.name) {
        if let Some(stream) = plugin.streams.iter().find(|s| other.streams.contains(s)) {
            bail!(
                "stream {stream:?} is handled by plugin {:?} {} (deployed by {} at {}); nothing was deployed (remove it first with `kaleidoscope plugin remove {}`)",
                other.name,
                other.version,
                other.deployed_by,
                other.deployed_at,
                other.name
            );
        }
    }
    let rollouts = crate::persist::rollouts::running(pool, &fleet).await?;
    if let Some(running) = rollouts.iter().find(|r| r.plugin == plugin.name) {
        bail!("{}", running.in_the_way("nothing was deployed"));
    }
    let at = std::time::SystemTime::now();
    let (stored, previous) = plugin_store::put(pool, &fleet, plugin, &candidate.bytes).await?;
    Ok(Deploy {
        installed: Installed {
            file: PathBuf::from(format!("{}.wasm", stored.name)),
            sha256: stored.sha256.clone(),
            at,
        },
        stored,
        previous,
    })
}

/// Puts back what `deploy` replaced, unless another deploy replaced it since. Returns a line
/// saying what the store holds now.
pub async fn undo(pool: &PgPool, config: &Config, deploy: &Deploy) -> Result<String> {
    let fleet = plugin_store::fleet(config);
    let undone =
        plugin_store::restore(pool, &fleet, &deploy.stored, deploy.previous.as_ref()).await?;
    let name = &deploy.stored.name;
    Ok(match (&deploy.previous, undone) {
        (_, false) => format!("plugin {name} was deployed again since; that deploy stands"),
        (Some(previous), true) => format!(
            "the plugin store is back to {name} {} (build {}); every host keeps serving what it served",
            previous.plugin.version,
            crate::plugin::build_of(&previous.plugin.sha256)
        ),
        (None, true) => format!(
            "plugin {name} was taken out of the plugin store again; every host keeps serving what it served"
        ),
    })
}

/// Waits until every live host of the group has loaded or refused the `installed` build (or
/// `timeout` passes: an error naming the hosts that have not answered).
pub async fn await_hosts(
    conn: &mut RedisConnection,
    config: &Config,
    installed: &Installed,
    timeout: Duration,
) -> Result<Vec<HostAnswer>> {
    let deadline = Instant::now() + timeout;
    let (file, sha256) = (installed.file.as_path(), installed.sha256.as_str());
    let file_name = file.file_name().map(|n| n.to_string_lossy().into_owned());
    loop {
        let hosts = heartbeat::read_all(conn, config).await?;
        let mut answers = Vec::new();
        let mut waiting = Vec::new();
        let named = |path: &str| {
            Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                == file_name
        };
        for host in &hosts {
            if !host.fresh() {
                answers.push(HostAnswer {
                    host: host.consumer.clone(),
                    outcome: Outcome::Stale,
                    detail: format!(
                        "its heartbeat is {} old (paused, stopped or gone); not counted",
                        host.heartbeat_age_ms
                            .map_or("of unknown age".to_string(), |ms| {
                                humantime::format_duration(Duration::from_secs(ms / 1000))
                                    .to_string()
                            })
                    ),
                    plugin: None,
                });
                continue;
            }
            let scanned_since = host
                .plugins_scanned_at
                .as_deref()
                .and_then(|at| humantime::parse_rfc3339_weak(at).ok())
                .is_some_and(|at| at >= installed.at);
            if !scanned_since {
                waiting.push(host.consumer.clone());
                continue;
            }
            // This file, with these bytes: the same bytes loaded from another file name say
            // nothing about this one (which may have been refused, say for a name clash).
            let loaded = host
                .plugins
                .iter()
                .find(|p| p.sha256 == sha256 && named(&p.file));
            let failed = host
                .failed_loads
                .iter()
                .find(|f| f.sha256.as_deref() == Some(sha256) && named(&f.file));
            match (loaded, failed) {
                (Some(plugin), _) => answers.push(HostAnswer {
                    host: host.consumer.clone(),
                    outcome: Outcome::Loaded,
                    detail: format!("{} {} {:?}", plugin.name, plugin.version, plugin.streams),
                    plugin: Some(plugin.name.clone()),
                }),
                (None, Some(failure)) => answers.push(HostAnswer {
                    host: host.consumer.clone(),
                    outcome: Outcome::Failed,
                    detail: failure.reason.clone(),
                    plugin: None,
                }),
                (None, None) => waiting.push(host.consumer.clone()),
            }
        }
        if waiting.is_empty() {
            return Ok(answers);
        }
        if Instant::now() >= deadline {
            bail!(
                "host(s) {} did not report loading {} within {timeout:?}",
                waiting.join(", "),
                file.display(),
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
