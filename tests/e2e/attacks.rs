//! The attacks of "Hardening II": ways a producer, an operator, a hostile plugin or plain
//! concurrency made the host apply an entry twice, stall, dead-letter the innocent or leak. Each
//! test reproduces one attack against the real host and asserts what must happen instead.

use crate::support::{Options, TestEnv, eventually, output_within_deadline};
use kaleidoscope::dead_letter::{REPLAY_OF_FIELD, REPLAY_PROOF_FIELD};
use kaleidoscope::failure::Dependency;
use kaleidoscope::metrics::ByStream;
use kaleidoscope::persist::ledger;

const SCRIPTED: &str = "scripted";

/// Two copies of one replayed dead letter read in the *same* batch are applied once: the batch's
/// single ledger claim returns their shared identity once, and only the first copy may use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_replayed_dead_letter_in_one_batch_are_applied_once() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED])).await;
    // The deployment's identity and replay secret, made before the host starts (which finds
    // them), so the copies carry the proof `dlq replay` gives them.
    let source = ledger::identity(
        &env.pool,
        &mut env.redis.clone(),
        &env.config.source_identity_key(),
        &ledger::deployment(&env.config.redis_url, &env.config.stream_prefix),
    )
    .await
    .expect("the ledger identity");
    let secret = ledger::replay_secret(&env.pool, &source)
        .await
        .expect("the replay secret");
    let proof = ledger::replay_proof(&secret, SCRIPTED, "1-1");
    // Both copies are in the stream before the host starts, so its first read takes both.
    for note in ["copy one", "copy two"] {
        env.publish(
            SCRIPTED,
            &[
                ("action", "ok"),
                ("note", note),
                (REPLAY_OF_FIELD, "1-1"),
                (REPLAY_PROOF_FIELD, &proof),
            ],
        )
        .await;
    }
    let env = env.with_host().await;
    env.await_processed(SCRIPTED, "1-1/replay").await;
    env.await_drained(SCRIPTED).await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        1,
        "the replayed dead letter was applied once"
    );
    env.finish().await;
}

/// A field *name* that is not UTF-8 makes the entry malformed, as a value does: the handler
/// would otherwise see a name the producer never wrote (U+FFFD in place of its bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_name_that_is_not_utf8_makes_the_entry_malformed() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    let id: String = redis::cmd("XADD")
        .arg(env.key(SCRIPTED))
        .arg("*")
        .arg("action")
        .arg("ok")
        .arg(&b"no\xfftext"[..])
        .arg("value")
        .query_async(&mut env.redis.clone())
        .await
        .expect("XADD");
    let letter = env.await_dead_letter(SCRIPTED, &id).await;
    assert_eq!(letter["failureKind"], "malformed", "{letter:?}");
    assert!(
        letter["error"].contains("name of field") && letter["error"].contains("UTF-8"),
        "{}",
        letter["error"]
    );
    assert!(
        letter.contains_key("bytesLost"),
        "replay must not pretend: {letter:?}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        0
    );
    env.finish().await;
}

/// A setting that sizes a semaphore or a buffer is refused when absurd, naming the variable,
/// instead of passing validation and panicking every consumer task later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_in_flight_limit_is_refused_at_start() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED])).await;
    for command in [&["config", "check"][..], &["run"][..]] {
        let output = output_within_deadline(
            env.binary(command)
                .env("KALEIDOSCOPE_MAX_IN_FLIGHT", "2305843009213693952"),
        )
        .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{command:?} accepted it: {stderr}"
        );
        assert!(
            stderr.contains("KALEIDOSCOPE_MAX_IN_FLIGHT") && stderr.contains("at most 64"),
            "{command:?}: {stderr}"
        );
    }
    env.finish().await;
}

/// A host whose every in-flight slot is busy (slow calls) keeps its entries fresh in the pending
/// list: another host never reclaims them, so nothing the owner handles fine is run twice or
/// dead-lettered `retries-exhausted` behind its back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_every_slot_busy_keeps_its_entries() {
    let options = Options::new(&[SCRIPTED])
        .retries(1, 1000)
        .set("KALEIDOSCOPE_MAX_IN_FLIGHT", 1)
        .set("KALEIDOSCOPE_BATCH_SIZE", 5);
    let env = TestEnv::prepare(options).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            env.publish(
                SCRIPTED,
                &[
                    ("action", "sleep"),
                    ("millis", "700"),
                    ("note", &n.to_string()),
                ],
            )
            .await,
        );
    }
    let env = env.with_host().await;
    // The first host has taken all five (one batch, its only slot busy for seconds) ...
    eventually("the first host to take the batch", || async {
        (env.pending(SCRIPTED).await == 5).then_some(())
    })
    .await;
    // ... and a second host, reclaiming every 250 ms whatever is idle for a second, joins.
    let _other = env.spawn_host("other");
    for id in &ids {
        env.await_processed(SCRIPTED, id).await;
    }
    env.await_drained(SCRIPTED).await;
    assert!(
        env.dead_letters().await.is_empty(),
        "{:?}",
        env.dead_letters().await
    );
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        5
    );
    env.finish().await;
}

/// The response deadline is on the silence between answers, not on the batch: a long batch of
/// quick statements (here entry by entry, each row slowed by a trigger) is not a lost connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_batch_of_quick_statements_is_not_taken_for_a_lost_connection() {
    let options = Options::new(&[SCRIPTED])
        .set("KALEIDOSCOPE_PG_STATEMENT_TIMEOUT_MS", 200)
        .set("KALEIDOSCOPE_PG_LOCK_TIMEOUT_MS", 200)
        .set("KALEIDOSCOPE_BATCH_SIZE", 250);
    let env = TestEnv::prepare(options).await;
    // 10 ms a row: the set-based insert of 200 rows passes the statement timeout (and the batch
    // goes entry by entry); entry by entry takes two seconds, twice the 1 s deadline (4 × the
    // statement timeout + the lock timeout).
    for sql in [
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$",
        "CREATE TRIGGER slow_row BEFORE INSERT ON ml_processing_errors
         FOR EACH ROW EXECUTE FUNCTION slow_row()",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let entries: Vec<Vec<(String, String)>> = (0..200)
        .map(|n| {
            vec![
                ("action".into(), "ok".into()),
                ("note".into(), n.to_string()),
            ]
        })
        .collect();
    env.publish_many(SCRIPTED, &entries).await;
    let env = env.with_host().await;
    env.await_drained(SCRIPTED).await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        200
    );
    let state = env.host().state();
    assert_eq!(
        state
            .metrics
            .batch_failures
            .get_or_create(&ByStream::new(SCRIPTED))
            .get(),
        0,
        "no attempt was taken for an outage"
    );
    assert!(state.health.outage(Dependency::Database).is_none());
    env.finish().await;
}

