//! TEST FIXTURE — never deploy. A component whose `manifest()` panics; loading it must fail and
//! leave whatever was serving in place.

use kaleidoscope_plugin_sdk::{Command, Entry, Failure, Handler, Manifest};

struct Broken;

impl Handler for Broken {
    fn manifest() -> Manifest {
        panic!("this manifest is broken on purpose")
    }

    fn handle(_entry: Entry) -> Result<Vec<Command>, Failure> {
        Ok(Vec::new())
    }
}

kaleidoscope_plugin_sdk::export_handler!(Broken);
