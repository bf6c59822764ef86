//! `plugin build`: one plugin project into one component — Rust through cargo for
//! `wasm32-wasip2`, Python through componentize-py — with the install step named when a tool is
//! missing.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The language of a plugin project, told by its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    /// A cargo project (`Cargo.toml`) using the Rust SDK.
    Rust,
    /// A componentize-py project (`app.py` with class `WitWorld`).
    Python,
}

impl Language {
    /// The language of the project in `dir`.
    pub fn of(dir: &Path) -> Result<Language> {
        if dir.join("Cargo.toml").is_file() {
            Ok(Language::Rust)
        } else if dir.join("app.py").is_file() {
            Ok(Language::Python)
        } else {
            bail!(
                "{} is not a plugin project: it has neither Cargo.toml (Rust) nor app.py (Python); `kaleidoscope plugin new` makes one",
                dir.display()
            )
        }
    }
}

/// Builds the project in `dir`; returns the component's path. Tool output (compiler errors)
/// goes to this process's stderr.
pub fn build(dir: &Path) -> Result<PathBuf> {
    match Language::of(dir)? {
        Language::Rust => build_rust(dir),
        Language::Python => build_python(dir),
    }
}

fn build_rust(dir: &Path) -> Result<PathBuf> {
    if let Ok(output) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        && output.status.success()
        && !String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|l| l.trim() == "wasm32-wasip2")
    {
        bail!("the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`");
    }
    let manifest = dir.join("Cargo.toml");
    let output = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo (is Rust installed? https://rustup.rs)")?;
    if !output.status.success() {
        bail!(
            "cargo could not build {} (its errors are above)",
            manifest.display()
        );
    }
    // The cdylib's `.wasm` among the artefacts cargo reports.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut component = None;
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_cdylib = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"));
        if message["reason"] == "compiler-artifact" && is_cdylib {
            component = message["filenames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"))
                .map(PathBuf::from);
        }
    }
    component.with_context(|| {
        format!(
            "cargo built {} but no component: the crate needs `crate-type = [\"cdylib\"]` in [lib]",
            manifest.display()
        )
    })
}

/// componentize-py: `KALEIDOSCOPE_COMPONENTIZE_PY`, the project's `.venv`, or `PATH`.
fn componentize_py(dir: &Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KALEIDOSCOPE_COMPONENTIZE_PY") {
        return Ok(PathBuf::from(path));
    }
    let venv = dir.join(".venv/bin/componentize-py");
    if venv.is_file() {
        return Ok(venv);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("componentize-py"))
            .find(|p| p.is_file())
    });
    on_path.with_context(|| {
        format!(
            "componentize-py is not installed. Install it into the project: `python3 -m venv {0}/.venv && {0}/.venv/bin/pip install -r {0}/requirements.txt` (or set KALEIDOSCOPE_COMPONENTIZE_PY to its path)",
            dir.display()
        )
    })
}

/// Directories that are not sources: build output, environments, caches, version control.
const NOT_SOURCES: [&str; 4] = [".git", "target", ".venv", "__pycache__"];

/// Whether `path` (relative to the project) is outside the sources.
pub(super) fn not_a_source(path: &Path) -> bool {
    path.components().any(
        |c| matches!(c, std::path::Component::Normal(name) if NOT_SOURCES.iter().any(|n| name == *n)),
    ) || path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// The project's source files (not its build output, environments, caches or hidden files), in
/// name order.
pub(super) fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut pending = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if not_a_source(path.strip_prefix(dir).unwrap_or(&path)) {
                continue;
            }
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => pending.push(path),
                Ok(_) => files.push(path),
                Err(_) => {}
            }
        }
    }
    files.sort();
    files
}

