//! Faults done for real: a host killed with SIGKILL, SIGTERM under load, Redis connections
//! killed and Redis paused, PostgreSQL refusing connections.

use crate::support::{
    ADMIN_URL, HostProcess, Options, TestEnv, await_exit, detection, eventually, signal,
};
use std::time::Duration;

const DETECTION: &str = "face-detection-results";
const INSIGHTS: &str = "ml-insights-results";

fn caption(media: i64) -> Vec<(String, String)> {
    vec![
        ("mediaId".into(), media.to_string()),
        ("service".into(), "image_captioning".into()),
        ("caption".into(), format!("caption {media}")),
    ]
}

/// Asserts every detection for media `1..=count` is stored exactly once.
async fn assert_detections_exactly_once(env: &TestEnv, count: i64) {
    assert_eq!(
        env.ledger_count(DETECTION).await,
        count,
        "ledger count equals entries published"
    );
    let faces = env.count("SELECT count(*) FROM media_detected_faces").await;
    assert_eq!(faces, 2 * count, "two faces per media");
    assert_eq!(
        env.rows_written_again("media_detected_faces").await,
        0,
        "no face was written by a second application of its entry"
    );
    let wrong = env.count("SELECT count(*) FROM media_ai_insights WHERE faces_detected <> 2 OR face_detection_status <> 'COMPLETED'").await;
    assert_eq!(wrong, 0);
    env.await_no_pending(DETECTION).await;
    assert!(
        env.dead_letters().await.is_empty(),
        "no dead letters: {:?}",
        env.dead_letters().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_a_group_and_survive_a_sigkill_of_one() {
    const COUNT: i64 = 2000;
    let env = TestEnv::prepare(Options::new(&["face-detection"]).retries(5, 1500)).await;
    let media: Vec<i64> = (1..=COUNT).collect();
    env.seed_media(1, &media).await;
    let mut victim = env.spawn_host("host-a");
    let mut survivor = env.spawn_host("host-b");

    // Continuous load: chunks published while both hosts work.
    let all: Vec<Vec<(String, String)>> = media.iter().map(|m| detection(*m)).collect();
    let (first, rest) = all.split_at(600);
    env.publish_many(DETECTION, first).await;
    eventually("both hosts to have processed some entries", || async {
        (env.ledger_count(DETECTION).await > 200).then_some(())
    })
    .await;
    // Kill the victim while it holds entries, so the survivor has something to reclaim.
    crate::support::kill_while_it_holds_entries(&env, DETECTION, &mut victim, "host-a", rest).await;

    eventually("every entry to be processed", || async {
        (env.ledger_count(DETECTION).await == COUNT).then_some(())
    })
    .await;
    assert_detections_exactly_once(&env, COUNT).await;
    // The survivor reclaimed what the victim held.
    let victim_pending = env.pending_for(DETECTION, "host-a").await;
    assert_eq!(victim_pending, 0);

    signal(&survivor, "TERM");
    assert!(await_exit(&mut survivor).await.success());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_with_nothing_half_done() {
    const COUNT: i64 = 3000;
    let env = TestEnv::prepare(Options::new(&["insights"])).await;
    let media: Vec<i64> = (1..=COUNT).collect();
    env.seed_media(1, &media).await;
    // Batches of at most 100: the host holds a few hundred entries at a time, so the signal
    // comes while most of the 3,000 are still unread (by default it reads 1,000 at a time).
    let log = std::fs::File::create(env.host_log("host-term")).expect("host log file");
    let mut host = HostProcess::spawn(
        env.binary(&["run"])
            .env("KALEIDOSCOPE_CONSUMER_NAME", "host-term")
            .env("KALEIDOSCOPE_MAX_BATCH_SIZE", "100")
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    let all: Vec<Vec<(String, String)>> = media.iter().map(|m| caption(*m)).collect();
    env.publish_many(INSIGHTS, &all).await;
    eventually("the host to be busy", || async {
        (env.ledger_count(INSIGHTS).await > 50).then_some(())
    })
    .await;
    signal(&host, "TERM");
    let status = await_exit(&mut host).await;
    assert!(
        status.success(),
        "graceful shutdown exits 0, got {status:?}"
    );

    // Nothing half-done: everything it read is committed and acknowledged (none left pending), and
    // the ledger holds exactly the entries the group delivered.
    assert_eq!(
        env.pending(INSIGHTS).await,
        0,
        "every entry read was finished before exiting"
    );
    let delivered: i64 = {
        let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(env.key(INSIGHTS))
            .query_async(&mut env.redis.clone())
            .await
            .unwrap();
        match groups[0].get("entries-read") {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("entries-read missing: {other:?}"),
        }
    };
    assert_eq!(env.ledger_count(INSIGHTS).await, delivered);
    assert!(
        delivered < COUNT,
        "the test must stop the host mid-load (it read all {COUNT} first)"
    );

    // Another instance finishes the rest.
    let mut next = env.spawn_host("host-next");
    eventually("the rest to be processed", || async {
        (env.ledger_count(INSIGHTS).await == COUNT).then_some(())
    })
    .await;
    let rows = env.count("SELECT count(*) FROM media_ai_insights").await;
    assert_eq!(rows, COUNT);
    assert_eq!(
        env.rows_written_again("media_ai_insights").await,
        0,
        "no entry was applied twice"
    );
    signal(&next, "TERM");
    assert!(await_exit(&mut next).await.success());
    env.await_no_pending(INSIGHTS).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_racing_on_one_entry_apply_it_once() {
    // Host A takes the entry into a slow handler and is frozen there; host B reclaims it and
    // finishes it; A then wakes up, finishes its call, and must find the entry in the ledger.
    // The handler's row has a unique key, so a second application could hide there; its emitted
    // message cannot: each application publishes one, so the output stream counts them.
    let env = TestEnv::prepare(Options::new(&["slow"]).retries(5, 300)).await;
    let log_a = env.host_log("racer-a");
    let mut a = HostProcess::spawn(
        env.binary(&["run"])
            .env("KALEIDOSCOPE_CONSUMER_NAME", "racer-a")
            .env("RUST_LOG", "kaleidoscope=debug")
            .stderr(std::fs::File::create(&log_a).unwrap()),
    );
    let id = env
        .publish(
            "mock-slow",
            &[("millis", "2000"), ("note", "once"), ("target", "slow-out")],
        )
        .await;
    eventually("racer-a to hold the entry", || async {
        (env.pending_for("mock-slow", "racer-a").await == 1).then_some(())
    })
    .await;
    signal(&a, "STOP");
    let mut b = env.spawn_host("racer-b");
    eventually("racer-b to reclaim and finish the entry", || async {
        (env.ledger_count("mock-slow").await == 1 && env.pending("mock-slow").await == 0)
            .then_some(())
    })
    .await;
    signal(&a, "CONT");
    // Whatever A makes of it, its batch ends ("batch done" is logged either way).
    eventually("racer-a to finish its batch", || async {
        std::fs::read_to_string(&log_a)
            .unwrap_or_default()
            .contains("batch done")
            .then_some(())
    })
    .await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ml_processing_errors WHERE entry_id = $1")
            .bind(&id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows, 1, "the entry's row was written once");
    assert_eq!(env.ledger_count("mock-slow").await, 1);
    env.await_no_pending("mock-slow").await;
    let emitted = env.entries("slow-out").await;
    assert_eq!(
        emitted.len(),
        1,
        "the entry was applied once, so its message was published once: {emitted:?}"
    );
    assert!(env.dead_letters().await.is_empty());
    assert!(
        std::fs::read_to_string(&log_a)
            .unwrap_or_default()
            .contains("already processed; acknowledged without running again"),
        "racer-a found the entry in the ledger"
    );
    for host in [&mut a, &mut b] {
        signal(host, "TERM");
        assert!(await_exit(host).await.success());
    }
    env.finish().await;
}

/// The ids of this host's named Redis connections.
async fn host_connections(env: &TestEnv) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    let prefix = format!("name=kaleidoscope:{}:", env.config.consumer_name);
    list.lines()
        .filter(|line| line.split(' ').any(|f| f.starts_with(&prefix)))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_connections_and_a_paused_redis_lose_and_double_nothing() {
    const COUNT: i64 = 600;
    // A kill can land while a read's reply is on the wire: Redis has handed the entries to this
    // consumer, the host never saw them, and only the reclaim brings them back. A reclaim idle
    // time well inside the test's deadline lets the test see that happen instead of timing out.
    let env =
        TestEnv::start(Options::new(&["insights"]).set("KALEIDOSCOPE_RECLAIM_IDLE_MS", 3000)).await;
    let media: Vec<i64> = (1..=COUNT).collect();
    env.seed_media(1, &media).await;
    let all: Vec<Vec<(String, String)>> = media.iter().map(|m| caption(*m)).collect();

    for (round, chunk) in all.chunks(150).enumerate() {
        env.publish_many(INSIGHTS, chunk).await;
        if round % 2 == 0 {
            let ids = eventually("the host's named connections", || async {
                let ids = host_connections(&env).await;
                (!ids.is_empty()).then_some(ids)
            })
            .await;
            for id in ids {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(&id)
                    .query_async(&mut env.redis.clone())
                    .await;
            }
        } else {
            let _: () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(700)
                .arg("WRITE")
                .query_async(&mut env.redis.clone())
                .await
                .unwrap();
        }
    }
    eventually("every entry to be processed", || async {
        (env.ledger_count(INSIGHTS).await == COUNT).then_some(())
    })
    .await;
    let rows = env.count("SELECT count(*) FROM media_ai_insights").await;
    assert_eq!(rows, COUNT);
    assert_eq!(
        env.rows_written_again("media_ai_insights").await,
        0,
        "no entry was applied twice"
    );
    env.await_no_pending(INSIGHTS).await;
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

async fn set_connections_allowed(database: &str, allowed: bool) {
    let admin = sqlx::PgPool::connect(ADMIN_URL).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allowed}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    if !allowed {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(database)
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusing_connections_delays_but_loses_and_doubles_nothing() {
    const COUNT: i64 = 400;
    // One attempt: an entry that met the outage and was counted as a failed attempt would be
    // dead-lettered, and the test would see it.
    let env = TestEnv::start(Options::new(&["insights"]).retries(1, 500)).await;
    let media: Vec<i64> = (1..=COUNT).collect();
    env.seed_media(1, &media).await;
    let all: Vec<Vec<(String, String)>> = media.iter().map(|m| caption(*m)).collect();
    let (first, second) = all.split_at(200);
    env.publish_many(INSIGHTS, first).await;
    eventually("some entries processed", || async {
        (env.ledger_count(INSIGHTS).await > 20).then_some(())
    })
    .await;

    set_connections_allowed(&env.database, false).await;
    env.publish_many(INSIGHTS, second).await;
    // Readiness reports the outage.
    let report = eventually("status to report the host not ready", || async {
        let (report, healthy) = env.status();
        (report["hosts"][0]["ready"] == false && !healthy).then_some(report)
    })
    .await;
    assert!(
        report["hosts"][0]["not_ready"]
            .to_string()
            .contains("PostgreSQL"),
        "{report}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // let the outage outlast several retries of the host (not a synchronisation)
    set_connections_allowed(&env.database, true).await;

    eventually("every entry to be processed", || async {
        (env.ledger_count(INSIGHTS).await == COUNT).then_some(())
    })
    .await;
    let rows = env.count("SELECT count(*) FROM media_ai_insights").await;
    assert_eq!(rows, COUNT);
    assert_eq!(
        env.rows_written_again("media_ai_insights").await,
        0,
        "no entry was applied twice"
    );
    env.await_no_pending(INSIGHTS).await;
    assert!(
        env.dead_letters().await.is_empty(),
        "an outage must not use up retry attempts: {:?}",
        env.dead_letters().await
    );
    eventually("status to report the host ready again", || async {
        let (report, _) = env.status();
        (report["hosts"][0]["ready"] == true).then_some(())
    })
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_consumer_group_is_recreated_and_nothing_runs_twice() {
    vanished_group_is_recreated(Options::new(&["insights"])).await;
}

/// Destroys the group of the insights stream under a host started with `options` (its plugins:
/// insights): the host recreates it, the entry before is recognised, the one after stored.
pub(crate) async fn vanished_group_is_recreated(options: Options) {
    let env = TestEnv::start(options).await;
    env.seed_media(1, &[1, 2]).await;
    let first = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "1"),
                ("service", "image_captioning"),
                ("caption", "one"),
            ],
        )
        .await;
    env.await_processed(INSIGHTS, &first).await;
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(env.key(INSIGHTS))
        .arg(&env.config.consumer_group)
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();
    let second = env
        .publish(
            INSIGHTS,
            &[
                ("mediaId", "2"),
                ("service", "image_captioning"),
                ("caption", "two"),
            ],
        )
        .await;
    env.await_processed(INSIGHTS, &second).await;
    // The recreated group starts at 0: the first entry is delivered again and recognised.
    env.await_drained(INSIGHTS).await;
    assert_eq!(env.ledger_count(INSIGHTS).await, 2);
    assert_eq!(
        env.rows_written_again("media_ai_insights").await,
        0,
        "the first entry, delivered again, changed nothing"
    );
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

/// Starts a host whose `mock-loop` plugin never returns (deadline 10 minutes) and waits until a
/// batch is stuck in it. The host's log goes to the returned file.
async fn host_stuck_in_a_batch(
    env: &TestEnv,
    consumer: &str,
    extra: &[(&str, &str)],
    pending_when_stuck: i64,
) -> (HostProcess, std::path::PathBuf) {
    let log = env.host_log(consumer);
    let mut command = env.binary(&["run"]);
    command
        .env("KALEIDOSCOPE_CONSUMER_NAME", consumer)
        .stderr(std::fs::File::create(&log).unwrap());
    for (name, value) in extra {
        command.env(name, value);
    }
    let host = HostProcess::spawn(&mut command);
    env.publish("mock-loop", &[("note", "forever")]).await;
    eventually("the batch to be stuck in the plugin", || async {
        let serving = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("host is serving");
        (serving && env.pending("mock-loop").await == pending_when_stuck).then_some(())
    })
    .await;
    (host, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_or_the_shutdown_timeout_ends_a_stuck_shutdown() {
    let env = TestEnv::prepare(
        Options::new(&["looping"]).plugin_setting("looping", "timeout_ms = 600000"),
    )
    .await;

    // Shutdown waits for the batch in flight; a second signal exits at once, non-zero. (If it did
    // not, the host would wait for the plugin's 10-minute deadline and the test would time out.)
    let (mut host, log) = host_stuck_in_a_batch(
        &env,
        "host-twice",
        &[("KALEIDOSCOPE_SHUTDOWN_TIMEOUT_MS", "600000")],
        1,
    )
    .await;
    signal(&host, "TERM");
    eventually("the host to begin its shutdown", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("shutting down")
            .then_some(())
    })
    .await;
    signal(&host, "TERM");
    let status = await_exit(&mut host).await;
    assert!(
        !status.success(),
        "a forced exit is not a clean one: {status:?}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("second signal")
    );

    // The shutdown timeout does the same without a second signal.
    let (mut host, log) = host_stuck_in_a_batch(
        &env,
        "host-timeout",
        &[("KALEIDOSCOPE_SHUTDOWN_TIMEOUT_MS", "300")],
        2,
    )
    .await;
    signal(&host, "TERM");
    let status = await_exit(&mut host).await;
    assert!(!status.success(), "{status:?}");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("did not finish within")
    );
    // Nothing was lost: both entries are still pending, for another consumer to reclaim.
    assert_eq!(env.pending("mock-loop").await, 2);
    env.finish().await;
}

/// A deferred constraint fails at COMMIT, where no statement is to blame, for the set-based
/// transaction and for the entry-by-entry one alike: only a transaction per entry finds the
/// culprit. It is dead-lettered as `database`; its neighbours commit; PostgreSQL is never
/// reported unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_at_commit_dead_letters_the_culprit_and_commits_the_rest() {
    let env = TestEnv::prepare(Options::new(&[crate::support::SCRIPTED])).await;
    for sql in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.error = 'poison' THEN RAISE EXCEPTION 'poison refused at commit'; END IF;
           RETURN NEW;
         END $$",
        "CREATE CONSTRAINT TRIGGER refuse_poison AFTER INSERT ON ml_processing_errors
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let mut good = Vec::new();
    for n in 0..3 {
        good.push(
            env.publish(
                crate::support::SCRIPTED,
                &[("action", "ok"), ("note", &format!("g{n}"))],
            )
            .await,
        );
    }
    let poison = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "poison")],
        )
        .await;
    for n in 3..6 {
        good.push(
            env.publish(
                crate::support::SCRIPTED,
                &[("action", "ok"), ("note", &format!("g{n}"))],
            )
            .await,
        );
    }
    let env = env.with_host().await;
    let letter = env
        .await_dead_letter(crate::support::SCRIPTED, &poison)
        .await;
    assert_eq!(letter["failureKind"], "database", "{letter:?}");
    assert!(
        letter["error"].contains("poison refused at commit"),
        "{}",
        letter["error"]
    );
    for id in &good {
        env.await_processed(crate::support::SCRIPTED, id).await;
    }
    env.await_no_pending(crate::support::SCRIPTED).await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        6
    );
    let state = env.host().state();
    assert!(
        state
            .health
            .outage(kaleidoscope::failure::Dependency::Database)
            .is_none()
    );
    assert!(
        state
            .metrics
            .batch_failures
            .get_or_create(&kaleidoscope::metrics::ByStream::new(
                crate::support::SCRIPTED
            ))
            .get()
            >= 3,
        "the batch was retried before it was split"
    );
    env.finish().await;
}

/// A statement cancelled by `statement_timeout` is about the entry, not an outage: it is retried
/// like any failed statement, then dead-lettered, and the rest of the stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_is_retried_then_dead_lettered_not_waited_out() {
    let options = Options::new(&[crate::support::SCRIPTED])
        .retries(2, 200)
        .set("KALEIDOSCOPE_PG_STATEMENT_TIMEOUT_MS", 300);
    let env = TestEnv::prepare(options).await;
    for sql in [
        "CREATE FUNCTION dawdle() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.error = 'slow' THEN PERFORM pg_sleep(5); END IF;
           RETURN NEW;
         END $$",
        "CREATE TRIGGER dawdle BEFORE INSERT ON ml_processing_errors
         FOR EACH ROW EXECUTE FUNCTION dawdle()",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let env = env.with_host().await;
    let slow = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "slow")],
        )
        .await;
    let letter = env.await_dead_letter(crate::support::SCRIPTED, &slow).await;
    assert_eq!(letter["failureKind"], "retries-exhausted", "{letter:?}");
    assert!(letter["error"].contains("57014"), "{}", letter["error"]);
    crate::support::stream_goes_on(&env).await;
    env.await_no_pending(crate::support::SCRIPTED).await;
    assert!(
        env.host()
            .state()
            .health
            .outage(kaleidoscope::failure::Dependency::Database)
            .is_none()
    );
    env.finish().await;
}

/// Redis restarted without persistence: the stream and its group are gone. Whichever command of
/// the consumer meets `NOGROUP` first (with a short reclaim time, the reclaim), the group is
/// recreated and new entries flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_consumer_group_is_recreated_and_reported() {
    let env = TestEnv::start(Options::new(&[crate::support::SCRIPTED]).retries(3, 200)).await;
    let first = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "before")],
        )
        .await;
    env.await_processed(crate::support::SCRIPTED, &first).await;
    let _: () = redis::cmd("DEL")
        .arg(env.key(crate::support::SCRIPTED))
        .query_async(&mut env.redis.clone())
        .await
        .expect("DEL");
    let after = env
        .publish(
            crate::support::SCRIPTED,
            &[("action", "ok"), ("note", "after")],
        )
        .await;
    env.await_processed(crate::support::SCRIPTED, &after).await;
    env.await_no_pending(crate::support::SCRIPTED).await;
    assert!(
        env.host()
            .state()
            .metrics
            .groups_recreated
            .get_or_create(&kaleidoscope::metrics::ByStream::new(
                crate::support::SCRIPTED
            ))
            .get()
            >= 1
    );
    env.finish().await;
}
