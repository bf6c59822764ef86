//! TEST FIXTURE — never deploy. The behaviours the mock plugins are built from, so end-to-end
//! tests can drive traps, loops, memory hogs, slow calls and ungranted writes through the real
//! host. A mock plugin crate is one line of [`mock_plugin!`]: its name, its streams, and the
//! action it performs on every entry (or `scripted`: the entry's `action` field chooses).
//!
//! Actions:
//! - `ok`: insert `ml_processing_errors(source_stream, entry_id, error = <note field>)`;
//! - `panic`: panic with the `note` field in the message (a trap in the host);
//! - `loop`: spin forever (the host's epoch deadline must stop it);
//! - `grow`: allocate without bound (the host's memory cap must stop it);
//! - `sleep`: busy-wait `millis` milliseconds (default 200), then behave like `ok`, and when the
//!   entry has a `target` field also emit `note` to that stream (a write a double would show);
//! - `block`: sleep through WASI (`std::thread::sleep`, a host call the epoch deadline cannot
//!   interrupt) for `millis` milliseconds (default 600,000), then behave like `ok`;
//! - `malformed` / `retry`: return that failure with the `note`;
//! - `nul`: put a NUL character everywhere a plugin hands the host a string: a log line, then a
//!   `malformed` reason (`bad \0 reason: <note>`);
//! - `emit-nul`: emit `a\0b` in field `note` to the stream named by `target`, and behave like `ok`;
//! - `write-table`: insert into the table named by `table` with column `column` = `note`;
//! - `emit`: emit `note` to the stream named by `target`;
//! - `probe-sandbox`: like `ok`, with the note describing what the sandbox let through
//!   (environment variables, the file system, the network);
//! - `setting`: like `ok`, with the error being the operator's setting named by `note`
//!   (`<unset>` when there is none);
//! - `count`: like `ok`, with the error being how many entries this instance has handled,
//!   this one included (1 on a fresh instance);
//! - `log`: log the `note` field as a warning, then like `ok`;
//! - `big`: like `ok`, with an error text of `bytes` bytes (a large answer);
//! - `commands`: the commands written in the `commands` field, a JSON list of
//!   `{"insert": table, "values": {column: value}}`, `{"upsert": table, "key": {…}, "set": {…},
//!   "append": {column: [text, …]}}` (`append` is `append-unique`) and
//!   `{"delete": table, "key": {…}}` (JSON numbers become integers or floats, strings text,
//!   lists of numbers float arrays, lists with a string text arrays);
//! - `touch`: upsert `ml_processing_errors` keyed by (`touched`, `note`), setting `received_at`
//!   to the contract's `now`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Entries handled by this instance (a static lives as long as the instance).
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// Defines and exports a mock handler: `mock_plugin!("name", ["stream", …], "action")` performs
/// `action` on every entry; `mock_plugin!("name", ["stream", …], scripted)` performs the action
/// named by each entry's `action` field (default `ok`). The version is the crate's.
#[macro_export]
macro_rules! mock_plugin {
    ($name:literal, [$($stream:literal),+ $(,)?], scripted) => {
        $crate::mock_plugin!(@define $name, [$($stream),+], |entry| {
            let action = ::kaleidoscope_plugin_sdk::Fields::new(entry)
                .get("action")
                .unwrap_or("ok")
                .to_string();
            $crate::perform(&action, entry)
        });
    };
    ($name:literal, [$($stream:literal),+ $(,)?], $action:literal) => {
        $crate::mock_plugin!(@define $name, [$($stream),+], |entry| $crate::perform($action, entry));
    };
    (@define $name:literal, [$($stream:literal),+], $perform:expr) => {
        struct Mock;

        impl ::kaleidoscope_plugin_sdk::Handler for Mock {
            fn manifest() -> ::kaleidoscope_plugin_sdk::Manifest {
                ::kaleidoscope_plugin_sdk::manifest($name, env!("CARGO_PKG_VERSION"), &[$($stream),+])
            }

            fn handle(
                entry: ::kaleidoscope_plugin_sdk::Entry,
            ) -> ::core::result::Result<
                ::std::vec::Vec<::kaleidoscope_plugin_sdk::Command>,
                ::kaleidoscope_plugin_sdk::Failure,
            > {
                let perform: fn(
                    &::kaleidoscope_plugin_sdk::Entry,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<::kaleidoscope_plugin_sdk::Command>,
                    ::kaleidoscope_plugin_sdk::Failure,
                > = $perform;
                perform(&entry)
            }
        }

        ::kaleidoscope_plugin_sdk::export_handler!(Mock);
    };
}

/// Does what `action` says for `entry`.
pub fn perform(action: &str, entry: &Entry) -> Result<Vec<Command>, Failure> {
    let fields = Fields::new(entry);
    let note = fields.get("note").unwrap_or("").to_string();
    let handled = HANDLED.fetch_add(1, Ordering::Relaxed) + 1;
    let recording = |error: &str| -> Vec<Command> {
        vec![
            sdk::insert("ml_processing_errors")
                .value("source_stream", entry.source.as_str())
                .value("entry_id", entry.id.as_str())
                .value("error", error)
                .into(),
        ]
    };
    let ok = || recording(&note);
    match action {
        "ok" => Ok(ok()),
        "setting" => Ok(recording(
            &sdk::config::get(&note).unwrap_or_else(|| "<unset>".to_string()),
        )),
        "count" => Ok(recording(&handled.to_string())),
        "touch" => Ok(vec![
            sdk::upsert("ml_processing_errors")
                .key("source_stream", "touched")
                .key("entry_id", note.as_str())
                .set("error", "touched")
                .set("received_at", sdk::Value::Now)
                .into(),
        ]),
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
            let millis = fields.i64("millis")?.unwrap_or(200).max(0) as u64;
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(millis) {
                std::hint::spin_loop();
            }
            let mut commands = ok();
            if let Some(target) = fields.get("target") {
                commands.push(sdk::emit(target, [("note", note.as_str())]));
            }
            Ok(commands)
        }
        "block" => {
            let millis = fields.i64("millis")?.unwrap_or(600_000).max(0) as u64;
            std::thread::sleep(Duration::from_millis(millis));
            Ok(ok())
        }
        "nul" => {
            sdk::log::warn(format!("a log line with a \0 in it: {note}"));
            Err(sdk::malformed(format!("bad \0 reason: {note}")))
        }
        "emit-nul" => {
            let mut commands = ok();
            commands.push(sdk::emit(fields.required("target")?, [("note", "a\0b")]));
            Ok(commands)
        }
        "commands" => written_commands(fields.required("commands")?),
        "log" => {
            sdk::log::warn(&note);
            Ok(ok())
        }
        "big" => {
            let bytes = fields.i64("bytes")?.unwrap_or(1 << 20).max(0) as usize;
            Ok(recording(&"x".repeat(bytes)))
        }
        "malformed" => Err(sdk::malformed(note)),
        "retry" => Err(sdk::retry(note)),
        "write-table" => Ok(vec![
            sdk::insert(fields.required("table")?)
                .value(fields.required("column")?, note.as_str())
                .into(),
        ]),
        "emit" => Ok(vec![sdk::emit(
            fields.required("target")?,
            [("note", note.as_str())],
        )]),
        "probe-sandbox" => {
            let env = std::env::vars().count();
            let fs = match std::fs::read_dir("/") {
                Ok(_) => "open",
                Err(_) => "denied",
            };
            let net = match std::net::TcpStream::connect("127.0.0.1:6379") {
                Ok(_) => "open",
                Err(_) => "denied",
            };
            let report = format!("env={env} fs={fs} net={net}");
            Ok(vec![
                sdk::insert("ml_processing_errors")
                    .value("source_stream", entry.source.as_str())
                    .value("entry_id", entry.id.as_str())
                    .value("error", report.as_str())
                    .into(),
            ])
        }
        other => Err(sdk::malformed(format!(
            "field `action`: unknown action {other:?}"
        ))),
    }
}

