//! `kaleidoscope simulate-ml`: a reference ML service for demos, end-to-end tests and load.
//!
//! It consumes the request streams with a consumer group of its own and publishes results in the
//! real producers' shapes (wire-format page): five insights messages per image (one per service),
//! a face-detection result with detector face ids, corner-form boxes and embeddings, recognitions
//! for some faces, a face embedding per profile picture, and — at the configured rate — an error
//! on `ml-error-results` instead of results. Everything it produces for a media (or user) is
//! deterministic, derived from its id.

use crate::config::Config;
use crate::ml::{
    ERROR_RESULTS, FACE_DETECTION_RESULTS, FACE_RECOGNITION_RESULTS, INSIGHTS_RESULTS,
    PROFILE_EMBEDDING_RESULTS, PROFILE_PICTURE_STREAM, REQUEST_STREAMS,
};
use crate::redis_connection::RedisConnection;
use crate::shutdown::Shutdown;
use crate::streams::{self, StreamEntry};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// How the simulator behaves.
#[derive(Clone, Debug)]
pub struct SimulatorOptions {
    /// Fraction of requests (0.0–1.0) answered with an error instead of results.
    pub error_rate: f64,
    /// Length of image and face embeddings (the real services send 1408).
    pub embedding_dims: usize,
    /// The simulator's consumer group on the request streams.
    pub group: String,
    /// Its consumer name.
    pub consumer: String,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            embedding_dims: 1408,
            group: "ml-simulator".into(),
            consumer: "simulator".into(),
        }
    }
}

/// What the simulator did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimulatorStats {
    pub requests: u64,
    pub errors: u64,
    pub results: u64,
}

/// Runs until `stop` turns true: one reader per request stream, each on a connection of its
/// own (a blocking read names one stream, so it also works on a Redis Cluster, where the
/// streams may sit on different nodes).
pub async fn run(
    config: &Config,
    options: &SimulatorOptions,
    stop: Shutdown,
) -> Result<SimulatorStats> {
    let mut readers = tokio::task::JoinSet::new();
    for stream in REQUEST_STREAMS {
        let (config, options, stop) = (config.clone(), options.clone(), stop.clone());
        readers.spawn(async move { answer_stream(&config, &options, stream, stop).await });
    }
    info!(group = %options.group, error_rate = options.error_rate, "ML simulator consuming requests");
    let mut stats = SimulatorStats::default();
    while let Some(done) = readers.join_next().await {
        let done = done.context("a simulator task failed")??;
        stats.requests += done.requests;
        stats.errors += done.errors;
        stats.results += done.results;
    }
    Ok(stats)
}

