//! TEST FIXTURE — never deploy. A handler that allocates memory without bound.
//! Stream: `mock-hog`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Handler, Manifest};

struct Mock;

impl Handler for Mock {
    fn manifest() -> Manifest {
        sdk::manifest("memory-hog", env!("CARGO_PKG_VERSION"), &["mock-hog"])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        behaviours::perform("grow", &entry)
    }
}

sdk::export_handler!(Mock);
