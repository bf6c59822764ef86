//! The deployment files (Dockerfile, compose.yaml, the Kubernetes and systemd examples) and the
//! operations files (Prometheus alert rules, Grafana dashboard) kept honest against the code:
//! container runtimes cannot run on these machines, so every variable they set must be a real
//! setting, every metric they use one the host exports, and the paths, ports and probes those
//! the host and the build really use.

use crate::support::{Options, TestEnv, workspace};
use kaleidoscope::config::SETTINGS;
use std::collections::BTreeSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Words of `text` that look like `prefix…` names (letters, digits, `_`).
fn names_with_prefix(text: &str, prefixes: &[&str]) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| prefixes.iter().any(|p| word.starts_with(p)))
        .map(str::to_string)
        .collect()
}

const DEPLOYMENT_FILES: [&str; 6] = [
    "Dockerfile",
    "compose.yaml",
    "ops/compose/cluster.yaml",
    "ops/kubernetes/kaleidoscope.yaml",
    "ops/kubernetes/redis-cluster.patch.yaml",
    "ops/systemd/kaleidoscope.service",
];

#[test]
fn every_variable_the_deployment_files_set_is_a_setting() {
    let mut known: BTreeSet<&str> = SETTINGS.iter().map(|s| s.env).collect();
    // The command line's own: where the configuration file is.
    assert!(read("host/src/cli/args.rs").contains("env = \"KALEIDOSCOPE_CONFIG\""));
    known.insert("KALEIDOSCOPE_CONFIG");
    for file in DEPLOYMENT_FILES {
        let text = read(file);
        let variables =
            names_with_prefix(&text, &["KALEIDOSCOPE_", "REDIS_", "DATABASE_URL", "ML_"]);
        assert!(!variables.is_empty(), "{file} sets no variable");
        for variable in variables {
            assert!(
                known.contains(variable.as_str()),
                "{file} uses {variable}, which is not a setting of the host"
            );
        }
    }
}

