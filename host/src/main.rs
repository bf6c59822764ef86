//! The `kaleidoscope` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use kaleidoscope::config::{self, Config};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// Kaleidoscope Host: persists the ML result streams of the Kaleidoscope backend from Redis
/// Streams into PostgreSQL through hot-swappable WebAssembly handler plugins.
#[derive(Parser)]
#[command(name = "kaleidoscope", version, after_long_help = config::env_help())]
struct Cli {
    /// TOML configuration file; environment variables override its values.
    #[arg(long, global = true, env = "KALEIDOSCOPE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> Result<()> {
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
            kaleidoscope::host::run(config, shutdown_signal()).await
        }
        Command::Migrate => {
            let config = load_config(cli.config.as_deref(), &BTreeMap::new())?;
            let pool = kaleidoscope::persist::connect(&config.database_url, 2).await?;
            kaleidoscope::persist::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
    }
}

fn load_config(
    file: Option<&std::path::Path>,
    flags: &BTreeMap<&'static str, String>,
) -> Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    Config::from_sources(file, &env, flags)
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
