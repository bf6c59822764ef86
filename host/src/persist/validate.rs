//! Checks a plugin's commands against the live schema before anything runs.
//!
//! A command passes when the operator granted the plugin its table (or, for `emit`, its target
//! stream), the table exists and is not one of the host's own tables, every column
//! exists and is writable, every value fits its column's type, an upsert's key matches a unique
//! key, and an emit names a valid stream. Anything else rejects the whole entry with a reason that
//! names the plugin, the command, the table and the column — the entry is then dead-lettered as
//! `forbidden-command` instead of failing somewhere inside PostgreSQL.

use super::schema::HOST_TABLES;
use super::schema::{Catalog, Column, ColumnKind, Table};
use crate::config::PluginPolicy;
use crate::plugin::wit;
use std::collections::BTreeSet;

/// The most commands one entry may produce.
pub const MAX_COMMANDS_PER_ENTRY: usize = 100_000;

/// A column with a value checked against its type.
#[derive(Clone, Debug)]
pub struct Param {
    pub column: String,
    /// The column's SQL type, used to cast the bound parameter.
    pub sql_type: String,
    pub value: wit::Value,
}

/// What a `set` clause does to one column.
#[derive(Clone, Debug)]
pub enum SetOp {
    Assign(wit::Value),
    AppendUnique(Vec<String>),
}

/// One checked column of a `set` clause.
#[derive(Clone, Debug)]
pub struct SetParam {
    pub column: String,
    pub sql_type: String,
    pub op: SetOp,
}

/// One condition of a guarded update: the column's current value equals (or differs from) the
/// parameter's value; NULL compares as a value (`IS [NOT] DISTINCT FROM`).
#[derive(Clone, Debug)]
pub struct Condition {
    pub param: Param,
    pub equals: bool,
}

/// A command that passed every check; safe to turn into SQL.
#[derive(Clone, Debug)]
pub enum Statement {
    Upsert {
        table: String,
        key: Vec<Param>,
        set: Vec<SetParam>,
    },
    Update {
        table: String,
        key: Vec<Param>,
        set: Vec<SetParam>,
        if_missing: wit::IfMissing,
        /// The guard: the update applies to a matched row only if all of these hold.
        only_if: Vec<Condition>,
    },
    Insert {
        table: String,
        values: Vec<Param>,
        ignore_conflict: bool,
    },
    Delete {
        table: String,
        key: Vec<Param>,
    },
    Emit {
        target: String,
        fields: Vec<(String, String)>,
    },
}

/// Whether every table and column the commands name is in the catalogue (a cheap look-up, to
/// decide whether the catalogue should be read again before [`validate`]).
pub fn all_known(commands: &[wit::Command], catalog: &Catalog) -> bool {
    let known = |table: &str, columns: &mut dyn Iterator<Item = &str>| {
        let Some(table) = catalog.table(table) else {
            return false;
        };
        for column in columns {
            if !table.columns.contains_key(column) {
                return false;
            }
        }
        true
    };
    commands.iter().all(|command| match command {
        wit::Command::Upsert(u) => known(
            &u.table,
            &mut u
                .key
                .iter()
                .map(|c| c.column.as_str())
                .chain(u.set.iter().map(|c| c.column.as_str())),
        ),
        wit::Command::Update(u) => known(
            &u.table,
            &mut u
                .key
                .iter()
                .map(|c| c.column.as_str())
                .chain(u.set.iter().map(|c| c.column.as_str())),
        ),
        wit::Command::Insert(i) => known(&i.table, &mut i.values.iter().map(|c| c.column.as_str())),
        wit::Command::Delete(d) => known(&d.table, &mut d.key.iter().map(|c| c.column.as_str())),
        wit::Command::Emit(_) => true,
    })
}

/// Checks every command of one entry; the first rejection wins.
pub fn validate(
    plugin: &str,
    policy: &PluginPolicy,
    commands: Vec<wit::Command>,
    catalog: &Catalog,
) -> Result<Vec<Statement>, String> {
    if commands.len() > MAX_COMMANDS_PER_ENTRY {
        return Err(format!(
            "plugin `{plugin}` returned {} commands for one entry (limit {MAX_COMMANDS_PER_ENTRY})",
            commands.len()
        ));
    }
    commands
        .into_iter()
        .enumerate()
        .map(|(index, command)| {
            let checker = Checker {
                plugin,
                policy,
                index,
                catalog,
            };
            checker.command(command)
        })
        .collect()
}

