//! One consumer task per inbound stream: reclaim what is overdue, read what is new, hand each
//! batch to a task of its own that runs the delivery protocol on it, repeat. Up to
//! `max_in_flight` batches per stream are between read and acknowledgement at once, so reading,
//! running handlers and committing overlap; the read size grows while reads come back full.
//!
//! Each task has its own Redis connection because `XREADGROUP ... BLOCK` holds a connection for
//! the whole poll; the reclaim loop's commands (XAUTOCLAIM, XCLAIM, the XACK of trimmed entries)
//! use it too, while batches acknowledge and publish through the shared connection manager.
//! A slow or failing plugin on one stream therefore never delays another stream.

use crate::backoff::Backoff;
mod finish;
mod in_flight;

use crate::failure::{self, Class, Dependency};
use crate::redis_connection;
use crate::redis_connection::{RedisClient, RedisConnection};
use crate::shutdown::Shutdown;
use crate::state::HostState;
use crate::streams::{self, StreamEntry};
use anyhow::{Context, Result};
pub(crate) use finish::finish_until_done;
use in_flight::{EntriesInFlight, HeldEntries, keep_in_flight_fresh, lock};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// The pauses between attempts after failures (Redis or PostgreSQL unreachable): from 100 ms,
/// doubling, up to 30 s.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
/// How often each consumer task looks for consumers of the group that are gone for good.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How often a batch is retried after failures that are not outages before it is committed entry
/// by entry.
const FINISH_ATTEMPTS: u32 = 3;
/// How often a batch waiting out a PostgreSQL outage checks whether it is back.
const OUTAGE_POLL: Duration = Duration::from_millis(200);

/// Consumes `stream` (a logical name) until `stop` turns true. Batches already read are
/// finished first.
///
/// The stages overlap: while one batch commits, the next is read and handled. Up to
/// `max_in_flight` batches are between read and acknowledgement at once; each is committed by a
/// task of its own, which keeps retrying through an outage (with the same delivery counts, so an
/// outage never uses up an entry's retry attempts) until it succeeds or the host stops. When all
/// of them are stuck, reading pauses.
pub async fn consume(
    state: Arc<HostState>,
    client: RedisClient,
    stream: String,
    mut stop: Shutdown,
) {
    let mut consumer = StreamConsumer::new(state, client, stream);
    let config = &consumer.state.config;
    info!(stream = consumer.stream, key = consumer.key, group = %config.consumer_group, consumer = %config.consumer_name, "consuming");
    // Its own task: the consumer's loop waits for free slots, and entries in flight must stay
    // fresh however long it waits.
    let keep_alive = tokio::spawn(keep_in_flight_fresh(
        consumer.state.clone(),
        consumer.stream.clone(),
        consumer.entries_in_flight.clone(),
        consumer.reclaim_every,
    ));
    while !stop.requested() {
        // Reap the batches that are done, so the set does not grow.
        while consumer.finishing.try_join_next().is_some() {}
        let Err(error) = consumer.round(&mut stop).await else {
            consumer.backoff.reset();
            consumer.state.health.observe(Dependency::Redis, Ok(()));
            continue;
        };
        match failure::classify(&error) {
            // Whichever command noticed it (a read, a reclaim, keeping entries in flight): the
            // group is gone, because Redis lost its data (a restart without persistence) or
            // someone deleted it. Recreate it at once, or nothing new is ever read again.
            Class::LostGroup => {
                if let Err(error) = consumer.recreate_group(&error).await {
                    let error = error.context("cannot recreate the consumer group");
                    consumer.back_off(&error, &mut stop).await;
                }
            }
            Class::Outage(dependency) => {
                consumer
                    .state
                    .health
                    .failed(dependency, &crate::text::causes(&error));
                consumer.back_off(&error, &mut stop).await;
            }
            Class::Retryable | Class::Permanent => consumer.back_off(&error, &mut stop).await,
        }
    }
    while consumer.finishing.join_next().await.is_some() {}
    keep_alive.abort();
    info!(stream = consumer.stream, "stopped consuming");
}

