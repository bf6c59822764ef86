//! Rollouts as `kaleidoscope rollout status` (and the rollouts section of `kaleidoscope status`)
//! show them: the plan, what the fleet finished under it (from the tallies the hosts write in
//! their batch transactions, and from the ledger, which records the build that handled each
//! entry), and how each host follows it.

use crate::config::Config;
use crate::heartbeat::HostStatus;
use crate::persist::rollouts::{self, RolloutRow};
use anyhow::Result;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;

/// One rollout, reported.
#[derive(Debug, Serialize)]
pub struct RolloutReport {
    #[serde(flatten)]
    pub rollout: RolloutRow,
    /// The fleet's tally: role (`live`, `candidate`, or `shadow`) → outcome (canary: processed,
    /// dead-lettered; shadow: the comparison's verdict) → entries.
    pub entries: BTreeMap<String, BTreeMap<String, i64>>,
    /// The same per host.
    pub by_host: BTreeMap<String, BTreeMap<String, i64>>,
    /// What the ledger recorded since the rollout started, by version (`live`, `candidate`) and
    /// outcome.
    pub ledger: BTreeMap<String, BTreeMap<String, i64>>,
    /// How each live host serving the plugin follows the rollout.
    pub hosts: Vec<HostFollowing>,
}

/// One host's part in a rollout.
#[derive(Debug, Serialize)]
pub struct HostFollowing {
    pub host: String,
    /// `following`, `refused` (with the reason) or `not-yet` (its heartbeat does not show the
    /// rollout's latest revision).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The latest rollout of every plugin (or of `plugin`); only running ones with `running_only`.
pub async fn collect(
    pool: &PgPool,
    config: &Config,
    hosts: &[HostStatus],
    plugin: Option<&str>,
    running_only: bool,
) -> Result<Vec<RolloutReport>> {
    let fleet = crate::persist::plugin_store::fleet(config);
    let rows: Vec<RolloutRow> = rollouts::latest(pool, &fleet, plugin)
        .await?
        .into_iter()
        .filter(|row| !running_only || row.state == "running")
        .collect();
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    let tallies = rollouts::tallies(pool, &ids).await?;
    let mut reports = Vec::new();
    for row in rows {
        let mut entries: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        let mut by_host: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        for tally in tallies.iter().filter(|t| t.rollout_id == row.id) {
            *entries
                .entry(tally.role.clone())
                .or_default()
                .entry(tally.outcome.clone())
                .or_default() += tally.entries;
            *by_host
                .entry(tally.host.clone())
                .or_default()
                .entry(format!("{} {}", tally.role, tally.outcome))
                .or_default() += tally.entries;
        }
        let mut ledger: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        let candidate_build = crate::plugin::build_of(&row.candidate_sha256).to_string();
        for (build, outcome, count) in rollouts::ledger_counts(pool, &row).await? {
            let version = if build == candidate_build {
                "candidate"
            } else {
                "live"
            };
            ledger
                .entry(version.to_string())
                .or_default()
                .insert(outcome, count);
        }
        let hosts = following(&row, hosts);
        reports.push(RolloutReport {
            rollout: row,
            entries,
            by_host,
            ledger,
            hosts,
        });
    }
    Ok(reports)
}

/// How each live host serving `row`'s plugin follows it.
fn following(row: &RolloutRow, hosts: &[HostStatus]) -> Vec<HostFollowing> {
    if row.state != "running" {
        return Vec::new();
    }
    hosts
        .iter()
        .filter(|host| host.fresh() && host.serves(&row.plugin))
        .map(|host| {
            let (state, reason) = match host.following(row.id, row.revision) {
                Some(seen) if seen.refused.is_some() => ("refused", seen.refused.clone()),
                Some(_) => ("following", None),
                None => ("not-yet", None),
            };
            HostFollowing {
                host: host.consumer.clone(),
                state: state.to_string(),
                reason,
            }
        })
        .collect()
}

/// What a shadow compared so far, from its tallies (every host's): `n verdict, …`, empty when
/// nothing was.
pub fn compared(tallies: &[rollouts::Tally]) -> String {
    let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
    for tally in tallies.iter().filter(|t| t.role == "shadow") {
        *sums.entry(tally.outcome.as_str()).or_default() += tally.entries;
    }
    let sums: Vec<String> = sums.iter().map(|(v, n)| format!("{n} {v}")).collect();
    sums.join(", ")
}

/// `n outcome, …` of one role's counts.
fn counts(counts: Option<&BTreeMap<String, i64>>) -> String {
    match counts {
        Some(counts) if !counts.is_empty() => counts
            .iter()
            .map(|(outcome, n)| format!("{n} {outcome}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "none".to_string(),
    }
}

/// The reports as text, one block per rollout.
pub fn render(reports: &[RolloutReport]) -> String {
    let mut out = String::new();
    for report in reports {
        let row = &report.rollout;
        out.push_str(&format!("{}, {}\n", row.summary(), row.state));
        if let Some(reason) = &row.reason {
            out.push_str(&format!("  reason: {reason}\n"));
        }
        out.push_str(&format!(
            "  started by {} at {}, revision {}, last changed {}\n",
            row.started_by, row.started_at, row.revision, row.updated_at
        ));
        let differences = row
            .max_difference_percent
            .map_or(String::new(), |p| format!(", differences over {p}%"));
        out.push_str(&format!(
            "  thresholds: failure rate over live by {} points, handler time p99 over {}× live, over windows of {} entries{differences}\n",
            row.max_failure_points, row.max_latency_factor, row.window_entries
        ));
        if row.mode == "shadow" {
            out.push_str(&format!(
                "  compared: {}\n",
                counts(report.entries.get("shadow"))
            ));
        } else {
            for role in ["live", "candidate"] {
                out.push_str(&format!(
                    "  {role}: {} (ledger: {})\n",
                    counts(report.entries.get(role)),
                    counts(report.ledger.get(role))
                ));
            }
        }
        for (host, tally) in &report.by_host {
            out.push_str(&format!("  on {host}: {}\n", counts(Some(tally))));
        }
        for host in &report.hosts {
            let reason = host
                .reason
                .as_deref()
                .map_or(String::new(), |r| format!(": {r}"));
            out.push_str(&format!("  host {}: {}{reason}\n", host.host, host.state));
        }
    }
    if reports.is_empty() {
        out.push_str("no rollout\n");
    }
    out
}
