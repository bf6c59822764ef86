//! The plugin author's toolkit: `kaleidoscope plugin check` and `kaleidoscope plugin exec`.
//!
//! Both load a component exactly as the host does (same engine, same sandbox, same validation),
//! so "it passes `check`" means "the host will load it", and `exec` shows precisely the commands
//! the host would receive — without touching Redis or the database.

use crate::config::Config;
use crate::persist::schema::Catalog;
use crate::persist::validate;
pub use crate::plugin::readable::{command_json, value_json};
use crate::plugin::{Plugin, wit};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value as Json, json};
use std::path::Path;

/// Loads `file` the way the host would, through the same compiled cache (`from_cache` in
/// `plugin check` says whether it compiled), so checking or running an unchanged build again
/// takes milliseconds, not the seconds a Python component takes to compile.
pub fn load(config: &Config, file: &Path) -> Result<Plugin> {
    config
        .plugin_runtime(Some(&config.cache_dir))?
        .load(file, &|name| config.sandbox_limits(name))
}

/// What `plugin check` prints about a loadable plugin.
pub fn describe(config: &Config, plugin: &Plugin) -> Json {
    let policy = config.policy(&plugin.name);
    json!({
        "file": plugin.file.display().to_string(),
        "name": plugin.name,
        "version": plugin.version,
        "contract": plugin.contract(),
        "streams": plugin.streams,
        "size_bytes": plugin.size,
        "sha256": plugin.sha256,
        "compile_ms": (plugin.load_time.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
        "from_cache": plugin.from_cache,
        "imports": plugin.imports,
        "limits": {
            "timeout_ms": plugin.limits().call_timeout.as_millis() as u64,
            "memory_mib": plugin.limits().memory_bytes >> 20,
        },
        "grants": {
            "tables": policy.tables,
            "update_columns": policy.update_columns,
            "emit": policy.emit,
        },
        "warnings": check_warnings(plugin, &policy),
    })
}

/// What would load but not work: a plugin with no grant at all can write nothing, so every
/// entry that produces a command would be dead-lettered.
fn check_warnings(plugin: &Plugin, policy: &crate::config::PluginPolicy) -> Vec<String> {
    let mut warnings = Vec::new();
    if policy.tables.is_empty() && policy.update_columns.is_empty() && policy.emit.is_empty() {
        warnings.push(format!(
            "plugin `{}` has no grants: every command it returns would be dead-lettered as forbidden-command; grant it tables with `tables = [...]` (or `update_columns`, `emit`) in a [plugins.{}] section of the configuration file",
            plugin.name, plugin.name
        ));
    }
    warnings
}

/// The entry `plugin exec` hands the plugin.
pub struct ExecEntry<'a> {
    /// The stream it comes from (default: the plugin's first stream).
    pub stream: Option<&'a str>,
    pub id: &'a str,
    pub deliveries: u32,
    pub fields: Vec<(String, String)>,
}

/// Runs `handle` on `entry` and describes the outcome. With a `catalog` (a live schema), the
/// commands are validated exactly as the host would (grants, tables, columns, types, keys);
/// without one, only the grants are looked at. Returns the JSON and whether the host would
/// persist the entry.
pub fn exec(
    config: &Config,
    plugin: &Plugin,
    entry: ExecEntry<'_>,
    catalog: Option<&Catalog>,
) -> Result<(Json, bool)> {
    let ExecEntry {
        stream,
        id,
        deliveries,
        fields,
    } = entry;
    let source = match stream {
        Some(stream) if plugin.streams.iter().any(|s| s == stream) => stream.to_string(),
        Some(stream) => bail!(
            "plugin {} does not handle stream {stream:?} (its streams: {:?})",
            plugin.name,
            plugin.streams
        ),
        None => plugin.streams[0].clone(),
    };
    let entry = wit::Entry {
        source,
        id: id.to_string(),
        fields,
        deliveries,
    };
    let policy = config.policy(&plugin.name);
    let outcome = plugin.handle(&entry, &policy.settings);
    let (described, ok) = match crate::delivery::outcome::commands_of(
        outcome,
        plugin.limits().memory_bytes,
    ) {
        Ok(commands) => {
            let described: Vec<Json> = commands.iter().map(command_json).collect();
            match catalog {
                Some(catalog) => match validate::validate(&plugin.name, &policy, commands, catalog)
                {
                    Ok(_) => (
                        json!({"outcome": "commands", "commands": described, "checked_against_database": true}),
                        true,
                    ),
                    Err(rejection) => (
                        json!({"outcome": "forbidden-command", "reason": rejection.message, "commands": described, "host_would": "dead-letter at once as forbidden-command"}),
                        false,
                    ),
                },
                None => {
                    let warnings = grant_warnings(plugin, &policy, &commands);
                    let mut out = json!({"outcome": "commands", "commands": described, "checked_against_database": false});
                    if !warnings.is_empty() {
                        out["warnings"] = json!(warnings);
                    }
                    (out, true)
                }
            }
        }
        Err(failure) => {
            let host_would = if failure.retryable {
                format!(
                    "retry after the reclaim idle time, up to ML_RETRY_ATTEMPTS deliveries, then dead-letter as {}",
                    failure.kind
                )
            } else {
                format!("dead-letter at once as {}", failure.kind)
            };
            (
                json!({"outcome": failure.kind.as_str(), "reason": failure.reason, "host_would": host_would}),
                false,
            )
        }
    };
    Ok((described, ok))
}

