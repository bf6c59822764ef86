//! Nothing a plugin, a producer or a dependency does may stall a stream for good: each case below
//! ends with the culprit retried and dead-lettered (or recovered), the rest processed, and the
//! group's pending list empty.

use crate::support::{Options, TestEnv, eventually};
use kaleidoscope::failure::Dependency;
use kaleidoscope::metrics::ByStream;

const SCRIPTED: &str = "scripted";

/// Publishes a harmless entry after the culprit and waits until it is stored: the stream goes on.
async fn stream_goes_on(env: &TestEnv) {
    let next = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "after")])
        .await;
    env.await_processed(SCRIPTED, &next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_blocked_in_a_host_call_is_cut_off_at_its_deadline() {
    let options = Options::new(&[SCRIPTED])
        .retries(2, 200)
        .plugin_setting(SCRIPTED, "timeout_ms = 500");
    let env = TestEnv::start(options).await;
    // `std::thread::sleep` is a WASI poll: the host call blocks, no Wasm code runs, and the
    // epoch deadline alone would never fire.
    let blocked = env
        .publish(SCRIPTED, &[("action", "block"), ("millis", "600000")])
        .await;
    let letter = env.await_dead_letter(SCRIPTED, &blocked).await;
    assert_eq!(letter["failureKind"], "timeout", "{letter:?}");
    assert_eq!(letter["deliveries"], "2");
    assert!(letter["error"].contains("500ms"), "{}", letter["error"]);
    stream_goes_on(&env).await;
    env.await_no_pending(SCRIPTED).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_from_a_plugin_never_block_the_stream() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    // A NUL in a log line and in the failure reason: the reason is stored with U+FFFD.
    let bad = env
        .publish(SCRIPTED, &[("action", "nul"), ("note", "n1")])
        .await;
    let letter = env.await_dead_letter(SCRIPTED, &bad).await;
    assert_eq!(letter["failureKind"], "malformed");
    assert_eq!(letter["error"], "bad \u{FFFD} reason: n1");
    // A NUL in an emitted field is data: the outbox carries it to the target stream unchanged.
    let emitting = env
        .publish(
            SCRIPTED,
            &[("action", "emit-nul"), ("target", "scripted-out")],
        )
        .await;
    env.await_processed(SCRIPTED, &emitting).await;
    let out_key = env.key("scripted-out");
    let emitted: Vec<(String, Vec<(String, Vec<u8>)>)> = eventually("the emitted message", || {
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
    stream_goes_on(&env).await;
    env.await_no_pending(SCRIPTED).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_nul_is_malformed_and_names_the_field() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    let bad = env
        .publish_bytes(SCRIPTED, &[("action", b"ok"), ("note", b"a\0b")])
        .await;
    let letter = env.await_dead_letter(SCRIPTED, &bad).await;
    assert_eq!(letter["failureKind"], "malformed", "{letter:?}");
    assert!(
        letter["error"].contains("`note`") && letter["error"].contains("NUL"),
        "{}",
        letter["error"]
    );
    stream_goes_on(&env).await;
    env.finish().await;
}

/// A deferred constraint fails at COMMIT, where no statement is to blame, for the set-based
/// transaction and for the entry-by-entry one alike: only a transaction per entry finds the
/// culprit. It is dead-lettered as `database`; its neighbours commit; PostgreSQL is never
/// reported unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_at_commit_dead_letters_the_culprit_and_commits_the_rest() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED])).await;
    for sql in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.error = 'poison' THEN RAISE EXCEPTION 'poison refused at commit'; END IF;
           RETURN NEW;
         END $$",
        "CREATE CONSTRAINT TRIGGER refuse_poison AFTER INSERT ON ml_processing_errors
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let mut good = Vec::new();
    for n in 0..3 {
        good.push(
            env.publish(SCRIPTED, &[("action", "ok"), ("note", &format!("g{n}"))])
                .await,
        );
    }
    let poison = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "poison")])
        .await;
    for n in 3..6 {
        good.push(
            env.publish(SCRIPTED, &[("action", "ok"), ("note", &format!("g{n}"))])
                .await,
        );
    }
    let env = env.with_host().await;
    let letter = env.await_dead_letter(SCRIPTED, &poison).await;
    assert_eq!(letter["failureKind"], "database", "{letter:?}");
    assert!(
        letter["error"].contains("poison refused at commit"),
        "{}",
        letter["error"]
    );
    for id in &good {
        env.await_processed(SCRIPTED, id).await;
    }
    env.await_no_pending(SCRIPTED).await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        6
    );
    let state = env.host().state();
    assert!(state.health.outage(Dependency::Database).is_none());
    assert!(
        state
            .metrics
            .batch_failures
            .get_or_create(&ByStream::new(SCRIPTED))
            .get()
            >= 3,
        "the batch was retried before it was split"
    );
    env.finish().await;
}

