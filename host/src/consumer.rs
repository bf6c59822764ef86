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
use crate::delivery::PreparedBatch;
use crate::failure::{self, Class, Dependency, Unanswered};
use crate::redis_connection;
use crate::shutdown::Shutdown;
use crate::state::HostState;
use crate::streams::{self, StreamEntry};
use anyhow::{Context, Result};
use redis::Client;
use redis::aio::MultiplexedConnection;
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
pub async fn consume(state: Arc<HostState>, client: Client, stream: String, mut stop: Shutdown) {
    let mut consumer = StreamConsumer::new(state, client, stream);
    let config = &consumer.state.config;
    info!(stream = consumer.stream, key = consumer.key, group = %config.consumer_group, consumer = %config.consumer_name, "consuming");
    // Its own task: the consumer's loop waits for free slots, and entries in flight must stay
    // fresh however long it waits.
    let keep_alive = tokio::spawn(keep_in_flight_fresh(
        consumer.state.clone(),
        consumer.stream.clone(),
        consumer.working.clone(),
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

/// Touches the entries of this consumer's batches in flight every `every` (a quarter of the
/// reclaim idle time), so no host reclaims an entry that is still being worked on: not while a
/// slow batch runs, not while every slot is busy and the consumer's loop waits for one, not while
/// a batch waits out a PostgreSQL outage (which must never cost an entry an attempt). Touching
/// (`XCLAIM ... JUSTID`) does not count as a delivery.
async fn keep_in_flight_fresh(
    state: Arc<HostState>,
    stream: String,
    working: Working,
    every: Duration,
) {
    let config = &state.config;
    let key = config.stream_key(&stream);
    let mut redis = state.redis.clone();
    loop {
        tokio::time::sleep(every).await;
        let mine: Vec<String> = lock(&working).iter().cloned().collect();
        if mine.is_empty() {
            continue;
        }
        if let Err(error) = streams::touch(
            &mut redis,
            &key,
            &config.consumer_group,
            &config.consumer_name,
            &mine,
        )
        .await
        {
            // A lost group is the consumer loop's to recreate; an outage its to report.
            tracing::debug!(
                stream,
                "cannot keep the entries in flight fresh (XCLAIM): {error}"
            );
        }
    }
}

/// One stream's consumer: its connection, its schedule of reclaims and expiry checks, and the
/// batches it has in flight.
struct StreamConsumer {
    state: Arc<HostState>,
    client: Client,
    stream: String,
    key: String,
    /// The Redis client name of its connection (see [`read_connection`]).
    name: String,
    connection: Option<MultiplexedConnection>,
    backoff: Backoff,
    next_reclaim: Instant,
    reclaim_every: Duration,
    next_expiry: Instant,
    expiry_every: Duration,
    read_size: ReadSize,
    in_flight: Arc<Semaphore>,
    finishing: JoinSet<()>,
    /// The ids of the entries in those batches, kept fresh in the pending list (see `reclaim`).
    working: Working,
}

impl StreamConsumer {
    fn new(state: Arc<HostState>, client: Client, stream: String) -> Self {
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
            read_size: ReadSize::new(config.batch_size, config.max_batch_size),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            finishing: JoinSet::new(),
            working: Arc::default(),
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
                &self.in_flight,
                &self.working,
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
            permit = self.in_flight.clone().acquire_owned() => permit.context("the in-flight limit was closed")?,
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
        self.read_size.observe(entries.len());
        if !entries.is_empty() {
            start_batch(
                &self.state,
                &self.stream,
                entries,
                permit,
                &self.working,
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

/// How many entries the next read asks for: it starts at `batch_size`, doubles while reads come
/// back full (a backlog) up to `max_batch_size`, and falls back when the backlog is gone. A read
/// returns as soon as any entry is there, so a large size never delays an idle stream.
struct ReadSize {
    current: usize,
    min: usize,
    max: usize,
}

impl ReadSize {
    fn new(min: usize, max: usize) -> Self {
        let max = max.max(min);
        Self {
            current: min,
            min,
            max,
        }
    }

    fn get(&self) -> usize {
        self.current
    }

    fn observe(&mut self, read: usize) {
        self.current = if read >= self.current {
            (self.current * 2).min(self.max)
        } else {
            self.min
        };
    }
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
    working: &Working,
    finishing: &mut JoinSet<()>,
    stop: &Shutdown,
) {
    let state = state.clone();
    let stop = stop.clone();
    let stream = stream.to_string();
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    lock(working).extend(ids.iter().cloned());
    // Released when the task ends, however it ends.
    let working = InFlight {
        working: working.clone(),
        ids,
    };
    finishing.spawn(async move {
        let count = entries.len();
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
            Ok(None) => {}
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
        drop(working);
        drop(permit);
    });
}

/// Entries registered in [`Working`] for as long as this value lives.
struct InFlight {
    working: Working,
    ids: Vec<String>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut working = lock(&self.working);
        for id in &self.ids {
            working.remove(id);
        }
    }
}

/// The ids of the entries this consumer has read and not yet finished.
type Working = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

fn lock(working: &Working) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    working
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Commits and acknowledges `batch`. Through an outage (PostgreSQL or Redis unreachable, see
/// [`failure::classify`]) it retries until it succeeds or the host stops (its entries then stay
/// pending, to be delivered again). Any other failure is retried [`FINISH_ATTEMPTS`] times, then
/// the batch is committed entry by entry, each in a transaction of its own, so that the entry
/// at fault is dead-lettered alone; if even that fails, the batch is given up and its entries
/// stay pending, to be delivered again (counting against their attempts) after the reclaim time.
/// Returns whether the batch was finished (`false`: given up, or the host is stopping).
async fn finish_until_done(
    state: &HostState,
    batch: &mut PreparedBatch,
    mut stop: Shutdown,
) -> bool {
    let stream = batch.stream().to_string();
    let deadline = state.config.database_timeouts.response_deadline();
    let mut backoff = BACKOFF;
    let mut failures = 0;
    loop {
        let pass = if failures >= FINISH_ATTEMPTS {
            Pass::EachAlone
        } else {
            Pass::SetBased
        };
        let error = match finish_once(state, batch, pass, deadline).await {
            Ok(report) => {
                tracing::debug!(
                    stream,
                    processed = report.processed,
                    redelivered = report.redelivered,
                    dead_lettered = report.dead_lettered,
                    retrying = report.retrying,
                    sentinels = report.sentinels,
                    "batch done"
                );
                state.health.observe(Dependency::Database, Ok(()));
                return true;
            }
            Err(error) => error,
        };
        state
            .metrics
            .batch_failures
            .get_or_create(&crate::metrics::ByStream::new(&stream))
            .inc();
        let next = AfterFailure::of(&error, pass);
        report_failure(state, batch, &error, next, failures + 1, backoff.upcoming());
        match next {
            AfterFailure::GiveUp => return false,
            AfterFailure::Retry => failures += 1,
            AfterFailure::WaitForDatabase | AfterFailure::WaitForPool => {}
        }
        if stop.requested() {
            warn!(
                stream,
                entries = batch.len(),
                "stopping with a batch unfinished; its entries stay pending"
            );
            return false;
        }
        wait_to_retry(state, backoff.pause(), &mut stop).await;
    }
}

/// How a batch is committed: set-based first; entry by entry, each entry in a transaction of its
/// own, once set-based attempts keep failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    SetBased,
    EachAlone,
}

/// What a failed attempt at a batch leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterFailure {
    /// An outage: waited out without limit, costing no entry an attempt.
    WaitForDatabase,
    /// Every connection of the pool is in use: waited out like an outage, but PostgreSQL is not
    /// down because this host is busy (the health probe, on a connection of its own, says
    /// whether it is).
    WaitForPool,
    /// Tried again: set-based while attempts remain, then entry by entry.
    Retry,
    /// Even entry by entry it failed: the entries stay pending, delivered again after the
    /// reclaim idle time.
    GiveUp,
}

impl AfterFailure {
    /// The decision after `error` on a `pass`.
    fn of(error: &anyhow::Error, pass: Pass) -> Self {
        match failure::classify(error) {
            Class::Outage(_) if failure::pool_busy(error) => AfterFailure::WaitForPool,
            Class::Outage(_) => AfterFailure::WaitForDatabase,
            _ if pass == Pass::EachAlone => AfterFailure::GiveUp,
            _ => AfterFailure::Retry,
        }
    }
}

/// Logs (and for an outage, reports to health) the `attempt`th failed attempt in a row at
/// `batch`.
fn report_failure(
    state: &HostState,
    batch: &PreparedBatch,
    error: &anyhow::Error,
    next: AfterFailure,
    attempt: u32,
    retry_in: Duration,
) {
    let stream = batch.stream();
    let entries = batch.len();
    let retry_in_ms = retry_in.as_millis() as u64;
    let causes = crate::text::causes(error);
    match next {
        AfterFailure::WaitForPool => warn!(
            stream,
            retry_in_ms,
            entries,
            "every connection to PostgreSQL is busy; the batch waits for one: {causes}"
        ),
        AfterFailure::WaitForDatabase => {
            if let Some(dependency) = failure::outage(error) {
                state.health.failed(dependency, &causes);
            }
            error!(stream, retry_in_ms, entries, "{causes}");
        }
        AfterFailure::GiveUp => error!(
            stream,
            entries,
            "giving up on the batch after {FINISH_ATTEMPTS} attempts and an entry-by-entry pass; its entries stay pending and are delivered again after the reclaim idle time: {causes}"
        ),
        AfterFailure::Retry => {
            let next = if attempt >= FINISH_ATTEMPTS {
                "committing it entry by entry next"
            } else {
                "retrying it"
            };
            warn!(
                stream,
                entries, attempt, "the batch failed, {next}: {causes}"
            );
        }
    }
}

/// One attempt at finishing `batch` by `pass`. Work that gets no answer for `deadline` (since
/// its last statement was answered, see [`crate::persist::answers`]) is an [`Unanswered`] error:
/// a statement would have been cancelled by the server long ago, so the connection is lost
/// without an error (half-open), an outage.
async fn finish_once(
    state: &HostState,
    batch: &mut PreparedBatch,
    pass: Pass,
    deadline: Duration,
) -> Result<crate::delivery::BatchReport> {
    let attempt = async {
        match pass {
            Pass::SetBased => state.finish(batch).await,
            Pass::EachAlone => state.finish_each_alone(batch).await,
        }
    };
    match crate::persist::answers::watch(deadline, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow::Error::new(Unanswered(deadline))),
    }
}

/// Waits `backoff`, then for as long as PostgreSQL is known to be down; a stop ends the wait.
async fn wait_to_retry(state: &HostState, backoff: Duration, stop: &mut Shutdown) {
    let waited = async {
        tokio::time::sleep(backoff).await;
        while state.health.outage(Dependency::Database).is_some() {
            tokio::time::sleep(OUTAGE_POLL).await;
        }
    };
    tokio::select! {
        _ = waited => {}
        _ = stop.wait() => {}
    }
}

/// Reclaims every entry idle for longer than the reclaim time and runs it through the protocol.
///
/// Entries of this consumer's own batches in flight are never idle that long: they are kept fresh
/// by [`keep_in_flight_fresh`], so a batch that takes longer than the reclaim time (a slow
/// plugin, an outage being waited out) is never reclaimed and run a second time beside itself.
async fn reclaim(
    state: &Arc<HostState>,
    conn: &mut MultiplexedConnection,
    stream: &str,
    in_flight: &Arc<Semaphore>,
    working: &Working,
    finishing: &mut JoinSet<()>,
    stop: &Shutdown,
) -> Result<()> {
    let config = &state.config;
    let key = config.stream_key(stream);
    let mut cursor = "0-0".to_string();
    loop {
        let permit = in_flight
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
                working,
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
    client: &Client,
    poll_timeout: Duration,
    name: &str,
) -> Result<MultiplexedConnection> {
    let mut conn =
        redis_connection::dedicated(client, poll_timeout + redis_connection::RESPONSE_TIMEOUT)
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
    conn: &mut MultiplexedConnection,
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
