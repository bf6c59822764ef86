//! Reprocessing history (`kaleidoscope reprocess`): a backfill through a new version fills a new
//! column for every row once per run; a repair rewrites exactly the rows a bad version wrote; a
//! run killed mid-way resumes and applies every entry once; a dry run reports the changes the
//! real run then makes; a partly trimmed selection says what is gone; emits are left out and a
//! run's dead letters carry it.

use crate::support::{Options, TestEnv, eventually, plugin_file, signal};
use serde_json::Value;
use std::collections::BTreeMap;

const INSIGHTS: &str = "ml-insights-results";
const FACES: &str = "face-detection-results";

/// `kaleidoscope reprocess <args> --json`, which must succeed: its outcome.
fn reprocess(env: &TestEnv, args: &[&str]) -> Value {
    let mut all = vec!["reprocess"];
    all.extend_from_slice(args);
    all.push("--json");
    let output = env.command(&all);
    assert!(
        output.status.success(),
        "reprocess {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "reprocess printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Media rows 1..=count, in one statement.
async fn seed_media(env: &TestEnv, count: i64) {
    env.seed_media(1, &[]).await;
    sqlx::query(
        "INSERT INTO post_media (media_id, post_id, media_url)
         SELECT m, 1, 'https://cdn/x.jpg' FROM generate_series(1, $1) AS m",
    )
    .bind(count)
    .execute(&env.pool)
    .await
    .expect("seed media");
}

/// An insights entry (the real producers' captioning message) whose caption has `words` words.
fn caption_entry(media_id: i64, words: usize) -> Vec<(String, String)> {
    let caption = vec!["word"; words].join(" ");
    vec![
        ("mediaId".to_string(), media_id.to_string()),
        ("service".to_string(), "image_captioning".to_string()),
        ("caption".to_string(), caption),
    ]
}

/// The column the team adds before shipping the version that fills it, and an audit of every
/// write to `media_ai_insights` from now on (how the test sees a row written twice).
async fn add_caption_words(env: &TestEnv) {
    for sql in [
        "ALTER TABLE media_ai_insights ADD COLUMN caption_words INTEGER",
        "CREATE TABLE insight_writes (media_id BIGINT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        "CREATE FUNCTION audit_insight() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO insight_writes (media_id) VALUES (NEW.media_id); RETURN NEW; END $$",
        "CREATE TRIGGER audit AFTER INSERT OR UPDATE ON media_ai_insights
         FOR EACH ROW EXECUTE FUNCTION audit_insight()",
    ] {
        sqlx::query(sql)
            .execute(&env.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Rows written more than once since [`add_caption_words`], and rows written at all.
async fn insight_writes(env: &TestEnv) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE n > 1), count(*)
           FROM (SELECT media_id, count(*) AS n FROM insight_writes GROUP BY media_id) AS w",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count writes")
}

/// The run's ledger rows, by plugin version.
async fn run_ledger(env: &TestEnv, stream: &str, run: i64) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT plugin_version, count(*) FROM processed_entries
          WHERE stream = $1 AND entry_id LIKE '%/reprocess:' || $2
          GROUP BY plugin_version",
    )
    .bind(stream)
    .bind(run.to_string())
    .fetch_all(&env.pool)
    .await
    .expect("read the ledger");
    rows.into_iter().collect()
}

