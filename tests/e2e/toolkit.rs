//! `kaleidoscope plugin check` and `plugin exec`, as a plugin author uses them.

use crate::support::{OutputByDeadline, plugin_file};
use std::process::Command;

fn kaleidoscope(args: &[&str]) -> (serde_json::Value, std::process::Output) {
    let output = Command::new(env!("CARGO_BIN_EXE_kaleidoscope"))
        .args(args)
        .output_by_deadline()
        .unwrap();
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (json, output)
}

#[test]
fn check_prints_manifest_streams_imports_size_and_compile_time() {
    let file = plugin_file("insights");
    let (report, output) = kaleidoscope(&["plugin", "check", file.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report["name"], "insights");
    assert_eq!(report["version"], "0.1.0");
    assert_eq!(
        report["streams"],
        serde_json::json!(["ml-insights-results"])
    );
    assert!(report["size_bytes"].as_u64().unwrap() > 1000);
    assert!(report["compile_ms"].as_f64().unwrap() > 0.0);
    let imports = report["imports"].to_string();
    assert!(
        imports.contains("kaleidoscope:handler/types") && imports.contains("wasi:cli/environment"),
        "{imports}"
    );
    assert_eq!(
        report["grants"]["tables"],
        serde_json::json!(["media_ai_insights"])
    );
    assert_eq!(
        report["grants"]["update_columns"],
        serde_json::json!({"ml_requests": ["results_received"]})
    );
    assert_eq!(report["warnings"], serde_json::json!([]));
}

#[test]
fn check_warns_about_a_plugin_with_no_grants() {
    let file = plugin_file("trespasser");
    let (report, output) = kaleidoscope(&["plugin", "check", file.to_str().unwrap()]);
    assert!(output.status.success(), "it loads; it just cannot write");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("no grants") && warnings.contains("[plugins.trespasser]"),
        "{warnings}"
    );
}

