//! Runs a [`Plan`] as set-based SQL: one statement per stage and column shape, the rows passed
//! as arrays and spread out with `unnest`.
//!
//! Every value is still a bound parameter: each column travels as one array whose element type
//! is spelled out in the SQL (`$2::float8[]`), and is cast to the column's type in the statement,
//! so statements prepared for one set of value types are never reused for another. Array values
//! (a `text[]` or `real[]` column) travel as their text form, because PostgreSQL has no arrays of
//! arrays of different lengths.

use super::execute::{self, dedup, ident, union};
use super::merged_upsert;
use super::plan::{InsertRow, KeyedRow, Plan, Stage};
use super::schema::{Catalog, Links, Table};
use super::validate::{Param, SetOp, SetParam};
use crate::failure::StatementError;
use crate::plugin::wit;
use sqlx::postgres::PgArguments;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, query::Query};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// Why a plan did not run to the end. The transaction must be rolled back in every case.
#[derive(Debug)]
pub enum PlanFailure {
    /// `update`s with `if-missing = retry` or `fail` found no row: these entries (batch positions)
    /// must be decided on their own, with the error each would have had.
    Missing(Vec<(usize, StatementError)>),
    /// A statement failed; which entry is to blame is not known.
    Statement(StatementError),
}

impl From<StatementError> for PlanFailure {
    fn from(error: StatementError) -> Self {
        PlanFailure::Statement(error)
    }
}

/// How a batch locks a table it writes (see [`lock_tables`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableLock {
    /// The batch writes the table with one statement, its rows in key order: batches doing the
    /// same can run side by side, as their row locks are taken in one global order.
    Shared,
    /// The batch writes the table with several statements (several column shapes or stages),
    /// or entry by entry: it must have the table to itself.
    Exclusive,
}

/// The lock each table of `plan` needs: shared where the plan writes it with one statement and
/// the stages run in table-name order (so row locks are taken in one global order: table, then
/// key), exclusive otherwise. Beyond the tables written: a delete (or a key change) takes every
/// table its referential actions reach exclusively, and every table written is joined by the
/// tables it references, shared (its foreign-key checks lock their rows, in its own key order,
/// which must not meet a delete of those rows).
pub fn table_locks<'p>(plan: &'p Plan<'_>, catalog: &'p Catalog) -> BTreeMap<&'p str, TableLock> {
    let links = catalog.links();
    let mut statements: BTreeMap<&str, usize> = BTreeMap::new();
    let mut reached = Vec::new();
    for stage in &plan.stages {
        let count = match stage {
            Stage::Upsert { table, rows, .. } => {
                upsert_statements(catalog.table(table), rows).0.len()
            }
            Stage::Update { rows, .. } => by_shape(rows).len(),
            Stage::Delete { .. } | Stage::Insert { .. } | Stage::Single { .. } => 1,
        };
        *statements.entry(stage.table()).or_default() += count;
        let changes_keys = match stage {
            Stage::Delete { .. } | Stage::Single { .. } => true,
            Stage::Update { changed_key, .. } => !changed_key.is_empty(),
            Stage::Upsert { .. } | Stage::Insert { .. } => false,
        };
        if changes_keys {
            reached.extend(links.reach(stage.table()));
        }
    }
    let mut locks: BTreeMap<&str, TableLock> = statements
        .iter()
        .map(|(&table, &count)| {
            let lock = if count == 1 && plan.in_table_order {
                TableLock::Shared
            } else {
                TableLock::Exclusive
            };
            (table, lock)
        })
        .collect();
    add_linked_locks(&mut locks, statements.into_keys(), reached, links);
    locks
}

