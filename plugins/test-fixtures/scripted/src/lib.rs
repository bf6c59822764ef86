//! TEST FIXTURE — never deploy. A handler whose behaviour each entry chooses with its `action`
//! field (see the `behaviours` crate). Streams: `scripted` and `scripted-2`.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest};

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
        let action = Fields::new(&entry)
            .get("action")
            .unwrap_or("ok")
            .to_string();
        behaviours::perform(&action, &entry)
    }
}

sdk::export_handler!(Scripted);
