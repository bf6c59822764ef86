//! The heartbeat: each running host keeps a small JSON document about itself in Redis — its
//! plugins with versions and hashes, failed plugin loads, the streams it consumes, whether it is
//! ready — refreshed every [`HEARTBEAT`] and after every plugin reload, and expiring when the host
//! stops refreshing it. It is how `kaleidoscope status` (and `plugin deploy`-style tooling) learns
//! what the hosts of a group are doing without talking to them.

use crate::config::Config;
use crate::redis_connection::RedisConnection;
use crate::state::HostState;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// How often a host refreshes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A heartbeat older than this says its host is stalled or paused: two missed rewrites and some
/// slack (it expires altogether after `HEARTBEAT_TTL_SECONDS`).
pub const STALE_AFTER: Duration = Duration::from_secs(25);
/// How long a heartbeat outlives its last refresh: long enough to survive a missed refresh or
/// two, short enough that a host killed without withdrawing it disappears within a minute.
const HEARTBEAT_TTL_SECONDS: u64 = 45;

/// One host's view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostStatus {
    pub consumer: String,
    pub group: String,
    pub pid: u32,
    pub started_at: String,
    pub updated_at: String,
    /// How old the heartbeat was when read (filled in by the reader, not written by the host):
    /// a host that stops rewriting it is stalled or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_ms: Option<u64>,
    /// `[plugins.<name>]` sections of its configuration file that name no loaded plugin.
    #[serde(default)]
    pub unmatched_plugin_sections: Vec<String>,
    pub plugins_dir: String,
    /// False while PostgreSQL or Redis is unavailable to this host.
    #[serde(default)]
    pub ready: bool,
    /// Why the host is not ready.
    #[serde(default)]
    pub not_ready: Vec<String>,
    pub streams: Vec<String>,
    pub plugins: Vec<PluginStatus>,
    pub failed_loads: Vec<FailedLoad>,
    /// When the scan of the plugins directory that made the loaded set began (RFC 3339): an
    /// answer about a file deployed after it says nothing yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins_scanned_at: Option<String>,
    /// The fleet's running rollouts as this host follows them (or why it cannot).
    #[serde(default)]
    pub rollouts: Vec<RolloutFollowed>,
}

/// A running rollout as one host follows it: the plan's revision it applies, or why it cannot
/// (its candidate would not load here, or the host serves another live build). How `plugin
/// deploy --canary`, `rollout set` and `rollout promote` learn that every host has moved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutFollowed {
    pub id: i64,
    pub plugin: String,
    pub revision: i32,
    pub mode: String,
    pub percent: f64,
    pub candidate_version: String,
    pub candidate_sha256: String,
    /// Why the host does not follow it (`None`: it does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl HostStatus {
    /// Whether its heartbeat is younger than [`STALE_AFTER`]: the host is alive and answering
    /// (a paused, stopped or gone host is not, and cannot be waited for or compared).
    pub fn fresh(&self) -> bool {
        self.heartbeat_age_ms
            .is_some_and(|age| age <= STALE_AFTER.as_millis() as u64)
    }

    /// Whether the host serves plugin `name` (only such hosts take part in its rollouts).
    pub fn serves(&self, name: &str) -> bool {
        self.plugins.iter().any(|p| p.name == name)
    }

    /// How the host follows rollout `id` at `revision` or later (`None`: it has not caught up,
    /// or does not take part).
    pub fn following(&self, id: i64, revision: i32) -> Option<&RolloutFollowed> {
        self.rollouts
            .iter()
            .find(|r| r.id == id && r.revision >= revision)
    }
}

/// A loaded plugin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub streams: Vec<String>,
    pub file: String,
    pub size: usize,
    pub from_cache: bool,
    pub load_ms: f64,
    /// What the plugin may write right now (the grants in force, reloaded with the
    /// configuration file).
    #[serde(default)]
    pub grants: Grants,
}

/// A plugin's grants as `status` shows them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Grants {
    pub tables: Vec<String>,
    pub update_columns: std::collections::BTreeMap<String, Vec<String>>,
    pub emit: Vec<String>,
}

impl Grants {
    fn of(policy: &crate::config::PluginPolicy) -> Grants {
        Grants {
            tables: policy.tables.iter().cloned().collect(),
            update_columns: policy
                .update_columns
                .iter()
                .map(|(table, columns)| (table.clone(), columns.iter().cloned().collect()))
                .collect(),
            emit: policy.emit.iter().cloned().collect(),
        }
    }

    /// `tables=a,b update=t(c1,c2) emit=s`, or `none`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.tables.is_empty() {
            parts.push(format!("tables={}", self.tables.join(",")));
        }
        if !self.update_columns.is_empty() {
            let updates: Vec<String> = self
                .update_columns
                .iter()
                .map(|(table, columns)| format!("{table}({})", columns.join(",")))
                .collect();
            parts.push(format!("update={}", updates.join(",")));
        }
        if !self.emit.is_empty() {
            parts.push(format!("emit={}", self.emit.join(",")));
        }
        if parts.is_empty() {
            "no grants".to_string()
        } else {
            parts.join(" ")
        }
    }
}

