//! The ML side's names, listed once: the streams it reads requests from and writes results to,
//! and the per-service messages of the insights producers. Status, metrics, the request
//! tracker, the simulator, the demo and the bench all take them from here.

/// The request stream for a new post image (backend → ML services; the seed's name).
pub const POST_IMAGE_STREAM: &str = "post-image-processing";
/// The request stream for a new profile picture.
pub const PROFILE_PICTURE_STREAM: &str = "profile-picture-processing";
/// The request stream for an updated post image.
pub const POST_UPDATE_STREAM: &str = "post-update-processing";
/// Every request stream: what the simulator consumes, the request tracker may republish to,
/// and `status` and `/metrics` report.
pub const REQUEST_STREAMS: [&str; 3] = [
    POST_IMAGE_STREAM,
    PROFILE_PICTURE_STREAM,
    POST_UPDATE_STREAM,
];

/// Image insights: the seed's all-in-one message, or one message per service.
pub const INSIGHTS_RESULTS: &str = "ml-insights-results";
/// Faces detected in an image, with their embeddings.
pub const FACE_DETECTION_RESULTS: &str = "face-detection-results";
/// Faces recognised as known users.
pub const FACE_RECOGNITION_RESULTS: &str = "face-recognition-results";
/// A request the ML side could not process.
pub const ERROR_RESULTS: &str = "ml-error-results";
/// The face embedding of a profile picture.
pub const PROFILE_EMBEDDING_RESULTS: &str = "user-profile-face-embedding-results";

/// The seed's inbound result streams: reported by `status` even when no host is running.
pub const SEED_RESULT_STREAMS: [&str; 4] = [
    INSIGHTS_RESULTS,
    FACE_DETECTION_RESULTS,
    FACE_RECOGNITION_RESULTS,
    ERROR_RESULTS,
];

/// Every result stream the ML side writes.
pub const RESULT_STREAMS: [&str; 5] = [
    INSIGHTS_RESULTS,
    FACE_DETECTION_RESULTS,
    FACE_RECOGNITION_RESULTS,
    ERROR_RESULTS,
    PROFILE_EMBEDDING_RESULTS,
];

/// The services whose messages the real insights producers write on [`INSIGHTS_RESULTS`], one
/// message each (the `service` field), in the order they come.
pub const INSIGHTS_SERVICES: [&str; 5] = [
    "moderation",
    "tagging",
    "scene_recognition",
    "image_captioning",
    "image_embedding",
];
