//! Prometheus metrics, kept in-process and rendered in the text exposition format.
//!
//! Counters and histograms are updated by the delivery protocol as it works; gauges that describe
//! the outside world (pending entries, lag, requests by status) are read at scrape time by the
//! HTTP endpoint, so they are never stale. A small hand-written registry keeps the dependency
//! tree lean; the format is simple and stable.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket upper bounds, in seconds (0.25 ms to 60 s: past the default plugin
/// deadline of 30 s, so a call cut off at its deadline lands in a bucket of its own).
const BUCKETS: [f64; 17] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// Label pairs, in a fixed order.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Every metric family's help text, so the rendering can describe what it exposes.
const HELP: &[(&str, &str, &str)] = &[
    (
        "kaleidoscope_entries_processed_total",
        "counter",
        "Entries whose commands were committed.",
    ),
    (
        "kaleidoscope_entries_redelivered_total",
        "counter",
        "Entries delivered again after they were finished (acknowledged without running again).",
    ),
    (
        "kaleidoscope_entries_retried_total",
        "counter",
        "Entries left pending for another delivery, by reason (`retryable`: the plugin asked to retry, a row it needs is missing, or a statement hit a passing condition such as a lock timeout; otherwise the plugin failure that will be reported if retries run out).",
    ),
    (
        "kaleidoscope_entries_dead_lettered_total",
        "counter",
        "Entries sent to the dead-letter stream, by failure kind.",
    ),
    (
        "kaleidoscope_sentinels_total",
        "counter",
        "`init` sentinel entries acknowledged and skipped.",
    ),
    (
        "kaleidoscope_batch_failures_total",
        "counter",
        "Failed attempts to commit and acknowledge a batch (outages and other errors); the batch is retried.",
    ),
    (
        "kaleidoscope_consumer_groups_recreated_total",
        "counter",
        "Consumer groups found missing (Redis lost its data, or the group was deleted) and created again.",
    ),
    (
        "kaleidoscope_plugin_load_failures_total",
        "counter",
        "Failed loads of plugin files, by file.",
    ),
    (
        "kaleidoscope_batch_duration_seconds",
        "histogram",
        "Time to run one batch through the delivery protocol (handlers, commit, publish, acknowledge).",
    ),
    (
        "kaleidoscope_handler_duration_seconds",
        "histogram",
        "Time of one plugin `handle` call, including instantiation.",
    ),
];

/// A gauge measured at scrape time by the caller of [`Metrics::render`].
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Vec<(Labels, f64)>,
}

impl Gauge {
    /// A gauge with one unlabelled sample.
    pub fn single(name: &'static str, help: &'static str, value: f64) -> Self {
        Self {
            name,
            help,
            samples: vec![(Vec::new(), value)],
        }
    }
}

/// The host's metrics registry.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    histograms: Mutex<BTreeMap<(&'static str, Labels), Histogram>>,
}

impl Metrics {
    /// Adds `by` to a counter.
    pub fn add(&self, name: &'static str, labels: Labels, by: u64) {
        if by == 0 {
            return;
        }
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *counters.entry((name, labels)).or_insert(0) += by;
    }

    /// Makes a counter's series exist (at 0) before its first increment, so dashboards and alerts
    /// (`rate`, `increase`) see it from the start.
    pub fn touch(&self, name: &'static str, labels: Labels) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.entry((name, labels)).or_insert(0);
    }

