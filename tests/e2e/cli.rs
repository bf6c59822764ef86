//! The `kaleidoscope` binary: `run` against an empty database, `--help`, configuration errors.

use crate::support::{Options, OutputByDeadline, TestEnv, eventually, unique};
use kaleidoscope::config::SETTINGS;
use std::process::{Command, Stdio};

/// The binary, without the HTTP endpoint (tests run in parallel; one default port would clash).
fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kaleidoscope"));
    command.env("KALEIDOSCOPE_HTTP_ADDR", "");
    command
}

#[test]
fn help_documents_every_flag_and_variable() {
    let output = binary()
        .args(["run", "--help"])
        .output_by_deadline()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for setting in SETTINGS {
        assert!(
            help.contains(setting.env),
            "`run --help` does not mention {}",
            setting.env
        );
    }
    for flag in [
        "--config",
        "--plugins-dir",
        "--consumer-name",
        "--no-migrate",
    ] {
        assert!(help.contains(flag), "`run --help` does not mention {flag}");
    }
}

/// `kaleidoscope run` pointed at servers that do not exist: should a bad setting ever be
/// accepted, the run fails at once on the connection (and the assertion on the message fails)
/// instead of serving on this machine's real databases and never returning.
fn run_nowhere() -> Command {
    let mut command = binary();
    command
        .arg("run")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
        .env("REDIS_URL", "redis://127.0.0.1:1");
    command
}

