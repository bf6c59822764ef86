//! What `kaleidoscope status` shows, and how running hosts make it visible.
//!
//! Each running host keeps a small JSON document about itself in Redis (its plugins, their
//! versions and hashes, failed plugin loads, the streams it consumes), refreshed every
//! [`HEARTBEAT`] and after every plugin reload, expiring when the host stops refreshing it. The
//! `status` command combines those documents with what Redis knows about each stream (length,
//! group lag, pending entries, consumers) and the dead-letter stream.

use crate::config::Config;
use crate::state::HostState;
use crate::streams::text;
use anyhow::{Context, Result};
use redis::Value;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often a host refreshes its status document.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a status document outlives its last refresh.
const STATUS_TTL_SECONDS: u64 = 45;
/// How many dead letters `status` reads to count them by kind.
const DLQ_SCAN_LIMIT: usize = 10_000;

/// The streams reported even when no host is running (the seed's inbound streams).
pub const DEFAULT_STREAMS: [&str; 4] = [
    "ml-insights-results",
    "face-detection-results",
    "face-recognition-results",
    "ml-error-results",
];

/// One host's view of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostStatus {
    pub consumer: String,
    pub group: String,
    pub pid: u32,
    pub started_at: String,
    pub updated_at: String,
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
}

/// A plugin file that failed to load.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedLoad {
    pub file: String,
    pub reason: String,
}

fn host_key(config: &Config, consumer: &str) -> String {
    format!(
        "{}kaleidoscope:hosts:{}:{consumer}",
        config.stream_prefix, config.consumer_group
    )
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Writes this host's status document (best effort: status must never stop the host).
pub async fn publish(delivery: &HostState, streams: &[String], started_at: SystemTime) {
    let config = &delivery.config;
    let snapshot = delivery.registry.snapshot();
    let not_ready = delivery.not_ready();
    let status = HostStatus {
        consumer: config.consumer_name.clone(),
        group: config.consumer_group.clone(),
        pid: std::process::id(),
        started_at: humantime::format_rfc3339_millis(started_at).to_string(),
        updated_at: now_rfc3339(),
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
            })
            .collect(),
        failed_loads: snapshot
            .failures()
            .iter()
            .map(|f| FailedLoad {
                file: f.file.display().to_string(),
                reason: f.reason.clone(),
            })
            .collect(),
    };
    let Ok(json) = serde_json::to_string(&status) else {
        return;
    };
    let mut redis = delivery.redis.clone();
    let written: redis::RedisResult<()> = redis::cmd("SET")
        .arg(host_key(config, &config.consumer_name))
        .arg(json)
        .arg("EX")
        .arg(STATUS_TTL_SECONDS)
        .query_async(&mut redis)
        .await;
    if let Err(error) = written {
        tracing::warn!("cannot publish the host status: {error}");
    }
}

/// Removes this host's status document at shutdown.
pub async fn withdraw(delivery: &HostState) {
    let mut redis = delivery.redis.clone();
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(host_key(&delivery.config, &delivery.config.consumer_name))
        .query_async(&mut redis)
        .await;
}

/// Tracked ML requests by status (`ml_requests`).
pub async fn requests_by_status(pool: &sqlx::PgPool) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM ml_requests GROUP BY status")
            .fetch_all(pool)
            .await
            .context("cannot count requests by status")?;
    Ok(rows.into_iter().collect())
}

/// Everything `kaleidoscope status` reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub healthy: bool,
    pub problems: Vec<String>,
    /// Tracked ML requests by status; absent when the database could not be asked.
    pub requests: Option<BTreeMap<String, i64>>,
    pub hosts: Vec<HostStatus>,
    pub streams: Vec<StreamReport>,
    pub dead_letters: DeadLetterReport,
}

/// One inbound stream as Redis sees it.
#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub stream: String,
    pub key: String,
    pub length: i64,
    pub group_exists: bool,
    pub lag: Option<i64>,
    pub pending: i64,
    /// Age of the oldest pending entry (from its id's timestamp), in milliseconds.
    pub oldest_pending_age_ms: Option<u64>,
    pub consumers: Vec<ConsumerReport>,
}

/// One consumer of the group on a stream.
#[derive(Debug, Serialize)]
pub struct ConsumerReport {
    pub name: String,
    pub pending: i64,
    pub idle_ms: i64,
}