/// A statement cancelled by `statement_timeout` is about the entry, not an outage: it is retried
/// like any failed statement, then dead-lettered, and the rest of the stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_is_retried_then_dead_lettered_not_waited_out() {
    let options = Options::new(&[SCRIPTED])
        .retries(2, 200)
        .set("KALEIDOSCOPE_PG_STATEMENT_TIMEOUT_MS", 300);
    let env = TestEnv::prepare(options).await;
    for sql in [
        "CREATE FUNCTION dawdle() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.error = 'slow' THEN PERFORM pg_sleep(5); END IF;
           RETURN NEW;
         END $$",
        "CREATE TRIGGER dawdle BEFORE INSERT ON ml_processing_errors
         FOR EACH ROW EXECUTE FUNCTION dawdle()",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let env = env.with_host().await;
    let slow = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "slow")])
        .await;
    let letter = env.await_dead_letter(SCRIPTED, &slow).await;
    assert_eq!(letter["failureKind"], "retries-exhausted", "{letter:?}");
    assert!(letter["error"].contains("57014"), "{}", letter["error"]);
    stream_goes_on(&env).await;
    env.await_no_pending(SCRIPTED).await;
    assert!(
        env.host()
            .state()
            .health
            .outage(Dependency::Database)
            .is_none()
    );
    env.finish().await;
}

/// Redis restarted without persistence: the stream and its group are gone. Whichever command of
/// the consumer meets `NOGROUP` first (with a short reclaim time, the reclaim), the group is
/// recreated and new entries flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_consumer_group_is_recreated_and_reported() {
    let env = TestEnv::start(Options::new(&[SCRIPTED]).retries(3, 200)).await;
    let first = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "before")])
        .await;
    env.await_processed(SCRIPTED, &first).await;
    let _: () = redis::cmd("DEL")
        .arg(env.key(SCRIPTED))
        .query_async(&mut env.redis.clone())
        .await
        .expect("DEL");
    let after = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "after")])
        .await;
    env.await_processed(SCRIPTED, &after).await;
    env.await_no_pending(SCRIPTED).await;
    assert!(
        env.host()
            .state()
            .metrics
            .groups_recreated
            .get_or_create(&ByStream::new(SCRIPTED))
            .get()
            >= 1
    );
    env.finish().await;
}

/// A consumer busy with a long plugin call must not hold up a reload (nor the heartbeat, which
/// needs the same list of consumers): the reload that removes its plugin returns while the call
/// is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_consumer_does_not_hold_up_a_reload() {
    let options = Options::new(&[SCRIPTED])
        .set("KALEIDOSCOPE_WATCH_PLUGINS", "false")
        .plugin_setting(SCRIPTED, "timeout_ms = 20000");
    let env = TestEnv::start(options).await;
    let busy = env
        .publish(SCRIPTED, &[("action", "block"), ("millis", "15000")])
        .await;
    // Running, not only delivered: a reload landing before the batch took its plugin would
    // leave the entry pending for a plugin that no longer exists.
    let calls = env
        .host()
        .state()
        .metrics
        .calls_in_flight
        .get_or_create_owned(&kaleidoscope::metrics::ByPluginName {
            plugin: SCRIPTED.to_string(),
        });
    eventually("the blocking call to start", || {
        let calls = calls.clone();
        async move { (calls.get() == 1).then_some(()) }
    })
    .await;
    std::fs::remove_file(env.plugins_dir.join("scripted.wasm")).expect("remove the plugin");
    env.host().reload_plugins().await.expect("reload");
    assert_eq!(
        env.ledger_outcome(SCRIPTED, &busy).await,
        None,
        "the reload returned before the busy call ended"
    );
    // The stopped consumer still finishes its batch.
    env.await_processed(SCRIPTED, &busy).await;
    env.finish().await;
}

