//! The host on a Redis Cluster (3 primaries + 3 replicas of the test's own, see
//! `redis_cluster`): the core protocol, two hosts and a SIGKILL, a primary's failover under load,
//! and the tools.

use crate::redis_cluster::RedisCluster;
use crate::support::{Options, TestEnv, await_exit, detection, eventually, signal};
use std::collections::BTreeSet;

const DETECTION: &str = "face-detection-results";
const ERRORS: &str = "ml-error-results";
/// Every shipped plugin: every inbound stream consumed.
const ALL_PLUGINS: [&str; 5] = [
    "face-detection",
    "face-recognition",
    "insights",
    "ml-errors",
    "user-face-embeddings",
];

/// An error result in the seed's shape.
fn error(n: i64) -> Vec<(String, String)> {
    vec![
        ("correlationId".into(), format!("req-{n}")),
        ("error".into(), format!("model crashed {n}")),
        ("status".into(), "FAILED".into()),
    ]
}

/// A cluster of its own and an environment on it with the face-detection plugin (fast retries),
/// `count` media seeded, their detections made; the host started when `host` says so.
async fn detections_on_a_cluster(
    count: i64,
    host: bool,
) -> (RedisCluster, TestEnv, Vec<i64>, Vec<Vec<(String, String)>>) {
    let cluster = RedisCluster::start().await;
    let options = Options::new(&["face-detection"])
        .retries(5, 1500)
        .on_cluster(&cluster);
    let env = if host {
        TestEnv::start(options).await
    } else {
        TestEnv::prepare(options).await
    };
    let media: Vec<i64> = (1..=count).collect();
    env.seed_media(1, &media).await;
    let entries = media.iter().map(|m| detection(*m)).collect();
    (cluster, env, media, entries)
}

/// Waits until the detections of every one of `media` (all published) are processed, then
/// asserts their faces are stored exactly once, nothing is pending and nothing dead-lettered.
async fn await_every_detection_stored_once(env: &TestEnv, media: &[i64]) {
    eventually("every entry to be processed", || async {
        (env.ledger_count(DETECTION).await == media.len() as i64).then_some(())
    })
    .await;
    assert_faces_exactly_once(env, &media.iter().copied().collect()).await;
    env.await_no_pending(DETECTION).await;
    assert!(env.dead_letters().await.is_empty());
}

/// Asserts the faces of `media` are stored exactly once each: two per media, none written
/// twice, and no other media's.
async fn assert_faces_exactly_once(env: &TestEnv, media: &BTreeSet<i64>) {
    let stored: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT media_id, count(*) FROM media_detected_faces GROUP BY media_id ORDER BY media_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("faces per media");
    let wrong: Vec<&(i64, i64)> = stored.iter().filter(|(_, faces)| *faces != 2).collect();
    assert!(
        wrong.is_empty(),
        "media without exactly two faces: {wrong:?}"
    );
    let stored: BTreeSet<i64> = stored.into_iter().map(|(m, _)| m).collect();
    assert!(
        media.is_subset(&stored),
        "confirmed media not stored: {:?}",
        media.difference(&stored).take(20).collect::<Vec<_>>()
    );
    assert_eq!(
        env.rows_written_again("media_detected_faces").await,
        0,
        "no face was written by a second application of its entry (updated_at = created_at)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_consumes_every_stream_of_a_redis_cluster_exactly_once() {
    let cluster = RedisCluster::start().await;
    let env = TestEnv::start(Options::new(&ALL_PLUGINS).on_cluster(&cluster)).await;
    let streams: Vec<String> = env
        .host()
        .state()
        .registry
        .snapshot()
        .streams()
        .map(str::to_string)
        .collect();
    assert!(streams.len() >= 5, "every plugin's streams: {streams:?}");
    // The streams are spread over the cluster by their names: more than one node serves them.
    let mut nodes = BTreeSet::new();
    for stream in &streams {
        nodes.insert(cluster.primary_of(&env.key(stream)).await);
    }
    assert!(
        nodes.len() > 1,
        "the streams all sit on one node: {nodes:?}"
    );

    let media: Vec<i64> = (1..=1000).collect();
    env.seed_media(1, &media).await;
    let detections: Vec<_> = media.iter().map(|m| detection(*m)).collect();
    let errors: Vec<_> = (1..=500).map(error).collect();
    env.publish_many(DETECTION, &detections).await;
    env.publish_many(ERRORS, &errors).await;
    let bad = env
        .publish(DETECTION, &[("mediaId", "7"), ("faces", "not json")])
        .await;

    eventually("every detection and error to be processed", || async {
        (env.ledger_count(DETECTION).await == 1001 && env.ledger_count(ERRORS).await == 500)
            .then_some(())
    })
    .await;
    assert_faces_exactly_once(&env, &media.iter().copied().collect()).await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        500
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT correlation_id) FROM ml_processing_errors")
            .await,
        500
    );
    // The malformed entry went to the dead-letter stream (on its own node) with its reason.
    let letter = env.await_dead_letter(DETECTION, &bad).await;
    assert!(
        letter.get("error").is_some_and(|r| r.contains("faces")),
        "{letter:?}"
    );
    env.await_no_pending(DETECTION).await;
    env.await_no_pending(ERRORS).await;
    // Every inbound stream has the group, on whichever node holds it.
    for stream in &streams {
        let groups: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(env.key(stream))
            .query_async(&mut env.redis.clone())
            .await
            .unwrap_or_else(|e| panic!("XINFO GROUPS of {stream}: {e}"));
        assert_eq!(groups.len(), 1, "{stream} has the host's group");
    }

    // `status` reads the cluster: the host, and which node serves each stream.
    let (report, ok) = env.status();
    assert!(ok, "status against the cluster: {report:#}");
    let reported = report["streams"].as_array().expect("streams in the report");
    let detection_row = reported
        .iter()
        .find(|s| s["stream"] == DETECTION)
        .expect("the detection stream in the report");
    let node = cluster.primary_of(&env.key(DETECTION)).await;
    assert_eq!(
        detection_row["node"].as_str(),
        Some(format!("127.0.0.1:{node}").as_str()),
        "{detection_row:#}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_a_cluster_survive_a_sigkill_of_one() {
    const COUNT: i64 = 1500;
    let (_cluster, env, media, all) = detections_on_a_cluster(COUNT, false).await;
    let mut victim = env.spawn_host("host-a");
    let (first, rest) = all.split_at(500);
    env.publish_many(DETECTION, first).await;
    eventually("the first host to have processed some entries", || async {
        (env.ledger_count(DETECTION).await > 100).then_some(())
    })
    .await;
    // A second host joins under load; the first is killed while it holds entries.
    let mut survivor = env.spawn_host("host-b");
    crate::support::kill_while_it_holds_entries(&env, DETECTION, &mut victim, "host-a", rest).await;
    await_every_detection_stored_once(&env, &media).await;
    signal(&survivor, "TERM");
    assert!(await_exit(&mut survivor).await.success());
    env.finish().await;
}

