//! TEST FIXTURE — never deploy. A handler that never returns.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("looping", ["mock-loop"], "loop");
