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
