//! What operators see: `/metrics`, `/healthz`, `/readyz`, `status --json`, JSON logs.

use crate::support::{HostProcess, Options, TestEnv, eventually, http_get as get};
use kaleidoscope::requests::{Publisher, Request};
use std::io::{Read, Write};
use std::sync::Arc;

/// One processed entry, one dead letter, and one tracked request.
async fn some_traffic(env: &TestEnv, request: Request) {
    env.seed_media(1, &[1, 2]).await;
    let ok = env
        .publish(
            "ml-insights-results",
            &[
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "x"),
            ],
        )
        .await;
    let bad = env
        .publish("ml-insights-results", &[("mediaId", "nope")])
        .await;
    env.await_processed("ml-insights-results", &ok).await;
    env.await_dead_letter("ml-insights-results", &bad).await;
    let publisher = Publisher::new(Arc::new(env.config.clone()), env.pool.clone()).unwrap();
    publisher
        .publish(&request, None)
        .await
        .unwrap()
        .expect("published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_are_served_over_http() {
    let env =
        TestEnv::start(Options::new(&["insights"]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0"))
            .await;
    let addr = env.host().http_addr().expect("HTTP is enabled");
    // A result for media that does not exist yet waits (pending) for a retry.
    env.publish(
        "ml-insights-results",
        &[
            ("mediaId", "99"),
            ("service", "image_captioning"),
            ("caption", "early"),
        ],
    )
    .await;
    eventually("the early result to wait for its retry", || async {
        (env.pending("ml-insights-results").await == 1).then_some(())
    })
    .await;
    some_traffic(
        &env,
        Request::PostImage {
            post_id: 1,
            media_id: 2,
            media_url: "u".into(),
            uploader_id: None,
        },
    )
    .await;

    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(addr, "/readyz").0, 200);
    let (status, metrics) = eventually("the counters to include both entries", || async move {
        let (status, body) = get(addr, "/metrics");
        body.contains("kaleidoscope_entries_dead_lettered_total")
            .then_some((status, body))
    })
    .await;
    assert_eq!(status, 200);
    for expected in [
        "kaleidoscope_entries_processed_total{stream=\"ml-insights-results\",plugin=\"insights\"} 1",
        "kaleidoscope_entries_dead_lettered_total{stream=\"ml-insights-results\",plugin=\"insights\",kind=\"malformed\"} 1",
        "kaleidoscope_batch_duration_seconds_count{stream=\"ml-insights-results\"}",
        "kaleidoscope_handler_duration_seconds_bucket{plugin=\"insights\",le=\"+Inf\"} 3",
        "kaleidoscope_stream_pending{stream=\"ml-insights-results\"} 1",
        "kaleidoscope_stream_lag{stream=\"ml-insights-results\"} 0",
        "kaleidoscope_stream_oldest_pending_age_seconds{stream=\"ml-insights-results\"} ",
        "kaleidoscope_requests{status=\"PENDING\"} 1",
        "kaleidoscope_requests{status=\"FAILED\"} 0",
        "kaleidoscope_request_stream_length{stream=\"post-image-processing\"} 1",
        "kaleidoscope_plugin_files_failing 0",
        "kaleidoscope_heartbeat_age_seconds ",
        "kaleidoscope_handler_calls_in_flight{plugin=\"insights\"} 0",
        "kaleidoscope_dead_letters{kind=\"malformed\"} 1",
        // Series exist from the start, at 0.
        "kaleidoscope_dead_letters{kind=\"timeout\"} 0",
        "kaleidoscope_entries_dead_lettered_total{stream=\"ml-insights-results\",plugin=\"insights\",kind=\"plugin-trap\"} 0",
        // A wait for a row that is not there yet is an ordinary retry, not an exhausted one.
        "kaleidoscope_entries_retried_total{stream=\"ml-insights-results\",plugin=\"insights\",reason=\"retryable\"} 1",
        // Buckets past the plugin deadline (30 s by default).
        "kaleidoscope_handler_duration_seconds_bucket{plugin=\"insights\",le=\"60\"} 3",
        "kaleidoscope_build_info{version=\"",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "kaleidoscope_ready 1",
    ] {
        assert!(
            metrics.contains(expected),
            "/metrics lacks `{expected}`:\n{metrics}"
        );
    }
    assert_eq!(get(addr, "/nowhere").0, 404);
    // HTTP/1.1 as scrapers speak it: two requests on one connection, the second a HEAD.
    let mut connection = std::net::TcpStream::connect(addr).unwrap();
    write!(connection, "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while !first.ends_with(b"ok\n") {
        assert_eq!(
            connection.read(&mut byte).unwrap(),
            1,
            "the connection closed early"
        );
        first.push(byte[0]);
    }
    write!(
        connection,
        "HEAD /readyz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut second = String::new();
    connection.read_to_string(&mut second).unwrap();
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(
        second.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {second}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_with_the_reason_until_a_plugin_is_loaded() {
    let env = TestEnv::start(Options::new(&[]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0")).await;
    let addr = env.host().http_addr().expect("HTTP is enabled");
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no plugin is loaded"), "{body}");
    assert_eq!(get(addr, "/healthz").0, 200, "alive, though not ready");
    env.install_plugin("insights", "insights");
    env.host().reload_plugins().await.unwrap();
    assert_eq!(get(addr, "/readyz").0, 200);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_streams_dead_letters_requests_and_plugins() {
    let env = TestEnv::start(Options::new(&["insights", "scripted"]).retries(5, 60_000)).await;
    some_traffic(
        &env,
        Request::ProfilePicture {
            user_id: 1,
            image_url: "u".into(),
        },
    )
    .await;

    let (report, healthy) = env.status();
    assert!(healthy, "{report}");
    let insights = report["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "ml-insights-results")
        .unwrap();
    assert_eq!(insights["length"], 2);
    assert_eq!(insights["pending"], 0);
    assert_eq!(insights["lag"], 0);
    assert_eq!(
        insights["consumers"][0]["name"],
        env.config.consumer_name.as_str()
    );
    assert_eq!(report["dead_letters"]["by_kind"]["malformed"], 1);
    assert_eq!(report["requests"]["PENDING"], 1);
    // The request went out; nothing on the ML side consumes its stream yet.
    let requests_out = |report: &serde_json::Value| {
        report["request_streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == "profile-picture-processing")
            .cloned()
            .unwrap()
    };
    let out = requests_out(&report);
    assert_eq!(out["length"], 1, "{out}");
    assert_eq!(out["groups"], serde_json::json!([]), "{out}");
    let mut redis = env.redis.clone();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(env.key("profile-picture-processing"))
        .arg("ml-side")
        .arg("0")
        .query_async(&mut redis)
        .await
        .unwrap();
    let out = requests_out(&env.status().0);
    assert_eq!(
        out["groups"],
        serde_json::json!([{"name": "ml-side", "lag": 1, "pending": 0, "consumers": 0}]),
        "{out}"
    );
    let table = String::from_utf8(env.command(&["status"]).stdout).unwrap();
    assert!(table.contains("ml-side (1/0/0)"), "{table}");
    let plugins = report["hosts"][0]["plugins"].as_array().unwrap();
    let insights_plugin = plugins.iter().find(|p| p["name"] == "insights").unwrap();
    assert_eq!(insights_plugin["version"], "0.1.0");
    assert_eq!(insights_plugin["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        insights_plugin["streams"],
        serde_json::json!(["ml-insights-results"])
    );
    assert_eq!(
        insights_plugin["grants"],
        serde_json::json!({
            "tables": ["media_ai_insights"],
            "update_columns": {"ml_requests": ["results_received"]},
            "emit": [],
        })
    );
    let table = String::from_utf8(env.command(&["status"]).stdout).unwrap();
    assert!(
        table.contains("grants: tables=media_ai_insights update=ml_requests(results_received)"),
        "{table}"
    );

    // An entry waiting for a retry (reclaimed only after a minute here) makes the stream's
    // oldest pending entry age grow: unhealthy past the threshold.
    env.publish("scripted", &[("action", "retry"), ("note", "later")])
        .await;
    eventually("the retry to be pending", || async {
        (env.pending("scripted").await == 1).then_some(())
    })
    .await;
    let output = env.command(&["status", "--max-pending-age", "0"]);
    assert_eq!(output.status.code(), Some(1));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("UNHEALTHY") && table.contains("oldest pending entry"),
        "{table}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_while_a_stream_lacks_its_plugin() {
    let env = TestEnv::start(
        Options::new(&["insights", "scripted"]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0"),
    )
    .await;
    let addr = env.host().http_addr().expect("HTTP is enabled");
    assert_eq!(get(addr, "/readyz").0, 200);

    // A plugin file that does not load (a refused deploy): every stream is still served, so the
    // host stays ready; the failure shows in the metrics (and `status`), not in readiness.
    std::fs::write(env.plugins_dir.join("broken.wasm"), b"\0asm not really").unwrap();
    env.host().reload_plugins().await.unwrap();
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 200, "a refused file pages no one: {body}");
    let (_, metrics) = get(addr, "/metrics");
    assert!(
        metrics.contains("kaleidoscope_plugin_load_failures_total{file=\"broken.wasm\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kaleidoscope_plugin_files_failing 1"),
        "{metrics}"
    );
    std::fs::remove_file(env.plugins_dir.join("broken.wasm")).unwrap();
    env.host().reload_plugins().await.unwrap();
    assert_eq!(get(addr, "/readyz").0, 200);

    // A consumed stream whose plugin goes away: its entries wait, the host says so.
    std::fs::remove_file(env.plugins_dir.join("scripted.wasm")).unwrap();
    env.host().reload_plugins().await.unwrap();
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("stream scripted has no loaded plugin"),
        "{body}"
    );
    // The plugin served two streams; both wait.
    assert_eq!(env.host().state().not_ready().len(), 2);
    // The unserved stream keeps its series, says it is unserved, and the alert on it fires.
    let (_, metrics) = get(addr, "/metrics");
    for series in [
        "kaleidoscope_stream_unserved{stream=\"scripted\"} 1",
        "kaleidoscope_stream_unserved{stream=\"ml-insights-results\"} 0",
        "kaleidoscope_stream_lag{stream=\"scripted\"} ",
        "kaleidoscope_stream_pending{stream=\"scripted\"} ",
        "kaleidoscope_stream_oldest_pending_age_seconds{stream=\"scripted\"} ",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    assert_eq!(
        firing("KaleidoscopeStreamUnserved", &metrics),
        ["stream=\"scripted\"", "stream=\"scripted-2\""]
    );
    env.install_plugin("scripted", "scripted");
    env.host().reload_plugins().await.unwrap();
    assert_eq!(get(addr, "/readyz").0, 200);
    let (_, metrics) = get(addr, "/metrics");
    assert!(firing("KaleidoscopeStreamUnserved", &metrics).is_empty());
    env.finish().await;
}

/// The label sets for which the alert `name` of `ops/prometheus/alerts.yml` fires on the
/// `exposition`, for rules of the form `max by (<labels>) (<metric>) > <threshold>`: enough to
/// prove a rule and the series it reads agree (the `for:` duration aside).
fn firing(name: &str, exposition: &str) -> Vec<String> {
    let rules =
        std::fs::read_to_string(crate::support::workspace().join("ops/prometheus/alerts.yml"))
            .expect("read the alert rules");
    let expr = rules
        .split("- alert: ")
        .find(|rule| rule.starts_with(name))
        .and_then(|rule| rule.lines().find_map(|l| l.trim().strip_prefix("expr: ")))
        .unwrap_or_else(|| panic!("no rule {name}"));
    let (query, threshold) = expr.rsplit_once(" > ").expect("a threshold");
    let threshold: f64 = threshold.trim().parse().expect("a number");
    let metric = query
        .rsplit_once('(')
        .and_then(|(_, inner)| inner.split(')').next())
        .expect("a metric in the query");
    let mut firing: Vec<String> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix(metric)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            (value.trim().parse::<f64>().ok()? > threshold).then(|| labels.to_string())
        })
        .collect();
    firing.sort();
    firing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_host_is_seen_as_stale_and_its_lag_against_a_threshold() {
    let env =
        TestEnv::prepare(Options::new(&["insights"]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0"))
            .await;
    let log = env.plugins_dir.with_extension("paused.log");
    let mut host = HostProcess::spawn(
        env.binary(&["run"])
            .env("KALEIDOSCOPE_CONSUMER_NAME", "paused-host")
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let paused = |report: &serde_json::Value| {
        report["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["consumer"] == "paused-host")
            .cloned()
    };
    crate::support::eventually("the host's first heartbeat", || async {
        paused(&env.status().0).map(|_| ())
    })
    .await;
    crate::support::signal(&host, "STOP");
    // The entry it was working on when it froze: delivered to it, never acknowledged.
    let mut redis = env.redis.clone();
    env.publish("ml-insights-results", &[("mediaId", "1"), ("caption", "x")])
        .await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&env.config.consumer_group)
        .arg("paused-host")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(env.key("ml-insights-results"))
        .arg(">")
        .query_async(&mut redis)
        .await
        .unwrap();
    // A stream with a group but no plugin: its entries wait undelivered (its lag).
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(env.key("ml-error-results"))
        .arg(&env.config.consumer_group)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await
        .unwrap();
    for note in ["1", "2", "3"] {
        env.publish("ml-error-results", &[("error", note)]).await;
    }
    // No timing assertion: the report is awaited until it says so (25 s without a heartbeat).
    let report = crate::support::eventually("status to see the paused host as stale", || async {
        let (report, healthy) = env.status();
        let stale = report["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p.as_str().is_some_and(|p| p.contains("stalled or paused")));
        (stale && !healthy).then_some(report)
    })
    .await;
    assert!(
        paused(&report).unwrap()["heartbeat_age_ms"]
            .as_u64()
            .unwrap()
            > 25_000
    );
    let output = env.command(&["status", "--max-lag", "2"]);
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("3 entries wait undelivered (threshold 2)"),
        "{text}"
    );
    // What Prometheus sees from the other hosts: the entry the paused one holds gets older.
    let env = env.with_host().await;
    let addr = env.host().http_addr().expect("HTTP is enabled");
    eventually("the stuck entry's age in /metrics", || async move {
        let (_, metrics) = get(addr, "/metrics");
        let age: f64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "kaleidoscope_stream_oldest_pending_age_seconds{stream=\"ml-insights-results\"} ",
                )
            })?
            .parse()
            .ok()?;
        (age >= 1.0).then_some(())
    })
    .await;
    crate::support::signal(&host, "CONT");
    crate::support::eventually("the host to be fresh and ready again", || async {
        let host = paused(&env.status().0)?;
        let age = host["heartbeat_age_ms"].as_u64()?;
        (age < 25_000 && host["ready"] == true).then_some(())
    })
    .await;
    // The reads it had in flight timed out during its own pause: that is not a Redis outage.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the host itself did not run for"), "{text}");
    assert!(!text.contains("Redis is unavailable"), "{text}");
    crate::support::signal(&host, "TERM");
    assert!(crate::support::await_exit(&mut host).await.success());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_section_for_no_loaded_plugin_is_reported_not_fatal() {
    let env = TestEnv::start(
        Options::new(&["insights"]).plugin_setting("insihgts", "tables = [\"media_ai_insights\"]"),
    )
    .await;
    let (report, healthy) = env.status();
    let unmatched = &report["hosts"][0]["unmatched_plugin_sections"];
    assert!(
        unmatched
            .as_array()
            .is_some_and(|names| names.iter().any(|n| n == "insihgts")),
        "{report}"
    );
    assert!(
        !unmatched
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "insights"),
        "{report}"
    );
    assert!(healthy, "a note, not a failure: {report}");
    let table = String::from_utf8_lossy(&env.command(&["status"]).stdout).into_owned();
    assert!(
        table.contains("[plugins.insihgts] in its configuration names no loaded plugin"),
        "{table}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_log_has_no_colour_codes() {
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    let log = env.plugins_dir.with_extension("plain.log");
    let mut host = HostProcess::spawn(
        env.binary(&["run"])
            .env_remove("NO_COLOR")
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    crate::support::eventually("the host to log its start", || async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|text| text.contains("loaded plugin"))
    })
    .await;
    crate::support::signal(&host, "TERM");
    assert!(crate::support::await_exit(&mut host).await.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(" INFO "), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_flat_with_the_spans_fields_and_typed_values() {
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    env.seed_media(1, &[1]).await;
    let log = env.plugins_dir.with_extension("json.log");
    let mut host = HostProcess::spawn(
        env.binary(&["run"])
            .env("KALEIDOSCOPE_LOG_FORMAT", "json")
            .env("RUST_LOG", "kaleidoscope=debug")
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let id = env
        .publish(
            "ml-insights-results",
            &[
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "x"),
                ("correlationId", "c-json-7"),
            ],
        )
        .await;
    env.await_processed("ml-insights-results", &id).await;
    crate::support::signal(&host, "TERM");
    assert!(crate::support::await_exit(&mut host).await.success());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let line = |message: &str| {
        lines
            .iter()
            .find(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no `{message}` line in:\n{text}"))
    };
    // Flat: the batch and entry spans' fields are top-level fields of the line.
    let processed = line("processed");
    assert_eq!(processed["plugin"], "insights", "{processed}");
    assert_eq!(processed["version"], "0.1.0", "{processed}");
    assert_eq!(processed["stream"], "ml-insights-results", "{processed}");
    assert_eq!(processed["entry"], id.as_str(), "{processed}");
    assert_eq!(processed["correlation_id"], "c-json-7", "{processed}");
    assert_eq!(processed["level"], "DEBUG", "{processed}");
    assert_eq!(
        processed["spans"],
        serde_json::json!(["batch", "entry"]),
        "{processed}"
    );
    // Lists are lists, numbers are numbers.
    let loaded = line("loaded plugin insights@0.1.0");
    assert_eq!(loaded["plugin"], "insights", "{loaded}");
    assert_eq!(loaded["version"], "0.1.0", "{loaded}");
    assert_eq!(
        loaded["streams"],
        serde_json::json!(["ml-insights-results"]),
        "{loaded}"
    );
    assert!(loaded["load_ms"].is_u64(), "{loaded}");
    let serving = line("host is serving");
    assert!(serving["streams"].is_array(), "{serving}");
    let shutting_down = line("shutting down");
    assert!(shutting_down["timeout_ms"].is_u64(), "{shutting_down}");
    let _ = std::fs::remove_file(log);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_logged_on_one_line_with_its_panic_message_first() {
    let env = TestEnv::prepare(Options::new(&["scripted"]).retries(1, 60_000)).await;
    let log = env.plugins_dir.with_extension("trap.log");
    let mut host = HostProcess::spawn(
        env.binary(&["run"])
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let id = env
        .publish("scripted", &[("action", "panic"), ("note", "kaboom")])
        .await;
    env.await_dead_letter("scripted", &id).await;
    crate::support::signal(&host, "TERM");
    assert!(crate::support::await_exit(&mut host).await.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let about_it: Vec<&str> = text.lines().filter(|l| l.contains("kaboom")).collect();
    assert_eq!(about_it.len(), 1, "one line for the trap:\n{text}");
    let line = about_it[0];
    let (before, after) = line
        .split_once("plugin trapped: panicked at ")
        .unwrap_or_else(|| panic!("the panic message comes first in the reason: {line}"));
    assert!(before.contains("dead-lettered"), "{line}");
    assert!(after.contains("scripted panic: kaboom"), "{line}");
    assert!(after.contains("in behaviours::perform < handle"), "{line}");
    // Nothing of a multi-line backtrace or its hints anywhere in the log.
    assert!(
        !text.contains("stack backtrace")
            && !text.contains("RUST_BACKTRACE")
            && !text.contains("\n    at "),
        "{text}"
    );
    let _ = std::fs::remove_file(log);
    env.finish().await;
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

/// The warning about a `[plugins.<name>]` section that names no loaded plugin is said when the
/// section shows up, not again at every rescan: a host that reloads every few seconds must not
/// fill its log with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmatched_configuration_section_is_warned_about_once() {
    let env = TestEnv::prepare(
        Options::new(&["insights"]).plugin_setting("insihgts", "tables = [\"media_ai_insights\"]"),
    )
    .await;
    let mut host = env.spawn_host("warner");
    let log = env.host_log("warner");
    let count = |text: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(text)
            .count()
    };
    let warning = "[plugins.insihgts] names no loaded plugin";
    eventually("the warning", || async {
        (count(warning) == 1).then_some(())
    })
    .await;
    // Two reloads: a plugin added, then removed.
    env.install_plugin("scripted", "scripted");
    eventually("the new plugin to load", || async {
        (count("loaded plugin scripted") == 1).then_some(())
    })
    .await;
    std::fs::remove_file(env.plugins_dir.join("scripted.wasm")).unwrap();
    eventually("the plugin to be unloaded", || async {
        (count("unloaded plugin scripted") == 1).then_some(())
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(count(warning), 1, "said once, not at every reload: {text}");
    // The section of the plugin that went away is news, and said (once more than at start).
    assert_eq!(
        count("[plugins.scripted] names no loaded plugin"),
        2,
        "{text}"
    );
    crate::support::signal(&host, "TERM");
    assert!(crate::support::await_exit(&mut host).await.success());
    env.finish().await;
}

/// What would stop the next start is reported while the host runs on: a failing operator
/// migration (placed in its file: line and column, not PostgreSQL's source line) and a
/// configuration file that no longer parses each make a readiness reason and set
/// `kaleidoscope_restart_would_fail`, whose alert fires; the operator tools still run with the
/// broken file; mending both makes the host ready again. Meanwhile the stream is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_or_a_broken_configuration_is_reported_while_serving() {
    let env = TestEnv::start(
        Options::new(&["scripted"])
            .operator_migrations()
            .set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0"),
    )
    .await;
    let addr = env.host().http_addr().expect("HTTP is enabled");
    let migration = env.migrations_dir().join("0001_broken.sql");
    std::fs::write(
        &migration,
        "CREATE TABLE fine (id INT);\nALTER TABLE fine ADDD COLUMN x INT;\n",
    )
    .unwrap();
    let reason = eventually("the failing migration to be reported", || async {
        let (status, body) = get(addr, "/readyz");
        (status == 503 && body.contains("0001_broken.sql")).then_some(body)
    })
    .await;
    assert!(reason.contains("syntax error"), "{reason}");
    assert!(reason.contains("line 2, column 18 of the file"), "{reason}");
    assert!(reason.contains("next start"), "{reason}");
    let original = std::fs::read_to_string(&env.config_file).unwrap();
    std::fs::write(&env.config_file, format!("{original}\n[plugins.scripted\n")).unwrap();
    let (_, metrics) = eventually("the broken configuration to be reported", || async {
        let (_, metrics) = get(addr, "/metrics");
        metrics
            .contains("kaleidoscope_restart_would_fail{cause=\"configuration\"} 1")
            .then_some(((), metrics))
    })
    .await;
    assert!(
        metrics.contains("kaleidoscope_restart_would_fail{cause=\"migration\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        firing("KaleidoscopeRestartWouldFail", &metrics),
        vec!["cause=\"configuration\"", "cause=\"migration\""]
    );
    // Still serving.
    let entry = env.publish("scripted", &[("action", "ok")]).await;
    env.await_processed("scripted", &entry).await;

    // The tools: status and dlq go on without the file, saying so; config check says what is
    // wrong and fails.
    let status = env.command(&["status"]);
    let said = String::from_utf8_lossy(&status.stdout).into_owned()
        + &String::from_utf8_lossy(&status.stderr);
    assert!(said.contains("going on without the file"), "{said}");
    assert!(said.contains("next start"), "{said}");
    let dlq = env.command(&["dlq", "list"]);
    assert!(dlq.status.success(), "{dlq:?}");
    let check = env.command(&["config", "check"]);
    assert!(!check.status.success());
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        said.contains(&env.config_file.display().to_string()),
        "{said}"
    );

    // Mended: ready again.
    std::fs::write(&env.config_file, original).unwrap();
    std::fs::write(
        env.migrations_dir().join("0001_broken.sql"),
        "CREATE TABLE fine (id INT);\n",
    )
    .unwrap();
    eventually("the host to be ready again", || async {
        let (status, _) = get(addr, "/readyz");
        (status == 200).then_some(())
    })
    .await;
    env.finish().await;
}
