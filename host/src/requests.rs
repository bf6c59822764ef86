//! The other direction: publishing processing requests to the ML services, and tracking each one
//! until its results arrive.
//!
//! Every request is recorded in `ml_requests` (correlation id, stream, subject ids, the published
//! fields, status, attempts). Result plugins mark what arrived; the database completes the
//! request when all expected results are in; [`sweep`] republishes requests that stay pending past
//! `ML_TIMEOUT_SECONDS` and gives up (status `TIMED_OUT`) after `ML_RETRY_ATTEMPTS` publications.
//!
//! Two ways to publish:
//! - [`Publisher::publish`] right away, with the seed's semantics: retries with exponential
//!   backoff up to `ML_RETRY_ATTEMPTS`; a failure on a critical stream is an error, on the others
//!   it is logged (the tracker republishes it later);
//! - [`Publisher::enqueue`] inside the caller's own transaction, then [`Publisher::flush`] after
//!   the commit. The request exists only if the rows it refers to were committed — the original
//!   backend published before committing, and the ML side could not find the rows.

use crate::backoff::Backoff;
use crate::config::Config;
use crate::ml::{
    INSIGHTS_SERVICES, POST_IMAGE_STREAM, POST_UPDATE_STREAM, PROFILE_PICTURE_STREAM,
    REQUEST_STREAMS,
};
use crate::persist::outbox;
use crate::redis_connection::{RedisClient, RedisConnection};
use crate::streams;
use anyhow::{Context, Result, bail};
use sqlx::{PgConnection, PgPool};
use std::io::Read;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// The pauses between publishing attempts: from 200 ms, doubling, up to 30 s.
const PUBLISH_BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));

/// One processing request, as the seed's events describe them.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// A new post image (`post-image-processing`).
    PostImage {
        post_id: i64,
        media_id: i64,
        media_url: String,
        uploader_id: Option<i64>,
    },
    /// A new profile picture (`profile-picture-processing`).
    ProfilePicture { user_id: i64, image_url: String },
    /// An updated post image (`post-update-processing`, same shape as a post image).
    PostUpdate {
        post_id: i64,
        media_id: i64,
        media_url: String,
        uploader_id: Option<i64>,
    },
}

impl Request {
    /// The logical stream this request goes to.
    pub fn stream(&self) -> &'static str {
        match self {
            Request::PostImage { .. } => POST_IMAGE_STREAM,
            Request::ProfilePicture { .. } => PROFILE_PICTURE_STREAM,
            Request::PostUpdate { .. } => POST_UPDATE_STREAM,
        }
    }

    /// The results that complete this request (names the result plugins record).
    pub fn expected_results(&self) -> Vec<String> {
        let names: &[&str] = match self {
            Request::PostImage { .. } | Request::PostUpdate { .. } => &["face_detection"],
            Request::ProfilePicture { .. } => return vec!["profile_face_embedding".to_string()],
        };
        INSIGHTS_SERVICES
            .iter()
            .chain(names)
            .map(|s| s.to_string())
            .collect()
    }

    /// The fields as the real producers write them (wire-format page, outbound section).
    pub fn fields(&self, correlation_id: &str) -> Vec<(String, String)> {
        let timestamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let mut fields: Vec<(String, String)> = match self {
            Request::PostImage {
                post_id,
                media_id,
                media_url,
                uploader_id,
            }
            | Request::PostUpdate {
                post_id,
                media_id,
                media_url,
                uploader_id,
            } => {
                let mut fields = vec![
                    ("postId".to_string(), post_id.to_string()),
                    ("mediaId".to_string(), media_id.to_string()),
                    ("mediaUrl".to_string(), media_url.clone()),
                ];
                if let Some(uploader) = uploader_id {
                    fields.push(("uploaderId".to_string(), uploader.to_string()));
                }
                fields.push(("timestamp".to_string(), timestamp));
                fields
            }
            Request::ProfilePicture { user_id, image_url } => vec![
                ("userId".to_string(), user_id.to_string()),
                ("imageUrl".to_string(), image_url.clone()),
            ],
        };
        fields.push(("correlationId".to_string(), correlation_id.to_string()));
        fields
    }

    fn subject(&self) -> (Option<i64>, Option<i64>, Option<i64>) {
        match self {
            Request::PostImage {
                post_id,
                media_id,
                uploader_id,
                ..
            }
            | Request::PostUpdate {
                post_id,
                media_id,
                uploader_id,
                ..
            } => (Some(*post_id), Some(*media_id), *uploader_id),
            Request::ProfilePicture { user_id, .. } => (None, None, Some(*user_id)),
        }
    }
}

