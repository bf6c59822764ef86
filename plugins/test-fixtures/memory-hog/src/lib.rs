//! TEST FIXTURE — never deploy. A handler that allocates memory without bound.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("memory-hog", ["mock-hog"], "grow");
