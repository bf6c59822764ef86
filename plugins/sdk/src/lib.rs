//! The Kaleidoscope plugin SDK: everything a result handler needs besides its own logic.
//!
//! A handler is a WebAssembly component that turns one Redis Streams entry into a list of
//! persistence commands (see `wit/handler.wit`). This crate generates the bindings for that
//! contract once, so a plugin crate only
//!
//! 1. implements [`Handler`] (`manifest` and `handle`),
//! 2. calls [`export_handler!`] on its type,
//! 3. builds with `cargo build --target wasm32-wasip2 --release`.
//!
//! The helpers cover what every handler of the real ML streams needs: reading fields that are
//! absent, empty or `"null"` ([`Fields`]), numbers and booleans sent as strings, JSON lists inside a
//! field (with the original consumer's comma-split fallback), and building commands without
//! spelling out the WIT records ([`upsert`], [`update`], [`insert`], [`delete`], [`emit`]).
//!
//! ```ignore
//! use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest};
//!
//! struct Greetings;
//!
//! impl Handler for Greetings {
//!     fn manifest() -> Manifest {
//!         sdk::manifest("greetings", env!("CARGO_PKG_VERSION"), &["greetings"])
//!     }
//!     fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
//!         let fields = Fields::new(&entry);
//!         let user_id = fields.required_i64("userId")?;
//!         Ok(vec![sdk::upsert("greetings").key("user_id", user_id).set("seen", true).into()])
//!     }
//! }
//!
//! sdk::export_handler!(Greetings);
//! ```

mod commands;
mod fields;

/// The generated bindings of `wit/handler.wit`. Plugins rarely need this module directly: the
/// useful types are re-exported at the crate root.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "result-handler",
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "::kaleidoscope_plugin_sdk::bindings",
    });
}

pub use bindings::Guest as Handler;
pub use bindings::export_handler;
pub use bindings::kaleidoscope::handler::types::{
    ColumnOp, ColumnSet, ColumnValue, Command, Condition, Delete, Emit, Entry, Failure, IfMissing,
    Insert, Manifest, OnConflict, Update, Upsert, Value,
};
pub use commands::{
    DeleteBuilder, InsertBuilder, UpdateBuilder, UpsertBuilder, delete, emit, insert, update,
    upsert,
};
pub use fields::{Fields, parse_bool, parse_f64, parse_f64_list, parse_i64, parse_string_list};

/// Builds the manifest a plugin returns from [`Handler::manifest`].
///
/// Pass `env!("CARGO_PKG_VERSION")` as the version so the ledger records which build handled an
/// entry.
pub fn manifest(name: &str, version: &str, streams: &[&str]) -> Manifest {
    Manifest {
        name: name.to_string(),
        version: version.to_string(),
        streams: streams.iter().map(|s| s.to_string()).collect(),
    }
}

/// The command that records, on the request tracked under `correlation_id` (table
/// `ml_requests`), that the result `result` has arrived. Requests this host did not publish are
/// not tracked: then the command does nothing. The database completes the request once every
/// expected result is in.
pub fn request_result(correlation_id: &str, result: &str) -> Command {
    update("ml_requests")
        .key("correlation_id", correlation_id)
        .append_unique("results_received", [result])
        .if_missing(IfMissing::Skip)
        .into()
}

/// A failure for an entry that can never succeed; the host dead-letters it at once as `malformed`.
/// Name the field and what was wrong with it.
pub fn malformed(reason: impl Into<String>) -> Failure {
    Failure::Malformed(reason.into())
}

/// A failure for an entry that may succeed later; the host retries it after the reclaim idle time
/// and dead-letters it as `retries-exhausted` when the attempts run out.
pub fn retry(reason: impl Into<String>) -> Failure {
    Failure::Retry(reason.into())
}

/// The operator's settings for this plugin: the `[plugins.<name>.settings]` table of the host's
/// configuration, reloaded while the host runs (contract 0.3.0). Read a setting on every call
/// (it is a cheap host call) so a change applies from the next entry on, and fall back to a
/// documented default when it is not set.
pub mod config {
    #[cfg(not(target_arch = "wasm32"))]
    use std::{cell::RefCell, collections::BTreeMap};

    #[cfg(not(target_arch = "wasm32"))]
    thread_local! {
        static NATIVE: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    }

    /// The setting `key` as text (numbers and booleans in their TOML spelling), or `None` when
    /// the operator did not set it. Compiled natively (a plugin's own `cargo test`), it returns
    /// what [`set`] gave on this thread.
    pub fn get(key: &str) -> Option<String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::kaleidoscope::handler::config::get(key);
        #[cfg(not(target_arch = "wasm32"))]
        NATIVE.with(|settings| settings.borrow().get(key).cloned())
    }

    /// Natively only (unit tests): sets (`Some`) or clears (`None`) what [`get`] returns for
    /// `key` on this thread, standing in for the operator's configuration.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn set(key: &str, value: Option<&str>) {
        NATIVE.with(|settings| {
            let mut settings = settings.borrow_mut();
            match value {
                Some(value) => settings.insert(key.to_string(), value.to_string()),
                None => settings.remove(key),
            }
        });
    }
}

/// Logging into the host's log. Each line is tagged by the host with plugin, stream and entry id.
pub mod log {
    use crate::bindings::kaleidoscope::handler::log::Level;

    /// In the host, the line goes to the host's log (with stream, entry and plugin). Compiled
    /// natively (a plugin's own `cargo test`), there is no host to import from: the line goes to
    /// stderr instead, so handlers that log can be unit-tested like any other code.
    fn log(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::kaleidoscope::handler::log::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }

    /// Detail useful only while developing a plugin.
    pub fn debug(message: impl AsRef<str>) {
        log(Level::Debug, message.as_ref());
    }

    /// Normal operation worth a line in the host log.
    pub fn info(message: impl AsRef<str>) {
        log(Level::Info, message.as_ref());
    }

    /// Something odd in the input that the handler tolerated (e.g. a count that disagrees).
    pub fn warn(message: impl AsRef<str>) {
        log(Level::Warn, message.as_ref());
    }

    /// Something the handler could not tolerate; usually followed by a failure.
    pub fn error(message: impl AsRef<str>) {
        log(Level::Error, message.as_ref());
    }
}
