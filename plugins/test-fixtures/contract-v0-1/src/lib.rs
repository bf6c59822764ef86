//! TEST FIXTURE — never deploy. A handler built against contract 0.1.0 (`wit/v0.1.0`), as every
//! plugin compiled before 0.2.0 was: the host must keep loading and running it unchanged.
//! Stream: `mock-v0-1`. Records the entry in `ml_processing_errors` with the `note` field, then
//! updates the row's status (an `update`, the record that changed in 0.2.0) and logs a line.

wit_bindgen::generate!({
    path: "../../../wit/v0.1.0",
    world: "result-handler",
});

use kaleidoscope::handler::log::{Level, log};
// `Command`, `Entry`, `Failure` and `Manifest` come into scope from the world's `use`.
use kaleidoscope::handler::types::{
    ColumnOp, ColumnSet, ColumnValue, IfMissing, Insert, OnConflict, Update, Value,
};

struct ContractV01;

fn text(column: &str, value: &str) -> ColumnValue {
    ColumnValue {
        column: column.to_string(),
        value: Value::Text(value.to_string()),
    }
}

impl Guest for ContractV01 {
    fn manifest() -> Manifest {
        Manifest {
            name: "contract-v0-1".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            streams: vec!["mock-v0-1".to_string()],
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
            "handled by a plugin built against contract 0.1.0",
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
                    op: ColumnOp::Assign(Value::Text("CONTRACT-0.1.0".to_string())),
                }],
                if_missing: IfMissing::Fail,
            }),
        ])
    }
}

export!(ContractV01);
