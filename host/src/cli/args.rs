//! The command line's grammar: subcommands, their flags and help texts (clap derive). What each
//! subcommand does is in [`super::commands`].

use crate::config;
use crate::requests;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Kaleidoscope Host: persists the ML result streams of the Kaleidoscope backend from Redis
/// Streams into PostgreSQL through hot-swappable WebAssembly handler plugins.
#[derive(Parser)]
#[command(name = "kaleidoscope", version, after_long_help = config::SETTINGS_POINTER)]
pub struct Cli {
    /// TOML configuration file; environment variables override its values.
    #[arg(long, global = true, env = "KALEIDOSCOPE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format on stderr: `text` for people, `json` (one object per line, with the span
    /// fields stream, entry, plugin, version and correlation_id) for log pipelines.
    #[arg(long, global = true, env = "KALEIDOSCOPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written on stderr.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the host: join the consumer group on every stream a plugin declares and persist
    /// results until SIGTERM or Ctrl-C. Applies migrations first unless told not to.
    #[command(after_long_help = config::env_help())]
    Run {
        /// Directory of handler plugins (overrides KALEIDOSCOPE_PLUGINS_DIR).
        #[arg(long, value_name = "DIR")]
        plugins_dir: Option<PathBuf>,
        /// This instance's consumer name (overrides KALEIDOSCOPE_CONSUMER_NAME).
        #[arg(long, value_name = "NAME")]
        consumer_name: Option<String>,
        /// Do not apply database migrations at start-up (overrides KALEIDOSCOPE_MIGRATE).
        #[arg(long)]
        no_migrate: bool,
        /// Keep trying PostgreSQL and Redis this long at start-up, e.g. `60s` (overrides
        /// KALEIDOSCOPE_WAIT_FOR_DEPS_MS).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        wait_for_deps: Option<std::time::Duration>,
    },
    /// Apply the database migrations and exit.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Migrate,
    /// Show streams (length, lag, pending, oldest pending, consumers), dead letters by kind,
    /// running hosts with their plugins and grants, and failed plugin loads. Exits 1 when unhealthy.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A stream whose oldest pending entry is older than this many seconds is unhealthy.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        max_pending_age: u64,
        /// A stream with more entries than this waiting undelivered (its lag) is unhealthy.
        #[arg(long, value_name = "ENTRIES")]
        max_lag: Option<u64>,
    },
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Follow and steer rollouts of candidate versions started with `plugin deploy --shadow` or
    /// `--canary`.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Run entries already in a stream again through a build of their plugin: backfill what a
    /// new version writes (`--from 0`), or repair what a bad version wrote (`--handled-by
    /// NAME@BAD --with GOOD`). Each entry is applied once per run (resumable with --resume after
    /// a crash or Ctrl-C); emits are left out unless --emit; --dry-run writes nothing and shows
    /// per table and column what would change.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Reprocess(ReprocessArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Publish a processing request to the ML services (the seed's producer side) and record it
    /// for tracking. Exits non-zero, naming the stream, when a critical stream cannot be reached.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Publish(PublishArgs),
    /// Show the whole system at work: recreate a demo database, create sample users, posts and
    /// media, publish their requests, run the ML simulator and the host in-process until every
    /// request is answered, and print what was stored. The demo database is dropped and
    /// recreated; its name must contain "demo".
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Demo {
        /// Sample users to create (each gets a profile picture to process).
        #[arg(long, default_value_t = 5)]
        users: i64,
        /// Sample posts to create, spread over the users.
        #[arg(long, default_value_t = 20)]
        posts: i64,
        /// Images per post (each one a post-image request).
        #[arg(long, default_value_t = 3)]
        media_per_post: i64,
        /// Fraction of requests the simulator answers with an error.
        #[arg(long, default_value_t = 0.05, value_parser = fraction)]
        error_rate: f64,
        /// The demo database (default: DATABASE_URL with the database `kaleidoscope_demo`).
        #[arg(long)]
        database_url: Option<String>,
        /// Prefix of the demo's streams (their keys are deleted first).
        #[arg(long, default_value = "kaleidoscope-demo:")]
        stream_prefix: String,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure the host: load entries into fresh streams and a fresh database, drain them with
    /// the host's defaults (as a child process), verify the rows, and print entries/s, latency,
    /// peak memory, CPU per entry (its own, PostgreSQL's, Redis's) and the share of time in
    /// plugins. With --reference, hand-written consumers do the same work in the same run, and
    /// the host's ratio to each is printed: `native` (bench/native/main.rs, built with the host)
    /// is the limit, `python` (bench/baseline/consumer.py, in a Python virtual environment it
    /// creates) what a team writes instead. The bench database is dropped and recreated; its
    /// name must contain "bench".
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Bench {
        /// How many entries to load.
        #[arg(long, default_value_t = 200_000)]
        entries: usize,
        /// Offer this many entries per second while the host runs (and report XADD → commit
        /// latency), instead of pre-loading them.
        #[arg(long, value_name = "ENTRIES_PER_SECOND")]
        rate: Option<u64>,
        /// Also run this hand-written consumer on the same entries and print the host's ratio to
        /// it (repeat for both: `--reference native --reference python`).
        #[arg(long, value_enum, value_name = "CONSUMER")]
        reference: Vec<crate::bench::Reference>,
        /// The same as `--reference python`.
        #[arg(long)]
        baseline: bool,
        /// Let the subjects take turns this many times and report each one's median round
        /// (a single run on a shared machine moves by ±10%).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=50))]
        rounds: u16,
        /// Which messages to generate.
        #[arg(long, value_enum, default_value_t = crate::bench::Mix::Mixed)]
        mix: crate::bench::Mix,
        /// Length of the generated embeddings (the real services send 1408).
        #[arg(long, default_value_t = 1408)]
        embedding_dims: usize,
        /// The bench database (default: DATABASE_URL with the database `kaleidoscope_bench`).
        #[arg(long)]
        database_url: Option<String>,
        /// Give up on a subject that has not finished after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// A candidate build of one of the plugins (say `insights-next.wasm`): measure the host
        /// also with it rolled out as a shadow on every entry and as a canary on half of them.
        #[arg(long, value_name = "FILE")]
        candidate: Option<PathBuf>,
        /// With --rate: load the entries and drain them first, then offer them again at the rate
        /// while `kaleidoscope reprocess --from 0` runs at full speed on the insights stream;
        /// report the live latency beside the run and after it, and the run's entries/s.
        #[arg(long, requires = "rate")]
        reprocess: bool,
        /// With --reprocess: the run's own --rate (default: full speed).
        #[arg(long, value_name = "ENTRIES_PER_SECOND", requires = "reprocess")]
        reprocess_rate: Option<u64>,
        /// Run this many host processes side by side (one consumer group, consumer names
        /// `bench`, `bench-2`, …): the drain rate of a fleet on this machine. Their CPU time is
        /// summed, their peak memory is the largest one's.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        hosts: u16,
        /// With --candidate: the share of the entries the shadow runs on.
        #[arg(long, value_name = "PERCENT", default_value_t = 100.0, value_parser = percent)]
        shadow_percent: f64,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compile a component read from stdin for the host's engine and write the artefact: the
    /// host runs this as its child for every compile, so the compiler's memory is not the host's.
    #[command(name = "compile-plugin", hide = true)]
    CompilePlugin {
        /// The engine's memory slot size (the artefact must match the host's engine).
        #[arg(long)]
        slot_size: usize,
        /// The compiled-plugin cache directory (its function cache is used and filled).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Where to write the compiled artefact.
        #[arg(long)]
        output: PathBuf,
    },
    /// Run a reference ML service: consume the request streams and publish results in the real
    /// producers' shapes, until SIGTERM or Ctrl-C.
    #[command(name = "simulate-ml", after_long_help = config::SETTINGS_POINTER)]
    SimulateMl {
        /// Fraction of requests (0.0 to 1.0) answered with an error instead of results.
        #[arg(long, default_value_t = 0.0, value_parser = fraction)]
        error_rate: f64,
        /// Length of the embeddings it sends (the real services send 1408).
        #[arg(long, default_value_t = 1408)]
        embedding_dims: usize,
    },
}

/// `kaleidoscope publish …`: one request kind each, and how sure the publication must be.
#[derive(clap::Args)]
pub struct PublishArgs {
    #[command(subcommand)]
    pub command: PublishCommand,
    /// Count the request as published only once this many replicas of its stream's primary
    /// hold it (Redis `WAIT` after the `XADD`, on the same connection): an entry the primary
    /// acknowledged but had not replicated is lost if it fails over. Fewer within
    /// --wait-timeout-ms is an error (the request stays tracked, and the request tracker
    /// publishes it again if its results never come). Default: no waiting.
    #[arg(long, global = true, value_name = "REPLICAS")]
    pub wait_replicas: Option<u32>,
    /// How long --wait-replicas waits for the replicas.
    #[arg(long, global = true, default_value_t = 1000, value_name = "MS")]
    pub wait_timeout_ms: u64,
}

/// The request kinds `kaleidoscope publish` sends.
#[derive(Subcommand)]
pub enum PublishCommand {
    /// A new post image (`post-image-processing`).
    #[command(after_long_help = config::SETTINGS_POINTER)]
    PostImage(ImageArgs),
    /// A new profile picture (`profile-picture-processing`).
    #[command(after_long_help = config::SETTINGS_POINTER)]
    ProfilePicture {
        /// The user whose profile picture it is (`userId` on the wire).
        #[arg(long)]
        user_id: i64,
        /// Where the ML service fetches the picture (`imageUrl` on the wire).
        #[arg(long)]
        image_url: String,
        /// Correlation id (generated when absent).
        #[arg(long)]
        correlation_id: Option<String>,
    },
    /// An updated post image (`post-update-processing`).
    #[command(after_long_help = config::SETTINGS_POINTER)]
    PostUpdate(ImageArgs),
}

impl ImageArgs {
    /// The request (a post update or a new post image) and its correlation id.
    pub fn into_request(self, update: bool) -> (requests::Request, Option<String>) {
        let (post_id, media_id, media_url, uploader_id) = (
            self.post_id,
            self.media_id,
            self.media_url,
            self.uploader_id,
        );
        let request = if update {
            requests::Request::PostUpdate {
                post_id,
                media_id,
                media_url,
                uploader_id,
            }
        } else {
            requests::Request::PostImage {
                post_id,
                media_id,
                media_url,
                uploader_id,
            }
        };
        (request, self.correlation_id)
    }
}

/// The flags of a post-image request (new or updated).
#[derive(clap::Args)]
pub struct ImageArgs {
    /// The post the image belongs to (`postId` on the wire).
    #[arg(long)]
    pub post_id: i64,
    /// The image's media id (`mediaId` on the wire): results are stored under it.
    #[arg(long)]
    pub media_id: i64,
    /// Where the ML service fetches the image (`mediaUrl` on the wire).
    #[arg(long)]
    pub media_url: String,
    /// The user who uploaded it (`uploaderId` on the wire), if known.
    #[arg(long)]
    pub uploader_id: Option<i64>,
    /// Correlation id (generated when absent).
    #[arg(long)]
    pub correlation_id: Option<String>,
}

/// `kaleidoscope config …`.
#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Check the configuration (file, environment, defaults) the way the host would, and print
    /// every setting with its value and where it came from. Exits 1, naming the setting, when
    /// the host would refuse it.
    Check {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `kaleidoscope dlq …`.
#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    List {
        /// Only dead letters from this source stream.
        #[arg(long)]
        stream: Option<String>,
        /// Only this failure kind (malformed, retries-exhausted, plugin-trap, timeout,
        /// memory-limit, forbidden-command, database).
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full: every field, the whole error, the original entry's fields.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Show {
        /// The dead letter's id (as shown by `dlq list`).
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-publish dead letters onto their source stream (new entry ids), then delete them from
    /// the dead-letter stream. Select them by id, or with --stream/--kind, or all with --all.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Replay {
        /// Dead-letter ids (as shown by `dlq list`).
        ids: Vec<String>,
        /// All dead letters from this source stream.
        #[arg(long)]
        stream: Option<String>,
        /// Only this failure kind.
        #[arg(long)]
        kind: Option<String>,
        /// Every dead letter (required when no id, --stream or --kind is given).
        #[arg(long)]
        all: bool,
        /// Also replay dead letters whose original bytes were lost (values that were not UTF-8,
        /// stored with U+FFFD in their place); refused without it.
        #[arg(long)]
        force: bool,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

/// How `plugin deploy` starts a rollout instead of replacing the live version.
#[derive(clap::Args, Debug, Clone)]
pub struct RolloutArgs {
    /// Run the file as a shadow of the live version: on PERCENT of the entries (by key; 100 when
    /// no value is given) it runs beside it, and its commands are compared, never executed.
    /// See `kaleidoscope rollout diff`.
    #[arg(long, value_name = "PERCENT", num_args = 0..=1, default_missing_value = "100",
        value_parser = percent, conflicts_with = "canary")]
    pub shadow: Option<f64>,
    /// Run the file as a canary: it handles PERCENT of the entries (by key), for real.
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    pub canary: Option<f64>,
    /// The entry field that routes an entry to the candidate (a key keeps its version); entries
    /// without it go by entry id.
    #[arg(long, value_name = "FIELD", default_value = "mediaId")]
    pub key: String,
    /// Roll back when the candidate fails (or is dead-lettered) more often than the live version
    /// by more than this many percentage points...
    #[arg(long, value_name = "POINTS", default_value_t = 5.0)]
    pub max_failure_points: f64,
    /// ...over a window of its last this many entries (each host judges its own).
    #[arg(long, value_name = "ENTRIES", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub window: u32,
    /// Roll back when the candidate's handler time p99 is over this many times the live one's
    /// (and more than 5 ms over it).
    #[arg(long, value_name = "FACTOR", default_value_t = 3.0)]
    pub max_latency_factor: f64,
    /// Shadow: roll back when more than this percentage of the entries compared differ (no limit
    /// unless given).
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    pub max_differences: Option<f64>,
}