/// A table lock held elsewhere past `lock_timeout` is contention: the entry is retried, never
/// dead-lettered `database` on its first delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_lock_contention_is_retried_not_dead_lettered() {
    let options = Options::new(&[SCRIPTED])
        .retries(10, 300)
        .set("KALEIDOSCOPE_PG_LOCK_TIMEOUT_MS", 100);
    let env = TestEnv::start(options).await;
    // Another session holds the host's lock on the table.
    let mut holder = env.pool.acquire().await.expect("a connection");
    sqlx::query(
        "SELECT pg_advisory_lock(hashtextextended('kaleidoscope.table.ml_processing_errors', 0))",
    )
    .execute(&mut *holder)
    .await
    .expect("take the table's lock");
    let id = env.publish(SCRIPTED, &[("action", "ok")]).await;
    // Until the entry has been delivered a second time (retried) or dead-lettered.
    eventually("a retry or a dead letter", || async {
        if !env.dead_letters().await.is_empty() {
            return Some(());
        }
        (delivery_count(&env, SCRIPTED, &id).await >= 2).then_some(())
    })
    .await;
    assert!(
        env.dead_letters().await.is_empty(),
        "{:?}",
        env.dead_letters().await
    );
    sqlx::query(
        "SELECT pg_advisory_unlock(hashtextextended('kaleidoscope.table.ml_processing_errors', 0))",
    )
    .execute(&mut *holder)
    .await
    .expect("release the table's lock");
    env.await_processed(SCRIPTED, &id).await;
    drop(holder);
    env.finish().await;
}

/// How many times the group has delivered `id` (0 when it is not pending).
async fn delivery_count(env: &TestEnv, stream: &str, id: &str) -> i64 {
    let reply: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(env.key(stream))
        .arg(&env.config.consumer_group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(&mut env.redis.clone())
        .await
        .unwrap_or_default();
    reply.first().map_or(0, |(_, _, _, count)| *count)
}

/// Five entries processed and then forgotten by the ledger (retention 1 ms): neither a lost
/// consumer group (recreated) nor a rewind (`XGROUP SETID 0`) runs them a second time. Each
/// entry emits one message, so a second run shows as a second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_the_ledger_has_forgotten_never_run_again() {
    let options = Options::new(&[SCRIPTED]).set("KALEIDOSCOPE_LEDGER_RETENTION_MS", 1);
    let env = TestEnv::start(options).await;
    let emit = |note: &str| {
        vec![
            ("action".to_string(), "emit".to_string()),
            ("target".to_string(), "scripted-out".to_string()),
            ("note".to_string(), note.to_string()),
        ]
    };
    let emitted = || async { env.entries("scripted-out").await.len() };
    env.publish_many(
        SCRIPTED,
        &(0..5).map(|n| emit(&n.to_string())).collect::<Vec<_>>(),
    )
    .await;
    env.await_drained(SCRIPTED).await;
    eventually("the ledger to forget the five", || async {
        (env.ledger_count(SCRIPTED).await == 0).then_some(())
    })
    .await;
    assert_eq!(emitted().await, 5);
    let mut redis = env.redis.clone();
    // The group vanishes (a failover to a replica without it, an operator's mistake).
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(env.key(SCRIPTED))
        .arg(&env.config.consumer_group)
        .query_async(&mut redis)
        .await
        .expect("XGROUP DESTROY");
    env.publish_many(SCRIPTED, &[emit("after")]).await;
    eventually("the new entry's message", || async {
        (emitted().await >= 6).then_some(())
    })
    .await;
    env.await_drained(SCRIPTED).await;
    assert_eq!(emitted().await, 6, "the recreated group did not start at 0");
    // A rewind: the group is set back to the beginning.
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(env.key(SCRIPTED))
        .arg(&env.config.consumer_group)
        .arg("0")
        .query_async(&mut redis)
        .await
        .expect("XGROUP SETID");
    env.publish_many(SCRIPTED, &[emit("last")]).await;
    eventually("the last entry's message", || async {
        (emitted().await >= 7).then_some(())
    })
    .await;
    env.await_drained(SCRIPTED).await;
    assert_eq!(emitted().await, 7, "the rewound entries were not run again");
    env.finish().await;
}