#[test]
fn ports_probes_paths_and_grace_match_the_host() {
    let docker = read("Dockerfile");
    let kubernetes = read("ops/kubernetes/kaleidoscope.yaml");
    // The build's outputs: the binary and the shipped plugins.
    assert!(docker.contains("/src/target/release/kaleidoscope"));
    assert!(docker.contains("/src/target/plugins"));
    assert!(read("scripts/build-plugins").contains("--rust-only"));
    // One port everywhere: the one KALEIDOSCOPE_HTTP_ADDR binds.
    for (file, text) in [
        ("Dockerfile", &docker),
        ("compose.yaml", &read("compose.yaml")),
        ("ops/kubernetes/kaleidoscope.yaml", &kubernetes),
    ] {
        assert!(text.contains("9464"), "{file} does not use port 9464");
    }
    assert!(docker.contains("KALEIDOSCOPE_HTTP_ADDR=0.0.0.0:9464"));
    assert!(kubernetes.contains("value: 0.0.0.0:9464"));
    // The probes are the endpoints the host serves.
    let http = read("host/src/http.rs");
    for path in ["/healthz", "/readyz"] {
        assert!(kubernetes.contains(&format!("path: {path}")), "{path}");
        assert!(
            http.contains(&format!("\"{path}\"")),
            "the host serves no {path}"
        );
    }
    // The plugins the init container copies are where the image puts them, refreshed at every
    // start (a new image updates them) into a scratch volume, never a per-pod disk that would let
    // pods drift: deployed plugins come from the plugin store.
    assert!(kubernetes.contains("cp /opt/kaleidoscope/plugins/*.wasm /plugins/"));
    assert!(!kubernetes.contains("cp -n"));
    assert!(kubernetes.contains("{name: plugins, emptyDir: {}}"));
    assert!(!kubernetes.contains("volumeClaimTemplates"));
    assert!(docker.contains("KALEIDOSCOPE_PLUGINS_DIR=/opt/kaleidoscope/plugins"));
    // The host's user can write its plugins directory (the store's plugins go there).
    assert!(docker.contains("--chown=kaleidoscope:kaleidoscope /src/target/plugins"));
    // The operator's configuration file and migrations are set wherever the host is deployed.
    for (file, text) in [
        ("Dockerfile", &docker),
        ("ops/kubernetes/kaleidoscope.yaml", &kubernetes),
        (
            "ops/systemd/kaleidoscope.service",
            &read("ops/systemd/kaleidoscope.service"),
        ),
    ] {
        for setting in ["KALEIDOSCOPE_CONFIG", "KALEIDOSCOPE_MIGRATIONS_DIR"] {
            assert!(text.contains(setting), "{file} does not set {setting}");
        }
    }
    // Termination grace longer than the shutdown timeout the manifest sets.
    let number_after = |text: &str, key: &str| -> u64 {
        let start = text.find(key).unwrap_or_else(|| panic!("no {key}")) + key.len();
        text[start..]
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {key}"))
    };
    let grace = number_after(&kubernetes, "terminationGracePeriodSeconds:");
    let shutdown_ms = number_after(&kubernetes, "KALEIDOSCOPE_SHUTDOWN_TIMEOUT_MS");
    assert!(
        grace * 1000 > shutdown_ms,
        "grace {grace}s, shutdown {shutdown_ms}ms"
    );
    // The consumer name is stable per pod: a StatefulSet pod's name.
    assert!(kubernetes.contains("kind: StatefulSet"));
    assert!(kubernetes.contains("fieldPath: metadata.name"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported() {
    let env =
        TestEnv::start(Options::new(&["insights"]).set("KALEIDOSCOPE_HTTP_ADDR", "127.0.0.1:0"))
            .await;
    let addr = env.host().http_addr().expect("HTTP is enabled");
    // An ML service's group on a request stream, as in production (its lag is a series).
    let mut redis = env.redis.clone();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(env.key("post-image-processing"))
        .arg("ml-side")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await
        .unwrap();
    let exposition = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let alerts = read("ops/prometheus/alerts.yml");
    let dashboard = read("ops/grafana/kaleidoscope.json");
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()));
    for (file, text) in [
        ("ops/prometheus/alerts.yml", alerts.as_str()),
        ("ops/grafana/kaleidoscope.json", dashboard.as_str()),
    ] {
        let used = names_with_prefix(text, &["kaleidoscope_", "process_"]);
        assert!(!used.is_empty(), "{file} uses no metric");
        for metric in used {
            // Histograms are used through their series.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| metric.strip_suffix(suffix))
                .filter(|base| exported.contains(*base))
                .unwrap_or(&metric);
            assert!(
                exported.contains(family),
                "{file} uses {metric}, which the host does not export"
            );
        }
    }
    for alert in [
        "KaleidoscopeStuckConsumer",
        "KaleidoscopeStreamUnserved",
        "KaleidoscopeRestartWouldFail",
        "KaleidoscopeRolloutRolledBack",
        "KaleidoscopeReprocessStopped",
        "KaleidoscopeDeadLettersRising",
        "KaleidoscopePluginLoadFailed",
        "KaleidoscopeNotReady",
        "KaleidoscopeHeartbeatStale",
        "KaleidoscopeRequestsNotConsumed",
    ] {
        assert!(alerts.contains(&format!("alert: {alert}")), "{alert}");
        assert!(
            read("README.md").contains(alert),
            "README's Operations section does not explain {alert}"
        );
    }
    env.finish().await;
}

#[test]
fn the_cluster_variant_seeds_its_hosts_with_nodes_it_runs() {
    let compose = read("ops/compose/cluster.yaml");
    let seeds: Vec<&str> = compose
        .lines()
        .filter_map(|line| line.trim().strip_prefix("REDIS_CLUSTER_NODES:"))
        .collect();
    assert_eq!(seeds.len(), 2, "both hosts name their seed nodes");
    for seed in seeds.iter().flat_map(|s| s.trim().split(',')) {
        let (host, port) = seed.split_once(':').expect("host:port");
        assert_eq!(port, "6379", "{seed}");
        assert!(
            compose.contains(&format!("  {host}: {{<<: *redis-node, hostname: {host}}}")),
            "{seed} is not a node of the cluster variant"
        );
    }
    assert!(compose.contains("--cluster-enabled yes"));
    assert!(compose.contains("--cluster-replicas 1"));
    assert!(
        !compose.contains("REDIS_URL"),
        "a cluster is named by its nodes"
    );
}
