//! Compiling plugin components and calling them inside the sandbox.
//!
//! A call runs in a store of its own plugin, under a memory cap and a deadline. Plugins built
//! against contract 0.3.0 may be called on an instance that handled earlier entries of the same
//! batch ([`CallSession`]): instantiating a large component (a Python one is ~18 MB) for every
//! entry would cost more than the handler itself. A trap, a timeout, a memory-limit hit or
//! anything written to stderr retires the instance, so a failure spoils only the entry being
//! handled. Plugins built against older contracts, which were promised a fresh instance per call,
//! get one (about 9 µs with the pooling allocator).
//!
//! A call ends by its deadline whatever the plugin does. Running Wasm code is stopped by the
//! engine's epoch deadline; a plugin blocked inside a host call (a WASI sleep or poll, which the
//! epoch cannot interrupt) is stopped because calls are async: the call is a future under a timer,
//! and the host simply stops polling it and drops its store. The futures run on blocking threads
//! ([`Plugin::handle`] blocks on one), so the async runtime's workers never execute guest code.

use super::bindings::kaleidoscope::handler::log::{self as wit_log, Level};
use super::bindings::{ResultHandler, ResultHandlerPre};
use super::bindings_v0_1::{
    ResultHandler as ResultHandlerV0_1, ResultHandlerPre as ResultHandlerPreV0_1,
};
use super::bindings_v0_2::{
    ResultHandler as ResultHandlerV0_2, ResultHandlerPre as ResultHandlerPreV0_2,
};
use super::older_contracts::{v0_1, v0_2};
use super::wit;
use crate::text;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// How often the engine's epoch advances; the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How much of a trapped plugin's stderr (its panic message) is kept for the dead letter.
const STDERR_CAPTURE_BYTES: usize = 16 * 1024;
/// Log lines one call may write before the host stops forwarding them (a chatty plugin must not
/// flood the host's log).
const LOG_LINES_PER_CALL: u32 = 100;
/// The longest log line forwarded from a plugin.
const LOG_LINE_BYTES: usize = 4096;
/// Table growth allowed per instance (function references; generous for any real handler).
const TABLE_ELEMENTS_LIMIT: usize = 100_000;

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

/// The most streams one manifest may declare.
pub const MAX_STREAMS_PER_PLUGIN: usize = 16;

/// Instances one plugin may have at once (its batches in flight on all its streams): a plugin
/// with many streams and slow calls waits for its own, and never takes another plugin's.
pub const MAX_INSTANCES_PER_PLUGIN: usize = 32;

/// Component instances of the engine's pool; calls beyond wait for one to be free, and a few are
/// kept for loading plugins (`manifest()`).
const POOL_INSTANCES: u32 = 256;
const INSTANCES_FOR_CALLS: usize = 240;

/// Compiles components and owns the engine, linker and epoch ticker they share.
pub struct PluginRuntime {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    limits: SandboxLimits,
    /// The largest memory cap the pool's slots can honour (fixed when the engine is made).
    memory_capacity: usize,
    /// The pool's instances that calls may take, shared by every plugin.
    instances: Arc<Semaphore>,
    cache: Option<CompiledCache>,
}

/// Compiled components on disk, named by the component's SHA-256 and a hash of the engine's
/// settings, so a restart or a reload of an unchanged file skips compilation (tens to hundreds of
/// milliseconds each) and a change of wasmtime or its settings never loads a stale artefact.
///
/// Deserialising trusts the directory's contents: only the host must be able to write it.
struct CompiledCache {
    dir: PathBuf,
    engine_key: u64,
}

impl CompiledCache {
    fn path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{:016x}.cwasm", self.engine_key))
    }
}

