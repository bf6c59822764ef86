//! `kaleidoscope bench`: end-to-end throughput and latency on this machine, with the host's
//! defaults, against a hand-written reference consumer measured in the same run.
//!
//! Each subject (the host, then the baseline) gets a fresh database and stream prefix, the same
//! generated entries, and runs as a child process so its memory is its own. The bench waits
//! until the ledger holds every entry, checks what was stored, and prints one table.
//!
//! - Pre-loaded (default): every entry is in Redis before the subject starts; the drain rate is
//!   entries / time from the first to the last committed entry.
//! - `--rate R`: the subject runs first and entries are added at R per second; the latency from
//!   XADD (the entry id's time) to the entry's ledger row (written in the batch transaction) is
//!   what counts.

use crate::persist;
use crate::progress::Progress;
use anyhow::{Context, Result, bail};
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The reference consumer (`bench/baseline/consumer.py`), embedded so the bench runs from any
/// directory.
const BASELINE_SCRIPT: &str = include_str!("../../bench/baseline/consumer.py");
/// Where the baseline's Python environment is created on first use.
const BASELINE_VENV: &str = "target/bench-venv";
use crate::ml::{
    ERROR_RESULTS as ERRORS, FACE_DETECTION_RESULTS as FACES, INSIGHTS_RESULTS as INSIGHTS,
    INSIGHTS_SERVICES as SERVICES,
};

/// Which messages the bench generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// 35% seed all-in-one insights, 45% real per-service insights (embeddings included), 15%
    /// face detections with 0–3 faces and their embeddings, 5% errors.
    Mixed,
    /// Only the seed's all-in-one insights message (the shape of the first measurements).
    SeedInsights,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub entries: usize,
    /// Entries per second to offer instead of pre-loading.
    pub rate: Option<u64>,
    pub baseline: bool,
    pub mix: Mix,
    pub embedding_dims: usize,
    /// The bench database (dropped and recreated for each subject).
    pub database_url: String,
    pub redis_url: String,
    /// The host binary (this executable).
    pub host_binary: PathBuf,
    /// Give up on a subject after this long.
    pub timeout: Duration,
}

/// The figures of one subject.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figures {
    pub subject: String,
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
}

/// Runs the bench and returns the figures of each subject (the host first).
pub async fn run(options: &BenchOptions) -> Result<Vec<Figures>> {
    let data = Generated::new(options.entries, options.mix, options.embedding_dims);
    let mut results = vec![run_subject(options, &data, Subject::Host).await?];
    if options.baseline {
        results.push(run_subject(options, &data, Subject::Baseline).await?);
    }
    Ok(results)
}

/// Renders the figures as a table, with the ratio to the baseline when there is one.
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
        "{:<14} {:>10} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9}  {}\n",
        "subject",
        "entries/s",
        "seconds",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "peak RSS",
        "CPU/entry",
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
            "{:<14} {:>10.0} {:>9.2} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9}  {}\n",
            r.subject,
            r.entries_per_second,
            r.seconds,
            latency(0),
            latency(1),
            latency(2),
            r.peak_rss_mb
                .map_or("-".to_string(), |m| format!("{m:.0} MB")),
            r.cpu_us_per_entry
                .map_or("-".to_string(), |us| format!("{us:.0} µs")),
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
                "{}: first tenth of the entries {first:.0}/s, last tenth {last:.0}/s\n",
                r.subject
            ));
        }
    }
    if let [host, baseline] = results {
        out.push_str(&format!(
            "\nhost / baseline: {:.2}x the entries/s\n",
            host.entries_per_second / baseline.entries_per_second.max(f64::MIN_POSITIVE)
        ));
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Subject {
    Host,
    Baseline,
}

impl Subject {
    /// The consumer group the subject reads with.
    fn group(self) -> &'static str {
        match self {
            Subject::Host => "backend-group",
            Subject::Baseline => "baseline-group",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Subject::Host => "kaleidoscope",
            Subject::Baseline => "baseline",
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
    let mut redis = crate::redis_connection::open(&options.redis_url).await?;
    delete_keys(&mut redis, &prefix).await?;
    let deadlocks_before = deadlocks(&pool).await?;

    if options.rate.is_none() {
        add_entries(&mut redis, &prefix, data, None, subject).await?;
    }
    let metrics_port = free_port()?;
    let log = std::env::temp_dir().join(format!("kaleidoscope-bench-{}.log", subject.name()));
    let mut child = spawn(options, subject, &prefix, metrics_port, &log)?;
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
    let peak_rss_mb = peak_rss_mb(&child);
    let cpu_seconds = cpu_seconds(&child);
    let plugin_seconds = match subject {
        Subject::Host => scrape_plugin_seconds(metrics_port).await,
        Subject::Baseline => None,
    };
    stop(&mut child);
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
            Some((drained.first_tenth, drained.last_tenth)),
        ),
    };
    Ok(Figures {
        subject: subject.name().into(),
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
    })
}