/// A request that was published (or enqueued).
#[derive(Clone, Debug)]
pub struct Published {
    pub stream: String,
    pub correlation_id: String,
    /// The stream entry id, once published.
    pub entry_id: Option<String>,
    /// The outbox row, for an enqueued request not flushed yet.
    pub outbox_id: Option<i64>,
}

/// Publishes requests and records them for tracking.
#[derive(Clone)]
pub struct Publisher {
    config: std::sync::Arc<Config>,
    client: RedisClient,
    /// Connected on first use, so an unreachable Redis is one of the publishing attempts (and
    /// its error names the stream) rather than a failure to construct the publisher.
    redis: std::sync::Arc<tokio::sync::OnceCell<RedisConnection>>,
    pool: PgPool,
    /// Replicas that must hold a published request, and how long to wait for them (see
    /// [`Publisher::waiting_for`]).
    wait: Option<(u32, Duration)>,
}

impl Publisher {
    /// A publisher for the Redis of `config` and the database behind `pool`.
    pub fn new(config: std::sync::Arc<Config>, pool: PgPool) -> Result<Self> {
        let client = RedisClient::of(&config)?;
        Ok(Self {
            config,
            client,
            redis: Default::default(),
            pool,
            wait: None,
        })
    }

    /// This publisher, counting a request as published only once `replicas` replicas of its
    /// stream's primary hold it (`WAIT`, up to `timeout`): asynchronous replication loses what
    /// a primary acknowledged but had not passed on when it fails over. Fewer replicas in time
    /// is an error naming the entry; the request stays tracked (`ml_requests`), so the tracker
    /// publishes it again if its results never come.
    pub fn waiting_for(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = Some((replicas, timeout));
        self
    }

    async fn redis(&self) -> Result<RedisConnection> {
        let manager = self.redis.get_or_try_init(|| self.client.shared()).await?;
        Ok(manager.clone())
    }

    /// The correlation id (given, or a new one) and the fields to publish; `None`, with a log
    /// line, when publishing is disabled.
    fn prepare(
        &self,
        request: &Request,
        correlation_id: Option<String>,
    ) -> Option<(String, Vec<(String, String)>)> {
        if !self.config.processing_enabled {
            warn!(
                stream = request.stream(),
                "ML processing is disabled (ML_PROCESSING_ENABLED=false); not publishing the request"
            );
            return None;
        }
        let correlation_id = correlation_id
            .filter(|c| !c.is_empty())
            .unwrap_or_else(new_correlation_id);
        let fields = request.fields(&correlation_id);
        Some((correlation_id, fields))
    }

    fn critical(&self, stream: &str) -> bool {
        self.config.critical_streams.iter().any(|s| s == stream)
    }