/// The locks of the entry-by-entry pass, which writes `tables` in no particular row order: each
/// exclusively, with what its deletes may reach (exclusive) and the tables it references
/// (shared), as in [`table_locks`].
pub fn entry_by_entry_locks<'a>(
    tables: impl IntoIterator<Item = &'a str>,
    links: &'a Links,
) -> BTreeMap<&'a str, TableLock> {
    let mut locks: BTreeMap<&str, TableLock> = tables
        .into_iter()
        .map(|table| (table, TableLock::Exclusive))
        .collect();
    let written: Vec<&str> = locks.keys().copied().collect();
    let reached = written.iter().flat_map(|t| links.reach(t)).collect();
    add_linked_locks(&mut locks, written, reached, links);
    locks
}

/// Adds `reached` (exclusive) and the parents of `written` (shared, unless taken already).
fn add_linked_locks<'a>(
    locks: &mut BTreeMap<&'a str, TableLock>,
    written: impl IntoIterator<Item = &'a str>,
    reached: Vec<&'a str>,
    links: &'a Links,
) {
    for table in reached {
        locks.insert(table, TableLock::Exclusive);
    }
    for table in written {
        for parent in links.parents(table) {
            locks.entry(parent).or_insert(TableLock::Shared);
        }
    }
}

/// Takes the host's transaction-scoped advisory lock on each table, in name order.
///
/// Within one statement a batch locks rows in key order, so two batches that each write a table
/// with one statement never wait on each other in a cycle. A batch that needs several statements
/// for a table (one per column shape) could hold a row another batch needs while waiting for
/// one that batch holds — which PostgreSQL resolves only after `deadlock_timeout`, by failing
/// one of them. Such a batch takes the table's lock exclusively; single-statement batches share
/// it. Reading and handling the next batch never waits for these locks.
pub async fn lock_tables(
    conn: &mut PgConnection,
    locks: &BTreeMap<&str, TableLock>,
) -> Result<(), StatementError> {
    if locks.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = locks.keys().copied().collect();
    let exclusive: Vec<bool> = locks
        .values()
        .map(|lock| *lock == TableLock::Exclusive)
        .collect();
    sqlx::query(
        "SELECT count(CASE WHEN t.exclusive
                          THEN pg_advisory_xact_lock(hashtextextended('kaleidoscope.table.' || t.name, 0))
                          ELSE pg_advisory_xact_lock_shared(hashtextextended('kaleidoscope.table.' || t.name, 0))
                      END)
           FROM unnest($1::text[], $2::bool[]) AS t(name, exclusive)",
    )
    .bind(names)
    .bind(exclusive)
    .execute(conn)
    .await
    .map(drop)
    .map_err(execute::statement_failed)
}

/// Runs every stage of `plan`, in order, inside the caller's transaction.
pub async fn run(
    conn: &mut PgConnection,
    plan: &Plan<'_>,
    catalog: &Catalog,
) -> Result<(), PlanFailure> {
    for stage in &plan.stages {
        match stage {
            Stage::Upsert {
                table,
                key_columns,
                rows,
            } => {
                let (groups, merged) = upsert_statements(catalog.table(table), rows);
                for group in groups {
                    let (sql, arrays) = match merged {
                        Some(table) => merged_upsert::upsert_sql(table, key_columns, &group),
                        None => upsert_sql(table, key_columns, &group),
                    };
                    run_sql(conn, sql, arrays).await?;
                }
            }
            Stage::Update {
                table,
                key_columns,
                if_missing,
                rows,
                ..
            } => {
                let mut missing = Vec::new();
                let want_rows = !matches!(if_missing, wit::IfMissing::Skip);
                for group in by_shape(rows) {
                    let (sql, arrays) = update_sql(table, key_columns, &group, want_rows);
                    if !want_rows {
                        run_sql(conn, sql, arrays).await?;
                        continue;
                    }
                    let found: BTreeSet<i64> = fetch_positions(conn, sql, arrays).await?;
                    for (position, row) in group.iter().enumerate() {
                        if found.contains(&(position as i64 + 1)) {
                            continue;
                        }
                        let which = execute::describe_key(table, row.key);
                        for &entry in &row.entries {
                            missing.push((
                                entry,
                                match if_missing {
                                    wit::IfMissing::Fail => {
                                        StatementError::Permanent(format!("no row in {which}"))
                                    }
                                    _ => StatementError::Retry(format!("no row in {which} yet")),
                                },
                            ));
                        }
                    }
                }
                if !missing.is_empty() {
                    return Err(PlanFailure::Missing(missing));
                }
            }
            Stage::Delete {
                table,
                key_columns,
                rows,
            } => {
                let refs: Vec<&KeyedRow<'_>> = rows.iter().collect();
                let (sql, arrays) = delete_sql(table, key_columns, &refs);
                run_sql(conn, sql, arrays).await?;
            }
            Stage::Insert {
                table,
                columns,
                ignore_conflict,
                rows,
            } => {
                let (sql, arrays) = insert_sql(table, columns, *ignore_conflict, rows);
                run_sql(conn, sql, arrays).await?;
            }
            Stage::Single { statement, .. } => execute::execute(conn, statement).await?,
        }
    }
    Ok(())
}

