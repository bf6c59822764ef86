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
