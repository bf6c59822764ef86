//! `kaleidoscope plugin deploy --shadow/--canary` and `kaleidoscope rollout …`: the operator's
//! side of [`crate::deploy::rollout`], printing what changed and every host's answer.

use super::args::{RolloutArgs, RolloutCommand};
use crate::config::Config;
use crate::deploy::rollout::{self, Changed, Plan};
use crate::rollout::Mode;
use crate::rollout::guard::Thresholds;
use anyhow::{Context, Result};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// The rollout `plugin deploy` was asked for, if any.
pub(super) fn plan(args: &RolloutArgs) -> Option<Plan> {
    let (mode, percent) = match (args.shadow, args.canary) {
        (Some(percent), _) => (Mode::Shadow, percent),
        (None, Some(percent)) => (Mode::Canary, percent),
        (None, None) => return None,
    };
    Some(Plan {
        mode,
        percent,
        key_field: Some(args.key.clone()).filter(|k| !k.is_empty()),
        thresholds: Thresholds {
            max_failure_points: args.max_failure_points,
            window: args.window as usize,
            max_latency_factor: args.max_latency_factor,
            max_difference_percent: args.max_differences,
        },
    })
}

/// `plugin deploy --shadow/--canary`: exit 1 when a host cannot follow (the rollout is aborted)
/// or no live host answered.
pub(super) async fn start(
    config: &Config,
    file: &Path,
    plan: &Plan,
    timeout: u64,
) -> Result<ExitCode> {
    let changed = rollout::start(config, file, plan, Duration::from_secs(timeout)).await?;
    println!("started {}", changed.rollout.summary());
    Ok(answered(&changed))
}

/// Prints each host's answer; the exit code of a rollout change.
fn answered(changed: &Changed) -> ExitCode {
    print!("{}", changed.report());
    if changed.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `kaleidoscope rollout …`.
pub(super) async fn run(config: &Config, command: RolloutCommand) -> Result<ExitCode> {
    match command {
        RolloutCommand::Status { name, json } => status(config, name.as_deref(), json).await,
        RolloutCommand::Set {
            name,
            canary,
            shadow,
            timeout,
        } => {
            let (mode, percent) = match (canary, shadow) {
                (Some(percent), _) => (Mode::Canary, percent),
                (None, Some(percent)) => (Mode::Shadow, percent),
                (None, None) => anyhow::bail!("give --canary PERCENT or --shadow PERCENT"),
            };
            let changed = rollout::set(
                config,
                &name,
                Some(mode),
                percent,
                Duration::from_secs(timeout),
            )
            .await?;
            let row = &changed.rollout;
            println!(
                "rollout {} of {} is now a {} on {}% of the entries",
                row.id, row.plugin, row.mode, row.percent
            );
            Ok(answered(&changed))
        }
        RolloutCommand::Promote { name, timeout } => {
            let deployed = rollout::promote(config, &name, Duration::from_secs(timeout)).await?;
            println!(
                "promoted {} {} (build {}): the live version of every host",
                deployed.name,
                deployed.version,
                crate::plugin::build_of(&deployed.sha256)
            );
            print!("{}", deployed.report(config));
            Ok(if deployed.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        RolloutCommand::Abort { name } => {
            let row = rollout::abort(config, &name).await?;
            println!(
                "aborted rollout {} of {}: every host serves {} alone within seconds (what the candidate wrote stays written; see `kaleidoscope reprocess`)",
                row.id, row.plugin, row.live_version
            );
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Diff { name, limit, json } => diff(config, &name, limit, json).await,
    }
}

/// `rollout status`: exit 1 when no rollout matches.
async fn status(config: &Config, name: Option<&str>, json: bool) -> Result<ExitCode> {
    let pool = crate::persist::connect_existing(&config.database_url, &config.database_timeouts)
        .await
        .context("rollouts are kept in PostgreSQL")?;
    let mut conn = crate::redis_connection::open(config).await?;
    let hosts = crate::heartbeat::read_all(&mut conn, config).await?;
    let reports = crate::status::rollouts::collect(&pool, config, &hosts, name, false).await;
    pool.close().await;
    let reports = reports?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", crate::status::rollouts::render(&reports));
    }
    Ok(if reports.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `rollout diff`: the sampled differences of NAME's latest rollout.
async fn diff(config: &Config, name: &str, limit: i64, json: bool) -> Result<ExitCode> {
    use crate::persist::rollouts;
    let pool = crate::persist::connect_existing(&config.database_url, &config.database_timeouts)
        .await
        .context("rollouts are kept in PostgreSQL")?;
    let fleet = crate::persist::plugin_store::fleet(config);
    let found = async {
        let Some(row) = rollouts::latest(&pool, &fleet, Some(name)).await?.pop() else {
            anyhow::bail!("plugin {name:?} has had no rollout in fleet {fleet:?}");
        };
        let differences = rollouts::differences(&pool, row.id, limit).await?;
        let tallies = rollouts::tallies(&pool, &[row.id]).await?;
        Ok((row, differences, tallies))
    }
    .await;
    pool.close().await;
    let (row, differences, tallies) = found?;
    if json {
        let entries: Vec<serde_json::Value> = differences
            .iter()
            .map(|d| {
                let commands = |o: &serde_json::Value| {
                    o.get("commands")
                        .and_then(|c| c.as_array())
                        .cloned()
                        .unwrap_or_default()
                };
                let changes = crate::rollout::diff::column_changes(
                    &commands(&d.live),
                    &commands(&d.candidate),
                );
                serde_json::json!({
                    "stream": d.stream, "entry_id": d.entry_id, "verdict": d.verdict,
                    "host": d.host, "live": d.live, "candidate": d.candidate, "changes": changes,
                })
            })
            .collect();
        let json = serde_json::json!({"rollout": row, "tallies": tallies, "differences": entries});
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    let compared = crate::status::rollouts::compared(&tallies);
    println!(
        "rollout {} of {}: {} → {} ({}, {}); compared: {}",
        row.id,
        row.plugin,
        row.live_version,
        row.candidate_version,
        row.mode,
        row.state,
        if compared.is_empty() {
            "none"
        } else {
            &compared
        }
    );
    for d in &differences {
        for line in
            crate::rollout::diff::render(&d.stream, &d.entry_id, &d.verdict, &d.live, &d.candidate)
        {
            println!("{line}");
        }
    }
    if differences.is_empty() {
        println!("no difference sampled");
    }
    Ok(ExitCode::SUCCESS)
}
