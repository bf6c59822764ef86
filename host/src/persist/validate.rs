//! Checks a plugin's commands against the live schema before anything runs.
//!
//! A command passes when the operator granted the plugin its table (or, for `emit`, its target
//! stream), the table exists and is not one of the host's own tables, every column
//! exists and is writable, every value fits its column's type, an upsert's key matches a unique
//! key, and an emit names a valid stream. Anything else rejects the whole entry with a reason that
//! names the plugin, the command, the table and the column — the entry is then dead-lettered as
//! `forbidden-command` instead of failing somewhere inside PostgreSQL.

use super::schema::{Catalog, Column, ColumnKind, Table};
use crate::config::HOST_TABLES;
use crate::config::PluginPolicy;
use crate::plugin::wit;
use std::collections::BTreeSet;

/// The most commands one entry may produce.
pub const MAX_COMMANDS_PER_ENTRY: usize = 100_000;

/// The kind of a table command, as a rejection names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Upsert,
    Update,
    Insert,
    Delete,
}

impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CommandKind::Upsert => "upsert",
            CommandKind::Update => "update",
            CommandKind::Insert => "insert",
            CommandKind::Delete => "delete",
        })
    }
}

/// Why a command was refused: the rule it broke, for callers and tests that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// More than [`MAX_COMMANDS_PER_ENTRY`] commands for one entry.
    TooManyCommands,
    /// The table belongs to the host (ledger, outbox, migrations).
    HostTable,
    /// The plugin has no grant for the table.
    TableNotGranted,
    /// The plugin may only `update` the table (an `update_columns` grant).
    UpdateOnly,
    /// An `update` sets a column its `update_columns` grant does not list.
    ColumnNotGranted,
    /// The table is not in the live schema.
    UnknownTable,
    /// The column is not in the live schema.
    UnknownColumn,
    /// The column is generated and cannot be written.
    GeneratedColumn,
    /// A column appears twice among the values, the key or `set`.
    DuplicateColumn,
    /// The key is empty.
    EmptyKey,
    /// A key column is null.
    NullKey,
    /// An upsert's key is not a primary key or unique constraint.
    NotAUniqueKey,
    /// An upsert sets a column of its own key.
    KeyInSet,
    /// An `update` sets nothing.
    EmptySet,
    /// A value does not fit its column (type, range, NUL, length, JSON).
    TypeMismatch,
    /// An `emit` to an invalid or ungranted stream, or without fields.
    Emit,
}

