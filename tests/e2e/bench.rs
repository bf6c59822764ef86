//! `kaleidoscope bench` runs end to end on a small mixed load: it starts the real host and the
//! native reference consumer as child processes, drains every entry with each, verifies the rows
//! and reports their figures.

use crate::support::{Options, OutputByDeadline, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drains_verifies_and_reports_a_mixed_load_beside_the_native_reference() {
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
            "--reference",
            "native",
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
    assert!(
        host["postgres_cpu_us_per_entry"].as_f64().is_some(),
        "{host}"
    );
    // The native reference did the same work: every row the host wrote, every entry acked.
    let native = &figures[1];
    assert_eq!(native["subject"], "native");
    assert_eq!(native["reference"], true);
    assert_eq!(native["verified"], host["verified"], "{native}");
    assert!(
        native["cpu_us_per_entry"].as_f64().unwrap() > 0.0,
        "{native}"
    );

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
