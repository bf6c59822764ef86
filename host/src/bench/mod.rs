//! `kaleidoscope bench`: end-to-end throughput and latency on this machine, with the host's
//! defaults, against hand-written reference consumers measured in the same run: a native one
//! (Rust, no framework: the limit the host's overhead is measured against) and a tuned Python
//! one (what a team writes instead of adopting the host).
//!
//! Each subject (the host, then each reference) gets a fresh database and stream prefix, the same
//! generated entries, and runs as a child process so its memory is its own. The bench waits
//! until the ledger holds every entry, checks what was stored, and prints one table. With
//! `--rounds N` the subjects take turns N times (this machine is shared: one run's figure moves
//! by ±10%), and each subject's median round is reported, with the ratios round by round.
//!
//! - Pre-loaded (default): every entry is in Redis before the subject starts; the drain rate is
//!   entries / time from the first to the last committed entry.
//! - `--rate R`: the subject runs first and entries are added at R per second; the latency from
//!   XADD (the entry id's time) to the entry's ledger row (written in the batch transaction) is
//!   what counts.
//!
//! [`traffic`] generates and adds the entries, [`process`] starts and measures the subjects,
//! [`measure`] watches them work; this module runs the subjects in turn and renders the table.

use crate::rollout::Mode;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod measure;
mod process;
mod reprocessing;
mod traffic;

use measure::*;
use process::*;
use traffic::*;

/// Which messages the bench generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// 35% seed all-in-one insights, 45% real per-service insights (embeddings included), 15%
    /// face detections with 0–3 faces and their embeddings, 5% errors.
    Mixed,
    /// Only the seed's all-in-one insights message (the shape of the first measurements).
    SeedInsights,
}

/// A hand-written consumer doing the shipped plugins' work for the mix, measured beside the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Reference {
    /// `bench/native/main.rs`, built beside the host from the same crates (redis, sqlx, tokio):
    /// what the work costs without plugins, validation, dead letters, outbox or locks.
    Native,
    /// `bench/baseline/consumer.py` (redis-py with hiredis, psycopg 3), in a virtual
    /// environment the bench creates on first use.
    Python,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub entries: usize,
    /// Entries per second to offer instead of pre-loading.
    pub rate: Option<u64>,
    /// The reference consumers to measure beside the host (each once per round).
    pub references: Vec<Reference>,
    /// How many times the subjects take turns.
    pub rounds: usize,
    pub mix: Mix,
    pub embedding_dims: usize,
    /// The bench database (dropped and recreated for each subject).
    pub database_url: String,
    pub redis_url: String,
    /// Seed nodes of the Redis Cluster to bench against (empty: the server of `redis_url`).
    pub redis_cluster_nodes: Vec<String>,
    /// The host binary (this executable).
    pub host_binary: PathBuf,
    /// Give up on a subject after this long.
    pub timeout: Duration,
    /// A candidate build of one of the host's plugins, and the live build it is rolled out
    /// against: the host is then measured three times, without a rollout, with the candidate
    /// as a shadow (on every entry, unless told otherwise), and as a canary on half of them.
    pub rollout: Option<BenchRollout>,
    /// With `rate`: measure the live latency beside a full-speed reprocessing run of the
    /// entries (see `reprocessing.rs`) instead of the host alone.
    pub reprocess: bool,
    /// The run's `--rate` (`None`: full speed).
    pub reprocess_rate: Option<u64>,
    /// Host processes run side by side (a reference is always one process).
    pub hosts: usize,
}

impl BenchOptions {
    /// A connection to the Redis server or cluster the bench runs against.
    pub(crate) async fn redis(&self) -> Result<crate::redis_connection::RedisConnection> {
        crate::redis_connection::RedisClient::new(&self.redis_url, &self.redis_cluster_nodes)?
            .dedicated(crate::redis_connection::RESPONSE_TIMEOUT)
            .await
    }
}

/// The two builds a bench's rollout compares (both loaded as `plugin deploy` loads them).
#[derive(Clone, Debug)]
pub struct BenchRollout {
    pub live: crate::deploy::Candidate,
    pub candidate: crate::deploy::Candidate,
    /// The share of the entries the shadow runs on (the canary takes half).
    pub shadow_percent: f64,
}

