//! Calling a loaded plugin. A call runs in a store of its own plugin, under a memory cap and a
//! deadline. Plugins built against contract 0.3.0 may be called on an instance that handled
//! earlier entries of the same batch ([`CallSession`]): instantiating a large component (a
//! Python one is ~18 MB) for every entry would cost more than the handler itself. A trap, a
//! timeout, a memory-limit hit or anything written to stderr retires the instance, so a failure
//! spoils only the entry being handled. Plugins built against older contracts, which were
//! promised a fresh instance per call, get one (about 9 µs with the pooling allocator).
//!
//! A call ends by its deadline whatever the plugin does. Running Wasm code is stopped by the
//! engine's epoch deadline; a plugin blocked inside a host call (a WASI sleep or poll, which the
//! epoch cannot interrupt) is stopped because calls are async: the call is a future under a
//! timer, and the host simply stops polling it and drops its store. The futures run on blocking
//! threads ([`Plugin::handle`] blocks on one), so the async runtime's workers never execute
//! guest code.

use super::bindings::ResultHandler;
use super::engine::{Contract, EPOCH_TICK};
use super::older_contracts::{v0_1, v0_2};
use super::sandbox::{
    CallState, LogContext, MemoryCap, STDERR_CAPTURE_BYTES, SandboxLimits, Settings,
};
use super::trap::trap_report;
use super::wit;
use crate::text;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// What one `handle` call came to. The host maps each case onto the delivery protocol.
#[derive(Debug)]
pub enum HandlerOutcome {
    /// The commands that persist the entry.
    Commands(Vec<wit::Command>),
    /// The handler says the entry can never succeed.
    Malformed(String),
    /// The handler says the entry may succeed later.
    Retry(String),
    /// The plugin trapped (panic, unreachable, bad instantiation); the message includes its
    /// stderr (the panic message) when there is one.
    Trap(String),
    /// The call ran past its deadline and was interrupted.
    Timeout(Duration),
    /// The plugin tried to grow its memory beyond the cap.
    MemoryLimit {
        /// The memory size the plugin asked for, in bytes.
        requested: usize,
    },
}

/// A loaded, validated plugin, ready to handle entries of its streams.
pub struct Plugin {
    /// Name from the manifest.
    pub name: String,
    /// Version from the manifest.
    pub version: String,
    /// Streams from the manifest (logical names, without the host's stream prefix).
    pub streams: Vec<String>,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    /// File size in bytes.
    pub size: usize,
    /// How long compiling (or loading from the cache) took.
    pub load_time: Duration,
    /// Whether the compiled component came from the on-disk cache.
    pub from_cache: bool,
    /// The component's imports (WASI interfaces and the host's log interface).
    pub imports: Vec<String>,
    pub(super) pre: Contract,
    pub(super) engine: Engine,
    pub(super) limits: SandboxLimits,
    /// This plugin's share of instances ([`MAX_INSTANCES_PER_PLUGIN`]).
    pub(super) own_instances: Arc<Semaphore>,
    /// The engine's pool, shared by all plugins.
    pub(super) pool_instances: Arc<Semaphore>,
}

/// The right to hold one instance of a plugin (a batch's session): this plugin's share and one
/// of the pool's.
pub struct InstanceSlot {
    pub(super) _own: OwnedSemaphorePermit,
    pub(super) _pool: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("streams", &self.streams)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// This build's identity (see [`super::build_of`]).
    pub fn build(&self) -> &str {
        super::build_of(&self.sha256)
    }

    /// The limits this plugin's calls run under.
    pub fn limits(&self) -> SandboxLimits {
        self.limits
    }

    /// This plugin, compiled once, under other `limits` (the configuration file changed its
    /// `timeout_ms` or `memory_mib`): the next batches run under them, no recompilation.
    pub fn with_limits(&self, limits: SandboxLimits) -> Plugin {
        Plugin {
            name: self.name.clone(),
            version: self.version.clone(),
            streams: self.streams.clone(),
            file: self.file.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            load_time: self.load_time,
            from_cache: self.from_cache,
            imports: self.imports.clone(),
            pre: match &self.pre {
                Contract::Current(pre) => Contract::Current(pre.clone()),
                Contract::V0_2(pre) => Contract::V0_2(pre.clone()),
                Contract::V0_1(pre) => Contract::V0_1(pre.clone()),
            },
            engine: self.engine.clone(),
            limits,
            own_instances: self.own_instances.clone(),
            pool_instances: self.pool_instances.clone(),
        }
    }