#[test]
fn check_refuses_what_the_host_would_refuse() {
    let file = plugin_file("manifest-trap");
    let (_, output) = kaleidoscope(&["plugin", "check", file.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("manifest-trap.wasm") && stderr.contains("manifest()"),
        "{stderr}"
    );
}

#[test]
fn exec_prints_the_commands_for_an_entry() {
    let file = plugin_file("face-detection");
    let (report, output) = kaleidoscope(&[
        "plugin",
        "exec",
        file.to_str().unwrap(),
        "--field",
        "mediaId=42",
        "--field",
        r#"faces=[{"faceId": "f1", "bbox": [10, 20, 30, 60]}]"#,
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report["outcome"], "commands");
    let face = &report["commands"][1]["upsert"];
    assert_eq!(face["table"], "media_detected_faces");
    assert_eq!(face["key"]["face_id"], "f1");
    assert_eq!(face["set"]["bbox_width"], 20.0);
    assert_eq!(face["set"]["bbox_height"], 40.0);
    assert_eq!(
        report["commands"][0]["upsert"]["set"]["services_completed"]["append_unique"],
        serde_json::json!(["face_detection"])
    );
}

#[test]
fn exec_reports_a_failure_with_exit_code_2() {
    let file = plugin_file("insights");
    let (report, output) = kaleidoscope(&[
        "plugin",
        "exec",
        file.to_str().unwrap(),
        "--field",
        "mediaId=abc",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(report["outcome"], "malformed");
    assert!(report["reason"].as_str().unwrap().contains("mediaId"));
}

#[test]
fn a_trap_reads_panic_message_first_then_the_plugins_own_frames() {
    let file = plugin_file("scripted");
    let (report, output) = kaleidoscope(&[
        "plugin",
        "exec",
        file.to_str().unwrap(),
        "--field",
        "action=panic",
        "--field",
        "note=kaboom",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(report["outcome"], "plugin-trap");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("plugin trapped: panicked at ")
            && reason.contains("scripted panic: kaboom"),
        "{reason}"
    );
    assert!(
        reason.contains("in behaviours::perform < handle"),
        "{reason}"
    );
    assert!(
        !reason.contains('\n') && !reason.contains("RUST_BACKTRACE") && !reason.contains("std::"),
        "one line, no standard-library frames, no hint that cannot apply: {reason}"
    );
}

/// The plugin author guide walks through the shipped `user-face-embeddings` plugin; its code
/// blocks must be the real files (whose behaviour the end-to-end tests check), so following the
/// guide literally produces a working plugin.
#[test]
fn the_plugin_guide_matches_the_plugin_it_builds() {
    let root = crate::support::workspace();
    let guide = std::fs::read_to_string(root.join("docs/plugins.md")).unwrap();
    let block_after = |marker: &str| -> String {
        let start = guide
            .find(marker)
            .unwrap_or_else(|| panic!("the guide lost its `{marker}` step"));
        let fence = guide[start..].find("```").unwrap() + start;
        let body = guide[fence..].find('\n').unwrap() + fence + 1;
        let end = guide[body..].find("```").unwrap() + body;
        guide[body..end].to_string()
    };
    // Comments and layout may differ (rustfmt, doc comments); the code may not.
    let code = |text: &str| -> String {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("//") && !l.starts_with("--"))
            .collect::<String>()
            .split_whitespace()
            .collect::<String>()
            .replace(",)", ")")
            .replace(",]", "]")
            .replace(",}", "}")
    };
    let file = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();

    assert_eq!(
        code(&block_after("`plugins/user-face-embeddings/Cargo.toml`:")),
        code(&file("plugins/user-face-embeddings/Cargo.toml"))
    );
    let shipped = code(&file("plugins/user-face-embeddings/src/lib.rs"));
    let shown = code(&block_after("`plugins/user-face-embeddings/src/lib.rs`:"));
    assert_eq!(
        shown, shipped,
        "docs/plugins.md step 3 differs from the shipped plugin"
    );
    let migration = code(&file("migrations/20261126000003_user_face_embeddings.sql"));
    assert!(migration.contains(&code(&block_after(
        "`migrations/20261126000003_user_face_embeddings.sql`:"
    ))));
    assert!(file("plugins/Cargo.toml").contains("\"user-face-embeddings\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_database_refuses_what_the_host_would_refuse() {
    let env = crate::support::TestEnv::prepare(crate::support::Options::new(&["insights"])).await;
    let file = plugin_file("insights");
    let exec = |database: Option<&str>| {
        let mut args = vec![
            "plugin",
            "exec",
            file.to_str().unwrap(),
            "-f",
            "mediaId=7",
            "-f",
            "service=image_captioning",
            "-f",
            "caption=a cat",
        ];
        if let Some(url) = database {
            args.extend(["--database", url]);
        }
        let output = env.command(&args);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
        (report, output.status.code())
    };
    let (report, code) = exec(Some(&env.database_url));
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["checked_against_database"], true);

    // The schema of this database lacks a column the plugin writes: the host would refuse it.
    sqlx::query("ALTER TABLE media_ai_insights DROP COLUMN caption CASCADE")
        .execute(&env.pool)
        .await
        .unwrap();
    let (report, code) = exec(Some(&env.database_url));
    assert_eq!(code, Some(2), "{report}");
    assert_eq!(report["outcome"], "forbidden-command");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("column `caption` does not exist"),
        "{reason}"
    );
    // Without a database, only grants are checked, and it says so.
    let (report, code) = exec(None);
    assert_eq!(code, Some(0));
    assert_eq!(report["checked_against_database"], false);
    env.finish().await;
}

#[test]
fn plugin_test_compares_recorded_entries_with_expected_outcomes() {
    let dir = std::env::temp_dir().join(crate::support::unique("kt_golden"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("captions.jsonl"),
        concat!(
            r#"{"fields": {"mediaId": "7", "service": "image_captioning", "caption": "a cat"}}"#,
            "\n",
            r#"{"fields": {"mediaId": "x"}}"#,
            "\n",
        ),
    )
    .unwrap();
    let file = plugin_file("insights");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "plugin",
            "test",
            file.to_str().unwrap(),
            dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let output = Command::new(env!("CARGO_BIN_EXE_kaleidoscope"))
            .args(&args)
            .output_by_deadline()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (ok, text) = run(&[]);
    assert!(
        !ok && text.contains("new ") && text.contains("--update"),
        "{text}"
    );
    let (ok, text) = run(&["--update"]);
    assert!(ok, "{text}");
    let expected = std::fs::read_to_string(dir.join("captions.expected.jsonl")).unwrap();
    assert_eq!(expected.lines().count(), 2);
    assert!(expected.contains("\"malformed\""), "{expected}");
    let (ok, text) = run(&[]);
    assert!(ok && text.contains("2 case(s), 0 failed"), "{text}");
    // A changed outcome is caught.
    std::fs::write(
        dir.join("captions.expected.jsonl"),
        expected.replace("a cat", "a dog"),
    )
    .unwrap();
    let (ok, text) = run(&[]);
    assert!(
        !ok && text.contains("differs") && text.contains("a dog"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
