//! `kaleidoscope demo`, as a newcomer runs it.

use crate::support::{ADMIN_URL, Options, TestEnv, output_within_deadline, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_to_completion_and_its_summary_matches_the_database() {
    let env = TestEnv::prepare(Options::new(&[
        "insights",
        "face-detection",
        "face-recognition",
        "ml-errors",
        "user-face-embeddings",
    ]))
    .await;
    let database = unique("kt_demo");
    let url = format!("postgres://postgres@127.0.0.1:5432/{database}");
    let prefix = format!("{}demo:", env.prefix);
    let output = output_within_deadline(&mut env.binary(&[
        "demo",
        "--database-url",
        &url,
        "--stream-prefix",
        &prefix,
        "--users",
        "3",
        "--posts",
        "4",
        "--media-per-post",
        "2",
        "--error-rate",
        "0.3",
        "--json",
    ]))
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // What the system did, checked against the database independently of the summary: every
    // answered post-image request has its insights row, every failed request its error row.
    assert_eq!(summary["media"], 8);
    assert_eq!(
        count(
            "SELECT count(*) FROM ml_requests r WHERE r.status = 'COMPLETED' AND r.media_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM media_ai_insights i WHERE i.media_id = r.media_id)"
        )
        .await,
        0,
        "a completed media request without its insights"
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM ml_requests r WHERE r.status = 'FAILED'
               AND NOT EXISTS (SELECT 1 FROM ml_processing_errors e WHERE e.correlation_id = r.correlation_id)"
        )
        .await,
        0,
        "a failed request without its error row"
    );
    // The summary reports what is stored.
    assert_eq!(
        summary["insights"],
        count("SELECT count(*) FROM media_ai_insights").await
    );
    assert_eq!(
        summary["faces"],
        count("SELECT count(*) FROM media_detected_faces").await
    );
    assert_eq!(
        summary["recognised_faces"],
        count("SELECT count(*) FROM media_detected_faces WHERE status = 'SUGGESTED'").await
    );
    assert_eq!(
        summary["profile_embeddings"],
        count("SELECT count(*) FROM user_face_embeddings").await
    );
    assert_eq!(
        summary["ml_errors"],
        count("SELECT count(*) FROM ml_processing_errors").await
    );
    assert_eq!(
        summary["entries_processed"],
        count("SELECT count(*) FROM processed_entries").await
    );
    let requests = summary["requests"].as_object().unwrap();
    let total: i64 = requests.values().map(|n| n.as_i64().unwrap()).sum();
    assert_eq!(total, 11, "3 profile pictures and 8 media");
    assert!(
        !requests.contains_key("PENDING"),
        "every request answered: {requests:?}"
    );
    assert_eq!(
        requests.get("FAILED").and_then(|n| n.as_i64()).unwrap_or(0),
        count("SELECT count(*) FROM ml_processing_errors").await
    );
    assert_eq!(summary["dead_letters"], 0);
    pool.close().await;

    let admin = sqlx::PgPool::connect(ADMIN_URL).await.unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    env.finish().await;
}
