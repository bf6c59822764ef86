//! The other half: publishing requests, the ML simulator, and tracking every request until its
//! results arrive (or it fails, or times out).

use crate::support::{Options, OutputByDeadline, TestEnv, eventually};
use kaleidoscope::requests::{Publisher, Request};
use kaleidoscope::shutdown::StopSwitch;
use kaleidoscope::simulate::{self, SimulatorOptions};
use std::sync::Arc;

const ALL_PLUGINS: [&str; 5] = [
    "insights",
    "face-detection",
    "face-recognition",
    "ml-errors",
    "user-face-embeddings",
];

fn post_image(media_id: i64, uploader: i64) -> Request {
    Request::PostImage {
        post_id: 1,
        media_id,
        media_url: format!("https://cdn.example/{media_id}.jpg"),
        uploader_id: Some(uploader),
    }
}

/// Starts the simulator in the background; send `true` to stop it.
fn start_simulator(
    env: &TestEnv,
    error_rate: f64,
) -> (
    StopSwitch,
    tokio::task::JoinHandle<simulate::SimulatorStats>,
) {
    let stop = StopSwitch::new();
    let stopped = stop.subscribe();
    let config = env.config.clone();
    let options = SimulatorOptions {
        error_rate,
        embedding_dims: 16,
        ..Default::default()
    };
    let task = tokio::spawn(async move {
        simulate::run(&config, &options, stopped)
            .await
            .expect("the simulator failed")
    });
    (stop, task)
}

