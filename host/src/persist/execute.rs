//! Runs checked statements as parameterised SQL.
//!
//! Identifiers come from the live catalogue (the validator only lets through names that exist) and
//! are quoted anyway; every value is a bound parameter cast to its column's type. Nothing from an
//! entry is ever interpolated into SQL text.

use super::validate::{Condition, Param, SetOp, SetParam, Statement};
use crate::failure::{self, StatementError};
use crate::plugin::wit;
use sqlx::postgres::PgArguments;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row, query::Query};

/// Runs one statement inside the caller's transaction. `Emit` statements are not SQL and must be
/// handled by the caller (they go to the outbox).
pub async fn execute(conn: &mut PgConnection, statement: &Statement) -> Result<(), StatementError> {
    match statement {
        Statement::Upsert { table, key, set } => {
            let (sql, binds) = upsert_sql(table, key, set);
            run(conn, sql, binds).await.map(drop)
        }
        Statement::Update {
            table,
            key,
            set,
            if_missing,
            only_if,
        } => {
            let matched = if only_if.is_empty() {
                let (sql, binds) = update_sql(table, key, set);
                run(conn, sql, binds).await?
            } else {
                // Rows with the key, locked, and among them those the guard lets through: a row
                // the guard excludes is a no-op, not a missing row.
                let (sql, binds) = guarded_update_sql(table, key, set, only_if);
                count(conn, sql, binds).await?
            };
            if matched > 0 {
                return Ok(());
            }
            let which = describe_key(table, key);
            match if_missing {
                wit::IfMissing::Skip => Ok(()),
                wit::IfMissing::Retry => {
                    Err(StatementError::Retry(format!("no row in {which} yet")))
                }
                wit::IfMissing::Fail => {
                    Err(StatementError::Permanent(format!("no row in {which}")))
                }
            }
        }
        Statement::Insert {
            table,
            values,
            ignore_conflict,
        } => {
            let (sql, binds) = insert_sql(table, values, *ignore_conflict);
            run(conn, sql, binds).await.map(drop)
        }
        Statement::Delete { table, key } => {
            let mut binds = Vec::new();
            let sql = format!(
                "DELETE FROM {} WHERE {}",
                ident(table),
                where_clause(key, &mut binds)
            );
            run(conn, sql, binds).await.map(drop)
        }
        Statement::Emit { .. } => Ok(()),
    }
}

/// The class of a failed statement's error (see [`crate::failure::classify_statement`]); a
/// changed schema also has the catalogue read again.
pub fn statement_failed(error: sqlx::Error) -> StatementError {
    if failure::schema_changed(&error) {
        super::schema::note_schema_changed();
    }
    failure::classify_statement(error)
}

/// A value to bind, owned so the query can outlive the statement borrow.
enum Bind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    TextArray(Vec<String>),
    FloatArray(Vec<f64>),
}

impl From<&wit::Value> for Bind {
    fn from(value: &wit::Value) -> Self {
        match value {
            wit::Value::Null => Bind::Null,
            wit::Value::Boolean(b) => Bind::Bool(*b),
            wit::Value::Integer(i) => Bind::Int(*i),
            wit::Value::Float(f) => Bind::Float(*f),
            wit::Value::Text(s) | wit::Value::Json(s) | wit::Value::Timestamp(s) => {
                Bind::Text(s.clone())
            }
            // PostgreSQL reads the text `now` as the transaction's start time (`now()`).
            wit::Value::Now => Bind::Text("now".into()),
            wit::Value::TextArray(items) => Bind::TextArray(items.clone()),
            wit::Value::FloatArray(items) => Bind::FloatArray(items.clone()),
        }
    }
}

/// The statement `sql` with `binds` bound in order.
fn bound(sql: String, binds: Vec<Bind>) -> Query<'static, Postgres, PgArguments> {
    // Audited: identifiers come from the live catalogue (validated, then quoted), types from
    // `format_type`, and every value is a bound parameter.
    let mut query: Query<'static, Postgres, PgArguments> = sqlx::query(AssertSqlSafe(sql));
    for bind in binds {
        query = match bind {
            // Written as a literal by `placeholder`; never bound.
            Bind::Null => query,
            Bind::Bool(b) => query.bind(b),
            Bind::Int(i) => query.bind(i),
            Bind::Float(f) => query.bind(f),
            Bind::Text(s) => query.bind(s),
            Bind::TextArray(items) => query.bind(items),
            Bind::FloatArray(items) => query.bind(items),
        };
    }
    query
}

/// Runs a statement; returns how many rows it affected.
async fn run(
    conn: &mut PgConnection,
    sql: String,
    binds: Vec<Bind>,
) -> Result<u64, StatementError> {
    let done = bound(sql, binds).execute(conn).await;
    super::answers::answered();
    done.map(|done| done.rows_affected())
        .map_err(statement_failed)
}