/// What the host would refuse for want of a grant (the full check against the schema needs a
/// database; the host does it on every entry).
fn grant_warnings(
    plugin: &Plugin,
    policy: &crate::config::PluginPolicy,
    commands: &[wit::Command],
) -> Vec<String> {
    let mut warnings = Vec::new();
    for command in commands {
        match command {
            wit::Command::Upsert(wit::Upsert { table, .. })
            | wit::Command::Update(wit::Update { table, .. })
            | wit::Command::Insert(wit::Insert { table, .. })
            | wit::Command::Delete(wit::Delete { table, .. }) => {
                if !policy.grants_table(table) {
                    warnings.push(format!("table `{table}` is not granted to plugin `{}`: the host would dead-letter this entry as forbidden-command", plugin.name));
                }
            }
            wit::Command::Emit(emit) => {
                if !policy.emit.contains(&emit.target) {
                    warnings.push(format!("stream `{}` is not granted to plugin `{}` for emit: the host would dead-letter this entry as forbidden-command", emit.target, plugin.name));
                }
            }
        }
    }
    warnings
}

/// How one recorded entry of `plugin test` compares with what is expected of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// As expected.
    Ok,
    /// Not as expected: the test fails.
    Differs,
    /// Nothing is expected of it yet (run with `--update`): the test fails.
    New,
    /// `--update` wrote what it does now as what is expected.
    Updated,
}

impl Verdict {
    /// Whether the case makes `plugin test` fail.
    pub fn fails(self) -> bool {
        matches!(self, Verdict::Differs | Verdict::New)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Verdict::Ok => "ok",
            Verdict::Differs => "differs",
            Verdict::New => "new",
            Verdict::Updated => "updated",
        })
    }
}

/// One recorded entry of `plugin test` and how it came out.
#[derive(Debug, Serialize)]
pub struct CaseResult {
    /// `file:line` of the recorded entry.
    pub case: String,
    pub verdict: Verdict,
    /// What `plugin exec` reports for the entry now.
    pub actual: Json,
    /// What the expected file says (absent for `new`).
    pub expected: Option<Json>,
}

/// `plugin test`: runs every recorded entry in `dir` (`*.jsonl`, one JSON object per line:
/// `{"fields": {"name": "value", …}, "stream": …, "id": …, "deliveries": …}`, all but `fields`
/// optional) and compares what the plugin does with it — the same report as `plugin exec` —
/// with the line of the same number in `<name>.expected.jsonl`. With `update`, the expected files
/// are (re)written from what the plugin does now: golden tests for a handler.
pub fn test_dir(
    config: &Config,
    plugin: &Plugin,
    dir: &Path,
    update: bool,
    catalog: Option<&Catalog>,
) -> Result<Vec<CaseResult>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the test directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "jsonl")
                && !path.to_string_lossy().ends_with(".expected.jsonl")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no recorded entries (*.jsonl) in {}", dir.display());
    }
    let mut results = Vec::new();
    for file in files {
        let expected_file = file.with_extension("expected.jsonl");
        let expected: Vec<Json> = match std::fs::read_to_string(&expected_file) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .with_context(|| format!("{} is not JSON lines", expected_file.display()))?,
            Err(_) => Vec::new(),
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let mut actuals = Vec::new();
        for (index, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let case = format!("{}:{}", file.display(), index + 1);
            let recorded = recorded_entry(line).with_context(|| case.clone())?;
            let entry = ExecEntry {
                stream: recorded.stream.as_deref(),
                id: recorded.id.as_deref().unwrap_or("0-1"),
                deliveries: recorded.deliveries.unwrap_or(1),
                fields: recorded.fields,
            };
            let (mut actual, _) =
                exec(config, plugin, entry, catalog).with_context(|| case.clone())?;
            // Whether this run had a database says nothing about the plugin: not part of the
            // recorded outcome, so one expected file serves runs with and without `--database`.
            if let Some(report) = actual.as_object_mut() {
                report.remove("checked_against_database");
            }
            let expected = expected.get(actuals.len()).cloned();
            let verdict = match (&expected, update) {
                (_, true) => Verdict::Updated,
                (None, false) => Verdict::New,
                (Some(expected), false) if *expected == actual => Verdict::Ok,
                (Some(_), false) => Verdict::Differs,
            };
            actuals.push(actual.clone());
            results.push(CaseResult {
                case,
                verdict,
                actual,
                expected,
            });
        }
        if update {
            let lines: Vec<String> = actuals.iter().map(Json::to_string).collect();
            std::fs::write(&expected_file, lines.join("\n") + "\n")
                .with_context(|| format!("cannot write {}", expected_file.display()))?;
        }
    }
    Ok(results)
}

/// One line of a recorded-entries file.
struct Recorded {
    stream: Option<String>,
    id: Option<String>,
    deliveries: Option<u32>,
    fields: Vec<(String, String)>,
}

fn recorded_entry(line: &str) -> Result<Recorded> {
    let value: Json = serde_json::from_str(line).context("not a JSON object")?;
    let fields = value
        .get("fields")
        .and_then(Json::as_object)
        .context("no `fields` object")?
        .iter()
        .map(|(name, value)| {
            let text = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            (name.clone(), text)
        })
        .collect();
    let text = |key: &str| value.get(key).and_then(Json::as_str).map(str::to_string);
    Ok(Recorded {
        stream: text("stream"),
        id: text("id"),
        deliveries: value
            .get("deliveries")
            .and_then(Json::as_u64)
            .and_then(|d| u32::try_from(d).ok()),
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_difference_or_a_missing_expectation_fails_a_plugin_test() {
        assert!(Verdict::Differs.fails() && Verdict::New.fails());
        assert!(!Verdict::Ok.fails() && !Verdict::Updated.fails());
        assert_eq!(format!("{:<8}|", Verdict::New), "new     |");
    }
}
