//! A Redis Cluster of the test's own: 3 primaries and 3 replicas, each a `redis-server` child on
//! free local ports, created with `redis-cli --cluster create`, and killed (with its files
//! removed) when the value is dropped. Tests that kill a node get a cluster of their own; the
//! machine's Redis on 6379 is never touched.

use crate::support::{DEADLINE, OutputByDeadline, eventually, unique};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Node timeout of the test cluster: a killed primary is failed over within a few seconds.
const NODE_TIMEOUT_MS: u64 = 1_000;

/// One `redis-server` of the cluster.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A running 3 + 3 Redis Cluster.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// More `redis-server` options for every node.
    options: Vec<String>,
}

impl RedisCluster {
    /// Starts six nodes, joins them into a cluster of three primaries with a replica each, and
    /// waits until every node sees all slots served and every replica is in sync.
    pub async fn start() -> RedisCluster {
        RedisCluster::start_with(&[]).await
    }

    /// [`RedisCluster::start`] with more `redis-server` options (`["--name", "value"]`).
    pub async fn start_with(options: &[&str]) -> RedisCluster {
        let dir = std::env::temp_dir().join(unique("redis-cluster"));
        std::fs::create_dir_all(&dir).expect("a directory for the cluster's files");
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
            options: options.iter().map(|o| o.to_string()).collect(),
        };
        for port in free_ports(6) {
            let child = cluster.spawn_node(port);
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            let url = url(node.port);
            eventually(&format!("redis-server on {} to answer", node.port), || {
                let url = url.clone();
                async move { ping(&url).await.then_some(()) }
            })
            .await;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let created = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output_by_deadline()
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.await_healthy().await;
        cluster
    }

