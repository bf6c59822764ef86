//! TEST FIXTURE — never deploy. A component whose `manifest()` never returns: loading it must
//! give up at the plugin deadline and leave whatever was serving in place.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Handler, Manifest};

struct Mock;

impl Handler for Mock {
    fn manifest() -> Manifest {
        let mut counter: u64 = 0;
        loop {
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }

    fn handle(_entry: Entry) -> Result<Vec<Command>, Failure> {
        Ok(Vec::new())
    }
}

sdk::export_handler!(Mock);
