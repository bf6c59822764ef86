//! Kaleidoscope Host: reads the ML result streams of the Kaleidoscope backend from Redis Streams,
//! hands each entry to the WebAssembly handler plugin that declares its stream, and persists the
//! commands the handler returns into PostgreSQL — exactly once, acknowledging an entry only after
//! its effects have committed.
//!
//! Where things happen:
//! - [`consumer`]: one task per stream reads (`XREADGROUP`) and reclaims (`XAUTOCLAIM`) entries;
//! - [`delivery`]: the delivery protocol for one batch, one module per step — triage, dispatch
//!   to the plugin, commit (with [`persist::plan`]), acknowledge;
//! - [`state`]: what a running host shares — configuration, connections, plugins, health,
//!   metrics, schema catalogue;
//! - [`plugin`]: loading and sandboxing handler components;
//! - [`persist`]: the database — schema catalogue, command validation and execution, ledger,
//!   outbox;
//! - [`streams`]: the Redis Streams commands the host uses;
//! - [`publish`]: the other direction — publishing requests to the ML services and tracking
//!   them until their results arrive; [`simulate`]: a reference ML service for demos and tests;
//! - [`config`]: settings from file and environment;
//! - [`health`]: readiness (PostgreSQL and Redis reachable); [`metrics`] and [`http`]:
//!   `/metrics`, `/healthz`, `/readyz`;
//! - [`bench`]: `kaleidoscope bench`, throughput and latency against a reference consumer;
//! - [`dlq`]: listing and replaying dead letters; [`demo`]: everything at once, for newcomers;
//! - [`status`]: what `kaleidoscope status` reports, and the heartbeat hosts publish for it;
//! - [`text`]: making outside text (plugin reasons, log lines) safe to store;
//! - [`toolkit`]: `kaleidoscope plugin check` and `plugin exec` for plugin authors.

pub mod bench;
pub mod config;
pub mod consumer;
pub mod deadletter;
pub mod delivery;
pub mod demo;
pub mod dlq;
pub mod health;
pub mod host;
pub mod http;
pub mod metrics;
pub mod persist;
pub mod plugin;
pub mod publish;
pub mod simulate;
pub mod state;
pub mod status;
pub mod streams;
pub mod text;
pub mod toolkit;
