//! The engine plugins are compiled by: one wasmtime engine with a pooling allocator and an epoch
//! ticker, the linkers of every supported contract, a cache of compiled components, and loading
//! (compile, instantiate, read and check the manifest).

use super::bindings::{ResultHandler, ResultHandlerPre};
use super::bindings_v0_1::{
    ResultHandler as ResultHandlerV0_1, ResultHandlerPre as ResultHandlerPreV0_1,
};
use super::bindings_v0_2::{
    ResultHandler as ResultHandlerV0_2, ResultHandlerPre as ResultHandlerPreV0_2,
};
use super::call::Plugin;
use super::sandbox::{CallState, SandboxLimits};
use super::wit;
use anyhow::{Context, Result, bail};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the engine's epoch advances; the granularity of call deadlines.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(10);
/// The most streams one manifest may declare.
pub const MAX_STREAMS_PER_PLUGIN: usize = 16;

/// Instances one plugin may have at once (its batches in flight on all its streams): a plugin
/// with many streams and slow calls waits for its own, and never takes another plugin's.
pub const MAX_INSTANCES_PER_PLUGIN: usize = 32;

/// Component instances of the engine's pool; calls beyond wait for one to be free, and a few are
/// kept for loading plugins (`manifest()`).
pub(super) const POOL_INSTANCES: u32 = 256;
pub(super) const INSTANCES_FOR_CALLS: usize = 240;

/// The executable that compiles components in a child process (`kaleidoscope compile-plugin`),
/// once [`compile_in_child_processes`] named it.
static COMPILER: OnceLock<PathBuf> = OnceLock::new();

/// Compile components in child processes of `executable` (this `kaleidoscope` binary) from now
/// on. Compiling a large component (a Python plugin: tens of MB of Wasm) takes the compiler
/// hundreds of MB for seconds; in a child, that memory is the child's and is gone when it exits,
/// so the host's own peak memory stays that of its work. Without it (tests that load plugins in
/// their own process), components compile in this process.
pub fn compile_in_child_processes(executable: PathBuf) {
    let _ = COMPILER.set(executable);
}

/// `kaleidoscope compile-plugin`: compiles the component read from stdin for the engine the host
/// makes with `slot_size` (and the function cache in `cache_dir`) and writes the artefact to
/// `output`, which [`PluginRuntime::component`] then loads.
pub fn compile_to_file(slot_size: usize, cache_dir: Option<&Path>, output: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
        .context("cannot read the component from stdin")?;
    let engine = pooling_engine(slot_size, function_cache(cache_dir))?;
    let artefact = engine
        .precompile_component(&bytes)
        .map_err(anyhow::Error::from)
        .context("not a valid WebAssembly component (build it with `--target wasm32-wasip2`)")?;
    super::write_atomically(output, &artefact)
        .with_context(|| format!("cannot write {}", output.display()))
}

/// The store of compiled functions under the cache directory (incremental compilation).
fn function_cache(cache_dir: Option<&Path>) -> Option<Arc<dyn wasmtime::CacheStore>> {
    cache_dir.map(|dir| {
        Arc::new(super::function_cache::FunctionCache::new(
            &dir.join("functions"),
        )) as Arc<dyn wasmtime::CacheStore>
    })
}

/// Compiles components and owns the engine, linker and epoch ticker they share.
pub struct PluginRuntime {
    pub(super) engine: Engine,
    /// The size of the pool's memory slots: a child compiling for this engine makes its own
    /// with the same (the artefact must match the engine's settings).
    slot_size: usize,
    pub(super) linker: Arc<Linker<CallState>>,
    pub(super) limits: SandboxLimits,
    /// The largest memory cap the pool's slots can honour (fixed when the engine is made).
    pub(super) memory_capacity: usize,
    /// The pool's instances that calls may take, shared by every plugin.
    pub(super) instances: Arc<Semaphore>,
    pub(super) cache: Option<CompiledCache>,
}

