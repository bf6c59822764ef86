//! Rollouts of a candidate version beside the live one: a shadow compares and never writes, a
//! canary takes a share of the keys and keeps each key on its version, a candidate that breaks a
//! threshold is rolled back on every host, and a restarted host resumes the rollout it was in.
//! The candidate is `face-detection-next` (see its source): it reads `bbox` lists as
//! `[x, y, width, height]`, fails on entries that ask it to, and writes a table it may not on
//! entries that ask that.

use crate::support::{Options, TestEnv, eventually, plugin_file};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const STREAM: &str = "face-detection-results";
const PLUGIN: &str = "face-detection";

/// A face-detection entry for `media_id` in the seed's shape (the same commands from both
/// versions), plus `extra` fields.
fn seed_entry(media_id: i64, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let faces = r#"[{"boundingBoxX": 10, "boundingBoxY": 20, "boundingBoxWidth": 30, "boundingBoxHeight": 40, "confidence": 0.9}]"#;
    let mut fields = vec![
        ("mediaId".to_string(), media_id.to_string()),
        ("postId".to_string(), "1".to_string()),
        ("faces".to_string(), faces.to_string()),
        ("correlationId".to_string(), format!("c-{media_id}")),
    ];
    fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    fields
}

/// A face-detection entry in the real producers' shape: a corner `bbox` list, which the
/// candidate reads wrongly.
fn real_entry(media_id: i64) -> Vec<(String, String)> {
    let faces =
        format!(r#"[{{"faceId": "f-{media_id}", "bbox": [10, 20, 110, 220], "confidence": 0.9}}]"#);
    vec![
        ("mediaId".to_string(), media_id.to_string()),
        ("postId".to_string(), "1".to_string()),
        ("faces".to_string(), faces),
        ("correlationId".to_string(), format!("c-{media_id}")),
    ]
}

/// Media rows (and tracked requests, for the request tracker's updates) for `media_ids`.
async fn seed(env: &TestEnv, media_ids: impl Iterator<Item = i64>) {
    let media_ids: Vec<i64> = media_ids.collect();
    env.seed_media(1, &media_ids).await;
    sqlx::query(
        "INSERT INTO ml_requests (correlation_id, stream, media_id, fields, expected_results)
         SELECT 'c-' || m, 'post-image-processing', m, '{}', ARRAY['face_detection', 'insights']
           FROM unnest($1::bigint[]) AS m",
    )
    .bind(&media_ids)
    .execute(&env.pool)
    .await
    .expect("seed requests");
}

/// `plugin deploy <face-detection-next> <rollout args>`, which must succeed.
fn start_rollout(env: &TestEnv, rollout: &[&str]) -> String {
    let file = plugin_file("face-detection-next");
    let mut args = vec![
        "plugin",
        "deploy",
        file.to_str().unwrap(),
        "--timeout",
        "30",
    ];
    args.extend_from_slice(rollout);
    let (ok, printed) = env.run(&args);
    assert!(ok, "the rollout did not start: {printed}");
    assert!(printed.contains("started rollout"), "{printed}");
    printed
}

/// `rollout status face-detection --json`: the latest rollout.
fn rollout_status(env: &TestEnv) -> Value {
    let (ok, printed) = env.run(&["rollout", "status", PLUGIN, "--json"]);
    assert!(ok, "{printed}");
    let json_start = printed.find('[').expect("JSON");
    let reports: Value = serde_json::from_str(&printed[json_start..]).expect("rollout status JSON");
    reports[0].clone()
}

/// The tally of `role` in a `rollout status` report: outcome → entries.
fn tally(report: &Value, role: &str) -> BTreeMap<String, i64> {
    report["entries"][role]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(outcome, n)| (outcome.clone(), n.as_i64().unwrap()))
        .collect()
}