/// A run's id and counts from an outcome.
fn run_of(outcome: &Value) -> (i64, i64, i64, i64) {
    let run = &outcome["run"];
    (
        run["id"].as_i64().expect("a recorded run"),
        run["processed"].as_i64().unwrap_or(-1),
        run["dead_lettered"].as_i64().unwrap_or(-1),
        run["skipped"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_fills_a_new_column_for_every_row_once_per_run() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    const ENTRIES: i64 = 20_000;
    seed_media(&env, ENTRIES).await;
    let entries: Vec<Vec<(String, String)>> = (1..=ENTRIES)
        .map(|m| caption_entry(m, (m % 7 + 1) as usize))
        .collect();
    env.publish_many(INSIGHTS, &entries).await;
    env.await_drained(INSIGHTS).await;
    assert_eq!(env.ledger_count(INSIGHTS).await, ENTRIES);

    // The team adds a column and ships the version that fills it; new entries get it, history
    // does not.
    add_caption_words(&env).await;
    let (deployed, printed) = env.deploy(&plugin_file("insights-backfill"));
    assert!(deployed, "{printed}");
    env.await_serving(INSIGHTS, "0.2.0").await;
    assert_eq!(
        env.count("SELECT count(*) FROM media_ai_insights WHERE caption_words IS NULL")
            .await,
        ENTRIES
    );

    let outcome = reprocess(&env, &["--stream", INSIGHTS, "--from", "0"]);
    let (run, processed, dead_lettered, skipped) = run_of(&outcome);
    assert_eq!(
        (processed, dead_lettered, skipped),
        (ENTRIES, 0, 0),
        "{outcome}"
    );
    assert_eq!(outcome["run"]["state"], "finished");
    assert_eq!(outcome["version"], "0.2.0", "the live build: the store's");
    assert_eq!(outcome["survey"]["selected"], ENTRIES);
    assert_eq!(outcome["survey"]["missing"], 0);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM media_ai_insights
              WHERE caption_words IS DISTINCT FROM media_id % 7 + 1"
        )
        .await,
        0,
        "every row has its caption's word count"
    );
    assert_eq!(
        insight_writes(&env).await,
        (0, ENTRIES),
        "each row written once"
    );
    assert_eq!(
        run_ledger(&env, INSIGHTS, run).await,
        BTreeMap::from([("0.2.0".to_string(), ENTRIES)]),
        "the run's own ledger rows, by the version it ran"
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM processed_entries
              WHERE stream = 'ml-insights-results' AND entry_id NOT LIKE '%/%'
                AND plugin_version = '0.1.0'"
        )
        .await,
        ENTRIES,
        "the live delivery's rows are left as they were"
    );
    assert_eq!(env.pending(INSIGHTS).await, 0, "a run acknowledges nothing");

    // The same run again (read from its start under its identity) applies nothing.
    let again = reprocess(&env, &["--resume", &run.to_string()]);
    assert_eq!(run_of(&again), (run, ENTRIES, 0, ENTRIES), "{again}");
    assert_eq!(
        insight_writes(&env).await,
        (0, ENTRIES),
        "nothing written again"
    );

    // A new run applies again, on purpose.
    let second = reprocess(&env, &["--stream", INSIGHTS, "--from", "0"]);
    let (second_run, processed, _, skipped) = run_of(&second);
    assert_ne!(second_run, run);
    assert_eq!((processed, skipped), (ENTRIES, 0));
    assert_eq!(
        insight_writes(&env).await,
        (ENTRIES, ENTRIES),
        "every row written once more"
    );
    env.finish().await;
}

