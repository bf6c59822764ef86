//! Handler for `ml-insights-results`: merges partial image insights into `media_ai_insights`.
//!
//! Two shapes arrive on this stream (see `wire-format.md`):
//! - the real producers send one message per (media, service), with `service` naming one of
//!   [`SERVICES`] and only that service's fields;
//! - the seed's design sends one all-in-one message with `detectedObjects`, `scenes`, `colors`,
//!   `qualityScore`, `hasAdultContent`, `hasViolentContent`, `dominantEmotion`.
//!
//! Either way the handler emits one upsert that assigns only the columns whose fields are present,
//! so results for one media merge in any order, and appends the reporting service to
//! `services_completed`.

use kaleidoscope_plugin_sdk::{
    self as sdk, Command, Entry, Failure, Fields, Handler, Manifest, malformed,
};

/// The stream this plugin handles.
pub const STREAM: &str = "ml-insights-results";
/// The table it writes.
pub const TABLE: &str = "media_ai_insights";

/// The services of the real producers, each with the field it must carry.
pub const SERVICES: [(&str, &str); 5] = [
    ("moderation", "isSafe"),
    ("tagging", "tags"),
    ("scene_recognition", "scenes"),
    ("image_captioning", "caption"),
    ("image_embedding", "imageEmbedding"),
];

struct Insights;

impl Handler for Insights {
    fn manifest() -> Manifest {
        sdk::manifest("insights", env!("CARGO_PKG_VERSION"), &[STREAM])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        to_commands(&Fields::new(&entry))
    }
}

#[cfg(feature = "export")]
sdk::export_handler!(Insights);

/// The upsert for one insights message.
pub fn to_commands(fields: &Fields) -> Result<Vec<Command>, Failure> {
    let media_id = fields.required_i64("mediaId")?;
    let service = fields.get("service");
    if let Some(service) = service {
        let (_, required_field) = SERVICES
            .iter()
            .find(|(name, _)| *name == service)
            .ok_or_else(|| {
                malformed(format!(
                    "field `service`: unknown service {service:?} (expected one of {})",
                    SERVICES.map(|(name, _)| name).join(", ")
                ))
            })?;
        fields.required(required_field).map_err(|_| {
            malformed(format!(
                "missing field `{required_field}` for service {service:?}"
            ))
        })?;
    }

    let mut upsert = sdk::upsert(TABLE)
        .key("media_id", media_id)
        .set_some("post_id", fields.i64("postId")?)
        .set_some("is_safe", fields.bool("isSafe")?)
        .set_some("moderation_confidence", fields.f64("moderationConfidence")?)
        .set_some("caption", fields.get("caption"))
        .set_some("tags", fields.string_list("tags")?)
        .set_some("scenes", fields.string_list("scenes")?)
        .set_some("detected_objects", fields.string_list("detectedObjects")?)
        .set_some("colors", fields.string_list("colors")?)
        .set_some("quality_score", fields.f64("qualityScore")?)
        .set_some("has_adult_content", fields.bool("hasAdultContent")?)
        .set_some("has_violent_content", fields.bool("hasViolentContent")?)
        .set_some("dominant_emotion", fields.get("dominantEmotion"))
        .set_some("image_embedding", fields.f64_list("imageEmbedding")?)
        .set_some("correlation_id", fields.get("correlationId"));

    let carries_insight = [
        "isSafe",
        "moderationConfidence",
        "caption",
        "tags",
        "scenes",
        "detectedObjects",
        "colors",
        "qualityScore",
        "hasAdultContent",
        "hasViolentContent",
        "dominantEmotion",
        "imageEmbedding",
    ]
    .iter()
    .any(|name| fields.has(name));
    if !carries_insight {
        return Err(malformed(
            "entry carries no insight: expected a `service` field or one of the seed's insight \
             fields (detectedObjects, scenes, colors, qualityScore, ...)",
        ));
    }
    if let Some(service) = service {
        upsert = upsert.append_unique("services_completed", [service]);
    }
    let mut commands = vec![upsert.into()];
    if let Some(correlation_id) = fields.get("correlationId") {
        // The seed's all-in-one message stands for all five services.
        commands.push(sdk::request_result(
            correlation_id,
            service.unwrap_or("insights"),
        ));
    }
    Ok(commands)
}
