//! The delivery protocol: sentinels, malformed input, retries, redelivery, trapping plugins.

use crate::support::{Options, TestEnv, eventually};

const INSIGHTS: &str = "ml-insights-results";
const DETECTION: &str = "face-detection-results";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_sentinels_are_acknowledged_and_never_dead_lettered() {
    let env = TestEnv::start(Options::new(&[
        "insights",
        "face-detection",
        "face-recognition",
        "ml-errors",
    ]))
    .await;
    let streams = [
        "ml-insights-results",
        "face-detection-results",
        "face-recognition-results",
        "ml-error-results",
        "ai-processing-dlq",
    ];
    for stream in streams {
        env.publish(stream, &[("init", "true")]).await;
    }
    for stream in streams {
        env.await_drained(stream).await;
    }
    assert!(
        env.dead_letters().await.is_empty(),
        "a sentinel is not a failure"
    );
    let ledger = env.count("SELECT count(*) FROM processed_entries").await;
    assert_eq!(ledger, 0, "sentinels carry no result and are not recorded");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_at_once_naming_the_field() {
    let env = TestEnv::start(Options::new(&["insights", "face-detection"])).await;
    let bad_id = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "abc"),
                ("service", "moderation"),
                ("isSafe", "true"),
                ("correlationId", "c-bad"),
            ],
        )
        .await;
    let bad_box = env
        .publish(
            DETECTION,
            &[
                ("mediaId", "1"),
                ("faces", r#"[{"faceId": "f", "bbox": [10, 10, 5]}]"#),
            ],
        )
        .await;
    let not_utf8 = env
        .publish_bytes(INSIGHTS, &[("mediaId", b"1"), ("caption", b"caf\xe9")])
        .await;

    let letter = env.await_dead_letter(INSIGHTS, &bad_id).await;
    assert_eq!(letter["failureKind"], "malformed");
    assert_eq!(letter["sourceStream"], INSIGHTS);
    assert!(letter["error"].contains("`mediaId`"), "{}", letter["error"]);
    assert_eq!(letter["plugin"], "insights");
    assert_eq!(letter["pluginVersion"], "0.1.0");
    assert_eq!(letter["deliveries"], "1");
    assert!(!letter["failedAt"].is_empty());
    let original: serde_json::Value = serde_json::from_str(&letter["fields"]).unwrap();
    assert_eq!(original["mediaId"], "abc");
    assert_eq!(original["correlationId"], "c-bad");

    let letter = env.await_dead_letter(DETECTION, &bad_box).await;
    assert_eq!(letter["failureKind"], "malformed");
    assert!(
        letter["error"].contains("faces[0].bbox"),
        "{}",
        letter["error"]
    );

    let letter = env.await_dead_letter(INSIGHTS, &not_utf8).await;
    assert_eq!(letter["failureKind"], "malformed");
    assert!(
        letter["error"].contains("`caption`") && letter["error"].contains("UTF-8"),
        "{}",
        letter["error"]
    );

    env.await_no_pending(INSIGHTS).await;
    env.await_no_pending(DETECTION).await;
    assert_eq!(
        env.ledger_outcome(INSIGHTS, &bad_id).await.as_deref(),
        Some("dead-lettered")
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_unknown_media_is_retried_then_dead_lettered_as_retries_exhausted() {
    let env = TestEnv::start(Options::new(&["insights"]).retries(3, 200)).await;
    let id = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "999"),
                ("postId", "1"),
                ("service", "image_captioning"),
                ("caption", "ghost"),
            ],
        )
        .await;

    let letter = env.await_dead_letter(INSIGHTS, &id).await;
    assert_eq!(letter["failureKind"], "retries-exhausted");
    assert_eq!(
        letter["deliveries"], "3",
        "dead-lettered after ML_RETRY_ATTEMPTS deliveries"
    );
    assert!(
        letter["error"].contains("post_media"),
        "the reason names the missing row: {}",
        letter["error"]
    );
    env.await_no_pending(INSIGHTS).await;
    let rows = env.count("SELECT count(*) FROM media_ai_insights").await;
    assert_eq!(rows, 0);
    assert_eq!(
        env.dead_letters().await.len(),
        1,
        "dead-lettered exactly once"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_media_appears_later_succeeds_on_retry() {
    let env = TestEnv::start(Options::new(&["insights"]).retries(10, 200)).await;
    let id = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "31"),
                ("postId", "3"),
                ("service", "image_captioning"),
                ("caption", "late"),
            ],
        )
        .await;
    eventually("the first delivery to fail", || async {
        (env.pending(INSIGHTS).await == 1).then_some(())
    })
    .await;
    env.seed_media(3, &[31]).await;
    env.await_processed(INSIGHTS, &id).await;
    env.await_no_pending(INSIGHTS).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_entries_change_nothing_and_double_no_face() {
    let env = TestEnv::start(Options::new(&["insights", "face-detection"])).await;
    env.seed_media(4, &[40, 41]).await;
    for media in ["40", "41"] {
        env.publish(DETECTION, &[("mediaId", media), ("postId", "4"), ("faces", r#"[{"faceId": "a", "bbox": [0, 0, 1, 1]}, {"faceId": "b", "bbox": [2, 2, 3, 3]}]"#)])
            .await;
        env.publish(
            INSIGHTS,
            &[
                ("mediaId", media),
                ("service", "tagging"),
                ("tags", "[\"x\"]"),
            ],
        )
        .await;
    }
    env.await_drained(DETECTION).await;
    env.await_drained(INSIGHTS).await;
    let snapshot = "SELECT (SELECT count(*) FROM media_detected_faces),
                           (SELECT string_agg(media_id || ':' || updated_at || ':' || array_to_string(services_completed, ','), ';' ORDER BY media_id) FROM media_ai_insights),
                           (SELECT string_agg(face_id || ':' || updated_at, ';' ORDER BY media_id, face_id) FROM media_detected_faces),
                           (SELECT count(*) FROM processed_entries)";
    let before: (i64, String, String, i64) =
        sqlx::query_as(snapshot).fetch_one(&env.pool).await.unwrap();
    assert_eq!(before.0, 4);

    // Rewind the group: every entry is delivered again.
    let mut redis = env.redis.clone();
    for stream in [DETECTION, INSIGHTS] {
        let _: () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg(env.key(stream))
            .arg(&env.config.consumer_group)
            .arg("0")
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    env.await_drained(DETECTION).await;
    env.await_drained(INSIGHTS).await;

    let after: (i64, String, String, i64) =
        sqlx::query_as(snapshot).fetch_one(&env.pool).await.unwrap();
    assert_eq!(
        before, after,
        "redelivery must not run the commands again (not even touch updated_at)"
    );
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_fails_only_its_own_entry() {
    let env = TestEnv::start(Options::new(&["scripted", "insights"]).retries(2, 200)).await;
    env.seed_media(5, &[50]).await;
    let before = env
        .publish("scripted", &[("action", "ok"), ("note", "before")])
        .await;
    let trap = env
        .publish("scripted", &[("action", "panic"), ("note", "boom-42")])
        .await;
    let after = env
        .publish("scripted", &[("action", "ok"), ("note", "after")])
        .await;
    let other_stream = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "50"),
                ("service", "image_captioning"),
                ("caption", "fine"),
            ],
        )
        .await;

    env.await_processed("scripted", &before).await;
    env.await_processed("scripted", &after).await;
    env.await_processed(INSIGHTS, &other_stream).await;

    let letter = env.await_dead_letter("scripted", &trap).await;
    assert_eq!(letter["failureKind"], "plugin-trap");
    assert_eq!(letter["deliveries"], "2");
    assert!(
        letter["error"].contains("boom-42"),
        "the panic message reaches the dead letter: {}",
        letter["error"]
    );
    assert_eq!(letter["plugin"], "scripted");
    env.await_no_pending("scripted").await;
    env.await_no_pending(INSIGHTS).await;
    // Each neighbour is stored once. (In which order is not promised: the three entries may be
    // read in different batches, and batches of one stream may commit in either order.)
    let notes: Vec<String> =
        sqlx::query_scalar("SELECT error FROM ml_processing_errors ORDER BY error")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(notes, ["after", "before"]);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_index_in_the_redis_url_is_used() {
    let env =
        TestEnv::start(Options::new(&["insights"]).set("REDIS_URL", "redis://127.0.0.1:6379/7"))
            .await;
    env.seed_media(6, &[60]).await;
    // The harness's own connection uses the same URL, so this entry lands in database 7.
    let id = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "60"),
                ("service", "image_captioning"),
                ("caption", "db seven"),
            ],
        )
        .await;
    env.await_processed(INSIGHTS, &id).await;
    let mut default_db = redis::Client::open(crate::support::REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(env.key(INSIGHTS))
        .query_async(&mut default_db)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the stream must live in database 7, not 0");
    env.await_no_pending(INSIGHTS).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_failing_in_the_database_does_not_fail_its_batch_neighbours() {
    // Published before the host starts, so the three entries arrive in one batch.
    let env = TestEnv::prepare(Options::new(&["insights"]).retries(1, 200)).await;
    env.seed_media(7, &[71, 73]).await;
    let first = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "71"),
                ("service", "image_captioning"),
                ("caption", "one"),
            ],
        )
        .await;
    let orphan = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "72"),
                ("service", "image_captioning"),
                ("caption", "no media"),
            ],
        )
        .await;
    let third = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "73"),
                ("service", "image_captioning"),
                ("caption", "three"),
            ],
        )
        .await;
    let env = env.with_host().await;

    env.await_processed(INSIGHTS, &first).await;
    env.await_processed(INSIGHTS, &third).await;
    let letter = env.await_dead_letter(INSIGHTS, &orphan).await;
    assert_eq!(letter["failureKind"], "retries-exhausted");
    assert!(
        letter["error"].contains("post_media"),
        "{}",
        letter["error"]
    );
    let captions: Vec<String> =
        sqlx::query_scalar("SELECT caption FROM media_ai_insights ORDER BY media_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(captions, ["one", "three"]);
    env.await_no_pending(INSIGHTS).await;
    env.finish().await;
}

