//! The sandbox a plugin call runs in: its limits, the store's state (WASI context without file
//! system, network or environment; captured stderr; the log and config imports), and the memory
//! and table caps enforced as the instance grows.

use super::bindings::kaleidoscope::handler::log::{self as wit_log, Level};
use crate::text;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// How much of a trapped plugin's stderr (its panic message) is kept for the dead letter.
pub(super) const STDERR_CAPTURE_BYTES: usize = 16 * 1024;
/// Log lines one call may write before the host stops forwarding them (a chatty plugin must not
/// flood the host's log).
pub(super) const LOG_LINES_PER_CALL: u32 = 100;
/// The longest log line forwarded from a plugin.
pub(super) const LOG_LINE_BYTES: usize = 4096;
/// Table growth allowed per instance (function references; generous for any real handler).
pub(super) const TABLE_ELEMENTS_LIMIT: usize = 100_000;

/// The operator's settings for one plugin (`[plugins.<name>.settings]`), as its calls read them
/// through the contract's `config` import. Shared, because every call of a batch reads the same.
pub type Settings = Arc<BTreeMap<String, String>>;

/// The resource limits applied to every plugin call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Wall-clock deadline of one `handle` or `manifest` call.
    pub call_timeout: Duration,
    /// Maximum linear memory of one instance, in bytes.
    pub memory_bytes: usize,
}

/// Which entry a call belongs to, for the plugin's log lines.
pub(super) struct LogContext {
    pub(super) plugin: String,
    pub(super) stream: String,
    pub(super) entry_id: String,
}

/// Refuses memory growth past the cap and remembers that it did, so the failure can be reported
/// as a memory-limit hit rather than as the trap the guest's allocator turns it into.
pub(super) struct MemoryCap {
    pub(super) limit: usize,
    pub(super) exceeded: Option<usize>,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_LIMIT)
    }
}

/// The store data of one instance: its WASI context and memory cap, and what the call it is
/// running belongs to.
pub(super) struct CallState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) cap: MemoryCap,
    pub(super) log: LogContext,
    pub(super) log_lines: u32,
    pub(super) settings: Settings,
}

impl CallState {
    /// Prepares a reused instance's state for the next call.
    pub(super) fn begin_call(&mut self, log: LogContext, settings: Settings) {
        self.log = log;
        self.log_lines = 0;
        self.settings = settings;
        self.cap.exceeded = None;
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl super::bindings::kaleidoscope::handler::types::Host for CallState {}
impl super::bindings_v0_1::kaleidoscope::handler::types::Host for CallState {}
impl super::bindings_v0_2::kaleidoscope::handler::types::Host for CallState {}

impl super::bindings::kaleidoscope::handler::config::Host for CallState {
    fn get(&mut self, key: String) -> Option<String> {
        self.settings.get(&key).cloned()
    }
}

/// An older contract's `log` import, forwarded to the current one (the levels are the same).
macro_rules! older_log_host {
    ($bindings:ident) => {
        impl super::$bindings::kaleidoscope::handler::log::Host for CallState {
            fn log(
                &mut self,
                level: super::$bindings::kaleidoscope::handler::log::Level,
                message: String,
            ) {
                use super::$bindings::kaleidoscope::handler::log::Level as Old;
                let level = match level {
                    Old::Trace => Level::Trace,
                    Old::Debug => Level::Debug,
                    Old::Info => Level::Info,
                    Old::Warn => Level::Warn,
                    Old::Error => Level::Error,
                };
                wit_log::Host::log(self, level, message);
            }
        }
    };
}

older_log_host!(bindings_v0_2);
older_log_host!(bindings_v0_1);

impl wit_log::Host for CallState {
    fn log(&mut self, level: Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > LOG_LINES_PER_CALL {
            if self.log_lines == LOG_LINES_PER_CALL + 1 {
                tracing::warn!(plugin = %self.log.plugin, stream = %self.log.stream, entry = %self.log.entry_id,
                    "plugin wrote more than {LOG_LINES_PER_CALL} log lines for one entry; dropping the rest");
            }
            return;
        }
        let mut message = text::one_line(message);
        if message.len() > LOG_LINE_BYTES {
            let mut cut = LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let LogContext {
            plugin,
            stream,
            entry_id,
        } = &self.log;
        match level {
            Level::Trace => {
                tracing::trace!(target: "plugin", %plugin, %stream, entry = %entry_id, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "plugin", %plugin, %stream, entry = %entry_id, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "plugin", %plugin, %stream, entry = %entry_id, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "plugin", %plugin, %stream, entry = %entry_id, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "plugin", %plugin, %stream, entry = %entry_id, "{message}")
            }
        }
    }
}
