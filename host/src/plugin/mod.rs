//! Handler plugins: WebAssembly components implementing `wit/handler.wit`.
//!
//! - [`engine`] compiles components and loads them (one engine, every supported contract, a
//!   cache of compiled components);
//! - [`call`] calls them inside the [`sandbox`] (epoch deadline, memory cap, no file system,
//!   network or environment; an instance reused within a batch, fresh after any trap), and
//!   [`trap`] reports a call that trapped;
//! - [`registry`] holds the set of loaded plugins, swappable as a whole so a reload never
//!   disturbs a batch in flight, and computes the next set when files change;
//! - [`watch`] notices those changes.
//!
//! What the operator allows each plugin (grants, limits) is configuration
//! ([`crate::config::PluginPolicy`]); what a call's outcome means for its entry is the delivery
//! protocol's ([`crate::delivery::outcome`]). This layer depends on neither.

pub mod call;
pub mod engine;
mod function_cache;
mod older_contracts;
pub mod output;
pub mod readable;
pub mod registry;
pub mod sandbox;
pub mod trap;
pub mod watch;

/// Bindings generated from `wit/handler.wit`; the types of the contract (entries, commands,
/// values, failures) as the host sees them.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "result-handler",
        // Calls are async so that a plugin blocked inside a host call (a WASI sleep or poll) can
        // be cut off at its deadline: the call is a future the host stops polling.
        exports: { default: async },
        // A rollout's shadow compares two versions' values.
        additional_derives: [PartialEq],
    });
}

/// Bindings of the 0.2.0 contract (`wit/v0.2.0/handler.wit`), so plugins built against it keep
/// loading unchanged; `older_contracts.rs` turns their values into the current contract's.
#[allow(missing_docs, clippy::all)]
pub mod bindings_v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "result-handler",
        exports: { default: async },
    });
}

/// Bindings of the 0.1.0 contract (`wit/v0.1.0/handler.wit`), likewise.
#[allow(missing_docs, clippy::all)]
pub mod bindings_v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "result-handler",
        exports: { default: async },
    });
}

/// The contract's data types, re-exported under a short name for the rest of the host.
pub use bindings::kaleidoscope::handler::types as wit;

pub use registry::{LoadFailure, PluginRegistry, PluginSet};

/// The contract new plugins are built against (`wit/handler.wit`).
pub const CONTRACT_VERSION: &str = "0.3.0";
/// Every contract version the host loads, oldest first (for `kaleidoscope_build_info`).
pub const CONTRACTS_LOADED: &str = "0.1.0,0.2.0,0.3.0";

/// Writes `bytes` to `path` so that no reader ever sees part of them: into a file beside it (its
/// name never ends in `.wasm`, and is unique to this write, so concurrent writers of one path
/// never share it), then renamed over `path`. How plugin files, compiled components and
/// compiled functions are written.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("tmp{}-{write}", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })
}

/// A build's short identity: the first 12 hex digits of its [`sha256_hex`]. Every build made
/// during development carries the same manifest version; the ledger, dead letters, logs,
/// `status` and `plugin deploy` tell them apart by this.
pub fn build_of(sha256: &str) -> &str {
    &sha256[..sha256.len().min(12)]
}

/// The SHA-256 of a plugin file, hex: how plugins are told apart (unchanged files are not
/// reloaded, compiled components are cached under it, status shows it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
pub use call::{CallSession, HandlerOutcome, Plugin};
pub use engine::{PluginRuntime, compile_in_child_processes, compile_to_file};
pub use sandbox::{SandboxLimits, Settings};
