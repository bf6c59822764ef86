//! `kaleidoscope bench` runs end to end on a small mixed load: it starts the real host as a
//! child process, drains every entry, verifies the rows and reports its figures.

use crate::support::{Options, OutputByDeadline, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drains_verifies_and_reports_a_mixed_load() {
    let env = TestEnv::prepare(Options::new(&["insights", "face-detection", "ml-errors"])).await;
    let database = format!("{}_bench", env.database);
    let url = format!("postgres://postgres@127.0.0.1:5432/{database}");
    let output = env
        .binary(&[
            "bench",
            "--entries",
            "400",
            "--embedding-dims",
            "8",
            "--database-url",
            &url,
            "--json",
        ])
        .output_by_deadline()
        .expect("run kaleidoscope bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    let figures: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bench --json prints JSON");
    let host = &figures[0];
    assert_eq!(host["subject"], "kaleidoscope");
    assert_eq!(host["entries"], 400);
    assert!(host["verified"]["Ok"].is_string(), "{host}");
    assert!(host["entries_per_second"].as_f64().unwrap() > 0.0, "{host}");
    assert!(host["peak_rss_mb"].as_f64().unwrap() > 0.0, "{host}");
    assert_eq!(host["deadlocks"], 0, "{host}");

    let admin = sqlx::PgPool::connect(crate::support::ADMIN_URL)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
    env.finish().await;
}
