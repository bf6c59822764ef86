//! The bench's child processes: the host or the reference consumer, started on a free port,
//! measured (peak memory, CPU time, time in plugin calls) and stopped.

use super::*;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The reference consumer (`bench/baseline/consumer.py`), embedded so the bench runs from any
/// directory.
pub(super) const BASELINE_SCRIPT: &str = include_str!("../../../bench/baseline/consumer.py");
/// Where the baseline's Python environment is created on first use.
pub(super) const BASELINE_VENV: &str = "target/bench-venv";

pub(super) fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?;
    Ok(listener.local_addr()?.port())
}

/// `command` (a subject, or a tool the bench runs beside it) pointed at the bench's database,
/// Redis (server or cluster) and stream prefix.
pub(super) fn with_deployment<'c>(
    command: &'c mut Command,
    options: &BenchOptions,
    prefix: &str,
) -> &'c mut Command {
    command
        .env("DATABASE_URL", &options.database_url)
        .env("REDIS_URL", &options.redis_url)
        .env("REDIS_CLUSTER_NODES", options.redis_cluster_nodes.join(","))
        .env("KALEIDOSCOPE_STREAM_PREFIX", prefix)
}

/// Starts the subject as a child process, its stderr to `log`.
pub(super) fn spawn(
    options: &BenchOptions,
    subject: Subject,
    prefix: &str,
    consumer: &str,
    metrics_port: u16,
    log: &Path,
) -> Result<Child> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut command = match subject {
        Subject::Host(_) => {
            let mut command = Command::new(&options.host_binary);
            command
                .arg("run")
                .env(
                    "KALEIDOSCOPE_HTTP_ADDR",
                    format!("127.0.0.1:{metrics_port}"),
                )
                .env("KALEIDOSCOPE_CONSUMER_NAME", consumer)
                .env("KALEIDOSCOPE_WATCH_PLUGINS", "false")
                .env("KALEIDOSCOPE_LOG_FORMAT", "text");
            command
        }
        Subject::Reference(Reference::Native) => {
            let binary = native_reference(&options.host_binary)?;
            Command::new(binary)
        }
        Subject::Reference(Reference::Python) => {
            let python = baseline_python()?;
            let script = std::env::temp_dir().join("kaleidoscope-bench-baseline.py");
            std::fs::write(&script, BASELINE_SCRIPT)
                .with_context(|| format!("cannot write {}", script.display()))?;
            let mut command = Command::new(python);
            command.arg(script);
            command
        }
    };
    with_deployment(&mut command, options, prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    command
        .spawn()
        .with_context(|| format!("cannot start the {} subject", subject.name()))
}

/// The native reference consumer: the binary built beside the host (`bench/native/main.rs`).
fn native_reference(host_binary: &Path) -> Result<PathBuf> {
    let binary = host_binary.with_file_name("kaleidoscope-native-reference");
    if !binary.is_file() {
        anyhow::bail!(
            "--reference native: {} is missing; it is built with the host (cargo build --release)",
            binary.display()
        );
    }
    Ok(binary)
}

/// The Python reference's interpreter, from a virtual environment created (with `redis`,
/// its C parser `hiredis`, and `psycopg`) on first use.
pub(super) fn baseline_python() -> Result<PathBuf> {
    let venv = PathBuf::from(BASELINE_VENV);
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import redis, hiredis, psycopg"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ready {
        return Ok(python);
    }
    eprintln!("setting up the baseline's Python environment in {BASELINE_VENV} (once)");
    crate::python_env::create(&venv, &["redis>=5", "hiredis>=2", "psycopg[binary]>=3.1"]).context(
        "the Python reference needs Python 3.9 or newer with redis, hiredis and psycopg",
    )?;
    Ok(python)
}

/// CPU time (user + system, including children that have exited) of every PostgreSQL and
/// Redis server process on this machine, in seconds: read before and after a subject drains,
/// the difference is the servers' share of its work (and of the bench's own few queries).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ServerCpu {
    pub postgres: f64,
    pub redis: f64,
}

impl ServerCpu {
    pub(super) fn read() -> ServerCpu {
        let mut cpu = ServerCpu::default();
        let Ok(processes) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        for process in processes.flatten() {
            let Ok(stat) = std::fs::read_to_string(process.path().join("stat")) else {
                continue;
            };
            let Some((name, seconds)) = stat_cpu(&stat, true) else {
                continue;
            };
            match name {
                "postgres" => cpu.postgres += seconds,
                "redis-server" => cpu.redis += seconds,
                _ => {}
            }
        }
        cpu
    }

    pub(super) fn since(&self, before: &ServerCpu) -> ServerCpu {
        ServerCpu {
            postgres: (self.postgres - before.postgres).max(0.0),
            redis: (self.redis - before.redis).max(0.0),
        }
    }
}

/// The child's peak resident memory (VmHWM), in MB.
pub(super) fn peak_rss_mb(child: &Child) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The CPU time the child has used so far (user + system), in seconds.
pub(super) fn cpu_seconds(child: &Child) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).ok()?;
    stat_cpu(&stat, false).map(|(_, seconds)| seconds)
}

/// A process's command name and CPU time in seconds from its `/proc/<pid>/stat` text: user +
/// system (utime, stime), and with `children` also that of its children it has waited for
/// (cutime, cstime).
fn stat_cpu(stat: &str, children: bool) -> Option<(&str, f64)> {
    // The command name is in parentheses and may hold spaces; fields are counted after it.
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.rsplit_once('(').map_or("", |(_, name)| name);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14–17, the 12th–15th after the name.
    let wanted = if children { 4 } else { 2 };
    let mut ticks = 0.0;
    for field in fields.get(11..11 + wanted)? {
        ticks += field.parse::<f64>().ok()?;
    }
    // Clock ticks; 100 per second on Linux.
    Some((name, ticks / 100.0))
}

/// Seconds spent in plugin calls, from the host's `/metrics`.
pub(super) async fn scrape_plugin_seconds(port: u16) -> Option<f64> {
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

pub(super) fn stop(child: &mut Child) {
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
