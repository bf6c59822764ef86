//! `kaleidoscope plugin deploy --shadow/--canary` and `kaleidoscope rollout …`: starting a
//! rollout of a candidate build beside the live one, changing its share, promoting or aborting
//! it — each a change of the fleet's plan in PostgreSQL ([`crate::persist::rollouts`]) followed
//! by a wait until every live host reports that it follows the change (its heartbeat carries the
//! plan's revision), naming a host that cannot and why.

use super::{Candidate, HostAnswer, Outcome, deployer};
use crate::config::Config;
use crate::heartbeat::{self, HostStatus};
use crate::persist::plugin_store;
use crate::persist::rollouts::{self, NewRollout, RolloutRow};
use crate::rollout::Mode;
use crate::rollout::guard::Thresholds;
use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use std::path::Path;
use std::time::{Duration, Instant};

/// How a rollout is to run, as `plugin deploy` is told.
#[derive(Clone, Debug)]
pub struct Plan {
    pub mode: Mode,
    pub percent: f64,
    /// The entry field that routes entries (entries without it go by entry id).
    pub key_field: Option<String>,
    pub thresholds: Thresholds,
}

/// What a rollout command did, and every live host's answer.
#[derive(Debug, serde::Serialize)]
pub struct Changed {
    pub rollout: RolloutRow,
    pub hosts: Vec<HostAnswer>,
    /// Set when a host could not follow and the rollout was aborted for it.
    pub aborted: Option<String>,
}

impl Changed {
    /// Whether every live host follows (at least one answered, none refused).
    pub fn ok(&self) -> bool {
        self.aborted.is_none() && self.hosts.iter().any(|h| h.outcome == Outcome::Loaded)
    }

    /// Each host's answer, one per line.
    pub fn report(&self) -> String {
        let mut lines: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("{}: {} {}\n", h.host, h.outcome, h.detail))
            .collect();
        if let Some(aborted) = &self.aborted {
            lines.push(format!("aborted: {aborted}\n"));
        } else if !self.hosts.iter().any(|h| h.outcome != Outcome::Stale) {
            lines.push(
                "no live host serving the plugin answered; the rollout waits in the plan for the hosts to start\n"
                    .to_string(),
            );
        }
        lines.concat()
    }
}

/// Opens the pool and a Redis connection a rollout command works with.
async fn connect(config: &Config) -> Result<(PgPool, crate::redis_connection::RedisConnection)> {
    let pool = crate::persist::connect_existing(&config.database_url, &config.database_timeouts)
        .await
        .context("rollouts are kept in PostgreSQL")?;
    let conn = crate::redis_connection::open(config).await?;
    Ok((pool, conn))
}

/// Starts a rollout of the plugin file `source` as the candidate of the plugin its manifest
/// names, and waits (up to `timeout`) until every live host serving that plugin follows it; a
/// host that cannot load the candidate aborts the rollout (nothing changed for any entry).
pub async fn start(
    config: &Config,
    source: &Path,
    plan: &Plan,
    timeout: Duration,
) -> Result<Changed> {
    let candidate = {
        let config = config.clone();
        let source = source.to_path_buf();
        tokio::task::spawn_blocking(move || super::inspect(&config, &source))
            .await
            .context("the plugin loading thread failed")??
    };
    let (pool, mut conn) = connect(config).await?;
    let fleet = plugin_store::fleet(config);
    let hosts = heartbeat::read_all(&mut conn, config).await?;
    let (live_version, live_sha256) = live_build(&pool, &fleet, &hosts, &candidate).await?;
    let new = NewRollout {
        plugin: candidate.plugin.name.clone(),
        live_version,
        live_sha256,
        candidate_version: candidate.plugin.version.clone(),
        candidate_sha256: candidate.plugin.sha256.clone(),
        candidate_streams: candidate.plugin.streams.clone(),
        mode: plan.mode.as_str().to_string(),
        percent: plan.percent,
        key_field: plan.key_field.clone(),
        max_failure_points: plan.thresholds.max_failure_points,
        window_entries: i32::try_from(plan.thresholds.window).unwrap_or(i32::MAX),
        max_latency_factor: plan.thresholds.max_latency_factor,
        max_difference_percent: plan.thresholds.max_difference_percent,
        started_by: deployer(),
    };
    let row = rollouts::start(&pool, &fleet, &new, &candidate.bytes).await?;
    let changed = settle(&pool, &mut conn, config, row, timeout).await;
    pool.close().await;
    changed
}