/// The statements of an upsert stage, each with its rows: one when its rows set the same columns
/// the same way, or when one statement can write them all (then with the table it needs,
/// [`merged_upsert`]); else one per column shape.
fn upsert_statements<'r, 's, 'c>(
    table: Option<&'c Table>,
    rows: &'r [KeyedRow<'s>],
) -> (Vec<Vec<&'r KeyedRow<'s>>>, Option<&'c Table>) {
    let groups = by_shape(rows);
    if groups.len() > 1 {
        let all: Vec<&KeyedRow<'s>> = rows.iter().collect();
        if merged_upsert::possible(table, &all) {
            return (vec![all], table);
        }
    }
    (groups, None)
}

/// The rows of a stage grouped by which columns they set and how (each group is one statement),
/// in a fixed order of shapes, rows keeping their (key) order within a group.
fn by_shape<'r, 's>(rows: &'r [KeyedRow<'s>]) -> Vec<Vec<&'r KeyedRow<'s>>> {
    let mut groups: BTreeMap<Vec<(String, bool)>, Vec<&KeyedRow<'s>>> = BTreeMap::new();
    for row in rows {
        let mut shape: Vec<(String, bool)> = row
            .set
            .iter()
            .map(|s| (s.column.clone(), matches!(s.op, SetOp::AppendUnique(_))))
            .collect();
        shape.sort();
        groups.entry(shape).or_default().push(row);
    }
    groups.into_values().collect()
}

/// One column's values across the rows of a statement, as one array of a single element type.
pub(super) enum Array {
    Bool(Vec<Option<bool>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
    /// The float arrays of every row, one after the other (see [`Columns::add`]).
    Flat(Vec<f64>),
}

impl Array {
    /// The narrowest array that carries all `values` exactly: a native one when they are all of
    /// one scalar kind, else their text forms (which PostgreSQL casts to the column's type).
    fn of(values: &[&wit::Value]) -> Array {
        use wit::Value as V;
        // Only NULLs: text, which PostgreSQL casts to any column type (a `bool[]` of NULLs
        // cannot become `real[]`, and the whole set-based statement would fail).
        if values.iter().all(|v| matches!(v, V::Null)) {
            return Array::Text(vec![None; values.len()]);
        }
        if let Some(v) = all_of(values, |v| match v {
            V::Boolean(b) => Some(*b),
            _ => None,
        }) {
            return Array::Bool(v);
        }
        if let Some(v) = all_of(values, |v| match v {
            V::Integer(i) => Some(*i),
            _ => None,
        }) {
            return Array::Int(v);
        }
        if let Some(v) = all_of(values, |v| match v {
            V::Float(f) => Some(*f),
            _ => None,
        }) {
            return Array::Float(v);
        }
        Array::Text(values.iter().map(|v| text_form(v)).collect())
    }