/// How a drain went.
struct Drained {
    /// Seconds from the first committed entry to the last.
    first_to_last: f64,
    /// Entries per second over the first and the last tenth of the entries.
    first_tenth: f64,
    last_tenth: f64,
}

impl Drained {
    /// From `(time, ledger count)` samples taken while draining `total` entries.
    fn from_samples(started: Instant, samples: &[(Instant, usize)], total: usize) -> Drained {
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
        }
    }
}

/// Drops and recreates the bench database, migrated. Refuses names without "bench".
async fn fresh_database(url: &str) -> Result<PgPool> {
    persist::drop_database(url, "bench").await?;
    let pool = persist::connect(url, 4, &crate::config::DatabaseTimeouts::default()).await?;
    persist::migrate(&pool).await?;
    Ok(pool)
}

async fn delete_keys(redis: &mut MultiplexedConnection, prefix: &str) -> Result<()> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(redis)
        .await
        .context("KEYS failed")?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(redis)
            .await
            .context("DEL failed")?;
    }
    Ok(())
}

async fn deadlocks(pool: &PgPool) -> Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(pool)
            .await
            .context("cannot read pg_stat_database")?;
    Ok(n)
}

fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?;
    Ok(listener.local_addr()?.port())
}

/// Starts the subject as a child process, its stderr to `log`.
fn spawn(
    options: &BenchOptions,
    subject: Subject,
    prefix: &str,
    metrics_port: u16,
    log: &Path,
) -> Result<Child> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut command = match subject {
        Subject::Host => {
            let mut command = Command::new(&options.host_binary);
            command
                .arg("run")
                .env(
                    "KALEIDOSCOPE_HTTP_ADDR",
                    format!("127.0.0.1:{metrics_port}"),
                )
                .env("KALEIDOSCOPE_CONSUMER_NAME", "bench")
                .env("KALEIDOSCOPE_WATCH_PLUGINS", "false")
                .env("KALEIDOSCOPE_LOG_FORMAT", "text");
            command
        }
        Subject::Baseline => {
            let python = baseline_python()?;
            let script = std::env::temp_dir().join("kaleidoscope-bench-baseline.py");
            std::fs::write(&script, BASELINE_SCRIPT)
                .with_context(|| format!("cannot write {}", script.display()))?;
            let mut command = Command::new(python);
            command.arg(script);
            command
        }
    };
    command
        .env("DATABASE_URL", &options.database_url)
        .env("REDIS_URL", &options.redis_url)
        .env("KALEIDOSCOPE_STREAM_PREFIX", prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    command
        .spawn()
        .with_context(|| format!("cannot start the {} subject", subject.name()))
}

/// The baseline's Python, from a virtual environment created (with `redis` and `psycopg`) on
/// first use.
fn baseline_python() -> Result<PathBuf> {
    let venv = PathBuf::from(BASELINE_VENV);
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import redis, psycopg"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ready {
        return Ok(python);
    }
    eprintln!("setting up the baseline's Python environment in {BASELINE_VENV} (once)");
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("cannot run python3 (the baseline needs Python 3.9 or newer)")?;
    if !created.success() {
        bail!("`python3 -m venv {BASELINE_VENV}` failed");
    }
    let installed = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "redis>=5", "psycopg[binary]>=3.1"])
        .status()
        .context("cannot run pip in the baseline's environment")?;
    if !installed.success() {
        bail!("installing redis and psycopg into {BASELINE_VENV} failed");
    }
    Ok(python)
}

