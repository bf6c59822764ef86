//! Cranelift's incremental compilation cache, kept on disk beside the compiled components: each
//! function's machine code under a hash of its input. A component that changed only in part
//! compiles only the functions that changed. What makes Python plugins quick to redeploy: every
//! componentize-py build embeds the whole CPython interpreter (tens of thousands of functions,
//! the same in every build) and differs only in its data, so a changed handler compiles in a
//! fraction of the time the whole component takes.
//!
//! Like the component cache, loading trusts the directory: only the host must be able to write
//! it. Cranelift checks each entry's key (the function, the compiler's settings and version)
//! before using it.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use wasmtime::CacheStore;

/// The function cache in `dir`, one file per function, spread over 256 subdirectories.
#[derive(Debug)]
pub(super) struct FunctionCache {
    dir: PathBuf,
}

impl FunctionCache {
    pub(super) fn new(dir: &Path) -> FunctionCache {
        FunctionCache {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        let name = super::sha256_hex(key);
        self.dir.join(&name[..2]).join(&name[2..])
    }
}

impl CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        std::fs::read(self.path(key)).ok().map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.path(key);
        let Some(parent) = path.parent() else {
            return false;
        };
        std::fs::create_dir_all(parent).is_ok() && super::write_atomically(&path, &value).is_ok()
    }
}
