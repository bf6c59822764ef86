//! The `kaleidoscope` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kaleidoscope::config::{self, Config};
use kaleidoscope::{demo, dlq, publish, simulate, status, toolkit};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Kaleidoscope Host: persists the ML result streams of the Kaleidoscope backend from Redis
/// Streams into PostgreSQL through hot-swappable WebAssembly handler plugins.
#[derive(Parser)]
#[command(name = "kaleidoscope", version, after_long_help = config::env_help())]
struct Cli {
    /// TOML configuration file; environment variables override its values.
    #[arg(long, global = true, env = "KALEIDOSCOPE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log format on stderr: `text` for people, `json` (one object per line, with the span
    /// fields stream, entry, plugin, version and correlation_id) for log pipelines.
    #[arg(long, global = true, env = "KALEIDOSCOPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
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
    },
    /// Apply the database migrations and exit.
    #[command(after_long_help = config::env_help())]
    Migrate,
    /// Show streams (length, lag, pending, oldest pending, consumers), dead letters by kind,
    /// running hosts with their plugins, and failed plugin loads. Exits 1 when unhealthy.
    #[command(after_long_help = config::env_help())]
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A stream whose oldest pending entry is older than this many seconds is unhealthy.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        max_pending_age: u64,
    },
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Publish a processing request to the ML services (the seed's producer side) and record it
    /// for tracking. Exits non-zero, naming the stream, when a critical stream cannot be reached.
    #[command(subcommand, after_long_help = config::env_help())]
    Publish(PublishCommand),
    /// Show the whole system at work: recreate a demo database, create sample users, posts and
    /// media, publish their requests, run the ML simulator and the host in-process until every
    /// request is answered, and print what was stored. The demo database is dropped and
    /// recreated; its name must contain "demo".
    #[command(after_long_help = config::env_help())]
    Demo {
        #[arg(long, default_value_t = 5)]
        users: i64,
        #[arg(long, default_value_t = 20)]
        posts: i64,
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
    /// peak memory and the share of time in plugins. With --baseline, a hand-written reference
    /// consumer (bench/baseline/consumer.py, in a Python virtual environment it creates) does the
    /// same work in the same run. The bench database is dropped and recreated; its name must
    /// contain "bench".
    #[command(after_long_help = config::env_help())]
    Bench {
        /// How many entries to load.
        #[arg(long, default_value_t = 200_000)]
        entries: usize,
        /// Offer this many entries per second while the host runs (and report XADD → commit
        /// latency), instead of pre-loading them.
        #[arg(long, value_name = "ENTRIES_PER_SECOND")]
        rate: Option<u64>,
        /// Also run the reference consumer on the same entries and print the ratio.
        #[arg(long)]
        baseline: bool,
        /// Which messages to generate.
        #[arg(long, value_enum, default_value_t = kaleidoscope::bench::Mix::Mixed)]
        mix: kaleidoscope::bench::Mix,
        /// Length of the generated embeddings (the real services send 1408).
        #[arg(long, default_value_t = 1408)]
        embedding_dims: usize,
        /// The bench database (default: DATABASE_URL with the database `kaleidoscope_bench`).
        #[arg(long)]
        database_url: Option<String>,
        /// Give up on a subject that has not finished after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a reference ML service: consume the request streams and publish results in the real
    /// producers' shapes, until SIGTERM or Ctrl-C.
    #[command(name = "simulate-ml", after_long_help = config::env_help())]
    SimulateMl {
        /// Fraction of requests (0.0 to 1.0) answered with an error instead of results.
        #[arg(long, default_value_t = 0.0, value_parser = fraction)]
        error_rate: f64,
        /// Length of the embeddings it sends (the real services send 1408).
        #[arg(long, default_value_t = 1408)]
        embedding_dims: usize,
    },
}

#[derive(Subcommand)]
enum PublishCommand {
    /// A new post image (`post-image-processing`).
    PostImage(ImageArgs),
    /// A new profile picture (`profile-picture-processing`).
    ProfilePicture {
        #[arg(long)]
        user_id: i64,
        #[arg(long)]
        image_url: String,
        /// Correlation id (generated when absent).
        #[arg(long)]
        correlation_id: Option<String>,
    },
    /// An updated post image (`post-update-processing`).
    PostUpdate(ImageArgs),
}

impl ImageArgs {
    /// The request (a post update or a new post image) and its correlation id.
    fn into_request(self, update: bool) -> (publish::Request, Option<String>) {
        let (post_id, media_id, media_url, uploader_id) = (
            self.post_id,
            self.media_id,
            self.media_url,
            self.uploader_id,
        );
        let request = if update {
            publish::Request::PostUpdate {
                post_id,
                media_id,
                media_url,
                uploader_id,
            }
        } else {
            publish::Request::PostImage {
                post_id,
                media_id,
                media_url,
                uploader_id,
            }
        };
        (request, self.correlation_id)
    }
}

#[derive(clap::Args)]
struct ImageArgs {
    #[arg(long)]
    post_id: i64,
    #[arg(long)]
    media_id: i64,
    /// Where the ML service fetches the image (`mediaUrl` on the wire).
    #[arg(long)]
    media_url: String,
    #[arg(long)]
    uploader_id: Option<i64>,
    /// Correlation id (generated when absent).
    #[arg(long)]
    correlation_id: Option<String>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    #[command(after_long_help = config::env_help())]
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
    /// Re-publish dead letters onto their source stream (new entry ids), then delete them from
    /// the dead-letter stream. Select them by id, or with --stream/--kind, or all with --all.
    #[command(after_long_help = config::env_help())]
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
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load a plugin file exactly as the host would and print its manifest, streams, imports,
    /// size, compile time, limits and grants. Exits 1 if the host would refuse it.
    Check {
        /// The `.wasm` component.
        file: PathBuf,
    },
    /// Run a plugin's `handle` on one entry and print the commands it returns (or its failure) as
    /// JSON, without touching Redis or the database. Exits 2 when the handler fails.
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo draws a progress bar; only warnings would interrupt it.
    let default_filter = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(execute(cli));
    // Do not wait for blocking threads: one may be inside a plugin call until its deadline.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", kaleidoscope::text::causes(&error));
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            plugins_dir,
            consumer_name,
            no_migrate,
        } => {
            let mut flags = BTreeMap::new();
            if let Some(dir) = plugins_dir {
                flags.insert("plugins_dir", dir.display().to_string());
            }
            if let Some(name) = consumer_name {
                flags.insert("consumer_name", name);
            }
            if no_migrate {
                flags.insert("migrate", "false".to_string());
            }
            let config = load_config(cli.config.as_deref(), &flags)?;
            let (first, second) = signals()?;
            kaleidoscope::host::run(
                config,
                async {
                    let _ = first.await;
                },
                async {
                    let _ = second.await;
                },
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            entries,
            rate,
            baseline,
            mix,
            embedding_dims,
            database_url,
            timeout,
            json,
        } => {
            let config = load_config(cli.config.as_deref(), &BTreeMap::new())?;
            let options = kaleidoscope::bench::BenchOptions {
                entries,
                rate: rate.filter(|r| *r > 0),
                baseline,
                mix,
                embedding_dims,
                database_url: database_url
                    .unwrap_or_else(|| with_database(&config.database_url, "kaleidoscope_bench")),
                redis_url: config.redis_url.clone(),
                host_binary: std::env::current_exe()
                    .context("cannot find this executable to start the host")?,
                timeout: Duration::from_secs(timeout),
            };
            let results = kaleidoscope::bench::run(&options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", kaleidoscope::bench::render(&options, &results));
            }
            Ok(if results.iter().all(|r| r.verified.is_ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Migrate => {
            let config = load_config(cli.config.as_deref(), &BTreeMap::new())?;
            let pool =
                kaleidoscope::persist::connect(&config.database_url, 2, &config.database_timeouts)
                    .await?;
            kaleidoscope::persist::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            json,
            max_pending_age,
        } => {
            let config = load_config(cli.config.as_deref(), &BTreeMap::new())?;
            let mut conn = redis_connection(&config).await?;
            // Requests by status come from the database; status still works without it.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(3))
                .connect(&config.database_url)
                .await;
            if let Err(error) = &pool {
                tracing::warn!("cannot reach PostgreSQL for request counts: {error}");
            }
            let report = status::collect(
                &mut conn,
                &config,
                pool.as_ref().ok(),
                Duration::from_secs(max_pending_age),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
            Ok(if report.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Dlq(command) => {
            let config = load_config(cli.config.as_deref(), &BTreeMap::new())?;
            let mut conn = redis_connection(&config).await?;
            match command {
                DlqCommand::List {
                    stream,
                    kind,
                    limit,
                    json,
                } => {
                    let filter = dlq::Filter {
                        ids: Vec::new(),
                        stream,
                        kind,
                    };
                    let entries = dlq::list(&mut conn, &config, &filter, limit).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&entries)?);
                    } else {
                        print!("{}", dlq::render(&entries));
                    }
                }
                DlqCommand::Replay {
                    ids,
                    stream,
                    kind,
                    all,
                    json,
                } => {
                    if ids.is_empty() && stream.is_none() && kind.is_none() && !all {
                        anyhow::bail!(
                            "say which dead letters to replay: ids, --stream STREAM, --kind KIND, or --all"
                        );
                    }
                    let filter = dlq::Filter {
                        ids: ids.clone(),
                        stream,
                        kind,
                    };
                    let entries = dlq::list(&mut conn, &config, &filter, usize::MAX).await?;
                    if let Some(missing) =
                        ids.iter().find(|id| !entries.iter().any(|e| &e.id == *id))
                    {
                        anyhow::bail!(
                            "no dead letter with id {missing} (matching the filters) in {:?}",
                            config.dlq_key()
                        );
                    }
                    let replayed = dlq::replay(&mut conn, &config, &entries).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&replayed)?);
                    } else {
                        for r in &replayed {
                            println!("{} -> {} {}", r.dead_letter_id, r.source_stream, r.new_id);
                        }
                        println!("replayed {} dead letter(s)", replayed.len());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish(command) => {
            let config = Arc::new(load_config(cli.config.as_deref(), &BTreeMap::new())?);
            let (request, correlation_id) = match command {
                PublishCommand::PostImage(args) => args.into_request(false),
                PublishCommand::PostUpdate(args) => args.into_request(true),
                PublishCommand::ProfilePicture {
                    user_id,
                    image_url,
                    correlation_id,
                } => (
                    publish::Request::ProfilePicture { user_id, image_url },
                    correlation_id,
                ),
            };
            let pool =
                kaleidoscope::persist::connect(&config.database_url, 2, &config.database_timeouts)
                    .await?;
            kaleidoscope::persist::migrate(&pool).await?;
            let publisher = publish::Publisher::new(config.clone(), pool)?;
            match publisher.publish(&request, correlation_id).await? {
                Some(published) => println!(
                    "published to {} as {} correlationId={}",
                    published.stream,
                    published.entry_id.unwrap_or_default(),
                    published.correlation_id
                ),
                None => println!("not published (see the log)"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            users,
            posts,
            media_per_post,
            error_rate,
            database_url,
            stream_prefix,
            json,
        } => {
            if users < 1 || posts < 1 || media_per_post < 1 {
                anyhow::bail!("--users, --posts and --media-per-post must be at least 1");
            }
            let config = load_config(cli.config.as_deref(), &BTreeMap::new())?;
            let database_url = database_url
                .unwrap_or_else(|| with_database(&config.database_url, "kaleidoscope_demo"));
            let options = demo::DemoOptions {
                users,
                posts,
                media_per_post,
                error_rate,
                database_url,
                stream_prefix,
                deadline: Duration::from_secs(55),
            };
            let summary = demo::run(&config, &options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::SimulateMl {
            error_rate,
            embedding_dims,
        } => {
            let config = load_config(cli.config.as_deref(), &BTreeMap::new())?;
            let options = simulate::SimulatorOptions {
                error_rate,
                embedding_dims,
                ..Default::default()
            };
            let (first, _second) = signals()?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let _ = first.await;
                let _ = stop.send(true);
            });
            let stats = simulate::run(&config, &options, stopped).await?;
            tracing::info!(?stats, "simulator stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(command) => {
            let config_file = cli.config.clone();
            tokio::task::spawn_blocking(move || plugin_command(config_file.as_deref(), command))
                .await
                .context("the plugin command thread failed")?
        }
    }
}

/// `plugin check` and `plugin exec`. Plugin calls are synchronous and must not run on an async
/// runtime worker thread (WASI's synchronous bindings block on the runtime), so the caller runs
/// this on a blocking thread, as the host does.
fn plugin_command(
    config_file: Option<&std::path::Path>,
    command: PluginCommand,
) -> Result<ExitCode> {
    match command {
        PluginCommand::Check { file } => {
            let config = load_config(config_file, &BTreeMap::new())?;
            let plugin = toolkit::load(&config, &file)
                .with_context(|| format!("{} would not load", file.display()))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&toolkit::describe(&config, &plugin))?
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Exec {
            file,
            fields,
            stream,
            id,
            deliveries,
        } => {
            let config = load_config(config_file, &BTreeMap::new())?;
            let fields = fields
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--field {pair:?} is not NAME=VALUE"))
                })
                .collect::<Result<Vec<_>>>()?;
            let plugin = toolkit::load(&config, &file)
                .with_context(|| format!("{} would not load", file.display()))?;
            let (outcome, ok) =
                toolkit::exec(&config, &plugin, stream.as_deref(), &id, deliveries, fields)?;
            println!("{}", serde_json::to_string_pretty(&outcome)?);
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

/// A fraction from 0 to 1 (an error rate).
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("expected a number from 0 to 1, got {text:?}")),
    }
}

/// `url` with its database name replaced.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

async fn redis_connection(config: &Config) -> Result<redis::aio::MultiplexedConnection> {
    let url = kaleidoscope::persist::redact(&config.redis_url);
    redis::Client::open(config.redis_url.as_str())
        .with_context(|| format!("invalid Redis URL {url}"))?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot connect to Redis at {url}"))
}

fn load_config(
    file: Option<&std::path::Path>,
    flags: &BTreeMap<&'static str, String>,
) -> Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    Config::from_sources(file, &env, flags)
}

/// Two futures: the first completes on the first SIGTERM or Ctrl-C, the second on the next one.
fn signals() -> Result<(
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Receiver<()>,
)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let (first_tx, first) = tokio::sync::oneshot::channel();
    let (second_tx, second) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut senders = [Some(first_tx), Some(second_tx)].into_iter().flatten();
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            match senders.next() {
                Some(sender) => {
                    let _ = sender.send(());
                }
                None => return,
            }
        }
    });
    Ok((first, second))
}