    /// Waits for an instance this plugin may use: first its own share (so a plugin that wants
    /// too many waits for itself), then the pool's. Held by a batch for its session.
    pub async fn instance_slot(&self) -> Result<InstanceSlot> {
        let own = self
            .own_instances
            .clone()
            .acquire_owned()
            .await
            .context("the plugin's instance limit was closed")?;
        let pool = self
            .pool_instances
            .clone()
            .acquire_owned()
            .await
            .context("the instance pool was closed")?;
        Ok(InstanceSlot {
            _own: own,
            _pool: pool,
        })
    }

    /// The version of the contract (`kaleidoscope:handler`) the plugin was built against.
    pub fn contract(&self) -> &'static str {
        self.pre.version()
    }

    /// Runs `handle` on a fresh instance. Blocking: call it from a blocking thread (or from a
    /// thread outside any async runtime), never from an async task.
    pub fn handle(&self, entry: &wit::Entry, settings: &Settings) -> HandlerOutcome {
        match block_on(self.session().handle(entry, settings)) {
            Ok(outcome) => outcome,
            Err(error) => HandlerOutcome::Trap(format!("{error:#}")),
        }
    }

    /// A run of calls that may share one instance (contract 0.3.0): one per batch.
    pub fn session(&self) -> CallSession<'_> {
        CallSession {
            plugin: self,
            instance: None,
        }
    }

    pub(super) fn call_manifest(&self) -> Result<wit::Manifest> {
        let context = LogContext {
            plugin: self.file.display().to_string(),
            stream: String::new(),
            entry_id: "manifest".into(),
        };
        let (mut store, stderr) = self.new_store(context, Settings::default());
        let call = async {
            match &self.pre {
                Contract::Current(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    instance.call_manifest(&mut store).await
                }
                Contract::V0_2(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    Ok(v0_2::manifest(instance.call_manifest(&mut store).await?))
                }
                Contract::V0_1(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    Ok(v0_1::manifest(instance.call_manifest(&mut store).await?))
                }
            }
        };
        let timeout = self.limits.call_timeout;
        // The timer is made inside the future: only there is a runtime (and its clock) at hand.
        let outcome = match block_on(async { tokio::time::timeout(timeout, call).await })? {
            Err(_) => HandlerOutcome::Timeout(timeout),
            Ok(Ok(manifest)) => return Ok(manifest),
            Ok(Err(error)) => self.classify(error, &store, &stderr),
        };
        match outcome {
            HandlerOutcome::Timeout(after) => {
                bail!("`manifest()` did not return within {after:?}")
            }
            HandlerOutcome::MemoryLimit { requested } => bail!(
                "`manifest()` exceeded the memory cap ({requested} bytes requested, cap {})",
                self.limits.memory_bytes
            ),
            HandlerOutcome::Trap(message) => bail!("`manifest()` trapped: {message}"),
            other => bail!("`manifest()` failed: {other:?}"),
        }
    }

    pub(super) fn new_store(
        &self,
        context: LogContext,
        settings: Settings,
    ) -> (Store<CallState>, MemoryOutputPipe) {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
        // No arguments, no environment, no preopened directories, no sockets: WasiCtx's defaults.
        let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
        let state = CallState {
            wasi,
            table: ResourceTable::new(),
            cap: MemoryCap {
                limit: self.limits.memory_bytes,
                exceeded: None,
            },
            log: context,
            log_lines: 0,
            settings,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.cap);
        self.arm_deadline(&mut store);
        store.epoch_deadline_trap();
        (store, stderr)
    }

    /// Sets the epoch deadline of the next call in `store`, counted from now.
    pub(super) fn arm_deadline(&self, store: &mut Store<CallState>) {
        let ticks = self.limits.call_timeout.as_millis() / EPOCH_TICK.as_millis() + 1;
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    }

    pub(super) fn classify(
        &self,
        error: wasmtime::Error,
        store: &Store<CallState>,
        stderr: &MemoryOutputPipe,
    ) -> HandlerOutcome {
        if let Some(requested) = store.data().cap.exceeded {
            return HandlerOutcome::MemoryLimit { requested };
        }
        if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return HandlerOutcome::Timeout(self.limits.call_timeout);
        }
        let captured = stderr.contents();
        HandlerOutcome::Trap(text::sanitize(trap_report(
            &error,
            &String::from_utf8_lossy(&captured),
        )))
    }
}

