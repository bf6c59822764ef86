//! Poison and hostile input: every entry ends processed or dead-lettered with a reason, within
//! the limits, and the stream keeps flowing.

use crate::support::{Options, TestEnv};

const INSIGHTS: &str = "ml-insights-results";
const DETECTION: &str = "face-detection-results";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_processed_or_dead_lettered_and_never_stop_the_stream() {
    let env = TestEnv::start(Options::new(&["insights", "face-detection"])).await;
    env.seed_media(1, &[1, 2, 3]).await;
    let huge_caption = "x".repeat(3 << 20);
    let huge_garbage = "\u{1F600}".repeat(1 << 20);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let many_faces = format!(
        "[{}]",
        (0..3000)
            .map(|i| format!(r#"{{"faceId": "f{i}", "bbox": [{i}, 0, {}, 10]}}"#, i + 5))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // (stream, fields, expected failure kind or None for "processed")
    let cases: Vec<(&str, Vec<(&str, &str)>, Option<&str>)> = vec![
        (
            INSIGHTS,
            vec![("service", "tagging"), ("tags", "[\"a\"]")],
            Some("malformed"),
        ), // missing mediaId
        (
            INSIGHTS,
            vec![("mediaId", ""), ("service", "tagging"), ("tags", "[]")],
            Some("malformed"),
        ), // empty mediaId
        (
            INSIGHTS,
            vec![
                ("mediaId", "99999999999999999999999"),
                ("service", "tagging"),
                ("tags", "[]"),
            ],
            Some("malformed"),
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "1"),
                ("service", "moderation"),
                ("isSafe", "perhaps"),
            ],
            Some("malformed"),
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "1"),
                ("service", "moderation"),
                ("isSafe", "true"),
                ("moderationConfidence", "1e400"),
            ],
            Some("malformed"),
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "1"),
                ("service", "tagging"),
                ("tags", deep.as_str()),
            ],
            Some("malformed"),
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "1"),
                ("service", "tagging"),
                ("tags", "[1, {\"a\": 2}]"),
            ],
            Some("malformed"),
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "1"),
                ("service", "image_embedding"),
                ("imageEmbedding", "[1, \"two\"]"),
            ],
            Some("malformed"),
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "2"),
                ("service", "image_captioning"),
                ("caption", huge_caption.as_str()),
            ],
            None,
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "3"),
                ("service", "tagging"),
                ("tags", huge_garbage.as_str()),
            ],
            None,
        ),
        (
            INSIGHTS,
            vec![
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "nul \u{0} inside"),
            ],
            // A producer's NUL is bad input, named by the host before any handler runs.
            Some("malformed"),
        ),
        (
            DETECTION,
            vec![("mediaId", "1"), ("faces", deep.as_str())],
            Some("malformed"),
        ),
        (
            DETECTION,
            vec![("mediaId", "1"), ("faces", "{\"not\": \"a list\"}")],
            Some("malformed"),
        ),
        (
            DETECTION,
            vec![
                ("mediaId", "1"),
                ("faces", "[{\"bbox\": [0, 0, 1e400, 1]}]"),
            ],
            Some("malformed"),
        ),
        (
            DETECTION,
            vec![
                ("mediaId", "1"),
                ("faces", "[{\"faceId\": \"x\", \"bbox\": [5, 5, 1, 1]}]"),
            ],
            Some("malformed"),
        ),
        (
            DETECTION,
            vec![
                ("mediaId", "1"),
                (
                    "faces",
                    "[{\"boundingBoxX\": 1, \"boundingBoxY\": 1, \"boundingBoxWidth\": 2, \"boundingBoxHeight\": 2, \"estimatedAge\": 1e9}]",
                ),
            ],
            Some("malformed"),
        ),
        (
            DETECTION,
            vec![("mediaId", "2"), ("faces", many_faces.as_str())],
            None,
        ),
    ];
    let mut published = Vec::new();
    for (stream, fields, expected) in &cases {
        published.push((*stream, env.publish(stream, fields).await, *expected));
    }
    // The streams keep flowing afterwards.
    let after = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "still flowing"),
            ],
        )
        .await;
    env.await_processed(INSIGHTS, &after).await;

    for (stream, id, expected) in published {
        match expected {
            None => env.await_processed(stream, &id).await,
            Some(kind) => {
                let letter = env.await_dead_letter(stream, &id).await;
                assert_eq!(
                    letter["failureKind"], kind,
                    "{stream} {id}: {}",
                    letter["error"]
                );
                assert!(!letter["error"].is_empty());
            }
        }
    }
    let faces: i64 =
        sqlx::query_scalar("SELECT count(*) FROM media_detected_faces WHERE media_id = 2")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(faces, 3000, "thousands of faces in one message are stored");
    let caption_length: i32 =
        sqlx::query_scalar("SELECT length(caption) FROM media_ai_insights WHERE media_id = 2")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(caption_length, 3 << 20);
    env.await_no_pending(INSIGHTS).await;
    env.await_no_pending(DETECTION).await;
    env.finish().await;
}