/// Publishes `media`'s detections in one pipeline followed by `WAIT 1`: the media whose entries
/// at least one replica acknowledged (all of them), or none when Redis failed or no replica
/// answered in time (those entries may or may not survive a failover: the producer's concern).
async fn publish_confirmed(
    redis: &mut kaleidoscope::redis_connection::RedisConnection,
    key: &str,
    media: &[i64],
) -> Vec<i64> {
    let mut pipe = redis::pipe();
    for m in media {
        let cmd = pipe.cmd("XADD").arg(key).arg("*");
        for (k, v) in detection(*m) {
            cmd.arg(k).arg(v);
        }
        cmd.ignore();
    }
    pipe.cmd("WAIT").arg(1).arg(1000);
    match pipe.query_async::<(i64,)>(redis).await {
        Ok((replicas,)) if replicas >= 1 => media.to_vec(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failover_under_load_loses_and_doubles_no_confirmed_entry() {
    const COUNT: i64 = 2000;
    let (mut cluster, env, media, _) = detections_on_a_cluster(COUNT, false).await;
    let http = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("its address")
    };
    let mut host = env.spawn_with(
        "host-a",
        &env.plugins_dir,
        &[("KALEIDOSCOPE_HTTP_ADDR", &http.to_string())],
    );
    let key = env.key(DETECTION);
    let mut producer = env.redis.clone();
    let mut confirmed = BTreeSet::new();
    let mut chunks = media.chunks(50);
    for chunk in chunks.by_ref().take(10) {
        confirmed.extend(publish_confirmed(&mut producer, &key, chunk).await);
    }
    eventually("the host to have processed some entries", || async {
        (env.ledger_count(DETECTION).await > 100).then_some(())
    })
    .await;

    // The primary holding the stream dies with entries in flight; the producer keeps going
    // through the failover (what it publishes then is not confirmed: the promoted replica has no
    // replica of its own), until the dead node is back as the new primary's replica.
    let primary = cluster.primary_of(&key).await;
    cluster.kill(primary);
    for chunk in chunks.by_ref().take(5) {
        confirmed.extend(publish_confirmed(&mut producer, &key, chunk).await);
    }
    let new_primary = cluster.await_failover(&key, primary).await;
    assert_ne!(new_primary, primary);
    // The dead node is named: by `status`, and by the host's metrics, which place the stream on
    // the promoted replica.
    let dead = format!("127.0.0.1:{primary}");
    eventually("status to name the dead node", || async {
        let (report, _) = env.status();
        let problems = report["problems"].to_string();
        problems
            .contains(&format!("Redis Cluster node {dead} (primary) is down"))
            .then_some(())
    })
    .await;
    eventually(
        "the metrics to name the dead node and the stream's new node",
        || async {
            let (_, metrics) = crate::support::http_get(http, "/metrics");
            (metrics.contains(&format!(
            "kaleidoscope_redis_node_up{{node=\"{dead}\",role=\"primary\"}} 0"
        )) && metrics.contains(&format!(
            "kaleidoscope_stream_node{{stream=\"{DETECTION}\",node=\"127.0.0.1:{new_primary}\"}} 1"
        )))
        .then_some(())
        },
    )
    .await;
    for chunk in chunks.by_ref().take(5) {
        confirmed.extend(publish_confirmed(&mut producer, &key, chunk).await);
    }
    cluster.restart(primary);
    cluster.await_healthy().await;
    for chunk in chunks {
        confirmed.extend(publish_confirmed(&mut producer, &key, chunk).await);
    }
    assert!(
        confirmed.len() as i64 >= COUNT / 2,
        "most entries were confirmed: {}",
        confirmed.len()
    );

    eventually("every confirmed entry to be stored", || async {
        let stored: Vec<i64> =
            sqlx::query_scalar("SELECT DISTINCT media_id FROM media_detected_faces")
                .fetch_all(&env.pool)
                .await
                .unwrap_or_default();
        let stored: BTreeSet<i64> = stored.into_iter().collect();
        confirmed.is_subset(&stored).then_some(())
    })
    .await;
    env.await_no_pending(DETECTION).await;
    assert_faces_exactly_once(&env, &confirmed).await;
    assert!(
        env.dead_letters().await.is_empty(),
        "no dead letters: {:?}",
        env.dead_letters().await
    );
    assert!(
        host.try_wait().expect("the host's state").is_none(),
        "the host still runs after the failover"
    );
    eventually("status to work against the cluster", || async {
        let output = env.command(&["status", "--json"]);
        output.status.success().then_some(())
    })
    .await;
    signal(&host, "TERM");
    assert!(await_exit(&mut host).await.success());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_runs_against_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let env = TestEnv::start(Options::new(&ALL_PLUGINS).on_cluster(&cluster)).await;
    env.seed_media(1, &[1, 2]).await;
    let ok = |(succeeded, printed): (bool, String), what: &str| {
        assert!(succeeded, "{what} against the cluster failed: {printed}");
        printed
    };

    // `simulate-ml` answers what `publish` asks, on request and result streams spread over
    // the nodes; the host stores the answers.
    let mut simulator = crate::support::HostProcess::spawn(
        env.binary(&["simulate-ml", "--embedding-dims", "8"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    for media in ["1", "2"] {
        // The second waits until a replica of the request stream's primary holds it.
        let wait: &[&str] = if media == "2" {
            &["--wait-replicas", "1"]
        } else {
            &[]
        };
        ok(
            env.run(
                &[
                    &["publish", "post-image"][..],
                    wait,
                    &[
                        "--post-id",
                        "1",
                        "--media-id",
                        media,
                        "--media-url",
                        "https://cdn.example/x.jpg",
                        "--uploader-id",
                        "1",
                    ][..],
                ]
                .concat(),
            ),
            "publish",
        );
    }
    eventually("the simulator's answers to be stored", || async {
        (env.count("SELECT count(*) FROM ml_requests WHERE status = 'COMPLETED'")
            .await
            == 2)
            .then_some(())
    })
    .await;
    signal(&simulator, "TERM");
    await_exit(&mut simulator).await;

    // `dlq list`, `show` and `replay` of a dead letter.
    let bad = env
        .publish(DETECTION, &[("mediaId", "1"), ("faces", "not json")])
        .await;
    env.await_dead_letter(DETECTION, &bad).await;
    let json = |args: &[&str]| {
        let output = env.command(args);
        assert!(
            output.status.success(),
            "{args:?} against the cluster failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("JSON on stdout")
    };
    let letters = json(&["dlq", "list", "--json"]);
    let id = letters[0]["id"]
        .as_str()
        .expect("a dead letter id")
        .to_string();
    ok(env.run(&["dlq", "show", &id]), "dlq show");
    // `reprocess` reads history with XRANGE on the stream's node.
    let reprocessed = ok(
        env.run(&[
            "reprocess",
            "--stream",
            "ml-insights-results",
            "--from",
            "0",
        ]),
        "reprocess",
    );
    assert!(reprocessed.contains("finished"), "{reprocessed}");
    let replayed = json(&["dlq", "replay", &id, "--json"]);
    let new_id = replayed[0]["new_id"]
        .as_str()
        .expect("the replayed entry's id");
    env.await_dead_letter(DETECTION, new_id).await;

    // `plugin deploy` reaches the host through its heartbeat on the cluster.
    let (deployed, printed) = env.deploy(&crate::support::plugin_file("insights-next"));
    assert!(deployed, "plugin deploy against the cluster: {printed}");
    env.await_serving("ml-insights-results", "0.2.0").await;
    let status = ok(env.run(&["status"]), "status");
    assert!(status.contains("redis cluster nodes:"), "{status}");

    // `demo` and `bench` run their own hosts on the cluster, under prefixes of their own.
    let demo_database = format!("{}_demo", env.database);
    ok(
        env.run(&[
            "demo",
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:5432/{demo_database}"),
            "--stream-prefix",
            &format!("{}demo:", env.prefix),
            "--users",
            "2",
            "--posts",
            "2",
            "--media-per-post",
            "1",
        ]),
        "demo",
    );
    let bench_database = format!("{}_bench", env.database);
    let bench = json(&[
        "bench",
        "--entries",
        "300",
        "--embedding-dims",
        "8",
        "--database-url",
        &format!("postgres://postgres@127.0.0.1:5432/{bench_database}"),
        "--json",
    ]);
    assert!(bench[0]["verified"]["Ok"].is_string(), "{bench}");
    let admin = sqlx::PgPool::connect(crate::support::ADMIN_URL)
        .await
        .expect("the admin database");
    for database in [demo_database, bench_database] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .expect("drop a tool's database");
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_dev_runs_against_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    crate::authoring::plugin_dev_loop(Options::new(&[]).on_cluster(&cluster), "guide-dev-cluster")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_group_on_a_cluster_node_is_recreated_and_nothing_runs_twice() {
    let cluster = RedisCluster::start().await;
    crate::faults::vanished_group_is_recreated(Options::new(&["insights"]).on_cluster(&cluster))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moving_to_another_node_under_load_loses_and_doubles_nothing() {
    const COUNT: i64 = 1500;
    let (cluster, env, media, all) = detections_on_a_cluster(COUNT, true).await;
    let key = env.key(DETECTION);
    let mut chunks = all.chunks(100);
    for chunk in chunks.by_ref().take(5) {
        env.publish_many(DETECTION, chunk).await;
    }
    eventually("the host to have processed some entries", || async {
        (env.ledger_count(DETECTION).await > 100).then_some(())
    })
    .await;
    // The stream's slot moves (its entries, its group and pending list with it) while the host
    // reads and acknowledges: its commands meet ASK, then MOVED, and follow.
    let before = cluster.primary_of(&key).await;
    let after = cluster.move_slot_of(&key).await;
    assert_ne!(before, after);
    assert_eq!(cluster.primary_of(&key).await, after);
    for chunk in chunks {
        env.publish_many(DETECTION, chunk).await;
    }
    await_every_detection_stored_once(&env, &media).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_node_that_is_down_and_reports_the_rest() {
    // Without full coverage the other nodes serve on while one shard is gone altogether.
    let mut cluster = RedisCluster::start_with(&["--cluster-require-full-coverage", "no"]).await;
    let env = TestEnv::start(Options::new(&ALL_PLUGINS).on_cluster(&cluster)).await;
    let heartbeat = format!(
        "{}kaleidoscope:hosts:{}:{}",
        env.prefix, env.config.consumer_group, env.config.consumer_name
    );
    let heartbeat_node = cluster.primary_of(&heartbeat).await;
    // A stream on another primary than the heartbeat's: that shard goes down, primary and replica.
    let mut lost = None;
    for stream in ALL_PLUGINS
        .iter()
        .flat_map(|_| ["ml-insights-results", DETECTION, ERRORS])
    {
        let node = cluster.primary_of(&env.key(stream)).await;
        if node != heartbeat_node {
            lost = Some((stream, node));
            break;
        }
    }
    let (stream, node) = lost.expect("a stream on another node than the heartbeat");
    let replica = cluster.replica_of(node).await;
    cluster.kill(replica);
    cluster.kill(node);
    let dead = format!("127.0.0.1:{node}");
    let report = eventually("status to name the node that is down", || async {
        let output = env.command(&["status", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        report["problems"]
            .to_string()
            .contains(&format!("Redis Cluster node {dead} (primary) is down"))
            .then_some(report)
    })
    .await;
    let problems = report["problems"].to_string();
    assert!(
        problems.contains(&format!("stream {stream}: cannot be read from node {dead}")),
        "{problems}"
    );
    assert_eq!(
        report["hosts"].as_array().map(Vec::len),
        Some(1),
        "{report:#}"
    );
    assert_eq!(report["healthy"], false);
    env.finish().await;
}
