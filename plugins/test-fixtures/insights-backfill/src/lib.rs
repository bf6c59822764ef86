//! TEST FIXTURE — never deploy. A new version (0.2.0) of the shipped `insights` plugin, as a
//! team ships one after adding a column: it writes what the shipped version writes, and also
//! `media_ai_insights.caption_words` (the caption's word count) for every entry with a caption.
//! The reprocessing tests add the column, then backfill history through this version.

#[path = "../../../insights/src/lib.rs"]
#[allow(dead_code)]
mod insights;

use insights::{STREAM, TABLE, to_commands};
use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest};

struct InsightsBackfill;

impl Handler for InsightsBackfill {
    fn manifest() -> Manifest {
        sdk::manifest("insights", env!("CARGO_PKG_VERSION"), &[STREAM])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        let fields = Fields::new(&entry);
        let mut commands = to_commands(&fields)?;
        if let Some(caption) = fields.get("caption") {
            let words = caption.split_whitespace().count() as i64;
            commands.push(
                sdk::upsert(TABLE)
                    .key("media_id", fields.required_i64("mediaId")?)
                    .set("caption_words", words)
                    .into(),
            );
        }
        Ok(commands)
    }
}

sdk::export_handler!(InsightsBackfill);