async fn statuses(env: &TestEnv) -> Vec<(String, String)> {
    sqlx::query_as("SELECT correlation_id, status FROM ml_requests ORDER BY correlation_id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_requests_are_answered_by_the_simulator_and_completed() {
    let env = TestEnv::start(Options::new(&ALL_PLUGINS).retries(5, 300)).await;
    env.seed_user(2, "bob").await;
    env.seed_media(1, &[1, 2, 3, 4]).await;
    let (stop, simulator) = start_simulator(&env, 0.0);

    // Two through the command line, the rest through the library.
    for media in ["1", "2"] {
        let output = env.command(&[
            "publish",
            "post-image",
            "--post-id",
            "1",
            "--media-id",
            media,
            "--media-url",
            "https://cdn.example/x.jpg",
            "--uploader-id",
            "1",
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("correlationId="));
        // Said once: on stdout, not again in the log.
        assert!(
            !String::from_utf8_lossy(&output.stderr).contains("published request"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let publisher = Publisher::new(Arc::new(env.config.clone()), env.pool.clone()).unwrap();
    for media in [3, 4] {
        publisher
            .publish(&post_image(media, 2), None)
            .await
            .unwrap()
            .expect("published");
    }
    let profile = publisher
        .publish(
            &Request::ProfilePicture {
                user_id: 2,
                image_url: "https://cdn.example/bob.jpg".into(),
            },
            Some("profile-bob".into()),
        )
        .await
        .unwrap()
        .expect("published");
    assert_eq!(profile.correlation_id, "profile-bob");

    // The request's wire shape is the real producers'.
    let requests: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(env.key("post-image-processing"))
        .arg("-")
        .arg("+")
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    let fields = &requests[0].1;
    for name in [
        "postId",
        "mediaId",
        "mediaUrl",
        "uploaderId",
        "timestamp",
        "correlationId",
    ] {
        assert!(
            fields.contains_key(name),
            "post-image request lacks {name}: {fields:?}"
        );
    }

    eventually("every request to be completed", || async {
        let all: Vec<(String, String, Vec<String>)> = sqlx::query_as(
            "SELECT correlation_id, status, results_received FROM ml_requests ORDER BY 1",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        (all.len() == 5 && all.iter().all(|(_, s, _)| s == "COMPLETED")).then_some(())
    })
    .await;
    let services: Vec<Vec<String>> =
        sqlx::query_scalar("SELECT services_completed FROM media_ai_insights ORDER BY media_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(services.len(), 4);
    for s in &services {
        assert_eq!(
            s.len(),
            6,
            "five insights services and face detection: {s:?}"
        );
    }
    for stream in [
        "ml-insights-results",
        "face-detection-results",
        "face-recognition-results",
        "user-profile-face-embedding-results",
    ] {
        env.await_no_pending(stream).await;
    }
    assert!(
        env.dead_letters().await.is_empty(),
        "{:?}",
        env.dead_letters().await
    );
    stop.stop();
    let stats = simulator.await.unwrap();
    assert_eq!(stats.requests, 5);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_with_an_error_are_marked_failed() {
    let env = TestEnv::start(Options::new(&ALL_PLUGINS).retries(5, 300)).await;
    let media: Vec<i64> = (1..=12).collect();
    env.seed_media(1, &media).await;
    let (stop, simulator) = start_simulator(&env, 0.5);
    let publisher = Publisher::new(Arc::new(env.config.clone()), env.pool.clone()).unwrap();
    for m in &media {
        publisher.publish(&post_image(*m, 1), None).await.unwrap();
    }
    eventually("every request to be answered", || async {
        let all = statuses(&env).await;
        (all.len() == 12 && all.iter().all(|(_, s)| s == "COMPLETED" || s == "FAILED"))
            .then_some(())
    })
    .await;
    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT correlation_id FROM ml_requests WHERE status = 'FAILED' ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT correlation_id FROM ml_processing_errors ORDER BY 1")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(
        !failed.is_empty() && failed.len() < 12,
        "the error rate must fail some and not all: {failed:?}"
    );
    assert_eq!(
        failed, errors,
        "exactly the requests answered with an error are failed"
    );
    let reasons: Vec<Option<String>> =
        sqlx::query_scalar("SELECT error FROM ml_requests WHERE status = 'FAILED'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(reasons.iter().all(|r| {
        r.as_deref()
            .is_some_and(|r| r.contains("simulated failure"))
    }));
    stop.stop();
    assert_eq!(simulator.await.unwrap().errors as usize, failed.len());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_answers_requests_are_republished_then_timed_out() {
    let env = TestEnv::start(
        Options::new(&ALL_PLUGINS)
            .set("ML_TIMEOUT_SECONDS", 1)
            .set("ML_RETRY_ATTEMPTS", 2),
    )
    .await;
    env.seed_media(1, &[1, 2]).await;
    let publisher = Publisher::new(Arc::new(env.config.clone()), env.pool.clone()).unwrap();
    for m in [1, 2] {
        publisher.publish(&post_image(m, 1), None).await.unwrap();
    }
    eventually("both requests to time out", || async {
        let all = statuses(&env).await;
        (all.len() == 2 && all.iter().all(|(_, s)| s == "TIMED_OUT")).then_some(())
    })
    .await;
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM ml_requests")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(attempts, [2, 2], "published ML_RETRY_ATTEMPTS times");
    let published: i64 = redis::cmd("XLEN")
        .arg(env.key("post-image-processing"))
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    assert_eq!(published, 4, "each request was republished once");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueued_requests_are_published_only_after_their_transaction_commits() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    let publisher = Publisher::new(Arc::new(env.config.clone()), env.pool.clone()).unwrap();
    let xlen = || async {
        redis::cmd("XLEN")
            .arg(env.key("post-image-processing"))
            .query_async::<i64>(&mut env.redis.clone())
            .await
            .unwrap()
    };

    // The backend creates the media row and the request in one transaction that rolls back.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO posts (post_id) VALUES (7)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO post_media (media_id, post_id) VALUES (70, 7)")
        .execute(&mut *tx)
        .await
        .unwrap();
    publisher
        .enqueue(&mut tx, &post_image(70, 1), Some("rolled-back".into()))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(xlen().await, 0);
    assert!(
        statuses(&env).await.is_empty(),
        "a rolled-back request does not exist"
    );

    // The same, committed: published after the commit, when the rows exist.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO posts (post_id) VALUES (7)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO post_media (media_id, post_id) VALUES (70, 7)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let enqueued = publisher
        .enqueue(&mut tx, &post_image(70, 1), Some("committed".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(xlen().await, 0, "nothing is published before the commit");
    tx.commit().await.unwrap();
    publisher.flush(&[enqueued]).await.unwrap();
    assert_eq!(xlen().await, 1);
    assert_eq!(
        statuses(&env).await,
        [("committed".to_string(), "PENDING".to_string())]
    );
    let outbox = env.count("SELECT count(*) FROM outbox").await;
    assert_eq!(outbox, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_failures_are_errors_only_on_critical_streams() {
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    let unreachable = |args: &[&str]| {
        env.binary(args)
            .env("REDIS_URL", "redis://127.0.0.1:1")
            .env("ML_RETRY_ATTEMPTS", "2")
            .output_by_deadline()
            .unwrap()
    };
    let critical = unreachable(&[
        "publish",
        "post-image",
        "--post-id",
        "1",
        "--media-id",
        "1",
        "--media-url",
        "u",
    ]);
    assert!(!critical.status.success());
    let stderr = String::from_utf8_lossy(&critical.stderr);
    assert!(
        stderr.contains("post-image-processing") && stderr.contains("critical"),
        "{stderr}"
    );

    let other = unreachable(&[
        "publish",
        "post-update",
        "--post-id",
        "1",
        "--media-id",
        "1",
        "--media-url",
        "u",
    ]);
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert!(String::from_utf8_lossy(&other.stdout).contains("not published"));

    let disabled = env
        .binary(&[
            "publish",
            "post-image",
            "--post-id",
            "1",
            "--media-id",
            "1",
            "--media-url",
            "u",
        ])
        .env("ML_PROCESSING_ENABLED", "false")
        .output_by_deadline()
        .unwrap();
    assert!(disabled.status.success());
    assert!(String::from_utf8_lossy(&disabled.stderr).contains("ML_PROCESSING_ENABLED=false"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_what_a_crashed_writer_left_in_the_outbox() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    // A message committed by a host that crashed before publishing it.
    sqlx::query(
        "INSERT INTO outbox (stream, fields, created_at)
         VALUES ($1, CAST($2 AS json), now() - interval '1 minute')",
    )
    .bind(env.key("relayed"))
    .bind(r#"[["note", "left behind"]]"#)
    .execute(&env.pool)
    .await
    .unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> =
        eventually("the relay to publish the message", || async {
            let entries = env.entries("relayed").await;
            (!entries.is_empty()).then_some(entries)
        })
        .await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].1,
        vec![("note".to_string(), "left behind".to_string())]
    );
    eventually("the relayed message to leave the outbox", || async {
        (env.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    env.finish().await;
}

/// Grants per column: a plugin that may mark requests (`update_columns`) cannot create one, so it
/// cannot make the request tracker publish what it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_granted_request_columns_cannot_forge_a_request() {
    let mut options = Options::new(&[crate::support::SCRIPTED]);
    options.plugin_sections.insert(
        crate::support::SCRIPTED.to_string(),
        vec![
            "tables = [\"ml_processing_errors\"]".to_string(),
            "update_columns = { ml_requests = [\"status\"] }".to_string(),
        ],
    );
    let env = TestEnv::start(options).await;
    let forged = env
        .publish(
            crate::support::SCRIPTED,
            &[
                ("action", "write-table"),
                ("table", "ml_requests"),
                ("column", "correlation_id"),
                ("note", "forged"),
            ],
        )
        .await;
    let letter = env
        .await_dead_letter(crate::support::SCRIPTED, &forged)
        .await;
    assert_eq!(letter["failureKind"], "forbidden-command", "{letter:?}");
    assert!(
        letter["error"].contains("may only update"),
        "{}",
        letter["error"]
    );
    assert_eq!(env.count("SELECT count(*) FROM ml_requests").await, 0);
    env.finish().await;
}

/// The request tracker publishes only to the request streams, and a row it cannot publish is
/// failed with the reason instead of stopping (or repeating) the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_tracker_never_publishes_a_forged_or_broken_row() {
    let env = TestEnv::start(Options::new(&[crate::support::SCRIPTED])).await;
    for (id, stream, fields) in [
        ("forged", "ml-results-dlq", r#"[["sourceStream", "x"]]"#),
        ("broken", "post-image-processing", r#"{"not": "pairs"}"#),
        (
            "fine",
            "post-image-processing",
            r#"[["postId", "1"], ["correlationId", "fine"]]"#,
        ),
    ] {
        sqlx::query(
            "INSERT INTO ml_requests (correlation_id, stream, fields, expected_results, created_at)
             VALUES ($1, $2, CAST($3 AS jsonb), ARRAY['moderation'], now() - interval '1 hour')",
        )
        .bind(id)
        .bind(stream)
        .bind(fields)
        .execute(&env.pool)
        .await
        .expect("insert a request row");
    }
    let state = env.host().state();
    let sweep = kaleidoscope::requests::sweep(&state.pool, &state.redis, &state.config)
        .await
        .expect("sweep");
    assert_eq!((sweep.republished, sweep.refused), (1, 2), "{sweep:?}");
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT correlation_id, status, error FROM ml_requests ORDER BY 1")
            .fetch_all(&env.pool)
            .await
            .expect("rows");
    assert_eq!(rows[0].0, "broken");
    assert_eq!(rows[0].1, "FAILED");
    assert_eq!(rows[1], ("fine".into(), "PENDING".into(), None));
    assert_eq!(rows[2].0, "forged");
    assert_eq!(rows[2].1, "FAILED");
    assert!(
        env.dead_letters().await.is_empty(),
        "nothing was published to the DLQ"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_waiting_for_replicas_a_server_without_any_says_so_and_keeps_the_request_tracked() {
    let env = TestEnv::prepare(Options::new(&[])).await;
    let (ok, printed) = env.run(&[
        "publish",
        "post-image",
        "--post-id",
        "1",
        "--media-id",
        "1",
        "--media-url",
        "https://cdn.example/x.jpg",
        "--correlation-id",
        "waited",
        "--wait-replicas",
        "1",
        "--wait-timeout-ms",
        "100",
    ]);
    assert!(!ok, "the machine's Redis has no replica: {printed}");
    assert!(
        printed.contains("request waited was published to \"post-image-processing\" as ")
            && printed.contains("only 0 of 1 replica(s) hold it after 100ms"),
        "{printed}"
    );
    // Published once, and tracked: the tracker republishes it if its results never come.
    assert_eq!(
        env.entries("post-image-processing").await.len(),
        1,
        "not added a second time"
    );
    assert_eq!(
        statuses(&env).await,
        [("waited".to_string(), "PENDING".to_string())]
    );
    env.finish().await;
}
