//! Runs a [`Plan`] as set-based SQL: one statement per stage (per column shape where one
//! statement cannot write the stage's rows: [`merged_upsert`]), the rows passed as arrays and
//! spread out with `unnest` ([`super::statement_arrays`]), and takes the table locks that keep
//! concurrent batches from waiting for each other in a cycle.

use super::execute::{self, dedup, ident, union};
use super::merged_upsert;
use super::plan::{InsertRow, KeyedRow, Plan, Stage};
use super::schema::{Catalog, Links, Table};
use super::statement_arrays::{Array, Columns};
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
    let conflict = column_list(key_columns);
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

/// `"a", "b"`: quoted column names, for a column list or a conflict target.
pub(super) fn column_list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| ident(c))
        .collect::<Vec<_>>()
        .join(", ")
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