/// A refused command: the rule it broke and a message naming plugin, command, table and column
/// (stored as the dead letter's reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub rule: Rule,
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}

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
    /// The column becomes the value.
    Assign(wit::Value),
    /// The items are appended to a `text[]` column, each only if not already there (how
    /// results from several services accumulate in one row without overwriting each other).
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
    /// Insert the row, or update `set` on the row with the same unique `key`.
    Upsert {
        table: String,
        key: Vec<Param>,
        set: Vec<SetParam>,
    },
    /// Update `set` on the row with `key`; `if_missing` says what a missing row means.
    Update {
        table: String,
        key: Vec<Param>,
        set: Vec<SetParam>,
        if_missing: wit::IfMissing,
        /// The guard: the update applies to a matched row only if all of these hold.
        only_if: Vec<Condition>,
    },
    /// Insert a row; `ignore_conflict` makes a duplicate a no-op.
    Insert {
        table: String,
        values: Vec<Param>,
        ignore_conflict: bool,
    },
    /// Delete the row with `key`.
    Delete { table: String, key: Vec<Param> },
    /// Publish `fields` to the `target` stream after the transaction commits (via the outbox).
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
) -> Result<Vec<Statement>, Rejection> {
    if commands.len() > MAX_COMMANDS_PER_ENTRY {
        return Err(Rejection {
            rule: Rule::TooManyCommands,
            message: format!(
                "plugin `{plugin}` returned {} commands for one entry (limit {MAX_COMMANDS_PER_ENTRY})",
                commands.len()
            ),
        });
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
    fn fail(
        &self,
        rule: Rule,
        what: CommandKind,
        table: &str,
        problem: impl std::fmt::Display,
    ) -> Rejection {
        Rejection {
            rule,
            message: format!(
                "plugin `{}` command {} ({what} on table `{table}`): {problem}",
                self.plugin, self.index
            ),
        }
    }

    /// A rejection of an `emit` command (which has a target stream, not a table).
    fn fail_emit(&self, target: &str, problem: impl std::fmt::Display) -> Rejection {
        Rejection {
            rule: Rule::Emit,
            message: format!(
                "plugin `{}` command {} (emit to `{}`): {problem}",
                self.plugin,
                self.index,
                target.escape_debug()
            ),
        }
    }

    fn command(&self, command: wit::Command) -> Result<Statement, Rejection> {
        match command {
            wit::Command::Upsert(upsert) => self.upsert(upsert),
            wit::Command::Update(update) => self.update(update),
            wit::Command::Insert(insert) => {
                let table = self.table(CommandKind::Insert, &insert.table)?;
                let values = self.params(CommandKind::Insert, table, insert.values)?;
                Ok(Statement::Insert {
                    table: table.name.clone(),
                    values,
                    ignore_conflict: matches!(insert.on_conflict, wit::OnConflict::Ignore),
                })
            }
            wit::Command::Delete(delete) => {
                let table = self.table(CommandKind::Delete, &delete.table)?;
                let key = self.key(CommandKind::Delete, table, delete.key)?;
                Ok(Statement::Delete {
                    table: table.name.clone(),
                    key,
                })
            }
            wit::Command::Emit(emit) => self.emit(emit),
        }
    }

    /// An upsert's key must be a unique key of its table, and stay out of `set`.
    fn upsert(&self, upsert: wit::Upsert) -> Result<Statement, Rejection> {
        let table = self.table(CommandKind::Upsert, &upsert.table)?;
        let key = self.key(CommandKind::Upsert, table, upsert.key)?;
        let key_columns: BTreeSet<String> = key.iter().map(|p| p.column.clone()).collect();
        if !table.unique_keys.contains(&key_columns) {
            return Err(self.fail(Rule::NotAUniqueKey,
                CommandKind::Upsert,
                &table.name,
                format!(
                    "key columns {key_columns:?} are not a primary key or unique constraint (unique keys: {:?})",
                    table.unique_keys
                ),
            ));
        }
        let set = self.set(CommandKind::Upsert, table, upsert.set, &key_columns)?;
        Ok(Statement::Upsert {
            table: table.name.clone(),
            key,
            set,
        })
    }

    /// An update sets something, only granted columns under an `update_columns` grant, and its
    /// guard compares columns that exist with values that fit them.
    fn update(&self, update: wit::Update) -> Result<Statement, Rejection> {
        let table = self.table(CommandKind::Update, &update.table)?;
        let key = self.key(CommandKind::Update, table, update.key)?;
        // An update may change a column it selects on (`SET status = 'FAILED' WHERE
        // status = 'PENDING'`); only an upsert's conflict key must stay out of `set`.
        let set = self.set(CommandKind::Update, table, update.set, &BTreeSet::new())?;
        if set.is_empty() {
            return Err(self.fail(
                Rule::EmptySet,
                CommandKind::Update,
                &table.name,
                "`set` is empty",
            ));
        }
        if !self.policy.tables.contains(&table.name)
            && let Some(granted) = self.policy.update_columns.get(&table.name)
            && let Some(column) = set.iter().find(|s| !granted.contains(&s.column))
        {
            return Err(self.fail(Rule::ColumnNotGranted,
                CommandKind::Update,
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
            let column = self.column(CommandKind::Update, table, &value.column)?;
            self.fits(CommandKind::Update, table, column, &value.value)?;
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

    /// An emit goes to a well-formed, granted stream and carries at least one field.
    fn emit(&self, emit: wit::Emit) -> Result<Statement, Rejection> {
        let valid = !emit.target.is_empty()
            && emit.target.len() <= 256
            && emit
                .target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !valid {
            return Err(self.fail_emit(&emit.target, "invalid target stream name"));
        }
        if !self.policy.emit.contains(&emit.target) {
            return Err(self.fail_emit(
                &emit.target,
                format_args!(
                    "plugin is not granted this stream (grant it with `emit` in [plugins.{}])",
                    self.plugin
                ),
            ));
        }
        if emit.fields.is_empty() {
            return Err(self.fail_emit(&emit.target, "a stream entry needs at least one field"));
        }
        Ok(Statement::Emit {
            target: emit.target,
            fields: emit.fields,
        })
    }

    fn table(&self, what: CommandKind, name: &str) -> Result<&Table, Rejection> {
        if HOST_TABLES.contains(&name) {
            return Err(self.fail(
                Rule::HostTable,
                what,
                name,
                "the table belongs to the host and cannot be written by plugins",
            ));
        }
        if !self.policy.tables.contains(name) {
            if let Some(columns) = self.policy.update_columns.get(name) {
                if what != CommandKind::Update {
                    return Err(self.fail(Rule::UpdateOnly,
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
                    Rule::TableNotGranted,
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
            .ok_or_else(|| self.fail(Rule::UnknownTable, what, name, "the table does not exist"))
    }

    fn column<'t>(
        &self,
        what: CommandKind,
        table: &'t Table,
        name: &str,
    ) -> Result<&'t Column, Rejection> {
        let column = table.columns.get(name).ok_or_else(|| {
            self.fail(
                Rule::UnknownColumn,
                what,
                &table.name,
                format!("column `{name}` does not exist"),
            )
        })?;
        if column.generated {
            return Err(self.fail(
                Rule::GeneratedColumn,
                what,
                &table.name,
                format!("column `{name}` is generated and cannot be written"),
            ));
        }
        Ok(column)
    }

    fn params(
        &self,
        what: CommandKind,
        table: &Table,
        values: Vec<wit::ColumnValue>,
    ) -> Result<Vec<Param>, Rejection> {
        let mut seen = BTreeSet::new();
        values
            .into_iter()
            .map(|cv| {
                if !seen.insert(cv.column.clone()) {
                    return Err(self.fail(
                        Rule::DuplicateColumn,
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
        what: CommandKind,
        table: &Table,
        key: Vec<wit::ColumnValue>,
    ) -> Result<Vec<Param>, Rejection> {
        if key.is_empty() {
            return Err(self.fail(Rule::EmptyKey, what, &table.name, "the key is empty"));
        }
        let params = self.params(what, table, key)?;
        if let Some(null) = params.iter().find(|p| matches!(p.value, wit::Value::Null)) {
            return Err(self.fail(
                Rule::NullKey,
                what,
                &table.name,
                format!("key column `{}` is null", null.column),
            ));
        }
        Ok(params)
    }

    fn set(
        &self,
        what: CommandKind,
        table: &Table,
        set: Vec<wit::ColumnSet>,
        key_columns: &BTreeSet<String>,
    ) -> Result<Vec<SetParam>, Rejection> {
        // Where a column first appears a second time: found without a set of names, so the
        // column names the plugin sent move into the parameters instead of being copied.
        let first_repeat =
            (0..set.len()).find(|&i| set[..i].iter().any(|e| e.column == set[i].column));
        set.into_iter()
            .enumerate()
            .map(|(i, cs)| {
                if key_columns.contains(&cs.column) {
                    return Err(self.fail(
                        Rule::KeyInSet,
                        what,
                        &table.name,
                        format!("column `{}` is both in the key and in `set`", cs.column),
                    ));
                }
                if first_repeat == Some(i) {
                    return Err(self.fail(
                        Rule::DuplicateColumn,
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
                                Rule::TypeMismatch,
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
                                Rule::TypeMismatch,
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
                // The catalogue is keyed by name: the plugin's name is the column's.
                Ok(SetParam {
                    sql_type: column.sql_type.clone(),
                    column: cs.column,
                    op,
                })
            })
            .collect()
    }

    fn fits(
        &self,
        what: CommandKind,
        table: &Table,
        column: &Column,
        value: &wit::Value,
    ) -> Result<(), Rejection> {
        use wit::Value as V;
        let mismatch = |detail: String| {
            Err(self.fail(
                Rule::TypeMismatch,
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
            (V::Now, ColumnKind::Timestamp) => Ok(()),
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
        wit::Value::Now => "now",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use wit::{ColumnOp, ColumnSet, ColumnValue, Command, Value as V};

    fn column(name: &str, sql_type: &str, kind: ColumnKind, nullable: bool) -> Column {
        Column {
            name: name.into(),
            sql_type: sql_type.into(),
            kind,
            nullable,
            generated: false,
            default: None,
            implicit_default: false,
        }
    }

    /// `media(id bigint primary key, caption varchar(5), score float8, tags text[],
    /// embedding float8[], data jsonb, at timestamptz, flag bool, small int2, other uuid,
    /// total generated)`, `requests(id bigint primary key, status text, payload text)`, and the
    /// host's `outbox`.
    fn catalog() -> Catalog {
        let int8 = ColumnKind::Integer {
            min: i64::MIN,
            max: i64::MAX,
        };
        let mut media = vec![
            column("id", "bigint", int8, false),
            column(
                "caption",
                "character varying(5)",
                ColumnKind::Text { max_chars: Some(5) },
                true,
            ),
            column("score", "double precision", ColumnKind::Float, true),
            column("tags", "text[]", ColumnKind::TextArray, true),
            column(
                "embedding",
                "double precision[]",
                ColumnKind::FloatArray,
                true,
            ),
            column("data", "jsonb", ColumnKind::Json, true),
            column(
                "at",
                "timestamp with time zone",
                ColumnKind::Timestamp,
                true,
            ),
            column("flag", "boolean", ColumnKind::Boolean, false),
            column(
                "small",
                "smallint",
                ColumnKind::Integer {
                    min: i16::MIN.into(),
                    max: i16::MAX.into(),
                },
                true,
            ),
            column("other", "uuid", ColumnKind::Other, true),
        ];
        let mut total = column("total", "bigint", int8, true);
        total.generated = true;
        media.push(total);
        let table = |name: &str, columns: Vec<Column>| Table {
            name: name.into(),
            columns: columns
                .into_iter()
                .map(|c| (c.name.clone(), c))
                .collect::<HashMap<_, _>>(),
            unique_keys: vec![BTreeSet::from(["id".to_string()])],
            trigger_columns: BTreeSet::new(),
        };
        Catalog::from_tables(vec![
            table("media", media),
            table(
                "requests",
                vec![
                    column("id", "bigint", int8, false),
                    column("status", "text", ColumnKind::Text { max_chars: None }, true),
                    column(
                        "payload",
                        "text",
                        ColumnKind::Text { max_chars: None },
                        true,
                    ),
                ],
            ),
            table("outbox", vec![column("id", "bigint", int8, false)]),
        ])
    }

    fn policy() -> PluginPolicy {
        PluginPolicy {
            tables: BTreeSet::from(["media".to_string(), "outbox".to_string()]),
            update_columns: BTreeMap::from([(
                "requests".to_string(),
                BTreeSet::from(["status".to_string()]),
            )]),
            emit: BTreeSet::from(["out".to_string()]),
            ..Default::default()
        }
    }

    fn cv(column: &str, value: V) -> ColumnValue {
        ColumnValue {
            column: column.into(),
            value,
        }
    }

    fn assign(column: &str, value: V) -> ColumnSet {
        ColumnSet {
            column: column.into(),
            op: ColumnOp::Assign(value),
        }
    }

    fn upsert(table: &str, key: Vec<ColumnValue>, set: Vec<ColumnSet>) -> Command {
        Command::Upsert(wit::Upsert {
            table: table.into(),
            key,
            set,
        })
    }

    fn update(table: &str, set: Vec<ColumnSet>) -> Command {
        Command::Update(wit::Update {
            table: table.into(),
            key: vec![cv("id", V::Integer(1))],
            set,
            if_missing: wit::IfMissing::Skip,
            only_if: Vec::new(),
        })
    }

    fn emit(target: &str, fields: &[(&str, &str)]) -> Command {
        Command::Emit(wit::Emit {
            target: target.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// The value `value` set into media's `column` by an upsert of row 1.
    fn set_media(column: &str, value: V) -> Command {
        upsert(
            "media",
            vec![cv("id", V::Integer(1))],
            vec![assign(column, value)],
        )
    }

    fn check(commands: Vec<Command>) -> Result<Vec<Statement>, Rejection> {
        validate("p", &policy(), commands, &catalog())
    }

    fn rejected(command: Command) -> Rejection {
        match check(vec![command]) {
            Ok(statements) => panic!("accepted: {statements:?}"),
            Err(rejection) => rejection,
        }
    }

    #[test]
    fn every_value_that_fits_its_column_is_accepted() {
        for (column, value) in [
            ("caption", V::Text("12345".into())),
            ("caption", V::Null),
            ("score", V::Float(0.5)),
            ("score", V::Integer(3)),
            ("tags", V::TextArray(vec!["a".into()])),
            ("embedding", V::FloatArray(vec![0.1, 0.2])),
            ("data", V::Json(r#"{"a": 1}"#.into())),
            ("at", V::Timestamp("2026-11-26T00:00:00Z".into())),
            ("flag", V::Boolean(true)),
            ("small", V::Integer(i16::MAX.into())),
            (
                "other",
                V::Text("0b0c7c4e-0000-4000-8000-000000000000".into()),
            ),
        ] {
            check(vec![set_media(column, value.clone())])
                .unwrap_or_else(|r| panic!("{column} = {value:?}: {r}"));
        }
        let append = upsert(
            "media",
            vec![cv("id", V::Integer(1))],
            vec![ColumnSet {
                column: "tags".into(),
                op: ColumnOp::AppendUnique(vec!["x".into()]),
            }],
        );
        let statements = check(vec![
            append,
            update("requests", vec![assign("status", V::Text("DONE".into()))]),
            emit("out", &[("a", "b")]),
        ])
        .expect("valid commands");
        assert_eq!(statements.len(), 3);
    }

    #[test]
    fn every_value_that_does_not_fit_its_column_is_a_type_mismatch_naming_the_column() {
        for (column, value, detail) in [
            ("caption", V::Text("123456".into()), "longer than 5"),
            ("caption", V::Text("a\0b".into()), "NUL"),
            ("caption", V::Integer(1), "integer value does not fit"),
            ("flag", V::Null, "NOT NULL"),
            ("flag", V::Text("yes".into()), "text value does not fit"),
            ("small", V::Integer(40_000), "out of range"),
            ("small", V::Float(1.0), "float value does not fit"),
            ("score", V::Float(f64::NAN), "not a finite number"),
            ("score", V::Text("1".into()), "text value does not fit"),
            ("data", V::Json("{".into()), "not valid JSON"),
            ("data", V::Json(r#""\u0000""#.into()), "NUL"),
            ("data", V::Text("{}".into()), "text value does not fit"),
            ("tags", V::TextArray(vec!["a\0".into()]), "NUL"),
            (
                "tags",
                V::FloatArray(vec![1.0]),
                "float-array value does not fit",
            ),
            (
                "embedding",
                V::FloatArray(vec![1.0, f64::INFINITY]),
                "item 1",
            ),
            (
                "embedding",
                V::TextArray(vec![]),
                "text-array value does not fit",
            ),
            ("at", V::Timestamp(" ".into()), "not a timestamp"),
            (
                "at",
                V::Text("2026-01-01".into()),
                "text value does not fit",
            ),
            ("other", V::Text("a\0".into()), "text value does not fit"),
        ] {
            let rejection = rejected(set_media(column, value.clone()));
            assert_eq!(rejection.rule, Rule::TypeMismatch, "{column} = {value:?}");
            assert!(
                rejection.message.contains(&format!("column `{column}`"))
                    && rejection.message.contains(detail)
                    && rejection
                        .message
                        .contains("plugin `p` command 0 (upsert on table `media`)"),
                "{column} = {value:?}: {rejection}"
            );
        }
    }

    #[test]
    fn each_rule_of_tables_keys_and_columns_rejects_with_its_own_kind() {
        let id = || vec![cv("id", V::Integer(1))];
        let mut generated = set_media("total", V::Integer(1));
        if let Command::Upsert(u) = &mut generated {
            u.set[0].column = "total".into();
        }
        for (command, kind, words) in [
            (
                set_media("nope", V::Null),
                Rule::UnknownColumn,
                "column `nope` does not exist",
            ),
            (generated, Rule::GeneratedColumn, "generated"),
            (
                upsert("ghost", id(), vec![]),
                Rule::TableNotGranted,
                "not granted",
            ),
            (
                upsert("outbox", id(), vec![]),
                Rule::HostTable,
                "belongs to the host",
            ),
            (
                upsert("requests", id(), vec![assign("status", V::Null)]),
                Rule::UpdateOnly,
                "may only update",
            ),
            (
                update("requests", vec![assign("payload", V::Null)]),
                Rule::ColumnNotGranted,
                "column `payload` is not granted",
            ),
            (
                upsert("media", vec![], vec![]),
                Rule::EmptyKey,
                "key is empty",
            ),
            (
                upsert("media", vec![cv("score", V::Null)], vec![]),
                Rule::NullKey,
                "key column `score` is null",
            ),
            (
                upsert("media", vec![cv("score", V::Float(1.0))], vec![]),
                Rule::NotAUniqueKey,
                "not a primary key",
            ),
            (
                upsert("media", id(), vec![assign("id", V::Integer(2))]),
                Rule::KeyInSet,
                "both in the key and in `set`",
            ),
            (
                upsert(
                    "media",
                    id(),
                    vec![assign("score", V::Null), assign("score", V::Null)],
                ),
                Rule::DuplicateColumn,
                "appears twice in `set`",
            ),
            (
                Command::Insert(wit::Insert {
                    table: "media".into(),
                    values: vec![cv("id", V::Integer(1)), cv("id", V::Integer(2))],
                    on_conflict: wit::OnConflict::Error,
                }),
                Rule::DuplicateColumn,
                "appears twice",
            ),
            (update("media", vec![]), Rule::EmptySet, "`set` is empty"),
            (
                upsert(
                    "media",
                    id(),
                    vec![ColumnSet {
                        column: "caption".into(),
                        op: ColumnOp::AppendUnique(vec!["x".into()]),
                    }],
                ),
                Rule::TypeMismatch,
                "append-unique needs a text[] column",
            ),
            (
                emit("bad name", &[("a", "b")]),
                Rule::Emit,
                "invalid target",
            ),
            (emit("elsewhere", &[("a", "b")]), Rule::Emit, "not granted"),
            (emit("out", &[]), Rule::Emit, "at least one field"),
        ] {
            let rejection = rejected(command);
            assert_eq!(rejection.rule, kind, "{rejection}");
            assert!(rejection.message.contains(words), "{kind:?}: {rejection}");
        }
        let unknown = validate(
            "p",
            &PluginPolicy {
                tables: BTreeSet::from(["ghost".to_string()]),
                ..Default::default()
            },
            vec![upsert("ghost", id(), vec![])],
            &catalog(),
        )
        .expect_err("unknown table");
        assert_eq!(unknown.rule, Rule::UnknownTable);
    }

    #[test]
    fn the_first_rejected_command_is_named_by_its_index_and_too_many_commands_are_refused() {
        let rejection = match check(vec![
            set_media("score", V::Null),
            set_media("nope", V::Null),
        ]) {
            Err(rejection) => rejection,
            Ok(_) => panic!("accepted"),
        };
        assert!(rejection.message.contains("command 1"), "{rejection}");
        let many = vec![emit("out", &[("a", "b")]); MAX_COMMANDS_PER_ENTRY + 1];
        assert_eq!(
            check(many).expect_err("too many").rule,
            Rule::TooManyCommands
        );
    }
}
