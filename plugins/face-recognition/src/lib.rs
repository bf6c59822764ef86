//! Handler for `face-recognition-results`: links a detected face to the user it probably shows.
//!
//! The join key is the detector's face id (`faceId`, a UUID string) together with `mediaId`; the
//! original consumer's guesses (parsing it as a number, or picking the most confident face of the
//! media) linked wrong faces. A recognition can overtake the detection of its face: the update
//! then finds no row and the entry is retried until the detection has been stored.
//!
//! A face a person has `CONFIRMED` is theirs: a late recognition never changes it (neither its
//! status nor its suggestion). The update is guarded (contract 0.2.0), so for such a face it is a
//! no-op rather than a retry.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest};

/// The stream this plugin handles.
pub const STREAM: &str = "face-recognition-results";

struct FaceRecognition;

impl Handler for FaceRecognition {
    fn manifest() -> Manifest {
        sdk::manifest("face-recognition", env!("CARGO_PKG_VERSION"), &[STREAM])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        to_commands(&Fields::new(&entry))
    }
}

sdk::export_handler!(FaceRecognition);

/// One update of the face (unless it is confirmed), retried while the face is not stored yet.
pub fn to_commands(fields: &Fields) -> Result<Vec<Command>, Failure> {
    let media_id = fields.required_i64("mediaId")?;
    let face_id = fields.required("faceId")?;
    let user_id = fields.required_i64("suggestedUserId")?;
    Ok(vec![
        sdk::update("media_detected_faces")
            .key("media_id", media_id)
            .key("face_id", face_id)
            .set("suggested_user_id", user_id)
            .set_some("matched_username", fields.get("matchedUsername"))
            .set_some("match_confidence", fields.f64("confidenceScore")?)
            .set("status", "SUGGESTED")
            .unless("status", "CONFIRMED")
            .if_missing(sdk::IfMissing::Retry)
            .into(),
    ])
}