/// Answers the requests of one request stream until `stop` turns true.
async fn answer_stream(
    config: &Config,
    options: &SimulatorOptions,
    stream: &str,
    mut stop: Shutdown,
) -> Result<SimulatorStats> {
    // Its reads block for half a second at most; the usual response timeout covers that.
    let mut conn = crate::redis_connection::open(config)
        .await
        .context("the simulator cannot connect to Redis")?;
    let key = config.stream_key(stream);
    streams::ensure_group(&mut conn, &key, &options.group, None).await?;
    let keys = [key];
    let mut stats = SimulatorStats::default();
    while !stop.requested() {
        let read = streams::read_new_from(
            &mut conn,
            &keys,
            &options.group,
            &options.consumer,
            50,
            Duration::from_millis(500),
        );
        let entries = tokio::select! {
            entries = read => entries,
            _ = stop.wait() => break,
        };
        let entries = match entries {
            Ok(entries) => entries,
            Err(error) => {
                warn!(stream, "simulator read failed: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for (key, entry) in entries {
            answer(&mut conn, config, options, &key, &entry, &mut stats).await?;
            streams::ack(
                &mut conn,
                &key,
                &options.group,
                std::slice::from_ref(&entry.id),
            )
            .await?;
        }
    }
    Ok(stats)
}

/// Publishes the results (or the error) for one request.
///
/// Long on purpose: one branch per request stream, each writing the producers' real shapes
/// field by field, reads more plainly than helpers that each build half a message.
async fn answer(
    conn: &mut RedisConnection,
    config: &Config,
    options: &SimulatorOptions,
    key: &str,
    entry: &StreamEntry,
    stats: &mut SimulatorStats,
) -> Result<()> {
    let fields: HashMap<String, String> = entry
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let get = |name: &str| fields.get(name).cloned().unwrap_or_default();
    let correlation_id = get("correlationId");
    let profile = key == config.stream_key(PROFILE_PICTURE_STREAM);
    let subject: i64 = get(if profile { "userId" } else { "mediaId" })
        .parse()
        .unwrap_or(0);
    let mut rng = Rng::new(subject as u64 ^ if profile { 0xA11CE } else { 0 });
    stats.requests += 1;

    let messages: Vec<(&str, Vec<(String, String)>)> = if rng.chance(options.error_rate) {
        stats.errors += 1;
        vec![(
            ERROR_RESULTS,
            vec![
                ("correlationId".into(), correlation_id.clone()),
                (
                    "error".into(),
                    format!(
                        "simulated failure processing {} {subject}",
                        if profile { "user" } else { "media" }
                    ),
                ),
                ("status".into(), "FAILED".into()),
            ],
        )]
    } else if profile {
        let embedding = if rng.chance(0.2) {
            "[]".to_string()
        } else {
            floats(&mut rng, options.embedding_dims)
        };
        vec![(
            PROFILE_EMBEDDING_RESULTS,
            vec![
                ("userId".into(), subject.to_string()),
                ("faceEmbedding".into(), embedding),
                ("correlationId".into(), correlation_id.clone()),
            ],
        )]
    } else {
        image_results(
            &mut rng,
            options,
            &get("postId"),
            subject,
            &get("uploaderId"),
            &correlation_id,
        )
    };
    stats.results += messages.len() as u64;
    publish(conn, config, &messages).await
}

/// Adds `messages` to their streams (capped, as a producer would), in one round trip (one per
/// node on a cluster).
async fn publish(
    conn: &mut RedisConnection,
    config: &Config,
    messages: &[(&str, Vec<(String, String)>)],
) -> Result<()> {
    let commands = messages
        .iter()
        .map(|(stream, fields)| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(config.stream_key(stream))
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*");
            for (k, v) in fields {
                cmd.arg(k).arg(v);
            }
            cmd
        })
        .collect();
    let replies = conn
        .pipelined(commands)
        .await
        .context("the simulator cannot publish results")?;
    for (reply, (stream, _)) in replies.into_iter().zip(messages) {
        if let redis::Value::ServerError(error) = reply {
            anyhow::bail!("the simulator cannot publish to {stream:?}: {error}");
        }
    }
    Ok(())
}

const TAGS: [&str; 12] = [
    "beach", "sunset", "people", "dog", "city", "mountain", "food", "car", "tree", "snow", "party",
    "sea",
];
const SCENES: [&str; 6] = ["outdoor", "indoor", "urban", "nature", "night", "coast"];
const SUBJECTS: [&str; 5] = [
    "A group of people",
    "A dog",
    "Two friends",
    "A plate of food",
    "A quiet street",
];
const PLACES: [&str; 5] = [
    "at a beach",
    "in a park",
    "at night",
    "in the snow",
    "by the sea",
];

/// The five insights results, face detection and recognition for one post image, in the shapes
/// the real services write. Long on purpose: it is a template of wire messages, one per service.
fn image_results(
    rng: &mut Rng,
    options: &SimulatorOptions,
    post_id: &str,
    media_id: i64,
    uploader_id: &str,
    correlation_id: &str,
) -> Vec<(&'static str, Vec<(String, String)>)> {
    let image = Image {
        post_id,
        media_id,
        uploader_id,
        correlation_id,
        timestamp: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
    };
    let mut messages = insight_messages(rng, options, &image);
    messages.extend(face_messages(rng, options, &image));
    messages
}

/// What every result about one image carries.
struct Image<'a> {
    post_id: &'a str,
    media_id: i64,
    uploader_id: &'a str,
    correlation_id: &'a str,
    timestamp: String,
}

impl Image<'_> {
    /// The fields common to every per-service insights message, then `extra`.
    fn service_fields(&self, service: &str, extra: Vec<(&str, String)>) -> Vec<(String, String)> {
        let mut fields = vec![
            ("mediaId".into(), self.media_id.to_string()),
            ("postId".into(), self.post_id.to_string()),
            ("service".into(), service.to_string()),
            ("correlationId".into(), self.correlation_id.to_string()),
            ("timestamp".into(), self.timestamp.clone()),
            ("version".into(), "1".into()),
        ];
        fields.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
        fields
    }
}