/// Runs a statement that returns one count (`SELECT count(*) ...`).
async fn count(
    conn: &mut PgConnection,
    sql: String,
    binds: Vec<Bind>,
) -> Result<u64, StatementError> {
    let row = bound(sql, binds).fetch_one(conn).await;
    super::answers::answered();
    let row = row.map_err(statement_failed)?;
    let counted: i64 = row.try_get(0).map_err(statement_failed)?;
    Ok(u64::try_from(counted).unwrap_or(0))
}

pub(super) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Adds a parameter and returns its placeholder, cast to the column's type.
///
/// The placeholder names the type it is bound with (`$3::float8`), and NULL is written as a
/// literal: statements are prepared and cached by their text, so two commands of the same shape
/// whose values have different types (an integer and a float for one column, NULL and an array)
/// must never share a prepared statement — PostgreSQL would read one type's bytes as the other's.
fn placeholder(binds: &mut Vec<Bind>, bind: Bind, sql_type: &str) -> String {
    let bound_as = match &bind {
        Bind::Null => return format!("CAST(NULL AS {sql_type})"),
        Bind::Bool(_) => "bool",
        Bind::Int(_) => "int8",
        Bind::Float(_) => "float8",
        Bind::Text(_) => "text",
        Bind::TextArray(_) => "text[]",
        Bind::FloatArray(_) => "float8[]",
    };
    binds.push(bind);
    format!("CAST(${}::{bound_as} AS {sql_type})", binds.len())
}

/// The order-preserving union of an existing `text[]` column and new items.
pub(super) fn union(existing: &str, added: &str) -> String {
    format!(
        "ARRAY(SELECT u.item FROM unnest(coalesce({existing}, '{{}}') || {added}) WITH ORDINALITY AS u(item, n) \
         GROUP BY u.item ORDER BY min(u.n))"
    )
}

pub(super) fn dedup(items: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    items
        .iter()
        .filter(|item| seen.insert(item.as_str()))
        .cloned()
        .collect()
}

