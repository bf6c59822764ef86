//! TEST FIXTURE — never deploy. A handler that takes `millis` (default 200) ms per entry, then succeeds.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("slow", ["mock-slow"], "sleep");
