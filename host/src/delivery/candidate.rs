//! Step 2 under a rollout ([`crate::rollout`]): which version handles each entry, the shadow's
//! run beside the live one, the thresholds that roll a candidate back, and (in step 4) the
//! rollout's tally, written in the batch transaction so its counts are exact.
//!
//! - **Canary**: the entries the rollout's key routes to the candidate are handled by it, the
//!   rest by the live version; both kinds commit together, each recorded in the ledger against
//!   the build that handled it. A candidate whose commands validation refuses is rolled back at
//!   once, and the entries it was refused on are handled by the live version in the same batch:
//!   the refused command never runs.
//! - **Shadow**: the live version handles every entry as without a rollout. The candidate then
//!   runs on a copy of each entry the rollout takes (same fields, same settings; `now` is a value
//!   the database fills in, the same for both), its commands are validated, compared with the
//!   live ones and dropped: nothing of the candidate is executed, emitted or dead-lettered.

use super::dispatch::{self, Fields};
use super::{Decision, Item, Role};
use crate::dead_letter::FailureKind;
use crate::persist::rollouts::{self, Difference};
use crate::plugin::{Plugin, wit};
use crate::rollout::compare::{self, Verdict, View};
use crate::rollout::guard::{Breach, Call};
use crate::rollout::{Active, Mode};
use crate::state::HostState;
use anyhow::Result;
use sqlx::PgConnection;
use std::collections::BTreeMap;
use std::sync::Arc;

/// How many differing entries a rollout's sample keeps (`kaleidoscope rollout diff` shows them).
pub const DIFFERENCES_KEPT: i64 = 100;

/// A shadow's run on one entry.
#[derive(Debug, Default)]
pub(super) struct Shadow {
    /// A copy of the entry's fields for the candidate (the live call takes the entry's own),
    /// until the candidate is called with it.
    fields: Option<Fields>,
    /// The candidate's decision (kept to compare and to show in the sample of differences;
    /// never carried out).
    candidate: Option<Decision>,
    /// How the candidate's outcome compares with the live one's, once both are known.
    verdict: Option<Verdict>,
}

impl Decision {
    /// The decision as a rollout compares it (`None`: not the handler's, say a redelivery).
    fn view(&self) -> Option<View<'_>> {
        match self {
            Decision::Persist(statements) => Some(View::Writes(statements)),
            Decision::DeadLetter(FailureKind::ForbiddenCommand, reason) => {
                Some(View::Rejected(reason))
            }
            Decision::DeadLetter(kind, reason) | Decision::Retry(kind, reason) => {
                Some(View::Failed(*kind, reason))
            }
            Decision::Redelivered => None,
        }
    }
}

impl HostState {
    /// Step 2 for the entries of a batch not decided yet: the handler of each (the live
    /// version, or under a canary its candidate), and under a shadow the candidate beside it.
    pub(super) async fn handle(
        &self,
        stream: &str,
        live: &Arc<Plugin>,
        rollout: Option<&Arc<Active>>,
        items: &mut [Item],
    ) -> Result<()> {
        // A rollout this host rolled back between two passes of a batch takes nothing more.
        let Some(rollout) = rollout.filter(|rollout| rollout.applies_to(live)) else {
            for item in items.iter_mut().filter(|item| item.decision.is_none()) {
                item.role = Role::Live;
            }
            self.dispatch(stream, live, Role::Live, items).await?;
            return Ok(());
        };
        match rollout.mode {
            Mode::Canary => self.handle_canary(stream, live, rollout, items).await,
            Mode::Shadow => self.handle_shadowed(stream, live, rollout, items).await,
        }
    }