/// `kaleidoscope rollout …`.
#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Show the latest rollout of every plugin (or of NAME): mode, share, thresholds, entries per
    /// version and outcome (per host too), differences, state and reason, and how each host
    /// follows it.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Status {
        /// The plugin.
        name: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change the running rollout of NAME: its share, or its mode with it (a shadow can become
    /// a canary); waits until every host follows.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Set {
        /// The plugin.
        name: String,
        /// Make it a canary on PERCENT of the entries.
        #[arg(long, value_name = "PERCENT", value_parser = percent, conflicts_with = "shadow", required_unless_present = "shadow")]
        canary: Option<f64>,
        /// Make it a shadow on PERCENT of the entries.
        #[arg(long, value_name = "PERCENT", value_parser = percent)]
        shadow: Option<f64>,
        /// Give up waiting for the hosts after this many seconds (exit 1).
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Make the candidate of NAME's running rollout the live version of every host (through the
    /// plugin store, in the transaction that ends the rollout); waits until every host loaded it.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Promote {
        /// The plugin.
        name: String,
        /// Give up waiting for the hosts after this many seconds (exit 1).
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        timeout: u64,
    },
    /// End NAME's running rollout: the live version handles every entry again. What a canary
    /// wrote stays written.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Abort {
        /// The plugin.
        name: String,
    },
    /// Show the entries on which NAME's shadow differed from the live version (a sample of the
    /// first 100): per table and column, the live value → the candidate's.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Diff {
        /// The plugin.
        name: String,
        /// At most this many entries.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON (both command lists and the column changes) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A percentage from 0 to 100.
