//! `ml-insights-results` → `media_ai_insights`, in both message shapes.

use crate::support::{Options, TestEnv};

const STREAM: &str = "ml-insights-results";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_real_services_for_one_media_merge_into_one_row() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    env.seed_media(2, &[1]).await;
    let embedding = format!("[{}]", vec!["0.5"; 1408].join(", "));
    let messages: Vec<Vec<(&str, &str)>> = vec![
        vec![
            ("mediaId", "1"),
            ("postId", "2"),
            ("service", "moderation"),
            ("timestamp", "2025-01-01T00:00:00Z"),
            ("isSafe", "true"),
            ("moderationConfidence", "0.95"),
            ("correlationId", "c-1"),
            ("version", "1"),
        ],
        vec![
            ("mediaId", "1"),
            ("postId", "2"),
            ("service", "tagging"),
            ("timestamp", "2025-01-01T00:00:00Z"),
            ("tags", "[\"a\", \"b\"]"),
            ("correlationId", "c-1"),
            ("version", "1"),
        ],
        vec![
            ("mediaId", "1"),
            ("postId", "2"),
            ("service", "scene_recognition"),
            ("timestamp", "2025-01-01T00:00:00Z"),
            ("scenes", "[]"),
            ("correlationId", "c-1"),
            ("version", "1"),
        ],
        vec![
            ("mediaId", "1"),
            ("postId", "2"),
            ("service", "image_captioning"),
            ("caption", "A group of people at a beach"),
            ("correlationId", "c-1"),
            ("timestamp", "2026-04-15T08:04:56.123456Z"),
            ("version", "1"),
        ],
        vec![
            ("mediaId", "1"),
            ("postId", "2"),
            ("service", "image_embedding"),
            ("imageEmbedding", embedding.as_str()),
            ("correlationId", "c-1"),
            ("timestamp", "2026-04-15T08:04:56Z"),
            ("version", "1"),
        ],
    ];
    let mut ids = Vec::new();
    for message in &messages {
        ids.push(env.publish(STREAM, message).await);
    }
    for id in &ids {
        env.await_processed(STREAM, id).await;
    }

    let row: (i64, Option<bool>, Option<f64>, Option<Vec<String>>, Option<Vec<String>>, Option<String>, Option<i32>, Vec<String>, Option<String>) = sqlx::query_as(
        "SELECT post_id, is_safe, moderation_confidence, tags, scenes, caption, array_length(image_embedding, 1), services_completed, correlation_id
           FROM media_ai_insights WHERE media_id = 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row.0, 2);
    assert_eq!(row.1, Some(true));
    assert_eq!(row.2, Some(0.95));
    assert_eq!(row.3, Some(vec!["a".to_string(), "b".to_string()]));
    assert_eq!(row.4, Some(Vec::<String>::new()));
    assert_eq!(row.5.as_deref(), Some("A group of people at a beach"));
    assert_eq!(row.6, Some(1408));
    let mut services = row.7.clone();
    services.sort();
    assert_eq!(
        services,
        [
            "image_captioning",
            "image_embedding",
            "moderation",
            "scene_recognition",
            "tagging"
        ]
    );
    assert_eq!(row.8.as_deref(), Some("c-1"));

    let rows = env.count("SELECT count(*) FROM media_ai_insights").await;
    assert_eq!(rows, 1, "all five services merge into one row");
    // The search column indexes the merged tags and caption.
    let found = env.count("SELECT count(*) FROM media_ai_insights WHERE search_vector @@ to_tsquery('simple', 'beach & a')").await;
    assert_eq!(found, 1);
    env.await_no_pending(STREAM).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_all_in_one_shape_fills_its_columns_and_keeps_the_others() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    env.seed_media(2, &[5]).await;
    let caption = env
        .publish(
            STREAM,
            &[
                ("mediaId", "5"),
                ("postId", "2"),
                ("service", "image_captioning"),
                ("caption", "kept"),
                ("correlationId", ""),
            ],
        )
        .await;
    env.await_processed(STREAM, &caption).await;
    let seed = env
        .publish(
            STREAM,
            &[
                ("mediaId", "5"),
                ("detectedObjects", "[\"person\", \"car\"]"),
                ("scenes", "[\"outdoor\"]"),
                ("colors", "[\"blue\", \"green\"]"),
                ("qualityScore", "0.85"),
                ("hasAdultContent", "false"),
                ("hasViolentContent", "false"),
                ("dominantEmotion", "happy"),
                ("correlationId", "req-123"),
            ],
        )
        .await;
    env.await_processed(STREAM, &seed).await;

    let row: (Option<Vec<String>>, Option<Vec<String>>, Option<Vec<String>>, Option<f64>, Option<bool>, Option<bool>, Option<String>, Option<String>, Vec<String>) = sqlx::query_as(
        "SELECT detected_objects, scenes, colors, quality_score, has_adult_content, has_violent_content, dominant_emotion, caption, services_completed
           FROM media_ai_insights WHERE media_id = 5",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row.0, Some(vec!["person".into(), "car".into()]));
    assert_eq!(row.1, Some(vec!["outdoor".into()]));
    assert_eq!(row.2, Some(vec!["blue".into(), "green".into()]));
    assert_eq!(row.3, Some(0.85));
    assert_eq!((row.4, row.5), (Some(false), Some(false)));
    assert_eq!(row.6.as_deref(), Some("happy"));
    assert_eq!(
        row.7.as_deref(),
        Some("kept"),
        "a later message must not erase columns it does not carry"
    );
    assert_eq!(row.8, ["image_captioning"]);
    env.await_no_pending(STREAM).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_that_are_not_json_are_split_on_commas() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    env.seed_media(2, &[3]).await;
    let id = env
        .publish(
            STREAM,
            &[
                ("mediaId", "3"),
                ("service", "tagging"),
                ("tags", "beach, sunset ,sea"),
            ],
        )
        .await;
    env.await_processed(STREAM, &id).await;
    let tags: Vec<String> =
        sqlx::query_scalar("SELECT tags FROM media_ai_insights WHERE media_id = 3")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(tags, ["beach", "sunset", "sea"]);
    env.await_no_pending(STREAM).await;
    env.finish().await;
}
