//! The `kaleidoscope` command line: `args.rs` is its grammar, `commands.rs` has one function per
//! subcommand (`rollout.rs` those of `kaleidoscope rollout`), and [`main`] sets up logging and the async runtime, runs one, and turns its result
//! into an exit code and a one-line error.

mod args;
mod commands;
mod reprocess;
mod rollout;

pub use args::Cli;

use crate::config::{Config, Key};
use anyhow::{Context, Result};
use args::{Command, LogFormat};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

/// Parses the command line, runs the subcommand, and reports its error with every cause.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Ok(executable) = std::env::current_exe()
        && !matches!(cli.command, Command::CompilePlugin { .. })
    {
        crate::plugin::compile_in_child_processes(executable);
    }
    init_logging(&cli);
    if prints_and_exits(&cli.command) {
        die_quietly_on_a_closed_pipe();
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
            eprintln!("error: {}", crate::text::causes(&error));
            ExitCode::FAILURE
        }
    }
}

/// Whether `command` is a short one whose output people pipe into `head` or `grep`, rather
/// than a long-running service.
fn prints_and_exits(command: &Command) -> bool {
    !matches!(
        command,
        Command::Run { .. }
            | Command::SimulateMl { .. }
            | Command::Demo { .. }
            | Command::Bench { .. }
            | Command::Plugin(args::PluginCommand::Dev { .. })
            | Command::Plugin(args::PluginCommand::Up { .. })
    )
}

/// `kaleidoscope status | head` ends like any Unix tool when `head` has read enough, instead
/// of panicking in `println!` (Rust ignores SIGPIPE, so a write to the closed pipe is an error
/// that `println!` turns into a panic). Only for the short commands: a host must never die
/// because whoever read its output went away; its sockets are unaffected either way (they
/// write with `MSG_NOSIGNAL`).
fn die_quietly_on_a_closed_pipe() {
    // SAFETY: restoring a signal's default disposition, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Logs to stderr, as text or JSON; `RUST_LOG` overrides the level.
fn init_logging(cli: &Cli) {
    // The demo draws a progress bar; only warnings would interrupt it.
    // PostgreSQL's notices ("relation … already exists, skipping" on every migration run) are
    // not news; warnings from the server still show.
    // `publish` prints its result on stdout; the library's INFO line would say it twice.
    let default_filter = if matches!(cli.command, Command::Demo { .. } | Command::Publish(_)) {
        "warn"
    } else {
        // The file watcher's bookkeeping (a watched directory that vanished) is not news either.
        "info,sqlx::postgres::notice=warn,notify=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only for a person at a terminal: never in a file or a pipe, never with NO_COLOR.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .fmt_fields(crate::logging::json_fields())
            .event_format(crate::logging::JsonLines)
            .init(),
    }
}

/// Runs one subcommand.
async fn execute(cli: Cli) -> Result<ExitCode> {
    let file = cli.config.as_deref();
    match cli.command {
        Command::Run {
            plugins_dir,
            consumer_name,
            no_migrate,
            wait_for_deps,
        } => commands::run(file, plugins_dir, consumer_name, no_migrate, wait_for_deps).await,
        Command::Migrate => commands::migrate(&load_config(file)?).await,
        Command::Status {
            json,
            max_pending_age,
            max_lag,
        } => {
            let thresholds = crate::status::Thresholds {
                max_pending_age: std::time::Duration::from_secs(max_pending_age),
                max_lag,
            };
            commands::status(&load_config_for_a_tool(file)?, json, thresholds).await
        }
        Command::Dlq(command) => commands::dlq(&load_config_for_a_tool(file)?, command).await,
        Command::Rollout(command) => rollout::run(&load_config_for_a_tool(file)?, command).await,
        Command::Reprocess(args) => reprocess::run(load_config_for_a_tool(file)?, args).await,
        Command::Config(args::ConfigCommand::Check { json }) => config_check(file, json),
        Command::Publish(command) => commands::publish(load_config(file)?, command).await,
        Command::Demo {
            users,
            posts,
            media_per_post,
            error_rate,
            database_url,
            stream_prefix,
            json,
        } => {
            let config = load_config(file)?;
            let options = crate::demo::DemoOptions {
                users,
                posts,
                media_per_post,
                error_rate,
                database_url: own_database(&config, database_url, "kaleidoscope_demo"),
                stream_prefix,
                deadline: std::time::Duration::from_secs(55),
            };
            commands::demo(&config, &options, json).await
        }
        Command::Bench {
            entries,
            rate,
            mut reference,
            baseline,
            rounds,
            mix,
            embedding_dims,
            database_url,
            timeout,
            candidate,
            shadow_percent,
            reprocess,
            reprocess_rate,
            hosts,
            json,
        } => {
            let config = load_config(file)?;
            let rollout = match candidate {
                Some(candidate) => Some(bench_rollout(&config, &candidate, shadow_percent).await?),
                None => None,
            };
            let options = crate::bench::BenchOptions {
                entries,
                rate: rate.filter(|r| *r > 0),
                references: {
                    if baseline {
                        reference.push(crate::bench::Reference::Python);
                    }
                    reference
                },
                rounds: usize::from(rounds),
                mix,
                embedding_dims,
                database_url: own_database(&config, database_url, "kaleidoscope_bench"),
                redis_url: config.redis_url.clone(),
                redis_cluster_nodes: config.redis_cluster_nodes.clone(),
                host_binary: std::env::current_exe()
                    .context("cannot find this executable to start the host")?,
                timeout: std::time::Duration::from_secs(timeout),
                rollout,
                reprocess,
                reprocess_rate,
                hosts: usize::from(hosts),
            };
            commands::bench(&options, json).await
        }
        Command::CompilePlugin {
            slot_size,
            cache_dir,
            output,
        } => {
            crate::plugin::compile_to_file(slot_size, cache_dir.as_deref(), &output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SimulateMl {
            error_rate,
            embedding_dims,
        } => commands::simulate_ml(&load_config(file)?, error_rate, embedding_dims).await,
        Command::Plugin(command) => plugin(file, command).await,
    }
}

/// The candidate file of `bench --candidate` and the live build of its plugin in the plugins
/// directory, both loaded as `plugin deploy` loads them.
async fn bench_rollout(
    config: &Config,
    candidate: &Path,
    shadow_percent: f64,
) -> Result<crate::bench::BenchRollout> {
    let config = config.clone();
    let candidate = candidate.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let candidate = crate::deploy::inspect(&config, &candidate)?;
        let live_file = config
            .plugins_dir
            .join(format!("{}.wasm", candidate.plugin.name));
        let live = crate::deploy::inspect(&config, &live_file)
            .with_context(|| format!("the live build of {}", candidate.plugin.name))?;
        Ok(crate::bench::BenchRollout {
            live,
            candidate,
            shadow_percent,
        })
    })
    .await
    .context("the plugin loading thread failed")?
}

/// The database a demo or bench works in: `given`, else `name` on the configured server (never
/// the configured database itself, which holds real data).
fn own_database(config: &Config, given: Option<String>, name: &str) -> String {
    given.unwrap_or_else(|| crate::persist::with_database(&config.database_url, name))
}

/// `kaleidoscope config check`: every setting in force and where it came from. With a file that
/// does not parse or holds a bad value: the error, then the settings without the file, exit 1.
fn config_check(file: Option<&Path>, json: bool) -> Result<ExitCode> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let settings = match Config::resolved_settings(file, &env, &BTreeMap::new()) {
        Ok(settings) => settings,
        Err(error) if file.is_some() => {
            eprintln!("error: {}", crate::text::causes(&error));
            eprintln!("the settings without the file:");
            let settings = Config::resolved_settings(None, &env, &BTreeMap::new())?;
            print_settings(&settings, json)?;
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => return Err(error),
    };
    print_settings(&settings, json)?;
    if !json {
        println!("configuration ok");
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints resolved settings, as a table or JSON.
fn print_settings(settings: &[crate::config::ResolvedSetting], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&settings)?);
    } else {
        let width = settings.iter().map(|s| s.env.len()).max().unwrap_or(0);
        for s in settings {
            let origin = if s.origin.is_empty() {
                "(not set)"
            } else {
                &s.origin
            };
            println!("{:<width$}  {:<24}  {origin}", s.env, s.value);
        }
    }
    Ok(())
}

