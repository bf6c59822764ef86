//! `kaleidoscope reprocess`: the operator's side of [`crate::reprocess`] — start a run from a
//! selection, resume, cancel or list runs, and print how each ended.

use super::args::ReprocessArgs;
use crate::config::Config;
use crate::reprocess::{self, Ended, Request, select::Spec};
use crate::shutdown::StopSwitch;
use anyhow::{Result, bail};
use std::process::ExitCode;
use std::sync::Arc;

/// Runs `kaleidoscope reprocess`. Exit 0 when the run finished, 130 when interrupted (resume
/// it), 1 when it failed or was cancelled.
pub(super) async fn run(config: Config, args: ReprocessArgs) -> Result<ExitCode> {
    let selecting = args.from.is_some()
        || args.to.is_some()
        || args.handled_by.is_some()
        || !args.ids.is_empty();
    let actions = [args.resume.is_some(), args.cancel.is_some(), args.list]
        .iter()
        .filter(|on| **on)
        .count();
    if actions > 1 || (actions == 1 && selecting) {
        bail!(
            "give one of: a selection (--from/--to, --handled-by or --ids), --resume RUN, --cancel RUN or --list"
        );
    }
    if args.list {
        return list(&config, args.json).await;
    }
    if let Some(id) = args.cancel {
        let row = reprocess::cancel(&config, id).await?;
        println!("cancelled {}", row.summary());
        return Ok(ExitCode::SUCCESS);
    }
    let config = Arc::new(config);
    let switch = StopSwitch::new();
    let stop = switch.subscribe();
    let (first, _second) = super::commands::signals()?;
    tokio::spawn(async move {
        if first.await.is_ok() {
            eprintln!("stopping after the batch in flight (the run stays resumable)");
            switch.stop();
        }
    });
    let outcome = match args.resume {
        Some(id) => reprocess::resume(config, id, args.batch, stop).await?,
        None => reprocess::start(config, request(&args)?, stop).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{}", reprocess::report::text(&outcome));
    }
    Ok(match outcome.ended {
        Ended::Finished => ExitCode::SUCCESS,
        Ended::Interrupted => ExitCode::from(130),
        Ended::Cancelled | Ended::Failed => ExitCode::FAILURE,
    })
}

/// The run the command line asks for.
fn request(args: &ReprocessArgs) -> Result<Request> {
    let range = args.from.is_some() || args.to.is_some();
    let spec = match (range, &args.handled_by, args.ids.is_empty()) {
        (true, None, true) => Spec::range(args.from.as_deref(), args.to.as_deref())?,
        (false, Some(handled_by), true) => Spec::handled_by(handled_by)?,
        (false, None, false) => Spec::ids(&args.ids)?,
        (false, None, true) => bail!(
            "select what to reprocess: --from/--to (a range; --from 0 for all), --handled-by NAME@VERSION, or --ids"
        ),
        _ => bail!("give one selection: --from/--to, --handled-by or --ids, not several"),
    };
    Ok(Request {
        stream: args.stream.clone(),
        spec,
        with: args.with.clone(),
        emit: args.emit,
        dry_run: args.dry_run,
        rate: args.rate,
        batch: args.batch,
        examples: if args.json {
            reprocess::EXAMPLES_IN_JSON
        } else {
            reprocess::EXAMPLES
        },
    })
}

/// `reprocess --list`.
async fn list(config: &Config, json: bool) -> Result<ExitCode> {
    let runs = reprocess::list(config).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else if runs.is_empty() {
        println!("no reprocessing run in progress or ended in the last day");
    } else {
        for run in &runs {
            println!("{}", run.summary());
        }
    }
    Ok(ExitCode::SUCCESS)
}