    fn sql_type(&self) -> &'static str {
        match self {
            Array::Bool(_) => "bool[]",
            Array::Int(_) => "int8[]",
            Array::Float(_) | Array::Flat(_) => "float8[]",
            Array::Text(_) => "text[]",
        }
    }
}

/// The values as one native array when `pick` takes every one that is not NULL.
fn all_of<T>(
    values: &[&wit::Value],
    pick: impl Fn(&wit::Value) -> Option<T>,
) -> Option<Vec<Option<T>>> {
    values
        .iter()
        .map(|v| match v {
            wit::Value::Null => Some(None),
            other => pick(other).map(Some),
        })
        .collect()
}

/// A value as PostgreSQL's text input for it (`None` for NULL).
fn text_form(value: &wit::Value) -> Option<String> {
    use wit::Value as V;
    Some(match value {
        V::Null => return None,
        V::Boolean(b) => b.to_string(),
        V::Integer(i) => i.to_string(),
        // The shortest text that reads back as the same f64 (validation let only finite ones
        // through).
        V::Float(f) => ryu::Buffer::new().format_finite(*f).to_string(),
        V::Text(s) | V::Json(s) | V::Timestamp(s) => s.clone(),
        // PostgreSQL reads the text `now` as the transaction's start time (`now()`).
        V::Now => "now".to_string(),
        V::TextArray(items) => array_literal(items.iter().map(|s| s.as_str())),
        // Embeddings: 1408 numbers each, so written straight into one string (numbers need no
        // quoting in an array literal).
        V::FloatArray(items) => {
            let mut out = String::with_capacity(items.len() * 12 + 2);
            let mut buffer = ryu::Buffer::new();
            out.push('{');
            for (i, f) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(buffer.format_finite(*f));
            }
            out.push('}');
            out
        }
    })
}

/// `{"a","b \"c\""}`: every element quoted, so no element is read as NULL or split.
fn array_literal<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// The arrays of a statement: those `unnest(...) AS u(c0, c1, ...)` spreads into rows, and
/// before them (`$1`, `$2`, ...) the float arrays of a column, every row's end to end.
#[derive(Default)]
pub(super) struct Columns {
    flat: Vec<Vec<f64>>,
    arrays: Vec<Array>,
    /// Arrays read on their own (`$n`), not spread by the `unnest`; numbered after its arrays.
    loose: Vec<Array>,
}

impl Columns {
    /// Adds a column; returns the expression that reads it, cast to `sql_type`.
    ///
    /// Float arrays (embeddings: 1408 numbers each) for a `real[]` or `double precision[]`
    /// column travel in binary: every row's numbers in one `float8[]` parameter, and each row
    /// its first and last position, so PostgreSQL slices them out instead of parsing a text
    /// literal per row (and the host writes no text). The cast to the column's type is
    /// PostgreSQL's own, out-of-range `real`s included.
    pub(super) fn add(&mut self, values: &[&wit::Value], sql_type: &str) -> String {
        debug_assert!(self.loose.is_empty(), "a column added after a loose array");
        if matches!(sql_type, "real[]" | "double precision[]")
            && let Some((flat, first, last)) = float_slices(values)
        {
            self.flat.push(flat);
            let param = self.flat.len();
            self.arrays.push(Array::Int(first));
            self.arrays.push(Array::Int(last));
            let last = self.arrays.len() - 1;
            let first = last - 1;
            return format!(
                "CAST((${param}::float8[])[u.c{first}::int4:u.c{last}::int4] AS {sql_type})"
            );
        }
        let array = Array::of(values);
        self.arrays.push(array);
        format!("CAST(u.c{} AS {sql_type})", self.arrays.len() - 1)
    }