impl PluginRuntime {
    /// Creates the engine (pooling allocator, epoch interruption) and starts its epoch ticker.
    /// `limits` are the defaults; `max_memory_bytes` is the largest cap any plugin may get (the
    /// pool's memory slots are sized for it). With a `cache_dir`, compiled components are cached
    /// there.
    ///
    /// Long on purpose: the engine, pool and linker settings read best in one place, as in
    /// wasmtime's own examples; each is commented where it is set.
    pub fn new(
        limits: SandboxLimits,
        max_memory_bytes: usize,
        cache_dir: Option<&Path>,
    ) -> Result<Self> {
        let largest_cap = max_memory_bytes.max(limits.memory_bytes);
        let slot_size = largest_cap.saturating_mul(2).clamp(16 << 20, 4 << 30);
        // What a cap raised after start can get: half a slot (the other half is the room for
        // the failing growth attempt), or the largest cap configured at start.
        let memory_capacity = (slot_size / 2).max(largest_cap);
        let mut pool = PoolingAllocationConfig::default();
        // A fresh instance per call: resetting a slot with the kernel's pagemap scan and keeping
        // its first MiB resident costs a few microseconds instead of tens (measured; see
        // ../shared/reference/wasmtime-notes.md).
        pool.linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto);
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(1024)
            .total_memories(512)
            .total_tables(512)
            // The pool's slots hold the cap plus room for the one failing growth attempt, which
            // the limiter below refuses and records — up to the 4 GiB a 32-bit memory can reach
            // (and the engine reserves per memory).
            .max_memory_size(slot_size);
        let mut config = wasmtime::Config::new();
        config
            .epoch_interruption(true)
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("cannot create the WebAssembly engine")?;

