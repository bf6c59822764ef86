//! Kaleidoscope Host: reads the ML result streams of the Kaleidoscope backend from Redis Streams,
//! hands each entry to the WebAssembly handler plugin that declares its stream, and persists the
//! commands the handler returns into PostgreSQL — exactly once, acknowledging an entry only after
//! its effects have committed.
//!
//! One entry's way through the code:
//! 1. **read** — [`consumer`]: one task per stream reads (`XREADGROUP`) and reclaims
//!    (`XAUTOCLAIM`) entries, using the commands in [`streams`];
//! 2. **triage** — `delivery/triage.rs`: entries already in the ledger, unreadable, or replayed;
//! 3. **dispatch** — `delivery/dispatch.rs`: the plugin's `handle` runs in its sandbox
//!    ([`plugin`]);
//! 4. **commit** — `delivery/commit.rs`: the batch's commands are checked
//!    ([`persist::validate`]), planned ([`persist::plan`]) and executed ([`persist::batch`])
//!    in one transaction with the [`persist::ledger`] rows and [`persist::outbox`] messages;
//!    failures become retries or [`dead_letter`]s;
//! 5. **ack** — `delivery/ack.rs`: outbox messages are published, then the entries acknowledged.
//!
//! Around it:
//! - [`host`]: start-up, shutdown, plugin **reload** and the consumers that follow it, and the
//!   background chores (heartbeat, probe, request tracker, ledger pruning, **outbox relay**);
//! - [`state`]: what a running host shares — configuration, connections, plugins, health,
//!   metrics, schema catalogue;
//! - [`config`]: settings from file, environment and flags; [`redis_connection`] and
//!   [`persist::connect`]: the one way to open connections;
//! - [`heartbeat`]: the document each host keeps fresh in Redis; [`status`]: what
//!   `kaleidoscope status` makes of those and of the streams; [`health`]: whether PostgreSQL and
//!   Redis answer; [`metrics`] and [`http`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`requests`]: the other direction — publishing requests to the ML services and tracking them
//!   until their results arrive; [`simulate`]: a reference ML service for demos and tests;
//! - **CLI** — [`cli`]: one function per subcommand; [`dead_letter::admin`] (`dlq list/replay`),
//!   [`toolkit`] (`plugin check/exec`), [`deploy`] (`plugin deploy`), [`bench`](mod@bench),
//!   [`demo`] (both show [`progress`]);
//! - [`text`]: making outside text (plugin reasons, log lines) safe to store.

pub mod authoring;
pub mod backoff;
pub mod bench;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod delivery;
pub mod demo;
pub mod deploy;
pub mod failure;
pub mod health;
pub mod heartbeat;
pub mod host;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod ml;
pub mod persist;
pub mod plugin;
pub mod progress;
pub mod redis_connection;
pub mod requests;
pub mod shutdown;
pub mod simulate;
pub mod state;
pub mod status;
pub mod streams;
pub mod text;
pub mod toolkit;
