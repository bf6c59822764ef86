//! Watching a subject work: when entries are committed and acknowledged, the latencies and
//! deadlocks, and a clean database and key space for each subject.

use super::*;
use crate::ml::{
    ERROR_RESULTS as ERRORS, FACE_DETECTION_RESULTS as FACES, INSIGHTS_RESULTS as INSIGHTS,
};
use crate::persist;
use crate::progress::Progress;
use crate::redis_connection::RedisConnection;
use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// How a drain went.
pub(super) struct Drained {
    /// Seconds from the first committed entry to the last.
    pub(super) first_to_last: f64,
    /// Entries per second over the first and the last tenth of the entries.
    pub(super) first_tenth: f64,
    pub(super) last_tenth: f64,
    /// CPU per entry over the first and the last tenth (when it could be read).
    pub(super) tenths_cpu: Option<TenthsCpu>,
}

/// The subject's own and PostgreSQL's CPU time per entry, in microseconds, over the first and
/// the last tenth of a drain: whether a rate that falls over a long run is the subject's doing
/// (its own CPU per entry grows) or the database's.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct TenthsCpu {
    pub own_first: f64,
    pub own_last: f64,
    pub postgres_first: f64,
    pub postgres_last: f64,
}

/// CPU seconds used so far by the subject and by every PostgreSQL process, with how many
/// entries were done when they were read.
#[derive(Clone, Copy)]
struct CpuMark {
    done: usize,
    own: f64,
    postgres: f64,
}

impl CpuMark {
    fn read(done: usize, child: &Child) -> Option<CpuMark> {
        Some(CpuMark {
            done,
            own: process::cpu_seconds(child)?,
            postgres: process::ServerCpu::read().postgres,
        })
    }

    /// Own and PostgreSQL CPU per entry from `self` to `later`, in microseconds.
    fn per_entry_until(self, later: CpuMark) -> Option<(f64, f64)> {
        let entries = later.done.checked_sub(self.done).filter(|n| *n > 0)? as f64;
        Some((
            (later.own - self.own) * 1e6 / entries,
            (later.postgres - self.postgres) * 1e6 / entries,
        ))
    }
}

/// Own and PostgreSQL CPU per entry over the first and the last tenth, from the marks read at
/// the first entry done, a tenth, nine tenths and the end.
fn tenths_cpu(marks: &[Option<CpuMark>]) -> Option<TenthsCpu> {
    let [Some(start), Some(tenth), Some(nine_tenths), Some(end)] = marks else {
        return None;
    };
    let (own_first, postgres_first) = start.per_entry_until(*tenth)?;
    let (own_last, postgres_last) = nine_tenths.per_entry_until(*end)?;
    Some(TenthsCpu {
        own_first,
        own_last,
        postgres_first,
        postgres_last,
    })
}

impl Drained {
    /// From `(time, ledger count)` samples taken while draining `total` entries.
    pub(super) fn from_samples(
        started: Instant,
        samples: &[(Instant, usize)],
        total: usize,
    ) -> Drained {
        let end = samples.last().map_or(started, |s| s.0);
        let first = samples.iter().find(|s| s.1 > 0).map_or(started, |s| s.0);
        let tenth = (total / 10).max(1);
        let reached = |count: usize| samples.iter().find(|s| s.1 >= count).copied();
        let rate = |from: Option<(Instant, usize)>, to: Option<(Instant, usize)>| match (from, to) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        };
        Drained {
            first_to_last: (end - first).as_secs_f64(),
            first_tenth: rate(Some((first, 0)), reached(tenth)),
            last_tenth: rate(reached(total - tenth), samples.last().copied()),
            tenths_cpu: None,
        }
    }
}

/// Drops and recreates the bench database, migrated. Refuses names without "bench".
pub(super) async fn fresh_database(url: &str) -> Result<PgPool> {
    persist::drop_database(url, "bench").await?;
    let pool = persist::connect(url, 4, &crate::config::DatabaseTimeouts::default()).await?;
    persist::migrate(&pool).await?;
    Ok(pool)
}