/// Compiled components on disk, named by the component's SHA-256 and a hash of the engine's
/// settings, so a restart or a reload of an unchanged file skips compilation (tens to hundreds of
/// milliseconds each) and a change of wasmtime or its settings never loads a stale artefact.
///
/// Deserialising trusts the directory's contents: only the host must be able to write it.
pub(super) struct CompiledCache {
    pub(super) dir: PathBuf,
    pub(super) engine_key: u64,
}

impl CompiledCache {
    pub(super) fn path(&self, sha256: &str) -> PathBuf {
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
        let engine = pooling_engine(slot_size, function_cache(cache_dir))?;
        let linker = linker(&engine)?;
        start_epoch_ticker(&engine)?;
        let cache = cache_dir
            .map(|dir| CompiledCache::open(dir, &engine))
            .transpose()?;
        Ok(Self {
            engine,
            slot_size,
            linker: Arc::new(linker),
            limits,
            memory_capacity,
            instances: Arc::new(Semaphore::new(INSTANCES_FOR_CALLS)),
            cache,
        })
    }

    /// The component for `bytes`: from the cache when it has it, else compiled (and cached).
    /// Returns whether it came from the cache.
    pub(super) fn component(&self, bytes: &[u8], sha256: &str) -> Result<(Component, bool)> {
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
        if let Some(compiler) = COMPILER.get()
            && let Some(component) = self.compile_in_child(compiler, bytes, cached.clone())?
        {
            return Ok((component, false));
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
                .and_then(|artefact| Ok(super::write_atomically(&path, &artefact)?));
            if let Err(error) = written {
                tracing::warn!(file = %path.display(), "cannot cache the compiled plugin: {error:#}");
            }
        }
        Ok((component, false))
    }

    /// Compiles `bytes` in a child process of `compiler` into `cached` (or a temporary file when
    /// there is no cache) and loads the artefact. `None` when the child cannot be started (the
    /// executable replaced on disk by an upgrade, say): the caller compiles in this process.
    fn compile_in_child(
        &self,
        compiler: &Path,
        bytes: &[u8],
        cached: Option<PathBuf>,
    ) -> Result<Option<Component>> {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        static COMPILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let temporary = cached.is_none();
        let output = cached.unwrap_or_else(|| {
            let n = COMPILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::env::temp_dir().join(format!(
                "kaleidoscope-compiled-{}-{n}.cwasm",
                std::process::id()
            ))
        });
        let mut command = Command::new(compiler);
        command
            .arg("compile-plugin")
            .arg("--slot-size")
            .arg(self.slot_size.to_string())
            .arg("--output")
            .arg(&output);
        if let Some(cache) = &self.cache {
            command.arg("--cache-dir").arg(&cache.dir);
        }
        let mut child = match command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(error) => {
                tracing::warn!(compiler = %compiler.display(), "cannot start the compiler process ({error}); compiling in this process");
                return Ok(None);
            }
        };
        let written = child
            .stdin
            .take()
            .context("the compiler's stdin")?
            .write_all(bytes);
        let finished = child
            .wait_with_output()
            .context("the compiler process failed")?;
        if !finished.status.success() {
            // Its last `error: …` line (log lines may come before it), else all it said.
            let said = String::from_utf8_lossy(&finished.stderr);
            let error = said
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("error: "))
                .unwrap_or(said.trim());
            if error.is_empty() {
                // Killed (out of memory, say) before it could say anything.
                bail!("the compiler process ended with {}", finished.status);
            }
            bail!("{error}");
        }
        written.context("cannot hand the component to the compiler")?;
        // SAFETY: the compiler child wrote the file with `Engine::precompile_component` of an
        // engine made with this one's settings (same executable, same slot size); wasmtime
        // checks the header's compatibility and errors otherwise.
        let component = unsafe { Component::deserialize_file(&self.engine, &output) }
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot load the compiled plugin {}", output.display()));
        if temporary {
            let _ = std::fs::remove_file(&output);
        }
        component.map(Some)
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
pub(super) enum Contract {
    /// `wit/handler.wit`.
    Current(ResultHandlerPre<CallState>),
    /// `wit/v0.2.0/handler.wit`.
    V0_2(ResultHandlerPreV0_2<CallState>),
    /// `wit/v0.1.0/handler.wit`.
    V0_1(ResultHandlerPreV0_1<CallState>),
}

