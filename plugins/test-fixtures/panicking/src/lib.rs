//! TEST FIXTURE — never deploy. A handler that panics on every entry.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("panicking", ["mock-panic"], "panic");
