//! Step 2: the handler plugin turns each entry into commands, which are checked before anything
//! runs.

use super::{Decision, Item, Role};
use crate::dead_letter::FailureKind;
use crate::persist::validate;
use crate::plugin::{HandlerOutcome, Plugin, output, wit};
use crate::rollout::guard;
use crate::state::HostState;
use anyhow::{Context as _, Result};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

impl HostState {
    /// Calls `plugin`'s handler for every entry of `role` not decided yet (on a blocking thread)
    /// and validates the commands it returns against the live schema and the plugin's grants.
    /// Returns each call as a rollout's guard counts it.
    pub(super) async fn dispatch(
        &self,
        stream: &str,
        plugin: &Arc<Plugin>,
        role: Role,
        items: &mut [Item],
    ) -> Result<Vec<guard::Call>> {
        // The fields move into the call and back out, so large values (1408-float embeddings)
        // are never copied on the host side.
        let inputs: Vec<(usize, wit::Entry)> = items
            .iter_mut()
            .enumerate()
            .filter(|(_, item)| item.decision.is_none() && item.role == role)
            .map(|(index, item)| {
                let fields = std::mem::take(&mut item.fields);
                (index, entry(stream, &item.entry, fields))
            })
            .collect();
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        // The grants and settings in force for this batch: read once, used by every call and
        // every check of the batch.
        let policy = self.policy(&plugin.name);
        let (calls, deferred) = self.call(plugin, &policy, inputs).await?;
        for (index, fields) in deferred {
            items[index].fields = fields;
        }
        let mut outcomes = Vec::with_capacity(calls.len());
        for (index, fields, call) in calls {
            items[index].fields = fields;
            outcomes.push((index, call));
        }
        self.decide(plugin, &policy, items, outcomes).await
    }

    /// Runs `plugin`'s handler on `inputs`, one call after the other on one instance, on a
    /// blocking thread. Returns each call with its entry's fields, and the entries put off (see
    /// [`call_each`]).
    pub(super) async fn call(
        &self,
        plugin: &Arc<Plugin>,
        policy: &crate::config::PluginPolicy,
        inputs: Vec<(usize, wit::Entry)>,
    ) -> Result<(Vec<(usize, Fields, Call)>, Vec<(usize, Fields)>)> {
        let handler = plugin.clone();
        let settings = policy.settings.clone();
        let batch_span = tracing::Span::current();
        let in_flight =
            self.metrics
                .calls_in_flight
                .get_or_create_owned(&crate::metrics::ByPluginName {
                    plugin: plugin.name.clone(),
                });
        // One instance at a time per batch, within the plugin's share of the pool: waiting here,
        // not failing to instantiate, when the plugin's other batches hold its share.
        let slot = plugin.instance_slot().await?;
        // One blocking thread runs the batch's calls one after the other, in one session (one
        // instance, while calls return normally); the runtime's timers drive their deadlines.
        let runtime = tokio::runtime::Handle::current();
        let (calls, deferred) = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            runtime.block_on(call_each(
                &handler,
                inputs,
                &settings,
                &batch_span,
                &in_flight,
            ))
        })
        .await
        .context("the plugin call thread failed")?;
        if !deferred.is_empty() {
            tracing::info!(
                handled = calls.len(),
                waiting = deferred.len(),
                "a call ran to its deadline or the batch's commands reached {} MiB; the entries handled so far commit first, then the rest are handled",
                output::MAX_BATCH_OUTPUT_BYTES >> 20
            );
        }
        Ok((calls, deferred))
    }

    /// Turns each handler outcome into the entry's decision: commands that pass validation are
    /// persisted, commands that do not are dead-lettered as `forbidden-command`, failures are
    /// retried or dead-lettered by their kind.
    async fn decide(
        &self,
        plugin: &Plugin,
        policy: &crate::config::PluginPolicy,
        items: &mut [Item],
        outcomes: Vec<(usize, Call)>,
    ) -> Result<Vec<guard::Call>> {
        let mut judge = self.judge(plugin, policy, true).await?;
        let mut calls = Vec::with_capacity(outcomes.len());
        for (index, call) in outcomes {
            let deliveries = items[index].entry.deliveries;
            let (decision, elapsed) = judge.decide(call, deliveries).await?;
            calls.push(guard::Call {
                failed: !matches!(decision, Decision::Persist(_)),
                elapsed,
            });
            items[index].decision = Some(decision);
        }
        Ok(calls)
    }

    /// A [`Judge`] of `plugin`'s outcomes under `policy`, against the catalogue as it is now;
    /// `timed`: its calls count in the plugin's handler time (a shadow's do not: they serve no
    /// entry).
    pub(super) async fn judge<'a>(
        &'a self,
        plugin: &'a Plugin,
        policy: &'a crate::config::PluginPolicy,
        timed: bool,
    ) -> Result<Judge<'a>> {
        // A statement found the schema changed under the catalogue (a dropped column): read it
        // again before checking anything against it.
        if crate::persist::schema::schema_changed() {
            self.reload_catalog().await?;
        }
        let call_time = timed.then(|| {
            self.metrics
                .handler_duration
                .get_or_create_owned(&crate::metrics::ByPluginName {
                    plugin: plugin.name.clone(),
                })
        });
        Ok(Judge {
            state: self,
            plugin,
            policy,
            catalog: self.catalog(),
            call_time,
        })
    }
}