impl Contract {
    pub(super) fn version(&self) -> &'static str {
        match self {
            Contract::Current(_) => super::CONTRACT_VERSION,
            Contract::V0_2(_) => "0.2.0",
            Contract::V0_1(_) => "0.1.0",
        }
    }
}

/// Returns the memory the compiler freed to the operating system. Compiling a large component
/// (an 18 MB Python one) peaks at hundreds of MB across the compiler's threads; glibc keeps
/// freed memory in its arenas, so without this a host that compiled one plugin once stays that
/// large for good (measured: 349 MB resident with the Python example loaded, against ~60 MB when
/// the same component comes from the compiled cache).
pub(super) fn give_back_compiler_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory at the tops and in the middle of the
    // allocator's arenas; it touches no allocation in use and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub(super) fn validate_manifest(manifest: &wit::Manifest) -> Result<()> {
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

/// The engine: epoch interruption (call deadlines), the component model, and a pooling allocator
/// whose memory slots hold `slot_size` bytes.
fn pooling_engine(
    slot_size: usize,
    functions: Option<Arc<dyn wasmtime::CacheStore>>,
) -> Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    // A fresh instance per call: resetting a slot with the kernel's pagemap scan and keeping
    // its first MiB resident costs a few microseconds instead of tens (measured when this was
    // chosen; BENCHMARKS.md has the host's figures).
    pool.linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(1024)
        .total_memories(512)
        .total_tables(512)
        // The pool's slots hold the cap plus room for the one failing growth attempt, which
        // the sandbox's limiter refuses and records — up to the 4 GiB a 32-bit memory can reach
        // (and the engine reserves per memory).
        .max_memory_size(slot_size);
    let mut config = wasmtime::Config::new();
    config
        .epoch_interruption(true)
        .wasm_component_model(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    if let Some(functions) = functions {
        config
            .enable_incremental_compilation(functions)
            .map_err(anyhow::Error::from)
            .context("cannot enable the function cache")?;
    }
    let engine = Engine::new(&config)
        .map_err(anyhow::Error::from)
        .context("cannot create the WebAssembly engine")?;
    Ok(engine)
}

/// The linker of every supported contract: WASI (without file system, network or environment,
/// see the sandbox) and the handler's host interfaces.
fn linker(engine: &Engine) -> Result<Linker<CallState>> {
    let mut linker = Linker::<CallState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("cannot link WASI")?;
    ResultHandler::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| state)
        .map_err(anyhow::Error::from)
        .context("cannot link the handler's log interface")?;
    ResultHandlerV0_2::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| state)
        .map_err(anyhow::Error::from)
        .context("cannot link the handler's log interface (contract 0.2.0)")?;
    ResultHandlerV0_1::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| state)
        .map_err(anyhow::Error::from)
        .context("cannot link the handler's log interface (contract 0.1.0)")?;
    Ok(linker)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] for as long as the engine lives: what call
/// deadlines are measured in.
fn start_epoch_ticker(engine: &Engine) -> Result<()> {
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
    Ok(())
}

impl CompiledCache {
    /// The cache in `dir` (created if missing), keyed to what `engine` can load.
    fn open(dir: &Path, engine: &Engine) -> Result<CompiledCache> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the compiled-plugin cache directory {}",
                dir.display()
            )
        })?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompiledCache {
            dir: dir.to_path_buf(),
            engine_key: hasher.finish(),
        })
    }
}