/// Every row of `table` as JSON without the columns that differ between two databases doing the
/// same work (serial ids, timestamps), in a stable order.
async fn rows(env: &TestEnv, table: &str) -> Vec<Value> {
    let sql = format!(
        "SELECT row FROM (SELECT to_jsonb(t) - 'id' - 'created_at' - 'updated_at'
                                 - 'last_published_at' AS row FROM {table} t) AS rows
          ORDER BY row::text"
    );
    let rows: Vec<(Value,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{table}: {e}"));
    rows.into_iter().map(|(row,)| row).collect()
}

/// The plugin version the ledger recorded for each entry of the stream.
async fn versions(env: &TestEnv) -> BTreeMap<String, String> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT entry_id, plugin_version FROM processed_entries WHERE stream = $1")
            .bind(STREAM)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// Waits until the ledger has `count` entries of the stream.
async fn await_ledger(env: &TestEnv, count: i64) {
    eventually(&format!("{count} entries in the ledger"), || async {
        (env.ledger_count(STREAM).await == count).then_some(())
    })
    .await;
}

/// The dead letters without what differs between two streams doing the same work.
async fn dead_letters(env: &TestEnv) -> BTreeSet<String> {
    env.dead_letters()
        .await
        .into_iter()
        .map(|mut letter| {
            for field in ["sourceId", "failedAt", "timestamp"] {
                letter.remove(field);
            }
            serde_json::to_string(&letter.into_iter().collect::<BTreeMap<_, _>>()).unwrap()
        })
        .collect()
}

/// A shadow candidate runs on every entry and writes nothing: the counts of its comparisons are
/// exact, the sample names the columns it would change, and the tables, the request tracker,
/// the outbox and the dead-letter stream are what the live version alone makes of the same
/// entries (a second environment without the rollout, side by side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_compares_every_entry_and_changes_nothing_the_live_version_writes() {
    let alone = TestEnv::start(Options::new(&[PLUGIN])).await;
    let shadowed = TestEnv::start(Options::new(&[PLUGIN])).await;
    let printed = start_rollout(&shadowed, &["--shadow"]);
    assert!(printed.contains("shadow on 100% by mediaId"), "{printed}");

    // 20 in the real shape (the candidate reads their boxes differently), 37 in the seed's
    // shape (the same), one the candidate answers with a table it may not write, two malformed
    // for both versions (no faces: the same failure).
    let mut entries = Vec::new();
    for i in 0..60 {
        let media_id = 1000 + i;
        entries.push(match i {
            _ if i % 3 == 0 => real_entry(media_id),
            1 => seed_entry(media_id, &[("candidateFault", "trespass")]),
            2 | 4 => vec![("mediaId".to_string(), media_id.to_string())],
            _ => seed_entry(media_id, &[]),
        });
    }
    for env in [&alone, &shadowed] {
        seed(env, 1000..1060).await;
        env.publish_many(STREAM, &entries).await;
        await_ledger(env, 60).await;
        env.await_no_pending(STREAM).await;
    }

    let report = rollout_status(&shadowed);
    assert_eq!(
        report["state"], "running",
        "a shadow is not rolled back for a refusal"
    );
    let compared = tally(&report, "shadow");
    assert_eq!(
        compared,
        BTreeMap::from([
            ("same".to_string(), 39),
            ("different".to_string(), 20),
            ("candidate-rejected".to_string(), 1),
        ])
    );

    let (ok, printed) = shadowed.run(&["rollout", "diff", PLUGIN, "--limit", "100", "--json"]);
    assert!(ok, "{printed}");
    let diff: Value = serde_json::from_str(&printed).expect("rollout diff JSON");
    let differences = diff["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 21);
    let mut columns = BTreeSet::new();
    for difference in differences.iter().filter(|d| d["verdict"] == "different") {
        for change in difference["changes"].as_array().unwrap() {
            assert_eq!(change["table"], "media_detected_faces");
            columns.insert(change["column"].as_str().unwrap().to_string());
            if change["column"] == "bbox_width" {
                assert_eq!(
                    (change["live"].as_f64(), change["candidate"].as_f64()),
                    (Some(100.0), Some(110.0))
                );
            }
        }
    }
    assert_eq!(
        columns,
        BTreeSet::from(["bbox_width".to_string(), "bbox_height".to_string()])
    );
    let rejected = differences
        .iter()
        .find(|d| d["verdict"] == "candidate-rejected")
        .unwrap();
    assert!(
        rejected["candidate"]["rejected"]
            .as_str()
            .unwrap()
            .contains("ml_processing_errors"),
        "{rejected}"
    );
    let (_, text) = shadowed.run(&["rollout", "diff", PLUGIN]);
    assert!(
        text.contains("media_detected_faces.bbox_width: 100.0 → 110.0"),
        "{text}"
    );

    // What the live version alone writes, and nothing else.
    for table in [
        "media_ai_insights",
        "media_detected_faces",
        "ml_requests",
        "ml_processing_errors",
    ] {
        assert_eq!(
            rows(&shadowed, table).await,
            rows(&alone, table).await,
            "table {table}"
        );
    }
    assert_eq!(
        shadowed
            .count("SELECT count(*) FROM ml_processing_errors")
            .await,
        0
    );
    for env in [&alone, &shadowed] {
        eventually("the outbox to be empty", || async {
            (env.count("SELECT count(*) FROM outbox").await == 0).then_some(())
        })
        .await;
    }
    assert_eq!(dead_letters(&shadowed).await, dead_letters(&alone).await);
    assert_eq!(shadowed.dead_letters().await.len(), 2);
    // Exactly once, every entry by the live build.
    let live = versions(&shadowed).await;
    assert_eq!(live.len(), 60);
    assert!(live.values().all(|v| v == "0.1.0"), "{live:?}");
    assert_eq!(shadowed.rows_written_again("media_detected_faces").await, 0);
    alone.finish().await;
    shadowed.finish().await;
}