/// Ledger pruning copes with entry ids past the signed 64-bit range (a producer may write them):
/// a stream with a pending entry and such a row in its ledger no longer stops pruning for every
/// stream, and horizons compare ids as numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_pruning_survives_entry_ids_past_bigint() {
    let options = Options::new(&[SCRIPTED])
        .set("KALEIDOSCOPE_LEDGER_RETENTION_MS", 1)
        .retries(5, 600_000);
    let env = TestEnv::start(options).await;
    // An entry left pending: its plugin asks for a retry, reclaimed only after ten minutes.
    env.publish(SCRIPTED, &[("action", "retry")]).await;
    eventually("the entry to wait for its retry", || async {
        let retried = env
            .host()
            .state()
            .metrics
            .retried
            .get_or_create(&kaleidoscope::metrics::ByReason {
                stream: SCRIPTED.to_string(),
                plugin: SCRIPTED.to_string(),
                reason: "retryable",
            })
            .get();
        (retried >= 1).then_some(())
    })
    .await;
    // Old ledger rows with ids past bigint: one on the stream with the pending entry, two on
    // another stream.
    let source = env.host().state().source.clone();
    for (stream, id) in [
        (SCRIPTED, "18446744073709551614-0"),
        ("other", "9-9"),
        ("other", "18446744073709551614-5"),
    ] {
        sqlx::query(
            "INSERT INTO processed_entries (source, stream, entry_id, plugin, plugin_version, outcome, processed_at)
             VALUES ($1, $2, $3, 'p', '1', 'processed', now() - interval '1 hour')",
        )
        .bind(&source)
        .bind(stream)
        .bind(id)
        .execute(&env.pool)
        .await
        .expect("an old ledger row");
    }
    eventually("the other stream's rows pruned", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM processed_entries WHERE stream = 'other'")
                .fetch_one(&env.pool)
                .await
                .ok()?;
        (left == 0).then_some(())
    })
    .await;
    let horizon: String = sqlx::query_scalar(
        "SELECT through[1]::text || '-' || through[2]::text FROM ledger_horizons WHERE stream = 'other'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("the other stream's horizon");
    assert_eq!(
        horizon, "18446744073709551614-5",
        "the larger id, as a number"
    );
    // At or after the pending entry: kept, it may still be delivered again.
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_entries WHERE stream = $1 AND entry_id = '18446744073709551614-0'",
    )
    .bind(SCRIPTED)
    .fetch_one(&env.pool)
    .await
    .expect("ledger");
    assert_eq!(kept, 1);
    env.finish().await;
}

/// Redis loses its data (here: every key of the deployment deleted) while no host runs; the next
/// host restores the ledger identity PostgreSQL remembers instead of making a second one, so the
/// entries recorded before are still recognised when Redis delivers them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_started_after_redis_lost_its_data_keeps_the_ledger_identity() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    let first = env.publish(SCRIPTED, &[("action", "ok")]).await;
    env.await_processed(SCRIPTED, &first).await;
    let before = env.host().state().source.clone();
    let mut env = env;
    if let Some(host) = env.host.take() {
        host.shutdown().await;
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", env.prefix))
        .query_async(&mut env.redis.clone())
        .await
        .expect("KEYS");
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut env.redis.clone())
        .await
        .expect("DEL");
    // The same entry comes back (a producer retrying, a restore from an older backup).
    let _: String = redis::cmd("XADD")
        .arg(env.key(SCRIPTED))
        .arg(&first)
        .arg("action")
        .arg("ok")
        .query_async(&mut env.redis.clone())
        .await
        .expect("XADD the same id");
    let env = env.with_host().await;
    assert_eq!(env.host().state().source, before);
    env.await_drained(SCRIPTED).await;
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        1,
        "recognised as finished"
    );
    env.finish().await;
}

/// The scripted plugin with grants on `tables` (besides its usual one).
fn scripted_writing(tables: &[&str]) -> Options {
    let mut options = Options::new(&[SCRIPTED]);
    let mut granted = vec!["\"ml_processing_errors\"".to_string()];
    granted.extend(tables.iter().map(|t| format!("\"{t}\"")));
    options.plugin_sections.insert(
        SCRIPTED.to_string(),
        vec![format!("tables = [{}]", granted.join(", "))],
    );
    options
}

/// A scripted entry running `commands` (see the `commands` action of the mock plugins).
fn commands(json: &str) -> Vec<(String, String)> {
    vec![
        ("action".to_string(), "commands".to_string()),
        ("commands".to_string(), json.to_string()),
    ]
}

