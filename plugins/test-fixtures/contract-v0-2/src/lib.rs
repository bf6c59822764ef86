//! TEST FIXTURE — never deploy. A handler built against contract 0.2.0 (`wit/v0.2.0`), as every
//! plugin compiled before 0.3.0 was: the host must keep loading and running it unchanged, on a
//! fresh instance per call as 0.2.0 promised. Stream: `mock-v0-2`. Records the entry in
//! `ml_processing_errors` with the `note` field, then updates the row's status with a guarded
//! `update` to `CONTRACT-0.2.0 call <n>`, `n` counting the calls of this instance.

wit_bindgen::generate!({
    path: "../../../wit/v0.2.0",
    world: "result-handler",
});

use kaleidoscope::handler::log::{Level, log};
// `Command`, `Entry`, `Failure` and `Manifest` come into scope from the world's `use`.
use kaleidoscope::handler::types::{
    ColumnOp, ColumnSet, ColumnValue, Condition, IfMissing, Insert, OnConflict, Update, Value,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// Calls of this instance.
static CALLS: AtomicU64 = AtomicU64::new(0);

struct ContractV02;

fn text(column: &str, value: &str) -> ColumnValue {
    ColumnValue {
        column: column.to_string(),
        value: Value::Text(value.to_string()),
    }
}

impl Guest for ContractV02 {
    fn manifest() -> Manifest {
        Manifest {
            name: "contract-v0-2".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            streams: vec!["mock-v0-2".to_string()],
        }
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        let note = entry
            .fields
            .iter()
            .find(|(k, _)| k == "note")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Failure::Malformed("field `note` is missing".to_string()))?;
        log(
            Level::Info,
            "handled by a plugin built against contract 0.2.0",
        );
        let key = vec![
            text("source_stream", &entry.source),
            text("entry_id", &entry.id),
        ];
        Ok(vec![
            Command::Insert(Insert {
                table: "ml_processing_errors".to_string(),
                values: [key.clone(), vec![text("error", &note)]].concat(),
                on_conflict: OnConflict::Ignore,
            }),
            Command::Update(Update {
                table: "ml_processing_errors".to_string(),
                key,
                set: vec![ColumnSet {
                    column: "status".to_string(),
                    op: ColumnOp::Assign(Value::Text(format!(
                        "CONTRACT-0.2.0 call {}",
                        CALLS.fetch_add(1, Ordering::Relaxed) + 1
                    ))),
                }],
                if_missing: IfMissing::Fail,
                only_if: vec![Condition::Differs(text("status", "CONFIRMED"))],
            }),
        ])
    }
}

export!(ContractV02);
