//! `kaleidoscope plugin deploy`: put a plugin file where the running hosts pick it up, and wait
//! for them to say whether they loaded it.
//!
//! The file is copied beside the plugins directory's other files under a hidden temporary name
//! (which no host loads), then renamed into place, so a host never sees it half-written. The
//! answer comes from the hosts' [heartbeats](crate::heartbeat), which they rewrite right after
//! every reload: a host has loaded the file when it reports a plugin loaded from that file name
//! with the file's SHA-256, and has refused it when it reports a failed load of that file with
//! that hash — in a heartbeat whose plugin scan began after the file was in place, so an answer
//! about an earlier copy of the same bytes is never taken for this one. A host whose heartbeat is
//! stale (paused, stopped, gone) is named as such and not counted; a deploy no live host answered
//! is not a success.

use crate::config::Config;
use crate::heartbeat;
use anyhow::{Context, Result, bail};
use redis::aio::ConnectionLike;
use serde::Serialize;
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
    /// Where the file now is.
    pub file: PathBuf,
    pub sha256: String,
    /// One answer per running host (none when no host is running).
    pub hosts: Vec<HostAnswer>,
}

impl Deployed {
    /// Whether the deploy took: at least one live host loaded the file and none refused it.
    pub fn ok(&self) -> bool {
        self.hosts.iter().any(|h| h.outcome == Outcome::Loaded)
            && !self.hosts.iter().any(|h| h.outcome == Outcome::Failed)
    }
}

/// A plugin file put in place by [`install`].
#[derive(Debug)]
pub struct Installed {
    /// Where it is now.
    pub file: PathBuf,
    pub sha256: String,
    /// Taken just before the file was moved into place: a plugin scan that began at or after it
    /// and reports on the file has seen this copy (one that began earlier, only an older one).
    pub at: std::time::SystemTime,
}

/// Copies `source` into the plugins directory atomically.
pub fn install(config: &Config, source: &Path) -> Result<Installed> {
    let bytes =
        std::fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
    let Some(name) = source
        .file_name()
        .filter(|_| source.extension().is_some_and(|e| e == "wasm"))
    else {
        bail!("{} is not a .wasm file", source.display());
    };
    let dir = &config.plugins_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the plugins directory {}", dir.display()))?;
    let target = dir.join(name);
    let staging = dir.join(format!(".{}.deploying", name.to_string_lossy()));
    std::fs::write(&staging, &bytes)
        .with_context(|| format!("cannot write {}", staging.display()))?;
    let at = std::time::SystemTime::now();
    std::fs::rename(&staging, &target).with_context(|| {
        format!(
            "cannot move {} into place as {}",
            staging.display(),
            target.display()
        )
    })?;
    Ok(Installed {
        file: target,
        sha256: crate::plugin::sha256_hex(&bytes),
        at,
    })
}

/// Waits until every live host of the group has loaded or refused the `installed` file (or
/// `timeout` passes: an error naming the hosts that have not answered).
pub async fn await_hosts<C: ConnectionLike + Send>(
    conn: &mut C,
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
            if host
                .heartbeat_age_ms
                .is_none_or(|age| age > heartbeat::STALE_AFTER.as_millis() as u64)
            {
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
                "host(s) {} did not report loading {} within {timeout:?} (is their plugins directory {}?)",
                waiting.join(", "),
                file.display(),
                config.plugins_dir.display()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