pub(super) async fn delete_keys(redis: &mut RedisConnection, prefix: &str) -> Result<()> {
    redis.delete_keys_with_prefix(prefix).await?;
    Ok(())
}

pub(super) async fn deadlocks(pool: &PgPool) -> Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(pool)
            .await
            .context("cannot read pg_stat_database")?;
    Ok(n)
}

/// How many entries the subject has finished: read by its group and acknowledged (which it does
/// only after commit). Asked of Redis, which answers in O(1): counting the ledger every few
/// milliseconds would load the very database being measured.
pub(super) async fn acknowledged(
    redis: &mut RedisConnection,
    prefix: &str,
    subject: Subject,
) -> Result<usize> {
    let mut done = 0;
    for stream in [INSIGHTS, FACES, ERRORS] {
        let groups: Vec<std::collections::HashMap<String, redis::Value>> = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(format!("{prefix}{stream}"))
            .query_async(redis)
            .await
        {
            Ok(groups) => groups,
            // The stream does not exist (nothing generated for it) or the group not yet.
            Err(_) => continue,
        };
        let number = |value: Option<&redis::Value>| match value {
            Some(redis::Value::Int(n)) => usize::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        for group in groups {
            let name = match group.get("name") {
                Some(redis::Value::BulkString(bytes)) => {
                    String::from_utf8_lossy(bytes).into_owned()
                }
                Some(redis::Value::SimpleString(text)) => text.clone(),
                _ => continue,
            };
            if name == subject.group() {
                done +=
                    number(group.get("entries-read")).saturating_sub(number(group.get("pending")));
            }
        }
    }
    Ok(done)
}

/// Waits until the subject has acknowledged every entry (and so committed it).
pub(super) async fn drain(
    options: &BenchOptions,
    redis: &mut RedisConnection,
    prefix: &str,
    total: usize,
    subject: Subject,
    child: &mut Child,
    log: &Path,
) -> Result<Drained> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let label = format!("{:<13} {:<9}", subject.name(), "draining");
    let mut progress = Progress::new(&label, total as u64, "entries");
    // CPU read when the first entry is done, at a tenth, at nine tenths and at the end.
    let tenth = (total / 10).max(1);
    let thresholds = [1, tenth, total.saturating_sub(tenth).max(1), total];
    let mut marks = Vec::with_capacity(thresholds.len());
    loop {
        let done = acknowledged(redis, prefix, subject).await?;
        samples.push((Instant::now(), done));
        while marks.len() < thresholds.len() && done >= thresholds[marks.len()] {
            marks.push(CpuMark::read(done, child));
        }
        if done >= total {
            progress.finish(done as u64, total as u64, "");
            let mut drained = Drained::from_samples(started, &samples, total);
            drained.tenths_cpu = tenths_cpu(&marks);
            return Ok(drained);
        }
        progress.update(done as u64, total as u64, "");
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {} subject exited ({status}) with {done} of {total} entries done; see {}",
                subject.name(),
                log.display()
            );
        }
        if started.elapsed() > options.timeout {
            bail!(
                "the {} subject did not finish within {:?} ({done} of {total}); see {}",
                subject.name(),
                options.timeout,
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// p50, p95 and p99 of XADD → ledger row, in milliseconds.
pub(super) async fn latency_percentiles(pool: &PgPool) -> Result<[f64; 3]> {
    let row: (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "WITH l AS (
             SELECT extract(epoch FROM processed_at) * 1000 - split_part(entry_id, '-', 1)::float8 AS ms
               FROM processed_entries)
         SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
           FROM l",
    )
    .fetch_one(pool)
    .await
    .context("cannot compute latencies")?;
    Ok([
        row.0.unwrap_or(0.0),
        row.1.unwrap_or(0.0),
        row.2.unwrap_or(0.0),
    ])
}
