//! What the operator allows each plugin: the tables it may write, the columns it may update, the
//! streams it may emit to, and its sandbox limits where they differ from the defaults. Read from
//! the `[plugins.<name>]` sections of `config/default-plugins.toml` (the shipped plugins'
//! grants) and of the operator's configuration file; enforced by `persist::validate`.

use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// Tables that only the host writes (its ledger, outbox and migration record); no plugin command
/// may name them, and no grant may include them.
pub const HOST_TABLES: &[&str] = &[
    "processed_entries",
    "ledger_horizons",
    "ledger_sources",
    "replay_secrets",
    "outbox",
    "_sqlx_migrations",
    "operator_migrations",
    "plugin_store",
    "rollouts",
    "rollout_tallies",
    "rollout_differences",
    "reprocess_runs",
];

/// What the operator allows one plugin, and its sandbox limits if they differ from the defaults.
/// A plugin without a policy may write nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginPolicy {
    /// Tables the plugin may write (upsert, update, insert, delete).
    pub tables: BTreeSet<String>,
    /// Tables the plugin may only `update`, and the columns it may set there. How a result
    /// plugin marks the request it answers without being able to forge requests (a row it could
    /// insert in `ml_requests` would be published by the request tracker).
    pub update_columns: BTreeMap<String, BTreeSet<String>>,
    /// Streams the plugin may `emit` to (logical names).
    pub emit: BTreeSet<String>,
    /// Deadline of one call, overriding `plugin_timeout_ms`.
    pub timeout: Option<Duration>,
    /// Memory cap in bytes, overriding `plugin_memory_mib` (at most
    /// [`super::MAX_PLUGIN_MEMORY_MIB`]).
    pub memory_bytes: Option<usize>,
    /// The operator's settings for the plugin (`[plugins.<name>.settings]`), read by the handler
    /// through the contract's `config` import: how one build serves producers that differ (e.g.
    /// the face box's layout) without a rebuild.
    pub settings: crate::plugin::Settings,
}

impl PluginPolicy {
    /// Whether the plugin may write `table` at all (fully, or by updating granted columns).
    pub fn grants_table(&self, table: &str) -> bool {
        self.tables.contains(table) || self.update_columns.contains_key(table)
    }

    /// Whether the plugin may `update` `column` of `table`: every column of a fully granted
    /// table, only the listed columns of an update-only grant.
    pub fn grants_update(&self, table: &str, column: &str) -> bool {
        self.tables.contains(table)
            || self
                .update_columns
                .get(table)
                .is_some_and(|columns| columns.contains(column))
    }
}

/// Reads the `[plugins.<name>]` sections of `table` (from `path`, named in errors) into
/// `policies`. Each key given replaces that key of the plugin's current policy, so an operator can
/// change one limit and keep the shipped grants.
pub(crate) fn read_plugins_table(
    policies: &mut BTreeMap<String, PluginPolicy>,
    table: &toml::Table,
    path: &Path,
) -> Result<()> {
    let Some(plugins) = table.get("plugins") else {
        return Ok(());
    };
    let plugins = plugins.as_table().with_context(|| {
        format!(
            "`plugins` in {} must be a table of [plugins.<name>] sections",
            path.display()
        )
    })?;
    for (name, section) in plugins {
        let section = section
            .as_table()
            .with_context(|| format!("`plugins.{name}` in {} must be a table", path.display()))?;
        let policy = policies.entry(name.clone()).or_default();
        for (key, value) in section {
            let at = format!("`plugins.{name}.{key}` in {}", path.display());
            read_key(policy, key, value, &at)?;
        }
    }
    Ok(())
}

/// Sets one key of a plugin's policy; `at` names the key and file for errors.
fn read_key(policy: &mut PluginPolicy, key: &str, value: &toml::Value, at: &str) -> Result<()> {
    let positive = || -> Result<u64> {
        value
            .as_integer()
            .and_then(|i| u64::try_from(i).ok())
            .filter(|i| *i > 0)
            .with_context(|| format!("{at}: expected a positive integer"))
    };
    match key {
        "tables" => {
            let tables =
                string_set(value).with_context(|| format!("{at}: expected a list of strings"))?;
            if let Some(host) = tables.iter().find(|t| HOST_TABLES.contains(&t.as_str())) {
                bail!("{at}: table `{host}` belongs to the host and cannot be granted");
            }
            policy.tables = tables;
        }
        "update_columns" => policy.update_columns = update_columns(value, at)?,
        "emit" => {
            policy.emit =
                string_set(value).with_context(|| format!("{at}: expected a list of strings"))?
        }
        "timeout_ms" => policy.timeout = Some(Duration::from_millis(positive()?)),
        "settings" => {
            let table = value
                .as_table()
                .with_context(|| format!("{at}: expected a table of `key = value`"))?;
            let settings = std::sync::Arc::make_mut(&mut policy.settings);
            for (key, value) in table {
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(_)
                    | toml::Value::Float(_)
                    | toml::Value::Boolean(_)
                    | toml::Value::Datetime(_) => value.to_string(),
                    toml::Value::Array(_) | toml::Value::Table(_) => bail!(
                        "{at}.{key}: a setting is one string, number or boolean (a plugin reads it as text)"
                    ),
                };
                settings.insert(key.clone(), text);
            }
        }
        "memory_mib" => {
            let max = super::MAX_PLUGIN_MEMORY_MIB;
            let mib = usize::try_from(positive()?)
                .ok()
                .filter(|m| *m <= max)
                .and_then(|m| m.checked_mul(1 << 20))
                .with_context(|| {
                    format!(
                        "{at}: at most {max} (a 32-bit WebAssembly memory cannot grow past 4 GiB)"
                    )
                })?;
            policy.memory_bytes = Some(mib);
        }
        _ => {
            bail!(
                "unknown key {at} (known: tables, update_columns, emit, timeout_ms, memory_mib, settings)"
            )
        }
    }
    Ok(())
}