/// A face-detection entry in the real producers' shape: one face with a corner `bbox`, which
/// `face-detection-next` (0.2.0) reads wrongly as x/y/width/height (width 110 instead of 100).
fn face_entry(media_id: i64) -> Vec<(String, String)> {
    let faces =
        format!(r#"[{{"faceId": "f-{media_id}", "bbox": [10, 20, 110, 220], "confidence": 0.9}}]"#);
    vec![
        ("mediaId".to_string(), media_id.to_string()),
        ("postId".to_string(), "1".to_string()),
        ("faces".to_string(), faces),
    ]
}

/// Every face row: (media id, face id) → (width, height, updated_at as text).
async fn faces(env: &TestEnv) -> BTreeMap<(i64, String), (f64, f64, String)> {
    let rows: Vec<(i64, String, f64, f64, String)> = sqlx::query_as(
        "SELECT media_id, face_id, bbox_width, bbox_height, updated_at::text FROM media_detected_faces",
    )
    .fetch_all(&env.pool)
    .await
    .expect("read faces");
    rows.into_iter()
        .map(|(m, f, w, h, at)| ((m, f), (w, h, at)))
        .collect()
}

/// Media ids whose `media_ai_insights` row was updated after it was created.
async fn insights_touched(env: &TestEnv) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT media_id FROM media_ai_insights WHERE updated_at <> created_at ORDER BY media_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("read insights")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repair_rewrites_exactly_the_rows_the_bad_version_wrote_as_its_dry_run_said() {
    let env = TestEnv::start(Options::new(&["face-detection"])).await;
    seed_media(&env, 60).await;
    // 1–20 by the good version, 21–40 by the bad one, 41–60 by the good one again.
    let shared = &env;
    let publish = |range: std::ops::RangeInclusive<i64>| {
        let entries: Vec<Vec<(String, String)>> = range.map(face_entry).collect();
        async move { shared.publish_many(FACES, &entries).await }
    };
    publish(1..=20).await;
    env.await_drained(FACES).await;
    let (deployed, printed) = env.deploy(&plugin_file("face-detection-next"));
    assert!(deployed, "{printed}");
    env.await_serving(FACES, "0.2.0").await;
    publish(21..=40).await;
    env.await_drained(FACES).await;
    let (deployed, printed) = env.deploy(&plugin_file("face-detection"));
    assert!(deployed, "{printed}");
    env.await_serving(FACES, "0.1.0").await;
    publish(41..=60).await;
    env.await_drained(FACES).await;
    let before = faces(&env).await;
    assert_eq!(before.len(), 60);
    let wrong: Vec<i64> = before
        .iter()
        .filter(|(_, (w, h, _))| (*w, *h) != (100.0, 200.0))
        .map(|((m, _), _)| *m)
        .collect();
    assert_eq!(
        wrong,
        (21..=40).collect::<Vec<_>>(),
        "what the bad version wrote"
    );
    assert!(insights_touched(&env).await.is_empty());

    // The dry run says what the repair will change, and writes nothing.
    let selection = ["--handled-by", "face-detection@0.2.0", "--with", "0.1.0"];
    let mut dry_args = selection.to_vec();
    dry_args.push("--dry-run");
    let dry = reprocess(&env, &dry_args);
    assert!(dry["run"].is_null(), "a dry run is not recorded: {dry}");
    assert_eq!(dry["counts"]["processed"], 20, "{dry}");
    assert_eq!(faces(&env).await, before, "a dry run writes nothing");
    assert!(insights_touched(&env).await.is_empty(), "nothing at all");
    let (ok, printed) = env.run(&[
        "reprocess",
        "--handled-by",
        "face-detection@0.2.0",
        "--with",
        "0.1.0",
        "--dry-run",
    ]);
    assert!(ok, "{printed}");
    assert!(
        printed.contains("media_detected_faces.bbox_width: 20 rows")
            && printed.contains(r#"{"face_id":"f-21","media_id":21}: 110 → 100"#)
            && printed.contains("media_detected_faces: 20 rows written — 20 changed, 0 added"),
        "{printed}"
    );

    let outcome = reprocess(&env, &selection);
    let (run_id, processed, dead_lettered, _) = run_of(&outcome);
    assert_eq!((processed, dead_lettered), (20, 0), "{outcome}");
    let after = faces(&env).await;
    assert!(
        after.values().all(|(w, h, _)| (*w, *h) == (100.0, 200.0)),
        "every box right now"
    );
    let touched: Vec<i64> = after
        .iter()
        .filter(|(key, (_, _, at))| before[*key].2 != *at)
        .map(|((m, _), _)| *m)
        .collect();
    assert_eq!(
        touched,
        (21..=40).collect::<Vec<_>>(),
        "exactly the bad version's rows"
    );
    assert_eq!(insights_touched(&env).await, (21..=40).collect::<Vec<_>>());

    // What changed is what the dry run said, column by column, row by row.
    let mut changed: BTreeMap<String, BTreeMap<String, (f64, f64)>> = BTreeMap::new();
    for (key, (width, height, _)) in &after {
        let (old_width, old_height, _) = &before[key];
        let row = serde_json::json!({"face_id": key.1, "media_id": key.0}).to_string();
        for (column, old, new) in [
            ("bbox_width", old_width, width),
            ("bbox_height", old_height, height),
        ] {
            if old != new {
                changed
                    .entry(column.to_string())
                    .or_default()
                    .insert(row.clone(), (*old, *new));
            }
        }
    }
    let tables = &dry["changes"]["tables"];
    let mut reported: BTreeMap<String, BTreeMap<String, (f64, f64)>> = BTreeMap::new();
    for (column, changes) in tables["media_detected_faces"]["columns"]
        .as_object()
        .expect("columns")
    {
        assert_eq!(
            changes["rows"],
            changes["examples"].as_array().unwrap().len()
        );
        for example in changes["examples"].as_array().unwrap() {
            reported.entry(column.clone()).or_default().insert(
                example["key"].to_string(),
                (
                    example["before"].as_f64().expect("a number"),
                    example["after"].as_f64().expect("a number"),
                ),
            );
        }
    }
    assert_eq!(reported, changed, "the dry run's changes are the run's");
    assert_eq!(tables["media_ai_insights"]["unchanged"], 20, "{tables}");
    assert_eq!(tables["media_ai_insights"]["changed"], 0, "{tables}");

    // The ledger tells the run apart: the bad version's rows stay, the run's are its own.
    assert_eq!(
        run_ledger(&env, FACES, run_id).await,
        BTreeMap::from([("0.1.0".to_string(), 20)])
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM processed_entries
              WHERE entry_id NOT LIKE '%/%' AND plugin_version = '0.2.0'"
        )
        .await,
        20
    );

    // A version nothing holds is refused naming what is known; a rollout's candidate (an
    // aborted one too) can be named.
    let (ok, printed) = env.run(&[
        "reprocess",
        "--handled-by",
        "face-detection@0.2.0",
        "--with",
        "0.2.0",
        "--dry-run",
    ]);
    assert!(
        !ok && printed.contains("--with 0.2.0: no build of plugin face-detection has that version")
            && printed.contains("0.1.0 in the plugin store"),
        "{printed}"
    );
    let file = plugin_file("face-detection-next");
    let (ok, printed) = env.run(&[
        "plugin",
        "deploy",
        file.to_str().unwrap(),
        "--shadow",
        "--timeout",
        "30",
    ]);
    assert!(ok, "{printed}");
    let (ok, printed) = env.run(&["rollout", "abort", "face-detection"]);
    assert!(ok, "{printed}");
    let again = reprocess(
        &env,
        &[
            "--handled-by",
            "face-detection@0.2.0",
            "--with",
            "0.2.0",
            "--dry-run",
        ],
    );
    assert_eq!(again["from"], "a rollout's candidate (0.2.0)", "{again}");
    assert_eq!(
        again["changes"]["tables"]["media_detected_faces"]["columns"]["bbox_width"]["rows"], 20,
        "the bad version would write its wrong boxes again: {again}"
    );
    env.finish().await;
}

/// Polls the run's record until `ready` holds for it; returns its id.
async fn await_run(env: &TestEnv, what: &str, ready: fn(&str, i64) -> bool) -> i64 {
    eventually(what, || async {
        let row: Option<(i64, String, i64)> = sqlx::query_as(
            "SELECT id, state, processed FROM reprocess_runs ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&env.pool)
        .await
        .ok()
        .flatten();
        row.filter(|(_, state, processed)| ready(state, *processed))
            .map(|(id, _, _)| id)
    })
    .await
}

/// Starts `reprocess --from 0` of the insights stream through insights-backfill at `rate`
/// entries/s in batches of 20, as a process of its own (stdout piped, for its report).
fn spawn_backfill(env: &TestEnv, rate: &str) -> std::process::Child {
    let file = plugin_file("insights-backfill");
    env.binary(&[
        "reprocess",
        "--stream",
        INSIGHTS,
        "--from",
        "0",
        "--with",
        file.to_str().unwrap(),
        "--rate",
        rate,
        "--batch",
        "20",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("start a run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_killed_mid_way_resumes_and_applies_every_entry_exactly_once() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    const ENTRIES: i64 = 3_000;
    seed_media(&env, ENTRIES).await;
    let entries: Vec<Vec<(String, String)>> = (1..=ENTRIES).map(|m| caption_entry(m, 3)).collect();
    env.publish_many(INSIGHTS, &entries).await;
    env.await_drained(INSIGHTS).await;
    add_caption_words(&env).await;

    let mut child = spawn_backfill(&env, "400");
    let run_id = await_run(
        &env,
        "the run to apply a few hundred entries",
        |_, processed| processed >= 300,
    )
    .await;
    let id = run_id.to_string();
    let (ok, printed) = env.run(&["reprocess", "--resume", &id]);
    assert!(
        !ok && printed.contains("being applied by another process"),
        "one process applies a run: {printed}"
    );
    signal(&child, "KILL");
    crate::support::await_exit(&mut child).await;
    let state: String = sqlx::query_scalar("SELECT state FROM reprocess_runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&env.pool)
        .await
        .expect("the run");
    assert_eq!(state, "running", "killed: nothing said it stopped");
    let partial: i64 = sqlx::query_scalar("SELECT processed FROM reprocess_runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&env.pool)
        .await
        .expect("the run");
    assert!(partial < ENTRIES, "killed in the middle ({partial})");

    let outcome = reprocess(&env, &["--resume", &id]);
    let (_, processed, dead_lettered, _) = run_of(&outcome);
    assert_eq!((processed, dead_lettered), (ENTRIES, 0), "{outcome}");
    assert_eq!(outcome["run"]["state"], "finished");
    assert_eq!(
        insight_writes(&env).await,
        (0, ENTRIES),
        "every row written, none twice"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM media_ai_insights WHERE caption_words IS DISTINCT FROM 3")
            .await,
        0
    );
    assert_eq!(
        run_ledger(&env, INSIGHTS, run_id).await,
        BTreeMap::from([("0.2.0".to_string(), ENTRIES)])
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partly_trimmed_selection_reports_what_is_gone_and_processes_the_rest() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    seed_media(&env, 100).await;
    let entries: Vec<Vec<(String, String)>> = (1..=100).map(|m| caption_entry(m, 2)).collect();
    let ids = env.publish_many(INSIGHTS, &entries).await;
    env.await_drained(INSIGHTS).await;
    add_caption_words(&env).await;
    let _: i64 = redis::cmd("XTRIM")
        .arg(env.key(INSIGHTS))
        .arg("MAXLEN")
        .arg(60)
        .query_async(&mut env.redis.clone())
        .await
        .expect("trim");

    let file = plugin_file("insights-backfill");
    let file = file.to_str().unwrap();
    let outcome = reprocess(&env, &["--stream", INSIGHTS, "--from", "0", "--with", file]);
    assert_eq!(outcome["survey"]["missing"], 40, "{outcome}");
    assert_eq!(outcome["survey"]["selected"], 60);
    assert_eq!(outcome["survey"]["stream_starts"], ids[40].as_str());
    assert_eq!(run_of(&outcome).1, 60);
    assert_eq!(outcome["run"]["missing"], 40);
    assert_eq!(
        env.count("SELECT count(*) FROM media_ai_insights WHERE caption_words = 2")
            .await,
        60,
        "the rest was processed"
    );

    // Ids too: two trimmed, one there; said in the text report.
    let listed = format!("{},{},{}", ids[0], ids[1], ids[70]);
    let (ok, printed) = env.run(&[
        "reprocess",
        "--stream",
        INSIGHTS,
        "--ids",
        &listed,
        "--with",
        file,
    ]);
    assert!(ok, "{printed}");
    assert!(
        printed.contains(&format!(
            "2 no longer there (trimmed or deleted; the stream now starts at {})",
            ids[40]
        )) && printed.contains("applied: 1 entries"),
        "{printed}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_leaves_emits_out_unless_asked_and_tags_its_dead_letters() {
    let env = TestEnv::start(Options::new(&["scripted"])).await;
    let mut emit_ids = Vec::new();
    for n in 0..3 {
        emit_ids.push(
            env.publish(
                "scripted",
                &[
                    ("action", "emit"),
                    ("target", "scripted-out"),
                    ("note", &n.to_string()),
                ],
            )
            .await,
        );
    }
    env.publish("scripted", &[("action", "malformed"), ("note", "bad")])
        .await;
    env.publish("scripted", &[("action", "ok"), ("note", "once")])
        .await;
    env.await_drained("scripted").await;
    let out_length = || async {
        let length: i64 = redis::cmd("XLEN")
            .arg(env.key("scripted-out"))
            .query_async(&mut env.redis.clone())
            .await
            .expect("XLEN");
        length
    };
    eventually("the live emits", || async {
        (out_length().await == 3).then_some(())
    })
    .await;
    assert_eq!(env.dead_letters().await.len(), 1);

    let outcome = reprocess(&env, &["--stream", "scripted", "--from", "0"]);
    let (run_id, processed, dead_lettered, _) = run_of(&outcome);
    assert_eq!((processed, dead_lettered), (4, 1), "{outcome}");
    assert_eq!(outcome["run"]["emits_suppressed"], 3);
    let letters = eventually("the run's dead letters", || async {
        let letters = env.dead_letters().await;
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let tagged: Vec<&std::collections::HashMap<String, String>> = letters
        .iter()
        .filter(|l| l.get("reprocessRun") == Some(&run_id.to_string()))
        .collect();
    assert_eq!(tagged.len(), 1, "{letters:?}");
    assert_eq!(out_length().await, 3, "no emit went out again");
    let (ok, printed) = env.run(&["reprocess", "--list"]);
    assert!(
        ok && printed.contains(&format!("run {run_id} of scripted")),
        "{printed}"
    );
    let (_, printed) = env.run(&["status"]);
    assert!(printed.contains("reprocessing runs"), "{printed}");

    let (ok, printed) = env.run(&["dlq", "replay", "--stream", "scripted"]);
    assert!(
        ok && printed.contains("kaleidoscope reprocess --stream scripted --ids"),
        "a run's dead letters are left to runs: {printed}"
    );

    let listed = emit_ids.join(",");
    let again = reprocess(&env, &["--stream", "scripted", "--ids", &listed, "--emit"]);
    assert_eq!(run_of(&again).1, 3, "{again}");
    eventually("the run's emits", || async {
        (out_length().await == 6).then_some(())
    })
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ctrl_c_leaves_a_run_resumable_a_cancel_stops_it_and_both_show_in_status_and_metrics() {
    let env =
        TestEnv::start(Options::new(&["insights"]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0"))
            .await;
    const ENTRIES: i64 = 2_000;
    seed_media(&env, ENTRIES).await;
    let entries: Vec<Vec<(String, String)>> = (1..=ENTRIES).map(|m| caption_entry(m, 4)).collect();
    env.publish_many(INSIGHTS, &entries).await;
    env.await_drained(INSIGHTS).await;
    add_caption_words(&env).await;
    // Ctrl-C: the batch in flight finishes, the run is interrupted and says how to resume.
    let mut child = spawn_backfill(&env, "200");
    let first = await_run(&env, "the first run to apply some entries", |state, n| {
        state == "running" && n >= 60
    })
    .await;
    signal(&child, "INT");
    let status = crate::support::await_exit(&mut child).await;
    assert_eq!(status.code(), Some(130), "interrupted");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut printed).unwrap();
    assert!(
        printed.contains(&format!(
            "resume with `kaleidoscope reprocess --resume {first}`"
        )),
        "{printed}"
    );
    let (state, processed): (String, i64) =
        sqlx::query_as("SELECT state, processed FROM reprocess_runs WHERE id = $1")
            .bind(first)
            .fetch_one(&env.pool)
            .await
            .expect("the run");
    assert_eq!(state, "interrupted");
    assert!(processed > 0 && processed < ENTRIES, "{processed}");
    assert_eq!(
        env.count("SELECT count(*) FROM media_ai_insights WHERE caption_words = 4")
            .await,
        processed,
        "what it applied stays applied, counted exactly"
    );

    // Visible in status and in the hosts' metrics.
    let (report, _) = env.status();
    let runs = report["reprocessing"].as_array().expect("runs in status");
    assert!(
        runs.iter()
            .any(|r| r["id"] == first && r["state"] == "interrupted"),
        "{report}"
    );
    let addr = env.host().http_addr().expect("an HTTP address");
    let (_, metrics) = crate::support::http_get(addr, "/metrics");
    assert!(
        metrics.contains(r#"kaleidoscope_reprocess_runs{state="interrupted"} 1"#)
            && metrics.contains(&format!(
                r#"kaleidoscope_reprocess_entries{{run="{first}",stream="ml-insights-results",plugin="insights",version="0.2.0",outcome="processed"}} {processed}"#
            )),
        "{metrics}"
    );

    // A cancel from elsewhere stops a running run after its batch; it cannot be resumed.
    let mut child = spawn_backfill(&env, "200");
    let second = await_run(&env, "the second run to apply some entries", |state, n| {
        state == "running" && n >= 40
    })
    .await;
    assert_ne!(second, first);
    let (ok, printed) = env.run(&["reprocess", "--cancel", &second.to_string()]);
    assert!(
        ok && printed.contains(&format!("cancelled run {second}")),
        "{printed}"
    );
    let status = crate::support::await_exit(&mut child).await;
    assert_eq!(status.code(), Some(1), "a cancelled run did not finish");
    let (ok, printed) = env.run(&["reprocess", "--resume", &second.to_string()]);
    assert!(!ok && printed.contains("is cancelled"), "{printed}");

    // The interrupted one goes on to the end.
    let outcome = reprocess(&env, &["--resume", &first.to_string()]);
    assert_eq!(run_of(&outcome).1, ENTRIES, "{outcome}");
    env.finish().await;
}