    /// Adds an array read on its own; returns its placeholder (`$7::int8[]`). Its number
    /// follows the `unnest`'s arrays, so every column is added before the first loose array.
    pub(super) fn loose(&mut self, values: &[&wit::Value]) -> String {
        let array = Array::of(values);
        let placeholder = format!(
            "${}::{}",
            self.flat.len() + self.arrays.len() + self.loose.len() + 1,
            array.sql_type()
        );
        self.loose.push(array);
        placeholder
    }

    pub(super) fn unnest(&self, ordinality: bool) -> String {
        let before = self.flat.len();
        let params = self
            .arrays
            .iter()
            .enumerate()
            .map(|(i, a)| format!("${}::{}", before + i + 1, a.sql_type()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut names: Vec<String> = (0..self.arrays.len()).map(|i| format!("c{i}")).collect();
        if ordinality {
            names.push("n".into());
            format!(
                "unnest({params}) WITH ORDINALITY AS u({})",
                names.join(", ")
            )
        } else {
            format!("unnest({params}) AS u({})", names.join(", "))
        }
    }

    /// The arrays to bind, in the order of their placeholders.
    pub(super) fn into_params(self) -> Vec<Array> {
        self.flat
            .into_iter()
            .map(Array::Flat)
            .chain(self.arrays)
            .chain(self.loose)
            .collect()
    }
}

/// When every value is a float array or NULL: their numbers end to end, and each row's first
/// and last (1-based) position in them (NULL for NULL; an empty array is `[k:k-1]`, which
/// PostgreSQL slices to `{}`).
type FloatSlices = (Vec<f64>, Vec<Option<i64>>, Vec<Option<i64>>);

fn float_slices(values: &[&wit::Value]) -> Option<FloatSlices> {
    let mut flat = Vec::new();
    let mut first = Vec::with_capacity(values.len());
    let mut last = Vec::with_capacity(values.len());
    for value in values {
        match value {
            wit::Value::FloatArray(items) => {
                first.push(Some(flat.len() as i64 + 1));
                flat.extend_from_slice(items);
                last.push(Some(flat.len() as i64));
            }
            wit::Value::Null => {
                first.push(None);
                last.push(None);
            }
            _ => return None,
        }
    }
    Some((flat, first, last))
}

/// What a `set` column contributes to one row: the assigned value (borrowed: an embedding is
/// copied once, into its column's array, not twice), or the items to append.
pub(super) fn set_value(set: &SetParam) -> Cow<'_, wit::Value> {
    match &set.op {
        SetOp::Assign(value) => Cow::Borrowed(value),
        SetOp::AppendUnique(items) => Cow::Owned(wit::Value::TextArray(dedup(items))),
    }
}

/// Adds the key columns of `rows` and returns them with their read expressions.
pub(super) fn key_columns_of(
    columns: &mut Columns,
    key_columns: &[String],
    rows: &[&KeyedRow<'_>],
) -> Vec<(String, String)> {
    key_columns
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let values: Vec<&wit::Value> = rows.iter().map(|r| &r.key[i].value).collect();
            let sql_type = &rows[0].key[i].sql_type;
            (name.clone(), columns.add(&values, sql_type))
        })
        .collect()
}

/// The set columns of a group (all rows share their shape), with their read expressions.
fn set_columns_of<'r>(
    columns: &mut Columns,
    rows: &[&'r KeyedRow<'_>],
) -> Vec<(&'r SetParam, String)> {
    let first = rows[0];
    let mut sets: Vec<&SetParam> = first.set.iter().collect();
    sets.sort_by(|a, b| a.column.cmp(&b.column));
    sets.into_iter()
        .map(|set| {
            let values: Vec<Cow<'_, wit::Value>> = rows
                .iter()
                .map(|row| {
                    row.set
                        .iter()
                        .find(|s| s.column == set.column)
                        .map_or(Cow::Owned(wit::Value::Null), set_value)
                })
                .collect();
            let refs: Vec<&wit::Value> = values.iter().map(|v| v.as_ref()).collect();
            let read = columns.add(&refs, &set.sql_type);
            (set, read)
        })
        .collect()
}

