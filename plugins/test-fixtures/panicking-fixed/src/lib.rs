//! TEST FIXTURE — never deploy. The `panicking` mock after its bug was fixed: same plugin name
//! and stream, version 0.2.0, and it succeeds. Used to show that dead letters replayed after a
//! fix are processed. See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("panicking", ["mock-panic"], "ok");