/// Waits until both hosts report serving the plugin.
async fn await_hosts(env: &TestEnv, hosts: &[&str]) {
    eventually("the hosts to serve face-detection", || async {
        let (report, _) = env.status();
        let serving = report["hosts"]
            .as_array()?
            .iter()
            .filter(|h| {
                h["plugins"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["name"] == PLUGIN))
            })
            .count();
        (serving == hosts.len()).then_some(())
    })
    .await;
}

/// The media id of each published entry id.
fn keys_of(ids: &[String], media_ids: &[i64]) -> BTreeMap<String, i64> {
    ids.iter().cloned().zip(media_ids.iter().copied()).collect()
}

/// Two hosts with plugins directories of their own: a canary on 25% of the media ids takes about
/// a quarter of the entries, each media id on one version; at 50% only media ids move, from live
/// to candidate; `promote` makes the candidate live on both; every entry is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_takes_its_share_by_key_on_every_host_grows_by_key_and_is_promoted() {
    let env = TestEnv::prepare(Options::new(&[])).await;
    let alpha_dir = env.directory_of("alpha", &[PLUGIN]);
    let beta_dir = env.directory_of("beta", &[PLUGIN]);
    let _alpha = env.spawn_on("alpha", &alpha_dir);
    let _beta = env.spawn_on("beta", &beta_dir);
    await_hosts(&env, &["alpha", "beta"]).await;
    let printed = start_rollout(&env, &["--canary", "25", "--key", "mediaId"]);
    assert!(
        printed.contains("alpha: loaded") && printed.contains("beta: loaded"),
        "{printed}"
    );
    let (_, status) = env.run(&["status"]);
    assert!(status.contains("rollouts in progress:"), "{status}");
    assert!(
        status.contains("rollout 1 of face-detection: 0.1.0 → 0.2.0")
            && status.contains("canary on 25% by mediaId, running"),
        "{status}"
    );
    let (_, text) = env.run(&["rollout", "status", PLUGIN]);
    assert!(
        text.contains("host alpha: following") && text.contains("host beta: following"),
        "{text}"
    );

    // Round 1 at 25%: 300 media ids, two entries each.
    seed(&env, 1..=300).await;
    let media: Vec<i64> = (1..=300).chain(1..=300).collect();
    let entries: Vec<_> = media.iter().map(|m| seed_entry(*m, &[])).collect();
    let ids = env.publish_many(STREAM, &entries).await;
    let key = keys_of(&ids, &media);
    await_ledger(&env, 600).await;
    let handled = versions(&env).await;
    let mut by_key: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for (id, version) in &handled {
        by_key.entry(key[id]).or_default().insert(version.clone());
    }
    assert!(
        by_key.values().all(|v| v.len() == 1),
        "a media id was handled by both versions"
    );
    let candidate_keys: BTreeSet<i64> = by_key
        .iter()
        .filter(|(_, v)| v.contains("0.2.0"))
        .map(|(k, _)| *k)
        .collect();
    let share = candidate_keys.len() as f64 / 300.0;
    // 25% ± 7 points (three standard deviations of 300 keys drawn at 25%).
    assert!(
        (share - 0.25).abs() <= 0.07,
        "the candidate took {share} of the keys"
    );
    let report = rollout_status(&env);
    let candidate = tally(&report, "candidate");
    let live = tally(&report, "live");
    assert_eq!(candidate["processed"] + live["processed"], 600);
    assert_eq!(candidate["processed"] as usize, 2 * candidate_keys.len());
    assert_eq!(
        report["ledger"]["candidate"]["processed"],
        candidate["processed"]
    );

    // Round 2 at 50%: only keys move, from live to candidate.
    let (ok, printed) = env.run(&[
        "rollout",
        "set",
        PLUGIN,
        "--canary",
        "50",
        "--timeout",
        "30",
    ]);
    assert!(ok, "{printed}");
    let media: Vec<i64> = (1..=300).collect();
    let entries: Vec<_> = media.iter().map(|m| seed_entry(*m, &[])).collect();
    let ids = env.publish_many(STREAM, &entries).await;
    await_ledger(&env, 900).await;
    let handled = versions(&env).await;
    let now_candidate: BTreeSet<i64> = ids
        .iter()
        .zip(&media)
        .filter(|(id, _)| handled[*id] == "0.2.0")
        .map(|(_, m)| *m)
        .collect();
    assert!(
        candidate_keys.is_subset(&now_candidate),
        "a key went back to the live version"
    );
    let share = now_candidate.len() as f64 / 300.0;
    assert!(
        (share - 0.5).abs() <= 0.09,
        "the candidate took {share} of the keys at 50%"
    );

    // Promote: both hosts run the candidate as the live version.
    let (ok, printed) = env.run(&["rollout", "promote", PLUGIN, "--timeout", "30"]);
    assert!(ok, "{printed}");
    assert!(
        printed.contains("alpha: loaded") && printed.contains("beta: loaded"),
        "{printed}"
    );
    assert_eq!(rollout_status(&env)["state"], "promoted");
    let entries: Vec<_> = (1..=50).map(|m| seed_entry(m, &[])).collect();
    let ids = env.publish_many(STREAM, &entries).await;
    await_ledger(&env, 950).await;
    let handled = versions(&env).await;
    assert!(ids.iter().all(|id| handled[id] == "0.2.0"));
    env.await_no_pending(STREAM).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