/// The dead-letter stream.
#[derive(Debug, Serialize)]
pub struct DeadLetterReport {
    pub stream: String,
    pub length: i64,
    /// Counts by `failureKind` over the newest entries (at most `scanned`).
    pub by_kind: BTreeMap<String, u64>,
    pub scanned: usize,
}

/// Collects the report. `max_pending_age` marks a stream unhealthy when its oldest pending entry
/// is older.
pub async fn collect<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
    pool: Option<&sqlx::PgPool>,
    max_pending_age: Duration,
) -> Result<Report> {
    let mut problems = Vec::new();
    let hosts = read_hosts(conn, config).await?;
    if hosts.is_empty() {
        problems.push(format!(
            "no host of group {:?} is running (no status heartbeat)",
            config.consumer_group
        ));
    }
    for host in &hosts {
        for reason in &host.not_ready {
            problems.push(format!("host {} is not ready: {reason}", host.consumer));
        }
        for failure in &host.failed_loads {
            problems.push(format!(
                "host {}: plugin {} failed to load: {}",
                host.consumer, failure.file, failure.reason
            ));
        }
    }
    let mut stream_names: BTreeSet<String> =
        DEFAULT_STREAMS.iter().map(|s| s.to_string()).collect();
    let served: BTreeSet<String> = hosts
        .iter()
        .flat_map(|h| h.streams.iter().cloned())
        .collect();
    stream_names.extend(served.iter().cloned());

    let mut streams = Vec::new();
    for stream in stream_names {
        let report = stream_report(conn, config, &stream).await?;
        if served.contains(&stream) && !report.group_exists {
            problems.push(format!(
                "stream {stream}: consumer group {:?} is missing",
                config.consumer_group
            ));
        }
        if let Some(age) = report.oldest_pending_age_ms
            && age > max_pending_age.as_millis() as u64
        {
            problems.push(format!(
                "stream {stream}: oldest pending entry is {} old (threshold {})",
                humantime::format_duration(Duration::from_millis(age / 1000 * 1000)),
                humantime::format_duration(max_pending_age)
            ));
        }
        if !served.contains(&stream) && report.length > 0 && !hosts.is_empty() {
            problems.push(format!(
                "stream {stream}: has entries but no loaded plugin handles it"
            ));
        }
        streams.push(report);
    }
    let dead_letters = dead_letter_report(conn, config).await?;
    let requests = match pool {
        Some(pool) => match requests_by_status(pool).await {
            Ok(requests) => Some(requests),
            Err(error) => {
                problems.push(format!("requests: {}", crate::text::causes(&error)));
                None
            }
        },
        None => None,
    };
    Ok(Report {
        healthy: problems.is_empty(),
        problems,
        requests,
        hosts,
        streams,
        dead_letters,
    })
}

async fn read_hosts<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
) -> Result<Vec<HostStatus>> {
    let pattern = format!(
        "{}kaleidoscope:hosts:{}:*",
        config.stream_prefix, config.consumer_group
    );
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .context("SCAN for host status documents failed")?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut hosts = Vec::new();
    for key in keys {
        let json: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await?;
        if let Some(status) = json.and_then(|j| serde_json::from_str::<HostStatus>(&j).ok()) {
            hosts.push(status);
        }
    }
    hosts.sort_by(|a, b| a.consumer.cmp(&b.consumer));
    Ok(hosts)
}

/// What Redis knows about one stream and the group on it.
pub async fn stream_report<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
    stream: &str,
) -> Result<StreamReport> {
    let key = config.stream_key(stream);
    let length: i64 = redis::cmd("XLEN").arg(&key).query_async(conn).await?;
    let mut report = StreamReport {
        stream: stream.to_string(),
        key: key.clone(),
        length,
        group_exists: false,
        lag: None,
        pending: 0,
        oldest_pending_age_ms: None,
        consumers: Vec::new(),
    };
    if length == 0 {
        let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(conn).await?;
        if exists == 0 {
            return Ok(report);
        }
    }
    let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&key)
        .query_async(conn)
        .await?;
    let Some(group) = groups
        .into_iter()
        .find(|g| g.get("name").and_then(text).as_deref() == Some(config.consumer_group.as_str()))
    else {
        return Ok(report);
    };
    report.group_exists = true;
    report.lag = group.get("lag").and_then(int);
    report.pending = group.get("pending").and_then(int).unwrap_or(0);
    if report.pending > 0 {
        let summary: Value = redis::cmd("XPENDING")
            .arg(&key)
            .arg(&config.consumer_group)
            .query_async(conn)
            .await?;
        if let Value::Array(parts) = summary
            && let Some(oldest) = parts.get(1).and_then(text)
            && let Some(millis) = oldest
                .split('-')
                .next()
                .and_then(|ms| ms.parse::<u64>().ok())
        {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            report.oldest_pending_age_ms = Some(now.saturating_sub(millis));
        }
    }
    let consumers: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&key)
        .arg(&config.consumer_group)
        .query_async(conn)
        .await?;
    report.consumers = consumers
        .into_iter()
        .map(|c| ConsumerReport {
            name: c.get("name").and_then(text).unwrap_or_default(),
            pending: c.get("pending").and_then(int).unwrap_or(0),
            idle_ms: c.get("idle").and_then(int).unwrap_or(0),
        })
        .collect();
    Ok(report)
}

