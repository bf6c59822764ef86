//! `kaleidoscope demo`: the whole system in one command, for a newcomer right after cloning.
//!
//! It recreates a demo database, creates sample users, posts and media, enqueues their processing
//! requests in the same transaction (published after the commit), runs the ML simulator and the
//! host in-process, shows progress until every request is answered and every result stream is
//! drained, and ends with a summary read back from the database.

use crate::config::Config;
use crate::host::RunningHost;
use crate::requests::{Publisher, Request};
use crate::shutdown::StopSwitch;
use crate::simulate::{self, SimulatorOptions};
use crate::{persist, redis_connection, status};
use anyhow::{Result, bail};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How big the demo is, and where it runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub users: i64,
    pub posts: i64,
    pub media_per_post: i64,
    pub error_rate: f64,
    /// The demo database; dropped and recreated. Its name must contain `demo`.
    pub database_url: String,
    /// Prefix of every stream the demo touches; its keys are deleted first.
    pub stream_prefix: String,
    /// Give up after this long.
    pub deadline: Duration,
}

/// What the demo stored, read back from the database and Redis.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub users: i64,
    pub posts: i64,
    pub media: i64,
    pub requests: BTreeMap<String, i64>,
    pub insights: i64,
    pub faces: i64,
    pub recognised_faces: i64,
    pub profile_embeddings: i64,
    pub ml_errors: i64,
    pub dead_letters: i64,
    pub entries_processed: i64,
    /// The whole demo, set-up included.
    pub seconds: f64,
    /// From publishing the requests to the last result stored.
    pub processing_seconds: f64,
    /// Result entries per second of processing (read, handle, commit, acknowledge).
    pub entries_per_second: f64,
    /// Where the demo's streams are.
    pub stream_prefix: String,
}

impl Summary {
    /// A short human-readable account.
    pub fn render(&self) -> String {
        let requests = self
            .requests
            .iter()
            .map(|(k, n)| format!("{n} {}", k.to_lowercase()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "Kaleidoscope demo finished in {:.1} s\n\
             \x20 sample data      {} users, {} posts, {} media\n\
             \x20 requests         {requests}\n\
             \x20 insights         {} media with merged AI insights\n\
             \x20 faces            {} detected, {} linked to a suggested user\n\
             \x20 profiles         {} face embeddings of profile pictures\n\
             \x20 ML errors        {} recorded\n\
             \x20 dead letters     {}\n\
             \x20 throughput       {} result entries stored in {:.1} s = {:.0} entries/s end to end\n\
             Look around: psql on the demo database; its streams are prefixed {}.\n",
            self.seconds,
            self.users,
            self.posts,
            self.media,
            self.insights,
            self.faces,
            self.recognised_faces,
            self.profile_embeddings,
            self.ml_errors,
            self.dead_letters,
            self.entries_processed,
            self.processing_seconds,
            self.entries_per_second,
            self.stream_prefix,
        )
    }
}

/// Runs the demo and returns its summary.
pub async fn run(base: &Config, options: &DemoOptions) -> Result<Summary> {
    let started = Instant::now();
    persist::drop_database(&options.database_url, "demo").await?;

    let mut config = base.clone();
    config.database_url = options.database_url.clone();
    config.stream_prefix = options.stream_prefix.clone();
    config.consumer_name = "demo-host".into();
    config.reclaim_idle = Duration::from_millis(1000);
    config.poll_timeout = Duration::from_millis(200);
    config.watch_plugins = false;
    config.http_addr = None;
    config.migrate = true;
    config.processing_enabled = true;
    clear_streams(&config).await?;

    let host = RunningHost::start(config.clone()).await?;
    let pool = persist::connect(&config.database_url, 4, &config.database_timeouts).await?;
    let stop = StopSwitch::new();
    let stopped = stop.subscribe();
    let simulator_config = config.clone();
    let simulator_options = SimulatorOptions {
        error_rate: options.error_rate,
        ..Default::default()
    };
    let simulator =
        tokio::spawn(
            async move { simulate::run(&simulator_config, &simulator_options, stopped).await },
        );

    let media = seed_and_request(&pool, &config, options).await?;
    let processing = Instant::now();
    let outcome = wait_for_answers(&pool, &config, options, started).await;
    let processing = processing.elapsed();
    stop.stop();
    host.shutdown().await;
    match simulator.await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return Err(error.context("the ML simulator failed")),
        Err(error) => bail!("the ML simulator task failed: {error}"),
    }
    outcome?;
    let summary = summarise(
        &pool,
        &config,
        options,
        media,
        started.elapsed(),
        processing,
    )
    .await;
    pool.close().await;
    summary
}

