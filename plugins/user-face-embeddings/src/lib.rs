//! Handler for `user-profile-face-embedding-results`: the face embedding of a user's profile
//! picture, one row per user in `user_face_embeddings` (replaced by each new picture).
//!
//! Fields: `userId`, `faceEmbedding` (JSON list of floats, `[]` when no face was found),
//! `correlationId`. An empty list is a complete result with nothing to store: the entry is
//! acknowledged without writing an embedding (only the request it answers is marked).

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest};

/// The stream this plugin handles.
pub const STREAM: &str = "user-profile-face-embedding-results";

struct UserFaceEmbeddings;

impl Handler for UserFaceEmbeddings {
    fn manifest() -> Manifest {
        sdk::manifest("user-face-embeddings", env!("CARGO_PKG_VERSION"), &[STREAM])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        let fields = Fields::new(&entry);
        let user_id = fields.required_i64("userId")?;
        let embedding = fields
            .f64_list("faceEmbedding")?
            .ok_or_else(|| sdk::malformed("missing field `faceEmbedding`"))?;
        let mut commands = Vec::new();
        if embedding.is_empty() {
            sdk::log::info(format!(
                "no face found in the profile picture of user {user_id}"
            ));
        } else {
            commands.push(
                sdk::upsert("user_face_embeddings")
                    .key("user_id", user_id)
                    .set("embedding", embedding)
                    .set_some("correlation_id", fields.get("correlationId"))
                    .into(),
            );
        }
        // The result answers the request it belongs to, also when no face was found.
        if let Some(correlation_id) = fields.get("correlationId") {
            commands.push(sdk::request_result(
                correlation_id,
                "profile_face_embedding",
            ));
        }
        Ok(commands)
    }
}

sdk::export_handler!(UserFaceEmbeddings);
