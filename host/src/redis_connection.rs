//! Opening connections to Redis: one place, one set of timeouts, errors that name the server.
//!
//! Two kinds of connection exist, and only two:
//! - the **shared** connection ([`shared`]): a reconnecting [`ConnectionManager`] for short
//!   commands (XADD, XACK, heartbeats, probes), used by many tasks at once;
//! - a **dedicated** connection ([`dedicated`]): one multiplexed connection for one task, whose
//!   response timeout the task chooses because its commands may block on the server (a consumer's
//!   `XREADGROUP … BLOCK`, the simulator's reads). Command-line tools use one with the
//!   [`RESPONSE_TIMEOUT`] ([`open`]).
//!
//! Every error names the server (with its password redacted), so "cannot connect" says where.

use crate::text::redact;
use anyhow::{Context, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};
use std::time::Duration;

/// How long to wait for a TCP connection (and handshake) to Redis. Redis on the same network
/// answers in milliseconds; five seconds tells a dead server from a slow one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the answer to a short command. Long enough to ride out a slow fork or a
/// big XADD batch; short enough that a stalled Redis is reported as an outage, not waited out.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection attempts the shared connection makes per failure before the command fails;
/// the next command tries again, so a long outage costs a failed command, not a hung task.
const RECONNECT_ATTEMPTS: usize = 1;

/// A client for `url`, or an error naming the (redacted) URL.
pub fn client(url: &str) -> Result<Client> {
    Client::open(url).with_context(|| format!("invalid Redis URL {}", redact(url)))
}

/// The reconnecting connection shared by a process's short commands, checked with a PING.
pub async fn shared(client: &Client) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RECONNECT_ATTEMPTS);
    let mut manager = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .with_context(|| format!("cannot connect to Redis at {}", server(client)))?;
    let _: () = redis::cmd("PING")
        .query_async(&mut manager)
        .await
        .with_context(|| format!("Redis at {} does not answer PING", server(client)))?;
    Ok(manager)
}

/// A connection of one task's own, whose commands may wait up to `response_timeout` for an
/// answer (a blocking read's timeout must outlast its BLOCK time).
pub async fn dedicated(
    client: &Client,
    response_timeout: Duration,
) -> Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("cannot connect to Redis at {}", server(client)))
}

/// A connection for a command-line tool or a one-off task: [`dedicated`] with the
/// [`RESPONSE_TIMEOUT`].
pub async fn open(url: &str) -> Result<MultiplexedConnection> {
    dedicated(&client(url)?, RESPONSE_TIMEOUT).await
}

/// The server a client talks to, for messages (`host:port`, never the password).
fn server(client: &Client) -> String {
    client.get_connection_info().addr().to_string()
}
