//! The fleet's plugin store: `plugin deploy` reaches every host whatever its own plugins
//! directory holds, a host started later gets the deployed plugins at start, a refused deploy
//! changes nothing, and who serves a stream two plugins claim is never decided by file order.

use crate::support::{Options, TestEnv, eventually};
use serde_json::Value;
use std::path::Path;

/// The plugin `name` as host `consumer` reports it in `status`: (version, sha256).
fn reported(report: &Value, consumer: &str, name: &str) -> Option<(String, String)> {
    let host = report["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["consumer"] == consumer)?;
    let plugin = host["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?;
    Some((
        plugin["version"].as_str()?.to_string(),
        plugin["sha256"].as_str()?.to_string(),
    ))
}

/// Whether host `consumer` reports itself ready.
fn ready(report: &Value, consumer: &str) -> bool {
    report["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|h| h["consumer"] == consumer && h["ready"] == true)
}

/// Two hosts with plugins directories of their own: a deploy reaches both (an upgrade built
/// under another file name, `insights-next.wasm`, replaces the plugin its manifest names); a
/// third host started later loads it at start; a deploy they refuse is undone, and both stay
/// ready, serving what they served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_reaches_every_host_and_a_refused_one_changes_nothing() {
    let env = TestEnv::prepare(Options::new(&["insights", "slow"])).await;
    let alpha_dir = env.directory_of("alpha", &["insights", "slow"]);
    // Beta's directory holds another build of insights: the fleet has drifted, and status says so.
    let beta_dir = env.directory_of("beta", &["slow"]);
    std::fs::copy(
        crate::support::plugin_file("insights-next"),
        beta_dir.join("insights.wasm"),
    )
    .expect("copy a plugin");
    let _alpha = env.spawn_on("alpha", &alpha_dir);
    let _beta = env.spawn_on("beta", &beta_dir);
    let report = eventually("alpha and beta to be ready", || async {
        let (report, _) = env.status();
        (ready(&report, "alpha") && ready(&report, "beta")).then_some(report)
    })
    .await;
    let drift = report["problems"].to_string();
    assert!(
        drift.contains("plugin insights: the hosts run different builds"),
        "{drift}"
    );

    let (ok, said) = env.deploy(&crate::support::plugin_file("insights-next"));
    assert!(ok, "{said}");
    assert!(said.contains("alpha: loaded insights 0.2.0"), "{said}");
    assert!(said.contains("beta: loaded insights 0.2.0"), "{said}");
    let (report, healthy) = env.status();
    let deployed = reported(&report, "alpha", "insights").expect("alpha runs insights");
    assert_eq!(deployed.0, "0.2.0");
    assert_eq!(
        reported(&report, "beta", "insights"),
        Some(deployed.clone())
    );
    assert!(healthy, "one build everywhere: {}", report["problems"]);
    assert_eq!(report["deployed"][0]["name"], "insights", "{report}");
    assert_eq!(report["deployed"][0]["sha256"], deployed.1.as_str());
    for dir in [&alpha_dir, &beta_dir] {
        assert!(dir.join("insights.wasm").exists());
        assert!(
            !dir.join("insights-next.wasm").exists(),
            "installed under the plugin's name, not the build's file name"
        );
    }

    // A host started later, with nothing in its directory, gets it at start.
    let gamma_dir = env.directory_of("gamma", &[]);
    let _gamma = env.spawn_on("gamma", &gamma_dir);
    let gamma = eventually("gamma to report insights", || async {
        reported(&env.status().0, "gamma", "insights")
    })
    .await;
    assert_eq!(gamma, deployed, "the same build as the rest of the fleet");

    // `rival` claims the stream `slow` serves on alpha and beta: they refuse it, and the deploy
    // is undone. Gamma, which has no `slow`, loaded it and unloads it again — and stays ready:
    // a stream whose plugin the store took back is not a stream that lost its plugin.
    let (ok, said) = env.deploy(&crate::support::plugin_file("rival"));
    assert!(!ok, "{said}");
    assert!(said.contains("alpha: failed"), "{said}");
    assert!(said.contains("already handled"), "{said}");
    assert!(
        said.contains("refused: plugin rival was taken out of the plugin store again"),
        "{said}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM plugin_store WHERE name = 'rival'")
            .await,
        0
    );
    let report = eventually("alpha and beta ready again without rival", || async {
        let (report, _) = env.status();
        let settled = ["alpha", "beta", "gamma"]
            .iter()
            .all(|host| ready(&report, host) && reported(&report, host, "rival").is_none());
        settled.then_some(report)
    })
    .await;
    assert!(reported(&report, "alpha", "slow").is_some(), "{report}");
    let entry = env
        .publish(
            "mock-slow",
            &[("millis", "0"), ("note", "after the refusal")],
        )
        .await;
    env.await_processed("mock-slow", &entry).await;
    let handler: String =
        sqlx::query_scalar("SELECT plugin FROM processed_entries WHERE entry_id = $1")
            .bind(&entry)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        handler, "slow",
        "the plugin that served the stream still does"
    );
    env.finish().await;
}

