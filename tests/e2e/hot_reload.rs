//! Plugins swapped, broken, removed and added while the host runs.

use crate::support::{Options, TestEnv, eventually};

const INSIGHTS: &str = "ml-insights-results";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_a_plugin_while_entries_arrive_loses_and_doubles_nothing() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    let media: Vec<i64> = (1..=300).collect();
    env.seed_media(1, &media).await;

    let publish = |range: std::ops::RangeInclusive<i64>| {
        let env = &env;
        async move {
            let mut ids = Vec::new();
            for m in range {
                let media = m.to_string();
                let caption = format!("caption {m}");
                ids.push((
                    m,
                    env.publish(
                        INSIGHTS,
                        &[
                            ("mediaId", &media),
                            ("service", "image_captioning"),
                            ("caption", &caption),
                        ],
                    )
                    .await,
                ));
            }
            ids
        }
    };
    // Publishing continues while the file is replaced.
    let mut before = publish(1..=100).await;
    env.install_plugin("insights-next", "insights");
    before.extend(publish(101..=200).await);
    env.await_serving(INSIGHTS, "0.2.0").await;
    let after = publish(201..=300).await;

    for (_, id) in before.iter().chain(&after) {
        env.await_processed(INSIGHTS, id).await;
    }
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT media_id, caption FROM media_ai_insights ORDER BY media_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 300, "every entry's effect exists");
    assert_eq!(
        env.rows_written_again("media_ai_insights").await,
        0,
        "no entry was applied twice across the swap"
    );
    for (media_id, caption) in &rows {
        assert_eq!(caption, &format!("caption {media_id}"));
    }
    let ledger: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_entries WHERE stream = $1")
            .bind(INSIGHTS)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(ledger, 300);
    for (_, id) in &after {
        assert_eq!(
            env.ledger_version(INSIGHTS, id).await.as_deref(),
            Some("0.2.0"),
            "entries after the swap are handled by the new version"
        );
    }
    let old: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_entries WHERE plugin_version = '0.1.0'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(
        old > 0,
        "entries before the swap were handled by the old version"
    );
    assert!(env.dead_letters().await.is_empty());
    env.await_no_pending(INSIGHTS).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_leaves_the_old_version_serving_and_shows_in_status() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    env.seed_media(1, &[1, 2]).await;
    // A half-written copy of a new version.
    let full = std::fs::read(crate::support::plugin_file("insights-next")).unwrap();
    std::fs::write(
        env.plugins_dir.join("insights.wasm"),
        &full[..full.len() / 2],
    )
    .unwrap();
    // A component whose manifest() traps, and one that claims a stream already served.
    env.install_plugin("manifest-trap", "manifest-trap");
    std::fs::write(env.plugins_dir.join("not-wasm.wasm"), b"hello").unwrap();
    env.host().reload_plugins().await.unwrap();

    let (report, healthy) = eventually("status to report the failed loads", || async {
        let (report, healthy) = env.status();
        let failures = report["hosts"][0]["failed_loads"]
            .as_array()
            .map_or(0, Vec::len);
        (failures == 3).then_some((report, healthy))
    })
    .await;
    assert!(!healthy, "failed plugin loads make status exit non-zero");
    let failures = report["hosts"][0]["failed_loads"].as_array().unwrap();
    let reason = |file: &str| {
        failures
            .iter()
            .find(|f| f["file"].as_str().unwrap().ends_with(file))
            .map(|f| f["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no failure reported for {file}: {failures:?}"))
    };
    assert!(
        reason("insights.wasm").contains("component"),
        "{}",
        reason("insights.wasm")
    );
    assert!(
        reason("manifest-trap.wasm").contains("manifest()"),
        "{}",
        reason("manifest-trap.wasm")
    );
    assert!(
        reason("not-wasm.wasm").contains("not a WebAssembly file"),
        "{}",
        reason("not-wasm.wasm")
    );
    let problems = report["problems"].to_string();
    assert!(problems.contains("failed to load"), "{problems}");

    // The old version still serves.
    assert_eq!(
        env.serving(INSIGHTS),
        Some(("insights".into(), "0.1.0".into()))
    );
    let id = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "still served"),
            ],
        )
        .await;
    env.await_processed(INSIGHTS, &id).await;
    assert_eq!(
        env.ledger_version(INSIGHTS, &id).await.as_deref(),
        Some("0.1.0")
    );

    // Finishing the write swaps the new version in.
    env.install_plugin("insights-next", "insights");
    env.await_serving(INSIGHTS, "0.2.0").await;
    let id = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "2"),
                ("service", "image_captioning"),
                ("caption", "new"),
            ],
        )
        .await;
    env.await_processed(INSIGHTS, &id).await;
    assert_eq!(
        env.ledger_version(INSIGHTS, &id).await.as_deref(),
        Some("0.2.0")
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_claiming_a_served_stream_is_refused() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    // Same streams under another file name: the serving plugin keeps its stream.
    env.install_plugin("insights-next", "zz-insights-copy");
    env.host().reload_plugins().await.unwrap();
    let snapshot = env.host().state().registry.snapshot();
    let failure = snapshot
        .failures()
        .iter()
        .find(|f| f.file.ends_with("zz-insights-copy.wasm"))
        .expect("the clash is reported");
    assert!(failure.reason.contains("insights"), "{}", failure.reason);
    assert_eq!(
        env.serving(INSIGHTS),
        Some(("insights".into(), "0.1.0".into()))
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_plugin_parks_its_stream_until_it_returns() {
    let env = TestEnv::start(Options::new(&["insights", "scripted"])).await;
    env.seed_media(1, &[1, 2, 3]).await;
    std::fs::remove_file(env.plugins_dir.join("insights.wasm")).unwrap();
    eventually("the insights stream to stop being consumed", || async {
        (!env.host().streams().await.contains(&INSIGHTS.to_string())).then_some(())
    })
    .await;

    let mut ids = Vec::new();
    for m in ["1", "2", "3"] {
        ids.push(
            env.publish(
                INSIGHTS,
                &[
                    ("mediaId", m),
                    ("service", "image_captioning"),
                    ("caption", "waited"),
                ],
            )
            .await,
        );
    }
    // The host goes on working (an entry of another stream, published after them, is done)…
    let later = env.publish("scripted", &[("action", "ok")]).await;
    env.await_processed("scripted", &later).await;
    // …and nobody has read them: not delivered, not processed, not dead-lettered.
    assert_eq!(env.pending(INSIGHTS).await, 0);
    let read: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(env.key(INSIGHTS))
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    assert_eq!(
        read[0].get("lag"),
        Some(&redis::Value::Int(3)),
        "all three wait unread: {read:?}"
    );
    for id in &ids {
        assert_eq!(env.ledger_outcome(INSIGHTS, id).await, None);
    }

    env.install_plugin("insights", "insights");
    for id in &ids {
        env.await_processed(INSIGHTS, id).await;
    }
    env.await_no_pending(INSIGHTS).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_for_a_new_stream_is_consumed_without_a_restart() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    env.install_plugin("scripted", "scripted");
    eventually("the scripted stream to be consumed", || async {
        env.host()
            .streams()
            .await
            .contains(&"scripted".to_string())
            .then_some(())
    })
    .await;
    let id = env
        .publish("scripted", &[("action", "ok"), ("note", "hello")])
        .await;
    env.await_processed("scripted", &id).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_unchanged_plugins_does_not_recompile() {
    let cache = std::env::temp_dir().join(crate::support::unique("cache"));
    let options = Options::new(&["insights", "face-detection"])
        .set("KALEIDOSCOPE_CACHE_DIR", cache.display());
    let env = TestEnv::start(options).await;
    let first: Vec<bool> = env
        .host()
        .state()
        .registry
        .snapshot()
        .plugins()
        .iter()
        .map(|p| p.from_cache)
        .collect();
    assert_eq!(first, [false, false], "a fresh cache compiles");
    let env = {
        let mut env = env;
        env.host.take().unwrap().shutdown().await;
        env.with_host().await
    };
    let second: Vec<bool> = env
        .host()
        .state()
        .registry
        .snapshot()
        .plugins()
        .iter()
        .map(|p| p.from_cache)
        .collect();
    assert_eq!(
        second,
        [true, true],
        "a restart loads the compiled components from the cache"
    );
    let (report, _) = env.status();
    assert!(
        report["hosts"][0]["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["from_cache"] == true)
    );
    env.finish().await;
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_finishes_on_the_version_it_started_with() {
    let env = TestEnv::start(Options::new(&["slow"])).await;
    let early = env
        .publish("mock-slow", &[("millis", "2000"), ("note", "early")])
        .await;
    // In the handler, not only delivered: a batch read but not yet dispatched when the swap lands
    // would (rightly) run on the new version, and the test would prove nothing.
    env.await_call_running("slow").await;
    env.install_plugin("slow-next", "slow");
    env.host().reload_plugins().await.unwrap();
    env.await_serving("mock-slow", "0.2.0").await;
    let late = env
        .publish("mock-slow", &[("millis", "0"), ("note", "late")])
        .await;
    env.await_processed("mock-slow", &early).await;
    env.await_processed("mock-slow", &late).await;
    assert_eq!(
        env.ledger_version("mock-slow", &early).await.as_deref(),
        Some("0.1.0"),
        "the entry in flight during the swap"
    );
    assert_eq!(
        env.ledger_version("mock-slow", &late).await.as_deref(),
        Some("0.2.0")
    );
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_that_would_stall_loading_are_refused_within_their_limits() {
    let env =
        TestEnv::start(Options::new(&["insights"]).set("KALEIDOSCOPE_PLUGIN_TIMEOUT_MS", 500))
            .await;
    env.install_plugin("manifest-loop", "manifest-loop");
    // Larger than the limit (sparse: no disk is spent on it).
    let huge = std::fs::File::create(env.plugins_dir.join("huge.wasm")).unwrap();
    huge.set_len(kaleidoscope::plugin::registry::MAX_PLUGIN_BYTES as u64 + 1)
        .unwrap();
    drop(huge);
    env.host().reload_plugins().await.unwrap();

    let failures = env.host().state().registry.snapshot().failures().to_vec();
    let reason = |file: &str| {
        failures
            .iter()
            .find(|f| f.file.ends_with(file))
            .map(|f| f.reason.clone())
            .unwrap_or_else(|| panic!("no failure reported for {file}: {failures:?}"))
    };
    let looping = reason("manifest-loop.wasm");
    assert!(
        looping.contains("manifest()") && looping.contains("did not return within 500ms"),
        "{looping}"
    );
    let huge = reason("huge.wasm");
    assert!(huge.contains("larger than the limit"), "{huge}");
    assert_eq!(
        env.serving(INSIGHTS).map(|(name, _)| name).as_deref(),
        Some("insights"),
        "what was serving still serves"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_added_to_the_configuration_file_applies_without_a_restart() {
    let env = TestEnv::start(Options::new(&["scripted"])).await;
    let refused = env
        .publish(
            "scripted",
            &[
                ("action", "emit"),
                ("target", "granted-later"),
                ("note", "x"),
            ],
        )
        .await;
    let letter = env.await_dead_letter("scripted", &refused).await;
    assert_eq!(letter["failureKind"], "forbidden-command");

    // The operator grants the stream in the file the host was started with.
    let config = std::fs::read_to_string(&env.config_file).unwrap();
    let granted = config.replace(
        "emit = [\"scripted-out\"]",
        "emit = [\"scripted-out\", \"granted-later\"]",
    );
    assert_ne!(config, granted, "the fixture grants changed: {config}");
    std::fs::write(&env.config_file, granted).unwrap();
    eventually("the host to reload the grants", || async {
        env.host()
            .state()
            .policy("scripted")
            .emit
            .contains("granted-later")
            .then_some(())
    })
    .await;
    let allowed = env
        .publish(
            "scripted",
            &[
                ("action", "emit"),
                ("target", "granted-later"),
                ("note", "y"),
            ],
        )
        .await;
    env.await_processed("scripted", &allowed).await;
    // The outbox publishes it just after the commit.
    eventually("the granted emit to arrive", || async {
        (!env.entries("granted-later").await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(env.entries("granted-later").await.len(), 1);

    // A broken file keeps the grants in force.
    std::fs::write(&env.config_file, "[plugins.scripted\n").unwrap();
    env.host().reload_plugins().await.unwrap();
    assert!(
        env.host()
            .state()
            .policy("scripted")
            .emit
            .contains("granted-later")
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_table_and_its_grant_reach_a_running_host_without_a_rebuild() {
    let env = TestEnv::start(Options::new(&["scripted"]).operator_migrations()).await;
    let write = |note: &'static str| {
        let env = &env;
        async move {
            env.publish(
                "scripted",
                &[
                    ("action", "write-table"),
                    ("table", "caption_quality"),
                    ("column", "note"),
                    ("note", note),
                ],
            )
            .await
        }
    };
    // Neither table nor grant yet.
    let early = write("too early").await;
    let letter = env.await_dead_letter("scripted", &early).await;
    assert_eq!(letter["failureKind"], "forbidden-command");

    // The author's migration and the operator's grant, dropped in while the host runs.
    std::fs::write(
        env.migrations_dir().join("0001_caption_quality.sql"),
        "CREATE TABLE caption_quality (id BIGSERIAL PRIMARY KEY, note TEXT NOT NULL);",
    )
    .unwrap();
    let config = std::fs::read_to_string(&env.config_file).unwrap();
    std::fs::write(
        &env.config_file,
        config.replace(
            "tables = [\"ml_processing_errors\"]\nemit",
            "tables = [\"ml_processing_errors\", \"caption_quality\"]\nemit",
        ),
    )
    .unwrap();
    eventually("the table and the grant to arrive", || async {
        let granted = env
            .host()
            .state()
            .policy("scripted")
            .tables
            .contains("caption_quality");
        // Applied, and the host has re-read the schema.
        let known = env.host().state().knows_table("caption_quality");
        (granted && known).then_some(())
    })
    .await;
    let later = write("just right").await;
    env.await_processed("scripted", &later).await;
    assert_eq!(
        env.count("SELECT count(*) FROM caption_quality WHERE note = 'just right'")
            .await,
        1
    );
    // Applied once, whatever the number of reloads since.
    env.host().reload_plugins().await.unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM operator_migrations").await,
        1
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_deploy_waits_for_the_hosts_to_report_the_load_or_the_reason() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    let deploy = |plugin: &str| env.deploy(&crate::support::plugin_file(plugin));
    let (ok, text) = deploy("scripted");
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("{}: loaded scripted", env.config.consumer_name)),
        "{text}"
    );
    assert!(env.serving("scripted").is_some(), "the host serves it");

    // A file no host could load is refused by the deploy itself, before anything changes.
    let (ok, text) = deploy("manifest-trap");
    assert!(!ok, "a refused plugin fails the deploy: {text}");
    assert!(
        text.contains("would not load; nothing was deployed") && text.contains("manifest()"),
        "{text}"
    );
    assert_eq!(env.count("SELECT count(*) FROM plugin_store").await, 1);
    env.finish().await;
}

/// A consumer busy with a long plugin call must not hold up a reload (nor the heartbeat, which
/// needs the same list of consumers): the reload that removes its plugin returns while the call
/// is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_consumer_does_not_hold_up_a_reload() {
    let options = Options::new(&[crate::support::SCRIPTED])
        .set("KALEIDOSCOPE_WATCH_PLUGINS", "false")
        .plugin_setting(crate::support::SCRIPTED, "timeout_ms = 20000");
    let env = TestEnv::start(options).await;
    let busy = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "block"), ("millis", "15000")],
        )
        .await;
    // Running, not only delivered: a reload landing before the batch took its plugin would
    // leave the entry pending for a plugin that no longer exists.
    env.await_call_running(crate::support::SCRIPTED).await;
    std::fs::remove_file(env.plugins_dir.join("scripted.wasm")).expect("remove the plugin");
    env.host().reload_plugins().await.expect("reload");
    assert_eq!(
        env.ledger_outcome(crate::support::SCRIPTED, &busy).await,
        None,
        "the reload returned before the busy call ended"
    );
    // The stopped consumer still finishes its batch.
    env.await_processed(crate::support::SCRIPTED, &busy).await;
    env.finish().await;
}

/// A deploy the host refuses changes nothing: the plugin that served the stream keeps serving it
/// and the host stays ready. A file refused because its stream was taken is not refused for good:
/// once the plugin that held the stream is gone, the next scan loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_refused_for_a_taken_stream_loads_once_the_stream_is_free() {
    let env = TestEnv::start(Options::new(&["slow"])).await;
    env.await_serving("mock-slow", "0.1.0").await;
    env.install_plugin("rival", "rival");
    env.host().reload_plugins().await.unwrap();
    let state = env.host().state();
    let refused = state.registry.snapshot().failures().to_vec();
    assert!(
        refused
            .iter()
            .any(|f| f.file.ends_with("rival.wasm") && f.reason.contains("already handled")),
        "{refused:?}"
    );
    assert_eq!(
        env.serving("mock-slow").map(|(name, _)| name).as_deref(),
        Some("slow"),
        "the plugin that served the stream keeps serving it"
    );
    assert!(
        state.not_ready().is_empty(),
        "a refused file pages no one: {:?}",
        state.not_ready()
    );
    let kept = env
        .publish("mock-slow", &[("millis", "0"), ("note", "kept")])
        .await;
    env.await_processed("mock-slow", &kept).await;

    // The holder goes; the refused file is tried again, with nothing changed about it.
    std::fs::remove_file(env.plugins_dir.join("slow.wasm")).unwrap();
    env.host().reload_plugins().await.unwrap();
    assert_eq!(
        env.serving("mock-slow").map(|(name, _)| name).as_deref(),
        Some("rival"),
        "{:?}",
        state.registry.snapshot().failures()
    );
    assert!(state.registry.snapshot().failures().is_empty());
    let taken = env.publish("mock-slow", &[("note", "rival")]).await;
    env.await_processed("mock-slow", &taken).await;
    env.finish().await;
}

/// `plugin deploy` counts only live hosts: a host whose heartbeat is stale (paused, stopped,
/// gone) is named as such and not waited for, and a deploy no live host answered fails — its
/// file is in place, but nothing runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_deploy_names_stale_hosts_and_fails_when_no_live_host_answers() {
    let deploy = |env: &TestEnv| env.deploy(&crate::support::plugin_file("scripted"));
    let env = TestEnv::start(Options::new(&["insights"])).await;
    // A host that stopped writing its heartbeat an hour ago.
    let heartbeat_key = |consumer: &str| {
        env.key(&format!(
            "kaleidoscope:hosts:{}:{consumer}",
            env.config.consumer_group
        ))
    };
    let mut redis = env.redis.clone();
    let live: String = redis::cmd("GET")
        .arg(heartbeat_key(&env.config.consumer_name))
        .query_async(&mut redis)
        .await
        .expect("the host's heartbeat");
    let mut ghost: serde_json::Value = serde_json::from_str(&live).unwrap();
    ghost["consumer"] = "ghost".into();
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    ghost["updated_at"] = humantime::format_rfc3339_millis(an_hour_ago)
        .to_string()
        .into();
    let _: () = redis::cmd("SET")
        .arg(heartbeat_key("ghost"))
        .arg(ghost.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    let (ok, text) = deploy(&env);
    assert!(ok, "the live host loaded it: {text}");
    assert!(text.contains("ghost: stale"), "{text}");
    assert!(
        text.contains(&format!("{}: loaded scripted", env.config.consumer_name)),
        "{text}"
    );
    env.finish().await;

    // Nobody running at all (or a wrong prefix in the author's shell): not a success.
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    let (ok, text) = deploy(&env);
    assert!(!ok, "{text}");
    assert!(text.contains("no live host"), "{text}");
    env.finish().await;
}

/// An entry that a consumer's last read takes after the stream's plugin has left the host (a
/// read is never cut short, so this happens whenever an entry arrives as a plugin is removed) is
/// handed back at once: still pending, but as idle as the reclaim time and with its delivery
/// count unchanged, so a host that serves the stream reclaims it at its next pass instead of
/// after the whole idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_read_after_its_plugin_left_is_handed_back_for_reclaim_at_once() {
    const IDLE_MS: i64 = 60_000;
    // `scripted` serves two streams. A long poll, so that each consumer's read is still waiting
    // when the plugin leaves (an entry on each ends both reads, and the host stops at once).
    let streams = ["scripted", "scripted-2"];
    let env = TestEnv::start(
        Options::new(&["scripted"])
            .set("KALEIDOSCOPE_POLL_TIMEOUT_MS", 30_000)
            .set("KALEIDOSCOPE_RECLAIM_IDLE_MS", IDLE_MS),
    )
    .await;
    let readers: Vec<String> = streams
        .iter()
        .map(|s| format!("name=kaleidoscope:{}:{s} ", env.config.consumer_name))
        .collect();
    eventually("both consumers' reads to wait", || async {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut env.redis.clone())
            .await
            .expect("CLIENT LIST");
        readers
            .iter()
            .all(|reader| {
                clients
                    .lines()
                    .any(|c| c.contains(reader.as_str()) && c.contains("cmd=xreadgroup"))
            })
            .then_some(())
    })
    .await;
    std::fs::remove_file(env.plugins_dir.join("scripted.wasm")).expect("remove the plugin");
    env.host().reload_plugins().await.expect("reload");
    assert_eq!(env.serving("scripted"), None);

    for stream in streams {
        let entry = env.publish(stream, &[("action", "ok")]).await;
        let (consumer, deliveries) = eventually("the entry to be handed back", || async {
            let pending: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
                .arg(env.key(stream))
                .arg(&env.config.consumer_group)
                .arg("-")
                .arg("+")
                .arg(10)
                .query_async(&mut env.redis.clone())
                .await
                .expect("XPENDING");
            pending
                .into_iter()
                .find(|(id, _, idle, _)| *id == entry && *idle >= IDLE_MS)
                .map(|(_, consumer, _, deliveries)| (consumer, deliveries))
        })
        .await;
        assert_eq!(consumer, env.config.consumer_name, "{stream}");
        assert_eq!(deliveries, 1, "{stream}: handing back is not a delivery");
        assert_eq!(
            env.ledger_count(stream).await,
            0,
            "{stream}: nothing ran it"
        );
    }
    env.finish().await;
}