/// The delivery counts of reclaimed entries are read exactly, however many other entries the
/// consumer has pending between them: an over-delivered entry cannot pass for a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimed_entries_get_their_exact_delivery_counts() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED]).retries(3, 60_000)).await;
    let key = env.key(SCRIPTED);
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
        .publish(SCRIPTED, &[("action", "ok"), ("note", "first")])
        .await;
    for n in 0..100 {
        env.publish(
            SCRIPTED,
            &[("action", "ok"), ("note", &format!("filler {n}"))],
        )
        .await;
    }
    let last = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "last")])
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
        let letter = env.await_dead_letter(SCRIPTED, id).await;
        assert_eq!(letter["failureKind"], "retries-exhausted", "{letter:?}");
        assert_eq!(letter["deliveries"], "6", "{letter:?}");
    }
    env.finish().await;
}

/// A graceful stop never cuts a read short: an entry Redis hands out while the host is stopping
/// is finished, not left pending to a consumer that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_leaves_no_entry_delivered_and_unfinished() {
    let options = Options::new(&[SCRIPTED]).set("KALEIDOSCOPE_POLL_TIMEOUT_MS", 2000);
    let mut env = TestEnv::start(options).await;
    let warm = env
        .publish(SCRIPTED, &[("action", "ok"), ("note", "warm")])
        .await;
    env.await_processed(SCRIPTED, &warm).await;
    // Wait until the consumer is blocked in XREADGROUP (for up to two seconds): then the stop
    // comes while a read is in flight, and the entry published next is handed to that read. (Not
    // waiting would let the stop fall between two reads, where nothing is delivered and the test
    // would prove nothing.)
    let reader = format!("name=kaleidoscope:{}:{SCRIPTED} ", env.config.consumer_name);
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
        .publish(SCRIPTED, &[("action", "ok"), ("note", "late")])
        .await;
    stopping.await.expect("shutdown");
    assert_eq!(env.pending(SCRIPTED).await, 0, "nothing is left pending");
    assert_eq!(
        env.ledger_outcome(SCRIPTED, &late).await.as_deref(),
        Some("processed"),
        "the entry handed to the read in flight during the stop was finished"
    );
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
    let replay = env.command(&["dlq", "replay", "--kind", "plugin-trap", "--json"]);
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let replayed: serde_json::Value = serde_json::from_slice(&replay.stdout).unwrap();
    let new_ids: Vec<String> = replayed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["new_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(new_ids.len(), 2, "both copies were replayed: {replayed}");
    env.await_processed("mock-panic", &format!("{failed}/replay"))
        .await;
    env.await_drained("mock-panic").await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        1,
        "applied once"
    );
    assert!(
        env.host()
            .state()
            .metrics
            .redelivered
            .get_or_create(&ByStream::new("mock-panic"))
            .get()
            >= 1,
        "the second copy was recognised"
    );
    env.finish().await;
}

/// The ledger tells deployments apart: two hosts with different stream prefixes sharing one
/// PostgreSQL each process their own entry with the same stream and id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_sharing_a_database_do_not_take_each_others_entries_for_processed() {
    let options = || {
        let mut options = Options::new(&[SCRIPTED]);
        options.plugin_sections.insert(
            SCRIPTED.to_string(),
            vec!["tables = [\"deployment_notes\"]".to_string()],
        );
        options
    };
    let first = TestEnv::prepare(options()).await;
    sqlx::query("CREATE TABLE deployment_notes (id bigserial PRIMARY KEY, note text NOT NULL)")
        .execute(&first.pool)
        .await
        .expect("create the notes table");
    let first = first.with_host().await;
    // A second deployment: its own prefix (and so its own ledger identity), the same database.
    let mut second = TestEnv::prepare(options()).await;
    second.config.database_url = first.database_url.clone();
    let second = second.with_host().await;
    let id = "1700000000000-0";
    for env in [&first, &second] {
        let _: String = redis::cmd("XADD")
            .arg(env.key(SCRIPTED))
            .arg(id)
            .arg("action")
            .arg("write-table")
            .arg("table")
            .arg("deployment_notes")
            .arg("column")
            .arg("note")
            .arg("note")
            .arg(&env.prefix)
            .query_async(&mut env.redis.clone())
            .await
            .expect("XADD with an explicit id");
    }
    first.await_drained(SCRIPTED).await;
    second.await_drained(SCRIPTED).await;
    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM deployment_notes ORDER BY note")
        .fetch_all(&first.pool)
        .await
        .expect("notes");
    let mut expected = vec![first.prefix.clone(), second.prefix.clone()];
    expected.sort();
    assert_eq!(notes, expected, "each deployment processed its own entry");
    second.finish().await;
    first.finish().await;
}

