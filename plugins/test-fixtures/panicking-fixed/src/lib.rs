//! TEST FIXTURE — never deploy. The `panicking` mock after its bug was fixed: same plugin name and
//! stream (`mock-panic`), version 0.2.0, and it succeeds. Used to show that dead letters replayed
//! after a fix are processed.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Handler, Manifest};

struct Fixed;

impl Handler for Fixed {
    fn manifest() -> Manifest {
        sdk::manifest("panicking", env!("CARGO_PKG_VERSION"), &["mock-panic"])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        behaviours::perform("ok", &entry)
    }
}

sdk::export_handler!(Fixed);
