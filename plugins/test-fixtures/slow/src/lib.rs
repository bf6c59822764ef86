//! TEST FIXTURE — never deploy. A handler that takes `millis` (default 200) ms per entry, then succeeds.
//! Stream: `mock-slow`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Handler, Manifest};

struct Mock;

impl Handler for Mock {
    fn manifest() -> Manifest {
        sdk::manifest("slow", env!("CARGO_PKG_VERSION"), &["mock-slow"])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        behaviours::perform("sleep", &entry)
    }
}

sdk::export_handler!(Mock);