/// The live build of `candidate`'s plugin across the fleet: what every live host serving it
/// runs (they must agree), else what the plugin store holds. Refuses a candidate that is the
/// live build, or that declares other streams than the live one.
async fn live_build(
    pool: &PgPool,
    fleet: &str,
    hosts: &[HostStatus],
    candidate: &Candidate,
) -> Result<(String, String)> {
    let name = &candidate.plugin.name;
    let mut serving: Vec<(String, &heartbeat::PluginStatus)> = hosts
        .iter()
        .filter(|host| host.fresh())
        .filter_map(|host| {
            let plugin = host.plugins.iter().find(|p| &p.name == name)?;
            Some((host.consumer.clone(), plugin))
        })
        .collect();
    serving.sort_by(|a, b| a.1.sha256.cmp(&b.1.sha256));
    let live = match serving.first() {
        Some((_, first)) => {
            if let Some((host, other)) = serving.iter().find(|(_, p)| p.sha256 != first.sha256) {
                bail!(
                    "the hosts serve different builds of {name} ({} on {}, {} on {host}); deploy one with `kaleidoscope plugin deploy` before a rollout",
                    crate::plugin::build_of(&first.sha256),
                    serving[0].0,
                    crate::plugin::build_of(&other.sha256)
                );
            }
            (
                first.version.clone(),
                first.sha256.clone(),
                first.streams.clone(),
            )
        }
        None => match plugin_store::list(pool, fleet)
            .await?
            .into_iter()
            .find(|p| &p.name == name)
        {
            Some(stored) => (stored.version, stored.sha256, stored.streams),
            None => bail!(
                "no live host serves plugin {name} and the plugin store does not hold it: a rollout needs a live version (deploy this one with `kaleidoscope plugin deploy`)"
            ),
        },
    };
    let (version, sha256, streams) = live;
    if sha256 == candidate.plugin.sha256 {
        bail!(
            "{name} {version} (build {}) is the live build already; nothing to roll out",
            crate::plugin::build_of(&sha256)
        );
    }
    let mut wanted = candidate.plugin.streams.clone();
    let mut have = streams;
    wanted.sort();
    have.sort();
    if wanted != have {
        bail!(
            "the candidate declares streams {wanted:?}, the live version {have:?}: a rollout compares two versions of one plugin on the same entries (deploy a change of streams with `kaleidoscope plugin deploy`)"
        );
    }
    Ok((version, sha256))
}

/// Waits until the hosts follow `row`'s revision; aborts the rollout when one cannot.
async fn settle(
    pool: &PgPool,
    conn: &mut crate::redis_connection::RedisConnection,
    config: &Config,
    row: RolloutRow,
    timeout: Duration,
) -> Result<Changed> {
    let hosts = await_revision(conn, config, &row, timeout).await?;
    let refusals: Vec<String> = hosts
        .iter()
        .filter(|h| h.outcome == Outcome::Failed)
        .map(|h| format!("host {} cannot follow it: {}", h.host, h.detail))
        .collect();
    let mut changed = Changed {
        rollout: row,
        hosts,
        aborted: None,
    };
    if !refusals.is_empty() {
        let reason = refusals.join("; ");
        let fleet = plugin_store::fleet(config);
        if let Some((row, _)) =
            rollouts::finish(pool, &fleet, changed.rollout.id, "aborted", &reason).await?
        {
            changed.rollout = row;
        }
        changed.aborted = Some(format!(
            "{reason}; the rollout was aborted and every host serves the live version alone"
        ));
    }
    Ok(changed)
}