async fn run_sql(env: &TestEnv, statements: &[&str]) {
    for sql in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&env.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// A batch equals applying its entries one by one, also across tables tied by `ON DELETE
/// CASCADE`: a child inserted after its parent was deleted and re-created survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_the_order_of_writes_on_tables_tied_by_a_cascade() {
    let env = TestEnv::prepare(scripted_writing(&["parent", "child"])).await;
    run_sql(
        &env,
        &[
            "CREATE TABLE parent (id BIGINT PRIMARY KEY)",
            "CREATE TABLE child (id BIGINT PRIMARY KEY,
                                 parent_id BIGINT NOT NULL REFERENCES parent (id) ON DELETE CASCADE)",
        ],
    )
    .await;
    let entries = [
        commands(r#"[{"insert": "parent", "values": {"id": 1}}]"#),
        commands(r#"[{"insert": "child", "values": {"id": 1, "parent_id": 1}}]"#),
        commands(r#"[{"delete": "parent", "key": {"id": 1}}]"#),
        commands(r#"[{"insert": "parent", "values": {"id": 1}}]"#),
        commands(r#"[{"insert": "child", "values": {"id": 2, "parent_id": 1}}]"#),
    ];
    // In the stream before the host starts: one read, one batch.
    env.publish_many(SCRIPTED, &entries).await;
    let env = env.with_host().await;
    env.await_drained(SCRIPTED).await;
    assert!(
        env.dead_letters().await.is_empty(),
        "{:?}",
        env.dead_letters().await
    );
    let children: Vec<i64> = sqlx::query_scalar("SELECT id FROM child ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .expect("children");
    assert_eq!(children, [2], "what applying the entries one by one leaves");
    env.finish().await;
}

/// Two streams' batches write two tables in opposite orders, each row slowed by a trigger so
/// their row locks overlap: the batches run their stages in table order, and PostgreSQL counts
/// no deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_writing_tables_in_opposite_orders_never_deadlock() {
    let env = TestEnv::prepare(scripted_writing(&["left_side", "right_side"])).await;
    run_sql(
        &env,
        &[
            "CREATE TABLE left_side (id BIGINT PRIMARY KEY, note TEXT)",
            "CREATE TABLE right_side (id BIGINT PRIMARY KEY, note TEXT)",
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$",
            "CREATE TRIGGER slow_left BEFORE INSERT OR UPDATE ON left_side
             FOR EACH ROW EXECUTE FUNCTION slow_row()",
            "CREATE TRIGGER slow_right BEFORE INSERT OR UPDATE ON right_side
             FOR EACH ROW EXECUTE FUNCTION slow_row()",
        ],
    )
    .await;
    let env = env.with_host().await;
    let upsert = |table: &str, id: u32, note: &str| {
        format!(r#"{{"upsert": "{table}", "key": {{"id": {id}}}, "set": {{"note": "{note}"}}}}"#)
    };
    for round in 0..12 {
        // One entry each, published together: the two consumers run them side by side.
        let right_first = commands(&format!(
            "[{}, {}]",
            upsert("right_side", round, "a"),
            upsert("left_side", round, "a")
        ));
        let left_first = commands(&format!(
            "[{}, {}]",
            upsert("left_side", round, "b"),
            upsert("right_side", round, "b")
        ));
        let mut pipe = redis::pipe();
        for (stream, fields) in [(SCRIPTED, &right_first), ("scripted-2", &left_first)] {
            let cmd = pipe.cmd("XADD").arg(env.key(stream)).arg("*");
            for (k, v) in fields {
                cmd.arg(k).arg(v);
            }
        }
        let _: Vec<String> = pipe
            .query_async(&mut env.redis.clone())
            .await
            .expect("XADD both");
    }
    env.await_drained(SCRIPTED).await;
    env.await_drained("scripted-2").await;
    assert!(
        env.dead_letters().await.is_empty(),
        "{:?}",
        env.dead_letters().await
    );
    assert_eq!(deadlocks_after_stopping(env).await, 0);
}

/// Stops the host and waits until every session of the test database is gone (a session's
/// statistics reach `pg_stat_database` when it ends), then reads the database's deadlock count.
async fn deadlocks_after_stopping(mut env: TestEnv) -> i64 {
    if let Some(host) = env.host.take() {
        host.shutdown().await;
    }
    env.pool.close().await;
    let admin = sqlx::PgPool::connect(crate::support::ADMIN_URL)
        .await
        .expect("admin connection");
    let database = env.database.clone();
    eventually("every session of the test database to end", || async {
        let sessions: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(&database)
                .fetch_one(&admin)
                .await
                .ok()?;
        (sessions == 0).then_some(())
    })
    .await;
    let deadlocks: i64 =
        sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = $1")
            .bind(&database)
            .fetch_one(&admin)
            .await
            .expect("pg_stat_database");
    admin.close().await;
    env.finish().await;
    deadlocks
}

/// One outbox message Redis refuses (an emit to a key holding another type) blocks nothing: the
/// messages of its batch and the relay's rows behind it go out, and it stays in the outbox with
/// its error, to be tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_message_redis_refuses_blocks_nothing_behind_it() {
    let mut options = Options::new(&[SCRIPTED]);
    options.plugin_sections.insert(
        SCRIPTED.to_string(),
        vec![
            "tables = [\"ml_processing_errors\"]".to_string(),
            "emit = [\"scripted-out\", \"blocked-out\"]".to_string(),
        ],
    );
    let env = TestEnv::prepare(options).await;
    let mut redis = env.redis.clone();
    let _: () = redis::cmd("SET")
        .arg(env.key("blocked-out"))
        .arg("not a stream")
        .query_async(&mut redis)
        .await
        .expect("SET");
    // One batch: the refused emit first, a good one behind it.
    for (target, note) in [("blocked-out", "refused"), ("scripted-out", "fine")] {
        env.publish(
            SCRIPTED,
            &[("action", "emit"), ("target", target), ("note", note)],
        )
        .await;
    }
    // And a row the relay must publish (its writer crashed before publishing it), behind the
    // refused one.
    sqlx::query(
        "INSERT INTO outbox (stream, fields, created_at)
         VALUES ($1, '[[\"note\", \"relayed\"]]', now() - interval '1 hour')",
    )
    .bind(env.key("scripted-out"))
    .execute(&env.pool)
    .await
    .expect("a stale outbox row");
    let env = env.with_host().await;
    env.await_drained(SCRIPTED).await;
    let notes = eventually("both good messages published", || async {
        let notes: Vec<String> = env
            .entries("scripted-out")
            .await
            .into_iter()
            .flat_map(|(_, fields)| fields.into_iter().map(|(_, v)| v))
            .collect();
        (notes.len() >= 2).then_some(notes)
    })
    .await;
    assert!(
        notes.contains(&"fine".to_string()) && notes.contains(&"relayed".to_string()),
        "{notes:?}"
    );
    let left: Vec<(String, i32, Option<String>)> =
        eventually("only the refused row left", || async {
            let rows: Vec<(String, i32, Option<String>)> =
                sqlx::query_as("SELECT stream, refusals, last_error FROM outbox")
                    .fetch_all(&env.pool)
                    .await
                    .ok()?;
            (rows.len() == 1).then_some(rows)
        })
        .await;
    assert_eq!(left[0].0, env.key("blocked-out"));
    assert!(left[0].1 >= 1);
    assert!(
        left[0]
            .2
            .as_deref()
            .unwrap_or_default()
            .contains("WRONGTYPE"),
        "{left:?}"
    );
    env.finish().await;
}

/// Idle keep-alive clients cannot take the host's file descriptors: past the connection limit a
/// new connection is answered 503 and closed, and the endpoint still answers once they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_clients_cannot_exhaust_the_hosts_descriptors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::prepare(Options::new(&[SCRIPTED])).await;
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("its address").to_string()
    };
    let log = std::fs::File::create(env.host_log("http")).expect("log file");
    let host = crate::support::HostProcess::spawn(
        env.binary(&["run"])
            .env("KALEIDOSCOPE_HTTP_ADDR", &addr)
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    let get = |addr: String| async move {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some((String::from_utf8_lossy(&head).to_string(), stream))
    };
    eventually("the endpoint to answer", || get(addr.clone())).await;
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", host.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = descriptors();
    let mut kept = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..150 {
        let (status, stream) = get(addr.clone()).await.expect("an answer");
        match status.as_str() {
            "HTTP/1.1 200" => served += 1,
            "HTTP/1.1 503" => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
        // Kept open and idle.
        kept.push(stream);
    }
    let during = descriptors();
    assert!(served <= http_limit(), "{served} served at once");
    assert!(refused > 0);
    assert!(
        // (Slack for the host's own connections opening meanwhile.)
        during <= before + http_limit() + 16,
        "{before} descriptors before, {during} with 150 idle clients"
    );
    drop(kept);
    eventually("the endpoint to answer again", || async {
        let (status, _) = get(addr.clone()).await?;
        (status == "HTTP/1.1 200").then_some(())
    })
    .await;
    drop(host);
    env.finish().await;
}

fn http_limit() -> usize {
    kaleidoscope::http::MAX_CONNECTIONS
}

/// No password reaches a message: not in a TOML syntax error (which used to quote the line), an
/// invalid `REDIS_URL`, a `redis+unix://` socket URL's `pass=`, or an unparsable demo database
/// URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_a_message() {
    const SECRET: &str = "hunter2";
    let env = TestEnv::prepare(Options::new(&[SCRIPTED])).await;
    let broken = env.plugins_dir.with_extension("broken.toml");
    std::fs::write(
        &broken,
        format!("redis_password = \"{SECRET}\nbatch_size = 5\n"),
    )
    .expect("write a broken configuration file");
    let cases: Vec<(&str, std::process::Command)> = vec![
        ("a TOML syntax error", {
            let mut c = env.binary(&["config", "check"]);
            c.env("KALEIDOSCOPE_CONFIG", &broken);
            c
        }),
        ("an invalid REDIS_URL", {
            let mut c = env.binary(&["config", "check"]);
            c.env("REDIS_URL", format!("redis//:{SECRET}@cache:6379"));
            c
        }),
        ("a redis+unix URL", {
            let mut c = env.binary(&["config", "check", "--json"]);
            c.env(
                "REDIS_URL",
                format!("redis+unix:///tmp/redis.sock?db=0&pass={SECRET}"),
            );
            c
        }),
        ("an unparsable demo database URL", {
            let mut c = env.binary(&["demo", "--database-url"]);
            c.arg(format!("postgres//demo:{SECRET}@db:5432/demo"));
            c
        }),
    ];
    for (case, mut command) in cases {
        let output = output_within_deadline(&mut command).await;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!said.contains(SECRET), "{case}: {said}");
        assert!(!said.is_empty(), "{case}: said nothing");
    }
    // The syntax error still says where.
    let output = output_within_deadline(
        env.binary(&["config", "check"])
            .env("KALEIDOSCOPE_CONFIG", &broken),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 1"), "{stderr}");
    let _ = std::fs::remove_file(&broken);
    env.finish().await;
}

/// An operator migration edited after it was applied is reported and skipped; it neither stops
/// the host at start nor holds up the files after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_operator_migration_is_reported_not_fatal() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED]).operator_migrations()).await;
    let dir = env.migrations_dir();
    std::fs::write(
        dir.join("001_first.sql"),
        "CREATE TABLE first_table (id BIGINT);",
    )
    .expect("write a migration");
    let mut env = env.with_host().await;
    if let Some(host) = env.host.take() {
        host.shutdown().await;
    }
    std::fs::write(
        dir.join("001_first.sql"),
        "CREATE TABLE first_table (id BIGINT, edited TEXT);",
    )
    .expect("edit the migration");
    std::fs::write(
        dir.join("002_second.sql"),
        "CREATE TABLE second_table (id BIGINT);",
    )
    .expect("write another migration");
    let env = env.with_host().await;
    assert_eq!(
        env.count("SELECT count(*) FROM pg_tables WHERE tablename = 'second_table'")
            .await,
        1,
        "the file after the edited one was applied"
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'first_table' AND column_name = 'edited'"
        )
        .await,
        0,
        "the edited file was not run again"
    );
    env.finish().await;
}

/// A plugin's `timeout_ms` changed in the configuration file applies at the next reload, like
/// its grants: the same plugin file, now cut off at the new deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_call_deadline_applies_on_reload() {
    let options = Options::new(&[SCRIPTED])
        .retries(1, 200)
        .plugin_setting(SCRIPTED, "timeout_ms = 20000");
    let env = TestEnv::start(options).await;
    let slow = [("action", "sleep"), ("millis", "1500")];
    let first = env.publish(SCRIPTED, &slow).await;
    env.await_processed(SCRIPTED, &first).await;
    std::fs::write(
        &env.config_file,
        "[plugins.scripted]\ntables = [\"ml_processing_errors\"]\ntimeout_ms = 300\n",
    )
    .expect("rewrite the configuration file");
    env.host().reload_plugins().await.expect("reload");
    let second = env.publish(SCRIPTED, &slow).await;
    let letter = env.await_dead_letter(SCRIPTED, &second).await;
    assert_eq!(letter["failureKind"], "timeout", "{letter:?}");
    assert!(letter["error"].contains("300ms"), "{}", letter["error"]);
    env.finish().await;
}