/// One insights message per service, as the real producers write them.
fn insight_messages(
    rng: &mut Rng,
    options: &SimulatorOptions,
    image: &Image<'_>,
) -> Vec<(&'static str, Vec<(String, String)>)> {
    let tags: Vec<&str> = (0..2 + rng.below(3))
        .map(|_| TAGS[rng.below(TAGS.len())])
        .collect();
    let scenes: Vec<&str> = (0..rng.below(3))
        .map(|_| SCENES[rng.below(SCENES.len())])
        .collect();
    let caption = format!(
        "{} {}",
        SUBJECTS[rng.below(SUBJECTS.len())],
        PLACES[rng.below(PLACES.len())]
    );
    let moderation = vec![
        ("isSafe", (!rng.chance(0.1)).to_string()),
        (
            "moderationConfidence",
            format!("{:.4}", 0.5 + rng.unit() / 2.0),
        ),
    ];
    let embedding = floats(rng, options.embedding_dims);
    [
        image.service_fields("moderation", moderation),
        image.service_fields("tagging", vec![("tags", json_strings(&tags))]),
        image.service_fields("scene_recognition", vec![("scenes", json_strings(&scenes))]),
        image.service_fields("image_captioning", vec![("caption", caption)]),
        image.service_fields("image_embedding", vec![("imageEmbedding", embedding)]),
    ]
    .into_iter()
    .map(|fields| (INSIGHTS_RESULTS, fields))
    .collect()
}

/// The faces detected in the image (0–3, with embeddings), and for an uploader, a recognition
/// for about half of them.
fn face_messages(
    rng: &mut Rng,
    options: &SimulatorOptions,
    image: &Image<'_>,
) -> Vec<(&'static str, Vec<(String, String)>)> {
    let face_count = rng.below(4);
    let mut faces = Vec::new();
    let mut face_ids = Vec::new();
    for _ in 0..face_count {
        let face_id = uuid(rng);
        let (x, y) = (rng.below(800), rng.below(600));
        let (w, h) = (40 + rng.below(200), 40 + rng.below(200));
        let embedding = if rng.chance(0.1) {
            format!("[{}]", vec!["0.0"; options.embedding_dims].join(", "))
        } else {
            floats(rng, options.embedding_dims)
        };
        faces.push(format!(
            r#"{{"faceId": "{face_id}", "bbox": [{x}, {y}, {}, {}], "embedding": {embedding}, "confidence": {:.4}}}"#,
            x + w,
            y + h,
            0.6 + rng.unit() * 0.4
        ));
        face_ids.push(face_id);
    }
    let mut messages = vec![(
        FACE_DETECTION_RESULTS,
        vec![
            ("mediaId".into(), image.media_id.to_string()),
            ("postId".into(), image.post_id.to_string()),
            ("facesDetected".into(), face_count.to_string()),
            ("faces".into(), format!("[{}]", faces.join(", "))),
            ("correlationId".into(), image.correlation_id.to_string()),
            ("timestamp".into(), image.timestamp.clone()),
            ("version".into(), "1".into()),
        ],
    )];
    if image.uploader_id.is_empty() {
        return messages;
    }
    for face_id in face_ids {
        if rng.chance(0.5) {
            messages.push((
                FACE_RECOGNITION_RESULTS,
                vec![
                    ("mediaId".into(), image.media_id.to_string()),
                    ("postId".into(), image.post_id.to_string()),
                    ("faceId".into(), face_id),
                    ("suggestedUserId".into(), image.uploader_id.to_string()),
                    (
                        "matchedUsername".into(),
                        format!("user{}", image.uploader_id),
                    ),
                    (
                        "confidenceScore".into(),
                        format!("{:.4}", 0.7 + rng.unit() * 0.3),
                    ),
                    ("correlationId".into(), image.correlation_id.to_string()),
                ],
            ));
        }
    }
    messages
}

fn json_strings(items: &[&str]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn floats(rng: &mut Rng, dims: usize) -> String {
    let values: Vec<String> = (0..dims)
        .map(|_| format!("{:.6}", rng.unit() * 2.0 - 1.0))
        .collect();
    format!("[{}]", values.join(", "))
}

fn uuid(rng: &mut Rng) -> String {
    let hex = format!("{:016x}{:016x}", rng.next(), rng.next());
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// splitmix64: deterministic per subject id.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}