    fn spawn_node(&self, port: u16) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("{port}.log")))
            .expect("a log file for a cluster node");
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // A replica may always take over, however long it was cut off.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.options)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)")
    }

    /// `REDIS_CLUSTER_NODES` for this cluster: every node's `host:port`.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node reports `cluster_state:ok` with all slots served, and
    /// every replica's link to its primary is up.
    pub async fn await_healthy(&self) {
        let ports = self.running_ports();
        eventually("the test cluster to be healthy", || {
            let ports = ports.clone();
            async move {
                for port in ports {
                    let url = url(port);
                    let cluster = info(&url, "CLUSTER", Some("INFO")).await?;
                    if !cluster.contains("cluster_state:ok")
                        || !cluster.contains("cluster_slots_ok:16384")
                    {
                        return None;
                    }
                    let replication = info(&url, "INFO", Some("replication")).await?;
                    if replication.contains("role:slave")
                        && !replication.contains("master_link_status:up")
                    {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    /// The port of the primary that serves `key` now.
    pub async fn primary_of(&self, key: &str) -> u16 {
        let node = *self.running_ports().first().expect("a running node");
        let mut conn = connect(&url(node))
            .await
            .expect("connect to a cluster node");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER SLOTS");
        for range in ranges {
            let parts: Vec<redis::Value> =
                redis::from_redis_value(range).expect("a CLUSTER SLOTS range");
            let first: i64 = redis::from_redis_value(parts[0].clone()).expect("a slot");
            let last: i64 = redis::from_redis_value(parts[1].clone()).expect("a slot");
            if (first..=last).contains(&slot) {
                let primary: Vec<redis::Value> =
                    redis::from_redis_value(parts[2].clone()).expect("a node");
                let port: i64 = redis::from_redis_value(primary[1].clone()).expect("a port");
                return u16::try_from(port).expect("a port");
            }
        }
        panic!("no primary serves slot {slot} of {key:?}");
    }

    /// Moves the slot of `key`, with its keys, from the primary serving it to another primary
    /// (as `redis-cli --cluster reshard` moves slots: IMPORTING, MIGRATING, MIGRATE, NODE), while
    /// clients go on using it; returns the new primary's port.
    pub async fn move_slot_of(&self, key: &str) -> u16 {
        let from = self.primary_of(key).await;
        let to = self
            .primaries()
            .await
            .into_iter()
            .find(|p| *p != from)
            .expect("another primary");
        let mut source = connect(&url(from)).await.expect("the source primary");
        let mut target = connect(&url(to)).await.expect("the target primary");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut source)
            .await
            .expect("CLUSTER KEYSLOT");
        let id = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query_async::<String>(&mut conn)
                    .await
                    .expect("CLUSTER MYID")
            }
        };
        let (source_id, target_id) = (id(&mut source).await, id(&mut target).await);
        let set_slot = |conn: &mut redis::aio::MultiplexedConnection, state: &str, node: &str| {
            let mut conn = conn.clone();
            let (state, node) = (state.to_string(), node.to_string());
            async move {
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg(&state)
                    .arg(&node)
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state}: {e}"));
            }
        };
        set_slot(&mut target, "IMPORTING", &source_id).await;
        set_slot(&mut source, "MIGRATING", &target_id).await;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut source)
                .await
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(10_000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut source)
                .await
                .expect("MIGRATE");
        }
        set_slot(&mut target, "NODE", &target_id).await;
        set_slot(&mut source, "NODE", &target_id).await;
        for port in self.running_ports() {
            if let Some(mut other) = connect(&url(port)).await {
                let _: redis::RedisResult<()> = redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("NODE")
                    .arg(&target_id)
                    .query_async(&mut other)
                    .await;
            }
        }
        to
    }

    /// The port of the replica of the primary on `port`.
    pub async fn replica_of(&self, port: u16) -> u16 {
        let primary = format!("master_port:{port}");
        self.replication()
            .await
            .into_iter()
            .find(|(_, info)| info.contains("role:slave") && info.contains(&primary))
            .map(|(replica, _)| replica)
            .unwrap_or_else(|| panic!("no replica of {port}"))
    }

    /// The ports of the running primaries.
    async fn primaries(&self) -> Vec<u16> {
        self.replication()
            .await
            .into_iter()
            .filter(|(_, info)| info.contains("role:master"))
            .map(|(port, _)| port)
            .collect()
    }

    /// `INFO replication` of every running node that answers.
    async fn replication(&self) -> Vec<(u16, String)> {
        let mut nodes = Vec::new();
        for port in self.running_ports() {
            if let Some(info) = info(&url(port), "INFO", Some("replication")).await {
                nodes.push((port, info));
            }
        }
        nodes
    }

    fn running_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Kills the node on `port` with SIGKILL (no chance to hand anything over).
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node on `port` again (killed by [`RedisCluster::kill`]); it rejoins the cluster
    /// from its nodes file, as a replica of whichever node took over its slots.
    pub fn restart(&mut self, port: u16) {
        let child = self.spawn_node(port);
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        assert!(node.child.is_none(), "node {port} is running");
        node.child = Some(child);
    }

    /// Waits until a node other than `dead` serves `key` as primary (its replica was promoted),
    /// and returns its port.
    pub async fn await_failover(&self, key: &str, dead: u16) -> u16 {
        let started = Instant::now();
        loop {
            let port = self.primary_of(key).await;
            if port != dead {
                return port;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no replica took over {key:?} from {dead} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `count` ports free now whose cluster bus ports (port + 10000) are free too.
fn free_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut held = Vec::new();
    while ports.len() < count {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        let bus_free = port
            .checked_add(10_000)
            .is_some_and(|bus| TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free && !ports.contains(&port) {
            ports.push(port);
        }
        // Held until all are chosen, so the same port is not handed out twice.
        held.push(listener);
    }
    ports
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

async fn connect(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()
}

async fn ping(url: &str) -> bool {
    let Some(mut conn) = connect(url).await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

/// The text of `command [section]` on the node at `url` (`CLUSTER INFO`, `INFO replication`).
async fn info(url: &str, command: &str, section: Option<&str>) -> Option<String> {
    let mut conn = connect(url).await?;
    let mut cmd = redis::cmd(command);
    if let Some(section) = section {
        cmd.arg(section);
    }
    cmd.query_async::<String>(&mut conn).await.ok()
}