/// One stream's consumer: its connection, its schedule of reclaims and expiry checks, and the
/// batches it has in flight.
struct StreamConsumer {
    state: Arc<HostState>,
    client: RedisClient,
    stream: String,
    key: String,
    /// The Redis client name of its connection (see [`read_connection`]).
    name: String,
    connection: Option<RedisConnection>,
    backoff: Backoff,
    next_reclaim: Instant,
    reclaim_every: Duration,
    next_expiry: Instant,
    expiry_every: Duration,
    read_size: ReadSize,
    batch_slots: Arc<Semaphore>,
    finishing: JoinSet<()>,
    /// The ids of the entries in those batches, kept fresh in the pending list (see `reclaim`).
    entries_in_flight: EntriesInFlight,
}

impl StreamConsumer {
    fn new(state: Arc<HostState>, client: RedisClient, stream: String) -> Self {
        let config = &state.config;
        Self {
            key: config.stream_key(&stream),
            name: connection_name(&[&config.consumer_name, &stream]),
            connection: None,
            backoff: BACKOFF,
            next_reclaim: Instant::now(),
            reclaim_every: (config.reclaim_idle / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(5)),
            next_expiry: Instant::now(),
            expiry_every: (config.consumer_expiry / 2)
                .clamp(Duration::from_millis(50), EXPIRY_CHECK_INTERVAL),
            read_size: ReadSize::new(
                config.batch_size,
                config.max_batch_size,
                config.max_batch_bytes,
            ),
            batch_slots: Arc::new(Semaphore::new(config.max_in_flight)),
            finishing: JoinSet::new(),
            entries_in_flight: Arc::default(),
            client,
            stream,
            state,
        }
    }

    /// One turn: reclaim overdue entries and remove expired consumers when their time has come,
    /// then read a batch (waiting for a free slot first) and start finishing it.
    async fn round(&mut self, stop: &mut Shutdown) -> Result<()> {
        let config = self.state.config.clone();
        let conn = match self.connection.as_mut() {
            Some(conn) => conn,
            None => self
                .connection
                .insert(read_connection(&self.client, config.poll_timeout, &self.name).await?),
        };
        if Instant::now() >= self.next_reclaim {
            reclaim(
                &self.state,
                conn,
                &self.stream,
                &self.batch_slots,
                &self.entries_in_flight,
                &mut self.finishing,
                stop,
            )
            .await?;
            self.next_reclaim = Instant::now() + self.reclaim_every;
        }
        if Instant::now() >= self.next_expiry {
            self.next_expiry = Instant::now() + self.expiry_every;
            for consumer in expire_idle_consumers(
                conn,
                &self.key,
                &config.consumer_group,
                &config.consumer_name,
                config.consumer_expiry,
            )
            .await?
            {
                info!(
                    stream = self.stream,
                    consumer,
                    "removed a consumer idle for longer than {} with no pending entries",
                    humantime::format_duration(config.consumer_expiry)
                );
            }
        }
        // A slot for the batch about to be read; waits while every slot is taken.
        let permit = tokio::select! {
            permit = self.batch_slots.clone().acquire_owned() => permit.context("the in-flight limit was closed")?,
            _ = stop.wait() => return Ok(()),
        };
        // A read is never cut short by a stop signal: Redis may already have handed its entries
        // to this consumer, and a batch that has been read is always finished, committed and
        // acknowledged. A stop waits at most one poll timeout for it.
        let entries = streams::read_new(
            conn,
            &self.key,
            &config.consumer_group,
            &config.consumer_name,
            self.read_size.get(),
            config.poll_timeout,
        )
        .await
        .with_context(|| format!("XREADGROUP on {:?} failed", self.key))?;
        self.read_size.observe(entries.len(), field_bytes(&entries));
        if !entries.is_empty() {
            start_batch(
                &self.state,
                &self.stream,
                entries,
                permit,
                &self.entries_in_flight,
                &mut self.finishing,
                stop,
            );
        }
        Ok(())
    }

