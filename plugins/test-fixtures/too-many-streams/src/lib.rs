//! TEST FIXTURE — never deploy. A manifest declaring seventeen streams, one more than a plugin
//! may consume (each costs the host a task, a Redis connection and a consumer group).

behaviours::mock_plugin!(
    "too-many-streams",
    [
        "too-many-1",
        "too-many-2",
        "too-many-3",
        "too-many-4",
        "too-many-5",
        "too-many-6",
        "too-many-7",
        "too-many-8",
        "too-many-9",
        "too-many-10",
        "too-many-11",
        "too-many-12",
        "too-many-13",
        "too-many-14",
        "too-many-15",
        "too-many-16",
        "too-many-17"
    ],
    "ok"
);
