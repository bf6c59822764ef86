//! Plugins built against earlier contracts (`wit/v0.1.0`, `wit/v0.2.0`), the way long-lived
//! plugin hosts keep several extension API versions side by side: their calls go through their
//! own contract's bindings, and these modules turn what crosses the boundary into the current
//! contract's types (and the entry back).
//!
//! - 0.1.0 → 0.2.0 added `update.only-if`: a 0.1.0 update has no guard.
//! - 0.2.0 → 0.3.0 added the `now` value and the `config` import: an older plugin never returns
//!   `now` and sees no settings.

/// The conversions every older contract shares, written once: `old` is the older contract's
/// `types` module and `new` the current one at the place of use.
macro_rules! shared_conversions {
    () => {
        /// The current contract's entry as this contract knows it.
        pub fn entry(entry: &new::Entry) -> old::Entry {
            old::Entry {
                source: entry.source.clone(),
                id: entry.id.clone(),
                fields: entry.fields.clone(),
                deliveries: entry.deliveries,
            }
        }

        /// This contract's manifest in the current contract's type.
        pub fn manifest(manifest: old::Manifest) -> new::Manifest {
            new::Manifest {
                name: manifest.name,
                version: manifest.version,
                streams: manifest.streams,
            }
        }

        /// This contract's failure in the current contract's type.
        pub fn failure(failure: old::Failure) -> new::Failure {
            match failure {
                old::Failure::Malformed(reason) => new::Failure::Malformed(reason),
                old::Failure::Retry(reason) => new::Failure::Retry(reason),
            }
        }

        /// This contract's command in the current contract's type.
        pub fn command(command: old::Command) -> new::Command {
            match command {
                old::Command::Upsert(u) => new::Command::Upsert(new::Upsert {
                    table: u.table,
                    key: column_values(u.key),
                    set: column_sets(u.set),
                }),
                old::Command::Update(u) => new::Command::Update(update(u)),
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

        fn if_missing(if_missing: old::IfMissing) -> new::IfMissing {
            match if_missing {
                old::IfMissing::Retry => new::IfMissing::Retry,
                old::IfMissing::Skip => new::IfMissing::Skip,
                old::IfMissing::Fail => new::IfMissing::Fail,
            }
        }

        fn column_value(c: old::ColumnValue) -> new::ColumnValue {
            new::ColumnValue {
                column: c.column,
                value: value(c.value),
            }
        }

        fn column_values(values: Vec<old::ColumnValue>) -> Vec<new::ColumnValue> {
            values.into_iter().map(column_value).collect()
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
    };
}

/// Contract 0.1.0: updates without `only-if`.
pub mod v0_1 {
    use super::super::bindings_v0_1::kaleidoscope::handler::types as old;
    use super::super::wit as new;

    shared_conversions!();

    fn update(u: old::Update) -> new::Update {
        new::Update {
            table: u.table,
            key: column_values(u.key),
            set: column_sets(u.set),
            if_missing: if_missing(u.if_missing),
            only_if: Vec::new(),
        }
    }
}

/// Contract 0.2.0: everything but `now` and `config`.
pub mod v0_2 {
    use super::super::bindings_v0_2::kaleidoscope::handler::types as old;
    use super::super::wit as new;

    shared_conversions!();

    fn update(u: old::Update) -> new::Update {
        new::Update {
            table: u.table,
            key: column_values(u.key),
            set: column_sets(u.set),
            if_missing: if_missing(u.if_missing),
            only_if: u
                .only_if
                .into_iter()
                .map(|condition| match condition {
                    old::Condition::Equals(c) => new::Condition::Equals(column_value(c)),
                    old::Condition::Differs(c) => new::Condition::Differs(column_value(c)),
                })
                .collect(),
        }
    }
}