    async fn handle_canary(
        &self,
        stream: &str,
        live: &Arc<Plugin>,
        rollout: &Arc<Active>,
        items: &mut [Item],
    ) -> Result<()> {
        for item in items.iter_mut().filter(|item| item.decision.is_none()) {
            item.role = if rollout.takes(&item.entry.id, &item.fields) {
                Role::Candidate
            } else {
                Role::Live
            };
        }
        let live_calls = self.dispatch(stream, live, Role::Live, items).await?;
        let candidate_calls = self
            .dispatch(stream, &rollout.candidate, Role::Candidate, items)
            .await?;
        // Refused commands of the candidate never run: the rollout ends, and the entries go to
        // the live version instead.
        let mut refused = None;
        for item in items.iter_mut().filter(|item| item.role == Role::Candidate) {
            if let Some(Decision::DeadLetter(FailureKind::ForbiddenCommand, reason)) =
                &item.decision
            {
                refused.get_or_insert_with(|| format!("entry {}: {reason}", item.entry.id));
                item.decision = None;
                item.role = Role::Live;
            }
        }
        let breach = match refused {
            Some(reason) => Some(Breach::Rejected(reason)),
            None => rollout.observe(&live_calls, &candidate_calls, &[]),
        };
        if let Some(breach) = breach {
            self.roll_back(rollout, &breach).await;
            if matches!(breach, Breach::Rejected(_)) {
                self.dispatch(stream, live, Role::Live, items).await?;
            }
        }
        Ok(())
    }

    /// A shadow: the candidate is called on copies of the entries while the live version
    /// handles them (two blocking threads: the batch waits for the slower, not for both), then
    /// the two outcomes are compared.
    async fn handle_shadowed(
        &self,
        stream: &str,
        live: &Arc<Plugin>,
        rollout: &Arc<Active>,
        items: &mut [Item],
    ) -> Result<()> {
        for item in items
            .iter_mut()
            .filter(|item| item.decision.is_none() && item.shadow.is_none())
        {
            if rollout.takes(&item.entry.id, &item.fields) {
                item.shadow = Some(Shadow {
                    fields: Some(item.fields.clone()),
                    ..Shadow::default()
                });
            }
        }
        let inputs: Vec<(usize, wit::Entry)> = items
            .iter_mut()
            .enumerate()
            .filter_map(|(index, item)| {
                let fields = item.shadow.as_mut()?.fields.take()?;
                Some((index, dispatch::entry(stream, &item.entry, fields)))
            })
            .collect();
        let candidate = &rollout.candidate;
        let policy = self.policy(&candidate.name);
        let (live_calls, candidate_run) =
            tokio::join!(self.dispatch(stream, live, Role::Live, items), async {
                if inputs.is_empty() {
                    return Ok((Vec::new(), Vec::new()));
                }
                self.call(candidate, &policy, inputs).await
            });
        let live_calls = live_calls?;
        let (calls, deferred) = candidate_run?;
        for (index, fields) in deferred {
            if let Some(shadow) = &mut items[index].shadow {
                shadow.fields = Some(fields);
            }
        }
        let mut judge = self.judge(candidate, &policy, false).await?;
        let mut candidate_calls = Vec::with_capacity(calls.len());
        for (index, _fields, call) in calls {
            let (decision, elapsed) = judge.decide(call, items[index].entry.deliveries).await?;
            candidate_calls.push(Call {
                failed: !matches!(decision, Decision::Persist(_)),
                elapsed,
            });
            if let Some(shadow) = &mut items[index].shadow {
                shadow.candidate = Some(decision);
            }
        }
        let compared = compare_shadowed(items);
        if let Some(breach) = rollout.observe(&live_calls, &candidate_calls, &compared) {
            self.roll_back(rollout, &breach).await;
        }
        Ok(())
    }

    /// Ends `rollout` for a `breach`: at once on this host, then for the fleet (the plan in
    /// PostgreSQL, which every host follows within seconds). Logged, counted, and recorded as the
    /// rollout's reason.
    pub(super) async fn roll_back(&self, rollout: &Active, breach: &Breach) {
        if !rollout.end() {
            return;
        }
        let row = &rollout.row;
        let reason = format!("{breach} (judged by host {})", self.config.consumer_name);
        tracing::error!(
            plugin = %row.plugin,
            rollout = row.id,
            live_version = %row.live_version,
            candidate_version = %row.candidate_version,
            breach = breach.kind(),
            "rolled back rollout {} of {} ({} → {}): {reason}; the live version takes every entry again",
            row.id,
            row.plugin,
            row.live_version,
            row.candidate_version
        );
        self.metrics
            .rollout_rollbacks
            .get_or_create(&crate::metrics::ByRollback {
                plugin: row.plugin.clone(),
                reason: breach.kind().to_string(),
            })
            .inc();
        let fleet = crate::persist::plugin_store::fleet(&self.config);
        if let Err(error) =
            rollouts::finish(&self.pool, &fleet, row.id, "rolled-back", &reason).await
        {
            tracing::error!(
                rollout = row.id,
                "the rollout ended on this host, but the fleet's plan could not be changed (every host judges the candidate for itself; `kaleidoscope rollout abort {}` ends it everywhere): {}",
                row.plugin,
                crate::text::causes(&error)
            );
        }
    }

