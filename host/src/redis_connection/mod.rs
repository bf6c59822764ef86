//! Opening connections to Redis — one server or a Redis Cluster — from one place, with one set
//! of timeouts and errors that name the server.
//!
//! [`RedisClient`] is what the configuration says to connect to: the server of `REDIS_URL`, or
//! the cluster whose seed nodes `REDIS_CLUSTER_NODES` names (with `REDIS_URL`'s credentials for
//! every node). Every connection it opens is a [`RedisConnection`], so the code above this module
//! sends its commands the same way to either; on a cluster each command goes to the node that
//! holds its key, and `MOVED`/`ASK` redirections, slot refreshes and reconnections after a
//! failover are the cluster client's work.
//!
//! Two kinds of connection exist, and only two:
//! - the **shared** connection ([`RedisClient::shared`]): reconnecting, for short commands
//!   (XADD, XACK, heartbeats, probes), used by many tasks at once;
//! - a **dedicated** connection ([`RedisClient::dedicated`]): one task's own, whose response
//!   timeout the task chooses because its commands may block on the server (a consumer's
//!   `XREADGROUP … BLOCK`, which holds its connection — on a cluster, its connection to the node
//!   of that stream — for the whole poll). Command-line tools use one with the
//!   [`RESPONSE_TIMEOUT`] ([`open`]).
//!
//! What differs on a cluster — commands whose keys sit on several nodes, walks over every key —
//! is in [`cluster`].

pub mod cluster;

use crate::config::Config;
use crate::text::redact;
use anyhow::{Context, Result, bail};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, Value};
use std::time::Duration;

/// How long to wait for a TCP connection (and handshake) to Redis. Redis on the same network
/// answers in milliseconds; five seconds tells a dead server from a slow one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the answer to a short command. Long enough to ride out a slow fork or a
/// big XADD batch; short enough that a stalled Redis is reported as an outage, not waited out.
/// On a cluster it bounds a command with its redirections and retries as a whole.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection attempts the shared connection makes per failure before the command fails;
/// the next command tries again, so a long outage costs a failed command, not a hung task.
const RECONNECT_ATTEMPTS: usize = 1;
/// Retries of one command on a cluster (redirections, a node being reconnected), within the
/// response timeout; a failover that outlasts them is an outage, waited out as a Redis restart.
const CLUSTER_RETRIES: u32 = 6;

/// What the configuration says to connect to: one Redis server, or a Redis Cluster.
#[derive(Clone)]
pub struct RedisClient {
    servers: Servers,
    /// `host:port` of the server, or `cluster host:port,…` (never a password), for messages.
    description: String,
}

#[derive(Clone)]
enum Servers {
    Single(Client),
    /// The seed nodes' URLs (each with the credentials of `REDIS_URL`).
    Cluster(Vec<String>),
}

impl RedisClient {
    /// The client for `url`, or — when `cluster_nodes` names any — for the cluster those seed
    /// nodes (`host:port`) belong to, each reached with `url`'s scheme and credentials. An error
    /// names the bad (redacted) URL or node.
    pub fn new(url: &str, cluster_nodes: &[String]) -> Result<RedisClient> {
        if cluster_nodes.is_empty() {
            let client =
                Client::open(url).with_context(|| format!("invalid Redis URL {}", redact(url)))?;
            let description = client.get_connection_info().addr().to_string();
            return Ok(RedisClient {
                servers: Servers::Single(client),
                description,
            });
        }
        let urls = cluster::node_urls(url, cluster_nodes)?;
        Ok(RedisClient {
            servers: Servers::Cluster(urls),
            description: format!("cluster {}", cluster_nodes.join(",")),
        })
    }

    /// The client `config` names.
    pub fn of(config: &Config) -> Result<RedisClient> {
        RedisClient::new(&config.redis_url, &config.redis_cluster_nodes)
    }

