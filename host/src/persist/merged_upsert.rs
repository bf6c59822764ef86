//! One statement for the upserts of a stage whose rows set different columns.
//!
//! A batch of insights sets different columns message by message (tags for one service, a
//! caption for the next, both for a media whose two messages were folded). Written one column
//! shape at a time, one statement each, two batches would lock the same rows in different
//! orders, so such a batch had to have the whole table to itself ([`super::batch::TableLock`]):
//! the stream's batches in flight, and every other stream writing the table, waited in line for
//! it. Written as one statement, its rows are locked in key order like those of any one-statement
//! stage, and batches run side by side.
//!
//! The statement inserts what each row sets and, for a column the row does not set, the column's
//! default (what leaving it out would give); on conflict it assigns (or merges into) only the
//! columns the conflicting row sets. `EXCLUDED` carries no trace of which columns a row set, so
//! each such column asks whether the row's key is among the keys of the rows that set it
//! (`(EXCLUDED.key) IN (SELECT … FROM unnest($n))`, a hash PostgreSQL builds once per statement).

use super::batch::{column_list, key_columns_of, set_value};
use super::execute::{ident, union};
use super::plan::KeyedRow;
use super::schema::Table;
use super::statement_arrays::{Array, Columns};
use super::validate::SetOp;
use crate::plugin::wit;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// How the rows of a stage use one column.
struct ColumnUse<'r> {
    sql_type: &'r str,
    /// Positions of the rows that assign the column.
    assign: Vec<usize>,
    /// Positions of the rows that append to it (`append-unique`).
    append: Vec<usize>,
}

impl ColumnUse<'_> {
    fn set_by(&self, rows: usize) -> bool {
        self.assign.len() + self.append.len() == rows
    }
}

/// Every column some row sets, in name order.
fn column_uses<'r>(rows: &[&'r KeyedRow<'_>]) -> BTreeMap<&'r str, ColumnUse<'r>> {
    let mut uses: BTreeMap<&str, ColumnUse> = BTreeMap::new();
    for (position, row) in rows.iter().enumerate() {
        for set in row.set.iter() {
            let column_use = uses.entry(set.column.as_str()).or_insert(ColumnUse {
                sql_type: &set.sql_type,
                assign: Vec::new(),
                append: Vec::new(),
            });
            match set.op {
                SetOp::Assign(_) => column_use.assign.push(position),
                SetOp::AppendUnique(_) => column_use.append.push(position),
            }
        }
    }
    uses
}

/// Whether one statement can write `rows` on `table` as their own statements would: every
/// column that some rows leave out has a default an expression can stand for (not an identity
/// column nor a domain's default) and no `UPDATE OF` trigger (which would fire on the rows that
/// leave it out, as the statement assigns them their own value).
pub(super) fn possible(table: Option<&Table>, rows: &[&KeyedRow<'_>]) -> bool {
    let Some(table) = table else {
        return false;
    };
    column_uses(rows).iter().all(|(column, column_use)| {
        column_use.set_by(rows.len())
            || table.columns.get(*column).is_some_and(|c| {
                !c.implicit_default && !table.trigger_columns.contains(*column) && !c.generated
            })
    })
}

/// The one statement for `rows` (which [`possible`] allowed) and its parameters.
pub(super) fn upsert_sql(
    table: &Table,
    key_columns: &[String],
    rows: &[&KeyedRow<'_>],
) -> (String, Vec<Array>) {
    let mut columns = Columns::default();
    let keys = key_columns_of(&mut columns, key_columns, rows);
    let uses = column_uses(rows);
    let mut names: Vec<String> = keys.iter().map(|(name, _)| ident(name)).collect();
    let mut reads: Vec<String> = keys.iter().map(|(_, read)| read.clone()).collect();
    for (&column, column_use) in &uses {
        let values: Vec<Cow<'_, wit::Value>> = rows
            .iter()
            .map(|row| {
                row.set
                    .iter()
                    .find(|s| s.column == column)
                    .map_or(Cow::Owned(wit::Value::Null), set_value)
            })
            .collect();
        let refs: Vec<&wit::Value> = values.iter().map(|v| v.as_ref()).collect();
        let read = columns.add(&refs, column_use.sql_type);
        names.push(ident(column));
        if column_use.set_by(rows.len()) {
            reads.push(read);
            continue;
        }
        let sets: Vec<wit::Value> = rows
            .iter()
            .map(|row| wit::Value::Boolean(row.set.iter().any(|s| s.column == column)))
            .collect();
        let sets: Vec<&wit::Value> = sets.iter().collect();
        let row_sets = columns.add(&sets, "boolean");
        let default = table
            .columns
            .get(column)
            .and_then(|c| c.default.as_deref())
            .unwrap_or("NULL");
        reads.push(format!(
            "CASE WHEN {row_sets} THEN {read} ELSE {default} END"
        ));
    }

    // The key sets come after every column of the `unnest`, as their parameters are numbered
    // after those.
    let excluded_key = format!(
        "({})",
        key_columns
            .iter()
            .map(|c| format!("EXCLUDED.{}", ident(c)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut key_set = |positions: &[usize]| -> String {
        let params: Vec<String> = (0..key_columns.len())
            .map(|i| {
                let values: Vec<&wit::Value> =
                    positions.iter().map(|&p| &rows[p].key[i].value).collect();
                columns.loose(&values)
            })
            .collect();
        // `unnest($a, $b) AS k(c0, c1)`, each read back cast to its key column's type.
        let reads: Vec<String> = (0..params.len())
            .map(|i| format!("CAST(k.c{i} AS {})", rows[0].key[i].sql_type))
            .collect();
        let names: Vec<String> = (0..params.len()).map(|i| format!("c{i}")).collect();
        format!(
            "{excluded_key} IN (SELECT {} FROM unnest({}) AS k({}))",
            reads.join(", "),
            params.join(", "),
            names.join(", ")
        )
    };
    let assignments: Vec<String> = uses
        .iter()
        .map(|(&column, column_use)| {
            let name = ident(column);
            let assign = format!("EXCLUDED.{name}");
            let append = union(&format!("target.{name}"), &format!("EXCLUDED.{name}"));
            let value = match (column_use.assign.len(), column_use.append.len()) {
                (n, 0) if n == rows.len() => assign,
                (0, n) if n == rows.len() => append,
                (_, 0) => format!(
                    "CASE WHEN {} THEN {assign} ELSE target.{name} END",
                    key_set(&column_use.assign)
                ),
                (0, _) => format!(
                    "CASE WHEN {} THEN {append} ELSE target.{name} END",
                    key_set(&column_use.append)
                ),
                _ if column_use.set_by(rows.len()) => format!(
                    "CASE WHEN {} THEN {append} ELSE {assign} END",
                    key_set(&column_use.append)
                ),
                _ => format!(
                    "CASE WHEN {} THEN {assign} WHEN {} THEN {append} ELSE target.{name} END",
                    key_set(&column_use.assign),
                    key_set(&column_use.append)
                ),
            };
            format!("{name} = {value}")
        })
        .collect();
    let conflict = column_list(key_columns);
    let sql = format!(
        "INSERT INTO {} AS target ({}) SELECT {} FROM {} ON CONFLICT ({conflict}) DO UPDATE SET {}",
        ident(&table.name),
        names.join(", "),
        reads.join(", "),
        columns.unnest(false),
        assignments.join(", "),
    );
    (sql, columns.into_params())
}
