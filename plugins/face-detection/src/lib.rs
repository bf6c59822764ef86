//! Handler for `face-detection-results`: one row per detected face in `media_detected_faces`, and
//! the media's face-detection status in `media_ai_insights`.
//!
//! Two face shapes arrive (see `wire-format.md`):
//! - real producers: `{"faceId": "<uuid>", "bbox": [xmin, ymin, xmax, ymax], "embedding": [...],
//!   "confidence": 0.97}` — the box is in corner form and is converted to x/y/width/height; an
//!   all-zero embedding means "could not embed" and is stored as NULL;
//! - the seed: `boundingBoxX/Y/Width/Height`, `confidence`, `estimatedAge`, `estimatedGender`,
//!   `dominantEmotion`, and no face id. Such a face gets a deterministic id derived from the media
//!   id and its box (`<mediaId>:<x>:<y>:<w>:<h>`), so a redelivered or repeated message updates the
//!   same row instead of adding a face.
//!
//! A message with no faces is a complete result: the status becomes `COMPLETED` with 0 faces.
//!
//! Setting `bbox` (`[plugins.face-detection.settings]`): how to read a `bbox` list. The Google
//! path sends corners `[xmin, ymin, xmax, ymax]`, the HuggingFace path's documented contract is
//! `[x, y, width, height]`: `bbox = "corners"` (the default) or `bbox = "xywh"`.

use kaleidoscope_plugin_sdk::{
    self as sdk, Command, Entry, Failure, Fields, Handler, Manifest, log, malformed,
};
use serde_json::{Map, Value as Json};

/// The stream this plugin handles.
pub const STREAM: &str = "face-detection-results";

struct FaceDetection;

impl Handler for FaceDetection {
    fn manifest() -> Manifest {
        sdk::manifest("face-detection", env!("CARGO_PKG_VERSION"), &[STREAM])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        let fields = Fields::new(&entry);
        let layout = BoxLayout::from_settings()?;
        let commands = to_commands(&fields, layout)?;
        if let Some(announced) = fields.i64("facesDetected")? {
            let listed = commands
                .iter()
                .filter(|c| matches!(c, Command::Upsert(u) if u.table == "media_detected_faces"))
                .count();
            if usize::try_from(announced).ok() != Some(listed) {
                log::warn(format!(
                    "facesDetected is {announced} but the faces list has {listed}; storing the list"
                ));
            }
        }
        Ok(commands)
    }
}

#[cfg(feature = "export")]
sdk::export_handler!(FaceDetection);

/// How a `bbox` list is laid out (setting `bbox`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BoxLayout {
    /// `[xmin, ymin, xmax, ymax]` (the Google path; the default).
    #[default]
    Corners,
    /// `[x, y, width, height]` (the HuggingFace path's documented contract).
    Xywh,
}

impl BoxLayout {
    /// The layout the operator set, or the default. A value that is neither is an operator's
    /// mistake, not the entry's: the entry is retried (and waits) until the setting is fixed.
    pub fn from_settings() -> Result<Self, Failure> {
        match sdk::config::get("bbox").as_deref().map(str::trim) {
            None | Some("corners") => Ok(BoxLayout::Corners),
            Some("xywh") => Ok(BoxLayout::Xywh),
            Some(other) => Err(sdk::retry(format!(
                "setting `bbox` of plugin face-detection is {other:?}; expected \"corners\" or \"xywh\""
            ))),
        }
    }
}

/// One face, normalised from either shape.
#[derive(Debug, PartialEq)]
pub struct Face {
    pub face_id: String,
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    pub confidence: Option<f64>,
    pub estimated_age: Option<i64>,
    pub estimated_gender: Option<String>,
    pub dominant_emotion: Option<String>,
    pub embedding: Option<Vec<f64>>,
}

