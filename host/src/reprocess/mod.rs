//! Reprocessing: entries already in a stream run again through a chosen build of their plugin
//! (`kaleidoscope reprocess`). One engine for two needs: **backfill** (a new version writes
//! something the old one did not: run history through it) and **repair** (a bad version wrote
//! wrong values: run the entries it handled through a good one).
//!
//! A run goes through the normal delivery protocol ([`crate::delivery`]: validation, grants,
//! set-based commit, dead letters), with the differences `delivery/reprocessing.rs` lists: its
//! own ledger identities (`<id>/reprocess:<run>`, so each entry applies once per run however
//! often the run is resumed, and a new run applies again), no acknowledgement, emits left out
//! unless asked for, dead letters tagged with the run. The run is recorded in PostgreSQL
//! ([`crate::persist::reprocess_runs`]) with the build's bytes, its selection and its position,
//! so `--resume RUN` goes on after a crash or Ctrl-C with the same build; one process applies a
//! run at a time (an advisory lock). A dry run writes nothing: each batch's transaction is
//! rolled back after reading what it changed.
//!
//! The run is a process of its own, beside the hosts: it reads history with `XRANGE`, not
//! through the consumer group, so the live consumers' reading is untouched; it lowers its own
//! CPU priority and commits small batches, so they keep their latency (BENCHMARKS.md).

mod apply;
pub mod build;
pub mod report;
pub mod select;

use crate::config::Config;
use crate::delivery::Reprocessing;
use crate::persist::reprocess_runs::{self, NewRun, RunRow};
use crate::persist::{self, changes, ledger};
use crate::plugin::{Plugin, PluginRegistry, PluginSet};
use crate::shutdown::Shutdown;
use crate::state::HostState;
use crate::streams::EntryId;
use anyhow::{Context, Result, bail};
use apply::Applying;
use select::{Selection, Spec, Survey};
use std::sync::Arc;

/// Entries per batch by default: small, so a run's transactions hold the tables' locks briefly
/// and live batches do not queue behind them.
pub const DEFAULT_BATCH: usize = 100;

/// How many changed rows per column a dry run shows on a terminal (its JSON shows up to
/// [`EXAMPLES_IN_JSON`]).
pub const EXAMPLES: usize = 5;

/// How many changed rows per column a dry run's JSON holds.
pub const EXAMPLES_IN_JSON: usize = 10_000;

/// What to reprocess.
#[derive(Clone, Debug)]
pub struct Request {
    /// The stream (logical name); `None`: the one stream the chosen build declares.
    pub stream: Option<String>,
    pub spec: Spec,
    /// A version, build or `.wasm` file; `None`: the live build.
    pub with: Option<String>,
    pub emit: bool,
    pub dry_run: bool,
    /// Entries per second at most; `None`: as fast as it goes.
    pub rate: Option<f64>,
    pub batch: usize,
    /// How many changed rows per column a dry run reports.
    pub examples: usize,
}

/// How a run (or a dry run) ended, and what it did.
#[derive(Debug, serde::Serialize)]
pub struct Outcome {
    /// The run as recorded (`None` for a dry run).
    pub run: Option<RunRow>,
    pub stream: String,
    pub plugin: String,
    pub version: String,
    pub build: String,
    /// Where the build came from.
    pub from: String,
    pub selection: String,
    pub survey: Survey,
    pub ended: Ended,
    /// What the run (this process's part of it) did; for a real run, `run` has the exact
    /// totals.
    pub counts: Counts,
    /// A dry run's changes per table and column.
    pub changes: Option<changes::Summary>,
    /// A dry run's dead letters (entry id, kind and reason), the first few.
    pub dead_letters: Vec<(String, String)>,
}

/// How a run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ended {
    /// Every selected entry is finished.
    Finished,
    /// Ctrl-C or SIGTERM: resumable.
    Interrupted,
    /// `reprocess --cancel` from elsewhere.
    Cancelled,
    /// A batch could not be committed (the log says why): resumable.
    Failed,
}

/// What a run finished in this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub processed: u64,
    pub dead_lettered: u64,
    /// Found applied by this run before (a resume reading them again).
    pub skipped: u64,
    /// Selected, but no longer in the stream.
    pub missing: u64,
}

