//! `plugin new`: a complete, buildable plugin project in a folder of its own, in Rust or Python.
//!
//! Everything the project needs is written into it — the contract (`handler.wit`), the SDK
//! (vendored: the Rust crate, or the Python helper module), a handler with native unit tests,
//! recorded entries for `plugin test`, the table's migration and the grant — so it builds outside
//! this repository, with nothing but Rust (or Python) and the package registries.

use super::Language;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The contract, as every project is built against it.
pub const WIT: &str = include_str!("../../../wit/handler.wit");
/// The Python helper module.
pub const PYTHON_SDK: &str = include_str!("../../../plugins/sdk-python/kaleidoscope_sdk.py");
/// What building a Python handler needs (`pip install -r`).
pub const PYTHON_REQUIREMENTS: &str = include_str!("../../../plugins/sdk-python/requirements.txt");

/// The Rust SDK's files, vendored into `sdk/` (its bindings read `sdk/wit/`).
const RUST_SDK: &[(&str, &str)] = &[
    (
        "sdk/Cargo.toml",
        include_str!("../../templates/rust/sdk-Cargo.toml"),
    ),
    (
        "sdk/src/lib.rs",
        include_str!("../../../plugins/sdk/src/lib.rs"),
    ),
    (
        "sdk/src/commands.rs",
        include_str!("../../../plugins/sdk/src/commands.rs"),
    ),
    (
        "sdk/src/fields.rs",
        include_str!("../../../plugins/sdk/src/fields.rs"),
    ),
    ("sdk/wit/handler.wit", WIT),
];

const RUST_FILES: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
    ("README.md", include_str!("../../templates/rust/README.md")),
    (".gitignore", include_str!("../../templates/rust/gitignore")),
];

const PYTHON_FILES: &[(&str, &str)] = &[
    ("app.py", include_str!("../../templates/python/app.py")),
    (
        "README.md",
        include_str!("../../templates/python/README.md"),
    ),
    (
        ".gitignore",
        include_str!("../../templates/python/gitignore"),
    ),
    ("kaleidoscope_sdk.py", PYTHON_SDK),
    ("requirements.txt", PYTHON_REQUIREMENTS),
    ("wit/handler.wit", WIT),
];

const COMMON_FILES: &[(&str, &str)] = &[
    (
        "kaleidoscope.toml",
        include_str!("../../templates/common/kaleidoscope.toml"),
    ),
    (
        "tests/entries.jsonl",
        include_str!("../../templates/common/entries.jsonl"),
    ),
];

/// What `plugin new` was asked for.
#[derive(Clone, Debug)]
pub struct NewPlugin {
    /// The plugin's name (manifest, grants, crate), e.g. `caption-quality`.
    pub name: String,
    /// The stream it handles.
    pub stream: String,
    /// The table its example handler writes (default: the name with `_` for `-`).
    pub table: Option<String>,
    /// The language of the handler.
    pub language: Language,
    /// Where to write the project (default: `./<name>`); must not exist or be empty.
    pub dir: Option<PathBuf>,
}

/// Writes the project; returns its folder.
pub fn create(request: &NewPlugin) -> Result<PathBuf> {
    let name = &request.name;
    let identifier = |text: &str| {
        !text.is_empty()
            && text.len() <= 64
            && text.starts_with(|c: char| c.is_ascii_lowercase())
            && text
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    if !identifier(name) {
        bail!(
            "plugin name {name:?}: use lowercase letters, digits, `-` and `_`, starting with a letter (it names the crate, the manifest and the grants)"
        );
    }
    if !identifier(&request.stream) {
        bail!(
            "stream {:?}: use lowercase letters, digits, `-` and `_`, starting with a letter",
            request.stream
        );
    }
    let table = request
        .table
        .clone()
        .unwrap_or_else(|| name.replace('-', "_"));
    if !identifier(&table) || table.contains('-') {
        bail!("table {table:?}: use lowercase letters, digits and `_`, starting with a letter");
    }
    let dir = request.dir.clone().unwrap_or_else(|| PathBuf::from(name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: choose another --dir",
            dir.display()
        );
    }

    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
            .replace("{{stream}}", &request.stream)
            .replace("{{table}}", &table)
    };
    let files: Vec<(String, String)> = match request.language {
        Language::Rust => RUST_FILES
            .iter()
            .map(|(path, text)| (path.to_string(), fill(text)))
            .chain(RUST_SDK.iter().map(|(path, text)| {
                // In this repository the SDK reads the contract from `../../wit`; vendored, from
                // its own `wit/`.
                (
                    path.to_string(),
                    text.replace("path: \"../../wit\"", "path: \"wit\""),
                )
            }))
            .collect(),
        Language::Python => PYTHON_FILES
            .iter()
            .map(|(path, text)| (path.to_string(), fill(text)))
            .collect(),
    };
    // Named by the time it was made, like the host's own: every plugin's migrations end up in
    // one directory of the operator's, applied in name order, where `0001_<table>.sql` of two
    // plugins would collide.
    let made: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let migration = (
        format!("migrations/{made}_{table}.sql"),
        fill(include_str!("../../templates/common/migration.sql")),
    );
    for (path, text) in files
        .into_iter()
        .chain(COMMON_FILES.iter().map(|(p, t)| (p.to_string(), fill(t))))
        .chain(std::iter::once(migration))
    {
        write(&dir.join(path), &text)?;
    }
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_sdk_uses_the_plugin_workspaces_dependency_versions() {
        let workspace = include_str!("../../../plugins/Cargo.toml");
        let vendored = include_str!("../../templates/rust/sdk-Cargo.toml");
        for line in vendored.lines().filter(|l| l.starts_with("wit-bindgen")) {
            assert!(
                workspace.contains(line),
                "{line} differs from plugins/Cargo.toml"
            );
        }
        assert!(
            include_str!("../../../plugins/sdk/src/lib.rs").contains("path: \"../../wit\""),
            "the SDK's bindings path changed: update `create`"
        );
    }

    #[test]
    fn bad_names_are_refused_naming_the_input() {
        let request = |name: &str, stream: &str| NewPlugin {
            name: name.into(),
            stream: stream.into(),
            table: None,
            language: Language::Rust,
            dir: Some(std::env::temp_dir().join("kaleidoscope-never-written")),
        };
        for (name, stream, expected) in [
            ("Bad Name", "s", "plugin name \"Bad Name\""),
            ("ok", "no/slash", "stream \"no/slash\""),
        ] {
            let error = create(&request(name, stream)).expect_err(name).to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