    /// Step 4's part under a rollout: adds what the batch finished to the rollout's tally (the
    /// canary's entries by version and outcome, the shadow's comparisons) and keeps differences
    /// in its sample, in the batch transaction, so a redelivery counts nothing twice.
    pub(super) async fn tally_rollout(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        rollout: Option<&Active>,
        items: &[Item],
    ) -> Result<(), sqlx::Error> {
        let Some(rollout) = rollout else {
            return Ok(());
        };
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        let mut differences = Vec::new();
        for item in items {
            let Some(outcome) = item.finished().map(|o| o.as_str()) else {
                continue;
            };
            match rollout.mode {
                Mode::Canary => *counts.entry((item.role.as_str(), outcome)).or_default() += 1,
                Mode::Shadow => {
                    let Some(Shadow {
                        verdict: Some(verdict),
                        candidate: Some(candidate),
                        ..
                    }) = &item.shadow
                    else {
                        continue;
                    };
                    *counts.entry(("shadow", verdict.as_str())).or_default() += 1;
                    let views = item.decision.as_ref().and_then(Decision::view);
                    if let (false, Some(live), Some(candidate)) =
                        (*verdict == Verdict::Same, views, candidate.view())
                    {
                        differences.push(Difference {
                            stream: stream.to_string(),
                            entry_id: item.ledger_id.clone(),
                            verdict: verdict.as_str().to_string(),
                            live: live.to_json(),
                            candidate: candidate.to_json(),
                            host: String::new(),
                        });
                    }
                }
            }
        }
        let host = &self.config.consumer_name;
        if !counts.is_empty() {
            let counts: Vec<(&str, &str, i64)> = counts
                .into_iter()
                .map(|((role, outcome), n)| (role, outcome, n))
                .collect();
            rollouts::add_tallies(conn, rollout.row.id, host, &counts).await?;
        }
        if !differences.is_empty() {
            rollouts::sample_differences(
                conn,
                rollout.row.id,
                host,
                DIFFERENCES_KEPT,
                &differences,
            )
            .await?;
        }
        Ok(())
    }
}

/// Counts what an acknowledged batch finished under its rollout in `/metrics`.
pub(super) fn count(metrics: &crate::metrics::Metrics, rollout: Option<&Active>, items: &[Item]) {
    let Some(rollout) = rollout else { return };
    let plugin = &rollout.row.plugin;
    for item in items {
        let Some(outcome) = item.finished().map(|o| o.as_str()) else {
            continue;
        };
        match rollout.mode {
            Mode::Canary => {
                metrics
                    .rollout_entries
                    .get_or_create(&crate::metrics::ByRolloutOutcome {
                        plugin: plugin.clone(),
                        version: item.role.as_str().to_string(),
                        outcome: outcome.to_string(),
                    })
                    .inc();
            }
            Mode::Shadow => {
                if let Some(verdict) = item.shadow.as_ref().and_then(|s| s.verdict.as_ref()) {
                    metrics
                        .rollout_comparisons
                        .get_or_create(&crate::metrics::ByVerdict {
                            plugin: plugin.clone(),
                            verdict: verdict.as_str().to_string(),
                        })
                        .inc();
                }
            }
        }
    }
}

/// Compares the entries both versions have now decided and that were not compared yet; per
/// comparison, whether the outcomes differed.
fn compare_shadowed(items: &mut [Item]) -> Vec<bool> {
    let mut compared = Vec::new();
    for item in items.iter_mut() {
        let Some(shadow) = &mut item.shadow else {
            continue;
        };
        if shadow.verdict.is_some() {
            continue;
        }
        let views = (
            item.decision.as_ref().and_then(Decision::view),
            shadow.candidate.as_ref().and_then(Decision::view),
        );
        if let (Some(live), Some(candidate)) = views {
            let verdict = compare::compare(live, candidate);
            compared.push(verdict != Verdict::Same);
            shadow.verdict = Some(verdict);
        }
    }
    compared
}