/// `plugin deploy` of bytes a host already serves, from a file of another name: deployed as the
/// plugin its manifest names (a file name grants nothing), so it is a redeploy of that plugin,
/// and no second copy appears in the plugins directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploying_served_bytes_under_another_name_redeploys_the_plugin_they_hold() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    let elsewhere = env.plugins_dir.with_extension("upload");
    std::fs::create_dir_all(&elsewhere).expect("a directory for the upload");
    let copy = elsewhere.join("scripted-copy.wasm");
    std::fs::copy(crate::support::plugin_file(SCRIPTED), &copy).expect("copy the plugin");
    let (ok, said) = env.deploy(&copy);
    assert!(ok, "{said}");
    assert!(said.contains("loaded scripted"), "{said}");
    assert!(!env.plugins_dir.join("scripted-copy.wasm").exists());
    assert_eq!(
        env.count("SELECT count(*) FROM plugin_store WHERE name = 'scripted'")
            .await,
        1
    );
    let _ = std::fs::remove_dir_all(&elsewhere);
    env.finish().await;
}

/// What plugins return is bounded in the host: one call may return at most 16 MiB of commands (a
/// `forbidden-command` dead letter beyond), and a batch whose commands reach 32 MiB commits what
/// it has before handling the rest, so 40 answers of 12 MiB never sit in memory at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_plugins_return_is_bounded_per_call_and_per_batch() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED])).await;
    let twelve_mib = (12 << 20).to_string();
    let entries: Vec<Vec<(String, String)>> = (0..40)
        .map(|_| {
            vec![
                ("action".to_string(), "big".to_string()),
                ("bytes".to_string(), twelve_mib.clone()),
            ]
        })
        .collect();
    env.publish_many(SCRIPTED, &entries).await;
    let too_big = env
        .publish(
            SCRIPTED,
            &[("action", "big"), ("bytes", &(17 << 20).to_string())],
        )
        .await;
    // A host of its own, so its peak memory is its alone; one read takes all 41.
    let log = std::fs::File::create(env.host_log("bounded")).expect("log file");
    let mut host = crate::support::HostProcess::spawn(
        env.binary(&["run"])
            .env("KALEIDOSCOPE_CONSUMER_NAME", "bounded")
            .env("KALEIDOSCOPE_BATCH_SIZE", "50")
            .env("KALEIDOSCOPE_PLUGIN_MEMORY_MIB", "128")
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    env.await_drained(SCRIPTED).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", host.id())).expect("status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    let _ = host.kill();
    let letter = env.await_dead_letter(SCRIPTED, &too_big).await;
    assert_eq!(letter["failureKind"], "forbidden-command", "{letter:?}");
    assert!(letter["error"].contains("16 MiB"), "{}", letter["error"]);
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        40
    );
    assert!(
        // Several copies of what a batch holds (statements, set-based arrays, the wire) and a
        // plugin instance's memory: hundreds of MiB, not the gigabytes of 40 answers at once.
        peak_kib < 1 << 20,
        "the host peaked at {} MiB for 480 MiB of answers",
        peak_kib >> 10
    );
    env.finish().await;
}