#[test]
fn invalid_configuration_is_an_error_naming_the_variable() {
    let output = run_nowhere()
        .env("KALEIDOSCOPE_BATCH_SIZE", "ten")
        .output_by_deadline()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KALEIDOSCOPE_BATCH_SIZE") && stderr.contains("ten"),
        "{stderr}"
    );

    let output = run_nowhere()
        .env("KALEIDOSCOPE_BATCH_SIZ", "5")
        .output_by_deadline()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("unknown environment variable KALEIDOSCOPE_BATCH_SIZ")
    );

    let output = run_nowhere()
        .env("KALEIDOSCOPE_PLUGIN_MEMORY_MIB", "100000")
        .output_by_deadline()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KALEIDOSCOPE_PLUGIN_MEMORY_MIB") && stderr.contains("at most 4096"),
        "{stderr}"
    );
    // The largest cap allowed is one the engine can serve.
    let output = binary()
        .args(["plugin", "check"])
        .arg(crate::support::plugin_file("insights"))
        .env("KALEIDOSCOPE_PLUGIN_MEMORY_MIB", "4096")
        .output_by_deadline()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_against_an_empty_database_migrates_it_and_serves() {
    // The harness only provides the stream prefix, plugins and cleanup here: the binary gets a
    // database name that does not exist yet, and must create and migrate it.
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    let database = unique("kt_empty");
    let url = format!("postgres://postgres@127.0.0.1:5432/{database}");
    let mut child = crate::support::HostProcess::spawn(
        binary()
            .arg("run")
            .env("DATABASE_URL", &url)
            .env("REDIS_URL", crate::support::REDIS_URL)
            .env("KALEIDOSCOPE_STREAM_PREFIX", &env.prefix)
            .env("KALEIDOSCOPE_PLUGINS_DIR", &env.plugins_dir)
            .env("KALEIDOSCOPE_POLL_TIMEOUT_MS", "200")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    let pool = eventually("the binary to create the database", || async {
        sqlx::PgPool::connect(&url).await.ok()
    })
    .await;
    eventually("the binary to migrate the database", || async {
        let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM information_schema.tables WHERE table_name IN ('media_ai_insights', 'processed_entries')")
            .fetch_one(&pool)
            .await
            .ok()?;
        (tables == 2).then_some(())
    })
    .await;
    sqlx::query("INSERT INTO posts (post_id) VALUES (1)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO post_media (media_id, post_id) VALUES (1, 1)")
        .execute(&pool)
        .await
        .unwrap();
    let id = env
        .publish(
            "ml-insights-results",
            &[
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "served"),
            ],
        )
        .await;
    let caption: String = eventually("the binary to process an entry", || async {
        sqlx::query_scalar("SELECT caption FROM media_ai_insights WHERE media_id = 1")
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(caption, "served");
    let ledger: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_entries WHERE entry_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(ledger, 1);

    crate::support::signal(&child, "TERM");
    let exit = crate::support::await_exit(&mut child).await;
    assert!(exit.success(), "exit status {exit:?}");
    pool.close().await;
    if let Ok(admin) = sqlx::PgPool::connect(crate::support::ADMIN_URL).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
    env.finish().await;
}

#[test]
fn readme_documents_every_setting() {
    let readme = std::fs::read_to_string(crate::support::workspace().join("README.md")).unwrap();
    for setting in SETTINGS {
        assert!(
            readme.contains(&format!("`{}` | `{}`", setting.env, setting.key)),
            "README's configuration table lacks {} / {}",
            setting.env,
            setting.key
        );
    }
}

#[test]
fn passwords_never_appear_in_error_messages() {
    for (variable, url) in [
        (
            "DATABASE_URL",
            "postgres://postgres:S3cret@127.0.0.1:5432/kaleidoscope?sslmode=bogus",
        ),
        (
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/kaleidoscope?password=S3cret",
        ),
        ("REDIS_URL", "redis://:S3cret@127.0.0.1:1"),
    ] {
        let command = if variable == "REDIS_URL" {
            "status"
        } else {
            "migrate"
        };
        let output = binary()
            .arg(command)
            .env(variable, url)
            .env_remove("KALEIDOSCOPE_CONFIG")
            .output_by_deadline()
            .unwrap();
        assert!(!output.status.success(), "{command} with {url} must fail");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !printed.contains("S3cret") && printed.contains("error"),
            "{command} with {url} printed: {printed}"
        );
        assert!(
            !printed.contains("(os error 111): Connection refused"),
            "each cause once: {printed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http_port_fails_before_anything_is_created() {
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let database = unique("kt_never");
    let output = crate::support::output_within_deadline(
        binary()
            .arg("run")
            .env(
                "DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:5432/{database}"),
            )
            .env("REDIS_URL", crate::support::REDIS_URL)
            .env("KALEIDOSCOPE_STREAM_PREFIX", &env.prefix)
            .env("KALEIDOSCOPE_PLUGINS_DIR", &env.plugins_dir)
            .env("KALEIDOSCOPE_HTTP_ADDR", &addr),
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KALEIDOSCOPE_HTTP_ADDR") && stderr.contains(&addr),
        "{stderr}"
    );
    // Nothing was created: no database, no stream or consumer group.
    let created: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(!created, "the database was created");
    let mut redis = env.redis.clone();
    let streams: i64 = redis::cmd("EXISTS")
        .arg(env.key("ml-insights-results"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(streams, 0, "a stream was created");
    drop(busy);
    env.finish().await;
}

/// Relays every connection to `listener` to the machine's PostgreSQL: a database that appears
/// on a new port the moment this starts.
async fn relay_to_postgres(listener: tokio::net::TcpListener) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_waits_for_a_database_that_appears_late() {
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    env.seed_media(1, &[1]).await;
    // A port nothing listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let late_url = env
        .database_url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{port}"));
    let log = env.plugins_dir.with_extension("late.log");
    let mut host = crate::support::HostProcess::spawn(
        env.binary(&["run", "--wait-for-deps", "60s"])
            .env("DATABASE_URL", &late_url)
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    eventually("the host to say it waits for PostgreSQL", || async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|text| text.contains("waiting for PostgreSQL"))
    })
    .await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(relay_to_postgres(listener));
    let id = env
        .publish(
            "ml-insights-results",
            &[
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "late"),
            ],
        )
        .await;
    env.await_processed("ml-insights-results", &id).await;
    crate::support::signal(&host, "TERM");
    assert!(crate::support::await_exit(&mut host).await.success());
    env.finish().await;
}

#[test]
fn config_check_prints_every_setting_with_its_origin_or_names_the_bad_one() {
    let file = std::env::temp_dir().join(format!("{}.toml", unique("kt_config")));
    std::fs::write(&file, "poll_timeout_ms = 250\n").unwrap();
    let output = binary()
        .args(["config", "check", "--json", "--config"])
        .arg(&file)
        .env("KALEIDOSCOPE_BATCH_SIZE", "20")
        .env("REDIS_PASSWORD", "hunter2")
        .env_remove("KALEIDOSCOPE_HTTP_ADDR")
        .output_by_deadline()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let settings: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(settings.len(), SETTINGS.len());
    let find = |env: &str| {
        settings
            .iter()
            .find(|s| s["env"] == env)
            .unwrap_or_else(|| panic!("{env} missing"))
            .clone()
    };
    assert_eq!(find("KALEIDOSCOPE_BATCH_SIZE")["value"], "20");
    assert_eq!(
        find("KALEIDOSCOPE_BATCH_SIZE")["origin"],
        "from environment variable KALEIDOSCOPE_BATCH_SIZE"
    );
    assert_eq!(find("KALEIDOSCOPE_POLL_TIMEOUT_MS")["value"], "250");
    assert!(
        find("KALEIDOSCOPE_POLL_TIMEOUT_MS")["origin"]
            .as_str()
            .unwrap()
            .contains(file.to_str().unwrap())
    );
    assert_eq!(
        find("ML_RETRY_ATTEMPTS")["origin"],
        "(the built-in default)"
    );
    // Metrics on by default, on this machine only.
    assert_eq!(find("KALEIDOSCOPE_HTTP_ADDR")["value"], "127.0.0.1:9464");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("hunter2"));

    let output = binary()
        .args(["config", "check"])
        .env("KALEIDOSCOPE_BATCH_SIZE", "many")
        .output_by_deadline()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KALEIDOSCOPE_BATCH_SIZE") && stderr.contains("many"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn subcommand_help_shows_its_flags_and_points_to_the_settings() {
    for args in [
        vec!["status", "--help"],
        vec!["demo", "--help"],
        vec!["publish", "post-image", "--help"],
        vec!["plugin", "deploy", "--help"],
    ] {
        let output = binary().args(&args).output_by_deadline().unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(
            help.contains("kaleidoscope config check"),
            "{args:?}: {help}"
        );
        // Not the ~50 settings again.
        assert!(
            !help.contains("KALEIDOSCOPE_MAX_IN_FLIGHT"),
            "{args:?}: {help}"
        );
        // Every flag described.
        let undescribed: Vec<&str> = help
            .lines()
            .zip(help.lines().skip(1))
            .filter(|(flag, next)| flag.trim_start().starts_with("--") && next.trim().is_empty())
            .map(|(flag, _)| flag)
            .collect();
        assert!(undescribed.is_empty(), "{args:?}: {undescribed:?}");
    }
}

#[test]
fn output_into_a_closed_pipe_ends_the_command_quietly() {
    // `kaleidoscope config check | head -0`: the reader is gone before the first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = binary()
        .args(["config", "check"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .finish_by_deadline()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}
