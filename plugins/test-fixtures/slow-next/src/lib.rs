//! TEST FIXTURE — never deploy. The `slow` mock under version 0.2.0 (same name and stream), for
//! tests that swap it in while an entry is in the 0.1.0 handler.

behaviours::mock_plugin!("slow", ["mock-slow"], "sleep");