    /// Publishes `request` now (with retries) and records it. Returns `None` when publishing is
    /// disabled (`ML_PROCESSING_ENABLED=false`) or when a non-critical stream could not be
    /// reached (the request is still recorded, and the tracker republishes it).
    pub async fn publish(
        &self,
        request: &Request,
        correlation_id: Option<String>,
    ) -> Result<Option<Published>> {
        let stream = request.stream();
        let Some((correlation_id, fields)) = self.prepare(request, correlation_id) else {
            return Ok(None);
        };
        record(&self.pool, request, &correlation_id, &fields, false)
            .await
            .with_context(|| format!("cannot record request {correlation_id} for {stream}"))?;

        let key = self.config.stream_key(stream);
        let mut backoff = PUBLISH_BACKOFF;
        let attempts = self.config.retry_attempts;
        for attempt in 1..=attempts {
            let added = match (self.redis().await, self.wait) {
                (Ok(mut redis), None) => streams::add(&mut redis, &key, &fields).await,
                (Ok(mut redis), Some((replicas, timeout))) => {
                    match streams::add_and_wait(&mut redis, &key, &fields, replicas, timeout).await
                    {
                        Ok((entry_id, held)) if held < replicas => {
                            // Published all the same: tracked, and republished by the tracker
                            // if it was lost. Not added again here, which could double it.
                            mark_published(&self.pool, &correlation_id).await?;
                            bail!(
                                "request {correlation_id} was published to {stream:?} as {entry_id}, but only {held} of {replicas} replica(s) hold it after {}: it is lost if that primary fails over now; it stays tracked, and the request tracker publishes it again if its results do not come within ML_TIMEOUT_SECONDS",
                                humantime::format_duration(timeout)
                            );
                        }
                        added => added.map(|(entry_id, _)| entry_id),
                    }
                }
                (Err(error), _) => Err(error),
            };
            match added {
                Ok(entry_id) => {
                    mark_published(&self.pool, &correlation_id).await?;
                    info!(stream, %entry_id, correlation_id, "published request");
                    return Ok(Some(Published {
                        stream: stream.to_string(),
                        correlation_id,
                        entry_id: Some(entry_id),
                        outbox_id: None,
                    }));
                }
                Err(error) if attempt < attempts => {
                    warn!(
                        stream,
                        correlation_id,
                        attempt,
                        retry_in_ms = backoff.upcoming().as_millis() as u64,
                        "publishing failed: {}",
                        crate::text::causes(&error)
                    );
                    tokio::time::sleep(backoff.pause()).await;
                }
                Err(error) if self.critical(stream) => {
                    return Err(error).with_context(|| {
                        format!("failed to publish request {correlation_id} to critical stream {stream:?} after {attempts} attempts")
                    });
                }
                Err(error) => {
                    warn!(
                        stream,
                        correlation_id,
                        "giving up publishing after {attempts} attempts (not a critical stream; the request tracker republishes it): {}",
                        crate::text::causes(&error)
                    );
                    return Ok(None);
                }
            }
        }
        bail!("ML_RETRY_ATTEMPTS must be at least 1")
    }

    /// Records `request` and its message inside the caller's transaction; nothing is published
    /// until the caller commits and calls [`Publisher::flush`] (or, if the caller dies first, the
    /// host's outbox relay publishes it). Returns `None` when publishing is disabled.
    pub async fn enqueue(
        &self,
        tx: &mut PgConnection,
        request: &Request,
        correlation_id: Option<String>,
    ) -> Result<Option<Published>> {
        let stream = request.stream();
        let Some((correlation_id, fields)) = self.prepare(request, correlation_id) else {
            return Ok(None);
        };
        record(&mut *tx, request, &correlation_id, &fields, true)
            .await
            .with_context(|| format!("cannot record request {correlation_id} for {stream}"))?;
        let message = outbox::enqueue(tx, &self.config.stream_key(stream), fields)
            .await
            .with_context(|| format!("cannot enqueue request {correlation_id} for {stream}"))?;
        Ok(Some(Published {
            stream: stream.to_string(),
            correlation_id,
            entry_id: None,
            outbox_id: Some(message.id),
        }))
    }

