//! TEST FIXTURE — never deploy. A handler that panics on every entry.
//! Stream: `mock-panic`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Handler, Manifest};

struct Mock;

impl Handler for Mock {
    fn manifest() -> Manifest {
        sdk::manifest("panicking", env!("CARGO_PKG_VERSION"), &["mock-panic"])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        behaviours::perform("panic", &entry)
    }
}

sdk::export_handler!(Mock);