impl Outcome {
    /// The outcome of a run of `chosen` over `selection` of `stream`, before it is applied.
    fn new(stream: &str, chosen: &build::Chosen, selection: &str, survey: &Survey) -> Outcome {
        Outcome {
            run: None,
            stream: stream.to_string(),
            plugin: chosen.plugin.name.clone(),
            version: chosen.plugin.version.clone(),
            build: chosen.plugin.build().to_string(),
            from: chosen.from.clone(),
            selection: selection.to_string(),
            survey: survey.clone(),
            ended: Ended::Finished,
            counts: Counts::default(),
            changes: None,
            dead_letters: Vec::new(),
        }
    }
}

impl Counts {
    fn done(&self) -> u64 {
        self.processed + self.dead_lettered + self.skipped
    }
}

/// The engine of a run: the delivery protocol without consumers, on connections of its own.
async fn engine(config: &Arc<Config>) -> Result<Arc<HostState>> {
    let pool = persist::connect(&config.database_url, 4, &config.database_timeouts).await?;
    if config.migrate {
        persist::migrate(&pool).await?;
    }
    let catalog = persist::schema::Catalog::load(&pool).await?;
    let mut redis = crate::redis_connection::RedisClient::of(config)?
        .shared()
        .await?;
    let source = ledger::identity_of(&pool, &mut redis, config).await?;
    let replay_secret = ledger::replay_secret(&pool, &source).await?;
    Ok(Arc::new(HostState::new(
        config.clone(),
        source,
        replay_secret,
        pool,
        redis,
        Arc::new(PluginRegistry::new(PluginSet::default())),
        catalog,
    )))
}

/// Starts a run (or a dry run) and applies it until it ends or `stop`.
pub async fn start(config: Arc<Config>, request: Request, stop: Shutdown) -> Result<Outcome> {
    lower_priority();
    if request.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if request
        .rate
        .is_some_and(|rate| rate.is_nan() || rate <= 0.0)
    {
        bail!("--rate must be a positive number of entries per second");
    }
    let state = engine(&config).await?;
    let handled_by = match &request.spec {
        Spec::HandledBy { plugin, .. } => Some(plugin.as_str()),
        _ => None,
    };
    let wanted = build::Wanted {
        stream: request.stream.as_deref(),
        plugin: handled_by,
    };
    let chosen = build::choose(&config, &state.pool, &wanted, request.with.as_deref()).await?;
    let plugin = chosen.plugin.clone();
    let stream = match &request.stream {
        Some(stream) => stream.clone(),
        None => match plugin.streams.as_slice() {
            [only] => only.clone(),
            streams => bail!(
                "{} declares streams {streams:?}: say which with --stream",
                plugin.name
            ),
        },
    };
    let mut redis = state.redis.clone();
    let key = config.stream_key(&stream);
    let spec = request.spec.clone();
    let mut selection = Selection::resolve(&state.pool, &state.source, &stream, &spec).await?;
    let mut survey = select::survey(
        &mut redis,
        &state.pool,
        &state.source,
        &stream,
        &key,
        &mut selection,
    )
    .await?;
    // A range to "the end" ends where the stream ends now: what arrives later is the live
    // consumers' business.
    let spec = spec.ending_at(survey.stream_ends.as_deref());
    if let Selection::Range { to: to @ None, .. } = &mut selection {
        *to = Some(
            survey
                .stream_ends
                .as_deref()
                .and_then(EntryId::parse)
                .unwrap_or(EntryId { ms: 0, seq: 0 }),
        );
    }
    if matches!(request.spec, Spec::HandledBy { .. }) {
        survey.ledger_forgot_through = ledger::horizons(&state.pool, &state.source)
            .await?
            .get(&stream)
            .map(ToString::to_string);
    }
    let fleet = persist::plugin_store::fleet(&config);
    let described = request.spec.describe();
    let mut outcome = Outcome::new(&stream, &chosen, &described, &survey);
    if request.dry_run {
        let run = Arc::new(Reprocessing {
            run: 0,
            emit: request.emit,
            dry_run: Some(Default::default()),
        });
        let applied = Applying {
            state: &state,
            plugin,
            run: run.clone(),
            stream: &stream,
            key: &key,
            selection: &selection,
            rate: request.rate,
            batch: request.batch,
            record: None,
        };
        let label = format!("dry run of {stream}");
        let (ended, counts, dead_letters) = applied.apply(None, 0, &survey, &label, stop).await?;
        outcome.ended = ended;
        outcome.counts = counts;
        outcome.changes = Some(run.changes(request.examples));
        outcome.dead_letters = dead_letters;
        return Ok(outcome);
    }
    let started_by = crate::deploy::deployer();
    let row = reprocess_runs::start(
        &state.pool,
        &NewRun {
            fleet: &fleet,
            source: &state.source,
            stream: &stream,
            plugin: &plugin.name,
            plugin_version: &plugin.version,
            plugin_sha256: &plugin.sha256,
            plugin_bytes: &chosen.bytes,
            selection: &described,
            selection_spec: serde_json::to_value(&spec)?,
            emit: request.emit,
            rate: request.rate,
            started_by: &started_by,
        },
    )
    .await?;
    let Some(lock) = reprocess_runs::take(&state.pool, row.id).await? else {
        bail!("run {} was taken by another process at once", row.id);
    };
    reprocess_runs::selected(
        &state.pool,
        row.id,
        i64::try_from(survey.selected).unwrap_or(i64::MAX),
        i64::try_from(survey.missing).unwrap_or(i64::MAX),
    )
    .await?;
    go_on(
        &state,
        row,
        plugin,
        &selection,
        survey,
        request.batch,
        stop,
        lock,
        outcome,
    )
    .await
}