/// The insights status upsert first (so the media's row exists), then one upsert per face.
pub fn to_commands(fields: &Fields, layout: BoxLayout) -> Result<Vec<Command>, Failure> {
    let media_id = fields.required_i64("mediaId")?;
    let post_id = fields.i64("postId")?;
    let faces = match fields.json("faces")? {
        Some(Json::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| parse_face(media_id, index, item, layout))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(malformed(format!(
                "field `faces`: expected a JSON list, got {}",
                kind(&other)
            )));
        }
        None if fields.i64("facesDetected")? == Some(0) => Vec::new(),
        None => return Err(malformed("missing field `faces`")),
    };

    let mut commands = Vec::with_capacity(faces.len() + 1);
    commands.push(
        sdk::upsert("media_ai_insights")
            .key("media_id", media_id)
            .set_some("post_id", post_id)
            .set("face_detection_status", "COMPLETED")
            .set("faces_detected", faces.len() as i64)
            .append_unique("services_completed", ["face_detection"])
            .set_some("correlation_id", fields.get("correlationId"))
            .into(),
    );
    for face in faces {
        commands.push(
            sdk::upsert("media_detected_faces")
                .key("media_id", media_id)
                .key("face_id", face.face_id)
                .set_some("post_id", post_id)
                .set("bbox_x", face.x)
                .set("bbox_y", face.y)
                .set("bbox_width", face.width)
                .set("bbox_height", face.height)
                .set_some("confidence", face.confidence)
                .set_some("estimated_age", face.estimated_age)
                .set_some("estimated_gender", face.estimated_gender)
                .set_some("dominant_emotion", face.dominant_emotion)
                .set("embedding", face.embedding)
                .into(),
        );
    }
    if let Some(correlation_id) = fields.get("correlationId") {
        commands.push(sdk::request_result(correlation_id, "face_detection"));
    }
    Ok(commands)
}

/// Normalises the face at `index` of the list; errors name `faces[index].<key>`.
pub fn parse_face(
    media_id: i64,
    index: usize,
    item: &Json,
    layout: BoxLayout,
) -> Result<Face, Failure> {
    let at = |key: &str| format!("faces[{index}].{key}");
    let face = item.as_object().ok_or_else(|| {
        malformed(format!(
            "field `faces`: item {index} is {}, expected an object",
            kind(item)
        ))
    })?;
    let (x, y, width, height) = match face.get("bbox") {
        Some(bbox) => {
            read_box(bbox, layout).map_err(|why| malformed(format!("`{}`: {why}", at("bbox"))))?
        }
        None => (
            number(face, "boundingBoxX", &at)?.ok_or_else(|| missing_box(index))?,
            number(face, "boundingBoxY", &at)?.ok_or_else(|| missing_box(index))?,
            number(face, "boundingBoxWidth", &at)?.ok_or_else(|| missing_box(index))?,
            number(face, "boundingBoxHeight", &at)?.ok_or_else(|| missing_box(index))?,
        ),
    };
    if width < 0.0 || height < 0.0 {
        return Err(malformed(format!(
            "face {index}: negative box size ({width} x {height})"
        )));
    }
    let face_id = match face.get("faceId") {
        Some(Json::String(id)) if !id.trim().is_empty() => id.trim().to_string(),
        Some(Json::Number(id)) => id.to_string(),
        None | Some(Json::Null) => format!("{media_id}:{x}:{y}:{width}:{height}"),
        Some(Json::String(_)) => format!("{media_id}:{x}:{y}:{width}:{height}"),
        Some(other) => {
            return Err(malformed(format!(
                "`{}`: expected a string, got {}",
                at("faceId"),
                kind(other)
            )));
        }
    };
    let embedding = match face.get("embedding") {
        None | Some(Json::Null) => None,
        Some(Json::Array(items)) => {
            let values = items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64().filter(|n| n.is_finite()).ok_or_else(|| {
                        malformed(format!(
                            "`{}`: item {i} is not a finite number",
                            at("embedding")
                        ))
                    })
                })
                .collect::<Result<Vec<f64>, _>>()?;
            // All zeros: the detector could not embed this face.
            (!values.is_empty() && values.iter().any(|v| *v != 0.0)).then_some(values)
        }
        Some(other) => {
            return Err(malformed(format!(
                "`{}`: expected a list of numbers, got {}",
                at("embedding"),
                kind(other)
            )));
        }
    };
    let estimated_age = match number(face, "estimatedAge", &at)? {
        Some(age) if (0.0..=150.0).contains(&age) => Some(age.round() as i64),
        Some(age) => {
            return Err(malformed(format!(
                "`{}`: {age} is not an age (0 to 150)",
                at("estimatedAge")
            )));
        }
        None => None,
    };
    Ok(Face {
        face_id,
        x,
        y,
        width,
        height,
        confidence: number(face, "confidence", &at)?,
        estimated_age,
        estimated_gender: text(face, "estimatedGender"),
        dominant_emotion: text(face, "dominantEmotion"),
        embedding,
    })
}