/// The figures of one subject.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figures {
    pub subject: String,
    /// A reference consumer (not the host).
    pub reference: bool,
    pub entries: usize,
    pub entries_per_second: f64,
    pub seconds: f64,
    pub latency_ms: Option<[f64; 3]>,
    pub peak_rss_mb: Option<f64>,
    /// CPU time the subject's own process used per entry, in microseconds (user + system):
    /// steadier than entries/s on a shared machine, and blind to the database's share.
    pub cpu_us_per_entry: Option<f64>,
    /// Share of the drain time spent inside plugin calls (host only).
    pub plugin_share: Option<f64>,
    /// What was stored, checked against what the entries say.
    pub verified: Result<String, String>,
    /// Deadlocks PostgreSQL reported while the subject ran.
    pub deadlocks: i64,
    /// Drain rate over the first and the last tenth of the entries (a rate that falls over the
    /// run means something grows: the ledger, an index, memory).
    /// Only when pre-loaded (offered at a rate, the rate decides).
    pub first_tenth_per_second: Option<f64>,
    pub last_tenth_per_second: Option<f64>,
    /// CPU per entry over those tenths: whose the slowing is.
    pub tenths_cpu_us_per_entry: Option<measure::TenthsCpu>,
    /// CPU time all PostgreSQL processes used while the subject drained, per entry: the
    /// database's share of the work, which a subject's own CPU figure does not show.
    pub postgres_cpu_us_per_entry: Option<f64>,
    /// The same for the Redis server(s).
    pub redis_cpu_us_per_entry: Option<f64>,
    /// Entries/s of every round (the figures above are those of the median round).
    pub rounds: Vec<f64>,
}

/// Runs the bench and returns the figures of each subject (the host first).
pub async fn run(options: &BenchOptions) -> Result<Vec<Figures>> {
    let data = Generated::new(options.entries, options.mix, options.embedding_dims);
    if !options.references.is_empty() && !options.redis_cluster_nodes.is_empty() {
        anyhow::bail!(
            "--reference: the reference consumers read one Redis server (REDIS_URL), not a Redis Cluster; run them without redis_cluster_nodes"
        );
    }
    if options.reprocess {
        let Some(rate) = options.rate else {
            anyhow::bail!("--reprocess measures the live latency beside a run: give --rate");
        };
        return reprocessing::live_beside_a_run(options, &data, rate).await;
    }
    let mut subjects = vec![Subject::Host(None)];
    if let Some(planned) = &options.rollout {
        for rollout in [(Mode::Shadow, planned.shadow_percent), (Mode::Canary, 50.0)] {
            subjects.push(Subject::Host(Some(rollout)));
        }
    }
    let mut references = options.references.clone();
    references.sort();
    references.dedup();
    subjects.extend(references.into_iter().map(Subject::Reference));
    // rounds[s][r]: subject s in round r.
    let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); subjects.len()];
    for round in 0..options.rounds.max(1) {
        for (figures, subject) in rounds.iter_mut().zip(&subjects) {
            if options.rounds > 1 {
                eprintln!(
                    "round {} of {}: {}",
                    round + 1,
                    options.rounds,
                    subject.label()
                );
            }
            figures.push(run_subject(options, &data, *subject).await?);
        }
    }
    Ok(rounds.into_iter().map(median_round).collect())
}

/// The figures of a subject's median round (by entries/s), with every round's entries/s.
fn median_round(mut figures: Vec<Figures>) -> Figures {
    let rates: Vec<f64> = figures.iter().map(|f| f.entries_per_second).collect();
    figures.sort_by(|a, b| a.entries_per_second.total_cmp(&b.entries_per_second));
    let mut median = figures.swap_remove(figures.len() / 2);
    median.rounds = rates;
    median
}

/// `a / b` of every round, as " (round by round min–max)"; nothing for a single round.
fn round_ratios(a: &Figures, b: &Figures) -> String {
    let ratios: Vec<f64> = a
        .rounds
        .iter()
        .zip(&b.rounds)
        .map(|(a, b)| a / b.max(f64::MIN_POSITIVE))
        .collect();
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(0.0, f64::max);
    if ratios.len() < 2 {
        return String::new();
    }
    format!(" (round by round {min:.2}–{max:.2}x)")
}

