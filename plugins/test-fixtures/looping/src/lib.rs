//! TEST FIXTURE — never deploy. A handler that never returns.
//! Stream: `mock-loop`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Handler, Manifest};

struct Mock;

impl Handler for Mock {
    fn manifest() -> Manifest {
        sdk::manifest("looping", env!("CARGO_PKG_VERSION"), &["mock-loop"])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        behaviours::perform("loop", &entry)
    }
}

sdk::export_handler!(Mock);
