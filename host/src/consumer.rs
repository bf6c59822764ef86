//! One consumer task per inbound stream: reclaim what is overdue, read what is new, hand each
//! batch to the delivery protocol, repeat.
//!
//! Each task has its own Redis connection because `XREADGROUP ... BLOCK` holds a connection for
//! the whole poll; acknowledgements and publishing go through the shared connection manager.
//! A slow or failing plugin on one stream therefore never delays another stream.

use crate::delivery::Delivery;
use crate::streams::{self, StreamError};
use anyhow::{Context, Result};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// The longest pause between attempts after failures (Redis or PostgreSQL unreachable).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The first pause after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Consumes `stream` (a logical name) until `stop` turns true. The batch in progress when the
/// signal arrives is finished first.
pub async fn consume(
    delivery: Arc<Delivery>,
    client: Client,
    stream: String,
    mut stop: watch::Receiver<bool>,
) {
    let config = delivery.config.clone();
    let key = config.stream_key(&stream);
    let reclaim_every =
        (config.reclaim_idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut next_reclaim = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut connection: Option<MultiplexedConnection> = None;

    info!(stream, key, group = %config.consumer_group, consumer = %config.consumer_name, "consuming");
    while !*stop.borrow() {
        let outcome = async {
            let conn = match connection.as_mut() {
                Some(conn) => conn,
                None => connection.insert(read_connection(&client, config.poll_timeout).await?),
            };
            if Instant::now() >= next_reclaim {
                reclaim(&delivery, conn, &stream).await?;
                next_reclaim = Instant::now() + reclaim_every;
            }
            // Only the wait for new entries is cut short by a stop signal; a batch that has been
            // read is always finished, committed and acknowledged.
            let read = streams::read_new(
                conn,
                &key,
                &config.consumer_group,
                &config.consumer_name,
                config.batch_size,
                config.poll_timeout,
            );
            let entries = tokio::select! {
                entries = read => entries,
                _ = stop.changed() => return Ok(()),
            };
            let entries = match entries {
                Err(StreamError::NoGroup(_)) => {
                    warn!(stream, "consumer group vanished; recreating it");
                    streams::ensure_group(conn, &key, &config.consumer_group).await?;
                    return Ok(());
                }
                other => other.with_context(|| format!("XREADGROUP on {key:?} failed"))?,
            };
            if !entries.is_empty() {
                let report = delivery.process_batch(&stream, entries).await?;
                tracing::debug!(stream, ?report, "batch done");
            }
            anyhow::Ok(())
        }
        .await;
        match outcome {
            Ok(()) => backoff = FIRST_BACKOFF,
            Err(error) => {
                error!(stream, retry_in = ?backoff, "{error:#}");
                connection = None;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    info!(stream, "stopped consuming");
}

/// Reclaims every entry idle for longer than the reclaim time and runs it through the protocol.
async fn reclaim(
    delivery: &Delivery,
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> Result<()> {
    let config = &delivery.config;
    let key = config.stream_key(stream);
    let mut cursor = "0-0".to_string();
    loop {
        let claimed = streams::autoclaim(
            conn,
            &key,
            &config.consumer_group,
            &config.consumer_name,
            config.reclaim_idle,
            &cursor,
            config.batch_size,
        )
        .await
        .with_context(|| format!("XAUTOCLAIM on {key:?} failed"))?;
        for id in &claimed.deleted {
            warn!(stream, entry = %id, "pending entry was trimmed from the stream before it was processed; Redis dropped it from the pending list");
        }
        if !claimed.entries.is_empty() {
            info!(
                stream,
                count = claimed.entries.len(),
                "reclaimed pending entries"
            );
            delivery.process_batch(stream, claimed.entries).await?;
        }
        if claimed.next == "0-0" {
            return Ok(());
        }
        cursor = claimed.next;
    }
}

/// A connection for blocking reads: its response timeout must outlast the poll.
async fn read_connection(client: &Client, poll_timeout: Duration) -> Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(poll_timeout + Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("cannot connect to Redis")
}
