//! Kaleidoscope Host: reads the ML result streams of the Kaleidoscope backend from Redis Streams,
//! hands each entry to the WebAssembly handler plugin that declares its stream, and persists the
//! commands the handler returns into PostgreSQL — exactly once, acknowledging an entry only after
//! its effects have committed.
//!
//! One entry's way through the code: [`consumer`] reads it (`XREADGROUP`, or `XAUTOCLAIM` when
//! it is overdue) with the commands in [`streams`]; [`delivery`] runs the protocol on its batch —
//! triage, the plugin's `handle` in its sandbox ([`plugin`]), checking and planning the commands
//! ([`persist`]), one transaction with the ledger and outbox rows, publishing and acknowledging.
//! The steps are told once, in [`delivery`]'s docs; what a failure means is [`failure`]'s.
//!
//! Around it:
//! - [`host`]: start-up, shutdown, plugin **reload** and the consumers that follow it, and the
//!   background chores (heartbeat, probe, request tracker, ledger pruning, **outbox relay**);
//! - [`state`]: what a running host shares — configuration, connections, plugins, health,
//!   metrics, schema catalogue;
//! - [`config`]: settings from file, environment and flags, and what the operator allows each
//!   plugin; [`redis_connection`] and [`persist::connect`]: the one way to open connections;
//! - [`failure`]: what a failure means (an outage, a lost group, retryable, permanent), decided in
//!   one place; [`backoff`]: the one schedule of pauses after failures; [`shutdown`]: telling tasks
//!   to stop;
//! - [`heartbeat`]: the document each host keeps fresh in Redis; [`status`]: what
//!   `kaleidoscope status` makes of those and of the streams; [`health`]: whether PostgreSQL and
//!   Redis answer; [`metrics`] and [`http`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`requests`]: the other direction — publishing requests to the ML services and tracking them
//!   until their results arrive; [`ml`]: the ML side's stream and service names, listed once;
//!   [`simulate`]: a reference ML service for demos and tests;
//! - [`rollout`]: a candidate version beside the live one — shadow, canary by key, automatic
//!   rollback; it enters the protocol in `delivery/candidate.rs`;
//! - [`reprocess`]: entries already in a stream run again through a chosen build — backfill and
//!   repair, once per run, resumable; it enters the protocol in `delivery/reprocessing.rs`;
//! - **CLI** — [`cli`]: one function per subcommand; [`dead_letter::admin`] (`dlq list/replay`),
//!   [`toolkit`] (`plugin check/exec`), [`deploy`] (`plugin deploy`, `rollout …`),
//!   [`bench`](mod@bench), [`demo`] (both show [`progress`]);
//! - [`text`]: making outside text (plugin reasons, log lines) safe to store; [`python_env`]:
//!   the Python environments the tools make on first use.
//!
//! The modules form layers, each using only those below it (a test checks that no import cycle
//! forms): the leaves ([`allocator`], [`text`], [`failure`], [`backoff`], [`shutdown`], [`ml`], [`logging`],
//! [`python_env`]);
//! [`plugin`] (which knows nothing of configuration or the protocol); [`config`]; [`streams`],
//! [`redis_connection`], [`health`]; [`persist`]; [`dead_letter`]; [`rollout`]; [`metrics`],
//! [`heartbeat`];
//! [`state`]; [`delivery`]; [`consumer`]; [`host`], [`requests`], [`status`], [`http`]; and the
//! tools on top ([`cli`], [`bench`](mod@bench), [`demo`], [`simulate`], [`authoring`],
//! [`toolkit`], [`deploy`], [`reprocess`]).

pub mod allocator;
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
pub mod python_env;
pub mod redis_connection;
pub mod reprocess;
pub mod requests;
pub mod rollout;
pub mod shutdown;
pub mod simulate;
pub mod state;
pub mod status;
pub mod streams;
pub mod text;
pub mod toolkit;

#[cfg(test)]
mod layout_tests;
