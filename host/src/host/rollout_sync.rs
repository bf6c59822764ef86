//! Following the fleet's rollouts ([`crate::persist::rollouts`]): each round reads the running
//! rollouts of this host's fleet, loads a new candidate from the plan (its bytes travel in
//! PostgreSQL, so hosts on separate machines follow the same plan), applies a changed share or
//! mode, and drops a rollout that ended. Rounds run at start (before any consumer reads, so a
//! restarted host resumes the rollout it was in), whenever the store's channel announces a
//! change, and every few seconds.
//!
//! A host follows a rollout only while it serves the rollout's live build: a host on another
//! build has nothing to compare the candidate with, and says so in its heartbeat, as it says
//! when the candidate would not load here.

use crate::persist::rollouts::{self, RolloutRow};
use crate::plugin::{Plugin, PluginRuntime};
use crate::rollout::{Active, Followed};
use crate::state::HostState;
use anyhow::{Context, Result};
use std::sync::Arc;

/// One round: brings what this host follows in step with the fleet's running rollouts. Returns
/// whether anything changed (the heartbeat is then written again, so a waiting tool sees it).
pub(super) async fn sync(state: &Arc<HostState>, runtime: &Arc<PluginRuntime>) -> Result<bool> {
    let fleet = crate::persist::plugin_store::fleet(&state.config);
    let rows = rollouts::running(&state.pool, &fleet).await?;
    let current = state.rollouts.snapshot();
    let serving = state.registry.snapshot();
    let mut next = Followed::default();
    for row in rows {
        let name = row.plugin.clone();
        // A host that does not serve the plugin has no part in its rollout.
        let Some(live) = serving.plugins().iter().find(|p| p.name == row.plugin) else {
            continue;
        };
        if let Some(problem) = not_its_live_build(&row, live) {
            next.refused.insert(name, (row, problem));
            continue;
        }
        let followed = current.active.get(&name).filter(|a| a.row.id == row.id);
        if let Some(active) = followed {
            if active.row.revision == row.revision {
                next.active.insert(name, active.clone());
            } else if let Some(revised) = active.revised(row) {
                log_revised(active, &revised);
                next.active.insert(name, Arc::new(revised));
            }
            continue;
        }
        // A candidate that would not load is not compiled again until the plan changes.
        if let Some((old, reason)) = current.refused.get(&name)
            && old.id == row.id
            && old.revision == row.revision
            && !reason.starts_with("this host")
        {
            next.refused.insert(name, (row, reason.clone()));
            continue;
        }
        match load_candidate(state, runtime, &row).await {
            Ok(candidate) => match Active::new(row.clone(), candidate) {
                Some(active) => {
                    tracing::info!(plugin = %row.plugin, rollout = row.id, mode = %row.mode, percent = row.percent,
                        live_version = %row.live_version, candidate_version = %row.candidate_version,
                        candidate_build = %crate::plugin::build_of(&row.candidate_sha256),
                        "following rollout {} of {}: {} → {} as a {} on {}% of the entries", row.id, row.plugin,
                        row.live_version, row.candidate_version, row.mode, row.percent);
                    next.active.insert(name, Arc::new(active));
                }
                None => {
                    let reason = format!("this host does not know the mode {:?}", row.mode);
                    next.refused.insert(name, (row, reason));
                }
            },
            Err(error) => {
                let reason = format!(
                    "the candidate would not load here: {}",
                    crate::text::causes(&error)
                );
                tracing::error!(plugin = %row.plugin, rollout = row.id, "cannot follow rollout {}: {reason}", row.id);
                next.refused.insert(name, (row, reason));
            }
        }
    }
    for (name, active) in &current.active {
        if next
            .active
            .get(name)
            .is_some_and(|a| a.row.id == active.row.id)
        {
            continue;
        }
        match next
            .refused
            .get(name)
            .filter(|(row, _)| row.id == active.row.id)
        {
            Some((row, reason)) => {
                tracing::warn!(plugin = %row.plugin, rollout = row.id,
                    "stopped following rollout {} of {}: {reason}", row.id, row.plugin);
                active.end();
            }
            None => log_ended(state, &fleet, active).await,
        }
    }
    let changed = differs(&current, &next);
    if changed {
        state.rollouts.replace(next);
    }
    Ok(changed)
}

/// Why this host cannot follow `row`, when it serves another build than the rollout's live one.
fn not_its_live_build(row: &RolloutRow, live: &Plugin) -> Option<String> {
    (live.sha256 != row.live_sha256).then(|| {
        format!(
            "this host serves {} {} (build {}), not the rollout's live build {}",
            live.name,
            live.version,
            live.build(),
            crate::plugin::build_of(&row.live_sha256)
        )
    })
}

/// Loads the candidate of `row` from the plan's bytes, with the limits its name is given.
async fn load_candidate(
    state: &Arc<HostState>,
    runtime: &Arc<PluginRuntime>,
    row: &RolloutRow,
) -> Result<Arc<Plugin>> {
    let bytes = rollouts::candidate_bytes(&state.pool, row.id)
        .await?
        .with_context(|| format!("rollout {} is gone", row.id))?;
    let state = state.clone();
    let runtime = runtime.clone();
    let row = row.clone();
    tokio::task::spawn_blocking(move || {
        // Not a file of the plugins directory: candidates are never scanned as plugins.
        let file = state
            .config
            .plugins_dir
            .join(format!("rollout-{}-candidate", row.id))
            .join(format!("{}.wasm", row.plugin));
        let config = &state.config;
        let plugin =
            runtime.load_bytes(&bytes, Some(row.candidate_sha256.clone()), &file, &|name| {
                config.limits_under(&state.policy(name))
            })?;
        anyhow::ensure!(
            plugin.name == row.plugin,
            "the candidate is plugin {:?}, not {:?}",
            plugin.name,
            row.plugin
        );
        Ok(Arc::new(plugin))
    })
    .await
    .context("the plugin loading thread failed")?
}

fn log_revised(old: &Active, new: &Active) {
    let row = &new.row;
    tracing::info!(plugin = %row.plugin, rollout = row.id, mode = %row.mode, percent = row.percent,
        "rollout {} of {} changed: {} on {}% of the entries (was {} on {}%)", row.id, row.plugin,
        row.mode, row.percent, old.row.mode, old.row.percent);
}

/// Logs the end of a rollout this host followed, with the reason the plan records.
async fn log_ended(state: &HostState, fleet: &str, active: &Active) {
    let row = &active.row;
    let ended = rollouts::latest(&state.pool, fleet, Some(&row.plugin))
        .await
        .ok()
        .and_then(|rows| rows.into_iter().find(|r| r.id == row.id));
    let (how, reason) = ended.map_or(("ended".to_string(), String::new()), |r| {
        (r.state, r.reason.unwrap_or_default())
    });
    tracing::info!(plugin = %row.plugin, rollout = row.id, state = %how,
        "rollout {} of {} {how}{}; the live version handles every entry", row.id, row.plugin,
        if reason.is_empty() { String::new() } else { format!(": {reason}") });
    active.end();
}

/// Whether two snapshots differ in what a heartbeat reports.
fn differs(a: &Followed, b: &Followed) -> bool {
    let active = |f: &Followed| -> Vec<(i64, i32)> {
        f.active
            .values()
            .map(|a| (a.row.id, a.row.revision))
            .collect()
    };
    let refused = |f: &Followed| -> Vec<(i64, i32, String)> {
        f.refused
            .values()
            .map(|(row, reason)| (row.id, row.revision, reason.clone()))
            .collect()
    };
    active(a) != active(b) || refused(a) != refused(b)
}
