//! TEST FIXTURE — never deploy. A handler of sixteen streams (the most a manifest may declare),
//! each entry's `action` field choosing what it does: with slow calls on every stream it wants
//! far more instances at once than a plugin may have.
//! See the `behaviours` crate for what each action does.

behaviours::mock_plugin!(
    "many-streams",
    [
        "many-1", "many-2", "many-3", "many-4", "many-5", "many-6", "many-7", "many-8", "many-9",
        "many-10", "many-11", "many-12", "many-13", "many-14", "many-15", "many-16"
    ],
    scripted
);
