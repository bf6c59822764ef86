//! `kaleidoscope dlq list` and `dlq replay`, and consumer-group hygiene.

use crate::support::{Options, TestEnv, await_exit, eventually, signal};
use std::collections::HashMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_after_the_plugin_is_fixed() {
    let env = TestEnv::start(Options::new(&["panicking", "insights"]).retries(1, 200)).await;
    let first = env.publish("mock-panic", &[("note", "one")]).await;
    let second = env.publish("mock-panic", &[("note", "two")]).await;
    env.await_dead_letter("mock-panic", &first).await;
    env.await_dead_letter("mock-panic", &second).await;
    let malformed = env
        .publish("ml-insights-results", &[("mediaId", "x")])
        .await;
    env.await_dead_letter("ml-insights-results", &malformed)
        .await;

    let listed = env.command(&["dlq", "list", "--stream", "mock-panic", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "filtered by source stream: {listed:?}");
    assert!(
        listed
            .iter()
            .all(|d| d["failure_kind"] == "plugin-trap" && d["plugin_version"] == "0.1.0")
    );
    let table =
        String::from_utf8(env.command(&["dlq", "list", "--kind", "malformed"]).stdout).unwrap();
    assert!(
        table.contains(&malformed) && table.contains("1 dead letter(s)"),
        "{table}"
    );
    // `dlq show`: one dead letter in full; numbers are numbers in JSON.
    let id = listed[0]["id"].as_str().unwrap();
    let shown = env.command(&["dlq", "show", id, "--json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["id"], id);
    assert_eq!(shown["deliveries"], 1);
    // Either of the two (they may be dead-lettered in either order).
    assert!(
        ["one", "two"].contains(&shown["fields"]["note"].as_str().unwrap_or_default()),
        "{shown}"
    );
    let text = String::from_utf8(env.command(&["dlq", "show", id]).stdout).unwrap();
    let error = shown["error"].as_str().unwrap();
    let words: Vec<&str> = text
        .split_once("\nerror\n")
        .and_then(|(_, rest)| rest.split_once("\nfields\n"))
        .map(|(error, _)| error.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        words,
        error.split_whitespace().collect::<Vec<_>>(),
        "the whole error, wrapped: {text}"
    );
    let missing = env.command(&["dlq", "show", "1-1"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no dead letter with id 1-1"));

    // Deploy the fix, then replay what failed under the old version.
    env.install_plugin("panicking-fixed", "panicking");
    env.await_serving("mock-panic", "0.2.0").await;
    let new_ids = env.replay(&["--stream", "mock-panic"]);
    assert_eq!(new_ids.len(), 2);
    // A replay is recorded under the identity of the entry it replays.
    for id in [&first, &second] {
        let replay = format!("{id}/replay");
        env.await_processed("mock-panic", &replay).await;
        assert_eq!(
            env.ledger_version("mock-panic", &replay).await.as_deref(),
            Some("0.2.0")
        );
    }
    let notes: Vec<String> =
        sqlx::query_scalar("SELECT error FROM ml_processing_errors ORDER BY error")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(notes, ["one", "two"]);
    // Replayed dead letters are gone; the others stay.
    let left: Vec<String> = env
        .dead_letters()
        .await
        .into_iter()
        .map(|d| d["sourceStream"].clone())
        .collect();
    assert_eq!(left, ["ml-insights-results"]);

    let refused = env.command(&["dlq", "replay"]);
    assert!(
        !refused.status.success(),
        "replay without a selection must refuse"
    );
    env.await_no_pending("mock-panic").await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_gone_for_good_are_removed_but_never_one_holding_entries() {
    let env =
        TestEnv::start(Options::new(&["scripted"]).set("KALEIDOSCOPE_CONSUMER_EXPIRY_MS", 300))
            .await;
    let key = env.key("scripted");
    let group = env.config.consumer_group.clone();
    let mut redis = env.redis.clone();
    // A crashed consumer still holding an entry: one waiting for a retry (reclaim idle is the
    // default minute) handed over to it.
    let held = env
        .publish("scripted", &[("action", "retry"), ("note", "later")])
        .await;
    eventually("the entry to wait for a retry", || async {
        (env.pending("scripted").await == 1).then_some(())
    })
    .await;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&key)
        .arg(&group)
        .arg("crashed")
        .arg(0)
        .arg(&held)
        .query_async(&mut redis)
        .await
        .unwrap();
    // An idle consumer without entries, created after `crashed` last acted: by the time a sweep
    // removes it, `crashed` has been idle longer than the expiry too, and only the entry it holds
    // can have kept it.
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&key)
        .arg(&group)
        .arg("ghost")
        .query_async(&mut redis)
        .await
        .unwrap();

    let names = || async {
        let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&key)
            .arg(&group)
            .query_async(&mut env.redis.clone())
            .await
            .unwrap();
        consumers
            .iter()
            .filter_map(|c| match c.get("name") {
                Some(redis::Value::BulkString(name)) => {
                    Some(String::from_utf8_lossy(name).into_owned())
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    eventually(
        "the idle consumer without entries to be removed",
        || async { (!names().await.contains(&"ghost".to_string())).then_some(()) },
    )
    .await;
    let remaining = names().await;
    assert!(
        remaining.contains(&"crashed".to_string()),
        "a consumer holding entries is kept: {remaining:?}"
    );
    assert!(
        remaining.contains(&env.config.consumer_name),
        "this host is kept: {remaining:?}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_selects_by_id_by_kind_or_all_and_refuses_to_guess() {
    // The dead letters are made by a host that then stops, so replayed entries stay where
    // replay puts them.
    let env = TestEnv::prepare(Options::new(&["scripted"]).retries(1, 200)).await;
    let mut host = env.spawn_host("maker");
    let malformed = [
        env.publish("scripted", &[("action", "malformed"), ("note", "a")])
            .await,
        env.publish("scripted", &[("action", "malformed"), ("note", "b")])
            .await,
    ];
    let retried = env
        .publish("scripted", &[("action", "retry"), ("note", "c")])
        .await;
    for id in malformed.iter().chain([&retried]) {
        env.await_dead_letter("scripted", id).await;
    }
    signal(&host, "TERM");
    assert!(await_exit(&mut host).await.success());

    let letters: Vec<(String, HashMap<String, String>)> = env
        .entries(&env.config.dlq_stream)
        .await
        .into_iter()
        .map(|(id, fields)| (id, fields.into_iter().collect()))
        .collect();
    let letter_id = |source: &str| {
        letters
            .iter()
            .find(|(_, fields)| fields["sourceId"] == source)
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| panic!("no dead letter for {source}: {letters:?}"))
    };
    let replay = |args: &[&str]| {
        let mut all = vec!["dlq", "replay", "--json"];
        all.extend_from_slice(args);
        env.command(&all)
    };
    let replayed_sources = |output: &std::process::Output| -> Vec<String> {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let replayed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        replayed
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dead_letter_id"].as_str().unwrap().to_string())
            .collect()
    };

    // Nothing selected, an unknown id, an unknown kind: refused, nothing replayed.
    let refused = replay(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--all"));
    let refused = replay(&["0-1"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no dead letter with id 0-1"));
    let refused = replay(&["--kind", "bogus"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("retries-exhausted"));
    assert_eq!(env.dead_letters().await.len(), 3);

    // By id: exactly that one.
    let first = letter_id(&malformed[0]);
    assert_eq!(replayed_sources(&replay(&[&first])), vec![first.clone()]);
    // By kind: only the retried entry.
    let by_kind = replayed_sources(&replay(&["--kind", "retries-exhausted"]));
    assert_eq!(by_kind, vec![letter_id(&retried)]);
    // All: the one left.
    let rest = replayed_sources(&replay(&["--all"]));
    assert_eq!(rest, vec![letter_id(&malformed[1])]);
    assert!(env.dead_letters().await.is_empty());

    // Each went back onto its stream once, marked with the entry it replays.
    let mut marks: Vec<String> = env
        .entries("scripted")
        .await
        .into_iter()
        .filter_map(|(_, fields)| {
            fields
                .into_iter()
                .find(|(name, _)| name == "kaleidoscope-replay-of")
                .map(|(_, value)| value)
        })
        .collect();
    marks.sort();
    let mut expected = vec![malformed[0].clone(), malformed[1].clone(), retried.clone()];
    expected.sort();
    assert_eq!(marks, expected);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_whose_bytes_were_lost_is_not_replayed_without_force() {
    let env = TestEnv::start(Options::new(&["scripted"])).await;
    let id = env
        .publish_bytes(
            "scripted",
            &[("action", b"ok"), ("note", &[b'a', 0xff, b'b'])],
        )
        .await;
    let letter = env.await_dead_letter("scripted", &id).await;
    assert_eq!(letter["failureKind"], "malformed");
    assert_eq!(letter["bytesLost"], "note");

    let refused = env.command(&["dlq", "replay", "--all"]);
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        error.contains("`note`") && error.contains("--force") && error.contains(&id),
        "{error}"
    );
    assert_eq!(env.dead_letters().await.len(), 1, "nothing was replayed");

    let forced = env.command(&["dlq", "replay", "--all", "--force", "--json"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let replayed: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(replayed.as_array().map(Vec::len), Some(1));
    env.finish().await;
}

/// Two copies of one dead letter (the relay republished it after a crash, or an operator replayed
/// twice) are applied once: a replay carries the identity of the entry it replays, and the
/// ledger knows it. A kind alone selects what to replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_twice_is_applied_once() {
    let env = TestEnv::start(Options::new(&["panicking"]).retries(1, 200)).await;
    let failed = env.publish("mock-panic", &[("note", "once")]).await;
    let letter = env.await_dead_letter("mock-panic", &failed).await;
    // The copy a crash between the relay's XADD and its DELETE leaves behind.
    let mut copy = redis::cmd("XADD");
    copy.arg(env.key(&env.config.dlq_stream)).arg("*");
    for (k, v) in &letter {
        copy.arg(k).arg(v);
    }
    let _: String = copy
        .query_async(&mut env.redis.clone())
        .await
        .expect("XADD the copy");

    env.install_plugin("panicking-fixed", "panicking");
    env.await_serving("mock-panic", "0.2.0").await;
    let new_ids = env.replay(&["--kind", "plugin-trap"]);
    assert_eq!(new_ids.len(), 2, "both copies were replayed: {new_ids:?}");
    env.await_processed("mock-panic", &format!("{failed}/replay"))
        .await;
    env.await_drained("mock-panic").await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        1,
        "applied once"
    );
    // Counted once its batch is acknowledged, a moment after the stream is drained.
    eventually("the second copy to be counted as a redelivery", || async {
        let redelivered = env
            .host()
            .state()
            .metrics
            .redelivered
            .get_or_create(&kaleidoscope::metrics::ByStream::new("mock-panic"))
            .get();
        (redelivered >= 1).then_some(())
    })
    .await;
    env.finish().await;
}