/// The delivery counts of reclaimed entries are read exactly, however many other entries the
/// consumer has pending between them: an over-delivered entry cannot pass for a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimed_entries_get_their_exact_delivery_counts() {
    let env = TestEnv::prepare(Options::new(&[crate::support::SCRIPTED]).retries(3, 60_000)).await;
    let key = env.key(crate::support::SCRIPTED);
    let (group, consumer) = (&env.config.consumer_group, &env.config.consumer_name);
    let mut redis = env.redis.clone();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await
        .expect("XGROUP CREATE");
    let first = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "first")],
        )
        .await;
    for n in 0..100 {
        env.publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", &format!("filler {n}"))],
        )
        .await;
    }
    let last = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "last")],
        )
        .await;
    // Everything is delivered to this host's consumer; the fillers stay fresh (not reclaimed),
    // the first and last look like entries delivered five times long ago.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(200)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut redis)
        .await
        .expect("XREADGROUP");
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&key)
        .arg(group)
        .arg(consumer)
        .arg(0)
        .arg(&first)
        .arg(&last)
        .arg("IDLE")
        .arg(120_000)
        .arg("RETRYCOUNT")
        .arg(5)
        .arg("JUSTID")
        .query_async(&mut redis)
        .await
        .expect("XCLAIM");
    let env = env.with_host().await;
    for id in [&first, &last] {
        let letter = env.await_dead_letter(crate::support::SCRIPTED, id).await;
        assert_eq!(letter["failureKind"], "retries-exhausted", "{letter:?}");
        assert_eq!(letter["deliveries"], "6", "{letter:?}");
    }
    env.finish().await;
}