/// Waits until every live host serving `row`'s plugin reports following `row`'s revision (or
/// cannot, and says why). A stale host is named and not counted.
async fn await_revision(
    conn: &mut crate::redis_connection::RedisConnection,
    config: &Config,
    row: &RolloutRow,
    timeout: Duration,
) -> Result<Vec<HostAnswer>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut answers = Vec::new();
        let mut waiting = Vec::new();
        for host in heartbeat::read_all(conn, config).await? {
            if !host.serves(&row.plugin) {
                continue;
            }
            if !host.fresh() {
                answers.push(stale(&host));
                continue;
            }
            match host.following(row.id, row.revision) {
                Some(followed) => answers.push(HostAnswer {
                    host: host.consumer.clone(),
                    outcome: if followed.refused.is_some() {
                        Outcome::Failed
                    } else {
                        Outcome::Loaded
                    },
                    detail: followed.refused.clone().unwrap_or_else(|| {
                        format!(
                            "follows rollout {}: {} {} as a {} on {}%",
                            row.id,
                            row.plugin,
                            row.candidate_version,
                            followed.mode,
                            followed.percent
                        )
                    }),
                    plugin: Some(row.plugin.clone()),
                }),
                None => waiting.push(host.consumer.clone()),
            }
        }
        if waiting.is_empty() {
            return Ok(answers);
        }
        if Instant::now() >= deadline {
            bail!(
                "host(s) {} did not report following rollout {} (revision {}) within {timeout:?}",
                waiting.join(", "),
                row.id,
                row.revision
            );
        }
        tokio::time::sleep(super::POLL).await;
    }
}

/// A host whose heartbeat is stale: named, not counted.
fn stale(host: &HostStatus) -> HostAnswer {
    HostAnswer {
        host: host.consumer.clone(),
        outcome: Outcome::Stale,
        detail: "its heartbeat is stale (paused, stopped or gone); not counted".to_string(),
        plugin: None,
    }
}

/// `rollout set`: a new share (and mode, when given) for the running rollout of `plugin`.
pub async fn set(
    config: &Config,
    plugin: &str,
    mode: Option<Mode>,
    percent: f64,
    timeout: Duration,
) -> Result<Changed> {
    let (pool, mut conn) = connect(config).await?;
    let fleet = plugin_store::fleet(config);
    let row = rollouts::set(&pool, &fleet, plugin, mode.map(Mode::as_str), percent).await?;
    let changed = settle(&pool, &mut conn, config, row, timeout).await;
    pool.close().await;
    changed
}

/// `rollout promote`: the candidate becomes the live build of every host (through the plugin
/// store, in the transaction that ends the rollout); waits until every live host loaded it.
pub async fn promote(config: &Config, plugin: &str, timeout: Duration) -> Result<super::Deployed> {
    let (pool, mut conn) = connect(config).await?;
    let fleet = plugin_store::fleet(config);
    let at = std::time::SystemTime::now();
    let promoted = rollouts::promote(&pool, &fleet, plugin, &deployer()).await;
    pool.close().await;
    let (_, stored) = promoted?;
    let installed = super::Installed {
        file: std::path::PathBuf::from(format!("{}.wasm", stored.name)),
        sha256: stored.sha256.clone(),
        at,
    };
    let hosts = super::await_hosts(&mut conn, config, &installed, timeout).await?;
    Ok(super::Deployed {
        name: stored.name,
        version: stored.version,
        sha256: stored.sha256,
        hosts,
        undone: None,
    })
}

/// `rollout abort`: ends the running rollout of `plugin`; every host serves the live version
/// alone within seconds. Returns the rollout as ended.
pub async fn abort(config: &Config, plugin: &str) -> Result<RolloutRow> {
    let (pool, _conn) = connect(config).await?;
    let fleet = plugin_store::fleet(config);
    let running = rollouts::running(&pool, &fleet)
        .await?
        .into_iter()
        .find(|row| row.plugin == plugin);
    let Some(running) = running else {
        pool.close().await;
        bail!("no rollout of {plugin:?} is running in fleet {fleet:?}");
    };
    let reason = format!("aborted by {}", deployer());
    let ended = rollouts::finish(&pool, &fleet, running.id, "aborted", &reason).await;
    pool.close().await;
    match ended? {
        Some((row, _)) => Ok(row),
        None => bail!("rollout {} is gone", running.id),
    }
}
