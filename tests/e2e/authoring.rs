//! The plugin author's loop of `docs/plugins.md`, followed step by step with the real binary:
//! `plugin new` in a folder outside this repository, the project's own unit tests, `plugin
//! build`, `plugin test`, the table through the operator migrations directory, the grant through
//! the configuration file, `plugin deploy` — into a host that is never restarted — and an entry
//! of the new stream landing in the new table. In Rust and in Python.

use crate::support::{Options, OutputByDeadline, TestEnv, eventually, unique, workspace};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `command`, failing the test with its output when it fails; returns its stdout.
fn run(command: &mut Command) -> String {
    let output = command.output_by_deadline().expect("run the command");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// The `kaleidoscope` binary for `env`, with the build tools the guide's commands use.
fn tool(env: &TestEnv, args: &[&str]) -> Command {
    let mut command = env.binary(args);
    // Built per run otherwise: the Rust projects' dependencies are shared between runs.
    command.env(
        "CARGO_TARGET_DIR",
        workspace().join("target/guide-projects"),
    );
    command.env(
        "KALEIDOSCOPE_COMPONENTIZE_PY",
        workspace().join("target/python-env/bin/componentize-py"),
    );
    command
}

/// `plugin new` in a folder outside this repository, as a team's own project would be.
fn new_project(env: &TestEnv, language: &str, name: &str) -> PathBuf {
    let project = std::env::temp_dir().join(unique("guide")).join(name);
    run(&mut tool(
        env,
        &[
            "plugin",
            "new",
            name,
            "--stream",
            &format!("{name}-results"),
            "--lang",
            language,
            "--dir",
            project.to_str().unwrap(),
        ],
    ));
    project
}

/// The operator's part (guide step 2.5): the project's grant into the host's configuration, its
/// table into the migrations directory — while the host runs.
async fn operator_adds(env: &TestEnv, project: &Path, name: &str) {
    let table = name.replace('-', "_");
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
        let granted = env.host().state().policy(name).tables.contains(&table);
        (granted && env.host().state().knows_table(&table)).then_some(())
    })
    .await;
}

/// Follows the guide for a plugin in `language`; `name` is fixed per language so the build
/// caches of earlier runs apply.
async fn follow_the_guide(language: &str, name: &str) {
    let env = TestEnv::start(Options::new(&[]).operator_migrations()).await;
    let stream = format!("{name}-results");
    let table = name.replace('-', "_");
    let tool = |args: &[&str]| tool(&env, args);

    // 1. A new project.
    let project = new_project(&env, language, name);
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

    // 4. The operator's part: the grant and the table, while the host runs.
    operator_adds(&env, &project, name).await;

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
    let _ = std::fs::remove_dir_all(project.parent().unwrap());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_dev_redeploys_on_save_and_shows_how_entries_come_out() {
    plugin_dev_loop(Options::new(&[]), "guide-dev").await;
}

/// `plugin dev` on a new project `name` with a host started with `options`: it loads the build,
/// shows how entries come out, and redeploys on a save. Tests that run at once need names of
/// their own: a project's build lands in a file named after it in the shared target directory.
pub(crate) async fn plugin_dev_loop(options: Options, name: &str) {
    let env = TestEnv::start(options.operator_migrations()).await;
    let project = new_project(&env, "rust", name);
    operator_adds(&env, &project, name).await;
    // A first build outside any deadline (cold, it compiles the SDK's dependencies).
    run(&mut tool(
        &env,
        &["plugin", "build", project.to_str().unwrap()],
    ));
    let output = project.parent().unwrap().join("dev.out");
    let mut dev = tool(&env, &["plugin", "dev", project.to_str().unwrap()])
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start plugin dev");
    let printed = |text: String| {
        let output = output.clone();
        async move {
            eventually(&format!("plugin dev to print {text:?}"), || async {
                std::fs::read_to_string(&output)
                    .ok()
                    .filter(|out| out.contains(&text))
            })
            .await
        }
    };
    printed(format!("loaded {name} 0.1.0")).await;
    let id = env
        .publish(
            &format!("{name}-results"),
            &[("mediaId", "1"), ("label", "x")],
        )
        .await;
    printed(format!("{id}: processed by {name}@0.1.0")).await;
    let bad = env
        .publish(&format!("{name}-results"), &[("label", "no media")])
        .await;
    printed(format!("{bad}: dead-lettered by {name}@0.1.0")).await;

    // A save: rebuilt and redeployed, no host restart.
    let manifest = project.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("version = \"0.1.0\"", "version = \"0.1.1\""),
    )
    .unwrap();
    printed(format!("loaded {name} 0.1.1")).await;
    let _ = dev.kill();
    let _ = dev.wait();
    let _ = std::fs::remove_dir_all(project.parent().unwrap());
    env.finish().await;
}