fn where_clause(key: &[Param], binds: &mut Vec<Bind>) -> String {
    key.iter()
        .map(|p| {
            format!(
                "{} = {}",
                ident(&p.column),
                placeholder(binds, (&p.value).into(), &p.sql_type)
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn upsert_sql(table: &str, key: &[Param], set: &[SetParam]) -> (String, Vec<Bind>) {
    let mut binds = Vec::new();
    let mut columns = Vec::new();
    let mut values = Vec::new();
    for p in key {
        columns.push(ident(&p.column));
        values.push(placeholder(&mut binds, (&p.value).into(), &p.sql_type));
    }
    for s in set {
        columns.push(ident(&s.column));
        let bind = match &s.op {
            SetOp::Assign(value) => value.into(),
            SetOp::AppendUnique(items) => Bind::TextArray(dedup(items)),
        };
        values.push(placeholder(&mut binds, bind, &s.sql_type));
    }
    let conflict = key
        .iter()
        .map(|p| ident(&p.column))
        .collect::<Vec<_>>()
        .join(", ");
    let action = conflict_action(set.iter());
    let sql = format!(
        "INSERT INTO {} AS target ({}) VALUES ({}) ON CONFLICT ({conflict}) {action}",
        ident(table),
        columns.join(", "),
        values.join(", ")
    );
    (sql, binds)
}

/// An upsert's `ON CONFLICT` action: assign each `set` column from the proposed row, or merge it
/// into the existing array for `append-unique`; nothing to do when there is no `set`.
pub(super) fn conflict_action<'s>(set: impl Iterator<Item = &'s SetParam>) -> String {
    let assignments = set
        .map(|s| {
            let column = ident(&s.column);
            match s.op {
                SetOp::Assign(_) => format!("{column} = EXCLUDED.{column}"),
                SetOp::AppendUnique(_) => format!(
                    "{column} = {}",
                    union(&format!("target.{column}"), &format!("EXCLUDED.{column}"))
                ),
            }
        })
        .collect::<Vec<_>>();
    if assignments.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", assignments.join(", "))
    }
}

fn update_sql(table: &str, key: &[Param], set: &[SetParam]) -> (String, Vec<Bind>) {
    let mut binds = Vec::new();
    let assignments = set
        .iter()
        .map(|s| {
            let column = ident(&s.column);
            match &s.op {
                SetOp::Assign(value) => format!(
                    "{column} = {}",
                    placeholder(&mut binds, value.into(), &s.sql_type)
                ),
                SetOp::AppendUnique(items) => {
                    let added = placeholder(&mut binds, Bind::TextArray(dedup(items)), &s.sql_type);
                    format!("{column} = {}", union(&format!("target.{column}"), &added))
                }
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let condition = where_clause(key, &mut binds);
    let sql = format!(
        "UPDATE {} AS target SET {assignments} WHERE {condition}",
        ident(table)
    );
    (sql, binds)
}

/// A guarded update: rows with the key are locked, those meeting every condition are updated,
/// and the statement returns how many rows had the key (so that a row the guard excludes is told
/// apart from a missing one).
fn guarded_update_sql(
    table: &str,
    key: &[Param],
    set: &[SetParam],
    only_if: &[Condition],
) -> (String, Vec<Bind>) {
    let (update, mut binds) = update_sql(table, key, set);
    let guard = only_if
        .iter()
        .map(|c| {
            format!(
                "target.{} IS {}DISTINCT FROM {}",
                ident(&c.param.column),
                if c.equals { "NOT " } else { "" },
                placeholder(&mut binds, (&c.param.value).into(), &c.param.sql_type)
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    let condition = where_clause(key, &mut binds);
    let sql = format!(
        "WITH matched AS (SELECT 1 FROM {} WHERE {condition} FOR UPDATE),
              changed AS ({update} AND {guard} RETURNING 1)
         SELECT count(*) FROM matched",
        ident(table)
    );
    (sql, binds)
}

fn insert_sql(table: &str, values: &[Param], ignore_conflict: bool) -> (String, Vec<Bind>) {
    let mut binds = Vec::new();
    let conflict = if ignore_conflict {
        " ON CONFLICT DO NOTHING"
    } else {
        ""
    };
    if values.is_empty() {
        return (
            format!("INSERT INTO {} DEFAULT VALUES{conflict}", ident(table)),
            binds,
        );
    }
    let columns = values
        .iter()
        .map(|p| ident(&p.column))
        .collect::<Vec<_>>()
        .join(", ");
    let placeholders = values
        .iter()
        .map(|p| placeholder(&mut binds, (&p.value).into(), &p.sql_type))
        .collect::<Vec<_>>()
        .join(", ");
    (
        format!(
            "INSERT INTO {} ({columns}) VALUES ({placeholders}){conflict}",
            ident(table)
        ),
        binds,
    )
}

/// `table(col=value, ...)` for messages.
pub(super) fn describe_key(table: &str, key: &[Param]) -> String {
    let parts = key
        .iter()
        .map(|p| format!("{}={}", p.column, short_value(&p.value)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("`{table}` with {parts}")
}

fn short_value(value: &wit::Value) -> String {
    match value {
        wit::Value::Integer(i) => i.to_string(),
        wit::Value::Text(s) => format!("{s:?}"),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(column: &str, sql_type: &str, value: wit::Value) -> Param {
        Param {
            column: column.into(),
            sql_type: sql_type.into(),
            value,
        }
    }

    #[test]
    fn upsert_merges_arrays_and_assigns_columns() {
        let (sql, binds) = upsert_sql(
            "media_ai_insights",
            &[param("media_id", "bigint", wit::Value::Integer(1))],
            &[
                SetParam {
                    column: "caption".into(),
                    sql_type: "text".into(),
                    op: SetOp::Assign(wit::Value::Text("x".into())),
                },
                SetParam {
                    column: "services_completed".into(),
                    sql_type: "text[]".into(),
                    op: SetOp::AppendUnique(vec!["a".into(), "a".into()]),
                },
            ],
        );
        assert_eq!(binds.len(), 3);
        assert!(sql.starts_with("INSERT INTO \"media_ai_insights\" AS target (\"media_id\", \"caption\", \"services_completed\") VALUES (CAST($1::int8 AS bigint), CAST($2::text AS text), CAST($3::text[] AS text[])) ON CONFLICT (\"media_id\") DO UPDATE SET \"caption\" = EXCLUDED.\"caption\", \"services_completed\" = ARRAY("), "{sql}");
        assert!(matches!(&binds[2], Bind::TextArray(items) if items.len() == 1));
    }

    #[test]
    fn values_of_different_types_never_share_a_statement() {
        let column = |value| SetParam {
            column: "embedding".into(),
            sql_type: "real[]".into(),
            op: SetOp::Assign(value),
        };
        let key = [param("id", "bigint", wit::Value::Integer(1))];
        let (null, null_binds) = upsert_sql("t", &key, &[column(wit::Value::Null)]);
        let (array, _) = upsert_sql("t", &key, &[column(wit::Value::FloatArray(vec![1.0]))]);
        let (int, _) = update_sql(
            "t",
            &key,
            &[SetParam {
                column: "x".into(),
                sql_type: "double precision".into(),
                op: SetOp::Assign(wit::Value::Integer(1)),
            }],
        );
        let (float, _) = update_sql(
            "t",
            &key,
            &[SetParam {
                column: "x".into(),
                sql_type: "double precision".into(),
                op: SetOp::Assign(wit::Value::Float(1.0)),
            }],
        );
        assert_ne!(null, array);
        assert_ne!(int, float);
        assert!(null.contains("CAST(NULL AS real[])"), "{null}");
        assert_eq!(null_binds.len(), 1, "NULL is not bound");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
