//! The fifth plugin, `user-face-embeddings`, written with the SDK and the guide only.

use crate::support::{Options, TestEnv};

const STREAM: &str = "user-profile-face-embedding-results";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_upserted_and_empty_ones_acknowledged_without_a_write() {
    let env = TestEnv::start(Options::new(&["user-face-embeddings"])).await;
    env.seed_user(5, "eve").await;
    env.seed_user(6, "frank").await;
    let first = env
        .publish(
            STREAM,
            &[
                ("userId", "5"),
                ("faceEmbedding", "[0.1, 0.2, 1e-05]"),
                ("correlationId", "p-1"),
            ],
        )
        .await;
    let none = env
        .publish(
            STREAM,
            &[
                ("userId", "6"),
                ("faceEmbedding", "[]"),
                ("correlationId", "p-2"),
            ],
        )
        .await;
    env.await_processed(STREAM, &first).await;
    env.await_processed(STREAM, &none).await;
    let newer = env
        .publish(
            STREAM,
            &[
                ("userId", "5"),
                ("faceEmbedding", "[0.5, 0.5]"),
                ("correlationId", "p-3"),
            ],
        )
        .await;
    env.await_processed(STREAM, &newer).await;

    let rows: Vec<(i64, Vec<f32>, Option<String>)> = sqlx::query_as(
        "SELECT user_id, embedding, correlation_id FROM user_face_embeddings ORDER BY user_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![(5, vec![0.5, 0.5], Some("p-3".to_string()))],
        "one row per user; no row for an empty embedding"
    );
    env.await_no_pending(STREAM).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}