/// Takes run `id` up again where it stopped, with the build and selection it was started with.
pub async fn resume(config: Arc<Config>, id: i64, batch: usize, stop: Shutdown) -> Result<Outcome> {
    lower_priority();
    let state = engine(&config).await?;
    let fleet = persist::plugin_store::fleet(&config);
    let Some(mut row) = reprocess_runs::get(&state.pool, &fleet, id).await? else {
        bail!("there is no reprocessing run {id} in this fleet ({fleet})");
    };
    if !row.resumable() {
        bail!(
            "run {id} is {}: nothing to resume (start a new run to apply again)",
            row.state
        );
    }
    // A finished run is read again from its start: under its own identity, every entry it
    // applied is skipped.
    if row.state == "finished" {
        let retention = config.ledger_retention.as_secs_f64();
        if row.ended_seconds_ago.is_some_and(|ago| ago > retention) {
            bail!(
                "run {id} finished longer ago than the ledger retention ({}): its ledger rows may be pruned, so reading it again could apply entries twice; start a new run to apply again",
                humantime::format_duration(config.ledger_retention)
            );
        }
        row.position = None;
    }
    let Some(lock) = reprocess_runs::take(&state.pool, id).await? else {
        bail!("run {id} is being applied by another process; it goes on there");
    };
    let spec: Spec = serde_json::from_value(row.selection_spec.0.clone())
        .with_context(|| format!("run {id}'s selection cannot be read back"))?;
    let bytes = reprocess_runs::plugin_bytes(&state.pool, id).await?;
    let path = config
        .plugins_dir
        .join(format!("{}-run-{id}.wasm", row.plugin));
    let chosen = build::load(&config, bytes, path, format!("run {id}'s record")).await?;
    let mut selection = Selection::resolve(&state.pool, &state.source, &row.stream, &spec).await?;
    let mut redis = state.redis.clone();
    let key = config.stream_key(&row.stream);
    let now = select::survey(
        &mut redis,
        &state.pool,
        &state.source,
        &row.stream,
        &key,
        &mut selection,
    )
    .await?;
    reprocess_runs::set_state(
        &state.pool,
        id,
        &["running", "interrupted", "failed", "finished"],
        "running",
        None,
    )
    .await?;
    // What was selected at the start stays the run's total; what has been trimmed since
    // the start (or the last resume) is counted as missing too.
    let missing = u64::try_from(row.missing).unwrap_or(0);
    if now.missing > missing {
        let more = i64::try_from(now.missing - missing).unwrap_or(i64::MAX);
        reprocess_runs::advance_missing(&state.pool, id, more).await?;
    }
    let survey = Survey {
        selected: u64::try_from(row.selected).unwrap_or(0),
        missing: missing.max(now.missing),
        stream_starts: now.stream_starts,
        stream_ends: now.stream_ends,
        ledger_forgot_through: None,
    };
    let outcome = Outcome::new(&row.stream, &chosen, &row.selection, &survey);
    let plugin = chosen.plugin;
    go_on(
        &state, row, plugin, &selection, survey, batch, stop, lock, outcome,
    )
    .await
}

