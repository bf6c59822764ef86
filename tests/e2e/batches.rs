//! Set-based batches: one batch of many entries must leave exactly what applying its entries one
//! by one in stream order would. Entries are published before the host starts (with a large
//! first read), so each test's entries arrive in one batch — checked through the ledger, whose
//! `processed_at` is the start time of the batch transaction.

use crate::support::{Options, TestEnv, eventually};

const INSIGHTS: &str = "ml-insights-results";
const RECOGNITION: &str = "face-recognition-results";

/// How many batch transactions recorded the entries of `stream`.
async fn transactions(env: &TestEnv, stream: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT processed_at) FROM processed_entries WHERE stream = $1",
    )
    .bind(stream)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// That `stream`'s entries were committed by one batch, through its set-based statements (not
/// entry by entry), and none was dead-lettered.
async fn assert_one_set_based_batch(env: &TestEnv, stream: &str) {
    let dead_letters = env.dead_letters().await;
    assert!(dead_letters.is_empty(), "{dead_letters:?}");
    assert_eq!(transactions(env, stream).await, 1, "one batch");
    let entry_by_entry = env
        .host()
        .state()
        .metrics
        .batches_entry_by_entry
        .get_or_create(&kaleidoscope::metrics::ByStream::new(stream))
        .get();
    assert_eq!(entry_by_entry, 0, "the set-based statements ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_many_times_in_a_batch_equals_applying_the_entries_in_order() {
    let env =
        TestEnv::prepare(Options::new(&["insights"]).set("KALEIDOSCOPE_BATCH_SIZE", 100)).await;
    env.seed_media(1, &[11, 12]).await;
    let messages: &[&[(&str, &str)]] = &[
        &[
            ("mediaId", "11"),
            ("service", "tagging"),
            ("tags", r#"["a", "b"]"#),
        ],
        &[
            ("mediaId", "11"),
            ("service", "image_captioning"),
            ("caption", "first"),
        ],
        &[
            ("mediaId", "12"),
            ("service", "moderation"),
            ("isSafe", "true"),
        ],
        &[
            ("mediaId", "11"),
            ("service", "image_captioning"),
            ("caption", "second"),
        ],
        &[
            ("mediaId", "11"),
            ("service", "tagging"),
            ("tags", r#"["c"]"#),
        ],
        &[
            ("mediaId", "11"),
            ("service", "moderation"),
            ("isSafe", "false"),
        ],
        // The seed's shape: fills its columns, names no service.
        &[
            ("mediaId", "12"),
            ("scenes", r#"["beach"]"#),
            ("qualityScore", "0.5"),
        ],
        &[
            ("mediaId", "11"),
            ("service", "tagging"),
            ("tags", r#"["d"]"#),
        ],
    ];
    for fields in messages {
        env.publish(INSIGHTS, fields).await;
    }
    let env = env.with_host().await;
    env.await_drained(INSIGHTS).await;
    assert_eq!(env.ledger_count(INSIGHTS).await, messages.len() as i64);
    assert_eq!(transactions(&env, INSIGHTS).await, 1, "one batch");

    let rows: Vec<(i64, Option<String>, Option<Vec<String>>, Option<bool>, Option<Vec<String>>, Option<f64>, Vec<String>)> =
        sqlx::query_as(
            "SELECT media_id, caption, tags, is_safe, scenes, quality_score, services_completed FROM media_ai_insights ORDER BY media_id",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        rows,
        [
            (
                11,
                Some("second".into()),
                Some(vec!["d".into()]),
                Some(false),
                None,
                None,
                // append-unique: an ordered union, in the order the services first reported.
                vec![
                    "tagging".into(),
                    "image_captioning".into(),
                    "moderation".into()
                ],
            ),
            (
                12,
                None,
                None,
                Some(true),
                Some(vec!["beach".into()]),
                Some(0.5),
                vec!["moderation".into()],
            ),
        ]
    );
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_finds_no_row_is_retried_alone_and_its_neighbours_commit() {
    let env = TestEnv::prepare(
        Options::new(&["face-recognition"])
            .retries(2, 300)
            .set("KALEIDOSCOPE_BATCH_SIZE", 100),
    )
    .await;
    env.seed_media(3, &[30]).await;
    env.seed_user(77, "alice").await;
    env.seed_user(78, "bob").await;
    sqlx::query(
        "INSERT INTO media_detected_faces (media_id, face_id, bbox_x, bbox_y, bbox_width, bbox_height)
         VALUES (30, 'face-a', 0, 0, 1, 1), (30, 'face-b', 2, 2, 1, 1)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let recognise = |face: &'static str, user: &'static str| {
        [
            ("mediaId", "30"),
            ("faceId", face),
            ("suggestedUserId", user),
            ("confidenceScore", "0.9"),
        ]
    };
    let a = env.publish(RECOGNITION, &recognise("face-a", "77")).await;
    let missing = env.publish(RECOGNITION, &recognise("face-z", "77")).await;
    let b = env.publish(RECOGNITION, &recognise("face-b", "78")).await;
    let env = env.with_host().await;

    env.await_processed(RECOGNITION, &a).await;
    env.await_processed(RECOGNITION, &b).await;
    // The missing face's entry was left pending for a retry, then dead-lettered with the reason.
    let letter = env.await_dead_letter(RECOGNITION, &missing).await;
    assert_eq!(letter["failureKind"], "retries-exhausted");
    assert!(
        letter["error"].contains("media_detected_faces") && letter["error"].contains("face-z"),
        "{}",
        letter["error"]
    );
    let faces: Vec<(String, Option<i64>, String)> = sqlx::query_as(
        "SELECT face_id, suggested_user_id, status FROM media_detected_faces ORDER BY face_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        faces,
        [
            ("face-a".into(), Some(77), "SUGGESTED".into()),
            ("face-b".into(), Some(78), "SUGGESTED".into()),
        ]
    );
    env.await_no_pending(RECOGNITION).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_entry_inside_a_batch_of_new_ones_runs_nothing_again() {
    let mut env =
        TestEnv::start(Options::new(&["scripted"]).set("KALEIDOSCOPE_BATCH_SIZE", 100)).await;
    let emit = |note: &'static str| {
        [
            ("action", "emit"),
            ("target", "scripted-out"),
            ("note", note),
        ]
    };
    let first = env.publish("scripted", &emit("first")).await;
    env.await_processed("scripted", &first).await;
    env.await_no_pending("scripted").await;
    let out_len = |env: &TestEnv| {
        let key = env.key("scripted-out");
        let mut redis = env.redis.clone();
        async move {
            redis::cmd("XLEN")
                .arg(key)
                .query_async::<i64>(&mut redis)
                .await
                .unwrap()
        }
    };
    eventually("the first emit to be published", || async {
        (out_len(&env).await == 1).then_some(())
    })
    .await;

    // Stop, rewind the group so the first entry is read again, and add two new ones behind it.
    if let Some(host) = env.host.take() {
        host.shutdown().await;
    }
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(env.key("scripted"))
        .arg(&env.config.consumer_group)
        .arg("0")
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    let second = env.publish("scripted", &emit("second")).await;
    let third = env.publish("scripted", &emit("third")).await;
    let env = env.with_host().await;

    env.await_processed("scripted", &second).await;
    env.await_processed("scripted", &third).await;
    env.await_drained("scripted").await;
    eventually("the new entries' emits to be published", || async {
        (out_len(&env).await >= 3).then_some(())
    })
    .await;
    let notes: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(env.key("scripted-out"))
        .arg("-")
        .arg("+")
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    let notes: Vec<&str> = notes
        .iter()
        .flat_map(|(_, fields)| fields.iter().map(|(_, v)| v.as_str()))
        .collect();
    assert_eq!(
        notes,
        ["first", "second", "third"],
        "the first entry ran once"
    );
    assert_eq!(env.ledger_count("scripted").await, 3);
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

/// Float arrays (embeddings) travel to PostgreSQL in binary, every row's numbers in one array
/// sliced per row: in one batch, each row gets its own numbers — `real[]` rounded as
/// PostgreSQL rounds, `double precision[]` exact — a NULL stays NULL and an empty list is `{}`,
/// through upserts (folded or not) and inserts alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float_arrays_in_one_batch_keep_each_rows_own_numbers() {
    let mut options = Options::new(&["scripted"]).set("KALEIDOSCOPE_BATCH_SIZE", 100);
    options.plugin_sections.insert(
        "scripted".to_string(),
        vec!["tables = [\"vectors\"]".to_string()],
    );
    let env = TestEnv::prepare(options).await;
    sqlx::query("CREATE TABLE vectors (id BIGINT PRIMARY KEY, v REAL[], w DOUBLE PRECISION[])")
        .execute(&env.pool)
        .await
        .expect("create the table");
    let commands = |json: &str| {
        vec![
            ("action".to_string(), "commands".to_string()),
            ("commands".to_string(), json.to_string()),
        ]
    };
    let entries = [
        commands(r#"[{"upsert": "vectors", "key": {"id": 1}, "set": {"v": [9, 9], "w": [0.1]}}]"#),
        commands(
            r#"[{"upsert": "vectors", "key": {"id": 2}, "set": {"v": null, "w": [0.5, 0.25]}}]"#,
        ),
        commands(
            r#"[{"upsert": "vectors", "key": {"id": 1}, "set": {"v": [1.5, -2.25, 0.00003]}}]"#,
        ),
        commands(r#"[{"upsert": "vectors", "key": {"id": 3}, "set": {"v": [], "w": [1e300]}}]"#),
        commands(
            r#"[{"insert": "vectors", "values": {"id": 4, "v": [0.1], "w": [0.30000000000000004]}}]"#,
        ),
        commands(r#"[{"insert": "vectors", "values": {"id": 5, "v": null, "w": []}}]"#),
    ];
    env.publish_many("scripted", &entries).await;
    let env = env.with_host().await;
    env.await_drained("scripted").await;
    assert_one_set_based_batch(&env, "scripted").await;
    type Row = (i64, Option<Vec<f32>>, Option<Vec<f64>>);
    let rows: Vec<Row> = sqlx::query_as("SELECT id, v, w FROM vectors ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .expect("the rows");
    let expected: Vec<Row> = vec![
        (
            1,
            Some(vec![1.5, -2.25, 0.00003_f64 as f32]),
            Some(vec![0.1]),
        ),
        (2, None, Some(vec![0.5, 0.25])),
        (3, Some(vec![]), Some(vec![1e300])),
        (
            4,
            Some(vec![0.1_f64 as f32]),
            Some(vec![0.30000000000000004]),
        ),
        (5, None, Some(vec![])),
    ];
    assert_eq!(rows, expected);
    env.finish().await;
}

/// Upserts of one table whose rows set different columns (a service's tags, another's caption)
/// are written by one statement, so the batch takes the table shared like any other and runs
/// beside other batches on it: it commits while another transaction holds the table's shared
/// lock (a batch that had to have the table to itself would wait for it). And the one statement
/// leaves what each row's own statement would: a new row gets the defaults of the columns it
/// does not set, an existing row keeps them, a NULL that is set is written, and assigning and
/// appending to one column mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_setting_different_columns_share_one_statement_and_the_table() {
    let mut options = Options::new(&["scripted"]).set("KALEIDOSCOPE_BATCH_SIZE", 100);
    options.plugin_sections.insert(
        "scripted".to_string(),
        vec!["tables = [\"shaped\"]".to_string()],
    );
    let env = TestEnv::prepare(options).await;
    sqlx::query(
        "CREATE TABLE shaped (
             id BIGINT PRIMARY KEY,
             a TEXT,
             b TEXT DEFAULT 'b-default',
             labels TEXT[] NOT NULL DEFAULT '{}',
             status TEXT NOT NULL DEFAULT 'PENDING',
             seq BIGSERIAL
         )",
    )
    .execute(&env.pool)
    .await
    .expect("create the table");
    sqlx::query(
        "INSERT INTO shaped (id, a, b, labels, status) VALUES
             (1, 'old-a', 'old-b', '{x}', 'DONE'),
             (4, 'old-a', NULL, '{x,y}', 'DONE'),
             (5, 'old-a', 'old-b', '{x}', 'DONE')",
    )
    .execute(&env.pool)
    .await
    .expect("the existing rows");
    let commands = |json: &str| {
        vec![
            ("action".to_string(), "commands".to_string()),
            ("commands".to_string(), json.to_string()),
        ]
    };
    let entries = [
        commands(r#"[{"upsert": "shaped", "key": {"id": 1}, "set": {"a": "new-a"}}]"#),
        commands(r#"[{"upsert": "shaped", "key": {"id": 2}, "set": {"b": "two"}}]"#),
        commands(r#"[{"upsert": "shaped", "key": {"id": 3}, "append": {"labels": ["p", "q"]}}]"#),
        commands(r#"[{"upsert": "shaped", "key": {"id": 4}, "append": {"labels": ["y", "z"]}}]"#),
        commands(
            r#"[{"upsert": "shaped", "key": {"id": 5}, "set": {"a": null, "labels": ["only"]}}]"#,
        ),
        commands(
            r#"[{"upsert": "shaped", "key": {"id": 6}, "set": {"a": "six", "status": "DONE"}}]"#,
        ),
    ];
    env.publish_many("scripted", &entries).await;

    // Another writer of the table holds its shared lock throughout.
    let mut other = env.pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended('kaleidoscope.table.shaped', 0))",
    )
    .execute(&mut *other)
    .await
    .expect("the table's shared lock");
    let env = env.with_host().await;
    env.await_drained("scripted").await;
    other.rollback().await.expect("rollback");

    assert_one_set_based_batch(&env, "scripted").await;
    type Row = (
        i64,
        Option<String>,
        Option<String>,
        Vec<String>,
        String,
        bool,
    );
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, a, b, labels, status, seq IS NOT NULL FROM shaped ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .expect("the rows");
    let text = |s: &str| Some(s.to_string());
    let labels = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let expected: Vec<Row> = vec![
        (
            1,
            text("new-a"),
            text("old-b"),
            labels(&["x"]),
            "DONE".into(),
            true,
        ),
        (2, None, text("two"), labels(&[]), "PENDING".into(), true),
        (
            3,
            None,
            text("b-default"),
            labels(&["p", "q"]),
            "PENDING".into(),
            true,
        ),
        (
            4,
            text("old-a"),
            None,
            labels(&["x", "y", "z"]),
            "DONE".into(),
            true,
        ),
        (
            5,
            None,
            text("old-b"),
            labels(&["only"]),
            "DONE".into(),
            true,
        ),
        (
            6,
            text("six"),
            text("b-default"),
            labels(&[]),
            "DONE".into(),
            true,
        ),
    ];
    assert_eq!(rows, expected);
    env.finish().await;
}
