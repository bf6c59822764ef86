//! What a Redis Cluster asks of the host beyond routing each command by its key: the seed
//! nodes' URLs, the slot of a key, the cluster's topology (which primary serves a stream), walks
//! over every key (`SCAN` runs on one node only), and pipelines whose keys sit on several nodes.
//!
//! The stream names come from the producers (the seed's `face-detection-results` and the
//! others), so the streams are spread over the cluster by their own names: one stream is one key
//! on one node. No command of the host's hot path names two keys; where a pipeline does (a
//! batch's emits to other streams before its XACK), it is split per node here.

use super::RedisConnection;
use anyhow::{Context, Result, anyhow, bail};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Value};
use std::collections::BTreeMap;

/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// The URL of each seed node `host:port` of `nodes`: `url`'s scheme and credentials with the
/// node's address (a cluster has no database but 0, and no Unix sockets). An error names the
/// bad node.
pub(super) fn node_urls(url: &str, nodes: &[String]) -> Result<Vec<String>> {
    crate::config::check_cluster_url(url)?;
    let base = redis::parse_redis_url(url)
        .ok_or_else(|| anyhow!("invalid Redis URL {}", crate::text::redact(url)))?;
    if !matches!(base.scheme(), "redis" | "rediss" | "valkey" | "valkeys") {
        bail!(
            "`redis_url` {} is a Unix socket; a Redis Cluster is reached over TCP",
            crate::text::redact(url)
        );
    }
    nodes
        .iter()
        .map(|node| {
            let (host, port) = crate::config::split_cluster_node(node)?;
            let mut node_url = base.clone();
            node_url
                .set_host(Some(host))
                .map_err(|e| anyhow!("invalid host in Redis Cluster node {node:?}: {e}"))?;
            node_url
                .set_port(Some(port))
                .map_err(|()| anyhow!("invalid Redis Cluster node {node:?}"))?;
            node_url.set_path("");
            Ok(node_url.to_string())
        })
        .collect()
}

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag — the part between the
/// first `{` and the next `}`, when that is not empty — modulo [`SLOTS`]. Keys with one tag sit on
/// one node.
pub fn slot_of(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One node of the cluster as `CLUSTER NODES` describes it: which slots it serves (so which
/// node holds a stream), whether it is up (`status` and `/metrics` name a node that is down, key
/// walks leave it out).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeState {
    /// `host:port`.
    pub node: String,
    /// `primary` or `replica`.
    pub role: String,
    /// The primary a replica copies (`host:port`), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<String>,
    /// Slots it serves (a primary).
    pub slots: u32,
    /// Those slots, as `(first, last)` ranges.
    #[serde(skip)]
    pub ranges: Vec<(u16, u16)>,
    /// False when the cluster marks it failed (`fail`, `fail?`) or its link is disconnected.
    pub up: bool,
    /// The flags as the cluster gives them (`master,fail`, `slave`, …).
    pub flags: String,
}

/// Every node the cluster knows, failed ones included, sorted by address.
pub async fn nodes(conn: &mut RedisConnection) -> Result<Vec<NodeState>> {
    let RedisConnection::Cluster(cluster) = conn else {
        return Ok(Vec::new());
    };
    let reply = cluster
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await
        .context("CLUSTER NODES failed")?;
    let text: String =
        redis::from_redis_value(reply).map_err(|e| anyhow!("CLUSTER NODES replied: {e}"))?;
    Ok(parse_nodes(&text))
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus[,host]> <flags> <primary id|-> <ping> <pong>
/// <epoch> <link> <slot>…` per line.
fn parse_nodes(text: &str) -> Vec<NodeState> {
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 8)
        .collect();
    let address = |fields: &[&str]| -> String {
        fields[1]
            .split(['@', ','])
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let by_id: BTreeMap<&str, String> = lines.iter().map(|f| (f[0], address(f))).collect();
    let mut nodes: Vec<NodeState> = lines
        .iter()
        .map(|fields| {
            let flags = fields[2];
            let primary = flags.split(',').any(|f| f == "master");
            let ranges: Vec<(u16, u16)> = fields[8..]
                .iter()
                // `[slot->-id]`, `[slot-<-id]`: a slot moving, still served here.
                .filter(|range| !range.starts_with('['))
                .filter_map(|range| {
                    let (first, last) = range.split_once('-').unwrap_or((range, range));
                    Some((first.parse().ok()?, last.parse().ok()?))
                })
                .collect();
            let slots = ranges
                .iter()
                .map(|(first, last)| u32::from(*last) - u32::from(*first) + 1)
                .sum();
            NodeState {
                node: address(fields),
                role: if primary { "primary" } else { "replica" }.to_string(),
                replica_of: by_id.get(fields[3]).cloned(),
                slots,
                ranges,
                up: !flags
                    .split(',')
                    .any(|f| f == "fail" || f == "fail?" || f == "noaddr")
                    && fields[7] == "connected",
                flags: flags.to_string(),
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    nodes
}

/// The primary (`host:port`) that serves `key` among `nodes`, if any does (a cluster losing a
/// primary with no replica to promote leaves its slots unserved).
pub fn primary_for<'n>(nodes: &'n [NodeState], key: &str) -> Option<&'n str> {
    let slot = slot_of(key.as_bytes());
    nodes
        .iter()
        .find(|n| n.role == "primary" && n.ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .map(|n| n.node.as_str())
}

/// Every key matching `pattern` on every primary of the cluster that is up and answers. A
/// primary that is down, or does not answer (down, not yet marked so), is left out — its keys
/// are not listed, the latter named in a warning — so a listing (the hosts' heartbeats) still
/// works with one node down; only when no primary answers is it an error.
pub(super) async fn keys_matching(
    conn: &mut RedisConnection,
    pattern: &str,
) -> Result<Vec<String>> {
    let primaries: Vec<String> = nodes(conn)
        .await?
        .into_iter()
        .filter(|n| n.role == "primary" && n.up && n.slots > 0)
        .map(|n| n.node)
        .collect();
    let RedisConnection::Cluster(conn) = conn else {
        bail!("not a Redis Cluster");
    };
    let mut keys = Vec::new();
    let mut failures = Vec::new();
    if primaries.is_empty() {
        bail!("no primary of the Redis Cluster is up to list keys matching {pattern:?}");
    }
    for node in &primaries {
        match scan_node(conn, node, pattern).await {
            Ok(found) => keys.extend(found),
            Err(error) => {
                tracing::warn!(node, "keys matching {pattern:?} not listed: {error:#}");
                failures.push(error);
            }
        }
    }
    match failures.pop() {
        Some(error) if failures.len() + 1 == primaries.len() => Err(error),
        _ => Ok(keys),
    }
}

/// Every key matching `pattern` on the primary `node` (`host:port`).
async fn scan_node(conn: &mut ClusterConnection, node: &str, pattern: &str) -> Result<Vec<String>> {
    let (host, port) = crate::config::split_cluster_node(node)?;
    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.to_string(),
        port,
    });
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let reply = conn
            .route_command(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(500)
                    .clone(),
                route.clone(),
            )
            .await
            .with_context(|| format!("SCAN for keys matching {pattern:?} on {node} failed"))?;
        let (next, batch): (u64, Vec<String>) =
            redis::from_redis_value(reply).map_err(|e| anyhow!("SCAN on {node} replied: {e}"))?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Runs `commands` as one pipeline per slot, all at once, and returns their replies in the
/// order of `commands` (a refused command as its [`Value::ServerError`]).
pub(super) async fn pipelined_per_slot(
    conn: &mut ClusterConnection,
    commands: Vec<Cmd>,
) -> redis::RedisResult<Vec<Value>> {
    let count = commands.len();
    let mut by_slot: BTreeMap<Option<u16>, (Vec<usize>, redis::Pipeline)> = BTreeMap::new();
    for (at, command) in commands.into_iter().enumerate() {
        let slot = first_key(&command).map(slot_of);
        let (positions, pipe) = by_slot.entry(slot).or_insert_with(|| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            (Vec::new(), pipe)
        });
        positions.push(at);
        pipe.add_command(command);
    }
    let mut sent = tokio::task::JoinSet::new();
    for (positions, pipe) in by_slot.into_values() {
        let mut conn = conn.clone();
        sent.spawn(async move {
            let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(positions.into_iter().zip(replies).collect::<Vec<_>>())
        });
    }
    let mut replies = vec![Value::Nil; count];
    while let Some(group) = sent.join_next().await {
        let group = group.map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "pipeline task failed",
                e.to_string(),
            ))
        })??;
        for (at, reply) in group {
            replies[at] = reply;
        }
    }
    Ok(replies)
}

