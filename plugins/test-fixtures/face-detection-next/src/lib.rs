//! TEST FIXTURE — never deploy. A candidate version (0.2.0) of the shipped `face-detection`
//! plugin, as a team might ship it by mistake, for the rollout tests:
//!
//! - it reads every `bbox` list as `[x, y, width, height]` (the shipped plugin reads corners): the
//!   entries in the real producers' shape get other box columns — valid, wrong commands; entries
//!   in the seed's shape (`boundingBoxX/Y/Width/Height`) come out the same as the live version's;
//! - an entry whose field `candidateFault` is `malformed` fails as malformed (the live version
//!   ignores the field), and one whose field is `trespass` also writes `ml_processing_errors`, a
//!   table face-detection is not granted.

#[path = "../../../face-detection/src/lib.rs"]
#[allow(dead_code)]
mod face_detection;

use face_detection::{BoxLayout, STREAM, to_commands};
use kaleidoscope_plugin_sdk::{
    self as sdk, Command, Entry, Failure, Fields, Handler, Manifest, malformed,
};

struct FaceDetectionNext;

impl Handler for FaceDetectionNext {
    fn manifest() -> Manifest {
        sdk::manifest("face-detection", env!("CARGO_PKG_VERSION"), &[STREAM])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        let fields = Fields::new(&entry);
        let mut commands = to_commands(&fields, BoxLayout::Xywh)?;
        match fields.get("candidateFault") {
            Some("malformed") => return Err(malformed("candidate fault requested by the entry")),
            Some("trespass") => commands.push(
                sdk::insert("ml_processing_errors")
                    .value("source_stream", STREAM)
                    .value("entry_id", entry.id.as_str())
                    .value("error", "written by a candidate that may not")
                    .into(),
            ),
            _ => {}
        }
        Ok(commands)
    }
}

sdk::export_handler!(FaceDetectionNext);
