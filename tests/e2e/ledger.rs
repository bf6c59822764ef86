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
