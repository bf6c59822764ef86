//! TEST FIXTURE — never deploy. A handler whose behaviour each entry chooses, so end-to-end tests
//! can script traps, loops, memory hogs, slow calls and arbitrary commands against the real host.
//!
//! Streams: `scripted` (and `scripted-2` so tests can watch a second stream keep flowing).
//! The `action` field selects what happens:
//! - `ok` (default): insert `ml_processing_errors(source_stream, entry_id, error = <note>)`;
//! - `panic`: panic with the `note` field as message (a trap in the host);
//! - `loop`: spin forever (the host's epoch deadline must stop it);
//! - `grow`: allocate without bound (the host's memory cap must stop it);
//! - `sleep`: busy-wait `millis` milliseconds, then behave like `ok`;
//! - `malformed` / `retry`: return that failure with the `note`;
//! - `write-table`: insert into the table named by `table` with column `column` = `note`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest};
use std::time::{Duration, Instant};

struct Scripted;

impl Handler for Scripted {
    fn manifest() -> Manifest {
        sdk::manifest(
            "scripted",
            env!("CARGO_PKG_VERSION"),
            &["scripted", "scripted-2"],
        )
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        let fields = Fields::new(&entry);
        let note = fields.get("note").unwrap_or("").to_string();
        let ok = || -> Vec<Command> {
            vec![
                sdk::insert("ml_processing_errors")
                    .value("source_stream", entry.source.as_str())
                    .value("entry_id", entry.id.as_str())
                    .value("error", note.as_str())
                    .into(),
            ]
        };
        match fields.get("action").unwrap_or("ok") {
            "ok" => Ok(ok()),
            "panic" => panic!("scripted panic: {note}"),
            "loop" => {
                let mut counter: u64 = 0;
                loop {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            }
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "sleep" => {
                let millis = fields.i64("millis")?.unwrap_or(100).max(0) as u64;
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(millis) {
                    std::hint::spin_loop();
                }
                Ok(ok())
            }
            "malformed" => Err(sdk::malformed(note)),
            "retry" => Err(sdk::retry(note)),
            "write-table" => Ok(vec![
                sdk::insert(fields.required("table")?)
                    .value(fields.required("column")?, note.as_str())
                    .into(),
            ]),
            other => Err(sdk::malformed(format!(
                "field `action`: unknown action {other:?}"
            ))),
        }
    }
}

sdk::export_handler!(Scripted);
