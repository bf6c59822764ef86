//! TEST FIXTURE — never deploy. A plugin that claims `mock-slow`, the stream of the `slow` fixture,
//! so a test can deploy a file the host must refuse (the stream is taken) and then unblock it.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("rival", ["mock-slow"], "ok");