    /// Publishes requests enqueued by a transaction that has committed.
    pub async fn flush(&self, enqueued: &[Published]) -> Result<()> {
        let ids: Vec<i64> = enqueued.iter().filter_map(|p| p.outbox_id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let messages = outbox::fetch(&self.pool, &ids)
            .await
            .context("cannot read enqueued requests (was the transaction committed?)")?;
        let mut redis = self.redis().await?;
        for message in messages {
            streams::add(&mut redis, &message.stream_key, &message.fields).await?;
            outbox::remove(&self.pool, &[message.id]).await?;
        }
        Ok(())
    }
}

async fn record<'c, E: sqlx::PgExecutor<'c>>(
    executor: E,
    request: &Request,
    correlation_id: &str,
    fields: &[(String, String)],
    published: bool,
) -> Result<()> {
    let (post_id, media_id, user_id) = request.subject();
    sqlx::query(
        "INSERT INTO ml_requests (correlation_id, stream, post_id, media_id, user_id, fields, expected_results, attempts, last_published_at)
         VALUES ($1, $2, $3, $4, $5, CAST($6 AS jsonb), $7, $8, CASE WHEN $9 THEN now() END)",
    )
    .bind(correlation_id)
    .bind(request.stream())
    .bind(post_id)
    .bind(media_id)
    .bind(user_id)
    .bind(serde_json::to_string(fields).unwrap_or_else(|_| "[]".into()))
    .bind(request.expected_results())
    .bind(i32::from(published))
    .bind(published)
    .execute(executor)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            anyhow::anyhow!("a request with correlation id {correlation_id:?} already exists")
        }
        _ => anyhow::Error::from(e),
    })?;
    Ok(())
}

async fn mark_published(pool: &PgPool, correlation_id: &str) -> Result<()> {
    sqlx::query("UPDATE ml_requests SET attempts = attempts + 1, last_published_at = now() WHERE correlation_id = $1")
        .bind(correlation_id)
        .execute(pool)
        .await
        .context("cannot record the publication of a request")?;
    Ok(())
}