async fn dead_letter_report<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
) -> Result<DeadLetterReport> {
    let key = config.dlq_key();
    let length: i64 = redis::cmd("XLEN").arg(&key).query_async(conn).await?;
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(DLQ_SCAN_LIMIT)
        .query_async(conn)
        .await?;
    let mut by_kind = BTreeMap::new();
    for (_, fields) in &entries {
        let kind = fields
            .get("failureKind")
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        *by_kind.entry(kind).or_insert(0) += 1;
    }
    Ok(DeadLetterReport {
        stream: config.dlq_stream.clone(),
        length,
        by_kind,
        scanned: entries.len(),
    })
}

/// The report as a human-readable table.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "health: {}\n",
        if report.healthy { "ok" } else { "UNHEALTHY" }
    ));
    for problem in &report.problems {
        out.push_str(&format!("  ! {problem}\n"));
    }
    out.push_str("\nstreams:\n");
    out.push_str(&format!(
        "  {:<40} {:>8} {:>6} {:>8} {:>14}  consumers (pending/idle)\n",
        "stream", "length", "lag", "pending", "oldest pending"
    ));
    for s in &report.streams {
        let lag = s.lag.map_or("-".to_string(), |l| l.to_string());
        let oldest = s.oldest_pending_age_ms.map_or("-".to_string(), |ms| {
            humantime::format_duration(Duration::from_millis(ms / 1000 * 1000)).to_string()
        });
        let consumers = if !s.group_exists {
            "(no group)".to_string()
        } else {
            s.consumers
                .iter()
                .map(|c| {
                    format!(
                        "{} ({}/{})",
                        c.name,
                        c.pending,
                        humantime::format_duration(Duration::from_millis(
                            c.idle_ms.max(0) as u64 / 1000 * 1000
                        ))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "  {:<40} {:>8} {:>6} {:>8} {:>14}  {}\n",
            s.stream, s.length, lag, s.pending, oldest, consumers
        ));
    }
    let kinds = counts(&report.dead_letters.by_kind);
    out.push_str(&format!(
        "\ndead letters ({}): {} {}\n",
        report.dead_letters.stream, report.dead_letters.length, kinds
    ));
    match &report.requests {
        Some(requests) if requests.is_empty() => out.push_str("requests: none\n"),
        Some(requests) => out.push_str(&format!("requests: {}\n", counts(requests))),
        None => out.push_str("requests: (database unavailable)\n"),
    }
    out.push_str("\nhosts:\n");
    if report.hosts.is_empty() {
        out.push_str("  (none running)\n");
    }
    for host in &report.hosts {
        out.push_str(&format!(
            "  {} (pid {}, up since {}, plugins from {}){}\n",
            host.consumer,
            host.pid,
            host.started_at,
            host.plugins_dir,
            if host.ready { "" } else { "  NOT READY" }
        ));
        for p in &host.plugins {
            out.push_str(&format!(
                "    {:<24} {:<10} {}  {:?}{}\n",
                p.name,
                p.version,
                &p.sha256[..p.sha256.len().min(12)],
                p.streams,
                if p.from_cache { "  (cached)" } else { "" }
            ));
        }
        for f in &host.failed_loads {
            out.push_str(&format!("    FAILED {}: {}\n", f.file, f.reason));
        }
    }
    out
}

/// `name=count name=count ...`
fn counts<N: std::fmt::Display>(counts: &BTreeMap<String, N>) -> String {
    counts
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}
