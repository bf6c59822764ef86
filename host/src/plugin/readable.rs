//! Commands as readable JSON: what `plugin exec` prints, golden files of `plugin test` hold, and a
//! rollout's shadow compares and stores. Columns are keyed by name, so the JSON of a command does
//! not depend on the order a handler listed its columns in; the names of enum cases are spelled
//! as the contract spells them (golden files depend on them).

use super::wit;
use serde_json::{Value as Json, json};

/// A command as readable JSON.
pub fn command_json(command: &wit::Command) -> Json {
    let columns = |values: &[wit::ColumnValue]| -> Json {
        Json::Object(
            values
                .iter()
                .map(|cv| (cv.column.clone(), value_json(&cv.value)))
                .collect(),
        )
    };
    let set = |sets: &[wit::ColumnSet]| -> Json {
        Json::Object(
            sets.iter()
                .map(|cs| {
                    let op = match &cs.op {
                        wit::ColumnOp::Assign(value) => value_json(value),
                        wit::ColumnOp::AppendUnique(items) => json!({"append_unique": items}),
                    };
                    (cs.column.clone(), op)
                })
                .collect(),
        )
    };
    match command {
        wit::Command::Upsert(u) => {
            json!({"upsert": {"table": u.table, "key": columns(&u.key), "set": set(&u.set)}})
        }
        wit::Command::Update(u) => {
            json!({"update": {"table": u.table, "key": columns(&u.key), "set": set(&u.set), "if_missing": if_missing_name(u.if_missing)}})
        }
        wit::Command::Insert(i) => {
            json!({"insert": {"table": i.table, "values": columns(&i.values), "on_conflict": on_conflict_name(i.on_conflict)}})
        }
        wit::Command::Delete(d) => json!({"delete": {"table": d.table, "key": columns(&d.key)}}),
        wit::Command::Emit(e) => {
            json!({"emit": {"target": e.target, "fields": Json::Object(e.fields.iter().map(|(k, v)| (k.clone(), Json::String(v.clone()))).collect())}})
        }
    }
}

/// An `if-missing` as the contract spells it (golden files depend on these names).
pub fn if_missing_name(if_missing: wit::IfMissing) -> &'static str {
    match if_missing {
        wit::IfMissing::Retry => "retry",
        wit::IfMissing::Skip => "skip",
        wit::IfMissing::Fail => "fail",
    }
}

/// An `on-conflict` as the contract spells it (golden files depend on these names).
fn on_conflict_name(on_conflict: wit::OnConflict) -> &'static str {
    match on_conflict {
        wit::OnConflict::Ignore => "ignore",
        wit::OnConflict::Error => "error",
    }
}

/// A value as JSON: plain where the JSON type says it all, tagged for `json` and `timestamp`.
pub fn value_json(value: &wit::Value) -> Json {
    match value {
        wit::Value::Null => Json::Null,
        wit::Value::Boolean(b) => json!(b),
        wit::Value::Integer(i) => json!(i),
        wit::Value::Float(f) => json!(f),
        wit::Value::Text(s) => json!(s),
        wit::Value::Json(s) => {
            json!({"json": serde_json::from_str::<Json>(s).unwrap_or(Json::String(s.clone()))})
        }
        wit::Value::TextArray(items) => json!(items),
        wit::Value::FloatArray(items) => json!(items),
        wit::Value::Timestamp(s) => json!({"timestamp": s}),
        wit::Value::Now => json!({"timestamp": "now"}),
    }
}
