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

/// Runs `kaleidoscope <args>`: whether it succeeded, and what it printed (stdout, then stderr).
fn run(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let output = env.command(args);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

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
    assert_eq!((processed, dead_lettered, skipped), (ENTRIES, 0, 0), "{outcome}");
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
    assert_eq!(insight_writes(&env).await, (0, ENTRIES), "each row written once");
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
    assert_eq!(insight_writes(&env).await, (0, ENTRIES), "nothing written again");

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