/// `update_columns = { table = ["column", …], … }`: no host table, no empty column list.
fn update_columns(value: &toml::Value, at: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let grants = value
        .as_table()
        .with_context(|| format!("{at}: expected a table of `table = [columns]`"))?;
    let mut update_columns = BTreeMap::new();
    for (table, columns) in grants {
        if HOST_TABLES.contains(&table.as_str()) {
            bail!("{at}: table `{table}` belongs to the host and cannot be granted");
        }
        let columns = string_set(columns)
            .filter(|columns| !columns.is_empty())
            .with_context(|| format!("{at}.{table}: expected a non-empty list of column names"))?;
        update_columns.insert(table.clone(), columns);
    }
    Ok(update_columns)
}

/// A TOML list of strings as a set; `None` if it is anything else.
fn string_set(value: &toml::Value) -> Option<BTreeSet<String>> {
    value.as_array().and_then(|items| {
        items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<BTreeMap<String, PluginPolicy>> {
        let mut policies = BTreeMap::new();
        read_plugins_table(
            &mut policies,
            &text.parse().expect("test TOML"),
            Path::new("test.toml"),
        )?;
        Ok(policies)
    }

    #[test]
    fn grants_resolve_to_tables_update_columns_and_emits() {
        let policies = read(
            r#"
            [plugins.p]
            tables = ["a"]
            update_columns = { b = ["x", "y"] }
            emit = ["s"]
            timeout_ms = 500
            memory_mib = 2
            "#,
        )
        .expect("valid");
        let p = &policies["p"];
        assert!(p.grants_table("a") && p.grants_table("b") && !p.grants_table("c"));
        assert!(p.grants_update("a", "anything"));
        assert!(p.grants_update("b", "x") && !p.grants_update("b", "z"));
        assert!(p.emit.contains("s"));
        assert_eq!(p.timeout, Some(Duration::from_millis(500)));
        assert_eq!(p.memory_bytes, Some(2 << 20));
    }

    #[test]
    fn settings_are_text_and_merge_key_by_key() {
        let mut policies =
            read("[plugins.p.settings]\nbbox = \"xywh\"\nscale = 2\nstrict = true").expect("valid");
        read_plugins_table(
            &mut policies,
            &"[plugins.p.settings]\nscale = 0.5"
                .parse()
                .expect("test TOML"),
            Path::new("second.toml"),
        )
        .expect("valid");
        let settings = &policies["p"].settings;
        assert_eq!(settings.get("bbox").map(String::as_str), Some("xywh"));
        assert_eq!(settings.get("scale").map(String::as_str), Some("0.5"));
        assert_eq!(settings.get("strict").map(String::as_str), Some("true"));
        let error = read("[plugins.p.settings]\nlist = [1]").expect_err("a list");
        assert!(error.to_string().contains("plugins.p.settings"), "{error}");
    }

    #[test]
    fn a_later_section_replaces_only_the_keys_it_gives() {
        let mut policies = read("[plugins.p]\ntables = [\"a\"]\nemit = [\"s\"]").expect("valid");
        read_plugins_table(
            &mut policies,
            &"[plugins.p]\ntables = [\"b\"]".parse().expect("test TOML"),
            Path::new("second.toml"),
        )
        .expect("valid");
        let p = &policies["p"];
        assert_eq!(p.tables, BTreeSet::from(["b".to_string()]));
        assert_eq!(p.emit, BTreeSet::from(["s".to_string()]));
    }

    #[test]
    fn bad_grants_are_refused_naming_key_and_file() {
        for (text, expected) in [
            (
                "[plugins.p]\ntables = [\"processed_entries\"]",
                "belongs to the host",
            ),
            (
                "[plugins.p]\nupdate_columns = { outbox = [\"x\"] }",
                "belongs to the host",
            ),
            ("[plugins.p]\nupdate_columns = { t = [] }", "non-empty list"),
            ("[plugins.p]\ntables = \"a\"", "list of strings"),
            ("[plugins.p]\ntimeout_ms = 0", "positive integer"),
            ("[plugins.p]\nmemory_mib = 100000", "at most 4096"),
            ("[plugins.p]\ncolour = 1", "unknown key"),
            ("plugins = 1", "must be a table"),
        ] {
            let error = read(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(error.contains("test.toml"), "{text}: {error}");
        }
    }
}