/// Reads a `bbox` list in `layout` as `(x, y, width, height)`.
fn read_box(bbox: &Json, layout: BoxLayout) -> Result<(f64, f64, f64, f64), String> {
    let shape = match layout {
        BoxLayout::Corners => "[xmin, ymin, xmax, ymax]",
        BoxLayout::Xywh => "[x, y, width, height] (setting bbox = \"xywh\")",
    };
    let items = bbox
        .as_array()
        .filter(|items| items.len() == 4)
        .ok_or_else(|| format!("expected {shape}, got {bbox}"))?;
    let mut numbers = [0.0; 4];
    for (slot, item) in numbers.iter_mut().zip(items) {
        *slot = item
            .as_f64()
            .filter(|n| n.is_finite())
            .ok_or_else(|| format!("expected four finite numbers, got {bbox}"))?;
    }
    match (layout, numbers) {
        (BoxLayout::Corners, [xmin, ymin, xmax, ymax]) => {
            if xmax < xmin || ymax < ymin {
                return Err(format!(
                    "corners out of order (xmax < xmin or ymax < ymin): {bbox}"
                ));
            }
            Ok((xmin, ymin, xmax - xmin, ymax - ymin))
        }
        (BoxLayout::Xywh, [x, y, width, height]) => Ok((x, y, width, height)),
    }
}

fn missing_box(index: usize) -> Failure {
    malformed(format!(
        "face {index}: neither `bbox` nor `boundingBoxX/Y/Width/Height`"
    ))
}

/// An optional finite number in a face object; numbers sent as strings are accepted.
fn number(
    face: &Map<String, Json>,
    key: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<f64>, Failure> {
    let parsed = match face.get(key) {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Number(n)) => n.as_f64(),
        Some(Json::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    parsed
        .filter(|n| n.is_finite())
        .map(Some)
        .ok_or_else(|| malformed(format!("`{}`: expected a finite number", at(key))))
}

fn text(face: &Map<String, Json>, key: &str) -> Option<String> {
    face.get(key)
        .and_then(Json::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "null")
        .map(str::to_string)
}

fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn corner_boxes_become_x_y_width_height() {
        let face = parse_face(
            7,
            0,
            &json!({"faceId": "f1", "bbox": [10, 20, 110, 220]}),
            BoxLayout::Corners,
        )
        .unwrap();
        assert_eq!(
            (face.x, face.y, face.width, face.height),
            (10.0, 20.0, 100.0, 200.0)
        );
        assert_eq!(face.face_id, "f1");
    }

    #[test]
    fn the_bbox_setting_chooses_the_layout() {
        let item = json!({"faceId": "f1", "bbox": [10, 20, 100, 200]});
        assert_eq!(BoxLayout::from_settings().unwrap(), BoxLayout::Corners);
        sdk::config::set("bbox", Some("xywh"));
        let layout = BoxLayout::from_settings().unwrap();
        let face = parse_face(7, 0, &item, layout).unwrap();
        assert_eq!(
            (face.x, face.y, face.width, face.height),
            (10.0, 20.0, 100.0, 200.0)
        );
        sdk::config::set("bbox", Some("diagonal"));
        let error = BoxLayout::from_settings().unwrap_err();
        assert!(matches!(error, Failure::Retry(ref why) if why.contains("diagonal")));
        sdk::config::set("bbox", None);
    }

    #[test]
    fn seed_faces_get_a_deterministic_id() {
        let item = json!({"boundingBoxX": 1.5, "boundingBoxY": 2, "boundingBoxWidth": 3, "boundingBoxHeight": 4});
        let a = parse_face(7, 0, &item, BoxLayout::Corners).unwrap();
        let b = parse_face(7, 3, &item, BoxLayout::Corners).unwrap();
        assert_eq!(a.face_id, "7:1.5:2:3:4");
        assert_eq!(a.face_id, b.face_id);
    }

    #[test]
    fn zero_embeddings_are_dropped() {
        let face = parse_face(
            1,
            0,
            &json!({"bbox": [0, 0, 1, 1], "embedding": [0.0, 0.0]}),
            BoxLayout::Corners,
        )
        .unwrap();
        assert_eq!(face.embedding, None);
    }
}
