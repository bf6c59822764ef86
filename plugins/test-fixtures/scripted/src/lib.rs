//! TEST FIXTURE — never deploy. A handler whose behaviour each entry chooses with its `action` field.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("scripted", ["scripted", "scripted-2"], scripted);
