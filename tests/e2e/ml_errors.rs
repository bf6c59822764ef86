//! ML failures → `ml_processing_errors`, in the seed's shape and the producers' DLQ shape.

use crate::support::{Options, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_error_shape_and_producer_dlq_shape_are_recorded() {
    let env = TestEnv::start(Options::new(&["ml-errors"])).await;
    let seed = env
        .publish(
            "ml-error-results",
            &[
                ("correlationId", "req-9"),
                ("error", "model crashed"),
                ("status", "FAILED"),
            ],
        )
        .await;
    let producer = env
        .publish(
            "ai-processing-dlq",
            &[
                ("originalMessageId", "1712345678901-0"),
                (
                    "originalData",
                    "{b'mediaId': b'42', b'imageUrl': b'https://x'}",
                ),
                ("serviceName", "tagging"),
                ("error", "CUDA out of memory"),
                ("errorType", "RuntimeError"),
                ("retryCount", "3"),
                ("timestamp", "1712345679"),
            ],
        )
        .await;
    env.await_processed("ml-error-results", &seed).await;
    env.await_processed("ai-processing-dlq", &producer).await;

    let rows: Vec<(String, String, Option<String>, String, String, Option<String>, Option<String>, Option<i32>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT source_stream, entry_id, correlation_id, error, status, service_name, error_type, retry_count, original_message_id, producer_timestamp
           FROM ml_processing_errors ORDER BY source_stream DESC",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, "ml-error-results");
    assert_eq!(rows[0].1, seed);
    assert_eq!(
        (rows[0].2.as_deref(), rows[0].3.as_str(), rows[0].4.as_str()),
        (Some("req-9"), "model crashed", "FAILED")
    );
    assert_eq!(rows[1].0, "ai-processing-dlq");
    assert_eq!(
        (rows[1].5.as_deref(), rows[1].6.as_deref(), rows[1].7),
        (Some("tagging"), Some("RuntimeError"), Some(3))
    );
    assert_eq!(
        (rows[1].8.as_deref(), rows[1].9.as_deref()),
        (Some("1712345678901-0"), Some("1712345679"))
    );
    env.await_no_pending("ml-error-results").await;
    env.await_no_pending("ai-processing-dlq").await;
    env.finish().await;
}

/// The real services' DLQ entries name their request only inside `originalData` (a Python repr
/// of the original message): the request still fails at once, naming the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_dlq_entry_fails_its_request_through_original_data() {
    let env = TestEnv::start(Options::new(&["ml-errors"])).await;
    sqlx::query(
        "INSERT INTO ml_requests (correlation_id, stream, media_id, fields, expected_results)
         VALUES ('c-77', 'post-image-processing', 502, '[]', ARRAY['moderation'])",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let failed = env
        .publish(
            "ai-processing-dlq",
            &[
                ("originalMessageId", "1712345678901-0"),
                (
                    "originalData",
                    "{b'postId': b'7', b'mediaId': b'502', b'correlationId': b'c-77'}",
                ),
                ("serviceName", "moderation"),
                ("error", "model unavailable"),
                ("errorType", "RuntimeError"),
                ("retryCount", "3"),
                ("timestamp", "1712345679"),
            ],
        )
        .await;
    env.await_processed("ai-processing-dlq", &failed).await;
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM ml_requests WHERE correlation_id = 'c-77'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "FAILED");
    assert_eq!(error.as_deref(), Some("moderation: model unavailable"));
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT correlation_id FROM ml_processing_errors WHERE entry_id = $1")
            .bind(&failed)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(recorded.as_deref(), Some("c-77"));
    env.finish().await;
}