    /// The reconnecting connection shared by a process's short commands, checked with a PING.
    pub async fn shared(&self) -> Result<RedisConnection> {
        let mut conn = match &self.servers {
            Servers::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(RECONNECT_ATTEMPTS);
                RedisConnection::Managed(
                    ConnectionManager::new_with_config(client.clone(), config)
                        .await
                        .with_context(|| {
                            format!("cannot connect to Redis at {}", self.description)
                        })?,
                )
            }
            Servers::Cluster(_) => self.dedicated(RESPONSE_TIMEOUT).await?,
        };
        let _: () = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .with_context(|| format!("Redis at {} does not answer PING", self.description))?;
        Ok(conn)
    }

    /// A connection of one task's own, whose commands may wait up to `response_timeout` for an
    /// answer (a blocking read's timeout must outlast its BLOCK time). On a cluster it is a
    /// cluster connection of its own — connections to every node, none shared with other
    /// tasks — so a blocking read holds only this task's connection to its stream's node.
    pub async fn dedicated(&self, response_timeout: Duration) -> Result<RedisConnection> {
        match &self.servers {
            Servers::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout));
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(RedisConnection::Node)
                    .with_context(|| format!("cannot connect to Redis at {}", self.description))
            }
            Servers::Cluster(urls) => {
                let client = ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response_timeout)
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(50)
                    .max_retry_wait(1_000)
                    .build()
                    .with_context(|| format!("invalid Redis Cluster nodes {}", self.description))?;
                client
                    .get_async_connection()
                    .await
                    .map(RedisConnection::Cluster)
                    .with_context(|| format!("cannot connect to Redis {}", self.description))
            }
        }
    }
}

/// A connection for a command-line tool or a one-off task: [`RedisClient::dedicated`] with the
/// [`RESPONSE_TIMEOUT`], to what `config` names.
pub async fn open(config: &Config) -> Result<RedisConnection> {
    RedisClient::of(config)?.dedicated(RESPONSE_TIMEOUT).await
}

/// A connection to one Redis server or to a cluster; commands are sent to either alike.
#[derive(Clone)]
pub enum RedisConnection {
    /// One multiplexed connection to a single server.
    Node(MultiplexedConnection),
    /// A reconnecting connection to a single server (the shared one).
    Managed(ConnectionManager),
    /// Connections to every node of a cluster, each command routed to its key's node.
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Whether commands go to a cluster (keys of one command or pipeline must share a slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }

    /// Runs `commands` in order and returns their replies in order, a command Redis refused as
    /// a [`Value::ServerError`] in its place. One round trip on a single server; on a cluster,
    /// one pipeline per node, sent at once (commands on different nodes are not ordered).
    pub async fn pipelined(&mut self, commands: Vec<Cmd>) -> redis::RedisResult<Vec<Value>> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            RedisConnection::Cluster(conn) => cluster::pipelined_per_slot(conn, commands).await,
            _ => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for command in commands {
                    pipe.add_command(command);
                }
                pipe.query_async(self).await
            }
        }
    }

    /// Every key matching `pattern` (a `SCAN MATCH` glob), on every primary of a cluster.
    pub async fn keys_matching(&mut self, pattern: &str) -> Result<Vec<String>> {
        match self {
            RedisConnection::Cluster(_) => cluster::keys_matching(self, pattern).await,
            _ => scan(self, pattern).await,
        }
    }
}

impl RedisConnection {
    /// Deletes every key that starts with `prefix` (on every primary of a cluster); returns how
    /// many went. For tools that clear a deployment's keys (the demo, the bench), never the host.
    pub async fn delete_keys_with_prefix(&mut self, prefix: &str) -> Result<usize> {
        let keys = self.keys_matching(&format!("{prefix}*")).await?;
        let deletes = keys
            .iter()
            .map(|key| redis::cmd("DEL").arg(key).clone())
            .collect();
        for (reply, key) in self.pipelined(deletes).await?.into_iter().zip(&keys) {
            if let Value::ServerError(error) = reply {
                bail!("DEL {key:?} failed: {error}");
            }
        }
        Ok(keys.len())
    }
}

/// Every key matching `pattern` on the server `conn` talks to.
async fn scan<C: ConnectionLike + Send>(conn: &mut C, pattern: &str) -> Result<Vec<String>> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .with_context(|| format!("SCAN for keys matching {pattern:?} failed"))?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Node(conn) => conn.req_packed_command(cmd),
            RedisConnection::Managed(conn) => conn.req_packed_command(cmd),
            RedisConnection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Managed(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Node(conn) => conn.get_db(),
            RedisConnection::Managed(conn) => conn.get_db(),
            RedisConnection::Cluster(conn) => conn.get_db(),
        }
    }
}
