//! Plugins built against contract 0.1.0 (`wit/v0.1.0/handler.wit`), the way long-lived plugin
//! hosts keep several extension API versions side by side: their calls go through the 0.1.0
//! bindings, and this module turns what crosses the boundary into the current contract's types
//! (and the entry back). 0.2.0 only added `update.only-if`, so a 0.1.0 update has no guard.

use super::bindings_v0_1::kaleidoscope::handler::types as old;
use super::wit as new;

/// The current contract's entry as 0.1.0 knows it.
pub fn entry(entry: &new::Entry) -> old::Entry {
    old::Entry {
        source: entry.source.clone(),
        id: entry.id.clone(),
        fields: entry.fields.clone(),
        deliveries: entry.deliveries,
    }
}

/// A 0.1.0 manifest in the current contract's type.
pub fn manifest(manifest: old::Manifest) -> new::Manifest {
    new::Manifest {
        name: manifest.name,
        version: manifest.version,
        streams: manifest.streams,
    }
}

/// A 0.1.0 failure in the current contract's type.
pub fn failure(failure: old::Failure) -> new::Failure {
    match failure {
        old::Failure::Malformed(reason) => new::Failure::Malformed(reason),
        old::Failure::Retry(reason) => new::Failure::Retry(reason),
    }
}

/// A 0.1.0 command in the current contract's type.
pub fn command(command: old::Command) -> new::Command {
    match command {
        old::Command::Upsert(u) => new::Command::Upsert(new::Upsert {
            table: u.table,
            key: column_values(u.key),
            set: column_sets(u.set),
        }),
        old::Command::Update(u) => new::Command::Update(new::Update {
            table: u.table,
            key: column_values(u.key),
            set: column_sets(u.set),
            if_missing: match u.if_missing {
                old::IfMissing::Retry => new::IfMissing::Retry,
                old::IfMissing::Skip => new::IfMissing::Skip,
                old::IfMissing::Fail => new::IfMissing::Fail,
            },
            only_if: Vec::new(),
        }),
        old::Command::Insert(i) => new::Command::Insert(new::Insert {
            table: i.table,
            values: column_values(i.values),
            on_conflict: match i.on_conflict {
                old::OnConflict::Ignore => new::OnConflict::Ignore,
                old::OnConflict::Error => new::OnConflict::Error,
            },
        }),
        old::Command::Delete(d) => new::Command::Delete(new::Delete {
            table: d.table,
            key: column_values(d.key),
        }),
        old::Command::Emit(e) => new::Command::Emit(new::Emit {
            target: e.target,
            fields: e.fields,
        }),
    }
}

fn column_values(values: Vec<old::ColumnValue>) -> Vec<new::ColumnValue> {
    values
        .into_iter()
        .map(|c| new::ColumnValue {
            column: c.column,
            value: value(c.value),
        })
        .collect()
}

fn column_sets(sets: Vec<old::ColumnSet>) -> Vec<new::ColumnSet> {
    sets.into_iter()
        .map(|c| new::ColumnSet {
            column: c.column,
            op: match c.op {
                old::ColumnOp::Assign(v) => new::ColumnOp::Assign(value(v)),
                old::ColumnOp::AppendUnique(items) => new::ColumnOp::AppendUnique(items),
            },
        })
        .collect()
}

fn value(value: old::Value) -> new::Value {
    match value {
        old::Value::Null => new::Value::Null,
        old::Value::Boolean(b) => new::Value::Boolean(b),
        old::Value::Integer(i) => new::Value::Integer(i),
        old::Value::Float(f) => new::Value::Float(f),
        old::Value::Text(s) => new::Value::Text(s),
        old::Value::Json(s) => new::Value::Json(s),
        old::Value::TextArray(items) => new::Value::TextArray(items),
        old::Value::FloatArray(items) => new::Value::FloatArray(items),
        old::Value::Timestamp(s) => new::Value::Timestamp(s),
    }
}