/// Redis 7 drops a trimmed entry from the pending list itself when `XAUTOCLAIM` meets it; older
/// servers keep it there until it is acknowledged. Either way the host must notice it: report it
/// (naming stream and entry: its content is gone, so there is nothing to dead-letter), acknowledge
/// it, and not loop on it. What this server does for it cannot prove the host's part, so the test
/// asserts the host's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_trimmed_while_pending_is_reported_and_not_looped_on() {
    let env = TestEnv::prepare(Options::new(&["scripted"]).retries(5, 200)).await;
    let mut host = env.spawn_host("trimming");
    let id = env
        .publish("scripted", &[("action", "retry"), ("note", "not yet")])
        .await;
    crate::support::eventually("the entry to wait for a retry", || async {
        (env.pending("scripted").await == 1).then_some(())
    })
    .await;
    // The producer trims its stream (MAXLEN ~) while the entry is still pending.
    let _: i64 = redis::cmd("XDEL")
        .arg(env.key("scripted"))
        .arg(&id)
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    let log = env.host_log("trimming");
    crate::support::eventually("the host to report the trimmed entry", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .any(|line| line.contains(&id) && line.contains("was trimmed from the stream"))
            .then_some(())
    })
    .await;
    env.await_no_pending("scripted").await;
    assert!(
        env.dead_letters().await.is_empty(),
        "a trimmed entry has no content to dead-letter"
    );
    // And the stream keeps working.
    let next = env.publish("scripted", &[("action", "ok")]).await;
    env.await_processed("scripted", &next).await;
    crate::support::signal(&host, "TERM");
    assert!(crate::support::await_exit(&mut host).await.success());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_from_a_plugin_never_block_the_stream() {
    let env = TestEnv::start(Options::new(&[crate::support::SCRIPTED])).await;
    // A NUL in a log line and in the failure reason: the reason is stored with U+FFFD.
    let bad = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "nul"), ("note", "n1")],
        )
        .await;
    let letter = env.await_dead_letter(crate::support::SCRIPTED, &bad).await;
    assert_eq!(letter["failureKind"], "malformed");
    assert_eq!(letter["error"], "bad \u{FFFD} reason: n1");
    // A NUL in an emitted field is data: the outbox carries it to the target stream unchanged.
    let emitting = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "emit-nul"), ("target", "scripted-out")],
        )
        .await;
    env.await_processed(crate::support::SCRIPTED, &emitting)
        .await;
    let out_key = env.key("scripted-out");
    let emitted: Vec<(String, Vec<(String, Vec<u8>)>)> =
        crate::support::eventually("the emitted message", || {
            let mut redis = env.redis.clone();
            let key = out_key.clone();
            async move {
                let entries: Vec<(String, Vec<(String, Vec<u8>)>)> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut redis)
                    .await
                    .ok()?;
                (!entries.is_empty()).then_some(entries)
            }
        })
        .await;
    assert_eq!(emitted[0].1, vec![("note".to_string(), b"a\0b".to_vec())]);
    crate::support::stream_goes_on(&env).await;
    env.await_no_pending(crate::support::SCRIPTED).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_nul_is_malformed_and_names_the_field() {
    let env = TestEnv::start(Options::new(&[crate::support::SCRIPTED])).await;
    let bad = env
        .publish_bytes(
            crate::support::SCRIPTED,
            &[("action", b"ok"), ("note", b"a\0b")],
        )
        .await;
    let letter = env.await_dead_letter(crate::support::SCRIPTED, &bad).await;
    assert_eq!(letter["failureKind"], "malformed", "{letter:?}");
    assert!(
        letter["error"].contains("`note`") && letter["error"].contains("NUL"),
        "{}",
        letter["error"]
    );
    crate::support::stream_goes_on(&env).await;
    env.finish().await;
}