/// `plugin dev --shadow`: the edited build runs as a shadow of the deployed one on the host's
/// entries, the loop prints what it would write differently (per table and column) while the
/// live version's rows stay as they are, and Ctrl-C ends the shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_dev_shadow_shows_what_an_edit_would_write_differently() {
    let name = "guide-shadow";
    let table = name.replace('-', "_");
    let env = TestEnv::start(Options::new(&[]).operator_migrations()).await;
    let project = new_project(&env, "rust", name);
    operator_adds(&env, &project, name).await;
    let built = run(&mut tool(
        &env,
        &["plugin", "build", project.to_str().unwrap()],
    ));
    let (deployed, printed) = env.deploy(Path::new(built.trim()));
    assert!(deployed, "{printed}");
    // The edit: labels in capitals.
    let handler = project.join("src/lib.rs");
    let source = std::fs::read_to_string(&handler).unwrap();
    assert!(source.contains("None => label.to_string(),"));
    std::fs::write(
        &handler,
        source.replace(
            "None => label.to_string(),",
            "None => label.to_uppercase(),",
        ),
    )
    .unwrap();

    let output = project.parent().unwrap().join("dev.out");
    let mut dev = tool(
        &env,
        &["plugin", "dev", project.to_str().unwrap(), "--shadow"],
    )
    .stdout(std::fs::File::create(&output).unwrap())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("start plugin dev");
    let printed = |text: String| {
        let output = output.clone();
        async move {
            eventually(&format!("plugin dev to print {text:?}"), || async {
                std::fs::read_to_string(&output)
                    .ok()
                    .filter(|out| out.contains(&text))
            })
            .await
        }
    };
    printed("started rollout 1 of guide-shadow".to_string()).await;
    let id = env
        .publish(
            &format!("{name}-results"),
            &[("mediaId", "1"), ("label", "cat")],
        )
        .await;
    env.await_processed(&format!("{name}-results"), &id).await;
    printed(format!(r#"{table}.label: "cat" → "CAT""#)).await;
    printed("compared with the live version so far: 1 different".to_string()).await;
    let label: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT label FROM {table} WHERE media_id = 1"
    )))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(label, "cat", "the shadow wrote nothing");

    crate::support::signal(&dev, "INT");
    crate::support::await_exit(&mut dev).await;
    printed("ended shadow rollout 1".to_string()).await;
    let state: String = sqlx::query_scalar("SELECT state FROM rollouts WHERE id = 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(state, "aborted");
    let _ = std::fs::remove_dir_all(project.parent().unwrap());
    env.finish().await;
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
        "kaleidoscope plugin up",
        "kaleidoscope plugin remove",
        "KALEIDOSCOPE_MIGRATIONS_DIR",
        "--lang python",
    ] {
        assert!(
            guide.contains(step),
            "docs/plugins.md does not mention {step}"
        );
    }
}