async fn clear_streams(config: &Config) -> Result<()> {
    let mut conn = redis_connection::open(config).await?;
    conn.delete_keys_with_prefix(&config.stream_prefix).await?;
    Ok(())
}

/// Creates users, posts and media and enqueues their requests in the same transaction; the
/// requests are published once it has committed.
async fn seed_and_request(pool: &PgPool, config: &Config, options: &DemoOptions) -> Result<i64> {
    let publisher = Publisher::new(Arc::new(config.clone()), pool.clone())?;
    let mut tx = pool.begin().await?;
    let mut enqueued = Vec::new();
    for user in 1..=options.users {
        sqlx::query("INSERT INTO users (user_id, username) VALUES ($1, $2)")
            .bind(user)
            .bind(format!("user{user}"))
            .execute(&mut *tx)
            .await?;
        let request = Request::ProfilePicture {
            user_id: user,
            image_url: format!("https://cdn.example/profiles/{user}.jpg"),
        };
        enqueued.extend(publisher.enqueue(&mut tx, &request, None).await?);
    }
    let mut media_id = 0;
    for post in 1..=options.posts {
        let author = (post - 1) % options.users + 1;
        sqlx::query("INSERT INTO posts (post_id, author_id) VALUES ($1, $2)")
            .bind(post)
            .bind(author)
            .execute(&mut *tx)
            .await?;
        for _ in 0..options.media_per_post {
            media_id += 1;
            let url = format!("https://cdn.example/posts/{post}/{media_id}.jpg");
            sqlx::query(
                "INSERT INTO post_media (media_id, post_id, media_url) VALUES ($1, $2, $3)",
            )
            .bind(media_id)
            .bind(post)
            .bind(&url)
            .execute(&mut *tx)
            .await?;
            let request = Request::PostImage {
                post_id: post,
                media_id,
                media_url: url,
                uploader_id: Some(author),
            };
            enqueued.extend(publisher.enqueue(&mut tx, &request, None).await?);
        }
    }
    tx.commit().await?;
    publisher.flush(&enqueued).await?;
    Ok(media_id)
}

/// Waits until every request is answered and every result stream is drained, showing progress.
async fn wait_for_answers(
    pool: &PgPool,
    config: &Config,
    options: &DemoOptions,
    started: Instant,
) -> Result<()> {
    let mut conn = redis_connection::open(config).await?;
    let mut progress = crate::progress::Progress::new("requests answered", 0, "");
    loop {
        let requests = status::requests_by_status(pool).await?;
        let total: i64 = requests.values().sum();
        let answered = total - requests.get(status::PENDING).copied().unwrap_or(0);
        let mut backlog = 0;
        for stream in crate::ml::RESULT_STREAMS {
            let report = status::stream_report(&mut conn, config, stream).await?;
            backlog += report.pending + report.lag.unwrap_or(report.length);
        }
        let done = total > 0 && answered == total && backlog == 0;
        let in_flight = format!("{backlog} results in flight");
        let (answered, total) = (answered as u64, total as u64);
        if done {
            progress.finish(answered, total, &in_flight);
        } else {
            progress.update(answered, total, &in_flight);
        }
        if done {
            return Ok(());
        }
        if started.elapsed() > options.deadline {
            bail!(
                "the demo did not finish within {:?} ({answered}/{total} requests answered, {backlog} results in flight)",
                options.deadline
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn summarise(
    pool: &PgPool,
    config: &Config,
    options: &DemoOptions,
    media: i64,
    elapsed: Duration,
    processing: Duration,
) -> Result<Summary> {
    let count =
        |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await };
    let mut conn = redis_connection::open(config).await?;
    let dead_letters: i64 = redis::cmd("XLEN")
        .arg(config.dlq_key())
        .query_async(&mut conn)
        .await?;
    let entries_processed = count("SELECT count(*) FROM processed_entries").await?;
    Ok(Summary {
        users: options.users,
        posts: options.posts,
        media,
        requests: status::requests_by_status(pool).await?,
        insights: count("SELECT count(*) FROM media_ai_insights").await?,
        faces: count("SELECT count(*) FROM media_detected_faces").await?,
        recognised_faces: count(
            "SELECT count(*) FROM media_detected_faces WHERE status = 'SUGGESTED'",
        )
        .await?,
        profile_embeddings: count("SELECT count(*) FROM user_face_embeddings").await?,
        ml_errors: count("SELECT count(*) FROM ml_processing_errors").await?,
        dead_letters,
        entries_processed,
        seconds: elapsed.as_secs_f64(),
        processing_seconds: processing.as_secs_f64(),
        entries_per_second: entries_processed as f64 / processing.as_secs_f64().max(0.001),
        stream_prefix: config.stream_prefix.clone(),
    })
}