/// A plugin file that failed to load.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedLoad {
    pub file: String,
    pub reason: String,
    /// SHA-256 of the file that failed, so `plugin deploy` can tell its own file's failure from
    /// an older one's.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// The Redis key of one consumer's heartbeat (`*` as the consumer gives the SCAN pattern).
fn host_key(config: &Config, consumer: &str) -> String {
    format!(
        "{}kaleidoscope:hosts:{}:{consumer}",
        config.stream_prefix, config.consumer_group
    )
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Writes this host's heartbeat (best effort: reporting must never stop the host).
pub async fn write(state: &HostState, streams: &[String], started_at: SystemTime) {
    let config = &state.config;
    let snapshot = state.registry.snapshot();
    let not_ready = state.not_ready();
    let status = HostStatus {
        consumer: config.consumer_name.clone(),
        group: config.consumer_group.clone(),
        pid: std::process::id(),
        started_at: humantime::format_rfc3339_millis(started_at).to_string(),
        updated_at: now_rfc3339(),
        heartbeat_age_ms: None,
        unmatched_plugin_sections: state.unmatched_plugin_sections(),
        plugins_dir: config.plugins_dir.display().to_string(),
        ready: not_ready.is_empty(),
        not_ready,
        streams: streams.to_vec(),
        plugins: snapshot
            .plugins()
            .iter()
            .map(|p| PluginStatus {
                name: p.name.clone(),
                version: p.version.clone(),
                sha256: p.sha256.clone(),
                streams: p.streams.clone(),
                file: p.file.display().to_string(),
                size: p.size,
                from_cache: p.from_cache,
                load_ms: p.load_time.as_secs_f64() * 1000.0,
                grants: Grants::of(&state.policy(&p.name)),
            })
            .collect(),
        failed_loads: snapshot
            .failures()
            .iter()
            .map(|f| FailedLoad {
                file: f.file.display().to_string(),
                reason: f.reason.clone(),
                sha256: f.sha256.clone(),
            })
            .collect(),
        plugins_scanned_at: snapshot
            .scanned_at()
            .map(|at| humantime::format_rfc3339_millis(at).to_string()),
        rollouts: rollouts_followed(state),
    };
    let Ok(json) = serde_json::to_string(&status) else {
        return;
    };
    let mut redis = state.redis.clone();
    let written: redis::RedisResult<()> = redis::cmd("SET")
        .arg(host_key(config, &config.consumer_name))
        .arg(json)
        .arg("EX")
        .arg(HEARTBEAT_TTL_SECONDS)
        .query_async(&mut redis)
        .await;
    match written {
        Ok(()) => state.note_heartbeat_written(),
        Err(error) => tracing::warn!("cannot publish the host status: {error}"),
    }
}

/// The rollouts this host follows or refused, as its heartbeat reports them.
fn rollouts_followed(state: &HostState) -> Vec<RolloutFollowed> {
    let followed = state.rollouts.snapshot();
    let report =
        |row: &crate::persist::rollouts::RolloutRow, refused: Option<String>| RolloutFollowed {
            id: row.id,
            plugin: row.plugin.clone(),
            revision: row.revision,
            mode: row.mode.clone(),
            percent: row.percent,
            candidate_version: row.candidate_version.clone(),
            candidate_sha256: row.candidate_sha256.clone(),
            refused,
        };
    let mut reports: Vec<RolloutFollowed> = followed
        .active
        .values()
        .map(|active| report(&active.row, None))
        .chain(
            followed
                .refused
                .values()
                .map(|(row, reason)| report(row, Some(reason.clone()))),
        )
        .collect();
    reports.sort_by(|a, b| a.plugin.cmp(&b.plugin));
    reports
}

/// Removes this host's heartbeat at shutdown, so `status` stops listing it at once.
pub async fn withdraw(state: &HostState) {
    let mut redis = state.redis.clone();
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(host_key(&state.config, &state.config.consumer_name))
        .query_async(&mut redis)
        .await;
}

/// Every live heartbeat of the configured group, sorted by consumer name; documents that do not
/// parse (another version's) are skipped.
pub async fn read_all(conn: &mut RedisConnection, config: &Config) -> Result<Vec<HostStatus>> {
    let keys = conn
        .keys_matching(&host_key(config, "*"))
        .await
        .context("cannot list the host heartbeats")?;
    let mut hosts = Vec::new();
    for key in keys {
        let json: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await?;
        if let Some(mut status) = json.and_then(|j| serde_json::from_str::<HostStatus>(&j).ok()) {
            // Against this machine's clock: hosts on other machines need their clocks in sync.
            status.heartbeat_age_ms = humantime::parse_rfc3339_weak(&status.updated_at)
                .ok()
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
            hosts.push(status);
        }
    }
    hosts.sort_by(|a, b| a.consumer.cmp(&b.consumer));
    Ok(hosts)
}
