//! What checked statements change in the rows they write, read from the database itself: the
//! rows their keys name are read before the statements run and again after, in the same
//! transaction. How `reprocess --dry-run` reports per table and column what a run would change
//! (and then rolls its transaction back) — the database's answer, not a guess from the commands.
//!
//! A row is named by the key its statement gives: an upsert's unique key, an update's or a
//! delete's key, an insert's values (an insert has no key of its own; a row with all its
//! values already there is one it would not add). Keys are matched by PostgreSQL
//! (`jsonb_populate_recordset` of the table's own row type, joined on the key columns), so the
//! look-up uses the table's index and compares values as the column's type does.

use super::execute::ident;
use super::validate::Statement;
use crate::plugin::wit;
use serde_json::{Map, Value as Json};
use sqlx::PgConnection;
use std::collections::{BTreeMap, BTreeSet};

/// The rows some statements write, grouped by table and key columns (one look-up each).
#[derive(Debug, Default)]
pub struct Lookups {
    groups: BTreeMap<(String, Vec<String>), Group>,
}

/// The keys of one table and key-column set, in order, each with the columns written to it.
#[derive(Debug, Default)]
struct Group {
    keys: Vec<Json>,
    /// Per key: the columns the statements set on that row.
    written: Vec<BTreeSet<String>>,
    /// Where each key (as JSON text) is in `keys`.
    index: BTreeMap<String, usize>,
}

impl Lookups {
    /// The rows `statements` write (emits write none).
    pub fn of<'a>(statements: impl IntoIterator<Item = &'a Statement>) -> Lookups {
        let mut lookups = Lookups::default();
        for statement in statements {
            let (table, key, written): (&str, Vec<(&str, &wit::Value)>, Vec<&str>) = match statement
            {
                Statement::Upsert { table, key, set } => (
                    table,
                    key.iter().map(|p| (p.column.as_str(), &p.value)).collect(),
                    key.iter()
                        .map(|p| p.column.as_str())
                        .chain(set.iter().map(|s| s.column.as_str()))
                        .collect(),
                ),
                Statement::Update {
                    table, key, set, ..
                } => (
                    table,
                    key.iter().map(|p| (p.column.as_str(), &p.value)).collect(),
                    set.iter().map(|s| s.column.as_str()).collect(),
                ),
                Statement::Delete { table, key } => (
                    table,
                    key.iter().map(|p| (p.column.as_str(), &p.value)).collect(),
                    Vec::new(),
                ),
                Statement::Insert { table, values, .. } => (
                    table,
                    values
                        .iter()
                        .filter(|p| !matches!(p.value, wit::Value::Null | wit::Value::Now))
                        .map(|p| (p.column.as_str(), &p.value))
                        .collect(),
                    Vec::new(),
                ),
                Statement::Emit { .. } => continue,
            };
            lookups.add(table, &key, written);
        }
        lookups
    }

    fn add(&mut self, table: &str, key: &[(&str, &wit::Value)], written: Vec<&str>) {
        let mut key: Vec<(&str, Json)> = key
            .iter()
            .filter_map(|(column, value)| Some((*column, key_value(value)?)))
            .collect();
        if key.is_empty() {
            return;
        }
        key.sort_by(|a, b| a.0.cmp(b.0));
        let columns: Vec<String> = key.iter().map(|(c, _)| c.to_string()).collect();
        let object: Map<String, Json> = key.into_iter().map(|(c, v)| (c.to_string(), v)).collect();
        let object = Json::Object(object);
        let group = self.groups.entry((table.to_string(), columns)).or_default();
        let text = object.to_string();
        let at = *group.index.entry(text).or_insert_with(|| {
            group.keys.push(object);
            group.written.push(BTreeSet::new());
            group.keys.len() - 1
        });
        group.written[at].extend(written.into_iter().map(str::to_string));
    }

    /// Whether there is no row to read.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// A key's value as the table's row type reads it from JSON (`None`: not comparable as a key).
fn key_value(value: &wit::Value) -> Option<Json> {
    Some(match value {
        wit::Value::Null | wit::Value::Now => return None,
        wit::Value::Boolean(b) => Json::from(*b),
        wit::Value::Integer(i) => Json::from(*i),
        wit::Value::Float(f) => Json::from(*f),
        wit::Value::Text(s) | wit::Value::Timestamp(s) => Json::from(s.as_str()),
        wit::Value::Json(s) => serde_json::from_str(s).ok()?,
        wit::Value::TextArray(items) => Json::from(items.clone()),
        wit::Value::FloatArray(items) => Json::from(items.clone()),
    })
}