/// `plugin up` on a fresh Python scaffold from an empty shell (a system `PATH` and `HOME`,
/// nothing else): it makes the project's Python environment, database and prefix, applies its
/// migration and grant, builds and deploys it, and prints the `XADD` to try — which, run as
/// printed, lands an entry in the project's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_up_runs_a_fresh_project_from_an_empty_shell() {
    let env = TestEnv::prepare(Options::new(&[])).await;
    let name = format!(
        "up-{}",
        env.database.trim_start_matches("kt_").replace('_', "-")
    );
    let project = new_project(&env, "python", &name);
    let output = project.parent().unwrap().join("up.out");
    // No componentize-py anywhere it looks: `plugin build` makes the project's environment.
    let mut up = crate::support::HostProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_kaleidoscope"))
            .args(["plugin", "up", project.to_str().unwrap()])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .current_dir(project.parent().unwrap())
            .stdout(std::fs::File::create(&output).unwrap())
            .stderr(std::process::Stdio::null()),
    );
    let database = format!("kaleidoscope_dev_{}", name.replace('-', "_"));
    // A Python environment, a componentize-py build and an 18 MB compile: minutes, not seconds,
    // when the rest of the suite shares the machine.
    let xadd = crate::support::eventually_within(
        std::time::Duration::from_secs(180),
        "plugin up to print the XADD to try",
        || async {
            std::fs::read_to_string(&output).ok().and_then(|out| {
                out.lines()
                    .find(|l| l.trim_start().starts_with("redis-cli") && l.contains(" XADD "))
                    .map(|l| l.trim().to_string())
            })
        },
    )
    .await;
    assert!(
        xadd.contains(&format!("'dev:{name}:{name}-results'")),
        "{xadd}"
    );
    let published = Command::new("sh")
        .args(["-c", &xadd])
        .output_by_deadline()
        .expect("run the printed XADD");
    assert!(published.status.success(), "{published:?}");
    let url = format!("postgres://postgres@127.0.0.1:5432/{database}");
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("the project's database");
    let table = name.replace('-', "_");
    let landed = eventually("the entry to land in the project's table", || async {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&pool)
            .await
            .ok()
            .filter(|count| *count > 0)
    })
    .await;
    assert_eq!(landed, 1);
    assert!(project.join(".venv/bin/componentize-py").is_file());
    pool.close().await;
    crate::support::signal(&up, "TERM");
    crate::support::await_exit(&mut up).await;
    // The project's own database and keys go with the test.
    if let Ok(admin) = sqlx::PgPool::connect(crate::support::ADMIN_URL).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("dev:{name}:*"))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await;
    }
    let _ = std::fs::remove_dir_all(project.parent().unwrap());
    env.finish().await;
}

/// A Python build is keyed by what it is made of: building unchanged sources again gives the same
/// component (componentize-py alone would not), so the compiled cache of `plugin check` (and of
/// every host) hits; a changed source is built anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_python_project_builds_to_the_same_bytes_and_hits_the_compiled_cache() {
    let env = TestEnv::prepare(Options::new(&[])).await;
    let project = new_project(&env, "python", "cached-py");
    let build = || {
        let path = run(&mut tool(
            &env,
            &["plugin", "build", project.to_str().unwrap()],
        ));
        let path = PathBuf::from(path.trim());
        std::fs::read(&path).expect("the built component")
    };
    let check = || {
        run(&mut tool(
            &env,
            &[
                "plugin",
                "check",
                project.join("target/cached-py.wasm").to_str().unwrap(),
            ],
        ))
    };
    let first = build();
    assert!(check().contains("\"from_cache\": false"));
    let second = build();
    assert!(first == second, "an unchanged project built to other bytes");
    assert!(check().contains("\"from_cache\": true"));
    let app = project.join("app.py");
    let source = std::fs::read_to_string(&app).unwrap();
    std::fs::write(&app, format!("{source}\n# changed\n")).unwrap();
    assert!(build() != first, "a changed project was not rebuilt");
    let _ = std::fs::remove_dir_all(project.parent().unwrap());
    env.finish().await;
}