    /// Recreates the lost consumer group (and the ledger identity Redis lost with it), counting
    /// and reporting it.
    async fn recreate_group(&mut self, cause: &anyhow::Error) -> Result<()> {
        let config = &self.state.config;
        warn!(stream = self.stream, key = self.key, group = %config.consumer_group,
            "the consumer group is missing (Redis lost its data, or the group was deleted); recreating it: {}", crate::text::causes(cause));
        self.state
            .metrics
            .groups_recreated
            .get_or_create(&crate::metrics::ByStream::new(&self.stream))
            .inc();
        let conn = self.connection.as_mut().context("no connection to Redis")?;
        // Redis lost its data: the ledger identity went with it. Put this host's back, so hosts
        // starting now share it instead of making another.
        let identity_key = config.source_identity_key();
        let kept: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&identity_key)
            .arg(&self.state.source)
            .arg("NX")
            .query_async(conn)
            .await;
        if let Err(error) = kept {
            warn!(
                key = identity_key,
                "cannot restore the ledger identity: {error}"
            );
        }
        // Not at 0: entries the ledger has forgotten would run a second time.
        self.state.refresh_horizons().await?;
        let horizon = self.state.horizon(&self.stream);
        streams::ensure_group(conn, &self.key, &config.consumer_group, horizon).await
    }

    /// Logs `error`, drops the connection (the next round opens a new one) and waits before the
    /// next round ([`BACKOFF`]); a stop ends the wait.
    async fn back_off(&mut self, error: &anyhow::Error, stop: &mut Shutdown) {
        if self.state.health.just_stalled() {
            // A read that timed out while the host itself was stopped: not news.
            info!(
                stream = self.stream,
                retry_in_ms = self.backoff.upcoming().as_millis() as u64,
                "after the host's own stall: {}",
                crate::text::causes(error)
            );
        } else {
            error!(
                stream = self.stream,
                retry_in_ms = self.backoff.upcoming().as_millis() as u64,
                "{}",
                crate::text::causes(error)
            );
        }
        self.connection = None;
        tokio::select! {
            _ = tokio::time::sleep(self.backoff.pause()) => {}
            _ = stop.wait() => {}
        }
    }
}

/// How many entries the next read asks for: `batch_size` at first, twice as many as the last
/// while reads come back full (a backlog), up to `max_batch_size`; a short read keeps the size.
/// A read returns as soon as any entry is there, so a large size never delays an entry: what a
/// read finds is what arrived while the batches before it were busy, and under a steady rate
/// each read takes all there is. (Falling back to `batch_size` after a short read, as this did
/// before, cut a steady 5,000 entries/s into reads of 10 to 40: a third more CPU per entry on
/// both sides and twice the p99 latency.)
///
/// It never asks for more than `max_batch_bytes` worth of entries, at the size per entry of the
/// last read that found any: a batch holds its entries (and what they become) in memory while
/// it is in flight, and entries carrying embeddings are forty times the size of the seed's.
/// Small entries thus get large batches (fewer transactions, less PostgreSQL time per entry),
/// large ones stay within the memory the host is meant to use.
struct ReadSize {
    current: usize,
    max: usize,
    max_bytes: usize,
    /// Bytes per entry of the last read that found any (0 before the first).
    entry_bytes: usize,
}

impl ReadSize {
    fn new(min: usize, max: usize, max_bytes: usize) -> Self {
        let max = max.max(min);
        Self {
            current: min,
            max,
            max_bytes,
            entry_bytes: 0,
        }
    }

    fn get(&self) -> usize {
        self.current
    }

    /// Takes note of a read that returned `read` entries of `bytes` field bytes in all.
    fn observe(&mut self, read: usize, bytes: usize) {
        if let Some(per_entry) = bytes.checked_div(read) {
            self.entry_bytes = per_entry;
        }
        let wanted = if read >= self.current {
            self.current * 2
        } else {
            self.current
        };
        let affordable = self
            .max_bytes
            .checked_div(self.entry_bytes)
            .unwrap_or(self.max);
        self.current = wanted.min(self.max).min(affordable).max(1);
    }
}

/// The bytes of `entries`' field names and values: what a read brought into memory.
fn field_bytes(entries: &[StreamEntry]) -> usize {
    entries
        .iter()
        .flat_map(|entry| &entry.fields)
        .map(|(name, value)| name.len() + value.len())
        .sum()
}

