//! Contract 0.3.0: the operator's settings (`config`), the `now` value, instances reused within a
//! batch, and plugins built against 0.2.0 running unchanged.

use crate::support::{Options, TestEnv, eventually};

const SCRIPTED: &str = "scripted";

/// The `error` column of the row the scripted plugin recorded for `entry_id`.
async fn recorded(env: &TestEnv, entry_id: &str) -> String {
    sqlx::query_scalar("SELECT error FROM ml_processing_errors WHERE entry_id = $1")
        .bind(entry_id)
        .fetch_one(&env.pool)
        .await
        .expect("the recorded row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_reach_the_plugin_and_follow_the_configuration_file() {
    let env = TestEnv::start(
        Options::new(&[SCRIPTED]).plugin_setting(SCRIPTED, r#"settings = { colour = "blue" }"#),
    )
    .await;
    let setting = |note: &'static str| {
        let env = &env;
        async move {
            let id = env
                .publish(SCRIPTED, &[("action", "setting"), ("note", note)])
                .await;
            env.await_processed(SCRIPTED, &id).await;
            recorded(env, &id).await
        }
    };
    assert_eq!(setting("colour").await, "blue");
    assert_eq!(setting("shape").await, "<unset>");

    // The operator changes the setting in the file the host was started with: no restart.
    let config = std::fs::read_to_string(&env.config_file).unwrap();
    let changed = config.replace(
        r#"settings = { colour = "blue" }"#,
        r#"settings = { colour = "green", shape = 3 }"#,
    );
    assert_ne!(config, changed, "the setting line is missing: {config}");
    std::fs::write(&env.config_file, changed).unwrap();
    eventually("the host to reload the settings", || async {
        (env.host().state().policy(SCRIPTED).settings.get("colour") == Some(&"green".to_string()))
            .then_some(())
    })
    .await;
    assert_eq!(setting("colour").await, "green");
    assert_eq!(setting("shape").await, "3");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_serves_a_batch_and_a_trap_retires_it() {
    let env = TestEnv::prepare(
        Options::new(&[SCRIPTED])
            .set("KALEIDOSCOPE_BATCH_SIZE", 100)
            .retries(3, 200),
    )
    .await;
    // Published before the host starts, so the first read takes them as one batch.
    let mut ids = Vec::new();
    for action in ["count", "count", "count", "panic", "count", "count"] {
        ids.push(
            env.publish(SCRIPTED, &[("action", action), ("note", "n")])
                .await,
        );
    }
    let env = env.with_host().await;
    for (index, id) in ids.iter().enumerate() {
        if index != 3 {
            env.await_processed(SCRIPTED, id).await;
        }
    }
    let mut counts = Vec::new();
    for index in [0, 1, 2, 4, 5] {
        counts.push(recorded(&env, &ids[index]).await);
    }
    // One instance for the first three; the trap retires it, the next entry gets a fresh one.
    assert_eq!(counts, ["1", "2", "3", "1", "2"]);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_contract_0_2_0_runs_unchanged_on_fresh_instances() {
    let env = TestEnv::prepare(
        Options::new(&["contract-v0-2"])
            .set("KALEIDOSCOPE_BATCH_SIZE", 100)
            .plugin_setting("contract-v0-2", "tables = [\"ml_processing_errors\"]"),
    )
    .await;
    let mut ids = Vec::new();
    for note in ["a", "b", "c"] {
        ids.push(env.publish("mock-v0-2", &[("note", note)]).await);
    }
    let env = env.with_host().await;
    let plugin = env
        .host()
        .state()
        .registry
        .snapshot()
        .for_stream("mock-v0-2")
        .expect("the 0.2.0 plugin is loaded");
    assert_eq!(plugin.contract(), "0.2.0");
    for id in &ids {
        env.await_processed("mock-v0-2", id).await;
    }
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM ml_processing_errors WHERE source_stream LIKE '%mock-v0-2' ORDER BY entry_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    // Each call on a fresh instance, as 0.2.0 promised; the guarded update applied.
    assert_eq!(statuses, vec!["CONTRACT-0.2.0 call 1"; 3]);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_is_the_time_of_the_transaction_that_persists_the_entry() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    let touch = || async {
        let id = env
            .publish(SCRIPTED, &[("action", "touch"), ("note", "row-1")])
            .await;
        env.await_processed(SCRIPTED, &id).await;
        // Microseconds since the epoch: exact, and no date crate needed.
        let (at, committed): (i64, bool) = sqlx::query_as(
            "SELECT (extract(epoch FROM received_at) * 1000000)::int8, received_at <= now()
               FROM ml_processing_errors
              WHERE source_stream = 'touched' AND entry_id = 'row-1'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert!(committed);
        at
    };
    let first = touch().await;
    let second = touch().await;
    // The upsert moved the column on: it is the second transaction's time, not the insert's.
    assert!(second > first, "{first} then {second}");
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
    crate::support::stream_goes_on(&env).await;
    env.finish().await;
}