/// Calls of one plugin that may share an instance: the host opens one per batch. Only plugins
/// built against contract 0.3.0, which allows it, keep their instance between calls; any call
/// that does not end in a normal return (or that wrote to stderr) retires it.
pub struct CallSession<'p> {
    pub(super) plugin: &'p Plugin,
    pub(super) instance: Option<ReusableInstance>,
}

/// An instance that returned normally from its last call, ready for the next one.
pub(super) struct ReusableInstance {
    pub(super) store: Store<CallState>,
    pub(super) stderr: MemoryOutputPipe,
    pub(super) handler: ResultHandler,
}

impl CallSession<'_> {
    /// `handle` for `entry` with the plugin's current `settings`, ended at the deadline wherever
    /// the plugin is. The future runs guest code when polled: poll it on a blocking thread (see
    /// [`Plugin::handle`]).
    pub async fn handle(&mut self, entry: &wit::Entry, settings: &Settings) -> HandlerOutcome {
        let plugin = self.plugin;
        let context = LogContext {
            plugin: format!("{}@{}", plugin.name, plugin.version),
            stream: entry.source.clone(),
            entry_id: entry.id.clone(),
        };
        let (mut store, stderr, reused) = match self.instance.take() {
            Some(mut kept) => {
                kept.store.data_mut().begin_call(context, settings.clone());
                plugin.arm_deadline(&mut kept.store);
                (kept.store, kept.stderr, Some(kept.handler))
            }
            None => {
                let (store, stderr) = plugin.new_store(context, settings.clone());
                (store, stderr, None)
            }
        };
        let call = async {
            match &plugin.pre {
                Contract::Current(pre) => {
                    let handler = match reused {
                        Some(handler) => handler,
                        None => pre.instantiate_async(&mut store).await?,
                    };
                    let result = handler.call_handle(&mut store, entry).await?;
                    Ok((result, Some(handler)))
                }
                Contract::V0_2(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let result = instance
                        .call_handle(&mut store, &v0_2::entry(entry))
                        .await?;
                    let result = result
                        .map(|commands| commands.into_iter().map(v0_2::command).collect())
                        .map_err(v0_2::failure);
                    Ok((result, None))
                }
                Contract::V0_1(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let result = instance
                        .call_handle(&mut store, &v0_1::entry(entry))
                        .await?;
                    let result = result
                        .map(|commands| commands.into_iter().map(v0_1::command).collect())
                        .map_err(v0_1::failure);
                    Ok((result, None))
                }
            }
        };
        let result: Result<_, wasmtime::Error> =
            match tokio::time::timeout(plugin.limits.call_timeout, call).await {
                Err(_) => return HandlerOutcome::Timeout(plugin.limits.call_timeout),
                Ok(result) => result,
            };
        let (result, handler) = match result {
            Ok(returned) => returned,
            Err(error) => return plugin.classify(error, &store, &stderr),
        };
        if let Some(handler) = handler
            && stderr.contents().is_empty()
        {
            self.instance = Some(ReusableInstance {
                store,
                stderr,
                handler,
            });
        }
        match result {
            Ok(commands) => HandlerOutcome::Commands(commands),
            Err(wit::Failure::Malformed(reason)) => {
                HandlerOutcome::Malformed(text::one_line(reason))
            }
            Err(wit::Failure::Retry(reason)) => HandlerOutcome::Retry(text::one_line(reason)),
        }
    }
}

/// Runs `future` to completion on this thread. Inside the host (a blocking thread of its
/// runtime) the runtime's timers drive the call's deadline; elsewhere (a test, a tool) a
/// current-thread runtime of this thread's own does.
pub(super) fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        return Ok(runtime.block_on(future));
    }
    thread_local! {
        static RUNTIME: std::io::Result<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_time().build();
    }
    RUNTIME.with(|runtime| match runtime {
        Ok(runtime) => Ok(runtime.block_on(future)),
        Err(error) => Err(anyhow::anyhow!(
            "cannot start a runtime to call the plugin in: {error}"
        )),
    })
}
