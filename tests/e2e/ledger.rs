//! The processed-entry ledger keeps to its retention window, but never forgets an entry that
//! Redis may still deliver again.

use crate::support::{Options, TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_ledger_rows_are_pruned_except_those_of_pending_entries() {
    let env =
        TestEnv::prepare(Options::new(&["scripted"]).set("KALEIDOSCOPE_LEDGER_RETENTION_MS", 300))
            .await;
    let key = env.key("scripted");
    let group = env.config.consumer_group.clone();
    let mut redis = env.redis.clone();
    // An entry that a host read, committed and then crashed before acknowledging: still pending
    // (with another consumer, idle for less than the reclaim time), and in the ledger.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(&group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await
        .unwrap();
    let pending = env.publish("scripted", &[("action", "ok")]).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("crashed-host")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut redis)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO processed_entries (stream, entry_id, plugin, plugin_version, processed_at) VALUES
            ('scripted', $1, 'scripted', '0.1.0', now() - interval '1 hour'),
            ('scripted', '1-0', 'scripted', '0.1.0', now() - interval '1 hour'),
            ('scripted', '2-0', 'scripted', '0.1.0', now() + interval '1 hour'),
            ('gone-stream', '3-0', 'scripted', '0.1.0', now() - interval '1 hour')",
    )
    .bind(&pending)
    .execute(&env.pool)
    .await
    .unwrap();

    let env = env.with_host().await;
    let remaining = |env: &TestEnv| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT entry_id FROM processed_entries ORDER BY entry_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let left = eventually("old ledger rows to be pruned", || async {
        let left = remaining(&env).await;
        (!left.contains(&"1-0".to_string()) && !left.contains(&"3-0".to_string())).then_some(left)
    })
    .await;
    assert!(
        left.contains(&pending),
        "a pending entry keeps its row: {left:?}"
    );
    assert!(
        left.contains(&"2-0".to_string()),
        "a row inside the retention window stays: {left:?}"
    );
    env.finish().await;
}

/// The ledger tells deployments apart: two hosts with different stream prefixes sharing one
/// PostgreSQL each process their own entry with the same stream and id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_sharing_a_database_do_not_take_each_others_entries_for_processed() {
    let options = || {
        let mut options = Options::new(&[crate::support::SCRIPTED]);
        options.plugin_sections.insert(
            crate::support::SCRIPTED.to_string(),
            vec!["tables = [\"deployment_notes\"]".to_string()],
        );
        options
    };
    let first = TestEnv::prepare(options()).await;
    sqlx::query("CREATE TABLE deployment_notes (id bigserial PRIMARY KEY, note text NOT NULL)")
        .execute(&first.pool)
        .await
        .expect("create the notes table");
    let first = first.with_host().await;
    // A second deployment: its own prefix (and so its own ledger identity), the same database.
    let mut second = TestEnv::prepare(options()).await;
    second.config.database_url = first.database_url.clone();
    let second = second.with_host().await;
    let id = "1700000000000-0";
    for env in [&first, &second] {
        let _: String = redis::cmd("XADD")
            .arg(env.key(crate::support::SCRIPTED))
            .arg(id)
            .arg("action")
            .arg("write-table")
            .arg("table")
            .arg("deployment_notes")
            .arg("column")
            .arg("note")
            .arg("note")
            .arg(&env.prefix)
            .query_async(&mut env.redis.clone())
            .await
            .expect("XADD with an explicit id");
    }
    first.await_drained(crate::support::SCRIPTED).await;
    second.await_drained(crate::support::SCRIPTED).await;
    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM deployment_notes ORDER BY note")
        .fetch_all(&first.pool)
        .await
        .expect("notes");
    let mut expected = vec![first.prefix.clone(), second.prefix.clone()];
    expected.sort();
    assert_eq!(notes, expected, "each deployment processed its own entry");
    second.finish().await;
    first.finish().await;
}

