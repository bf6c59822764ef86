//! What `kaleidoscope status` reports: the hosts' [heartbeats](crate::heartbeat) combined with
//! what Redis knows about each stream (length, group lag, pending entries, consumers), the
//! dead-letter stream, and the tracked requests. Shared by the CLI, the `/metrics` scrape and the
//! demo; [`render`] turns a report into a table for people.

mod render;
pub mod rollouts;

pub use render::render;

use crate::config::Config;
use crate::heartbeat::{self, HostStatus};
use crate::redis_connection::RedisConnection;
use crate::streams::text;
use anyhow::{Context, Result};
use redis::Value;
use redis::aio::ConnectionLike;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How many dead letters `status` reads to count them by kind.
const DLQ_SCAN_LIMIT: usize = 10_000;

/// Every status a tracked request can have (the `CHECK` of `ml_requests.status`).
pub const REQUEST_STATUSES: [&str; 4] = [PENDING, "COMPLETED", "FAILED", "TIMED_OUT"];
/// A request still waiting for its results.
pub const PENDING: &str = "PENDING";

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
    /// The streams requests are published to, with the ML side's groups.
    pub request_streams: Vec<RequestStreamReport>,
    pub dead_letters: DeadLetterReport,
    /// The fleet's plugin store (see [`crate::persist::plugin_store`]); absent when the database
    /// could not be asked.
    pub deployed: Option<Vec<crate::persist::plugin_store::Stored>>,
    /// The rollouts in progress; absent when the database could not be asked.
    pub rollouts: Option<Vec<rollouts::RolloutReport>>,
    /// Reprocessing runs not ended, and those ended in the last day (see
    /// [`crate::reprocess`]); absent when the database could not be asked.
    pub reprocessing: Option<Vec<crate::persist::reprocess_runs::RunRow>>,
    /// The nodes of the Redis Cluster, failed ones included; absent on one Redis server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_nodes: Option<Vec<crate::redis_connection::cluster::NodeState>>,
}

/// One inbound stream as Redis sees it.
#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub stream: String,
    pub key: String,
    /// The cluster node (`host:port` of the primary) that holds the stream; absent on one Redis
    /// server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why the stream could not be read (its node is down, say); only on a cluster, where the
    /// other nodes' streams are reported all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

/// A request stream (this host → the ML services) and the groups that consume it: whether the
/// ML side keeps up is the other half of "why has nothing arrived?".
#[derive(Debug, Serialize)]
pub struct RequestStreamReport {
    pub stream: String,
    pub key: String,
    pub length: i64,
    /// The ML side's consumer groups; none means nothing consumes the stream yet.
    pub groups: Vec<GroupReport>,
}

/// One consumer group of a request stream.
#[derive(Debug, Serialize)]
pub struct GroupReport {
    pub name: String,
    /// Entries not yet delivered to the group (`None` when Redis cannot tell, after a trim).
    pub lag: Option<i64>,
    pub pending: i64,
    pub consumers: i64,
}

/// When `status` calls a stream unhealthy (its exit code).
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// The oldest pending entry may be at most this old.
    pub max_pending_age: Duration,
    /// At most this many entries may wait undelivered (no limit when `None`).
    pub max_lag: Option<u64>,
}