fn percent(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=100.0).contains(&value) => Ok(value),
        _ => Err(format!("expected a percentage from 0 to 100, got {text:?}")),
    }
}

/// `kaleidoscope plugin …`.
#[derive(Subcommand)]
pub enum PluginCommand {
    /// Write a complete, buildable plugin project for a new stream (handler, native unit tests,
    /// recorded entries for `plugin test`, the table's migration, the grant, a README), with the
    /// contract and the SDK inside it, so it builds outside this repository.
    New {
        /// The plugin's name (crate, manifest and grants), e.g. `caption-quality`.
        name: String,
        /// The stream it handles.
        #[arg(long)]
        stream: String,
        /// The language of the handler.
        #[arg(long, value_enum, default_value = "rust")]
        lang: crate::authoring::Language,
        /// The table the example handler writes (default: the name, `-` as `_`).
        #[arg(long)]
        table: Option<String>,
        /// Where to write the project (default: `./<name>`).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build the plugin project in DIR into a component (Rust: cargo for `wasm32-wasip2`;
    /// Python: componentize-py, found through `KALEIDOSCOPE_COMPONENTIZE_PY`, the project's
    /// `.venv`, or `PATH`) and print its path.
    Build {
        /// The project (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Build the project in DIR and deploy it into the running hosts, then again on every save,
    /// showing what each host made of it and how the plugin's new entries come out.
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Dev {
        /// The project (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Give up waiting for the hosts after this many seconds per deploy.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        timeout: u64,
        /// Run each build as a shadow of the live version on the hosts' real entries instead of
        /// deploying it: nothing of it is written, and what it would write differently is shown
        /// per table and column. Ctrl-C ends the shadow.
        #[arg(long)]
        shadow: bool,
    },
    /// Deploy a plugin to every host of the fleet (the hosts of this stream prefix and consumer
    /// group) through the plugin store in PostgreSQL, as the plugin its manifest names, and wait
    /// until every live host reports it loaded. The file is loaded here first: one no host could
    /// load changes nothing. A deploy some host refuses is undone (the previous build stays);
    /// exit 1 then, and when no live host answered. With `--shadow` or `--canary`, the file
    /// becomes the candidate of a rollout beside the live version instead (see `kaleidoscope
    /// rollout`); exit 1 when a host cannot follow it (the rollout is aborted).
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Deploy {
        /// The `.wasm` component.
        file: PathBuf,
        /// Give up waiting for the hosts after this many seconds (exit 1).
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        timeout: u64,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Run the project in DIR with nothing else running: a host of its own in this process (its
    /// database `kaleidoscope_dev_<project>` and stream prefix `dev:<project>:` made for it, its
    /// migrations and `kaleidoscope.toml` grants applied) and `plugin dev` on it; prints the
    /// `XADD` to try once the plugin serves. Needs only Redis and PostgreSQL where the
    /// environment (or the defaults) say.
    Up {
        /// The project (default: the current directory).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Give up waiting for the host after this many seconds per deploy.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Take a deployed plugin out of the fleet's plugin store: every host removes the file the
    /// store wrote and stops consuming its streams (their entries wait in Redis).
    #[command(after_long_help = config::SETTINGS_POINTER)]
    Remove {
        /// The plugin's name (as `status` shows it).
        name: String,
    },
    /// Run a plugin on recorded entries (`*.jsonl`, one `{"fields": {…}}` per line) and compare
    /// each outcome (what `plugin exec` prints) with `<name>.expected.jsonl`. Exits 1 when one
    /// differs or has no expected outcome; `--update` writes the expected files. Given a project
    /// folder, builds it and runs its `tests/` (with its `kaleidoscope.toml` as the configuration
    /// unless one is given).
    Test {
        /// A plugin project folder, or a `.wasm` component.
        file: PathBuf,
        /// The directory of recorded entries (with a component; a project's is `tests/`).
        dir: Option<PathBuf>,
        /// Write the expected files from what the plugin does now.
        #[arg(long)]
        update: bool,
        /// Also check the commands against this database's schema and the grants.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
    },
    /// Load a plugin file exactly as the host would and print its manifest, streams, imports,
    /// size, compile time, limits and grants. Exits 1 if the host would refuse it.
    Check {
        /// The `.wasm` component.
        file: PathBuf,
    },
    /// Run a plugin's `handle` on one entry and print the commands it returns (or its failure) as
    /// JSON, without touching Redis or writing anything. Exits 2 when the handler fails or the
    /// host would refuse its commands.
    Exec {
        /// The `.wasm` component.
        file: PathBuf,
        /// An entry field, `name=value`; repeat for each field.
        #[arg(long = "field", short = 'f', value_name = "NAME=VALUE")]
        fields: Vec<String>,
        /// The stream the entry comes from (default: the plugin's first stream).
        #[arg(long)]
        stream: Option<String>,
        /// The entry id.
        #[arg(long, default_value = "0-1")]
        id: String,
        /// The delivery count the handler sees.
        #[arg(long, default_value_t = 1)]
        deliveries: u32,
        /// Also check the commands against this database's schema and the configured grants,
        /// exactly as the host would (nothing is written). Without it only the grants are
        /// checked.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
    },
}

/// A fraction from 0 to 1 (an error rate).
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("expected a number from 0 to 1, got {text:?}")),
    }
}

/// `kaleidoscope reprocess`: a selection (a range, `--handled-by` or `--ids`) to start a run, or
/// `--resume`, `--cancel` or `--list`.
#[derive(clap::Args, Debug)]
pub struct ReprocessArgs {
    /// The stream (its logical name, e.g. ml-insights-results); default: the one stream the
    /// plugin declares.
    #[arg(long)]
    pub stream: Option<String>,
    /// Select from this entry on: an entry id, milliseconds, or an RFC 3339 time; `0` for the
    /// stream's start.
    #[arg(long, value_name = "ID|TIME")]
    pub from: Option<String>,
    /// Select up to this entry (inclusive; a time takes in its whole millisecond); default: the
    /// stream's end when the run starts.
    #[arg(long, value_name = "ID|TIME")]
    pub to: Option<String>,
    /// Select the entries a version (or build) of a plugin handled, as the ledger recorded.
    #[arg(long, value_name = "NAME@VERSION")]
    pub handled_by: Option<String>,
    /// Select these entries (comma-separated, or the flag repeated).
    #[arg(long, value_name = "ID,...")]
    pub ids: Vec<String>,
    /// The build to run them through: a version or build (from the plugin store, a rollout's
    /// candidate or the plugins directory) or a .wasm file; default: the live build.
    #[arg(long, value_name = "VERSION|BUILD|FILE")]
    pub with: Option<String>,
    /// Publish the handler's emits (left out by default: history's requests went out already).
    #[arg(long)]
    pub emit: bool,
    /// Write nothing: run the entries in transactions that are rolled back and report per table
    /// and column what the run would change.
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many entries per second (default: as fast as it goes).
    #[arg(long, value_name = "ENTRIES_PER_SECOND")]
    pub rate: Option<f64>,
    /// Entries per batch (each batch is one transaction).
    #[arg(long, default_value_t = crate::reprocess::DEFAULT_BATCH)]
    pub batch: usize,
    /// Go on with a run that was interrupted, crashed or failed, from where it stopped, with its
    /// own build and selection.
    #[arg(long, value_name = "RUN")]
    pub resume: Option<i64>,
    /// Cancel a run (a process applying it stops after its batch; what it applied stays).
    #[arg(long, value_name = "RUN")]
    pub cancel: Option<i64>,
    /// List the runs not ended and those ended in the last day.
    #[arg(long)]
    pub list: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}