/// A redelivery (a rewind) that races the prune of its own ledger row: the claim's insert waits
/// for the prune's delete, and once the prune commits, the row is gone and the insert goes in.
/// The prune's new horizon, committed with the delete, is what must stop the entry — though the
/// claim's statement began before it. Both ways of recording (a batch's claim and the
/// entry-by-entry record) refuse the forgotten entry, keep no row of it, and take the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_racing_the_prune_of_its_ledger_row_does_not_run_again() {
    use kaleidoscope::persist::ledger::{self, Handler, Outcome};
    let env = TestEnv::prepare(Options::new(&[])).await;
    let handler = Handler {
        name: "scripted",
        version: "0.1.0",
        build: "000000000000",
    };
    sqlx::query(
        "INSERT INTO processed_entries (source, stream, entry_id, plugin, plugin_version, processed_at)
         VALUES ('src', 'scripted', '5-0', 'scripted', '0.1.0', now() - interval '1 hour'),
                ('src', 'scripted', '7-0', 'scripted', '0.1.0', now() - interval '1 hour')",
    )
    .execute(&env.pool)
    .await
    .expect("the rows of two finished entries");

    // The batch's claim of 5-0 (forgotten by the prune) and 6-0 (new).
    let prune = forgetting(&env, "5-0").await;
    let pool = env.pool.clone();
    let claim = tokio::spawn(async move {
        let mut tx = pool.begin().await.expect("begin the batch");
        let entries = [("5-0", Outcome::Processed), ("6-0", Outcome::Processed)]
            .map(|(id, outcome)| (id.to_string(), outcome));
        let claimed = ledger::claim(&mut tx, "src", "scripted", handler, &entries)
            .await
            .expect("the claim");
        tx.commit().await.expect("commit the batch");
        claimed
    });
    until_a_statement_waits_for_the_prune(&env).await;
    prune.commit().await.expect("the prune commits");
    let claimed = claim.await.expect("the claim's task");
    assert_eq!(claimed, ["6-0".to_string()].into(), "only the new entry");

    // The entry-by-entry path's record of 7-0 (forgotten by the next prune).
    let prune = forgetting(&env, "7-0").await;
    let pool = env.pool.clone();
    let record = tokio::spawn(async move {
        let mut tx = pool.begin().await.expect("begin the entry");
        let recorded = ledger::record(
            &mut tx,
            "src",
            "scripted",
            "7-0",
            handler,
            Outcome::Processed,
        )
        .await
        .expect("the record");
        tx.commit().await.expect("commit the entry");
        recorded
    });
    until_a_statement_waits_for_the_prune(&env).await;
    prune.commit().await.expect("the prune commits");
    assert!(
        !record.await.expect("the record's task"),
        "a forgotten entry is not recorded as new"
    );

    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT entry_id FROM processed_entries WHERE source = 'src' ORDER BY entry_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("the ledger");
    assert_eq!(rows, ["6-0"], "no row of a forgotten entry is left");
    env.finish().await;
}

/// A prune of the row of `id`, stopped before its commit: the row deleted and the horizon moved
/// to `id`, as `ledger::prune` does in one statement.
async fn forgetting(env: &TestEnv, id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut prune = env.pool.begin().await.expect("begin the prune");
    let (ms, seq) = id.split_once('-').expect("an entry id");
    sqlx::query("DELETE FROM processed_entries WHERE source = 'src' AND entry_id = $1")
        .bind(id)
        .execute(&mut *prune)
        .await
        .expect("the prune's delete");
    sqlx::query(
        "INSERT INTO ledger_horizons (source, stream, through)
         VALUES ('src', 'scripted', ARRAY[$1::numeric, $2::numeric])
         ON CONFLICT (source, stream) DO UPDATE SET through = EXCLUDED.through",
    )
    .bind(ms)
    .bind(seq)
    .execute(&mut *prune)
    .await
    .expect("the prune's horizon");
    prune
}

/// Polls until a statement on the ledger waits for a lock (the prune's delete).
async fn until_a_statement_waits_for_the_prune(env: &TestEnv) {
    eventually("the claim to wait for the prune", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND query LIKE '%processed_entries%'",
        )
        .fetch_one(&env.pool)
        .await
        .ok()?;
        (waiting > 0).then_some(())
    })
    .await;
}
