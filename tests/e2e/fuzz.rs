//! Randomised inputs against the real shipped plugin components: any field map must yield
//! commands or a `malformed`/`retry` failure, never a trap, a timeout or a memory-limit hit.
//!
//! Deterministic (fixed seeds) so a failure reproduces; the failing input is printed.

use kaleidoscope::plugin::{HandlerOutcome, PluginRuntime, SandboxLimits, wit};
use std::time::Duration;

/// Cases per plugin.
const CASES: usize = 400;

/// xorshift64*: small, deterministic, good enough to pick inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// A value drawn from the shapes that break parsers: empties, sentinels, extreme numbers,
/// malformed and valid JSON of many shapes, long and odd text.
fn value(rng: &mut Rng, depth: usize) -> String {
    match rng.below(16) {
        0 => String::new(),
        1 => rng
            .pick(&[
                "null", "true", "false", "NaN", "inf", "-inf", "1e400", "-0", "0x10",
            ])
            .to_string(),
        2 => rng.next().to_string(),
        3 => format!("-{}", rng.next()),
        4 => format!(
            "{}.{}e{}",
            rng.below(1000),
            rng.below(1000),
            rng.below(700) as i64 - 350
        ),
        5 => "9".repeat(1 + rng.below(40)),
        6 => format!(
            "[{}]",
            (0..rng.below(20))
                .map(|_| (rng.below(2000) as f64 / 7.0).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        7 => format!(
            "[{}]",
            (0..rng.below(8))
                .map(|_| format!(
                    "\"{}\"",
                    rng.pick(&["a", "b c", "", "é", "\\u0000", "\\\""])
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        8 if depth < 3 => format!(
            "[{}]",
            (0..rng.below(4))
                .map(|_| face(rng, depth + 1))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        9 => format!(
            "{}{}",
            "[".repeat(rng.below(300)),
            "]".repeat(rng.below(300))
        ),
        10 => rng
            .pick(&[
                "{",
                "}",
                "[1,",
                "[\"a\"",
                "{\"a\":}",
                "[[[]]]",
                "[{}]",
                "[null]",
                "{\"bbox\": 1}",
            ])
            .to_string(),
        11 => "x".repeat(rng.below(100_000)),
        12 => rng
            .pick(&[
                "moderation",
                "tagging",
                "scene_recognition",
                "image_captioning",
                "image_embedding",
                "other",
                "FAILED",
            ])
            .to_string(),
        13 => rng.pick(&["a, b, ,c", ",,,", " , ", "💥, ☃"]).to_string(),
        14 => (rng.below(5) as i64 - 2).to_string(),
        _ => format!("{:x}", rng.next()),
    }
}

/// Half the time a plausible value for a known field (so the generator also reaches the
/// success paths and their deeper parsing), otherwise anything [`value`] makes.
fn value_for(rng: &mut Rng, name: &str) -> String {
    if rng.below(2) == 0 {
        return value(rng, 0);
    }
    match name {
        "mediaId" | "postId" | "userId" | "suggestedUserId" | "retryCount" | "facesDetected"
        | "timestamp" => rng.below(1000).to_string(),
        "faces" => format!(
            "[{}]",
            (0..rng.below(5))
                .map(|i| {
                    let (x, y) = (rng.below(100), rng.below(100));
                    format!(
                        r#"{{"faceId": "f{i}", "bbox": [{x}, {y}, {}, {}], "confidence": 0.{}}}"#,
                        x + rng.below(50),
                        y + rng.below(50),
                        rng.below(100)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "faceEmbedding" | "imageEmbedding" => format!(
            "[{}]",
            (0..rng.below(10))
                .map(|i| format!("{i}.5"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "tags" | "scenes" | "detectedObjects" | "colors" => r#"["a", "b"]"#.to_string(),
        "isSafe" | "hasAdultContent" | "hasViolentContent" => {
            rng.pick(&["true", "false"]).to_string()
        }
        "moderationConfidence" | "qualityScore" | "confidenceScore" => "0.5".to_string(),
        "service" => rng
            .pick(&[
                "moderation",
                "tagging",
                "scene_recognition",
                "image_captioning",
                "image_embedding",
            ])
            .to_string(),
        _ => rng.pick(&["plain text", "c-1", "FAILED"]).to_string(),
    }
}

/// A face object mixing both shapes with random member values.
fn face(rng: &mut Rng, depth: usize) -> String {
    let keys = [
        "faceId",
        "bbox",
        "embedding",
        "confidence",
        "boundingBoxX",
        "boundingBoxY",
        "boundingBoxWidth",
        "boundingBoxHeight",
        "estimatedAge",
        "estimatedGender",
        "dominantEmotion",
    ];
    let members: Vec<String> = (0..rng.below(keys.len() + 1))
        .map(|_| {
            let key = rng.pick(&keys);
            let member = match rng.below(6) {
                0 => format!(
                    "[{}, {}, {}, {}]",
                    rng.below(100),
                    rng.below(100),
                    rng.below(200),
                    rng.below(200)
                ),
                1 => (rng.below(10_000) as f64 / 3.0).to_string(),
                2 => format!("\"{}\"", rng.pick(&["f1", "", "12", "null"])),
                3 => "null".to_string(),
                4 if depth < 3 => format!("[{}]", face(rng, depth + 1)),
                _ => value(rng, depth + 1)
                    .replace('"', "")
                    .chars()
                    .take(20)
                    .collect::<String>()
                    .parse::<f64>()
                    .map_or("0".into(), |f| {
                        if f.is_finite() {
                            f.to_string()
                        } else {
                            "0".into()
                        }
                    }),
            };
            format!("\"{key}\": {member}")
        })
        .collect();
    format!("{{{}}}", members.join(", "))
}

fn fuzz(plugin: &str, names: &[&str], seed: u64) {
    // The shipped defaults: a trap, a 30 s timeout or the 64 MiB cap would fail the test.
    let limits = SandboxLimits {
        call_timeout: Duration::from_secs(30),
        memory_bytes: 64 << 20,
    };
    let runtime = PluginRuntime::new(limits, 0, None).unwrap();
    let loaded = runtime
        .load(&crate::support::plugin_file(plugin), &|_| limits)
        .unwrap();
    let mut rng = Rng(seed);
    let mut outcomes = [0usize; 3];
    for case in 0..CASES {
        let fields: Vec<(String, String)> = (0..rng.below(names.len() + 3))
            .map(|_| {
                let name = if rng.below(8) == 0 {
                    "unexpected"
                } else {
                    rng.pick(names)
                };
                (name.to_string(), value_for(&mut rng, name))
            })
            .collect();
        let entry = wit::Entry {
            source: loaded.streams[0].clone(),
            id: format!("{case}-0"),
            fields: fields.clone(),
            deliveries: 1,
        };
        match loaded.handle(&entry, &Default::default()) {
            HandlerOutcome::Commands(_) => outcomes[0] += 1,
            HandlerOutcome::Malformed(_) => outcomes[1] += 1,
            HandlerOutcome::Retry(_) => outcomes[2] += 1,
            other => panic!("{plugin} case {case}: {other:?}\ninput: {fields:?}"),
        }
    }
    assert!(
        outcomes[0] > 0 && outcomes[1] > 0,
        "{plugin}: the generator must reach both outcomes, got {outcomes:?}"
    );
}

#[test]
fn insights_never_traps_on_random_fields() {
    fuzz(
        "insights",
        &[
            "mediaId",
            "postId",
            "service",
            "isSafe",
            "moderationConfidence",
            "tags",
            "scenes",
            "caption",
            "imageEmbedding",
            "detectedObjects",
            "colors",
            "qualityScore",
            "hasAdultContent",
            "hasViolentContent",
            "dominantEmotion",
            "correlationId",
        ],
        0x5EED_0001,
    );
}

#[test]
fn face_detection_never_traps_on_random_fields() {
    fuzz(
        "face-detection",
        &[
            "mediaId",
            "postId",
            "facesDetected",
            "faces",
            "faces",
            "faces",
            "correlationId",
        ],
        0x5EED_0002,
    );
}

#[test]
fn face_recognition_never_traps_on_random_fields() {
    fuzz(
        "face-recognition",
        &[
            "mediaId",
            "postId",
            "faceId",
            "suggestedUserId",
            "matchedUsername",
            "confidenceScore",
            "correlationId",
        ],
        0x5EED_0003,
    );
}

#[test]
fn ml_errors_never_traps_on_random_fields() {
    fuzz(
        "ml-errors",
        &[
            "correlationId",
            "error",
            "status",
            "serviceName",
            "errorType",
            "retryCount",
            "originalMessageId",
            "originalData",
            "timestamp",
        ],
        0x5EED_0004,
    );
}

#[test]
fn user_face_embeddings_never_traps_on_random_fields() {
    fuzz(
        "user-face-embeddings",
        &["userId", "faceEmbedding", "correlationId"],
        0x5EED_0005,
    );
}