/// Collects the report, with the `thresholds` a stream must keep to be healthy.
pub async fn collect(
    conn: &mut RedisConnection,
    config: &Config,
    pool: Option<&sqlx::PgPool>,
    thresholds: Thresholds,
) -> Result<Report> {
    let mut problems = Vec::new();
    let hosts = heartbeat::read_all(conn, config).await?;
    if hosts.is_empty() {
        problems.push(format!(
            "no host of group {:?} is running (no status heartbeat)",
            config.consumer_group
        ));
    }
    for host in &hosts {
        problems.extend(host_problems(host));
    }
    let mut stream_names: BTreeSet<String> = crate::ml::SEED_RESULT_STREAMS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let served: BTreeSet<String> = hosts
        .iter()
        .flat_map(|h| h.streams.iter().cloned())
        .collect();
    stream_names.extend(served.iter().cloned());

    let redis_nodes = if conn.is_cluster() {
        let nodes = crate::redis_connection::cluster::nodes(conn).await?;
        problems.extend(node_problems(&nodes));
        Some(nodes)
    } else {
        None
    };
    let mut streams = Vec::new();
    for stream in stream_names {
        let node = redis_nodes.as_deref().and_then(|nodes| {
            crate::redis_connection::cluster::primary_for(nodes, &config.stream_key(&stream))
                .map(str::to_string)
        });
        let report = match stream_report(conn, config, &stream).await {
            Ok(report) => report,
            // On a cluster one node down hides only its own streams.
            Err(error) if conn.is_cluster() => {
                let error = crate::text::causes(&error);
                problems.push(format!(
                    "stream {stream}: cannot be read from node {}: {error}",
                    node.as_deref().unwrap_or("(no node serves its slot)")
                ));
                StreamReport::unread(config, &stream, error)
            }
            Err(error) => return Err(error),
        };
        let report = StreamReport { node, ..report };
        problems.extend(stream_problems(
            config,
            &thresholds,
            &report,
            served.contains(&stream),
            !hosts.is_empty(),
        ));
        streams.push(report);
    }
    let mut request_streams = Vec::new();
    for stream in crate::ml::REQUEST_STREAMS {
        match request_stream_report(conn, config, stream).await {
            Ok(report) => request_streams.push(report),
            // On a cluster one node down hides only its own streams.
            Err(error) if conn.is_cluster() => problems.push(format!(
                "request stream {stream}: cannot be read: {}",
                crate::text::causes(&error)
            )),
            Err(error) => return Err(error),
        }
    }
    let dead_letters = match dead_letter_report(conn, config).await {
        Ok(report) => report,
        Err(error) if conn.is_cluster() => {
            problems.push(format!(
                "dead-letter stream {}: cannot be read: {}",
                config.dlq_stream,
                crate::text::causes(&error)
            ));
            DeadLetterReport {
                stream: config.dlq_stream.clone(),
                length: 0,
                by_kind: BTreeMap::new(),
                scanned: 0,
            }
        }
        Err(error) => return Err(error),
    };
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
    let deployed = match pool {
        Some(pool) => {
            let fleet = crate::persist::plugin_store::fleet(config);
            match crate::persist::plugin_store::list(pool, &fleet).await {
                Ok(deployed) => Some(deployed),
                Err(error) => {
                    problems.push(format!("plugin store: {}", crate::text::causes(&error)));
                    None
                }
            }
        }
        None => None,
    };
    let rollouts = match pool {
        Some(pool) => match rollouts::collect(pool, config, &hosts, None, true).await {
            Ok(rollouts) => Some(rollouts),
            Err(error) => {
                problems.push(format!("rollouts: {}", crate::text::causes(&error)));
                None
            }
        },
        None => None,
    };
    let reprocessing = match pool {
        Some(pool) => {
            let fleet = crate::persist::plugin_store::fleet(config);
            match crate::persist::reprocess_runs::recent(pool, &fleet, 24.0).await {
                Ok(runs) => Some(runs),
                Err(error) => {
                    problems.push(format!(
                        "reprocessing runs: {}",
                        crate::text::causes(&error)
                    ));
                    None
                }
            }
        }
        None => None,
    };
    problems.extend(build_problems(
        &hosts,
        deployed.as_deref().unwrap_or_default(),
        rollouts.as_deref().unwrap_or_default(),
    ));
    Ok(Report {
        healthy: problems.is_empty(),
        problems,
        requests,
        deployed,
        rollouts,
        reprocessing,
        redis_nodes,
        hosts,
        streams,
        request_streams,
        dead_letters,
    })
}