/// The SHA-256 of everything a Python build is made of: the sources (names and contents), the
/// contract and SDK it would use, and the tool. componentize-py's output differs from build to
/// build even from the same input; keyed by this, an unchanged project is not rebuilt, so its
/// component — and the compiled cache of the hosts and tools — stays the same.
fn python_inputs(dir: &Path, wit: Option<&Path>, tool: &Path) -> String {
    // Each part with its label and length, so no two sets of inputs read as the same bytes.
    let mut inputs = Vec::new();
    let mut add = |label: &str, bytes: &[u8]| {
        inputs.extend((label.len() as u64).to_le_bytes());
        inputs.extend(label.as_bytes());
        inputs.extend((bytes.len() as u64).to_le_bytes());
        inputs.extend(bytes);
    };
    for file in source_files(dir) {
        let relative = file.strip_prefix(dir).unwrap_or(&file).to_string_lossy();
        add(&relative, &std::fs::read(&file).unwrap_or_default());
    }
    match wit {
        Some(wit) => {
            for file in source_files(wit) {
                add("wit", &std::fs::read(&file).unwrap_or_default());
            }
        }
        None => add("wit", super::scaffold::WIT.as_bytes()),
    }
    add("sdk", super::scaffold::PYTHON_SDK.as_bytes());
    add("tool", tool.to_string_lossy().as_bytes());
    crate::plugin::sha256_hex(&inputs)
}

/// componentize-py for the project in `dir`: [`componentize_py`]'s, or, when there is none and
/// the project has a `requirements.txt`, one installed into the project's `.venv` on this first
/// build (as `pip` would by hand).
fn componentize_py_or_install(dir: &Path) -> Result<PathBuf> {
    let found = componentize_py(dir);
    let requirements = dir.join("requirements.txt");
    if found.is_ok() || !requirements.is_file() {
        return found;
    }
    let venv = dir.join(".venv");
    eprintln!(
        "creating the project's Python environment {} (first build only)",
        venv.display()
    );
    crate::python_env::create(
        &venv,
        &[std::ffi::OsStr::new("-r"), requirements.as_os_str()],
    )?;
    componentize_py(dir)
}

fn build_python(dir: &Path) -> Result<PathBuf> {
    let tool = componentize_py_or_install(dir)?;
    let name = std::fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "plugin".into());
    let out_dir = dir.join("target");
    let out = out_dir.join(format!("{name}.wasm"));
    let inputs_file = out_dir.join(format!(".{name}.inputs"));
    let own_wit = dir.join("wit");
    let inputs = python_inputs(dir, own_wit.is_dir().then_some(&*own_wit), &tool);
    if out.is_file() && std::fs::read_to_string(&inputs_file).is_ok_and(|known| known == inputs) {
        return Ok(out);
    }
    // The contract and helpers the project lacks come from this host's copy.
    let scratch = std::env::temp_dir().join(format!("kaleidoscope-build-{}", std::process::id()));
    std::fs::create_dir_all(scratch.join("wit"))
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let wit = if dir.join("wit").is_dir() {
        dir.join("wit")
    } else {
        std::fs::write(scratch.join("wit/handler.wit"), super::scaffold::WIT)?;
        scratch.join("wit")
    };
    std::fs::write(
        scratch.join("kaleidoscope_sdk.py"),
        super::scaffold::PYTHON_SDK,
    )?;
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let partial = out_dir.join(format!(".{name}.wasm.tmp"));
    // The project's own folder first, so its `kaleidoscope_sdk.py` (if any) wins.
    let status = Command::new(&tool)
        .arg("-d")
        .arg(&wit)
        .args(["-w", "result-handler", "componentize", "-p"])
        .arg(dir)
        .arg("-p")
        .arg(&scratch)
        .args(["app", "-o"])
        .arg(&partial)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("cannot run {}", tool.display()));
    let _ = std::fs::remove_dir_all(&scratch);
    if !status?.success() {
        bail!(
            "componentize-py could not build {} (its errors are above)",
            dir.join("app.py").display()
        );
    }
    std::fs::rename(&partial, &out).with_context(|| format!("cannot write {}", out.display()))?;
    // Best effort: without it, the next build just builds.
    let _ = std::fs::write(&inputs_file, inputs);
    Ok(out)
}