        let mut linker = Linker::<CallState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link WASI")?;
        ResultHandler::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)
            .context("cannot link the handler's log interface")?;
        ResultHandlerV0_2::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| {
            state
        })
        .map_err(anyhow::Error::from)
        .context("cannot link the handler's log interface (contract 0.2.0)")?;
        ResultHandlerV0_1::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| {
            state
        })
        .map_err(anyhow::Error::from)
        .context("cannot link the handler's log interface (contract 0.1.0)")?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .context("cannot start the epoch ticker thread")?;

        let cache = match cache_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!(
                        "cannot create the compiled-plugin cache directory {}",
                        dir.display()
                    )
                })?;
                let mut hasher = DefaultHasher::new();
                engine.precompile_compatibility_hash().hash(&mut hasher);
                Some(CompiledCache {
                    dir: dir.to_path_buf(),
                    engine_key: hasher.finish(),
                })
            }
            None => None,
        };

        Ok(Self {
            engine,
            linker: Arc::new(linker),
            limits,
            memory_capacity,
            instances: Arc::new(Semaphore::new(INSTANCES_FOR_CALLS)),
            cache,
        })
    }

    /// The component for `bytes`: from the cache when it has it, else compiled (and cached).
    /// Returns whether it came from the cache.
    fn component(&self, bytes: &[u8], sha256: &str) -> Result<(Component, bool)> {
        let cached = self.cache.as_ref().map(|cache| cache.path(sha256));
        if let Some(path) = cached.as_deref().filter(|p| p.exists()) {
            // SAFETY: the file was written by `Component::serialize` of this engine configuration
            // (its name carries the content hash and the engine key) into a directory only the
            // host writes; wasmtime also checks the header's compatibility and errors otherwise.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok((component, true)),
                Err(error) => {
                    tracing::warn!(file = %path.display(), "ignoring an unusable compiled plugin: {error:#}")
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(anyhow::Error::from)
            .context("not a valid WebAssembly component (build it with `--target wasm32-wasip2`)");
        give_back_compiler_memory();
        let component = component?;
        if let Some(path) = cached {
            let written = component
                .serialize()
                .map_err(anyhow::Error::from)
                .and_then(|artefact| {
                    let partial = path.with_extension(format!("tmp{}", std::process::id()));
                    std::fs::write(&partial, artefact)?;
                    std::fs::rename(&partial, &path)?;
                    Ok(())
                });
            if let Err(error) = written {
                tracing::warn!(file = %path.display(), "cannot cache the compiled plugin: {error:#}");
            }
        }
        Ok((component, false))
    }

    /// `wanted` as this runtime can honour them: a memory cap larger than the pool's slots were
    /// sized for at start (a `memory_mib` raised in the configuration file since) is lowered to
    /// what they hold; a restart applies the larger one. Asked at every rescan, so it says
    /// nothing: [`PluginRuntime::apply_limits`] warns when limits are applied.
    pub fn fit(&self, mut wanted: SandboxLimits) -> SandboxLimits {
        wanted.memory_bytes = wanted.memory_bytes.min(self.memory_capacity);
        wanted
    }

    /// [`PluginRuntime::fit`] for limits about to be applied to `plugin`, with a warning naming
    /// it when its memory cap had to be lowered.
    pub fn apply_limits(&self, plugin: &str, wanted: SandboxLimits) -> SandboxLimits {
        let fitted = self.fit(wanted);
        if fitted != wanted {
            tracing::warn!(
                plugin,
                memory_mib = wanted.memory_bytes >> 20,
                capacity_mib = fitted.memory_bytes >> 20,
                "the plugin's memory cap is larger than the host's memory pool was sized for at start; it gets the pool's size until the host restarts"
            );
        }
        fitted
    }

    /// Reads, compiles and validates the plugin in `path`. Blocking and CPU-heavy (tens to
    /// hundreds of milliseconds unless cached): call it from a blocking thread. `limits_for`
    /// gives the limits of a plugin by its manifest name.
    pub fn load(&self, path: &Path, limits_for: &dyn Fn(&str) -> SandboxLimits) -> Result<Plugin> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        self.load_bytes(&bytes, None, path, limits_for)
    }

    /// Compiles and validates a plugin from bytes; `path` names it in errors and status.
    /// `sha256` is the bytes' [`super::sha256_hex`] when the caller has it already.
    pub fn load_bytes(
        &self,
        bytes: &[u8],
        sha256: Option<String>,
        path: &Path,
        limits_for: &dyn Fn(&str) -> SandboxLimits,
    ) -> Result<Plugin> {
        if !bytes.starts_with(b"\0asm") {
            bail!(
                "not a WebAssembly file (no `\\0asm` header; half-written, or not built for wasm32-wasip2?)"
            );
        }
        let started = Instant::now();
        let sha256 = sha256.unwrap_or_else(|| super::sha256_hex(bytes));
        let (component, from_cache) = self.component(bytes, &sha256)?;
        let load_time = started.elapsed();
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context("the component imports something the host does not provide (only WASI and `kaleidoscope:handler/{log,config}` are available)")?;
        // The current contract first, then the older ones still supported.
        let pre = match ResultHandlerPre::new(instance_pre.clone()) {
            Ok(pre) => Contract::Current(pre),
            Err(current) => match ResultHandlerPreV0_2::new(instance_pre.clone()) {
                Ok(pre) => Contract::V0_2(pre),
                Err(_) => match ResultHandlerPreV0_1::new(instance_pre) {
                    Ok(pre) => Contract::V0_1(pre),
                    Err(_) => {
                        return Err(anyhow::Error::from(current)).context(
                            "the component does not export the `result-handler` world (`manifest` and `handle`) of contract 0.3.0, 0.2.0 or 0.1.0",
                        );
                    }
                },
            },
        };

        let imports = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let mut plugin = Plugin {
            imports,
            name: String::new(),
            version: String::new(),
            streams: Vec::new(),
            file: path.to_path_buf(),
            sha256,
            size: bytes.len(),
            load_time,
            from_cache,
            pre,
            engine: self.engine.clone(),
            limits: self.limits,
            own_instances: Arc::new(Semaphore::new(MAX_INSTANCES_PER_PLUGIN)),
            pool_instances: self.instances.clone(),
        };
        let manifest = plugin.call_manifest()?;
        validate_manifest(&manifest)?;
        plugin.limits = self.apply_limits(&manifest.name, limits_for(&manifest.name));
        plugin.name = manifest.name;
        plugin.version = manifest.version;
        plugin.streams = manifest.streams;
        Ok(plugin)
    }
}

