//! TEST FIXTURE — never deploy. A handler that writes the table named by the entry's `table` field.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!("trespasser", ["mock-trespass"], "write-table");