/// Decides what handler calls mean for their entries, one call at a time, with the batch's
/// catalogue (read again when commands name something it does not know).
pub(super) struct Judge<'a> {
    state: &'a HostState,
    plugin: &'a Plugin,
    policy: &'a crate::config::PluginPolicy,
    catalog: Arc<crate::persist::schema::Catalog>,
    call_time: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl Judge<'_> {
    /// The decision for an entry delivered `deliveries` times whose call came out as `call`,
    /// and how long the call took.
    pub(super) async fn decide(
        &mut self,
        call: Call,
        deliveries: u32,
    ) -> Result<(Decision, std::time::Duration)> {
        let Call {
            outcome,
            elapsed,
            weight,
        } = call;
        if let Some(call_time) = &self.call_time {
            call_time.observe(elapsed.as_secs_f64());
        }
        let plugin = self.plugin;
        let decision = match super::outcome::commands_of(outcome, plugin.limits().memory_bytes) {
            Ok(commands) if weight > output::MAX_CALL_OUTPUT_BYTES => Decision::DeadLetter(
                FailureKind::ForbiddenCommand,
                format!(
                    "the plugin returned {} commands weighing about {} MiB, more than the {} MiB one call may return",
                    commands.len(),
                    weight >> 20,
                    output::MAX_CALL_OUTPUT_BYTES >> 20
                ),
            ),
            Ok(commands) => {
                // A table or column the catalogue does not know may have been created since
                // it was read (a migration, or a plugin author's new table): read it again
                // first, so the commands are checked once, without copying them.
                if !validate::all_known(&commands, &self.catalog)
                    && self.state.refresh_catalog().await?
                {
                    self.catalog = self.state.catalog();
                }
                match validate::validate(&plugin.name, self.policy, commands, &self.catalog) {
                    Ok(statements) => Decision::Persist(statements),
                    Err(rejection) => {
                        Decision::DeadLetter(FailureKind::ForbiddenCommand, rejection.to_string())
                    }
                }
            }
            Err(failure) if failure.retryable => {
                self.state
                    .retry_or_give_up(failure.kind, failure.reason, deliveries)
            }
            Err(failure) => Decision::DeadLetter(failure.kind, failure.reason),
        };
        Ok((decision, elapsed))
    }
}

/// The entry a handler is called with.
pub(super) fn entry(
    stream: &str,
    entry: &crate::streams::StreamEntry,
    fields: Fields,
) -> wit::Entry {
    wit::Entry {
        source: stream.to_string(),
        id: entry.id.clone(),
        fields,
        deliveries: entry.deliveries,
    }
}

/// The fields of an entry, moved into a call and back out.
pub(super) type Fields = Vec<(String, String)>;

/// Runs the batch's calls one after the other in one session (one instance, while calls return
/// normally). Returns each call with its entry's fields, and the entries left for later: the
/// batch holds what it has been given until it commits, so past the output budget, or after a
/// call that ran to its deadline (so N looping entries cannot hold the others for N deadlines),
/// the rest waits for the part handled so far to commit.
async fn call_each(
    handler: &Plugin,
    inputs: Vec<(usize, wit::Entry)>,
    settings: &crate::plugin::Settings,
    batch_span: &tracing::Span,
    in_flight: &prometheus_client::metrics::gauge::Gauge,
) -> (Vec<(usize, Fields, Call)>, Vec<(usize, Fields)>) {
    let mut session = handler.session();
    let mut calls = Vec::with_capacity(inputs.len());
    let mut deferred = Vec::new();
    let mut weight = 0;
    let mut timed_out = false;
    for (index, entry) in inputs {
        if weight >= output::MAX_BATCH_OUTPUT_BYTES || timed_out {
            deferred.push((index, entry.fields));
            continue;
        }
        let correlation_id = entry
            .fields
            .iter()
            .find(|(k, _)| k == "correlationId")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let span =
            tracing::info_span!(parent: batch_span, "entry", entry = %entry.id, correlation_id);
        let started = Instant::now();
        let counted = crate::metrics::CallInFlight::start(in_flight);
        let outcome = session.handle(&entry, settings).instrument(span).await;
        drop(counted);
        // Weighed once, here: the batch's budget and the per-call cap both use it.
        let weighs = match &outcome {
            HandlerOutcome::Commands(commands) => output::weight(commands),
            HandlerOutcome::Timeout(_) => {
                timed_out = true;
                0
            }
            _ => 0,
        };
        weight += weighs;
        let call = Call {
            outcome,
            elapsed: started.elapsed(),
            weight: weighs,
        };
        calls.push((index, entry.fields, call));
    }
    (calls, deferred)
}

/// One handler call's outcome, how long it took, and what its commands weigh
/// ([`output::weight`], 0 for anything but commands).
pub(super) struct Call {
    outcome: HandlerOutcome,
    elapsed: std::time::Duration,
    weight: usize,
}
