//! The plugin author's loop of `docs/plugins.md`, followed step by step with the real binary:
//! `plugin new` in a folder outside this repository, the project's own unit tests, `plugin
//! build`, `plugin test`, the table through the operator migrations directory, the grant through
//! the configuration file, `plugin deploy` — into a host that is never restarted — and an entry
//! of the new stream landing in the new table. In Rust and in Python.

use crate::support::{Options, TestEnv, eventually, unique, workspace};
use std::path::PathBuf;
use std::process::Command;

/// Runs `command`, failing the test with its output when it fails; returns its stdout.
fn run(command: &mut Command) -> String {
    let output = command.output().expect("run the command");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// Follows the guide for a plugin in `language`; `name` is fixed per language so the build
/// caches of earlier runs apply.
async fn follow_the_guide(language: &str, name: &str) {
    let env = TestEnv::start(Options::new(&[]).operator_migrations()).await;
    let stream = format!("{name}-results");
    let table = name.replace('-', "_");
    // Outside this repository, as a team's own project would be.
    let parent = std::env::temp_dir().join(unique("guide"));
    let project = parent.join(name);
    let tool = |args: &[&str]| {
        let mut command = env.binary(args);
        // Built per run otherwise: the Rust project's dependencies are shared between runs.
        command.env(
            "CARGO_TARGET_DIR",
            workspace().join("target/guide-projects"),
        );
        command.env(
            "KALEIDOSCOPE_COMPONENTIZE_PY",
            workspace().join("target/python-env/bin/componentize-py"),
        );
        command
    };

    // 1. A new project.
    run(&mut tool(&[
        "plugin",
        "new",
        name,
        "--stream",
        &stream,
        "--lang",
        language,
        "--dir",
        project.to_str().unwrap(),
    ]));
    // 2. Its own unit tests (Rust: natively, logging included).
    if language == "rust" {
        run(Command::new("cargo")
            .args(["test", "--quiet", "--manifest-path"])
            .arg(project.join("Cargo.toml"))
            .env(
                "CARGO_TARGET_DIR",
                workspace().join("target/guide-projects"),
            ));
    }
    // 3. A component.
    let built = run(&mut tool(&["plugin", "build", project.to_str().unwrap()]));
    let component = PathBuf::from(built.trim());
    assert!(component.is_file(), "{built}");

    // 4. The operator's part: the grant into the host's configuration, the table into its
    //    migrations directory — while it runs.
    let grant = std::fs::read_to_string(project.join("kaleidoscope.toml")).unwrap();
    let config = std::fs::read_to_string(&env.config_file).unwrap();
    std::fs::write(&env.config_file, format!("{config}\n{grant}")).unwrap();
    for migration in std::fs::read_dir(project.join("migrations")).unwrap() {
        let migration = migration.unwrap().path();
        std::fs::copy(
            &migration,
            env.migrations_dir().join(migration.file_name().unwrap()),
        )
        .unwrap();
    }
    eventually("the grant and the table to reach the host", || async {
        let granted = env.host().delivery().policy(name).tables.contains(&table);
        (granted && env.host().delivery().knows_table(&table)).then_some(())
    })
    .await;

    // 5. Golden tests: record, then check (against the live schema too).
    let project_arg = project.to_str().unwrap();
    run(&mut tool(&["plugin", "test", project_arg, "--update"]));
    let checked = run(&mut tool(&[
        "plugin",
        "test",
        project_arg,
        "--database",
        &env.database_url,
    ]));
    assert!(checked.contains("4 case(s), 0 failed"), "{checked}");

    // 6. Deploy into the running host, and an entry lands in the new table.
    let deployed = run(&mut tool(&[
        "plugin",
        "deploy",
        component.to_str().unwrap(),
        "--timeout",
        "120",
    ]));
    assert!(deployed.contains(&format!("loaded {name}")), "{deployed}");
    let id = env
        .publish(&stream, &[("mediaId", "42"), ("label", "cat")])
        .await;
    env.await_processed(&stream, &id).await;
    // Audited: `table` is this test's own constant.
    let label: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT label FROM {table} WHERE media_id = 42"
    )))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(label, "cat");
    let _ = std::fs::remove_dir_all(&parent);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_takes_a_rust_plugin_from_nothing_to_a_running_host() {
    follow_the_guide("rust", "guide-rust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_takes_a_python_plugin_from_nothing_to_a_running_host() {
    follow_the_guide("python", "guide-python").await;
}

/// A project is where the guide says it is.
#[test]
fn the_guide_names_the_commands_the_test_follows() {
    let guide = std::fs::read_to_string(workspace().join("docs/plugins.md")).unwrap();
    for step in [
        "kaleidoscope plugin new",
        "kaleidoscope plugin build",
        "kaleidoscope plugin test",
        "kaleidoscope plugin deploy",
        "kaleidoscope plugin dev",
        "KALEIDOSCOPE_MIGRATIONS_DIR",
        "--lang python",
    ] {
        assert!(
            guide.contains(step),
            "docs/plugins.md does not mention {step}"
        );
    }
}