/// One plugin with sixteen streams and slow calls wants far more instances at once than the
/// engine's pool holds: it waits for its own share, and another plugin's entry is handled
/// meanwhile, never dead-lettered for want of an instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_hungry_for_instances_never_takes_another_plugins() {
    let mut options = Options::new(&["many-streams", SCRIPTED])
        .retries(1, 60_000)
        .set("KALEIDOSCOPE_BATCH_SIZE", 1)
        .set("KALEIDOSCOPE_MAX_BATCH_SIZE", 1)
        .set("KALEIDOSCOPE_MAX_IN_FLIGHT", 20)
        .set("KALEIDOSCOPE_SHUTDOWN_TIMEOUT_MS", 1000);
    options.plugin_sections.insert(
        "many-streams".to_string(),
        vec!["tables = [\"ml_processing_errors\"]".to_string()],
    );
    let env = TestEnv::prepare(options).await;
    // 16 streams × 20 batches in flight = 320 calls blocked for 2 s each at once, if allowed.
    for stream in 1..=16 {
        let entries: Vec<Vec<(String, String)>> = (0..20)
            .map(|_| {
                vec![
                    ("action".to_string(), "block".to_string()),
                    ("millis".to_string(), "2000".to_string()),
                ]
            })
            .collect();
        env.publish_many(&format!("many-{stream}"), &entries).await;
    }
    let env = env.with_host().await;
    let state = env.host().state().clone();
    let calls = |plugin: &str| {
        state
            .metrics
            .calls_in_flight
            .get_or_create(&kaleidoscope::metrics::ByPluginName {
                plugin: plugin.to_string(),
            })
            .get()
    };
    eventually("the hungry plugin to take its share", || async {
        (calls("many-streams") >= 32).then_some(())
    })
    .await;
    let other = env.publish(SCRIPTED, &[("action", "ok")]).await;
    env.await_processed(SCRIPTED, &other).await;
    assert!(calls("many-streams") <= 32, "{}", calls("many-streams"));
    assert!(
        env.dead_letters().await.is_empty(),
        "{:?}",
        env.dead_letters().await
    );
    env.finish().await;
}

/// A manifest may declare at most sixteen streams (each costs a task, a Redis connection and a
/// consumer group): one with seventeen does not load, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_with_too_many_streams_does_not_load() {
    let env = TestEnv::start(Options::new(&["too-many-streams"])).await;
    let failures = env.host().state().registry.snapshot().failures().to_vec();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].reason.contains("17 streams") && failures[0].reason.contains("at most 16"),
        "{}",
        failures[0].reason
    );
    assert!(env.serving("too-many-1").is_none());
    env.finish().await;
}

/// Grants are bound to a name the operator chose, the file's: a file of another name whose
/// manifest claims a granted name (`scripted` here) is refused instead of inheriting the grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_claiming_another_plugins_name_does_not_inherit_its_grants() {
    let env = TestEnv::start(Options::new(&["insights"])).await;
    env.install_plugin(SCRIPTED, "team-b");
    env.host().reload_plugins().await.expect("reload");
    let snapshot = env.host().state().registry.snapshot();
    let failure = snapshot
        .failures()
        .iter()
        .find(|f| f.file.ends_with("team-b.wasm"))
        .expect("the file is refused");
    assert!(
        failure.reason.contains("scripted.wasm") && failure.reason.contains("named after"),
        "{}",
        failure.reason
    );
    assert!(env.serving(SCRIPTED).is_none());
    env.finish().await;
}

