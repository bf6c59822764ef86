//! The Python example handler (`plugins/caption-quality`, built with componentize-py): a new
//! stream and a new table (from its operator migration) through the real host.

use crate::support::{Options, TestEnv, workspace};

const STREAM: &str = "caption-quality-results";

/// An environment (host not started) for the Python example: its table's migration in the
/// operator migrations and the grant to write it.
async fn the_example_with_its_table(options: Options) -> TestEnv {
    let env = TestEnv::prepare(
        options
            .operator_migrations()
            .plugin_setting("caption-quality", "tables = [\"caption_quality\"]"),
    )
    .await;
    std::fs::copy(
        workspace().join("plugins/caption-quality/migrations/0001_caption_quality.sql"),
        env.migrations_dir().join("0001_caption_quality.sql"),
    )
    .expect("copy the example's migration");
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_persists_flags_and_dead_letters_like_any_plugin() {
    let env = the_example_with_its_table(
        Options::new(&["caption-quality"])
            .plugin_setting("caption-quality", "settings = { min_score = 0.5 }"),
    )
    .await
    .with_host()
    .await;
    let plugin = env
        .host()
        .state()
        .registry
        .snapshot()
        .for_stream(STREAM)
        .expect("the Python plugin is loaded");
    assert_eq!(
        (plugin.name.as_str(), plugin.contract()),
        ("caption-quality", "0.3.0")
    );

    let good = env
        .publish(
            STREAM,
            &[("mediaId", "7"), ("score", "0.9"), ("model", "m1")],
        )
        .await;
    let low = env
        .publish(STREAM, &[("mediaId", "8"), ("score", "0.2")])
        .await;
    let bad = env
        .publish(STREAM, &[("mediaId", "9"), ("score", "high")])
        .await;
    env.await_processed(STREAM, &good).await;
    env.await_processed(STREAM, &low).await;
    let rows: Vec<(i64, f64, Option<String>, bool)> = sqlx::query_as(
        "SELECT media_id, score, model, flagged FROM caption_quality ORDER BY media_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (7, 0.9, Some("m1".to_string()), false),
            (8, 0.2, None, true)
        ]
    );
    let letter = env.await_dead_letter(STREAM, &bad).await;
    assert_eq!(letter["failureKind"], "malformed");
    assert!(
        letter["error"].contains("field `score`"),
        "{:?}",
        letter["error"]
    );
    assert!(
        letter["plugin"].starts_with("caption-quality"),
        "{letter:?}"
    );
    env.finish().await;
}

/// A bug in a Python handler (an exception other than `malformed` or `retry`) is reported as
/// the exception and where it was raised, not as componentize-py's bare "Python function threw
/// an unexpected exception": in the dead letter and in `plugin exec`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_in_a_python_handler_is_named_with_its_message_and_frames() {
    let env = TestEnv::start(Options::new(&["python-raising"]).retries(1, 200)).await;
    let entry = env.publish("mock-python", &[("key", "label")]).await;
    let letter = env.await_dead_letter("mock-python", &entry).await;
    assert_eq!(letter["failureKind"], "plugin-trap", "{letter:?}");
    let error = &letter["error"];
    let source =
        std::fs::read_to_string(workspace().join("plugins/test-fixtures/python-raising/app.py"))
            .expect("the fixture's source");
    let line_of = |text: &str| 1 + source.lines().position(|l| l.contains(text)).expect(text);
    let frames = format!(
        "KeyError: 'label' at app.py:{} in label_of < app.py:{} in handle",
        line_of("return LABELS["),
        line_of("label_of(fields)")
    );
    assert!(error.contains(&frames), "{error}\nexpected {frames}");
    assert!(!error.contains("unexpected exception"), "{error}");

    let exec = env.command(&[
        "plugin",
        "exec",
        crate::support::plugin_file("python-raising")
            .to_str()
            .unwrap(),
        "-f",
        "key=label",
    ]);
    let said = String::from_utf8_lossy(&exec.stdout);
    assert!(said.contains(&frames), "{said}");
    env.finish().await;
}

/// Compiling the Python example (18 MB of Wasm) takes the compiler hundreds of MB for seconds;
/// the host runs every compile in a child process (`kaleidoscope compile-plugin`), so its own
/// peak memory stays that of its work, and the compiled artefact lands in its cache as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiling_the_python_example_leaves_the_hosts_peak_memory_alone() {
    let env = the_example_with_its_table(Options::new(&["caption-quality"])).await;
    let migrations = env.migrations_dir().display().to_string();
    // A cache of its own, empty: the host must compile (the shared one may hold the example).
    let cache = env.plugins_dir.join("fresh-cache");
    let host = env.spawn_with(
        "compiling",
        &env.plugins_dir,
        &[
            ("KALEIDOSCOPE_MIGRATIONS_DIR", &migrations),
            ("KALEIDOSCOPE_CACHE_DIR", &cache.display().to_string()),
        ],
    );
    let entry = env
        .publish(STREAM, &[("mediaId", "7"), ("score", "0.9")])
        .await;
    env.await_processed(STREAM, &entry).await;

    let status = std::fs::read_to_string(format!("/proc/{}/status", host.id()))
        .expect("the host's /proc status");
    let peak_mb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmHWM in /proc status")
        / 1024.0;
    assert!(
        peak_mb < 200.0,
        "the host peaked at {peak_mb:.0} MB while compiling the Python example"
    );
    let compiled = std::fs::read_dir(&cache)
        .expect("the compiled-plugin cache")
        .flatten()
        .filter(|f| f.path().extension().is_some_and(|e| e == "cwasm"))
        .count();
    assert_eq!(compiled, 1, "the compiled Python example is cached");
    drop(host);
    env.finish().await;
}
