//! Misbehaving plugins (the mock fixtures), sandbox limits and grants.

use crate::support::{Options, TestEnv, eventually};

const INSIGHTS: &str = "ml-insights-results";

/// Publishes one entry to `stream`, and meanwhile one insights entry, and returns the dead
/// letter of the first after checking the insights entry was processed regardless.
async fn dead_letter_while_others_flow(
    env: &TestEnv,
    stream: &str,
    fields: &[(&str, &str)],
) -> std::collections::HashMap<String, String> {
    env.seed_media(9, &[90]).await;
    let bad = env.publish(stream, fields).await;
    let good = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "90"),
                ("service", "image_captioning"),
                ("caption", "unaffected"),
            ],
        )
        .await;
    env.await_processed(INSIGHTS, &good).await;
    let letter = env.await_dead_letter(stream, &bad).await;
    env.await_no_pending(stream).await;
    env.await_no_pending(INSIGHTS).await;
    letter
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_plugin_is_retried_then_dead_lettered_as_plugin_trap() {
    let env = TestEnv::start(Options::new(&["panicking", "insights"]).retries(2, 200)).await;
    let letter = dead_letter_while_others_flow(&env, "mock-panic", &[("note", "kaboom")]).await;
    assert_eq!(letter["failureKind"], "plugin-trap");
    assert_eq!(letter["deliveries"], "2");
    assert!(letter["error"].contains("kaboom"), "{}", letter["error"]);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_is_stopped_at_its_deadline_and_dead_lettered_as_timeout() {
    let options = Options::new(&["looping", "insights"])
        .retries(2, 200)
        .plugin_setting("looping", "timeout_ms = 300");
    let env = TestEnv::start(options).await;
    let letter = dead_letter_while_others_flow(&env, "mock-loop", &[("note", "spin")]).await;
    assert_eq!(letter["failureKind"], "timeout");
    assert!(
        letter["error"].contains("300ms"),
        "the reason names the deadline: {}",
        letter["error"]
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_hits_its_cap_and_is_dead_lettered_as_memory_limit() {
    let options = Options::new(&["memory-hog", "insights"])
        .retries(2, 200)
        .plugin_setting("memory-hog", "memory_mib = 16");
    let env = TestEnv::start(options).await;
    let letter = dead_letter_while_others_flow(&env, "mock-hog", &[("note", "more")]).await;
    assert_eq!(letter["failureKind"], "memory-limit");
    assert!(
        letter["error"].contains(&(16u64 << 20).to_string()),
        "the reason names the cap: {}",
        letter["error"]
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_writing_an_ungranted_table_is_dead_lettered_as_forbidden_command() {
    // Granted other tables, fully and column by column: neither grant reaches `users`.
    let env = TestEnv::start(
        Options::new(&["trespasser", "insights"])
            .plugin_setting("trespasser", "tables = [\"posts\"]")
            .plugin_setting(
                "trespasser",
                "update_columns = { ml_requests = [\"status\"] }",
            ),
    )
    .await;
    let letter = dead_letter_while_others_flow(
        &env,
        "mock-trespass",
        &[
            ("table", "users"),
            ("column", "username"),
            ("note", "mallory"),
        ],
    )
    .await;
    assert_eq!(letter["failureKind"], "forbidden-command");
    let error = &letter["error"];
    assert!(
        error.contains("trespasser") && error.contains("`users`") && error.contains("not granted"),
        "{error}"
    );
    let users = env
        .count("SELECT count(*) FROM users WHERE username = 'mallory'")
        .await;
    assert_eq!(users, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_columns_mistyped_values_and_ungranted_emits_are_forbidden_commands() {
    let env = TestEnv::start(Options::new(&["scripted"])).await;
    let unknown_column = env
        .publish(
            "scripted",
            &[
                ("action", "write-table"),
                ("table", "ml_processing_errors"),
                ("column", "no_such_column"),
                ("note", "x"),
            ],
        )
        .await;
    let wrong_type = env
        .publish(
            "scripted",
            &[
                ("action", "write-table"),
                ("table", "ml_processing_errors"),
                ("column", "retry_count"),
                ("note", "seven"),
            ],
        )
        .await;
    let host_table = env
        .publish(
            "scripted",
            &[
                ("action", "write-table"),
                ("table", "processed_entries"),
                ("column", "stream"),
                ("note", "x"),
            ],
        )
        .await;
    let bad_emit = env
        .publish(
            "scripted",
            &[("action", "emit"), ("target", "elsewhere"), ("note", "x")],
        )
        .await;
    let good_emit = env
        .publish(
            "scripted",
            &[
                ("action", "emit"),
                ("target", "scripted-out"),
                ("note", "delivered"),
            ],
        )
        .await;

    let letter = env.await_dead_letter("scripted", &unknown_column).await;
    assert_eq!(letter["failureKind"], "forbidden-command");
    assert!(
        letter["error"].contains("scripted")
            && letter["error"].contains("`ml_processing_errors`")
            && letter["error"].contains("`no_such_column`"),
        "{}",
        letter["error"]
    );
    let letter = env.await_dead_letter("scripted", &wrong_type).await;
    assert_eq!(letter["failureKind"], "forbidden-command");
    assert!(
        letter["error"].contains("`retry_count`") && letter["error"].contains("text"),
        "{}",
        letter["error"]
    );
    let letter = env.await_dead_letter("scripted", &host_table).await;
    assert!(
        letter["error"].contains("belongs to the host"),
        "{}",
        letter["error"]
    );
    let letter = env.await_dead_letter("scripted", &bad_emit).await;
    assert!(
        letter["error"].contains("`elsewhere`") && letter["error"].contains("not granted"),
        "{}",
        letter["error"]
    );

    // A granted emit is published after commit (transactional outbox).
    env.await_processed("scripted", &good_emit).await;
    let out: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(env.key("scripted-out"))
        .arg("-")
        .arg("+")
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1["note"], "delivered");
    env.await_no_pending("scripted").await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_finishes_and_other_streams_keep_flowing() {
    let env = TestEnv::start(Options::new(&["slow", "insights"])).await;
    env.seed_media(9, &[91]).await;
    let slow = env
        .publish("mock-slow", &[("millis", "15000"), ("note", "eventually")])
        .await;
    eventually("the slow entry to be in its handler", || async {
        (env.pending("mock-slow").await == 1).then_some(())
    })
    .await;
    let quick = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "91"),
                ("service", "image_captioning"),
                ("caption", "quick"),
            ],
        )
        .await;
    // The quick entry, published while the slow one is in its 15-second handler, is done while
    // the slow one is still there.
    env.await_processed(INSIGHTS, &quick).await;
    assert_eq!(
        env.ledger_outcome("mock-slow", &slow).await,
        None,
        "the quick entry waited for the slow one"
    );
    assert_eq!(env.pending("mock-slow").await, 1);
    env.await_processed("mock-slow", &slow).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_no_environment_no_file_system_and_no_network() {
    let env = TestEnv::start(Options::new(&["scripted"])).await;
    let id = env
        .publish("scripted", &[("action", "probe-sandbox")])
        .await;
    env.await_processed("scripted", &id).await;
    let report: String =
        sqlx::query_scalar("SELECT error FROM ml_processing_errors WHERE entry_id = $1")
            .bind(&id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(report, "env=0 fs=denied net=denied");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_blocked_in_a_host_call_is_cut_off_at_its_deadline() {
    let options = Options::new(&[crate::support::SCRIPTED])
        .retries(2, 200)
        .plugin_setting(crate::support::SCRIPTED, "timeout_ms = 500");
    let env = TestEnv::start(options).await;
    // `std::thread::sleep` is a WASI poll: the host call blocks, no Wasm code runs, and the
    // epoch deadline alone would never fire.
    let blocked = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "block"), ("millis", "600000")],
        )
        .await;
    let letter = env
        .await_dead_letter(crate::support::SCRIPTED, &blocked)
        .await;
    assert_eq!(letter["failureKind"], "timeout", "{letter:?}");
    assert_eq!(letter["deliveries"], "2");
    assert!(letter["error"].contains("500ms"), "{}", letter["error"]);
    crate::support::stream_goes_on(&env).await;
    env.await_no_pending(crate::support::SCRIPTED).await;
    env.finish().await;
}
