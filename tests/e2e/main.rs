//! End-to-end tests: the real host, real Redis, real PostgreSQL and real plugin components.
//!
//! Every test gets its own database and stream prefix (see `support`), so they run in parallel.
//! Build the plugins first (`./scripts/build-plugins`); `./scripts/test` does both.

// Row tuples mirror the SELECT lists they are read from; naming each would hide that.
#![allow(clippy::type_complexity)]
mod support;

mod attacks;
mod authoring;
mod batches;
mod bench;
mod cli;
mod cluster;
mod contract;
mod dead_letters;
mod demo;
mod deployment;
mod face_detection;
mod face_recognition;
mod faults;
mod fuzz;
mod hostile;
mod hot_reload;
mod insights;
mod ledger;
mod ml_errors;
mod observability;
mod plugin_store;
mod protocol;
mod python;
mod redis_cluster;
mod reprocess;
mod requests;
mod rollouts;
mod sandbox;
mod toolkit;
mod user_face_embeddings;