/// Hands `entries` to a task of its own, which runs the whole protocol on them (handlers, then
/// commit and acknowledgement) holding `permit` until it is done; the consumer goes straight
/// back to reading. Batches in flight therefore overlap in every step: one runs its handlers
/// while another commits.
fn start_batch(
    state: &Arc<HostState>,
    stream: &str,
    entries: Vec<StreamEntry>,
    permit: OwnedSemaphorePermit,
    entries_in_flight: &EntriesInFlight,
    finishing: &mut JoinSet<()>,
    stop: &Shutdown,
) {
    let state = state.clone();
    let stop = stop.clone();
    let stream = stream.to_string();
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    lock(entries_in_flight).extend(ids.iter().cloned());
    // Released when the task ends, however it ends.
    let entries_in_flight = HeldEntries {
        entries_in_flight: entries_in_flight.clone(),
        ids,
    };
    finishing.spawn(async move {
        let count = entries.len();
        let mut unserved = false;
        match state.prepare(&stream, entries).await {
            Ok(Some(mut batch)) => loop {
                let finished = finish_until_done(&state, &mut batch, stop.clone()).await;
                if !finished || !batch.has_unhandled() || stop.requested() {
                    break;
                }
                // The batch stopped calling its handler at the output budget: the rest now.
                if let Err(error) = state.handle_rest(&mut batch).await {
                    error!(
                        stream,
                        "cannot handle the rest of the batch; its entries stay pending: {}",
                        crate::text::causes(&error)
                    );
                    break;
                }
            },
            // No plugin handles the stream any more: it left after the read took the entries.
            Ok(None) => unserved = true,
            // Nothing was written or acknowledged: the entries stay pending and are reclaimed
            // after the idle time.
            Err(error) => {
                if let Some(dependency) = failure::outage(&error) {
                    state
                        .health
                        .failed(dependency, &crate::text::causes(&error));
                }
                error!(
                    stream,
                    entries = count,
                    "cannot handle the batch; its entries stay pending: {}",
                    crate::text::causes(&error)
                );
            }
        }
        let unserved = unserved.then(|| entries_in_flight.ids.clone());
        // No longer kept fresh from here on, so the idle time of a hand-back stands.
        drop(entries_in_flight);
        if let Some(ids) = unserved {
            hand_back(&state, &stream, &ids).await;
        }
        drop(permit);
    });
}

/// Hands back entries read for a stream whose plugin has left this host since, so that a host
/// that serves the stream reclaims them at its next pass, not after the reclaim idle time (which
/// they would otherwise wait out, pending with a consumer that no longer reads the stream).
async fn hand_back(state: &HostState, stream: &str, ids: &[String]) {
    let config = &state.config;
    let mut redis = state.redis.clone();
    match streams::set_idle(
        &mut redis,
        &config.stream_key(stream),
        &config.consumer_group,
        &config.consumer_name,
        ids,
        config.reclaim_idle,
    )
    .await
    {
        Ok(()) => info!(
            stream,
            entries = ids.len(),
            "no plugin handles this stream any more; handed its entries back for a host that does"
        ),
        Err(error) => warn!(
            stream,
            entries = ids.len(),
            "no plugin handles this stream any more, and its entries could not be handed back; they are reclaimed after the idle time: {error}"
        ),
    }
}

/// Reclaims every entry idle for longer than the reclaim time and runs it through the protocol.
///
/// Entries of this consumer's own batches in flight are never idle that long: they are kept fresh
/// by [`keep_in_flight_fresh`], so a batch that takes longer than the reclaim time (a slow
/// plugin, an outage being waited out) is never reclaimed and run a second time beside itself.
async fn reclaim(
    state: &Arc<HostState>,
    conn: &mut RedisConnection,
    stream: &str,
    batch_slots: &Arc<Semaphore>,
    entries_in_flight: &EntriesInFlight,
    finishing: &mut JoinSet<()>,
    stop: &Shutdown,
) -> Result<()> {
    let config = &state.config;
    let key = config.stream_key(stream);
    let mut cursor = "0-0".to_string();
    loop {
        let permit = batch_slots
            .clone()
            .acquire_owned()
            .await
            .context("the in-flight limit was closed")?;
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
        if !claimed.deleted.is_empty() {
            for id in &claimed.deleted {
                warn!(stream, entry = %id, "pending entry was trimmed from the stream (MAXLEN) before it was processed; acknowledging it, its content is gone");
            }
            // Redis 7 already dropped them from the pending list; older versions return them
            // without fields and keep them pending until acknowledged.
            streams::ack(conn, &key, &config.consumer_group, &claimed.deleted).await?;
        }
        if !claimed.entries.is_empty() {
            info!(
                stream,
                count = claimed.entries.len(),
                "reclaimed pending entries"
            );
            start_batch(
                state,
                stream,
                claimed.entries,
                permit,
                entries_in_flight,
                finishing,
                stop,
            );
        }
        if claimed.next == "0-0" {
            return Ok(());
        }
        cursor = claimed.next;
    }
}

