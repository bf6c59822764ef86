//! One function per subcommand: each reads its configuration, calls the module that does the
//! work, prints the result (a table, or JSON with `--json`) and returns the exit code.

use super::args::{DlqCommand, PluginCommand, PublishArgs, PublishCommand};
use super::{load_config, load_config_with};
use crate::config::{Config, Key};
use crate::dead_letter::admin as dlq;
use crate::persist::schema::Catalog;
use crate::shutdown::StopSwitch;
use crate::{bench, demo, persist, redis_connection, requests, simulate, status, toolkit};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// `kaleidoscope run`: the host, until SIGTERM or Ctrl-C (a second signal exits at once).
pub(super) async fn run(
    file: Option<&Path>,
    plugins_dir: Option<PathBuf>,
    consumer_name: Option<String>,
    no_migrate: bool,
    wait_for_deps: Option<Duration>,
) -> Result<ExitCode> {
    let mut flags = BTreeMap::new();
    if let Some(dir) = plugins_dir {
        flags.insert(Key::PluginsDir, dir.display().to_string());
    }
    if let Some(name) = consumer_name {
        flags.insert(Key::ConsumerName, name);
    }
    if no_migrate {
        flags.insert(Key::Migrate, "false".to_string());
    }
    if let Some(wait) = wait_for_deps {
        flags.insert(Key::WaitForDepsMs, wait.as_millis().to_string());
    }
    let config = load_config_with(file, &flags)?;
    let (first, second) = signals()?;
    crate::host::run(
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

/// `kaleidoscope migrate`.
pub(super) async fn migrate(config: &Config) -> Result<ExitCode> {
    let pool = persist::connect(&config.database_url, 2, &config.database_timeouts).await?;
    persist::migrate(&pool).await?;
    if let Some(dir) = &config.migrations_dir {
        persist::operator_migrations::apply(&pool, dir).await?;
    }
    tracing::info!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

/// `kaleidoscope status`: exit code 1 when anything is unhealthy.
pub(super) async fn status(
    config: &Config,
    json: bool,
    thresholds: status::Thresholds,
) -> Result<ExitCode> {
    let mut conn = redis_connection::open(config).await?;
    // Requests by status come from the database; status still works without it.
    let pool = persist::connect_existing(&config.database_url, &config.database_timeouts).await;
    if let Err(error) = &pool {
        tracing::warn!(
            "cannot reach PostgreSQL for request counts: {}",
            crate::text::causes(error)
        );
    }
    let report = status::collect(&mut conn, config, pool.as_ref().ok(), thresholds).await?;
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

/// `kaleidoscope dlq list`, `dlq show` and `dlq replay`.
pub(super) async fn dlq(config: &Config, command: DlqCommand) -> Result<ExitCode> {
    let mut conn = redis_connection::open(config).await?;
    match command {
        DlqCommand::List {
            stream,
            kind,
            limit,
            json,
        } => {
            let filter = dlq::Filter::new(Vec::new(), stream, kind)?;
            let entries = dlq::list(&mut conn, config, &filter, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", dlq::render(&entries));
            }
        }
        DlqCommand::Show { id, json } => {
            let letter = dlq::show(&mut conn, config, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letter)?);
            } else {
                print!("{}", dlq::render_one(&letter));
            }
        }
        DlqCommand::Replay {
            ids,
            stream,
            kind,
            all,
            force,
            json,
        } => {
            let filter = dlq::Filter::new(ids, stream, kind)?;
            let entries = dlq::select_for_replay(&mut conn, config, &filter, all).await?;
            let secret = replay_secret(&mut conn, config).await?;
            let replayed = dlq::replay(&mut conn, config, &secret, &entries, force).await?;
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

/// `kaleidoscope publish …`: one processing request, recorded for tracking.
pub(super) async fn publish(config: Config, args: PublishArgs) -> Result<ExitCode> {
    let config = Arc::new(config);
    let (request, correlation_id) = match args.command {
        PublishCommand::PostImage(args) => args.into_request(false),
        PublishCommand::PostUpdate(args) => args.into_request(true),
        PublishCommand::ProfilePicture {
            user_id,
            image_url,
            correlation_id,
        } => (
            requests::Request::ProfilePicture { user_id, image_url },
            correlation_id,
        ),
    };
    let pool = persist::connect(&config.database_url, 2, &config.database_timeouts).await?;
    persist::migrate(&pool).await?;
    let mut publisher = requests::Publisher::new(config.clone(), pool)?;
    if let Some(replicas) = args.wait_replicas {
        publisher = publisher.waiting_for(replicas, Duration::from_millis(args.wait_timeout_ms));
    }
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

/// `kaleidoscope demo`.
pub(super) async fn demo(
    config: &Config,
    options: &demo::DemoOptions,
    json: bool,
) -> Result<ExitCode> {
    if options.users < 1 || options.posts < 1 || options.media_per_post < 1 {
        anyhow::bail!("--users, --posts and --media-per-post must be at least 1");
    }
    let summary = demo::run(config, options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    Ok(ExitCode::SUCCESS)
}

/// `kaleidoscope bench`: exit code 1 when a subject's rows did not verify.
pub(super) async fn bench(options: &bench::BenchOptions, json: bool) -> Result<ExitCode> {
    let results = bench::run(options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", bench::render(options, &results));
    }
    Ok(if results.iter().all(|r| r.verified.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `kaleidoscope simulate-ml`: the reference ML service, until SIGTERM or Ctrl-C.
pub(super) async fn simulate_ml(
    config: &Config,
    error_rate: f64,
    embedding_dims: usize,
) -> Result<ExitCode> {
    let options = simulate::SimulatorOptions {
        error_rate,
        embedding_dims,
        ..Default::default()
    };
    let (first, _second) = signals()?;
    let stop = StopSwitch::new();
    let stopped = stop.subscribe();
    tokio::spawn(async move {
        let _ = first.await;
        stop.stop();
    });
    let stats = simulate::run(config, &options, stopped).await?;
    tracing::info!(
        requests = stats.requests,
        errors = stats.errors,
        results = stats.results,
        "simulator stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// `kaleidoscope plugin deploy`: exit 1 when the file would not load, a host refused it (the
/// deploy is undone) or no live host answered.
pub(super) async fn deploy(config: &Config, file: &Path, timeout: u64) -> Result<ExitCode> {
    let deployed = crate::deploy::deploy(config, file, Duration::from_secs(timeout)).await?;
    println!(
        "deployed {} {} (build {}) to the plugin store of fleet {:?}",
        deployed.name,
        deployed.version,
        crate::plugin::build_of(&deployed.sha256),
        crate::persist::plugin_store::fleet(config)
    );
    print!("{}", deployed.report(config));
    Ok(if deployed.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `kaleidoscope plugin remove`: exit 1 when the store has no such plugin.
pub(super) async fn remove(config: &Config, name: &str) -> Result<ExitCode> {
    let pool = persist::connect_existing(&config.database_url, &config.database_timeouts)
        .await
        .context("plugin remove edits the plugin store, in PostgreSQL")?;
    let fleet = persist::plugin_store::fleet(config);
    let removed = persist::plugin_store::remove(&pool, &fleet, name).await;
    // A rollout of a plugin no host serves any more has nothing to compare: it ends with it.
    if let Ok(true) = removed {
        let running = persist::rollouts::running(&pool, &fleet).await?;
        for rollout in running.iter().filter(|r| r.plugin == name) {
            let reason = format!("plugin {name} was removed from the plugin store");
            persist::rollouts::finish(&pool, &fleet, rollout.id, "aborted", &reason).await?;
            println!("aborted rollout {} of {name}: {reason}", rollout.id);
        }
    }
    pool.close().await;
    if removed? {
        println!(
            "removed {name} from the plugin store of fleet {fleet:?}; every host unloads it within seconds"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "the plugin store of fleet {fleet:?} has no plugin {name:?} (a file dropped into a plugins directory by hand is removed by hand)"
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The schema of the database at `url`, as the host would check commands against it.
pub(super) async fn live_schema(config: &Config, url: &str) -> Result<Catalog> {
    let pool = persist::connect_existing(url, &config.database_timeouts).await?;
    let catalog = Catalog::load(&pool).await;
    pool.close().await;
    catalog
}

/// `plugin check` (exit 1 when the host would refuse the file) and `plugin exec` (exit 2 when
/// the handler fails, or when `catalog` is given and the host would refuse its commands).
/// Plugin calls block, so the caller runs this on a blocking thread.
pub(super) fn plugin(
    config_file: Option<&Path>,
    command: PluginCommand,
    catalog: Option<&Catalog>,
) -> Result<ExitCode> {
    // A project's own grants unless a configuration is given on the command line: the shell's
    // `KALEIDOSCOPE_CONFIG` is an operator's host's, not the project's.
    let given = config_file.filter(|file| {
        std::env::var_os("KALEIDOSCOPE_CONFIG").as_deref() != Some(file.as_os_str())
    });
    let project_config = match &command {
        PluginCommand::Test { file, .. } if file.is_dir() && given.is_none() => {
            Some(file.join("kaleidoscope.toml")).filter(|f| f.is_file())
        }
        _ => None,
    };
    let config = load_config(project_config.as_deref().or(config_file))?;
    match command {
        // Async, so run by `execute` directly.
        PluginCommand::Deploy { .. }
        | PluginCommand::Remove { .. }
        | PluginCommand::Dev { .. }
        | PluginCommand::Up { .. } => {
            anyhow::bail!("plugin deploy, remove, dev and up run on the async runtime")
        }
        PluginCommand::New {
            name,
            stream,
            lang,
            table,
            dir,
        } => {
            let request = crate::authoring::scaffold::NewPlugin {
                name,
                stream,
                table,
                language: lang,
                dir,
            };
            let dir = crate::authoring::scaffold::create(&request)?;
            let guide = dir.join("README.md");
            println!(
                "created {} ({lang:?}); next: see {}",
                dir.display(),
                guide.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Build { dir } => {
            let file = crate::authoring::build(&dir)?;
            println!("{}", file.display());
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Test {
            file,
            dir,
            update,
            database: _,
        } => plugin_test(&config, &file, dir, update, catalog),
        PluginCommand::Check { file } => {
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
            database: _,
        } => {
            let entry = toolkit::ExecEntry {
                stream: stream.as_deref(),
                id: &id,
                deliveries,
                fields: name_value_pairs(&fields)?,
            };
            plugin_exec(&config, &file, entry, catalog)
        }
    }
}

/// `plugin exec`: one entry through the component `file`, its outcome as JSON; exit code 2 when
/// the host would not persist it.
fn plugin_exec(
    config: &Config,
    file: &Path,
    entry: toolkit::ExecEntry<'_>,
    catalog: Option<&Catalog>,
) -> Result<ExitCode> {
    let plugin = toolkit::load(config, file)
        .with_context(|| format!("{} would not load", file.display()))?;
    let (outcome, ok) = toolkit::exec(config, &plugin, entry, catalog)?;
    println!("{}", serde_json::to_string_pretty(&outcome)?);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// `--field NAME=VALUE` arguments as pairs, naming the one that is not.
fn name_value_pairs(fields: &[String]) -> Result<Vec<(String, String)>> {
    fields
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--field {pair:?} is not NAME=VALUE"))
        })
        .collect()
}

/// `plugin test`: the recorded entries of `dir` (or of a project folder's `tests`) through the
/// component `file` (or the project, built first), one line per case; fails when any case does.
fn plugin_test(
    config: &Config,
    file: &Path,
    dir: Option<PathBuf>,
    update: bool,
    catalog: Option<&Catalog>,
) -> Result<ExitCode> {
    let (file, dir) = if file.is_dir() {
        let cases = dir.unwrap_or_else(|| file.join("tests"));
        (crate::authoring::build(file)?, cases)
    } else {
        let dir = dir.context(
            "give the directory of recorded entries after the component (or give a project folder)",
        )?;
        (file.to_path_buf(), dir)
    };
    let plugin = toolkit::load(config, &file)
        .with_context(|| format!("{} would not load", file.display()))?;
    let results = toolkit::test_dir(config, &plugin, &dir, update, catalog)?;
    for result in &results {
        println!("{:<8} {}", result.verdict, result.case);
        match result.verdict {
            toolkit::Verdict::Differs => {
                println!(
                    "  expected: {}",
                    result.expected.clone().unwrap_or_default()
                );
                println!("  actual:   {}", result.actual);
            }
            toolkit::Verdict::New => println!(
                "  actual:   {} (no expected outcome: run with --update)",
                result.actual
            ),
            toolkit::Verdict::Ok | toolkit::Verdict::Updated => {}
        }
    }
    let failed = results.iter().filter(|r| r.verdict.fails()).count();
    println!("{} case(s), {failed} failed", results.len());
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Two futures: the first completes on the first SIGTERM or Ctrl-C, the second on the next one.
pub(super) fn signals() -> Result<(
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

/// The deployment's replay secret: its ledger identity from Redis, the secret from PostgreSQL.
async fn replay_secret(
    conn: &mut crate::redis_connection::RedisConnection,
    config: &crate::config::Config,
) -> Result<String> {
    let key = config.source_identity_key();
    let source: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .with_context(|| format!("cannot read the ledger identity at {key:?}"))?;
    let source = source.with_context(|| {
        format!("no ledger identity at {key:?}: start a host of this deployment first (replays are recorded under it)")
    })?;
    let pool = crate::persist::connect_existing(&config.database_url, &config.database_timeouts)
        .await
        .context("dlq replay signs its replays with a secret kept in PostgreSQL")?;
    let secret = crate::persist::ledger::replay_secret(&pool, &source).await;
    pool.close().await;
    secret
}
