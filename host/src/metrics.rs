//! Prometheus metrics through the official client, `prometheus-client`.
//!
//! Three kinds of series, one registry:
//! - counters and histograms the delivery protocol updates as it works ([`Metrics`]' public
//!   families; typed label sets, so a misspelt label is a compile error, not a new series);
//! - gauges describing the outside world (pending entries, lag, dead letters, requests by status)
//!   that [`crate::http`] measures at scrape time into [`Scraped`], so they are never stale;
//! - the standard `process_*` metrics, read from `/proc/self` by a [`Collector`] on each scrape.
//!
//! The exposition is the Prometheus text format (0.0.4), which every scraper reads.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Histogram bucket upper bounds, in seconds (0.25 ms to 60 s: past the default plugin
/// deadline of 30 s, so a call cut off at its deadline lands in a bucket of its own).
const BUCKETS: [f64; 17] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// A series per stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByStream {
    pub stream: String,
}

impl ByStream {
    pub fn new(stream: &str) -> Self {
        Self {
            stream: stream.to_string(),
        }
    }
}

/// A series per stream and the plugin that serves it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByPlugin {
    pub stream: String,
    pub plugin: String,
}

/// A dead-lettered entry's series: its stream, plugin and failure kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByKind {
    pub stream: String,
    pub plugin: String,
    pub kind: &'static str,
}

/// A retried entry's series: `reason` is [`retry_reason`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByReason {
    pub stream: String,
    pub plugin: String,
    pub reason: &'static str,
}

/// A plugin's call-time series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByPluginName {
    pub plugin: String,
}

/// A canary's finished entries: the plugin, the version that handled them (`live` or
/// `candidate`) and how they ended (`processed` or `dead-lettered`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByRolloutOutcome {
    pub plugin: String,
    pub version: String,
    pub outcome: String,
}

/// A shadow's comparisons: the plugin, and how the candidate's outcome compared
/// ([`crate::rollout::compare::Verdict`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByVerdict {
    pub plugin: String,
    pub verdict: String,
}

/// An automatic rollback: the plugin, and the threshold broken
/// ([`crate::rollout::guard::Breach::kind`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByRollback {
    pub plugin: String,
    pub reason: String,
}

/// A rollout followed now: the plugin and its mode.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByRolloutMode {
    pub plugin: String,
    pub mode: String,
}

/// A reprocessing run's entries by outcome (see [`crate::reprocess`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByRunOutcome {
    pub run: String,
    pub stream: String,
    pub plugin: String,
    pub version: String,
    pub outcome: String,
}

/// Reprocessing runs by state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByRunState {
    pub state: String,
}

/// A latent failure's series (see [`crate::state::Latent`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByCause {
    pub cause: String,
}

/// A plugin file's load-failure series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByFile {
    pub file: String,
}

/// A request stream's series per consumer group (the ML services').
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByGroup {
    pub stream: String,
    pub group: String,
}

/// A stream's series per Redis Cluster node that holds it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByStreamNode {
    pub stream: String,
    pub node: String,
}

/// A series per Redis Cluster node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByNode {
    pub node: String,
    pub role: String,
}

/// A series per dead-letter failure kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByDeadLetterKind {
    pub kind: &'static str,
}

/// A series per request status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByStatus {
    pub status: String,
}

/// A gauge holding seconds (or any fraction).
pub type FloatGauge = Gauge<f64, AtomicU64>;
/// Latency histograms with [`BUCKETS`].
pub type Timings<L> = Family<L, Histogram, fn() -> Histogram>;

fn timings<L: Clone + std::hash::Hash + Eq>() -> Timings<L> {
    Family::new_with_constructor(|| Histogram::new(BUCKETS))
}