/// Renders the figures as a table, with the host's ratio to each reference.
pub fn render(options: &BenchOptions, results: &[Figures]) -> String {
    let mut out = String::new();
    let mode = match options.rate {
        Some(rate) => format!("{rate} entries/s offered"),
        None => "pre-loaded".into(),
    };
    out.push_str(&format!(
        "{} entries ({:?} mix, {mode}), {} cores\n\n",
        options.entries,
        options.mix,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    out.push_str(&format!(
        "{:<14} {:>10} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}  {}\n",
        "subject",
        "entries/s",
        "seconds",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "peak RSS",
        "CPU/entry",
        "PG CPU/e",
        "Redis/e",
        "plugins",
        "deadlocks",
        "rows"
    ));
    for r in results {
        let latency = |i: usize| {
            r.latency_ms
                .map_or("-".to_string(), |l| format!("{:.1}", l[i]))
        };
        out.push_str(&format!(
            "{:<14} {:>10.0} {:>9.2} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}  {}\n",
            r.subject,
            r.entries_per_second,
            r.seconds,
            latency(0),
            latency(1),
            latency(2),
            r.peak_rss_mb
                .map_or("-".to_string(), |m| format!("{m:.0} MB")),
            micros(r.cpu_us_per_entry),
            micros(r.postgres_cpu_us_per_entry),
            micros(r.redis_cpu_us_per_entry),
            r.plugin_share
                .map_or("-".to_string(), |s| format!("{:.1}%", s * 100.0)),
            r.deadlocks,
            match &r.verified {
                Ok(summary) => format!("ok ({summary})"),
                Err(problem) => format!("WRONG: {problem}"),
            }
        ));
    }
    out.push('\n');
    for r in results {
        if let (Some(first), Some(last)) = (r.first_tenth_per_second, r.last_tenth_per_second) {
            out.push_str(&format!(
                "{}: first tenth of the entries {first:.0}/s, last tenth {last:.0}/s",
                r.subject
            ));
            if let Some(cpu) = r.tenths_cpu_us_per_entry {
                out.push_str(&format!(
                    " (CPU per entry, first → last tenth: own {:.0} → {:.0} µs, PostgreSQL {:.0} → {:.0} µs)",
                    cpu.own_first, cpu.own_last, cpu.postgres_first, cpu.postgres_last
                ));
            }
            out.push('\n');
        }
    }
    if let Some(host) = results.first() {
        for reference in results.iter().filter(|r| r.reference) {
            out.push_str(&format!(
                "\n{} / {}: {:.2}x the entries/s{}",
                host.subject,
                reference.subject,
                host.entries_per_second / reference.entries_per_second.max(f64::MIN_POSITIVE),
                round_ratios(host, reference)
            ));
        }
        out.push('\n');
    }
    if options.rounds > 1 {
        out.push_str(&format!(
            "\n{} rounds, subjects taking turns; each row is its subject's median round\n",
            options.rounds
        ));
        for r in results {
            let rates: Vec<String> = r.rounds.iter().map(|e| format!("{e:.0}")).collect();
            out.push_str(&format!("{}: {} entries/s\n", r.subject, rates.join(", ")));
        }
    }
    out
}

/// Microseconds for the table ("-" when unknown).
fn micros(us: Option<f64>) -> String {
    us.map_or("-".to_string(), |us| format!("{us:.0} µs"))
}

/// What is measured: the host (with a rollout of a candidate, in a mode on a share of the
/// entries), or a hand-written reference consumer.
#[derive(Clone, Copy, PartialEq)]
enum Subject {
    Host(Option<(Mode, f64)>),
    Reference(Reference),
}

impl Subject {
    /// The consumer group the subject reads with.
    fn group(self) -> &'static str {
        match self {
            Subject::Host(_) => "backend-group",
            Subject::Reference(Reference::Native) => "native-group",
            Subject::Reference(Reference::Python) => "baseline-group",
        }
    }

    /// Its name in logs, file names and the table.
    fn name(self) -> &'static str {
        match self {
            Subject::Host(None) => "kaleidoscope",
            Subject::Host(Some((Mode::Shadow, _))) => "+shadow",
            Subject::Host(Some((Mode::Canary, _))) => "+canary",
            Subject::Reference(Reference::Native) => "native",
            Subject::Reference(Reference::Python) => "python",
        }
    }

    /// Its name in the figures: with the rollout's share.
    fn label(self) -> String {
        match self {
            Subject::Host(Some((mode, percent))) => format!("+{} {percent}%", mode.as_str()),
            _ => self.name().to_string(),
        }
    }
}