fn upsert_sql(table: &str, key_columns: &[String], rows: &[&KeyedRow<'_>]) -> (String, Vec<Array>) {
    let mut columns = Columns::default();
    let keys = key_columns_of(&mut columns, key_columns, rows);
    let sets = set_columns_of(&mut columns, rows);
    let names: Vec<String> = keys
        .iter()
        .map(|(name, _)| ident(name))
        .chain(sets.iter().map(|(set, _)| ident(&set.column)))
        .collect();
    let reads: Vec<&str> = keys
        .iter()
        .map(|(_, read)| read.as_str())
        .chain(sets.iter().map(|(_, read)| read.as_str()))
        .collect();
    let conflict = key_columns
        .iter()
        .map(|c| ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let action = execute::conflict_action(sets.iter().map(|(set, _)| *set));
    let sql = format!(
        "INSERT INTO {} AS target ({}) SELECT {} FROM {} ON CONFLICT ({conflict}) {action}",
        ident(table),
        names.join(", "),
        reads.join(", "),
        columns.unnest(false),
    );
    (sql, columns.into_params())
}

fn update_sql(
    table: &str,
    key_columns: &[String],
    rows: &[&KeyedRow<'_>],
    returning: bool,
) -> (String, Vec<Array>) {
    let mut columns = Columns::default();
    let keys = key_columns_of(&mut columns, key_columns, rows);
    let sets = set_columns_of(&mut columns, rows);
    let assignments = sets
        .iter()
        .map(|(set, read)| {
            let column = ident(&set.column);
            match set.op {
                SetOp::Assign(_) => format!("{column} = {read}"),
                SetOp::AppendUnique(_) => {
                    format!("{column} = {}", union(&format!("target.{column}"), read))
                }
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let condition = keys
        .iter()
        .map(|(name, read)| format!("target.{} = {read}", ident(name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let sql = format!(
        "UPDATE {} AS target SET {assignments} FROM {} WHERE {condition}{}",
        ident(table),
        columns.unnest(true),
        if returning { " RETURNING u.n" } else { "" }
    );
    (sql, columns.into_params())
}

fn delete_sql(table: &str, key_columns: &[String], rows: &[&KeyedRow<'_>]) -> (String, Vec<Array>) {
    let mut columns = Columns::default();
    let keys = key_columns_of(&mut columns, key_columns, rows);
    let condition = keys
        .iter()
        .map(|(name, read)| format!("target.{} = {read}", ident(name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let sql = format!(
        "DELETE FROM {} AS target USING {} WHERE {condition}",
        ident(table),
        columns.unnest(false)
    );
    (sql, columns.into_params())
}

fn insert_sql(
    table: &str,
    names: &[String],
    ignore_conflict: bool,
    rows: &[InsertRow<'_>],
) -> (String, Vec<Array>) {
    let mut columns = Columns::default();
    let reads: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let values: Vec<&wit::Value> = rows.iter().map(|r| &r.values[i].value).collect();
            let sql_type = param_type(&rows[0].values[i]);
            columns.add(&values, sql_type)
        })
        .collect();
    let sql = format!(
        "INSERT INTO {} ({}) SELECT {} FROM {} ORDER BY u.n{}",
        ident(table),
        names
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        reads.join(", "),
        columns.unnest(true),
        if ignore_conflict {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        }
    );
    (sql, columns.into_params())
}

fn param_type(param: &Param) -> &str {
    &param.sql_type
}

fn query(sql: String, arrays: Vec<Array>) -> Query<'static, Postgres, PgArguments> {
    // Audited: identifiers come from the live catalogue (validated, then quoted), types from
    // `format_type`, and every value is inside a bound array.
    let mut query: Query<'static, Postgres, PgArguments> = sqlx::query(AssertSqlSafe(sql));
    for array in arrays {
        query = match array {
            Array::Bool(values) => query.bind(values),
            Array::Int(values) => query.bind(values),
            Array::Float(values) => query.bind(values),
            Array::Text(values) => query.bind(values),
            Array::Flat(values) => query.bind(values),
        };
    }
    query
}

async fn run_sql(
    conn: &mut PgConnection,
    sql: String,
    arrays: Vec<Array>,
) -> Result<(), StatementError> {
    let done = query(sql, arrays).execute(conn).await;
    super::answers::answered();
    done.map(drop).map_err(execute::statement_failed)
}

/// Runs an update `RETURNING u.n` and collects the (1-based) positions of the rows that matched.
async fn fetch_positions(
    conn: &mut PgConnection,
    sql: String,
    arrays: Vec<Array>,
) -> Result<BTreeSet<i64>, StatementError> {
    use sqlx::Row;
    let rows = query(sql, arrays).fetch_all(conn).await;
    super::answers::answered();
    let rows = rows.map_err(execute::statement_failed)?;
    rows.iter()
        .map(|row| row.try_get::<i64, _>(0).map_err(execute::statement_failed))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literals_quote_every_element() {
        assert_eq!(
            array_literal(["a", "b \"c\"", "d\\e", "NULL", ""].into_iter()),
            r#"{"a","b \"c\"","d\\e","NULL",""}"#
        );
        assert_eq!(array_literal(std::iter::empty()), "{}");
    }

    #[test]
    fn float_arrays_travel_end_to_end_with_each_rows_bounds() {
        let a = wit::Value::FloatArray(vec![1.0, 2.0]);
        let empty = wit::Value::FloatArray(vec![]);
        let b = wit::Value::FloatArray(vec![3.0]);
        let (flat, first, last) = float_slices(&[&a, &wit::Value::Null, &empty, &b]).unwrap();
        assert_eq!(flat, [1.0, 2.0, 3.0]);
        assert_eq!(first, [Some(1), None, Some(3), Some(3)]);
        assert_eq!(last, [Some(2), None, Some(2), Some(3)]);
        assert!(float_slices(&[&a, &wit::Value::Integer(1)]).is_none());
        // Numbered before the unnest's arrays; other column types keep their text form.
        let mut columns = Columns::default();
        let key = wit::Value::Integer(7);
        assert_eq!(columns.add(&[&key], "bigint"), "CAST(u.c0 AS bigint)");
        assert_eq!(
            columns.add(&[&a], "real[]"),
            "CAST(($1::float8[])[u.c1::int4:u.c2::int4] AS real[])"
        );
        assert_eq!(columns.add(&[&a], "numeric[]"), "CAST(u.c3 AS numeric[])");
        assert_eq!(
            columns.unnest(false),
            "unnest($2::int8[], $3::int8[], $4::int8[], $5::text[]) AS u(c0, c1, c2, c3)"
        );
        assert_eq!(columns.into_params().len(), 5);
    }

    #[test]
    fn one_kind_of_value_travels_natively_and_a_mix_as_text() {
        let int = wit::Value::Integer(2);
        let float = wit::Value::Float(0.1);
        let null = wit::Value::Null;
        assert!(matches!(Array::of(&[&int, &null]), Array::Int(v) if v == [Some(2), None]));
        assert!(
            matches!(Array::of(&[&int, &float]), Array::Text(v) if v == [Some("2".to_string()), Some("0.1".to_string())])
        );
        assert!(
            matches!(Array::of(&[&null, &null]), Array::Text(v) if v == [None, None]),
            "only NULLs travel as text, which casts to any column type"
        );
        let floats = wit::Value::FloatArray(vec![1.5, 2.0]);
        assert!(
            matches!(Array::of(&[&floats]), Array::Text(v) if v == [Some("{1.5,2.0}".to_string())])
        );
    }
}