/// The host's metrics: the families the delivery protocol updates, and the registry that
/// renders them with the scrape-time gauges.
pub struct Metrics {
    registry: Registry,
    /// Entries whose commands were committed.
    pub processed: Family<ByPlugin, Counter>,
    /// Entries delivered again after they were finished.
    pub redelivered: Family<ByStream, Counter>,
    /// Entries left pending for another delivery.
    pub retried: Family<ByReason, Counter>,
    /// Entries sent to the dead-letter stream.
    pub dead_lettered: Family<ByKind, Counter>,
    /// `init` sentinels acknowledged and skipped.
    pub sentinels: Family<ByStream, Counter>,
    /// Failed attempts to commit and acknowledge a batch.
    pub batch_failures: Family<ByStream, Counter>,
    /// Batches run again entry by entry after a set-based statement failed.
    pub batches_entry_by_entry: Family<ByStream, Counter>,
    /// Consumer groups found missing and created again.
    pub groups_recreated: Family<ByStream, Counter>,
    /// Failed loads of plugin files.
    pub load_failures: Family<ByFile, Counter>,
    /// Time of one batch through the delivery protocol.
    pub batch_duration: Timings<ByStream>,
    /// Time of one plugin call.
    pub handler_duration: Timings<ByPluginName>,
    /// Plugin calls running now, per plugin (see [`CallInFlight`]).
    pub calls_in_flight: Family<ByPluginName, Gauge>,
    /// Entries a canary finished, by version and outcome.
    pub rollout_entries: Family<ByRolloutOutcome, Counter>,
    /// Entries a shadow compared, by verdict.
    pub rollout_comparisons: Family<ByVerdict, Counter>,
    /// Rollouts this host rolled back, by the threshold broken.
    pub rollout_rollbacks: Family<ByRollback, Counter>,
    /// The gauges measured at scrape time.
    pub scraped: Scraped,
    /// One scrape at a time: a scrape clears and refills [`Scraped`] before rendering.
    scrape: tokio::sync::Mutex<()>,
}

/// Gauges [`crate::http`] measures at each scrape (under [`Metrics::scrape_lock`]).
#[derive(Default)]
pub struct Scraped {
    pub ready: Gauge,
    pub heartbeat_age: FloatGauge,
    pub plugins_loaded: Gauge,
    pub plugin_load_failures: Gauge,
    pub stream_pending: Family<ByStream, Gauge>,
    pub stream_oldest_pending_age: Family<ByStream, FloatGauge>,
    pub stream_lag: Family<ByStream, Gauge>,
    pub stream_length: Family<ByStream, Gauge>,
    pub stream_unserved: Family<ByStream, Gauge>,
    pub restart_would_fail: Family<ByCause, Gauge>,
    pub rollout_percent: Family<ByRolloutMode, FloatGauge>,
    pub reprocess_entries: Family<ByRunOutcome, Gauge>,
    pub reprocess_runs: Family<ByRunState, Gauge>,
    pub dead_letters: Family<ByDeadLetterKind, Gauge>,
    pub requests: Family<ByStatus, Gauge>,
    pub request_stream_length: Family<ByStream, Gauge>,
    pub request_stream_lag: Family<ByGroup, Gauge>,
    pub request_stream_pending: Family<ByGroup, Gauge>,
    pub stream_node: Family<ByStreamNode, Gauge>,
    pub redis_node_up: Family<ByNode, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Metrics {
            registry: Registry::default(),
            processed: Family::default(),
            redelivered: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            sentinels: Family::default(),
            batch_failures: Family::default(),
            batches_entry_by_entry: Family::default(),
            groups_recreated: Family::default(),
            load_failures: Family::default(),
            batch_duration: timings(),
            handler_duration: timings(),
            calls_in_flight: Family::default(),
            rollout_entries: Family::default(),
            rollout_comparisons: Family::default(),
            rollout_rollbacks: Family::default(),
            scraped: Scraped::default(),
            scrape: tokio::sync::Mutex::new(()),
        };
        metrics.register();
        metrics
    }
}

