//! `face-recognition-results` → the suggested user of a detected face.

use crate::support::{Options, TestEnv};

const DETECTION: &str = "face-detection-results";
const RECOGNITION: &str = "face-recognition-results";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recognition_before_its_detection_succeeds_once_the_face_is_stored() {
    let env =
        TestEnv::start(Options::new(&["face-detection", "face-recognition"]).retries(5, 300)).await;
    env.seed_media(2, &[20]).await;
    env.seed_user(77, "alice").await;

    // Two faces on one media: the recognition must link the face with its id, not a guess.
    let recognition = env
        .publish(
            RECOGNITION,
            &[
                ("mediaId", "20"),
                ("postId", "2"),
                ("faceId", "face-b"),
                ("suggestedUserId", "77"),
                ("matchedUsername", "alice"),
                ("confidenceScore", "0.91"),
                ("correlationId", "c-20"),
            ],
        )
        .await;
    // The recognition is waiting for a retry: pending, not in the ledger, not dead-lettered.
    crate::support::eventually("the recognition to be delivered once", || async {
        (env.pending(RECOGNITION).await == 1).then_some(())
    })
    .await;
    assert_eq!(env.ledger_outcome(RECOGNITION, &recognition).await, None);

    let detection = env
        .publish(
            DETECTION,
            &[
                ("mediaId", "20"),
                ("postId", "2"),
                ("facesDetected", "2"),
                ("faces", r#"[{"faceId": "face-a", "bbox": [0, 0, 10, 10], "confidence": 0.99}, {"faceId": "face-b", "bbox": [20, 20, 30, 30], "confidence": 0.7}]"#),
            ],
        )
        .await;
    env.await_processed(DETECTION, &detection).await;
    env.await_processed(RECOGNITION, &recognition).await;

    let rows: Vec<(String, Option<i64>, Option<String>, Option<f64>, String)> = sqlx::query_as(
        "SELECT face_id, suggested_user_id, matched_username, match_confidence, status FROM media_detected_faces WHERE media_id = 20 ORDER BY face_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows[0],
        ("face-a".into(), None, None, None, "UNIDENTIFIED".into())
    );
    assert_eq!(
        rows[1],
        (
            "face-b".into(),
            Some(77),
            Some("alice".into()),
            Some(0.91),
            "SUGGESTED".into()
        )
    );
    env.await_no_pending(RECOGNITION).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

/// A face a person confirmed is theirs: a late recognition neither downgrades it to a
/// suggestion nor changes whom it names, and is not retried for it (the guarded update is a
/// no-op). A face not confirmed is updated as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_recognition_never_changes_a_confirmed_face() {
    let env =
        TestEnv::start(Options::new(&["face-detection", "face-recognition"]).retries(2, 300)).await;
    env.seed_media(3, &[30]).await;
    env.seed_user(77, "alice").await;
    env.seed_user(88, "bob").await;
    let detection = env
        .publish(
            DETECTION,
            &[
                ("mediaId", "30"),
                ("postId", "3"),
                ("facesDetected", "2"),
                ("faces", r#"[{"faceId": "mine", "bbox": [0, 0, 10, 10]}, {"faceId": "open", "bbox": [20, 20, 30, 30]}]"#),
            ],
        )
        .await;
    env.await_processed(DETECTION, &detection).await;
    sqlx::query(
        "UPDATE media_detected_faces SET status = 'CONFIRMED', suggested_user_id = 77
          WHERE media_id = 30 AND face_id = 'mine'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut recognitions = Vec::new();
    for face in ["mine", "open"] {
        recognitions.push(
            env.publish(
                RECOGNITION,
                &[
                    ("mediaId", "30"),
                    ("faceId", face),
                    ("suggestedUserId", "88"),
                    ("matchedUsername", "bob"),
                    ("confidenceScore", "0.8"),
                ],
            )
            .await,
        );
    }
    for id in &recognitions {
        env.await_processed(RECOGNITION, id).await;
    }
    let rows: Vec<(String, Option<i64>, String)> = sqlx::query_as(
        "SELECT face_id, suggested_user_id, status FROM media_detected_faces
          WHERE media_id = 30 ORDER BY face_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("mine".to_string(), Some(77), "CONFIRMED".to_string()),
            ("open".to_string(), Some(88), "SUGGESTED".to_string()),
        ]
    );
    assert!(env.dead_letters().await.is_empty());
    env.await_no_pending(RECOGNITION).await;
    env.finish().await;
}