/// A plugin's log line cannot forge a line of the host's log or send terminal escapes: line
/// breaks and control characters arrive escaped, on the plugin's own line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_log_lines_cannot_forge_lines_or_escape_to_the_terminal() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED])).await;
    let id = env
        .publish(
            SCRIPTED,
            &[
                ("action", "log"),
                (
                    "note",
                    "hello\n2026-01-01T00:00:00Z  INFO forged: all good\x1b[2J",
                ),
            ],
        )
        .await;
    let host = env.spawn_host("logging");
    env.await_processed(SCRIPTED, &id).await;
    let log = eventually("the plugin's line in the host's log", || async {
        let log = std::fs::read_to_string(env.host_log("logging")).ok()?;
        log.contains("hello").then_some(log)
    })
    .await;
    drop(host);
    assert!(!log.contains('\x1b'), "{log}");
    assert!(
        !log.lines()
            .any(|line| line.contains("INFO forged") && !line.contains("hello")),
        "{log}"
    );
    assert!(log.contains("hello\\n"), "{log}");
    env.finish().await;
}

/// Anyone with Redis access can write to the dead-letter stream; one value that is not UTF-8
/// there does not break `status` or `dlq list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_dead_letter_that_is_not_utf8_breaks_no_listing() {
    let env = TestEnv::start(Options::new(&["panicking"]).retries(1, 200)).await;
    let failed = env.publish("mock-panic", &[("note", "x")]).await;
    env.await_dead_letter("mock-panic", &failed).await;
    let _: String = redis::cmd("XADD")
        .arg(env.key(&env.config.dlq_stream))
        .arg("*")
        .arg("failureKind")
        .arg(&b"odd\xff"[..])
        .arg("sourceStream")
        .arg("mock-panic")
        .query_async(&mut env.redis.clone())
        .await
        .expect("XADD a foreign entry");
    for args in [&["dlq", "list"][..], &["status", "--json"][..]] {
        let output = output_within_deadline(&mut env.binary(args)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("UTF-8") && !stderr.contains("utf-8"),
            "{args:?}: {stderr}"
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("plugin-trap"), "{args:?}: {stdout}{stderr}");
    }
    env.finish().await;
}

/// Every connection of the host's pool held by slow batches is the host being busy, not
/// PostgreSQL being down: the batches waiting for a connection wait without cost, and PostgreSQL
/// is never reported unavailable (the probe has a connection of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_pool_is_not_a_postgresql_outage() {
    let env = TestEnv::prepare(Options::new(&[SCRIPTED]).retries(1, 60_000)).await;
    // 13 s a row: the pool's 16 connections are held past its 10 s wait for a connection.
    run_sql(
        &env,
        &[
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(13); RETURN NEW; END $$",
            "CREATE TRIGGER slow_row BEFORE INSERT ON ml_processing_errors
             FOR EACH ROW EXECUTE FUNCTION slow_row()",
        ],
    )
    .await;
    for stream in [SCRIPTED, "scripted-2"] {
        let entries: Vec<Vec<(String, String)>> = (0..10)
            .map(|_| vec![("action".to_string(), "ok".to_string())])
            .collect();
        env.publish_many(stream, &entries).await;
    }
    let log = std::fs::File::create(env.host_log("busy")).expect("log file");
    let mut host = crate::support::HostProcess::spawn(
        env.binary(&["run"])
            .env("KALEIDOSCOPE_CONSUMER_NAME", "busy")
            .env("KALEIDOSCOPE_BATCH_SIZE", "1")
            .env("KALEIDOSCOPE_MAX_BATCH_SIZE", "1")
            .env("KALEIDOSCOPE_MAX_IN_FLIGHT", "10")
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    eventually("all twenty rows", || async {
        (env.count("SELECT count(*) FROM ml_processing_errors").await == 20).then_some(())
    })
    .await;
    env.await_drained(SCRIPTED).await;
    env.await_drained("scripted-2").await;
    let _ = host.kill();
    let log = std::fs::read_to_string(env.host_log("busy")).expect("the host's log");
    assert!(
        log.contains("pool timed out"),
        "the pool ran out as intended: {log}"
    );
    assert!(!log.contains("PostgreSQL is unavailable"), "{log}");
    assert!(!log.contains("PostgreSQL is reachable again"), "{log}");
    assert!(env.dead_letters().await.is_empty());
    env.finish().await;
}

/// The request tracker decides and marks the requests it republishes before it talks to Redis:
/// while Redis stalls, no row lock of `ml_requests` is held (a batch recording a result on the
/// row goes through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_tracker_holds_no_row_lock_while_it_talks_to_redis() {
    let env = TestEnv::start(Options::new(&[SCRIPTED]).set("ML_TIMEOUT_SECONDS", 1)).await;
    let mut redis = env.redis.clone();
    // Redis accepts no writes for a while: the tracker's XADD waits.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .arg("WRITE")
        .query_async(&mut redis)
        .await
        .expect("CLIENT PAUSE");
    sqlx::query(
        "INSERT INTO ml_requests (correlation_id, stream, fields, expected_results, created_at)
         VALUES ('stalled', 'post-image-processing', '[[\"postId\", \"1\"]]', '{insights}',
                 now() - interval '1 hour')",
    )
    .execute(&env.pool)
    .await
    .expect("a request due for republication");
    eventually("the tracker to take the request", || async {
        let attempts: i32 =
            sqlx::query_scalar("SELECT attempts FROM ml_requests WHERE correlation_id = 'stalled'")
                .fetch_one(&env.pool)
                .await
                .ok()?;
        (attempts >= 1).then_some(())
    })
    .await;
    let published: i64 = redis::cmd("XLEN")
        .arg(env.key("post-image-processing"))
        .query_async(&mut redis)
        .await
        .expect("XLEN");
    let mut tx = env.pool.begin().await.expect("a transaction");
    sqlx::query("SET LOCAL lock_timeout = '300ms'")
        .execute(&mut *tx)
        .await
        .expect("SET LOCAL");
    let touched =
        sqlx::query("UPDATE ml_requests SET error = 'touched' WHERE correlation_id = 'stalled'")
            .execute(&mut *tx)
            .await;
    drop(tx);
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut redis)
        .await
        .expect("CLIENT UNPAUSE");
    assert_eq!(published, 0, "taken before it was published");
    assert!(touched.is_ok(), "the row was locked: {touched:?}");
    env.finish().await;
}