impl Metrics {
    /// Puts every family into the registry, with its help text (the client adds the final
    /// period, and `_total` to counters).
    fn register(&mut self) {
        self.register_counters();
        self.register_scraped();
        self.registry.register(
            "kaleidoscope_build",
            "The host's version and the plugin contracts it serves (always 1)",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("contract", crate::plugin::CONTRACT_VERSION),
                ("contracts_loaded", crate::plugin::CONTRACTS_LOADED),
            ]),
        );
        self.registry.register_collector(Box::new(ProcessCollector));
    }

    /// The families the delivery protocol updates as it works.
    fn register_counters(&mut self) {
        let r = &mut self.registry;
        r.register(
            "kaleidoscope_entries_processed",
            "Entries whose commands were committed",
            self.processed.clone(),
        );
        r.register(
            "kaleidoscope_entries_redelivered",
            "Entries delivered again after they were finished (acknowledged without running again)",
            self.redelivered.clone(),
        );
        r.register(
            "kaleidoscope_entries_retried",
            "Entries left pending for another delivery, by reason (`retryable`: the plugin asked to retry, a row it needs is missing, or a statement hit a passing condition such as a lock timeout; otherwise the plugin failure that will be reported if retries run out)",
            self.retried.clone(),
        );
        r.register(
            "kaleidoscope_entries_dead_lettered",
            "Entries sent to the dead-letter stream, by failure kind",
            self.dead_lettered.clone(),
        );
        r.register(
            "kaleidoscope_sentinels",
            "`init` sentinel entries acknowledged and skipped",
            self.sentinels.clone(),
        );
        r.register(
            "kaleidoscope_batch_failures",
            "Failed attempts to commit and acknowledge a batch (outages and other errors); the batch is retried",
            self.batch_failures.clone(),
        );
        r.register(
            "kaleidoscope_batches_entry_by_entry",
            "Batches whose set-based transaction failed inside the database and ran again entry by entry, a savepoint each (slower; one entry's commands fail, or a statement timed out)",
            self.batches_entry_by_entry.clone(),
        );
        r.register(
            "kaleidoscope_consumer_groups_recreated",
            "Consumer groups found missing (Redis lost its data, or the group was deleted) and created again",
            self.groups_recreated.clone(),
        );
        r.register(
            "kaleidoscope_plugin_load_failures",
            "Failed loads of plugin files, by file",
            self.load_failures.clone(),
        );
        r.register_with_unit(
            "kaleidoscope_batch_duration",
            "Time to run one batch through the delivery protocol (handlers, commit, publish, acknowledge)",
            Unit::Seconds,
            self.batch_duration.clone(),
        );
        r.register_with_unit(
            "kaleidoscope_handler_duration",
            "Time of one plugin `handle` call, including instantiation",
            Unit::Seconds,
            self.handler_duration.clone(),
        );
        r.register(
            "kaleidoscope_handler_calls_in_flight",
            "Plugin calls running now (a call stuck until its deadline shows here)",
            self.calls_in_flight.clone(),
        );
        r.register(
            "kaleidoscope_rollout_entries",
            "Entries a canary rollout finished, by the version that handled them (live, candidate) and outcome (processed, dead-lettered)",
            self.rollout_entries.clone(),
        );
        r.register(
            "kaleidoscope_rollout_comparisons",
            "Entries a shadow rollout's candidate ran on beside the live version, by how its outcome compared (same, different, candidate-failed, candidate-succeeded, candidate-rejected)",
            self.rollout_comparisons.clone(),
        );
        r.register(
            "kaleidoscope_rollout_rollbacks",
            "Rollouts this host rolled back automatically, by the threshold the candidate broke (failure-rate, rejected, latency, differences)",
            self.rollout_rollbacks.clone(),
        );
    }

    /// The gauges measured at each scrape.
    fn register_scraped(&mut self) {
        let r = &mut self.registry;
        let s = &self.scraped;
        r.register(
            "kaleidoscope_ready",
            "1 when PostgreSQL and Redis are reachable and every consumed stream has its plugin",
            s.ready.clone(),
        );
        r.register_with_unit(
            "kaleidoscope_heartbeat_age",
            "Time since this host last wrote its heartbeat to Redis (since start, before the first): what `kaleidoscope status` judges a host by",
            Unit::Seconds,
            s.heartbeat_age.clone(),
        );
        r.register(
            "kaleidoscope_plugins_loaded",
            "Plugins currently loaded",
            s.plugins_loaded.clone(),
        );
        // Not `kaleidoscope_plugin_load_failures`: that is the counter above.
        r.register(
            "kaleidoscope_plugin_files_failing",
            "Plugin files that currently fail to load",
            s.plugin_load_failures.clone(),
        );
        r.register(
            "kaleidoscope_stream_pending",
            "Entries delivered to the group and not yet acknowledged",
            s.stream_pending.clone(),
        );
        r.register_with_unit(
            "kaleidoscope_stream_oldest_pending_age",
            "Age of the oldest entry delivered and not acknowledged (0 when none): the stuck-consumer signal",
            Unit::Seconds,
            s.stream_oldest_pending_age.clone(),
        );
        r.register(
            "kaleidoscope_stream_lag",
            "Entries not yet delivered to the group",
            s.stream_lag.clone(),
        );
        r.register(
            "kaleidoscope_stream_length",
            "Entries in the stream",
            s.stream_length.clone(),
        );
        r.register(
            "kaleidoscope_stream_unserved",
            "1 for a stream this host consumed that has no loaded plugin now (its entries wait unread), else 0",
            s.stream_unserved.clone(),
        );
        r.register(
            "kaleidoscope_restart_would_fail",
            "1 while something this host runs without would stop its next start (cause: a configuration file that does not parse, an operator migration that fails), else 0",
            s.restart_would_fail.clone(),
        );
        r.register(
            "kaleidoscope_rollout_percent",
            "The share of entries (percent, by key) a rollout's candidate takes on this host now, by plugin and mode (shadow, canary; `none` and 0 when no rollout of the plugin runs here)",
            s.rollout_percent.clone(),
        );
        r.register(
            "kaleidoscope_reprocess_entries",
            "Entries of each reprocessing run not ended or ended in the last day, by outcome: selected, processed, dead-lettered, skipped (applied by the run before), missing (trimmed from the stream), emits-suppressed (fleet-wide, from PostgreSQL: every host reports the same; use max)",
            s.reprocess_entries.clone(),
        );
        r.register(
            "kaleidoscope_reprocess_runs",
            "Reprocessing runs not ended or ended in the last day, by state (running, stalled: running but silent for a minute, its process gone; interrupted, failed, finished, cancelled)",
            s.reprocess_runs.clone(),
        );
        r.register(
            "kaleidoscope_dead_letters",
            "Entries in the dead-letter stream, by failure kind (of the newest 10,000)",
            s.dead_letters.clone(),
        );
        r.register(
            "kaleidoscope_requests",
            "Tracked ML requests by status (the last counts read while PostgreSQL is unavailable)",
            s.requests.clone(),
        );
        r.register(
            "kaleidoscope_request_stream_length",
            "Entries in a request stream (this host to the ML services)",
            s.request_stream_length.clone(),
        );
        r.register(
            "kaleidoscope_request_stream_lag",
            "Requests not yet delivered to an ML service's consumer group: is the ML side keeping up",
            s.request_stream_lag.clone(),
        );
        r.register(
            "kaleidoscope_request_stream_pending",
            "Requests an ML service's consumer group has read and not acknowledged",
            s.request_stream_pending.clone(),
        );
        r.register(
            "kaleidoscope_stream_node",
            "1 for the Redis Cluster node (primary) that holds a consumed stream: where its lag and pending entries live (absent on one Redis server)",
            s.stream_node.clone(),
        );
        r.register(
            "kaleidoscope_redis_node_up",
            "1 while a Redis Cluster node is up, 0 while the cluster marks it failed or its link is down (absent on one Redis server)",
            s.redis_node_up.clone(),
        );
    }

    /// Held by a scrape while it refills [`Metrics::scraped`] and renders, so two scrapes at
    /// once cannot interleave a clear with the other's values.
    pub async fn scrape_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.scrape.lock().await
    }

    /// Every series in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoding error would be a bug in a metric.
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!("cannot render the metrics: {error}");
        }
        out
    }
}