/// `kaleidoscope plugin …`.
async fn plugin(file: Option<&Path>, command: args::PluginCommand) -> Result<ExitCode> {
    match command {
        args::PluginCommand::Deploy {
            file: plugin,
            timeout,
            rollout,
        } => match rollout::plan(&rollout) {
            Some(plan) => rollout::start(&load_config(file)?, &plugin, &plan, timeout).await,
            None => commands::deploy(&load_config(file)?, &plugin, timeout).await,
        },
        args::PluginCommand::Up { dir, timeout } => {
            let env: BTreeMap<String, String> = std::env::vars().collect();
            let config = crate::authoring::up::config(&dir, &env)?;
            let (first, _second) = commands::signals()?;
            crate::authoring::up::run(
                config,
                &dir,
                std::time::Duration::from_secs(timeout),
                async {
                    let _ = first.await;
                },
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        args::PluginCommand::Remove { name } => commands::remove(&load_config(file)?, &name).await,
        args::PluginCommand::Dev {
            dir,
            timeout,
            shadow,
        } => {
            crate::authoring::dev::run(
                &load_config(file)?,
                &dir,
                std::time::Duration::from_secs(timeout),
                shadow,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        command => {
            // The schema to check `plugin exec`'s commands against is read here, where the
            // database can be awaited.
            let catalog = match &command {
                args::PluginCommand::Exec {
                    database: Some(url),
                    ..
                }
                | args::PluginCommand::Test {
                    database: Some(url),
                    ..
                } => Some(commands::live_schema(&load_config(file)?, url).await?),
                _ => None,
            };
            let file = file.map(Path::to_path_buf);
            // Plugin calls block; run them where blocking is allowed, as the host does.
            tokio::task::spawn_blocking(move || {
                commands::plugin(file.as_deref(), command, catalog.as_ref())
            })
            .await
            .context("the plugin command thread failed")?
        }
    }
}

/// The configuration for an operator tool (`status`, `dlq`), which must work best when something
/// is broken: as [`load_config`], but a configuration file that does not parse or holds a bad
/// value is reported and left out (the environment and the defaults still say where Redis and
/// PostgreSQL are), instead of stopping the tool.
fn load_config_for_a_tool(file: Option<&Path>) -> Result<Config> {
    match load_config(file) {
        Ok(config) => Ok(config),
        Err(error) if file.is_some() => {
            eprintln!(
                "warning: {}; going on without the file (only the environment and defaults apply)",
                crate::text::causes(&error)
            );
            load_config(None)
        }
        Err(error) => Err(error),
    }
}

/// The configuration from `file` and the environment, with no command-line overrides.
fn load_config(file: Option<&Path>) -> Result<Config> {
    load_config_with(file, &BTreeMap::new())
}

/// The configuration from `file`, the environment, and the command-line `flags` (which win).
fn load_config_with(file: Option<&Path>, flags: &BTreeMap<Key, String>) -> Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    Config::from_sources(file, &env, flags)
}