/// Looping entries cannot hold the rest of their batch for one deadline each: after a call runs
/// to its deadline, what the batch handled so far commits before the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_entries_do_not_hold_their_batch_for_a_deadline_each() {
    let options = Options::new(&[SCRIPTED])
        .retries(1, 60_000)
        .plugin_setting(SCRIPTED, "timeout_ms = 1500");
    let env = TestEnv::prepare(options).await;
    let first = env.publish(SCRIPTED, &[("action", "ok")]).await;
    for _ in 0..3 {
        env.publish(SCRIPTED, &[("action", "loop")]).await;
    }
    let env = env.with_host().await;
    env.await_processed(SCRIPTED, &first).await;
    let decided: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_entries WHERE outcome = 'dead-lettered'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("ledger");
    assert!(
        decided < 3,
        "the first entry committed only after all three loops ({decided} decided)"
    );
    env.await_drained(SCRIPTED).await;
    env.finish().await;
}

/// A batch's outbox rows can look old to the relay the moment they commit (the rows' time is the
/// transaction's start, and a transaction can be long): the relay and the batch then both want to
/// publish them, and one of them must win. Here Redis stalls while both wait on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_is_published_once_when_the_relay_reaches_it_too() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    // Every outbox row looks an hour old (a long transaction), and commits half a second late.
    run_sql(
        &env,
        &[
            "CREATE FUNCTION old_and_slow() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(0.5); NEW.created_at := now() - interval '1 hour'; RETURN NEW; END $$",
            "CREATE TRIGGER old_and_slow BEFORE INSERT ON outbox
             FOR EACH ROW EXECUTE FUNCTION old_and_slow()",
        ],
    )
    .await;
    let mut redis = env.redis.clone();
    // The host's own kind of connection (patient enough to outlast the pause below).
    let relay_redis =
        kaleidoscope::redis_connection::RedisClient::new(crate::support::REDIS_URL, &[])
            .expect("redis url")
            .shared()
            .await
            .expect("a connection for the relay");
    env.publish(
        SCRIPTED,
        &[
            ("action", "emit"),
            ("target", "scripted-out"),
            ("note", "once"),
        ],
    )
    .await;
    eventually("the entry to be read", || async {
        (env.pending(SCRIPTED).await == 1).then_some(())
    })
    .await;
    // Redis takes no writes for a moment: the batch's publish after its commit waits, and so does
    // the relay's, run here as soon as the row is committed.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("WRITE")
        .query_async(&mut redis)
        .await
        .expect("CLIENT PAUSE");
    eventually("the batch to commit its outbox row", || async {
        (env.count("SELECT count(*) FROM outbox").await >= 1).then_some(())
    })
    .await;
    kaleidoscope::persist::outbox::relay(&env.pool, &relay_redis)
        .await
        .expect("a relay round");
    env.await_drained(SCRIPTED).await;
    eventually("the outbox to empty", || async {
        (env.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let emitted = env.entries("scripted-out").await;
    assert_eq!(emitted.len(), 1, "{emitted:?}");
    env.finish().await;
}

/// A huge entry cannot make a dead letter larger than a dead letter may be (one Redis might
/// refuse, blocking the entry): its large values are cut, and the letter says which, so replay
/// refuses to pass the cut text off as the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_entry_makes_a_bounded_dead_letter() {
    let env = TestEnv::start(Options::new(&[SCRIPTED]).retries(1, 200)).await;
    let huge = "y".repeat(20 << 20);
    let id = env
        .publish(SCRIPTED, &[("action", "malformed"), ("payload", &huge)])
        .await;
    let letter = env.await_dead_letter(SCRIPTED, &id).await;
    assert!(
        letter["fields"].len() <= kaleidoscope::dead_letter::MAX_FIELDS_BYTES,
        "{} bytes of fields",
        letter["fields"].len()
    );
    assert_eq!(letter.get("bytesLost").map(String::as_str), Some("payload"));
    assert!(letter["fields"].contains("bytes cut"));
    env.finish().await;
}

/// A column dropped while the host runs: the catalogue it checks commands against is read again,
/// and an entry still writing the column is dead-lettered as a forbidden command naming it, not
/// as whatever error the stale check let through to the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_column_is_seen_by_the_checks() {
    let env = TestEnv::prepare(scripted_writing(&["notes"]).retries(3, 200)).await;
    run_sql(
        &env,
        &["CREATE TABLE notes (id BIGSERIAL PRIMARY KEY, body TEXT, extra TEXT)"],
    )
    .await;
    let env = env.with_host().await;
    let write_extra = [
        ("action", "write-table"),
        ("table", "notes"),
        ("column", "extra"),
        ("note", "x"),
    ];
    let first = env.publish(SCRIPTED, &write_extra).await;
    env.await_processed(SCRIPTED, &first).await;
    run_sql(&env, &["ALTER TABLE notes DROP COLUMN extra"]).await;
    let second = env.publish(SCRIPTED, &write_extra).await;
    let letter = env.await_dead_letter(SCRIPTED, &second).await;
    assert_eq!(letter["failureKind"], "forbidden-command", "{letter:?}");
    assert!(letter["error"].contains("extra"), "{}", letter["error"]);
    env.finish().await;
}

/// A producer cannot make its entries vanish by marking them as replays of another entry: a mark
/// without the proof only `dlq replay` can make is ignored, and each entry is itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_replay_mark_cannot_make_entries_vanish() {
    let env = TestEnv::start(Options::new(&[SCRIPTED])).await;
    for note in ["first", "second"] {
        let id = env
            .publish(
                SCRIPTED,
                &[
                    ("action", "ok"),
                    ("note", note),
                    (REPLAY_OF_FIELD, "1-1"),
                    (REPLAY_PROOF_FIELD, "0000"),
                ],
            )
            .await;
        env.await_processed(SCRIPTED, &id).await;
    }
    assert_eq!(
        env.count("SELECT count(*) FROM ml_processing_errors").await,
        2,
        "both entries were applied"
    );
    env.finish().await;
}