/// Marks run `id` cancelled: a process applying it stops after its batch. What it applied
/// stays applied.
pub async fn cancel(config: &Config, id: i64) -> Result<RunRow> {
    let pool = persist::connect(&config.database_url, 1, &config.database_timeouts).await?;
    let fleet = persist::plugin_store::fleet(config);
    let Some(row) = reprocess_runs::get(&pool, &fleet, id).await? else {
        bail!("there is no reprocessing run {id} in this fleet ({fleet})");
    };
    let cancelled = reprocess_runs::set_state(
        &pool,
        id,
        &["running", "interrupted", "failed"],
        "cancelled",
        Some("cancelled with `kaleidoscope reprocess --cancel`"),
    )
    .await?;
    if !cancelled {
        bail!("run {id} is {} already; nothing to cancel", row.state);
    }
    reprocess_runs::get(&pool, &fleet, id)
        .await?
        .context("the run vanished")
}

/// The runs of this fleet not ended, and those ended in the last day.
pub async fn list(config: &Config) -> Result<Vec<RunRow>> {
    let pool = persist::connect(&config.database_url, 1, &config.database_timeouts).await?;
    reprocess_runs::recent(&pool, &persist::plugin_store::fleet(config), 24.0).await
}

/// Applies a recorded run from its position, records how it ended, and reads it back.
#[allow(clippy::too_many_arguments)]
async fn go_on(
    state: &Arc<HostState>,
    row: RunRow,
    plugin: Arc<Plugin>,
    selection: &Selection,
    survey: Survey,
    batch: usize,
    stop: Shutdown,
    lock: sqlx::PgConnection,
    mut outcome: Outcome,
) -> Result<Outcome> {
    let run = Arc::new(Reprocessing {
        run: row.id,
        emit: row.emit,
        dry_run: None,
    });
    let key = state.config.stream_key(&row.stream);
    let applying = Applying {
        state,
        plugin,
        run,
        stream: &row.stream,
        key: &key,
        selection,
        rate: row.rate,
        batch,
        record: Some(row.id),
    };
    let position = row.position.as_deref().and_then(EntryId::parse);
    // Read from where it stopped, the run has its entries before there done; read again from
    // its start (a finished run), none.
    let already = match position {
        Some(_) => u64::try_from(row.done()).unwrap_or(0),
        None => 0,
    };
    let label = format!("run {}", row.id);
    let applied = applying
        .apply(position, already, &survey, &label, stop)
        .await
        .map(|(ended, counts, _)| (ended, counts));
    let (ended, counts) = match applied {
        Ok(done) => done,
        Err(error) => {
            let reason = crate::text::causes(&error);
            let _ = reprocess_runs::set_state(
                &state.pool,
                row.id,
                &["running"],
                "failed",
                Some(&reason),
            )
            .await;
            return Err(error.context(format!(
                "run {} failed; resume it with `kaleidoscope reprocess --resume {}`",
                row.id, row.id
            )));
        }
    };
    let (state_now, reason) = match ended {
        Ended::Finished => ("finished", None),
        Ended::Interrupted => (
            "interrupted",
            Some(format!(
                "interrupted; resume with `kaleidoscope reprocess --resume {}`",
                row.id
            )),
        ),
        Ended::Failed => (
            "failed",
            Some(format!(
                "a batch could not be committed (see the log); resume with `kaleidoscope reprocess --resume {}`",
                row.id
            )),
        ),
        Ended::Cancelled => ("cancelled", None),
    };
    if ended != Ended::Cancelled {
        reprocess_runs::set_state(
            &state.pool,
            row.id,
            &["running"],
            state_now,
            reason.as_deref(),
        )
        .await?;
    }
    drop(lock);
    let fleet = persist::plugin_store::fleet(&state.config);
    outcome.run = reprocess_runs::get(&state.pool, &fleet, row.id).await?;
    outcome.ended = ended;
    outcome.counts = counts;
    Ok(outcome)
}

/// Gives the run's threads a lower CPU priority (nice 10), so that on a machine it shares with
/// a host, the live consumers' handler calls go first. Linux keeps a nice value per thread, and
/// a new thread takes its creator's: every thread of the process now is lowered, so the threads
/// they start later (blocking threads for handler calls) are too.
fn lower_priority() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        tracing::debug!("cannot list the run's threads; it runs at the default priority");
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority only changes the scheduling priority of a thread of this process.
        let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 10) };
        if done != 0 {
            tracing::debug!(tid, "cannot lower a thread's CPU priority");
        }
    }
}