/// One readiness: a host with no plugin is not ready, and `/readyz`, the metrics gauge and the
/// heartbeat `status` reads all say so (the heartbeat used to say ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_one_answer_everywhere() {
    let env = TestEnv::start(Options::new(&[]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0")).await;
    let state = env.host().state();
    assert_eq!(state.not_ready(), ["no plugin is loaded"]);
    let addr = env.host().http_addr().expect("HTTP is enabled");
    let (code, body) = crate::support::http_get(addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no plugin is loaded"), "{body}");
    let (_, metrics) = crate::support::http_get(addr, "/metrics");
    assert!(
        metrics.lines().any(|line| line == "kaleidoscope_ready 0"),
        "the readiness gauge says not ready: {metrics}"
    );
    let (report, ok) = env.status();
    assert!(!ok, "status exits non-zero for a host that is not ready");
    assert_eq!(report["hosts"][0]["ready"], false, "{report}");
    assert_eq!(
        report["hosts"][0]["not_ready"],
        serde_json::json!(["no plugin is loaded"])
    );
    env.finish().await;
}

/// Grants per column: a plugin that may mark requests (`update_columns`) cannot create one, so it
/// cannot make the request tracker publish what it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_granted_request_columns_cannot_forge_a_request() {
    let mut options = Options::new(&[SCRIPTED]);
    options.plugin_sections.insert(
        SCRIPTED.to_string(),
        vec![
            "tables = [\"ml_processing_errors\"]".to_string(),
            "update_columns = { ml_requests = [\"status\"] }".to_string(),
        ],
    );
    let env = TestEnv::start(options).await;
    let forged = env
        .publish(
            SCRIPTED,
            &[
                ("action", "write-table"),
                ("table", "ml_requests"),
                ("column", "correlation_id"),
                ("note", "forged"),
            ],
        )
        .await;
    let letter = env.await_dead_letter(SCRIPTED, &forged).await;
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
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
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

/// The contract changed compatibly (0.2.0 added guarded updates): a plugin built against 0.1.0
/// loads and runs unchanged beside plugins built against 0.2.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_contract_0_1_0_runs_unchanged() {
    let env = TestEnv::start(Options::new(&["contract-v0-1", SCRIPTED])).await;
    let plugins = env.host().state().registry.snapshot();
    let old = plugins
        .for_stream("mock-v0-1")
        .expect("the 0.1.0 plugin is loaded");
    assert_eq!(old.contract(), "0.1.0");
    assert!(
        old.imports
            .iter()
            .any(|i| i.contains("kaleidoscope:handler/types@0.1.0")),
        "{:?}",
        old.imports
    );
    assert_eq!(
        plugins.for_stream(SCRIPTED).expect("scripted").contract(),
        "0.3.0"
    );
    let id = env.publish("mock-v0-1", &[("note", "old contract")]).await;
    env.await_processed("mock-v0-1", &id).await;
    let (error, status): (String, String) =
        sqlx::query_as("SELECT error, status FROM ml_processing_errors WHERE entry_id = $1")
            .bind(&id)
            .fetch_one(&env.pool)
            .await
            .expect("the row");
    assert_eq!(
        (error.as_str(), status.as_str()),
        ("old contract", "CONTRACT-0.1.0")
    );
    stream_goes_on(&env).await;
    env.finish().await;
}