/// A canary that dead-letters a third of its entries is rolled back by the hosts once their
/// windows fill: the plan says why, the hosts log it, and every entry after it is the live
/// version's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_a_third_of_its_entries_is_rolled_back_on_every_host() {
    let env = TestEnv::prepare(Options::new(&[]).set("KALEIDOSCOPE_BATCH_SIZE", 20)).await;
    // Each host serves /metrics on a port of its own.
    let mut ports = BTreeMap::new();
    let mut hosts = Vec::new();
    for host in ["alpha", "beta"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let dir = env.directory_of(host, &[PLUGIN]);
        // Batches of 20, two in flight: what the bound on the candidate's entries below is
        // made of (the defaults grow reads of a backlog to 1000, three in flight).
        hosts.push(env.spawn_with(
            host,
            &dir,
            &[
                ("KALEIDOSCOPE_HTTP_ADDR", &addr),
                ("KALEIDOSCOPE_BATCH_SIZE", "20"),
                ("KALEIDOSCOPE_MAX_BATCH_SIZE", "20"),
                ("KALEIDOSCOPE_MAX_IN_FLIGHT", "2"),
            ],
        ));
        ports.insert(host, addr);
    }
    await_hosts(&env, &["alpha", "beta"]).await;
    start_rollout(&env, &["--canary", "50", "--window", "30"]);

    seed(&env, 1..=700).await;
    let entries: Vec<_> = (1..=600)
        .map(|m| match m % 3 {
            0 => seed_entry(m, &[("candidateFault", "malformed")]),
            _ => seed_entry(m, &[]),
        })
        .collect();
    env.publish_many(STREAM, &entries).await;
    let report = eventually("the rollout to be rolled back", || async {
        let report = rollout_status(&env);
        (report["state"] == "rolled-back").then_some(report)
    })
    .await;
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("the candidate failed") && reason.contains("of its last 30 entries"),
        "{reason}"
    );
    await_ledger(&env, 600).await;
    // Within the window: each host judges its own window of 30 candidate entries, and may have
    // handled its batches in flight (2 of 20 entries, as the hosts were started) before it, or before the
    // other host's rollback reached it. Nothing beyond that.
    let candidate = tally(&rollout_status(&env), "candidate");
    let judged = candidate.values().sum::<i64>();
    assert!(
        judged <= 2 * (30 + 2 * 20),
        "the candidate handled {judged} entries before the rollback"
    );
    eventually("both hosts to log the rollback or its end", || async {
        let logs: Vec<String> = ["alpha", "beta"]
            .iter()
            .map(|h| std::fs::read_to_string(env.host_log(h)).unwrap_or_default())
            .collect();
        (logs.iter().any(|l| l.contains("rolled back rollout"))
            && logs
                .iter()
                .all(|l| l.contains("rolled back rollout") || l.contains("rolled-back")))
        .then_some(())
    })
    .await;
    // The host that judged it counts it.
    for (host, addr) in &ports {
        let log = std::fs::read_to_string(env.host_log(host)).unwrap_or_default();
        if log.contains("rolled back rollout") {
            let (_, metrics) = crate::support::http_get(addr.parse().unwrap(), "/metrics");
            assert!(
                metrics.contains(r#"kaleidoscope_rollout_rollbacks_total{plugin="face-detection",reason="failure-rate"} 1"#),
                "{host}: {metrics}"
            );
        }
    }

    // After the rollback, the live version handles every entry.
    let entries: Vec<_> = (601..=700)
        .map(|m| seed_entry(m, &[("candidateFault", "malformed")]))
        .collect();
    let ids = env.publish_many(STREAM, &entries).await;
    await_ledger(&env, 700).await;
    let handled = versions(&env).await;
    assert!(ids.iter().all(|id| handled[id] == "0.1.0"));
    env.finish().await;
}

