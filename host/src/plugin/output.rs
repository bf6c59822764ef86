//! How much a plugin's answer weighs once it is in the host's memory.
//!
//! A plugin's memory is capped, but what it returns is copied out into the host, and a batch
//! holds every entry's commands until it commits: 40 calls returning tens of megabytes each took
//! a host from 76 MB to 1.2 GB. So a call may return at most [`MAX_CALL_OUTPUT_BYTES`] (more is a
//! `forbidden-command` dead letter), and a batch stops calling the handler once its entries'
//! commands reach [`MAX_BATCH_OUTPUT_BYTES`]: the entries handled so far are committed first,
//! then the rest are handled (see `delivery`).

use super::wit;

/// The most one call's commands may weigh.
pub const MAX_CALL_OUTPUT_BYTES: usize = 16 << 20;

/// The weight of commands a batch holds before it commits what it has and handles the rest.
pub const MAX_BATCH_OUTPUT_BYTES: usize = 32 << 20;

/// About what `commands` take in the host's memory: every string's and array's bytes plus a
/// fixed overhead per value, which is what grows with a hostile answer.
pub fn weight(commands: &[wit::Command]) -> usize {
    commands.iter().map(command_weight).sum()
}

const OVERHEAD: usize = 32;

fn command_weight(command: &wit::Command) -> usize {
    OVERHEAD
        + match command {
            wit::Command::Upsert(u) => u.table.len() + values(&u.key) + sets(&u.set),
            wit::Command::Update(u) => {
                u.table.len()
                    + values(&u.key)
                    + sets(&u.set)
                    + u.only_if
                        .iter()
                        .map(|c| match c {
                            wit::Condition::Equals(v) | wit::Condition::Differs(v) => {
                                column_value(v)
                            }
                        })
                        .sum::<usize>()
            }
            wit::Command::Insert(i) => i.table.len() + values(&i.values),
            wit::Command::Delete(d) => d.table.len() + values(&d.key),
            wit::Command::Emit(e) => {
                e.target.len()
                    + e.fields
                        .iter()
                        .map(|(k, v)| OVERHEAD + k.len() + v.len())
                        .sum::<usize>()
            }
        }
}

fn values(values: &[wit::ColumnValue]) -> usize {
    values.iter().map(column_value).sum()
}

fn column_value(value: &wit::ColumnValue) -> usize {
    OVERHEAD + value.column.len() + value_weight(&value.value)
}

fn sets(sets: &[wit::ColumnSet]) -> usize {
    sets.iter()
        .map(|s| {
            OVERHEAD
                + s.column.len()
                + match &s.op {
                    wit::ColumnOp::Assign(v) => value_weight(v),
                    wit::ColumnOp::AppendUnique(items) => strings(items),
                }
        })
        .sum()
}

fn value_weight(value: &wit::Value) -> usize {
    match value {
        wit::Value::Text(s) | wit::Value::Json(s) | wit::Value::Timestamp(s) => s.len(),
        wit::Value::TextArray(items) => strings(items),
        wit::Value::FloatArray(items) => items.len() * 8,
        wit::Value::Null
        | wit::Value::Boolean(_)
        | wit::Value::Integer(_)
        | wit::Value::Float(_)
        | wit::Value::Now => 8,
    }
}

fn strings(items: &[String]) -> usize {
    items.iter().map(|s| OVERHEAD + s.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_grows_with_the_bytes_returned() {
        let insert = |text: &str| {
            wit::Command::Insert(wit::Insert {
                table: "t".into(),
                values: vec![wit::ColumnValue {
                    column: "c".into(),
                    value: wit::Value::Text(text.into()),
                }],
                on_conflict: wit::OnConflict::Error,
            })
        };
        let small = weight(&[insert("x")]);
        let large = weight(&[insert(&"x".repeat(1 << 20))]);
        assert!(small < 200, "{small}");
        assert!((1 << 20..(1 << 20) + 200).contains(&large), "{large}");
        assert_eq!(weight(&[insert("x"), insert("x")]), 2 * small);
    }
}