/// The rows of some [`Lookups`] at one moment: per group, per key, the row (as PostgreSQL
/// renders its key and its columns), or nothing.
#[derive(Debug, Default)]
pub struct Snapshot {
    rows: BTreeMap<(String, Vec<String>), Vec<Option<Found>>>,
}

/// A row found: its key as PostgreSQL renders it, and its columns.
type Found = (String, Map<String, Json>);

/// Reads the rows `lookups` name, as `conn` sees them now.
pub async fn snapshot(conn: &mut PgConnection, lookups: &Lookups) -> Result<Snapshot, sqlx::Error> {
    let mut snapshot = Snapshot::default();
    for ((table, columns), group) in &lookups.groups {
        let key = columns
            .iter()
            .map(|c| format!("'{}', k.{}", c.replace('\'', "''"), ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let join = columns
            .iter()
            .map(|c| format!("t.{0} = k.{0}", ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let table_ident = ident(table);
        let sql = format!(
            "SELECT k.ordinality, jsonb_build_object({key})::text, to_jsonb(t)
               FROM jsonb_populate_recordset(NULL::{table_ident}, $1::jsonb) WITH ORDINALITY AS k
               JOIN {table_ident} AS t ON {join}"
        );
        let found: Vec<(i64, String, Json)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(Json::Array(group.keys.clone()))
            .fetch_all(&mut *conn)
            .await?;
        super::answers::answered();
        let mut rows = vec![None; group.keys.len()];
        for (ordinality, key, row) in found {
            let (Some(slot), Json::Object(row)) = (
                usize::try_from(ordinality - 1)
                    .ok()
                    .and_then(|at| rows.get_mut(at)),
                row,
            ) else {
                continue;
            };
            *slot = Some((key, row));
        }
        snapshot.rows.insert((table.clone(), columns.clone()), rows);
    }
    Ok(snapshot)
}

/// What happened to one row over a run: as it was before its first write, after its last, and
/// the columns written to it (only those are compared: what the database maintains itself, an
/// `updated_at` or a generated column, is not what a handler changed).
#[derive(Clone, Debug, PartialEq)]
struct RowChange {
    before: Option<Map<String, Json>>,
    after: Option<Map<String, Json>>,
    written: BTreeSet<String>,
}

/// The changes of many batches, row by row (a row written by several keeps its state before
/// the first and after the last).
#[derive(Debug, Default)]
pub struct Changes {
    rows: BTreeMap<(String, String), RowChange>,
}

impl Changes {
    /// Adds the rows `lookups` name, read `before` and `after` their statements ran.
    pub fn add(&mut self, lookups: &Lookups, before: &Snapshot, after: &Snapshot) {
        for (group_key, group) in &lookups.groups {
            let empty = Vec::new();
            let before = before.rows.get(group_key).unwrap_or(&empty);
            let after = after.rows.get(group_key).unwrap_or(&empty);
            for (at, written) in group.written.iter().enumerate() {
                let was = before.get(at).cloned().flatten();
                let is = after.get(at).cloned().flatten();
                let Some(key) = was.as_ref().or(is.as_ref()).map(|(k, _)| k.clone()) else {
                    continue;
                };
                let keep = |row: Option<Found>| {
                    row.map(|(_, mut row)| {
                        row.retain(|column, _| written.contains(column));
                        row
                    })
                };
                let row = self
                    .rows
                    .entry((group_key.0.clone(), key))
                    .or_insert_with(|| RowChange {
                        before: keep(was.clone()),
                        after: None,
                        written: BTreeSet::new(),
                    });
                row.written.extend(written.iter().cloned());
                row.after = keep(is);
                if let (Some(before), Some((_, was))) = (&mut row.before, was) {
                    // A column first written by a later batch: its value before the run.
                    for column in written {
                        if !before.contains_key(column)
                            && let Some(value) = was.get(column)
                        {
                            before.insert(column.clone(), value.clone());
                        }
                    }
                }
            }
        }
    }

    /// Per table and column, what changed.
    pub fn summary(&self, examples: usize) -> Summary {
        let mut summary = Summary::default();
        for ((table, key), row) in &self.rows {
            let key: Json = serde_json::from_str(key).unwrap_or(Json::String(key.clone()));
            let table = summary.tables.entry(table.clone()).or_default();
            table.rows += 1;
            match (&row.before, &row.after) {
                (None, Some(_)) => table.added += 1,
                (Some(_), None) => table.removed += 1,
                (None, None) => {}
                (Some(before), Some(after)) => {
                    let mut changed = false;
                    for column in &row.written {
                        let old = before.get(column).unwrap_or(&Json::Null);
                        let new = after.get(column).unwrap_or(&Json::Null);
                        if old == new {
                            continue;
                        }
                        changed = true;
                        let column = table.columns.entry(column.clone()).or_default();
                        column.rows += 1;
                        if column.examples.len() < examples {
                            column.examples.push(Example {
                                key: key.clone(),
                                before: old.clone(),
                                after: new.clone(),
                            });
                        }
                    }
                    if changed {
                        table.changed += 1;
                    } else {
                        table.unchanged += 1;
                    }
                }
            }
        }
        summary
    }
}

/// What a run changes, per table.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub tables: BTreeMap<String, TableChanges>,
}

/// What a run changes in one table: rows written, by what became of them, and per column the
/// rows whose value changes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TableChanges {
    pub rows: u64,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
    /// Written with the values they had.
    pub unchanged: u64,
    pub columns: BTreeMap<String, ColumnChanges>,
}

/// The rows whose value of one column changes, and the first few of them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ColumnChanges {
    pub rows: u64,
    pub examples: Vec<Example>,
}

/// One row's change of one column: its key, old → new.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Example {
    pub key: Json,
    pub before: Json,
    pub after: Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::validate::{Param, SetOp, SetParam};

    fn upsert(id: i64, column: &str, value: &str) -> Statement {
        Statement::Upsert {
            table: "media".into(),
            key: vec![Param {
                column: "media_id".into(),
                sql_type: "bigint".into(),
                value: wit::Value::Integer(id),
            }],
            set: vec![SetParam {
                column: column.into(),
                sql_type: "text".into(),
                op: SetOp::Assign(wit::Value::Text(value.into())),
            }],
        }
    }

    fn row(pairs: &[(&str, Json)]) -> Map<String, Json> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn snapshot(lookups: &Lookups, rows: Vec<Option<Found>>) -> Snapshot {
        let key = lookups.groups.keys().next().unwrap().clone();
        Snapshot {
            rows: BTreeMap::from([(key, rows)]),
        }
    }

    #[test]
    fn statements_on_one_row_are_looked_up_once_with_every_column_they_write() {
        let statements = [upsert(1, "caption", "a"), upsert(1, "label", "b")];
        let lookups = Lookups::of(&statements);
        let group = lookups.groups.values().next().unwrap();
        assert_eq!(group.keys, [serde_json::json!({"media_id": 1})]);
        let written: Vec<&str> = group.written[0].iter().map(String::as_str).collect();
        assert_eq!(written, ["caption", "label", "media_id"]);
    }

    #[test]
    fn only_written_columns_that_differ_count_and_a_row_keeps_its_first_before() {
        let first = [upsert(1, "caption", "a"), upsert(2, "caption", "x")];
        let lookups = Lookups::of(&first);
        let key = |id: i64| format!("{{\"media_id\": {id}}}");
        let before = snapshot(
            &lookups,
            vec![
                Some((
                    key(1),
                    row(&[
                        ("media_id", 1.into()),
                        ("caption", "old".into()),
                        ("updated_at", "t0".into()),
                    ]),
                )),
                None,
            ],
        );
        let after = snapshot(
            &lookups,
            vec![
                Some((
                    key(1),
                    row(&[
                        ("media_id", 1.into()),
                        ("caption", "a".into()),
                        ("updated_at", "t1".into()),
                    ]),
                )),
                Some((
                    key(2),
                    row(&[("media_id", 2.into()), ("caption", "x".into())]),
                )),
            ],
        );
        let mut changes = Changes::default();
        changes.add(&lookups, &before, &after);
        // The same row written again later (in a batch that did not see the first's effect).
        let second = [upsert(1, "caption", "b")];
        let again = Lookups::of(&second);
        let before = snapshot(
            &again,
            vec![Some((
                key(1),
                row(&[("media_id", 1.into()), ("caption", "old".into())]),
            ))],
        );
        let after = snapshot(
            &again,
            vec![Some((
                key(1),
                row(&[("media_id", 1.into()), ("caption", "b".into())]),
            ))],
        );
        changes.add(&again, &before, &after);
        let summary = changes.summary(10);
        let media = &summary.tables["media"];
        assert_eq!((media.rows, media.added, media.changed), (2, 1, 1));
        assert!(
            !media.columns.contains_key("updated_at"),
            "not a written column"
        );
        let caption = &media.columns["caption"];
        assert_eq!(caption.rows, 1);
        assert_eq!(caption.examples[0].before, Json::from("old"));
        assert_eq!(caption.examples[0].after, Json::from("b"));
    }
}