/// The key of a command whose key is its first argument (XADD, XACK, XRANGE, …).
fn first_key(command: &Cmd) -> Option<&[u8]> {
    match command.args_iter().nth(1)? {
        redis::Arg::Simple(key) => Some(key),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters_own() {
        // Values from `CLUSTER KEYSLOT` of Redis 7.
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(
            slot_of(b"face-detection-results"),
            slot_of(b"face-detection-results")
        );
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn node_urls_carry_the_scheme_and_credentials_of_the_url() {
        let urls = node_urls(
            "redis://user:p%40ss@ignored:1",
            &["10.0.0.5:7000".into(), "redis-2.internal:7001".into()],
        )
        .unwrap();
        assert_eq!(
            urls,
            [
                "redis://user:p%40ss@10.0.0.5:7000",
                "redis://user:p%40ss@redis-2.internal:7001"
            ]
        );
    }

    #[test]
    fn a_bad_node_or_a_database_index_is_named() {
        let error = node_urls("redis://127.0.0.1", &["10.0.0.5".into()]).unwrap_err();
        assert!(error.to_string().contains("\"10.0.0.5\""), "{error}");
        let error = node_urls("redis://127.0.0.1", &["10.0.0.5:x".into()]).unwrap_err();
        assert!(error.to_string().contains("port"), "{error}");
        let error = node_urls("redis://127.0.0.1/3", &["10.0.0.5:7000".into()]).unwrap_err();
        assert!(error.to_string().contains("database 3"), "{error:#}");
    }

    #[test]
    fn cluster_nodes_name_roles_slots_and_failed_nodes() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master,fail - 1 1 2 disconnected
c3 127.0.0.1:7004@17004,redis-4 master - 0 5 7 connected 5461-10922 [5461->-a1]
d4 127.0.0.1:7003@17003 slave a1 0 0 1 connected
";
        let nodes = parse_nodes(text);
        let row = |n: &str| nodes.iter().find(|s| s.node == n).unwrap();
        assert_eq!(
            (
                row("127.0.0.1:7000").role.as_str(),
                row("127.0.0.1:7000").slots
            ),
            ("primary", 5461)
        );
        assert!(!row("127.0.0.1:7001").up);
        assert_eq!(row("127.0.0.1:7004").slots, 5462);
        assert_eq!(
            row("127.0.0.1:7003").replica_of.as_deref(),
            Some("127.0.0.1:7000")
        );
        assert!(row("127.0.0.1:7003").up);
        // Which node holds a key: the primary whose ranges hold its slot (`foo` is slot 12182,
        // served by no one in this listing).
        let key_in = |slot: u16| {
            (0..u32::MAX)
                .map(|n| n.to_string())
                .find(|k| slot_of(k.as_bytes()) == slot)
                .unwrap()
        };
        assert_eq!(primary_for(&nodes, &key_in(0)), Some("127.0.0.1:7000"));
        assert_eq!(primary_for(&nodes, &key_in(5461)), Some("127.0.0.1:7004"));
        assert_eq!(primary_for(&nodes, "foo"), None);
    }
}