    /// Records one observation of a histogram.
    pub fn observe(&self, name: &'static str, labels: Labels, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut histograms = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let histogram = histograms.entry((name, labels)).or_default();
        for (slot, bound) in histogram.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *slot += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    /// The current value of a counter (for tests and the demo's summary).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters
            .iter()
            .filter(|((n, l), _)| {
                *n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Counters and histograms in the Prometheus text format, followed by `gauges`
    /// (name, help, samples) measured by the caller.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let histograms = self
            .histograms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if *kind == "counter" {
                for ((_, labels), value) in counters.iter().filter(|((n, _), _)| n == name) {
                    let _ = writeln!(out, "{name}{} {value}", format_labels(labels, None));
                }
            } else {
                for ((_, labels), h) in histograms.iter().filter(|((n, _), _)| n == name) {
                    for (bound, count) in BUCKETS.iter().zip(h.buckets) {
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {count}",
                            format_labels(labels, Some(&bound.to_string()))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        format_labels(labels, Some("+Inf")),
                        h.count
                    );
                    let _ = writeln!(out, "{name}_sum{} {}", format_labels(labels, None), h.sum);
                    let _ = writeln!(
                        out,
                        "{name}_count{} {}",
                        format_labels(labels, None),
                        h.count
                    );
                }
            }
        }
        for Gauge {
            name,
            help,
            samples,
        } in gauges
        {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{} {value}", format_labels(labels, None));
            }
        }
        out
    }
}

fn format_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// The `reason` label of a retry: one the plugin asked for, a missing row, or a passing database
/// condition is an ordinary wait (`retryable`), not yet a failure — only if the attempts run out
/// does it become `retries-exhausted`; anything else is the plugin failure kind it will be.
pub fn retry_reason(kind: crate::dead_letter::FailureKind) -> &'static str {
    match kind {
        crate::dead_letter::FailureKind::RetriesExhausted => "retryable",
        other => other.as_str(),
    }
}

/// The series a stream served by `plugin` has from the start (at 0): processed, and dead-lettered
/// by every kind.
pub fn touch_stream(metrics: &Metrics, stream: &str, plugin: &str) {
    metrics.touch(
        "kaleidoscope_entries_processed_total",
        labels(&[("stream", stream), ("plugin", plugin)]),
    );
    for kind in crate::dead_letter::FailureKind::ALL {
        metrics.touch(
            "kaleidoscope_entries_dead_lettered_total",
            labels(&[
                ("stream", stream),
                ("plugin", plugin),
                ("kind", kind.as_str()),
            ]),
        );
    }
}

/// The standard `process_*` metrics (Linux: read from `/proc/self`); none elsewhere.
pub fn process_gauges() -> Vec<Gauge> {
    let mut gauges = Vec::new();
    let page = page_size();
    if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
    {
        gauges.push(Gauge::single(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            rss_pages * page,
        ));
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // After the command name (which may contain spaces) in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = clock_ticks();
        let field = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok());
        // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the name and state.
        if let (Some(user), Some(system)) = (field(11), field(12)) {
            gauges.push(Gauge::single(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                (user + system) / ticks,
            ));
        }
        if let (Some(start), Some(boot)) = (field(19), boot_time()) {
            gauges.push(Gauge::single(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds.",
                boot + start / ticks,
            ));
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauges.push(Gauge::single(
            "process_open_fds",
            "Number of open file descriptors.",
            fds.count() as f64,
        ));
    }
    gauges
}

fn page_size() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as f64 } else { 4096.0 }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The boot time (`btime` of `/proc/stat`), which process start times count from.
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|t| t.trim().parse().ok())
}

/// `[("stream", s)]`-style label lists without the noise.
pub fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let metrics = Metrics::default();
        metrics.add(
            "kaleidoscope_entries_processed_total",
            labels(&[("stream", "s"), ("plugin", "p")]),
            3,
        );
        metrics.observe(
            "kaleidoscope_batch_duration_seconds",
            labels(&[("stream", "s")]),
            Duration::from_millis(3),
        );
        let text = metrics.render(&[Gauge::single("kaleidoscope_ready", "Ready.", 1.0)]);
        assert!(
            text.contains("kaleidoscope_entries_processed_total{stream=\"s\",plugin=\"p\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "kaleidoscope_batch_duration_seconds_bucket{stream=\"s\",le=\"0.0025\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "kaleidoscope_batch_duration_seconds_bucket{stream=\"s\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("kaleidoscope_batch_duration_seconds_count{stream=\"s\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kaleidoscope_ready gauge\nkaleidoscope_ready 1"),
            "{text}"
        );
        assert_eq!(
            metrics.counter("kaleidoscope_entries_processed_total", &[("stream", "s")]),
            3
        );
    }
}