/// A graceful stop never cuts a read short: an entry Redis hands out while the host is stopping
/// is finished, not left pending to a consumer that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_leaves_no_entry_delivered_and_unfinished() {
    let options =
        Options::new(&[crate::support::SCRIPTED]).set("KALEIDOSCOPE_POLL_TIMEOUT_MS", 2000);
    let mut env = TestEnv::start(options).await;
    let warm = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "warm")],
        )
        .await;
    env.await_processed(crate::support::SCRIPTED, &warm).await;
    // Wait until the consumer is blocked in XREADGROUP (for up to two seconds): then the stop
    // comes while a read is in flight, and the entry published next is handed to that read. (Not
    // waiting would let the stop fall between two reads, where nothing is delivered and the test
    // would prove nothing.)
    let reader = format!(
        "name=kaleidoscope:{}:{} ",
        env.config.consumer_name,
        crate::support::SCRIPTED
    );
    eventually("the consumer to block in XREADGROUP", || async {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut env.redis.clone())
            .await
            .expect("CLIENT LIST");
        clients
            .lines()
            .any(|line| {
                format!("{line} ").contains(&reader)
                    && line.contains("cmd=xreadgroup")
                    && line
                        .split(' ')
                        .any(|f| f.starts_with("flags=") && f.contains('b'))
            })
            .then_some(())
    })
    .await;
    let host = env.host.take().expect("the host is running");
    let stopping = tokio::spawn(host.shutdown());
    let late = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "late")],
        )
        .await;
    stopping.await.expect("shutdown");
    assert_eq!(
        env.pending(crate::support::SCRIPTED).await,
        0,
        "nothing is left pending"
    );
    assert_eq!(
        env.ledger_outcome(crate::support::SCRIPTED, &late)
            .await
            .as_deref(),
        Some("processed"),
        "the entry handed to the read in flight during the stop was finished"
    );
    env.finish().await;
}