/// Which version of the contract a plugin was built against, with its pre-linked instance.
enum Contract {
    /// `wit/handler.wit`.
    Current(ResultHandlerPre<CallState>),
    /// `wit/v0.2.0/handler.wit`.
    V0_2(ResultHandlerPreV0_2<CallState>),
    /// `wit/v0.1.0/handler.wit`.
    V0_1(ResultHandlerPreV0_1<CallState>),
}

impl Contract {
    fn version(&self) -> &'static str {
        match self {
            Contract::Current(_) => super::CONTRACT_VERSION,
            Contract::V0_2(_) => "0.2.0",
            Contract::V0_1(_) => "0.1.0",
        }
    }
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
    pre: Contract,
    engine: Engine,
    limits: SandboxLimits,
    /// This plugin's share of instances ([`MAX_INSTANCES_PER_PLUGIN`]).
    own_instances: Arc<Semaphore>,
    /// The engine's pool, shared by all plugins.
    pool_instances: Arc<Semaphore>,
}

/// The right to hold one instance of a plugin (a batch's session): this plugin's share and one
/// of the pool's.
pub struct InstanceSlot {
    _own: OwnedSemaphorePermit,
    _pool: OwnedSemaphorePermit,
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

    fn call_manifest(&self) -> Result<wit::Manifest> {
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

    fn new_store(
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
    fn arm_deadline(&self, store: &mut Store<CallState>) {
        let ticks = self.limits.call_timeout.as_millis() / EPOCH_TICK.as_millis() + 1;
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    }

    fn classify(
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
    plugin: &'p Plugin,
    instance: Option<ReusableInstance>,
}

/// An instance that returned normally from its last call, ready for the next one.
struct ReusableInstance {
    store: Store<CallState>,
    stderr: MemoryOutputPipe,
    handler: ResultHandler,
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

/// How many of the plugin's own frames a trap report names.
const TRAP_FRAMES: usize = 4;

/// A trap as one readable line: the panic message first (from the plugin's stderr), then the
/// trap and the innermost frames of the plugin's own code — not the dozen frames of the standard
/// library's panic machinery, nor a `RUST_BACKTRACE` hint that cannot apply inside the host.
fn trap_report(error: &wasmtime::Error, stderr: &str) -> String {
    let trap = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    let frames: Vec<String> = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|backtrace| {
            backtrace
                .frames()
                .iter()
                .filter_map(|frame| frame.func_name())
                .map(|name| format!("{:#}", rustc_demangle::demangle(name)))
                .filter(|name| !is_runtime_frame(name))
                .take(TRAP_FRAMES)
                .collect()
        })
        .unwrap_or_default();
    let place = if frames.is_empty() {
        String::new()
    } else {
        format!(" in {}", frames.join(" < "))
    };
    match panic_message(stderr) {
        Some(panic) => format!("{panic} ({trap}{place})"),
        None if stderr.trim().is_empty() => format!("{trap}{place}"),
        None => format!("{trap}{place}; plugin stderr: {}", stderr.trim()),
    }
}

/// `panicked at <file:line:col>: <message>` from a Rust plugin's panic output, if it panicked.
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.find("panicked at ")?;
    let text: Vec<&str> = stderr[start..]
        .lines()
        .filter(|line| !line.starts_with("note: run with `RUST_BACKTRACE"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let (location, message) = text.split_first()?;
    let location = location.trim_end_matches(':');
    Some(if message.is_empty() {
        location.to_string()
    } else {
        format!("{location}: {}", message.join(" "))
    })
}

/// Frames of the standard library, the panic runtime and the bindings, which say nothing about
/// where the plugin failed.
fn is_runtime_frame(name: &str) -> bool {
    [
        "std",
        "core",
        "alloc",
        "__rust",
        "__rdl",
        "abort",
        "wit_bindgen",
        "<std",
        "<core",
        "<alloc",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || name.contains("::panicking::")
}

/// Returns the memory the compiler freed to the operating system. Compiling a large component
/// (an 18 MB Python one) peaks at hundreds of MB across the compiler's threads; glibc keeps
/// freed memory in its arenas, so without this a host that compiled one plugin once stays that
/// large for good (measured: 349 MB resident with the Python example loaded, against ~60 MB when
/// the same component comes from the compiled cache).
fn give_back_compiler_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory at the tops and in the middle of the
    // allocator's arenas; it touches no allocation in use and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `future` to completion on this thread. Inside the host (a blocking thread of its
/// runtime) the runtime's timers drive the call's deadline; elsewhere (a test, a tool) a
/// current-thread runtime of this thread's own does.
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
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

fn validate_manifest(manifest: &wit::Manifest) -> Result<()> {
    let valid_name = |name: &str| {
        !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    };
    if !valid_name(&manifest.name) {
        bail!(
            "manifest name {:?} is not a valid plugin name (letters, digits, `-`, `_`, `.`, `:`)",
            manifest.name
        );
    }
    if manifest.version.trim().is_empty() {
        bail!("manifest of {:?} has an empty version", manifest.name);
    }
    if manifest.version.len() > 128 || manifest.version.chars().any(char::is_control) {
        bail!(
            "manifest of {:?} has version {:?}: a version is at most 128 characters, without control characters",
            manifest.name,
            manifest.version
        );
    }
    if manifest.streams.is_empty() {
        bail!("manifest of {:?} declares no streams", manifest.name);
    }
    if manifest.streams.len() > MAX_STREAMS_PER_PLUGIN {
        bail!(
            "manifest of {:?} declares {} streams; a plugin may consume at most {MAX_STREAMS_PER_PLUGIN} (each costs the host a task, a Redis connection and a consumer group)",
            manifest.name,
            manifest.streams.len()
        );
    }
    for stream in &manifest.streams {
        if !valid_name(stream) {
            bail!(
                "manifest of {:?} declares an invalid stream name {stream:?}",
                manifest.name
            );
        }
    }
    Ok(())
}

/// Which entry a call belongs to, for the plugin's log lines.
struct LogContext {
    plugin: String,
    stream: String,
    entry_id: String,
}

/// Refuses memory growth past the cap and remembers that it did, so the failure can be reported
/// as a memory-limit hit rather than as the trap the guest's allocator turns it into.
struct MemoryCap {
    limit: usize,
    exceeded: Option<usize>,
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
struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    cap: MemoryCap,
    log: LogContext,
    log_lines: u32,
    settings: Settings,
}

impl CallState {
    /// Prepares a reused instance's state for the next call.
    fn begin_call(&mut self, log: LogContext, settings: Settings) {
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

#[cfg(test)]
mod tests {
    use super::{is_runtime_frame, panic_message};

    #[test]
    fn the_panic_message_is_read_without_the_backtrace_hint() {
        let stderr = "thread '<unnamed>' (1) panicked at src/lib.rs:3:5:\nbad input: 7\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("panicked at src/lib.rs:3:5: bad input: 7")
        );
        assert_eq!(panic_message("some other output"), None);
    }

    #[test]
    fn runtime_frames_are_told_from_the_plugins_own() {
        for frame in [
            "std::process::abort",
            "core::panicking::panic_fmt",
            "__rustc::rust_begin_unwind",
            "abort",
        ] {
            assert!(is_runtime_frame(frame), "{frame}");
        }
        for frame in ["handle", "behaviours::perform", "my_plugin::parse_faces"] {
            assert!(!is_runtime_frame(frame), "{frame}");
        }
    }
}
