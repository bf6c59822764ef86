//! `bench --rate R --reprocess`: the live consumers' latency while a reprocessing run goes at
//! full speed beside them, and the run's own speed.
//!
//! The generated entries are loaded and drained first (they become history); then a
//! `kaleidoscope reprocess --stream ml-insights-results --from 0` starts as a process of its own
//! (as an operator would start it) while the same entries are offered again at R per second.
//! The latency of the live entries added while the run went is compared with that of those
//! added after it ended, in the same bench run.

use super::*;
use crate::ml::INSIGHTS_RESULTS as INSIGHTS;
use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use std::process::{Command, Stdio};

/// The figures: live entries beside the run, live entries after it, and the run.
pub(super) async fn live_beside_a_run(
    options: &BenchOptions,
    data: &Generated,
    rate: u64,
) -> Result<Vec<Figures>> {
    let subject = Subject::Host(None);
    let prefix = format!("bench-{}-reprocess:", std::process::id());
    let pool = fresh_database(&options.database_url).await?;
    data.seed(&pool).await?;
    let mut redis = options.redis().await?;
    delete_keys(&mut redis, &prefix).await?;
    add_entries(&mut redis, &prefix, data, None, subject).await?;
    let metrics_port = free_port()?;
    let log = std::env::temp_dir().join("kaleidoscope-bench-reprocess-host.log");
    let run_log = std::env::temp_dir().join("kaleidoscope-bench-reprocess-run.log");
    let mut child = spawn(options, subject, &prefix, "bench", metrics_port, &log)?;
    let outcome = async {
        drain(
            options,
            &mut redis,
            &prefix,
            data.len(),
            subject,
            &mut child,
            &log,
        )
        .await?;
        let mut run = Command::new(&options.host_binary);
        run.args(["reprocess", "--stream", INSIGHTS, "--from", "0", "--json"])
            .args(
                options
                    .reprocess_rate
                    .map(|rate| ["--rate".to_string(), rate.to_string()])
                    .into_iter()
                    .flatten(),
            );
        let mut run = process::with_deployment(&mut run, options, &prefix)
            .env("KALEIDOSCOPE_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&run_log)
                    .with_context(|| format!("cannot create {}", run_log.display()))?,
            )
            .spawn()
            .context("cannot start the reprocessing run")?;
        // Offered once the run has fixed its selection (the stream's end when it starts).
        let deadline = Instant::now() + Duration::from_secs(60);
        while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM reprocess_runs WHERE selected > 0")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
            == 0
        {
            if Instant::now() > deadline || run.try_wait()?.is_some() {
                bail!(
                    "the reprocessing run did not start; see {}",
                    run_log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let offered_at = std::time::SystemTime::now();
        add_entries(&mut redis, &prefix, data, Some(rate), subject).await?;
        drain(
            options,
            &mut redis,
            &prefix,
            2 * data.len(),
            subject,
            &mut child,
            &log,
        )
        .await?;
        let deadline = Instant::now() + options.timeout;
        let status = loop {
            if let Some(status) = run.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = run.kill();
                bail!(
                    "the reprocessing run did not end in time; see {}",
                    run_log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if !status.success() {
            bail!(
                "the reprocessing run failed ({status}); see {}",
                run_log.display()
            );
        }
        Ok(offered_at)
    }
    .await;
    stop(&mut child);
    let offered_at = outcome?;
    let offered_ms = offered_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let figures = figures(&pool, data.len(), rate, offered_ms).await;
    delete_keys(&mut redis, &prefix).await?;
    pool.close().await;
    figures
}

/// Reads the run and the live entries' latencies beside it and after it from the database.
async fn figures(
    pool: &PgPool,
    entries: usize,
    rate: u64,
    offered_ms: f64,
) -> Result<Vec<Figures>> {
    let (processed, run_seconds, started_ms, finished_ms): (i64, f64, f64, f64) = sqlx::query_as(
        "SELECT processed,
                extract(epoch FROM finished_at - started_at)::float8,
                extract(epoch FROM started_at)::float8 * 1000,
                extract(epoch FROM finished_at)::float8 * 1000
           FROM reprocess_runs WHERE state = 'finished' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .context("the reprocessing run is not recorded as finished")?;
    let live = |from: f64, to: f64| async move {
        let row: (i64, Option<f64>, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
            "WITH l AS (
                 SELECT split_part(entry_id, '-', 1)::float8 AS added,
                        extract(epoch FROM processed_at) * 1000
                          - split_part(entry_id, '-', 1)::float8 AS ms
                   FROM processed_entries WHERE entry_id NOT LIKE '%/%')
             SELECT count(*),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY ms),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                    max(added) - min(added)
               FROM l WHERE added >= $1 AND added < $2",
        )
        .bind(from)
        .bind(to)
        .fetch_one(pool)
        .await
        .context("cannot compute latencies")?;
        Ok::<_, anyhow::Error>((
            row.0,
            [
                row.1.unwrap_or(0.0),
                row.2.unwrap_or(0.0),
                row.3.unwrap_or(0.0),
            ],
            row.4.unwrap_or(0.0) / 1000.0,
        ))
    };
    let (beside, beside_latency, beside_seconds) =
        live(offered_ms.max(started_ms), finished_ms).await?;
    let (after, after_latency, after_seconds) = live(finished_ms.max(offered_ms), f64::MAX).await?;
    let row =
        |subject: &str, count: i64, per_second: f64, seconds: f64, latency, verified| Figures {
            subject: subject.to_string(),
            entries: usize::try_from(count).unwrap_or(0),
            entries_per_second: per_second,
            seconds,
            latency_ms: latency,
            peak_rss_mb: None,
            cpu_us_per_entry: None,
            plugin_share: None,
            verified,
            deadlocks: 0,
            first_tenth_per_second: None,
            last_tenth_per_second: None,
            tenths_cpu_us_per_entry: None,
            postgres_cpu_us_per_entry: None,
            redis_cpu_us_per_entry: None,
            reference: false,
            rounds: Vec::new(),
        };
    let complete = if processed as usize == entries {
        Ok(format!("{processed} entries reprocessed"))
    } else {
        Err(format!("{processed} of {entries} entries reprocessed"))
    };
    Ok(vec![
        row(
            "live+run",
            beside,
            rate as f64,
            beside_seconds,
            Some(beside_latency),
            Ok("offered while the run went".into()),
        ),
        row(
            "live alone",
            after,
            rate as f64,
            after_seconds,
            Some(after_latency),
            Ok("offered after the run ended".into()),
        ),
        row(
            "reprocess",
            processed,
            processed as f64 / run_seconds.max(1e-9),
            run_seconds,
            None,
            complete,
        ),
    ])
}