/// One plugin call counted in [`Metrics::calls_in_flight`] for as long as this value lives
/// (however the call ends).
pub struct CallInFlight(Gauge);

impl CallInFlight {
    pub fn start(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.0.dec();
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

/// The series a stream served by `plugin` has from the start (at 0) — processed, redelivered,
/// retried, dead-lettered by every kind, batch failures, recreated groups, and both latency
/// histograms — so dashboards and alerts (`rate`, `increase`) see them before the first entry.
/// Creates the rollout series of `plugin` at 0, so the first rollback of a rollout shows as an
/// increase (`increase()` cannot see the first sample of a new series) and the dashboard's rollout
/// row has its series before the first rollout.
fn touch_rollouts(metrics: &Metrics, plugin: &str) {
    for reason in crate::rollout::guard::Breach::KINDS {
        let _ = metrics.rollout_rollbacks.get_or_create(&ByRollback {
            plugin: plugin.to_string(),
            reason: reason.to_string(),
        });
    }
    for version in ["live", "candidate"] {
        for outcome in ["processed", "dead-lettered"] {
            let _ = metrics.rollout_entries.get_or_create(&ByRolloutOutcome {
                plugin: plugin.to_string(),
                version: version.to_string(),
                outcome: outcome.to_string(),
            });
        }
    }
    for verdict in crate::rollout::compare::Verdict::ALL {
        let _ = metrics.rollout_comparisons.get_or_create(&ByVerdict {
            plugin: plugin.to_string(),
            verdict: verdict.as_str().to_string(),
        });
    }
}

pub fn touch_stream(metrics: &Metrics, stream: &str, plugin: &str) {
    let by_stream = ByStream::new(stream);
    let _ = metrics.processed.get_or_create(&ByPlugin {
        stream: stream.to_string(),
        plugin: plugin.to_string(),
    });
    let _ = metrics.retried.get_or_create(&ByReason {
        stream: stream.to_string(),
        plugin: plugin.to_string(),
        reason: retry_reason(crate::dead_letter::FailureKind::RetriesExhausted),
    });
    for kind in crate::dead_letter::FailureKind::ALL {
        let _ = metrics.dead_lettered.get_or_create(&ByKind {
            stream: stream.to_string(),
            plugin: plugin.to_string(),
            kind: kind.as_str(),
        });
    }
    for family in [
        &metrics.redelivered,
        &metrics.sentinels,
        &metrics.batch_failures,
        &metrics.batches_entry_by_entry,
        &metrics.groups_recreated,
    ] {
        let _ = family.get_or_create(&by_stream);
    }
    let _ = metrics.batch_duration.get_or_create(&by_stream);
    let by_plugin = ByPluginName {
        plugin: plugin.to_string(),
    };
    let _ = metrics.handler_duration.get_or_create(&by_plugin);
    touch_rollouts(metrics, plugin);
    let _ = metrics.calls_in_flight.get_or_create(&by_plugin);
}

/// The standard `process_*` metrics (Linux: read from `/proc/self` at each scrape; none
/// elsewhere).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, unit, value: f64| {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
            gauge.encode(metric)
        };
        if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        {
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(&Unit::Bytes),
                rss_pages * page_size(),
            )?;
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
                let counter = ConstCounter::new((user + system) / ticks);
                let metric = encoder.encode_descriptor(
                    "process_cpu",
                    "Total user and system CPU time spent in seconds.",
                    Some(&Unit::Seconds),
                    counter.metric_type(),
                )?;
                counter.encode(metric)?;
            }
            if let (Some(start), Some(boot)) = (field(19), boot_time()) {
                gauge(
                    &mut encoder,
                    "process_start_time",
                    "Start time of the process since the Unix epoch in seconds.",
                    Some(&Unit::Seconds),
                    boot + start / ticks,
                )?;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                fds.count() as f64,
            )?;
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_gauges_and_process_metrics() {
        let metrics = Metrics::default();
        touch_stream(&metrics, "quiet", "p");
        metrics
            .processed
            .get_or_create(&ByPlugin {
                stream: "s".into(),
                plugin: "p".into(),
            })
            .inc_by(3);
        metrics
            .batch_duration
            .get_or_create(&ByStream::new("s"))
            .observe(0.003);
        metrics.scraped.ready.set(1);
        let text = metrics.render();
        for expected in [
            "# TYPE kaleidoscope_entries_processed_total counter\n",
            "kaleidoscope_entries_processed_total{stream=\"s\",plugin=\"p\"} 3\n",
            "kaleidoscope_batch_duration_seconds_bucket{stream=\"s\",le=\"0.0025\"} 0\n",
            "kaleidoscope_batch_duration_seconds_bucket{stream=\"s\",le=\"0.005\"} 1\n",
            "kaleidoscope_batch_duration_seconds_bucket{stream=\"s\",le=\"60\"} 1\n",
            "kaleidoscope_batch_duration_seconds_count{stream=\"s\"} 1\n",
            "# TYPE kaleidoscope_ready gauge\nkaleidoscope_ready 1\n",
            "kaleidoscope_build_info{version=\"",
            "# TYPE process_cpu_seconds_total counter\n",
            "process_resident_memory_bytes ",
            // A served stream's series exist before anything happens on it.
            "kaleidoscope_entries_redelivered_total{stream=\"quiet\"} 0\n",
            "kaleidoscope_batch_duration_seconds_count{stream=\"quiet\"} 0\n",
            "kaleidoscope_entries_dead_lettered_total{stream=\"quiet\",plugin=\"p\",kind=\"timeout\"} 0\n",
        ] {
            assert!(text.contains(expected), "lacks {expected:?}:\n{text}");
        }
    }
}