/// The commands of the `commands` action (see the crate's documentation).
fn written_commands(text: &str) -> Result<Vec<Command>, Failure> {
    use serde_json::Value as Json;
    let bad = |what: &str| sdk::malformed(format!("field `commands`: {what}"));
    let list: Vec<Json> = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let value = |json: &Json| -> sdk::Value {
        match json {
            Json::Number(n) => match n.as_i64() {
                Some(i) => i.into(),
                None => n.as_f64().unwrap_or_default().into(),
            },
            Json::String(s) => s.as_str().into(),
            Json::Bool(b) => (*b).into(),
            Json::Array(items) if items.iter().any(Json::is_string) => items
                .iter()
                .map(|item| item.as_str().unwrap_or_default().to_string())
                .collect::<Vec<String>>()
                .into(),
            Json::Array(items) => items
                .iter()
                .map(|item| item.as_f64().unwrap_or_default())
                .collect::<Vec<f64>>()
                .into(),
            _ => sdk::Value::Null,
        }
    };
    let pairs = |command: &Json, part: &str| -> Vec<(String, sdk::Value)> {
        command[part]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), value(v))).collect())
            .unwrap_or_default()
    };
    let mut commands = Vec::new();
    for command in &list {
        if let Some(table) = command["insert"].as_str() {
            let mut insert = sdk::insert(table);
            for (column, v) in pairs(command, "values") {
                insert = insert.value(&column, v);
            }
            commands.push(insert.into());
        } else if let Some(table) = command["upsert"].as_str() {
            let mut upsert = sdk::upsert(table);
            for (column, v) in pairs(command, "key") {
                upsert = upsert.key(&column, v);
            }
            for (column, v) in pairs(command, "set") {
                upsert = upsert.set(&column, v);
            }
            if let Some(appends) = command["append"].as_object() {
                for (column, items) in appends {
                    let items = items.as_array().into_iter().flatten();
                    upsert = upsert.append_unique(column, items.filter_map(Json::as_str));
                }
            }
            commands.push(upsert.into());
        } else if let Some(table) = command["delete"].as_str() {
            let mut delete = sdk::delete(table);
            for (column, v) in pairs(command, "key") {
                delete = delete.key(&column, v);
            }
            commands.push(delete.into());
        } else {
            return Err(bad(&format!("unknown command {command}")));
        }
    }
    Ok(commands)
}