/// A connection for blocking reads: its response timeout must outlast the poll.
/// The connection is named `kaleidoscope:<consumer>:<stream>` so operators (and the fault tests)
/// can find it in `CLIENT LIST`.
async fn read_connection(
    client: &RedisClient,
    poll_timeout: Duration,
    name: &str,
) -> Result<RedisConnection> {
    let mut conn = client
        .dedicated(poll_timeout + redis_connection::RESPONSE_TIMEOUT)
        .await?;
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async(&mut conn)
        .await
        .context("CLIENT SETNAME failed")?;
    Ok(conn)
}

/// A Redis client name made of `parts` (client names may not contain spaces).
pub fn connection_name(parts: &[&str]) -> String {
    let mut name = String::from("kaleidoscope");
    for part in parts {
        name.push(':');
        name.extend(
            part.chars()
                .map(|c| if c.is_whitespace() { '_' } else { c }),
        );
    }
    name
}

/// Removes consumers of the group that have held no pending entry and done nothing for longer
/// than `expiry` (hosts that are gone for good), never this one. Atomic in Redis, so a consumer
/// that receives entries meanwhile is never removed with them.
async fn expire_idle_consumers(
    conn: &mut RedisConnection,
    key: &str,
    group: &str,
    me: &str,
    expiry: Duration,
) -> Result<Vec<String>> {
    const SCRIPT: &str = r#"
        local removed = {}
        for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
            local info = {}
            for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
            if info['name'] ~= ARGV[2] and tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[3]) then
                redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
                table.insert(removed, info['name'])
            end
        end
        return removed
    "#;
    let removed: Vec<String> = redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(1)
        .arg(key)
        .arg(group)
        .arg(me)
        .arg(expiry.as_millis() as u64)
        .query_async(conn)
        .await
        .with_context(|| format!("cannot expire idle consumers on {key:?}"))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_size_doubles_while_reads_come_back_full_up_to_the_maximum() {
        let mut size = ReadSize::new(100, 500, usize::MAX);
        assert_eq!(size.get(), 100);
        size.observe(100, 100);
        assert_eq!(size.get(), 200);
        size.observe(200, 200);
        size.observe(400, 400);
        assert_eq!(size.get(), 500, "never past the maximum");
        size.observe(500, 500);
        assert_eq!(size.get(), 500);
    }

    #[test]
    fn a_short_read_keeps_the_read_size() {
        let mut size = ReadSize::new(10, 1_000, usize::MAX);
        for found in [10, 20, 40] {
            size.observe(found, found);
        }
        assert_eq!(size.get(), 80);
        size.observe(60, 60);
        assert_eq!(
            size.get(),
            80,
            "a steady rate is read whole, not cut into reads of 10"
        );
        size.observe(0, 0);
        assert_eq!(size.get(), 80);
        // A maximum below the minimum is the minimum.
        assert_eq!(ReadSize::new(50, 10, usize::MAX).max, 50);
    }

    #[test]
    fn large_entries_keep_the_read_within_its_bytes() {
        // Entries of 10 KB with 1 MB per read: a hundred at a time, not a thousand.
        let mut size = ReadSize::new(10, 1_000, 1_000_000);
        for _ in 0..10 {
            let asked = size.get();
            size.observe(asked, asked * 10_000);
        }
        assert_eq!(size.get(), 100);
        // Larger ones make it smaller, short read or not; an empty read keeps the last size
        // per entry.
        size.observe(3, 3 * 200_000);
        assert_eq!(size.get(), 5);
        size.observe(0, 0);
        assert_eq!(size.get(), 5);
        // Small ones grow to the maximum again; a huge one is read alone.
        for _ in 0..9 {
            let asked = size.get();
            size.observe(asked, asked * 400);
        }
        assert_eq!(size.get(), 1_000);
        size.observe(1_000, 1_000 * 5_000_000);
        assert_eq!(size.get(), 1);
    }

    #[test]
    fn connection_names_have_no_spaces() {
        assert_eq!(
            connection_name(&["host one", "ml insights"]),
            "kaleidoscope:host_one:ml_insights"
        );
    }
}