/// Waits until the subject has created its consumer groups (it is ready to read).
async fn wait_for_groups(
    redis: &mut MultiplexedConnection,
    prefix: &str,
    subject: Subject,
    child: &mut Child,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ready = true;
        for stream in [INSIGHTS, FACES, ERRORS] {
            let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(format!("{prefix}{stream}"))
                .query_async(redis)
                .await;
            ready &= groups.is_ok_and(|g| !g.is_empty());
        }
        if ready {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {} subject exited at start-up ({status})",
                subject.name()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the {} subject did not join its streams within 60 s",
                subject.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Adds the generated entries, all at once (pipelined) or at `rate` per second.
async fn add_entries(
    redis: &mut MultiplexedConnection,
    prefix: &str,
    data: &Generated,
    rate: Option<u64>,
    subject: Subject,
) -> Result<()> {
    let total = data.len();
    let started = Instant::now();
    let mut sent = 0;
    let verb = if rate.is_some() {
        "offering"
    } else {
        "loading"
    };
    let mut progress = Progress::new(
        &format!("{:<13} {verb:<9}", subject.name()),
        total as u64,
        "entries",
    );
    let chunk = match rate {
        Some(rate) => (rate / 100).max(1) as usize,
        None => 500,
    };
    while sent < total {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let end = (sent + chunk).min(total);
        let mut pipe = redis::pipe();
        for i in sent..end {
            let (stream, fields) = data.entry(i);
            let cmd = pipe.cmd("XADD").arg(format!("{prefix}{stream}")).arg("*");
            for (k, v) in &fields {
                cmd.arg(k).arg(v);
            }
            cmd.ignore();
        }
        let _: () = pipe
            .query_async(redis)
            .await
            .context("XADD of the bench entries failed")?;
        sent = end;
        progress.update(sent as u64, total as u64, "");
    }
    progress.finish(sent as u64, total as u64, "");
    Ok(())
}

/// How many entries the subject has finished: read by its group and acknowledged (which it does
/// only after commit). Asked of Redis, which answers in O(1): counting the ledger every few
/// milliseconds would load the very database being measured.
async fn acknowledged(
    redis: &mut MultiplexedConnection,
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
async fn drain(
    options: &BenchOptions,
    redis: &mut MultiplexedConnection,
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
    loop {
        let done = acknowledged(redis, prefix, subject).await?;
        samples.push((Instant::now(), done));
        if done >= total {
            progress.finish(done as u64, total as u64, "");
            return Ok(Drained::from_samples(started, &samples, total));
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

/// The child's peak resident memory (VmHWM), in MB.
fn peak_rss_mb(child: &Child) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The CPU time the child has used so far (user + system), in seconds.
fn cpu_seconds(child: &Child) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks; 100 per second on Linux.
    Some((utime + stime) / 100.0)
}

/// Seconds spent in plugin calls, from the host's `/metrics`.
async fn scrape_plugin_seconds(port: u16) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    let sum = body
        .lines()
        .filter(|l| l.starts_with("kaleidoscope_handler_duration_seconds_sum"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(sum)
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// p50, p95 and p99 of XADD → ledger row, in milliseconds.
async fn latency_percentiles(pool: &PgPool) -> Result<[f64; 3]> {
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

/// The entries of a run, made on demand from their position (so 200,000 entries with embeddings
/// never sit in memory at once), and what they must leave in the database.
struct Generated {
    count: usize,
    mix: Mix,
    /// Media ids range over `1..=media_range`.
    media_range: i64,
    /// A few embeddings (JSON text), shared by all entries: their values do not matter, their
    /// size does.
    embeddings: Vec<String>,
    /// Distinct media named by a result (rows expected in `media_ai_insights`).
    media: i64,
    faces: i64,
    errors: i64,
}

/// A small deterministic generator (xorshift), so every subject gets the same entries.
struct Random(u64);

impl Random {
    /// The generator of entry `i`: the same for every subject.
    fn for_entry(i: usize) -> Random {
        let mut random =
            Random(0x9e37_79b9_7f4a_7c15 ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
        random.next();
        random
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: [&str; 12] = [
    "beach", "sunset", "dog", "people", "city", "food", "mountain", "car", "tree", "night",
    "party", "snow",
];

/// What entry `i` is, decided by cheap draws only.
enum Kind {
    SeedInsights,
    Service(&'static str),
    Faces(u64),
    Error,
}

impl Generated {
    fn new(count: usize, mix: Mix, dims: usize) -> Generated {
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        let embeddings = (0..16)
            .map(|_| {
                let values: Vec<String> = (0..dims)
                    .map(|_| format!("{:.4}", random.unit() * 2.0 - 1.0))
                    .collect();
                format!("[{}]", values.join(", "))
            })
            .collect();
        let mut generated = Generated {
            count,
            mix,
            // About three messages per media, as the real services send several per image.
            media_range: (count as i64 / 3).max(1),
            embeddings,
            media: 0,
            faces: 0,
            errors: 0,
        };
        let mut named = std::collections::HashSet::new();
        for i in 0..count {
            let (media_id, kind, _) = generated.draw(i);
            match kind {
                Kind::Error => generated.errors += 1,
                Kind::Faces(n) => {
                    generated.faces += n as i64;
                    named.insert(media_id);
                }
                _ => {
                    named.insert(media_id);
                }
            }
        }
        generated.media = named.len() as i64;
        generated
    }

    fn len(&self) -> usize {
        self.count
    }

    /// The media and kind of entry `i`, and its generator positioned after those draws.
    fn draw(&self, i: usize) -> (i64, Kind, Random) {
        let mut random = Random::for_entry(i);
        let media_id = 1 + random.below(self.media_range as u64) as i64;
        let slot = if self.mix == Mix::SeedInsights {
            0
        } else {
            i % 20
        };
        let kind = match slot {
            0..=6 => Kind::SeedInsights,
            7..=15 => Kind::Service(SERVICES[random.below(5) as usize]),
            16..=18 => Kind::Faces(random.below(4)),
            _ => Kind::Error,
        };
        (media_id, kind, random)
    }

    /// Entry `i`: its stream and fields. Long on purpose: one arm per message kind of the mix,
    /// each spelling out the wire shape it generates.
    fn entry(&self, i: usize) -> (&'static str, Vec<(String, String)>) {
        let (media_id, kind, mut random) = self.draw(i);
        let post_id = 1 + (media_id - 1) / 3;
        let mut fields = vec![
            ("mediaId".to_string(), media_id.to_string()),
            ("postId".to_string(), post_id.to_string()),
        ];
        let correlation = ("correlationId".to_string(), format!("c-{media_id}"));
        let words = |random: &mut Random, n: u64| {
            let picked: Vec<String> = (0..1 + random.below(n))
                .map(|_| format!("\"{}\"", WORDS[random.below(WORDS.len() as u64) as usize]))
                .collect();
            format!("[{}]", picked.join(", "))
        };
        let embedding = |random: &mut Random| {
            self.embeddings[random.below(self.embeddings.len() as u64) as usize].clone()
        };
        let stream = match kind {
            Kind::SeedInsights => {
                fields.extend([
                    ("detectedObjects".into(), words(&mut random, 4)),
                    ("scenes".into(), words(&mut random, 2)),
                    ("colors".into(), words(&mut random, 3)),
                    ("qualityScore".into(), format!("{:.3}", random.unit())),
                    ("hasAdultContent".into(), "false".into()),
                    (
                        "hasViolentContent".into(),
                        (random.below(10) == 0).to_string(),
                    ),
                    correlation,
                ]);
                INSIGHTS
            }
            Kind::Service(service) => {
                fields.push(("service".into(), service.into()));
                fields.push(("timestamp".into(), "2026-04-15T08:04:56.123456Z".into()));
                match service {
                    "moderation" => {
                        fields.push(("isSafe".into(), (random.below(20) != 0).to_string()));
                        fields.push((
                            "moderationConfidence".into(),
                            format!("{:.3}", random.unit()),
                        ));
                    }
                    "tagging" => fields.push(("tags".into(), words(&mut random, 5))),
                    "scene_recognition" => fields.push(("scenes".into(), words(&mut random, 2))),
                    "image_captioning" => fields.push((
                        "caption".into(),
                        format!("A {} at the {}", WORDS[i % 12], WORDS[(i / 12) % 12]),
                    )),
                    _ => fields.push(("imageEmbedding".into(), embedding(&mut random))),
                }
                fields.push(correlation);
                fields.push(("version".into(), "1".into()));
                INSIGHTS
            }
            Kind::Faces(n) => {
                let listed: Vec<String> = (0..n)
                    .map(|k| {
                        let x = random.below(800);
                        let y = random.below(600);
                        format!(
                            "{{\"faceId\": \"f-{i}-{k}\", \"bbox\": [{x}, {y}, {}, {}], \"embedding\": {}, \"confidence\": {:.4}}}",
                            x + 40 + random.below(100),
                            y + 40 + random.below(100),
                            embedding(&mut random),
                            0.5 + random.unit() / 2.0
                        )
                    })
                    .collect();
                fields.extend([
                    ("facesDetected".into(), n.to_string()),
                    ("faces".into(), format!("[{}]", listed.join(", "))),
                    correlation,
                    ("timestamp".into(), "2026-04-15T08:04:56Z".into()),
                    ("version".into(), "1".into()),
                ]);
                FACES
            }
            Kind::Error => {
                fields = vec![
                    correlation,
                    ("error".into(), "model server unavailable".into()),
                    ("status".into(), "FAILED".into()),
                ];
                ERRORS
            }
        };
        (stream, fields)
    }

    /// The rows the backend would have: a user, posts, media, and the requests being answered.
    async fn seed(&self, pool: &PgPool) -> Result<()> {
        let media = self.media_range;
        sqlx::query("INSERT INTO users (user_id, username) VALUES (1, 'bench')")
            .execute(pool)
            .await
            .context("cannot seed the bench user")?;
        sqlx::query(
            "INSERT INTO posts (post_id, author_id) SELECT g, 1 FROM generate_series(1, ($1 + 2) / 3) g",
        )
        .bind(media)
        .execute(pool)
        .await
        .context("cannot seed the bench posts")?;
        sqlx::query(
            "INSERT INTO post_media (media_id, post_id, media_url)
             SELECT g, 1 + (g - 1) / 3, 'https://cdn.example/' || g || '.jpg' FROM generate_series(1, $1) g",
        )
        .bind(media)
        .execute(pool)
        .await
        .context("cannot seed the bench media")?;
        sqlx::query(
            "INSERT INTO ml_requests (correlation_id, stream, post_id, media_id, fields, expected_results, attempts, last_published_at)
             SELECT 'c-' || g, 'post-image-processing', 1 + (g - 1) / 3, g, '{}',
                    ARRAY['moderation', 'tagging', 'scene_recognition', 'image_captioning', 'image_embedding', 'face_detection'],
                    1, now()
               FROM generate_series(1, $1) g",
        )
        .bind(media)
        .execute(pool)
        .await
        .context("cannot seed the bench requests")?;
        Ok(())
    }

    /// Checks the ledger, the stored rows and the pending lists against the entries.
    async fn verify(
        &self,
        pool: &PgPool,
        redis: &mut MultiplexedConnection,
        prefix: &str,
        subject: Subject,
    ) -> Result<String, String> {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(pool)
                .await
                .map_err(|e| format!("{sql}: {e}"))
        };
        let ledger = count("SELECT count(*) FROM processed_entries").await?;
        let media = count("SELECT count(*) FROM media_ai_insights").await?;
        let faces = count("SELECT count(*) FROM media_detected_faces").await?;
        let errors = count("SELECT count(*) FROM ml_processing_errors").await?;
        let expect = |what: &str, got: i64, want: i64| {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what}: {got} rows, expected {want}"))
            }
        };
        expect("ledger", ledger, self.count as i64)?;
        expect("media_ai_insights", media, self.media)?;
        expect("media_detected_faces", faces, self.faces)?;
        expect("ml_processing_errors", errors, self.errors)?;
        let group = subject.group();
        for stream in [INSIGHTS, FACES, ERRORS] {
            let reply: redis::Value = redis::cmd("XPENDING")
                .arg(format!("{prefix}{stream}"))
                .arg(group)
                .query_async(redis)
                .await
                .unwrap_or(redis::Value::Nil);
            if let redis::Value::Array(parts) = reply
                && let Some(redis::Value::Int(n)) = parts.first()
                && *n > 0
            {
                return Err(format!("{n} entries still pending on {stream}"));
            }
        }
        Ok(format!("{media} media, {faces} faces, {errors} errors"))
    }
}
