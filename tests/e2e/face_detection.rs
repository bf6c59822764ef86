//! `face-detection-results` → `media_detected_faces` and the media's detection status.

use crate::support::{Options, TestEnv};

const STREAM: &str = "face-detection-results";

type FaceRow = (
    String,
    f64,
    f64,
    f64,
    f64,
    Option<f64>,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<i32>,
    String,
);

async fn faces(env: &TestEnv, media_id: i64) -> Vec<FaceRow> {
    sqlx::query_as(
        "SELECT face_id, bbox_x, bbox_y, bbox_width, bbox_height, confidence, estimated_age, estimated_gender,
                dominant_emotion, array_length(embedding, 1), status
           FROM media_detected_faces WHERE media_id = $1 ORDER BY face_id",
    )
    .bind(media_id)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

async fn status(env: &TestEnv, media_id: i64) -> (String, Option<i32>, Vec<String>) {
    sqlx::query_as("SELECT face_detection_status, faces_detected, services_completed FROM media_ai_insights WHERE media_id = $1")
        .bind(media_id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_shape_stores_corner_boxes_as_x_y_width_height() {
    let env = TestEnv::start(Options::new(&["face-detection"])).await;
    env.seed_media(2, &[10]).await;
    let embedding = format!("[{}]", vec!["0.25"; 1408].join(", "));
    let zeros = format!("[{}]", vec!["0.0"; 1408].join(", "));
    // The face without a usable embedding first: its NULL must not shape the statement the next
    // face's embedding is bound to (a regression: PostgreSQL read the array's bytes as text).
    let faces_json = format!(
        r#"[{{"faceId": "9b2f-bbbb", "bbox": [300, 40, 350, 100], "embedding": {zeros}, "confidence": 0.5}},
            {{"faceId": "9b2f-aaaa", "bbox": [10, 20, 110, 220], "embedding": {embedding}, "confidence": 0.9731}}]"#
    );
    let id = env
        .publish(
            STREAM,
            &[
                ("mediaId", "10"),
                ("postId", "2"),
                ("facesDetected", "2"),
                ("faces", &faces_json),
                ("correlationId", "c-9"),
                ("timestamp", "2026-04-15T08:04:56Z"),
                ("version", "1"),
            ],
        )
        .await;
    env.await_processed(STREAM, &id).await;

    let rows = faces(&env, 10).await;
    assert_eq!(rows.len(), 2);
    let first = &rows[0];
    assert_eq!(first.0, "9b2f-aaaa");
    assert_eq!(
        (first.1, first.2, first.3, first.4),
        (10.0, 20.0, 100.0, 200.0)
    );
    assert_eq!(first.5, Some(0.9731));
    assert_eq!(first.9, Some(1408));
    assert_eq!(first.10, "UNIDENTIFIED");
    let second = &rows[1];
    assert_eq!(
        (second.1, second.2, second.3, second.4),
        (300.0, 40.0, 50.0, 60.0)
    );
    assert_eq!(
        second.9, None,
        "an all-zero embedding means the detector could not embed the face"
    );

    let (state, count, services) = status(&env, 10).await;
    assert_eq!(state, "COMPLETED");
    assert_eq!(count, Some(2));
    assert_eq!(services, ["face_detection"]);
    env.await_no_pending(STREAM).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_faces_is_a_completed_result() {
    let env = TestEnv::start(Options::new(&["face-detection"])).await;
    env.seed_media(2, &[11]).await;
    let id = env
        .publish(
            STREAM,
            &[
                ("mediaId", "11"),
                ("postId", "2"),
                ("facesDetected", "0"),
                ("faces", "[]"),
                ("correlationId", ""),
            ],
        )
        .await;
    env.await_processed(STREAM, &id).await;
    assert!(faces(&env, 11).await.is_empty());
    let (state, count, services) = status(&env, 11).await;
    assert_eq!((state.as_str(), count), ("COMPLETED", Some(0)));
    assert_eq!(services, ["face_detection"]);
    assert!(env.dead_letters().await.is_empty());
    env.await_no_pending(STREAM).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_shape_gets_deterministic_face_ids_and_repeats_do_not_double() {
    let env = TestEnv::start(Options::new(&["face-detection"])).await;
    env.seed_media(2, &[12]).await;
    let faces_json = r#"[{"boundingBoxX": 1.5, "boundingBoxY": 2, "boundingBoxWidth": 30, "boundingBoxHeight": 40,
                          "confidence": 0.8, "estimatedAge": 31, "estimatedGender": "female", "dominantEmotion": "happy"}]"#;
    let fields = [
        ("mediaId", "12"),
        ("faces", faces_json),
        ("correlationId", "seed-1"),
    ];
    let first = env.publish(STREAM, &fields).await;
    env.await_processed(STREAM, &first).await;
    // The same result published again (a second message, not a redelivery) updates the same face.
    let second = env.publish(STREAM, &fields).await;
    env.await_processed(STREAM, &second).await;

    let rows = faces(&env, 12).await;
    assert_eq!(rows.len(), 1, "the same face must not be stored twice");
    let face = &rows[0];
    assert_eq!(face.0, "12:1.5:2:30:40");
    assert_eq!((face.1, face.2, face.3, face.4), (1.5, 2.0, 30.0, 40.0));
    assert_eq!(
        (face.6, face.7.as_deref(), face.8.as_deref()),
        (Some(31), Some("female"), Some("happy"))
    );
    assert_eq!(status(&env, 12).await.1, Some(1));
    env.await_no_pending(STREAM).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bbox_setting_reads_boxes_as_x_y_width_height() {
    let env = TestEnv::start(
        Options::new(&["face-detection"])
            .plugin_setting("face-detection", r#"settings = { bbox = "xywh" }"#),
    )
    .await;
    env.seed_media(3, &[30]).await;
    let id = env
        .publish(
            STREAM,
            &[
                ("mediaId", "30"),
                (
                    "faces",
                    r#"[{"faceId": "hf-1", "bbox": [10, 20, 100, 200]}]"#,
                ),
            ],
        )
        .await;
    env.await_processed(STREAM, &id).await;
    let rows = faces(&env, 30).await;
    assert_eq!(
        (rows[0].1, rows[0].2, rows[0].3, rows[0].4),
        (10.0, 20.0, 100.0, 200.0)
    );
    env.finish().await;
}
