//! TEST FIXTURE — never deploy. A handler that writes the table named by the entry's `table` field (tests grant it nothing).
//! Stream: `mock-trespass`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Handler, Manifest};

struct Mock;

impl Handler for Mock {
    fn manifest() -> Manifest {
        sdk::manifest("trespasser", env!("CARGO_PKG_VERSION"), &["mock-trespass"])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        behaviours::perform("write-table", &entry)
    }
}

sdk::export_handler!(Mock);