/// Live hosts that run another build of a plugin than the plugin store deployed (a host that
/// cannot write its plugins directory), or, for plugins not deployed through the store, hosts
/// that run different builds of one plugin: the fleet drifted. Likewise a host that cannot follow
/// a running rollout.
fn build_problems(
    hosts: &[HostStatus],
    deployed: &[crate::persist::plugin_store::Stored],
    rollouts: &[rollouts::RolloutReport],
) -> Vec<String> {
    let build_of = crate::plugin::build_of;
    let mut problems = Vec::new();
    for report in rollouts {
        for host in report.hosts.iter().filter(|h| h.state == "refused") {
            problems.push(format!(
                "rollout {} of {}: host {} cannot follow it: {}",
                report.rollout.id,
                report.rollout.plugin,
                host.host,
                host.reason.as_deref().unwrap_or_default()
            ));
        }
    }
    let mut builds: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for host in hosts.iter().filter(|h| h.fresh()) {
        for plugin in &host.plugins {
            builds
                .entry(plugin.name.as_str())
                .or_default()
                .entry(build_of(&plugin.sha256))
                .or_default()
                .push(host.consumer.as_str());
        }
    }
    for (name, by_build) in &builds {
        match deployed.iter().find(|d| d.name == *name) {
            Some(stored) => {
                for (build, hosts) in by_build
                    .iter()
                    .filter(|(b, _)| **b != build_of(&stored.sha256))
                {
                    problems.push(format!(
                        "plugin {name}: host(s) {} run build {build}, the plugin store deployed {} (a host syncs within seconds; longer means it cannot write its plugins directory)",
                        hosts.join(", "),
                        build_of(&stored.sha256)
                    ));
                }
            }
            None if by_build.len() > 1 => problems.push(format!(
                "plugin {name}: the hosts run different builds ({}); deploy one with `kaleidoscope plugin deploy` so all run the same",
                by_build
                    .iter()
                    .map(|(build, hosts)| format!("{build} on {}", hosts.join(", ")))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            None => {}
        }
    }
    problems
}

/// What is wrong with one host, as its heartbeat says.
fn host_problems(host: &HostStatus) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(age) = host.heartbeat_age_ms
        && age > heartbeat::STALE_AFTER.as_millis() as u64
    {
        problems.push(format!(
            "host {}: last heartbeat {} ago (rewritten every {}): the host is stalled or paused",
            host.consumer,
            humantime::format_duration(Duration::from_secs(age / 1000)),
            humantime::format_duration(heartbeat::HEARTBEAT)
        ));
    }
    for reason in &host.not_ready {
        problems.push(format!("host {} is not ready: {reason}", host.consumer));
    }
    for failure in &host.failed_loads {
        problems.push(format!(
            "host {}: plugin {} failed to load: {}",
            host.consumer, failure.file, failure.reason
        ));
    }
    problems
}

/// What is wrong with one stream: a missing group where a plugin serves it, entries pending or
/// waiting past the thresholds, or entries nothing would handle.
fn stream_problems(
    config: &Config,
    thresholds: &Thresholds,
    report: &StreamReport,
    served: bool,
    hosts_running: bool,
) -> Vec<String> {
    let stream = &report.stream;
    let mut problems = Vec::new();
    if served && !report.group_exists {
        problems.push(format!(
            "stream {stream}: consumer group {:?} is missing",
            config.consumer_group
        ));
    }
    if let Some(age) = report.oldest_pending_age_ms
        && age > thresholds.max_pending_age.as_millis() as u64
    {
        problems.push(format!(
            "stream {stream}: oldest pending entry is {} old (threshold {})",
            humantime::format_duration(Duration::from_millis(age / 1000 * 1000)),
            humantime::format_duration(thresholds.max_pending_age)
        ));
    }
    if let (Some(max), Some(lag)) = (thresholds.max_lag, report.lag)
        && u64::try_from(lag).unwrap_or(0) > max
    {
        problems.push(format!(
            "stream {stream}: {lag} entries wait undelivered (threshold {max})"
        ));
    }
    if !served && report.length > 0 && hosts_running {
        problems.push(format!(
            "stream {stream}: has entries but no loaded plugin handles it"
        ));
    }
    problems
}

impl StreamReport {
    /// The row of a stream that could not be read, with why.
    fn unread(config: &Config, stream: &str, error: String) -> StreamReport {
        StreamReport {
            stream: stream.to_string(),
            key: config.stream_key(stream),
            node: None,
            error: Some(error),
            length: 0,
            group_exists: false,
            lag: None,
            pending: 0,
            oldest_pending_age_ms: None,
            consumers: Vec::new(),
        }
    }
}

/// Cluster nodes that are down, and slots no primary serves.
fn node_problems(nodes: &[crate::redis_connection::cluster::NodeState]) -> Vec<String> {
    let mut problems: Vec<String> = nodes
        .iter()
        .filter(|n| !n.up)
        .map(|n| {
            format!(
                "Redis Cluster node {} ({}) is down ({})",
                n.node, n.role, n.flags
            )
        })
        .collect();
    let served: u32 = nodes.iter().filter(|n| n.up).map(|n| n.slots).sum();
    let all = u32::from(crate::redis_connection::cluster::SLOTS);
    if served < all {
        problems.push(format!(
            "Redis Cluster: {} of {all} slots have no primary that is up (their streams cannot be read or written)",
            all - served
        ));
    }
    problems
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
        node: None,
        error: None,
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

/// A request stream's length and every consumer group on it (the ML services').
pub async fn request_stream_report<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
    stream: &str,
) -> Result<RequestStreamReport> {
    let key = config.stream_key(stream);
    let length: i64 = redis::cmd("XLEN").arg(&key).query_async(conn).await?;
    // An empty stream may still exist (with its groups); a missing one has none to ask about.
    let exists = length > 0 || {
        let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(conn).await?;
        exists > 0
    };
    let groups: Vec<HashMap<String, Value>> = if !exists {
        Vec::new()
    } else {
        redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .query_async(conn)
            .await?
    };
    Ok(RequestStreamReport {
        stream: stream.to_string(),
        key,
        length,
        groups: groups
            .into_iter()
            .map(|g| GroupReport {
                name: g.get("name").and_then(text).unwrap_or_default(),
                lag: g.get("lag").and_then(int),
                pending: g.get("pending").and_then(int).unwrap_or(0),
                consumers: g.get("consumers").and_then(int).unwrap_or(0),
            })
            .collect(),
    })
}

/// The dead-letter stream's length and its newest entries counted by failure kind.
pub async fn dead_letter_report<C: ConnectionLike + Send>(
    conn: &mut C,
    config: &Config,
) -> Result<DeadLetterReport> {
    let key = config.dlq_key();
    let length: i64 = redis::cmd("XLEN").arg(&key).query_async(conn).await?;
    let entries: crate::dead_letter::RawEntries = redis::cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(DLQ_SCAN_LIMIT)
        .query_async(conn)
        .await?;
    let entries = crate::dead_letter::decode_lossy(entries);
    let mut by_kind = BTreeMap::new();
    for (_, fields) in &entries {
        let kind = fields
            .get(crate::dead_letter::field::FAILURE_KIND)
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

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(stream: &str) -> StreamReport {
        StreamReport {
            stream: stream.to_string(),
            key: stream.to_string(),
            node: None,
            error: None,
            length: 0,
            group_exists: true,
            lag: Some(0),
            pending: 0,
            oldest_pending_age_ms: None,
            consumers: Vec::new(),
        }
    }

    fn config() -> Config {
        Config::from_sources(None, &Default::default(), &Default::default()).unwrap()
    }

    fn thresholds() -> Thresholds {
        Thresholds {
            max_pending_age: Duration::from_secs(60),
            max_lag: Some(100),
        }
    }

    #[test]
    fn a_healthy_stream_has_no_problem_and_each_threshold_names_its_stream() {
        let config = config();
        assert!(stream_problems(&config, &thresholds(), &report("s"), true, true).is_empty());
        let mut stuck = report("s");
        stuck.oldest_pending_age_ms = Some(120_000);
        stuck.lag = Some(101);
        let problems = stream_problems(&config, &thresholds(), &stuck, true, true);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("stream s: oldest pending entry is 2m old"));
        assert!(problems[1].starts_with("stream s: 101 entries wait undelivered"));
    }

    #[test]
    fn a_missing_group_matters_where_a_plugin_serves_and_unserved_entries_where_hosts_run() {
        let config = config();
        let mut lost = report("s");
        lost.group_exists = false;
        assert_eq!(
            stream_problems(&config, &thresholds(), &lost, true, true).len(),
            1
        );
        assert!(stream_problems(&config, &thresholds(), &lost, false, true).is_empty());
        let mut waiting = report("s");
        waiting.length = 3;
        let unserved = stream_problems(&config, &thresholds(), &waiting, false, true);
        assert_eq!(
            unserved,
            ["stream s: has entries but no loaded plugin handles it"]
        );
        assert!(stream_problems(&config, &thresholds(), &waiting, false, false).is_empty());
    }

    #[test]
    fn a_host_is_reported_for_a_stale_heartbeat_unreadiness_and_failed_loads() {
        let host: HostStatus = serde_json::from_value(serde_json::json!({
            "consumer": "h1", "group": "g", "pid": 1, "started_at": "", "updated_at": "",
            "heartbeat_age_ms": 3_600_000, "plugins_dir": "/p", "ready": false,
            "not_ready": ["PostgreSQL unavailable"], "streams": [], "plugins": [],
            "failed_loads": [{"file": "bad.wasm", "reason": "not a component"}]
        }))
        .unwrap();
        let problems = host_problems(&host);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("host h1: last heartbeat 1h ago"));
        assert_eq!(problems[1], "host h1 is not ready: PostgreSQL unavailable");
        assert_eq!(
            problems[2],
            "host h1: plugin bad.wasm failed to load: not a component"
        );
    }
}