/// A canary whose candidate writes a table it was not granted is rolled back at its first entry:
/// the command never runs, the entry is handled by the live version, and the rollback is counted
/// in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_writing_a_table_it_may_not_is_rolled_back_at_its_first_entry() {
    let env =
        TestEnv::start(Options::new(&[PLUGIN]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0")).await;
    start_rollout(&env, &["--canary", "100"]);
    seed(&env, 1..=10).await;
    let entries: Vec<_> = (1..=10)
        .map(|m| seed_entry(m, &[("candidateFault", "trespass")]))
        .collect();
    let ids = env.publish_many(STREAM, &entries).await;
    await_ledger(&env, 10).await;
    let report = rollout_status(&env);
    assert_eq!(report["state"], "rolled-back");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("validation refused") && reason.contains("ml_processing_errors"),
        "{reason}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        0
    );
    assert!(env.dead_letters().await.is_empty());
    let handled = versions(&env).await;
    assert!(ids.iter().all(|id| handled[id] == "0.1.0"), "{handled:?}");
    let addr = env.host().http_addr().expect("an HTTP address");
    let (_, metrics) = crate::support::http_get(addr, "/metrics");
    assert!(
        metrics.contains(
            r#"kaleidoscope_rollout_rollbacks_total{plugin="face-detection",reason="rejected"} 1"#
        ),
        "{metrics}"
    );
    env.finish().await;
}