struct Checker<'a> {
    plugin: &'a str,
    policy: &'a PluginPolicy,
    index: usize,
    catalog: &'a Catalog,
}

impl Checker<'_> {
    fn fail(&self, what: &str, table: &str, problem: impl std::fmt::Display) -> String {
        format!(
            "plugin `{}` command {} ({what} on table `{table}`): {problem}",
            self.plugin, self.index
        )
    }

    fn command(&self, command: wit::Command) -> Result<Statement, String> {
        match command {
            wit::Command::Upsert(upsert) => {
                let table = self.table("upsert", &upsert.table)?;
                let key = self.key("upsert", table, upsert.key)?;
                let key_columns: BTreeSet<String> = key.iter().map(|p| p.column.clone()).collect();
                if !table.unique_keys.contains(&key_columns) {
                    return Err(self.fail(
                        "upsert",
                        &table.name,
                        format!(
                            "key columns {key_columns:?} are not a primary key or unique constraint (unique keys: {:?})",
                            table.unique_keys
                        ),
                    ));
                }
                let set = self.set("upsert", table, upsert.set, &key_columns)?;
                Ok(Statement::Upsert {
                    table: table.name.clone(),
                    key,
                    set,
                })
            }
            wit::Command::Update(update) => {
                let table = self.table("update", &update.table)?;
                let key = self.key("update", table, update.key)?;
                // An update may change a column it selects on (`SET status = 'FAILED' WHERE
                // status = 'PENDING'`); only an upsert's conflict key must stay out of `set`.
                let set = self.set("update", table, update.set, &BTreeSet::new())?;
                if set.is_empty() {
                    return Err(self.fail("update", &table.name, "`set` is empty"));
                }
                if !self.policy.tables.contains(&table.name)
                    && let Some(granted) = self.policy.update_columns.get(&table.name)
                    && let Some(column) = set.iter().find(|s| !granted.contains(&s.column))
                {
                    return Err(self.fail(
                        "update",
                        &table.name,
                        format_args!(
                            "column `{}` is not granted (granted: {granted:?}, `update_columns` in [plugins.{}])",
                            column.column, self.plugin
                        ),
                    ));
                }
                let mut only_if = Vec::with_capacity(update.only_if.len());
                for condition in update.only_if {
                    let (value, equals) = match condition {
                        wit::Condition::Equals(value) => (value, true),
                        wit::Condition::Differs(value) => (value, false),
                    };
                    let column = self.column("update", table, &value.column)?;
                    self.fits("update", table, column, &value.value)?;
                    only_if.push(Condition {
                        param: Param {
                            column: column.name.clone(),
                            sql_type: column.sql_type.clone(),
                            value: value.value,
                        },
                        equals,
                    });
                }
                Ok(Statement::Update {
                    table: table.name.clone(),
                    key,
                    set,
                    if_missing: update.if_missing,
                    only_if,
                })
            }
            wit::Command::Insert(insert) => {
                let table = self.table("insert", &insert.table)?;
                let values = self.params("insert", table, insert.values)?;
                Ok(Statement::Insert {
                    table: table.name.clone(),
                    values,
                    ignore_conflict: matches!(insert.on_conflict, wit::OnConflict::Ignore),
                })
            }
            wit::Command::Delete(delete) => {
                let table = self.table("delete", &delete.table)?;
                let key = self.key("delete", table, delete.key)?;
                Ok(Statement::Delete {
                    table: table.name.clone(),
                    key,
                })
            }
            wit::Command::Emit(emit) => {
                let valid = !emit.target.is_empty()
                    && emit.target.len() <= 256
                    && emit
                        .target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
                if !valid {
                    return Err(format!(
                        "plugin `{}` command {} (emit): invalid target stream {:?}",
                        self.plugin, self.index, emit.target
                    ));
                }
                if !self.policy.emit.contains(&emit.target) {
                    return Err(format!(
                        "plugin `{}` command {} (emit): plugin is not granted stream `{}` (grant it with `emit` in [plugins.{}])",
                        self.plugin, self.index, emit.target, self.plugin
                    ));
                }
                if emit.fields.is_empty() {
                    return Err(format!(
                        "plugin `{}` command {} (emit to `{}`): a stream entry needs at least one field",
                        self.plugin, self.index, emit.target
                    ));
                }
                Ok(Statement::Emit {
                    target: emit.target,
                    fields: emit.fields,
                })
            }
        }
    }

    fn table(&self, what: &str, name: &str) -> Result<&Table, String> {
        if HOST_TABLES.contains(&name) {
            return Err(self.fail(
                what,
                name,
                "the table belongs to the host and cannot be written by plugins",
            ));
        }
        if !self.policy.tables.contains(name) {
            if let Some(columns) = self.policy.update_columns.get(name) {
                if what != "update" {
                    return Err(self.fail(
                        what,
                        name,
                        format_args!(
                            "plugin may only update this table, and only columns {columns:?} (`update_columns` in [plugins.{}])",
                            self.plugin
                        ),
                    ));
                }
            } else {
                return Err(self.fail(
                    what,
                    name,
                    format_args!(
                        "plugin is not granted this table (grant it with `tables` in [plugins.{}])",
                        self.plugin
                    ),
                ));
            }
        }
        self.catalog
            .table(name)
            .ok_or_else(|| self.fail(what, name, "the table does not exist"))
    }

    fn column<'t>(&self, what: &str, table: &'t Table, name: &str) -> Result<&'t Column, String> {
        let column = table.columns.get(name).ok_or_else(|| {
            self.fail(what, &table.name, format!("column `{name}` does not exist"))
        })?;
        if column.generated {
            return Err(self.fail(
                what,
                &table.name,
                format!("column `{name}` is generated and cannot be written"),
            ));
        }
        Ok(column)
    }

    fn params(
        &self,
        what: &str,
        table: &Table,
        values: Vec<wit::ColumnValue>,
    ) -> Result<Vec<Param>, String> {
        let mut seen = BTreeSet::new();
        values
            .into_iter()
            .map(|cv| {
                if !seen.insert(cv.column.clone()) {
                    return Err(self.fail(
                        what,
                        &table.name,
                        format!("column `{}` appears twice", cv.column),
                    ));
                }
                let column = self.column(what, table, &cv.column)?;
                self.fits(what, table, column, &cv.value)?;
                Ok(Param {
                    column: column.name.clone(),
                    sql_type: column.sql_type.clone(),
                    value: cv.value,
                })
            })
            .collect()
    }

    fn key(
        &self,
        what: &str,
        table: &Table,
        key: Vec<wit::ColumnValue>,
    ) -> Result<Vec<Param>, String> {
        if key.is_empty() {
            return Err(self.fail(what, &table.name, "the key is empty"));
        }
        let params = self.params(what, table, key)?;
        if let Some(null) = params.iter().find(|p| matches!(p.value, wit::Value::Null)) {
            return Err(self.fail(
                what,
                &table.name,
                format!("key column `{}` is null", null.column),
            ));
        }
        Ok(params)
    }

    fn set(
        &self,
        what: &str,
        table: &Table,
        set: Vec<wit::ColumnSet>,
        key_columns: &BTreeSet<String>,
    ) -> Result<Vec<SetParam>, String> {
        let mut seen = BTreeSet::new();
        set.into_iter()
            .map(|cs| {
                if key_columns.contains(&cs.column) {
                    return Err(self.fail(
                        what,
                        &table.name,
                        format!("column `{}` is both in the key and in `set`", cs.column),
                    ));
                }
                if !seen.insert(cs.column.clone()) {
                    return Err(self.fail(
                        what,
                        &table.name,
                        format!("column `{}` appears twice in `set`", cs.column),
                    ));
                }
                let column = self.column(what, table, &cs.column)?;
                let op = match cs.op {
                    wit::ColumnOp::Assign(value) => {
                        self.fits(what, table, column, &value)?;
                        SetOp::Assign(value)
                    }
                    wit::ColumnOp::AppendUnique(items) => {
                        if column.kind != ColumnKind::TextArray {
                            return Err(self.fail(
                                what,
                                &table.name,
                                format!(
                                    "append-unique needs a text[] column, but `{}` is {}",
                                    column.name, column.sql_type
                                ),
                            ));
                        }
                        if let Some(item) = items.iter().find(|s| s.contains('\0')) {
                            return Err(self.fail(
                                what,
                                &table.name,
                                format!(
                                    "column `{}`: {item:?} contains a NUL character",
                                    column.name
                                ),
                            ));
                        }
                        SetOp::AppendUnique(items)
                    }
                };
                Ok(SetParam {
                    column: column.name.clone(),
                    sql_type: column.sql_type.clone(),
                    op,
                })
            })
            .collect()
    }

    fn fits(
        &self,
        what: &str,
        table: &Table,
        column: &Column,
        value: &wit::Value,
    ) -> Result<(), String> {
        use wit::Value as V;
        let mismatch = |detail: String| {
            Err(self.fail(
                what,
                &table.name,
                format!("column `{}` ({}): {detail}", column.name, column.sql_type),
            ))
        };
        let has_nul = |s: &str| s.contains('\0');
        match (value, column.kind) {
            (V::Null, _) if column.nullable => Ok(()),
            (V::Null, _) => mismatch("null value for a NOT NULL column".into()),
            (V::Boolean(_), ColumnKind::Boolean) => Ok(()),
            (V::Integer(i), ColumnKind::Integer { min, max }) => {
                if (min..=max).contains(i) {
                    Ok(())
                } else {
                    mismatch(format!("integer {i} is out of range {min}..={max}"))
                }
            }
            (V::Integer(_), ColumnKind::Float) => Ok(()),
            (V::Float(f), ColumnKind::Float) => {
                if f.is_finite() {
                    Ok(())
                } else {
                    mismatch(format!("{f} is not a finite number"))
                }
            }
            (V::Text(s), ColumnKind::Text { max_chars }) => {
                if has_nul(s) {
                    return mismatch("text contains a NUL character".into());
                }
                match max_chars {
                    Some(max) if s.chars().count() > max => mismatch(format!(
                        "text of {} characters is longer than {max}",
                        s.chars().count()
                    )),
                    _ => Ok(()),
                }
            }
            (V::Text(s), ColumnKind::Other) if !has_nul(s) => Ok(()),
            (V::Json(s), ColumnKind::Json) => match serde_json::from_str::<serde_json::Value>(s) {
                Ok(_) if s.contains("\\u0000") => mismatch("JSON contains a NUL character".into()),
                Ok(_) => Ok(()),
                Err(e) => mismatch(format!("not valid JSON: {e}")),
            },
            (V::TextArray(items), ColumnKind::TextArray) => {
                if items.iter().any(|s| has_nul(s)) {
                    mismatch("an item contains a NUL character".into())
                } else {
                    Ok(())
                }
            }
            (V::FloatArray(items), ColumnKind::FloatArray) => {
                match items.iter().position(|f| !f.is_finite()) {
                    Some(index) => mismatch(format!("item {index} is not a finite number")),
                    None => Ok(()),
                }
            }
            (V::Timestamp(s), ColumnKind::Timestamp) => {
                if s.trim().is_empty() || has_nul(s) {
                    mismatch(format!("{s:?} is not a timestamp"))
                } else {
                    Ok(())
                }
            }
            (value, _) => mismatch(format!("a {} value does not fit", value_kind(value))),
        }
    }
}

fn value_kind(value: &wit::Value) -> &'static str {
    match value {
        wit::Value::Null => "null",
        wit::Value::Boolean(_) => "boolean",
        wit::Value::Integer(_) => "integer",
        wit::Value::Float(_) => "float",
        wit::Value::Text(_) => "text",
        wit::Value::Json(_) => "json",
        wit::Value::TextArray(_) => "text-array",
        wit::Value::FloatArray(_) => "float-array",
        wit::Value::Timestamp(_) => "timestamp",
    }
}