/// The failed loads host `consumer` reports: (file name, reason).
fn failed_loads(report: &Value, consumer: &str) -> Vec<(String, String)> {
    report["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["consumer"] == consumer)
        .flat_map(|h| h["failed_loads"].as_array().cloned().unwrap_or_default())
        .map(|f| {
            let file = f["file"].as_str().unwrap_or_default();
            let name = Path::new(file).file_name().unwrap_or_default();
            (
                name.to_string_lossy().into_owned(),
                f["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Two plugin files claiming one stream, neither serving it: neither gets it, each refused
/// naming the other, so a restart can never hand a stream to the plugin that was refused it
/// before. Deploying one through the plugin store decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contested_stream_is_decided_by_the_store_never_by_file_order() {
    let env = TestEnv::prepare(Options::new(&["slow"])).await;
    let mut first = env.spawn_host("first");
    // `rival` arrives while `slow` serves: refused, `slow` keeps the stream.
    eventually("slow to serve", || async {
        reported(&env.status().0, "first", "slow")
    })
    .await;
    env.install_plugin("rival", "rival");
    eventually("rival to be refused", || async {
        let failed = failed_loads(&env.status().0, "first");
        failed
            .iter()
            .any(|(file, reason)| file == "rival.wasm" && reason.contains("already handled"))
            .then_some(())
    })
    .await;
    // A restart: both files are new to the host, and `rival` sorts first.
    crate::support::signal(&first, "TERM");
    crate::support::await_exit(&mut first).await;
    let _second = env.spawn_host("second");
    let report = eventually("the restarted host to report", || async {
        let (report, _) = env.status();
        (failed_loads(&report, "second").len() == 2).then_some(report)
    })
    .await;
    assert_eq!(reported(&report, "second", "rival"), None, "{report}");
    assert_eq!(reported(&report, "second", "slow"), None, "{report}");
    for (file, reason) in failed_loads(&report, "second") {
        assert!(
            reason.contains("\"rival\"") && reason.contains("\"slow\""),
            "{file}: {reason}"
        );
    }
    // The operator decides with a deploy: the store's build gets the stream.
    let (ok, said) = env.deploy(&crate::support::plugin_file("slow"));
    assert!(ok, "{said}");
    assert!(said.contains("second: loaded slow"), "{said}");
    let entry = env
        .publish("mock-slow", &[("millis", "0"), ("note", "decided")])
        .await;
    env.await_processed("mock-slow", &entry).await;
    let failed = failed_loads(&env.status().0, "second");
    assert!(
        failed
            .iter()
            .any(|(file, reason)| file == "rival.wasm" && reason.contains("already handled")),
        "{failed:?}"
    );
    env.finish().await;
}

/// A plugin taken out of the store is removed from every host's directory (the file the store
/// wrote, nothing else) and stops being served, the host staying ready: its stream is no longer
/// consumed on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_plugin_leaves_every_host() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    let (ok, said) = env.deploy(&crate::support::plugin_file("scripted"));
    assert!(ok, "{said}");
    assert!(env.serving(crate::support::SCRIPTED).is_some());
    let removed = env.command(&["plugin", "remove", "scripted"]);
    assert!(removed.status.success(), "{removed:?}");
    eventually("scripted to be unloaded", || async {
        env.serving(crate::support::SCRIPTED)
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!env.plugins_dir.join("scripted.wasm").exists());
    let state = env.host().state();
    assert!(
        state.not_ready().is_empty(),
        "a plugin removed on purpose pages no one: {:?}",
        state.not_ready()
    );
    assert!(
        env.serving("ml-insights-results").is_some(),
        "the rest stays"
    );
    let again = env.command(&["plugin", "remove", "scripted"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("has no plugin \"scripted\""),
        "{again:?}"
    );
    env.finish().await;
}