/// A host restarted in the middle of a canary follows the same rollout from its first batch:
/// the plan is in PostgreSQL, and the routing of a key depends only on the rollout and the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_resumes_the_rollout_it_was_in() {
    let mut env = TestEnv::start(Options::new(&[PLUGIN])).await;
    start_rollout(&env, &["--canary", "50"]);
    seed(&env, 1..=100).await;
    let media: Vec<i64> = (1..=100).collect();
    let entries: Vec<_> = media.iter().map(|m| seed_entry(*m, &[])).collect();
    let first = env.publish_many(STREAM, &entries).await;
    await_ledger(&env, 100).await;
    env.host.take().unwrap().shutdown().await;

    env = env.with_host().await;
    let followed = env.host().state().rollouts.snapshot();
    let active = followed
        .active
        .get(PLUGIN)
        .expect("the rollout, followed from the start");
    assert_eq!(active.row.percent, 50.0);
    let second = env.publish_many(STREAM, &entries).await;
    await_ledger(&env, 200).await;
    let handled = versions(&env).await;
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(
            handled[a], handled[b],
            "a key changed version across the restart"
        );
    }
    assert!(handled.values().any(|v| v == "0.2.0") && handled.values().any(|v| v == "0.1.0"));
    env.finish().await;
}

/// The rollout commands refuse what would leave two answers to "which version runs": a rollout
/// of the live build itself, a second rollout, a plain deploy during one; `abort` ends it on the
/// host, and a change of an ended rollout is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_commands_refuse_what_would_be_ambiguous_and_abort_ends_it() {
    let env = TestEnv::start(Options::new(&[PLUGIN])).await;
    let live = plugin_file(PLUGIN);
    let (ok, printed) = env.run(&[
        "plugin",
        "deploy",
        live.to_str().unwrap(),
        "--canary",
        "10",
        "--timeout",
        "30",
    ]);
    assert!(
        !ok && printed.contains("is the live build already"),
        "{printed}"
    );

    start_rollout(&env, &["--shadow", "50"]);
    let candidate = plugin_file("face-detection-next");
    let candidate = candidate.to_str().unwrap();
    let (ok, printed) = env.run(&["plugin", "deploy", candidate, "--timeout", "30"]);
    assert!(
        !ok && printed.contains("rollout 1 of face-detection"),
        "{printed}"
    );
    assert!(printed.contains("nothing was deployed"), "{printed}");
    let (ok, printed) = env.run(&[
        "plugin",
        "deploy",
        candidate,
        "--canary",
        "10",
        "--timeout",
        "30",
    ]);
    assert!(
        !ok && printed.contains("no other rollout was started"),
        "{printed}"
    );

    let (ok, printed) = env.run(&[
        "rollout",
        "set",
        PLUGIN,
        "--canary",
        "10",
        "--timeout",
        "30",
    ]);
    assert!(ok, "{printed}");
    let followed = env.host().state().rollouts.snapshot();
    assert_eq!(followed.active[PLUGIN].row.mode, "canary");
    assert_eq!(followed.active[PLUGIN].row.percent, 10.0);

    let (ok, printed) = env.run(&["rollout", "abort", PLUGIN]);
    assert!(ok && printed.contains("aborted rollout 1"), "{printed}");
    let report = rollout_status(&env);
    assert_eq!(report["state"], "aborted");
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .starts_with("aborted by ")
    );
    eventually("the host to let the rollout go", || async {
        env.host()
            .state()
            .rollouts
            .snapshot()
            .active
            .is_empty()
            .then_some(())
    })
    .await;
    let (ok, printed) = env.run(&["rollout", "set", PLUGIN, "--canary", "20"]);
    assert!(
        !ok && printed.contains("no rollout of \"face-detection\" is running"),
        "{printed}"
    );
    env.finish().await;
}