/// A fresh correlation id (a random UUID, version 4).
pub fn new_correlation_id() -> String {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        // Fall back to time and process id: unique enough for tracing.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes[..16]
            .copy_from_slice(&(nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// What one [`sweep`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub republished: usize,
    pub timed_out: usize,
    /// Rows that cannot be a request of this host (a stream that is not a request stream, or
    /// fields that are not a list of pairs): marked `FAILED` with the reason, never published.
    pub refused: usize,
}

/// Why a pending request row cannot be republished, if it cannot: the sweeper only ever
/// publishes to the request streams, and only fields it can read. Such a row can only have been
/// forged (a plugin granted the whole table) or damaged.
fn unpublishable(stream: &str, fields: &str) -> Result<Vec<(String, String)>, String> {
    if !REQUEST_STREAMS.contains(&stream) {
        return Err(format!(
            "not republished: {stream:?} is not a request stream"
        ));
    }
    match serde_json::from_str::<Vec<(String, String)>>(fields) {
        Ok(fields) if !fields.is_empty() => Ok(fields),
        _ => Err("not republished: its fields are not a list of name/value pairs".to_string()),
    }
}

/// Republishes requests that have waited longer than `ML_TIMEOUT_SECONDS` for their results
/// (or were never published), and marks those published `ML_RETRY_ATTEMPTS` times as timed out.
/// Safe to run on several hosts at once (rows are locked with SKIP LOCKED).
///
/// The due rows are decided and marked (published now, one more attempt) in one short
/// transaction, and only then published: no row lock is held while Redis is talked to, so a slow
/// Redis never holds up the batches that record results on these rows. A request whose
/// publication then fails gets its marks back; a crash between the two leaves it marked, and it
/// is published again after the timeout.
pub async fn sweep(pool: &PgPool, redis: &RedisConnection, config: &Config) -> Result<Sweep> {
    let mut sweep = Sweep::default();
    let claimed = claim_due(pool, config, &mut sweep).await?;
    republish(pool, redis, config, &claimed, &mut sweep).await?;
    Ok(sweep)
}

/// A pending request due again: correlation id, stream, fields, attempts so far, and when it was
/// last published (empty: never).
type Due = (String, String, Vec<(String, String)>, i32, String);

/// In one transaction: times out the due requests out of attempts, fails those that cannot be
/// published (naming why), and marks the rest as published once more; returns the rest.
async fn claim_due(pool: &PgPool, config: &Config, sweep: &mut Sweep) -> Result<Vec<Due>> {
    let mut tx = pool.begin().await?;
    let due: Vec<(String, String, String, i32, String)> = sqlx::query_as(
        "SELECT correlation_id, stream, fields::text, attempts, coalesce(last_published_at::text, '')
           FROM ml_requests
          WHERE status = 'PENDING'
            AND coalesce(last_published_at, created_at) < now() - make_interval(secs => $1)
          ORDER BY coalesce(last_published_at, created_at)
          LIMIT 200 FOR UPDATE SKIP LOCKED",
    )
    .bind(config.timeout_seconds as f64)
    .fetch_all(&mut *tx)
    .await
    .context("cannot read pending requests")?;
    let mut claimed = Vec::new();
    for (correlation_id, stream, fields, attempts, published_at) in due {
        if attempts >= config.retry_attempts as i32 {
            sqlx::query(
                "UPDATE ml_requests SET status = 'TIMED_OUT', error = $2 WHERE correlation_id = $1",
            )
            .bind(&correlation_id)
            .bind(format!(
                "no complete result within {} s after {attempts} publication(s)",
                config.timeout_seconds
            ))
            .execute(&mut *tx)
            .await?;
            warn!(stream, correlation_id, attempts, "request timed out");
            sweep.timed_out += 1;
            continue;
        }
        let fields = match unpublishable(&stream, &fields) {
            Ok(fields) => fields,
            Err(reason) => {
                sqlx::query(
                    "UPDATE ml_requests SET status = 'FAILED', error = $2 WHERE correlation_id = $1",
                )
                .bind(&correlation_id)
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
                warn!(
                    stream,
                    correlation_id, "refused a pending request: {reason}"
                );
                sweep.refused += 1;
                continue;
            }
        };
        sqlx::query("UPDATE ml_requests SET attempts = attempts + 1, last_published_at = now() WHERE correlation_id = $1")
            .bind(&correlation_id)
            .execute(&mut *tx)
            .await?;
        claimed.push((correlation_id, stream, fields, attempts, published_at));
    }
    tx.commit().await?;

    Ok(claimed)
}

/// Publishes the claimed requests in order; when Redis refuses one, it and the ones after it get
/// their marks back (for the next sweep) and the sweep stops.
async fn republish(
    pool: &PgPool,
    redis: &RedisConnection,
    config: &Config,
    claimed: &[Due],
    sweep: &mut Sweep,
) -> Result<()> {
    let mut redis = redis.clone();
    for (at, (correlation_id, stream, fields, attempts, _)) in claimed.iter().enumerate() {
        if let Err(error) = streams::add(&mut redis, &config.stream_key(stream), fields).await {
            // Not published: these keep the marks they had, for the next sweep.
            for (correlation_id, _, _, _, published_at) in &claimed[at..] {
                let restored = sqlx::query(
                    "UPDATE ml_requests
                        SET attempts = attempts - 1,
                            last_published_at = NULLIF($2, '')::timestamptz
                      WHERE correlation_id = $1 AND status = 'PENDING'",
                )
                .bind(correlation_id)
                .bind(published_at)
                .execute(pool)
                .await;
                if let Err(failure) = restored {
                    warn!(
                        correlation_id,
                        "cannot restore an unpublished request's marks: {failure}"
                    );
                }
            }
            return Err(error.context("republishing pending requests stopped"));
        }
        info!(
            stream,
            correlation_id,
            attempt = attempts + 1,
            "republished a request without a result"
        );
        sweep.republished += 1;
    }
    Ok(())
}