async fn run_subject(
    options: &BenchOptions,
    data: &Generated,
    subject: Subject,
) -> Result<Figures> {
    let prefix = format!("bench-{}-{}:", std::process::id(), subject.name());
    let pool = fresh_database(&options.database_url).await?;
    data.seed(&pool).await?;
    let mut redis = options.redis().await?;
    delete_keys(&mut redis, &prefix).await?;
    let deadlocks_before = deadlocks(&pool).await?;
    if let (Subject::Host(Some((mode, percent))), Some(rollout)) = (subject, &options.rollout) {
        start_rollout(&pool, &prefix, rollout, mode, percent).await?;
    }

    if options.rate.is_none() {
        add_entries(&mut redis, &prefix, data, None, subject).await?;
    }
    let metrics_port = free_port()?;
    let log = std::env::temp_dir().join(format!("kaleidoscope-bench-{}.log", subject.name()));
    let servers_before = ServerCpu::read();
    let mut child = spawn(options, subject, &prefix, "bench", metrics_port, &log)?;
    // The rest of the fleet: the host only, each on a port and a log of its own.
    let mut fleet = Vec::new();
    if matches!(subject, Subject::Host(_)) {
        for n in 2..=options.hosts {
            let port = free_port()?;
            let log =
                std::env::temp_dir().join(format!("kaleidoscope-bench-{}-{n}.log", subject.name()));
            let consumer = format!("bench-{n}");
            fleet.push((
                spawn(options, subject, &prefix, &consumer, port, &log)?,
                port,
            ));
        }
    }
    let mut offered_at = None;
    let outcome = async {
        if let Some(rate) = options.rate {
            wait_for_groups(&mut redis, &prefix, subject, &mut child).await?;
            offered_at = Some(Instant::now());
            add_entries(&mut redis, &prefix, data, Some(rate), subject).await?;
        }
        drain(
            options,
            &mut redis,
            &prefix,
            data.len(),
            subject,
            &mut child,
            &log,
        )
        .await
    }
    .await;
    let servers = ServerCpu::read().since(&servers_before);
    let mut peak_rss_mb = peak_rss_mb(&child);
    let mut cpu_seconds = cpu_seconds(&child);
    let mut plugin_seconds = match subject {
        Subject::Host(_) => scrape_plugin_seconds(metrics_port).await,
        Subject::Reference(_) => None,
    };
    stop(&mut child);
    for (mut host, port) in fleet {
        peak_rss_mb = max_of(peak_rss_mb, process::peak_rss_mb(&host));
        cpu_seconds = sum_of(cpu_seconds, process::cpu_seconds(&host));
        plugin_seconds = sum_of(plugin_seconds, scrape_plugin_seconds(port).await);
        stop(&mut host);
    }
    let drained = outcome?;
    let first_to_last = drained.first_to_last;

    let latency_ms = match options.rate {
        Some(_) => Some(latency_percentiles(&pool).await?),
        None => None,
    };
    let verified = data.verify(&pool, &mut redis, &prefix, subject).await;
    let deadlocks = deadlocks(&pool).await? - deadlocks_before;
    delete_keys(&mut redis, &prefix).await?;
    pool.close().await;
    // Offered at a rate: from the first entry offered to the last one finished (the rate
    // itself, if the subject keeps up). Pre-loaded: from the first entry finished to the last.
    let (drain, tenths) = match offered_at {
        Some(at) => (at.elapsed().as_secs_f64(), None),
        None => (
            first_to_last,
            Some((drained.first_tenth, drained.last_tenth, drained.tenths_cpu)),
        ),
    };
    Ok(Figures {
        reference: matches!(subject, Subject::Reference(_)),
        subject: match subject {
            Subject::Host(_) if options.hosts > 1 => {
                format!("{} ×{}", subject.label(), options.hosts)
            }
            _ => subject.label(),
        },
        entries: data.len(),
        entries_per_second: data.len() as f64 / drain.max(1e-9),
        seconds: drain,
        latency_ms,
        peak_rss_mb,
        cpu_us_per_entry: cpu_seconds.map(|s| s * 1e6 / data.len().max(1) as f64),
        plugin_share: plugin_seconds.map(|s| s / drain.max(1e-9)),
        verified,
        deadlocks,
        first_tenth_per_second: tenths.map(|t| t.0),
        last_tenth_per_second: tenths.map(|t| t.1),
        tenths_cpu_us_per_entry: tenths.and_then(|t| t.2),
        postgres_cpu_us_per_entry: Some(servers.postgres * 1e6 / data.len().max(1) as f64),
        redis_cpu_us_per_entry: Some(servers.redis * 1e6 / data.len().max(1) as f64),
        rounds: Vec::new(),
    })
}

/// Both figures summed, or nothing when either is unknown.
fn sum_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? + b?)
}

/// The larger figure, or nothing when either is unknown.
fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a?.max(b?))
}

/// Plans `rollout` for the host about to start: it follows it from its first batch.
async fn start_rollout(
    pool: &sqlx::PgPool,
    prefix: &str,
    rollout: &BenchRollout,
    mode: Mode,
    percent: f64,
) -> Result<()> {
    let (live, candidate) = (&rollout.live.plugin, &rollout.candidate.plugin);
    let new = crate::persist::rollouts::NewRollout {
        plugin: candidate.name.clone(),
        live_version: live.version.clone(),
        live_sha256: live.sha256.clone(),
        candidate_version: candidate.version.clone(),
        candidate_sha256: candidate.sha256.clone(),
        candidate_streams: candidate.streams.clone(),
        mode: mode.as_str().to_string(),
        percent,
        key_field: Some("mediaId".to_string()),
        max_failure_points: 5.0,
        window_entries: 200,
        // Measured, not judged: a slow shadow must show in the figures, not end the run.
        max_latency_factor: f64::MAX,
        max_difference_percent: None,
        started_by: "bench".to_string(),
    };
    let fleet = format!("{prefix}{}", Subject::Host(None).group());
    crate::persist::rollouts::start(pool, &fleet, &new, &rollout.candidate.bytes)
        .await
        .context("cannot plan the bench's rollout")?;
    Ok(())
}
