//! Making a Python virtual environment with what a tool needs in it: the reference consumer of
//! `bench` (its drivers) and a Python plugin project (componentize-py), each on first use.

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

/// Creates the environment `venv` (`python3 -m venv`) and installs `packages` into it (`pip
/// install --quiet`, so `-r FILE` works too); an error names the step that failed. Slow (pip
/// downloads): say so before calling.
pub fn create<S: AsRef<OsStr>>(venv: &Path, packages: &[S]) -> Result<()> {
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .stdout(Stdio::null())
        .status()
        .context("cannot run python3 to create a Python environment (is Python 3 installed?)")?;
    if !made.success() {
        bail!("`python3 -m venv {}` failed", venv.display());
    }
    let pip = venv.join("bin/pip");
    let installed = Command::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .status()
        .with_context(|| format!("cannot run {}", pip.display()))?;
    if !installed.success() {
        let packages: Vec<_> = packages
            .iter()
            .map(|p| p.as_ref().to_string_lossy())
            .collect();
        bail!(
            "`{} install {}` failed (its errors are above)",
            pip.display(),
            packages.join(" ")
        );
    }
    Ok(())
}
