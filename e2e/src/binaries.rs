//! Locating the component binaries built by `e2e/tools/build.sh`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The directory the harness takes binaries from: `$CAIRN_BIN_DIR`, or `<workspace>/.cache/bin`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("CAIRN_BIN_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join(".cache").join("bin"),
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Path of an executable named `name` in [`bin_dir`], or [`Error::MissingBinary`] saying how
/// to build it.
pub fn binary_path(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            name: name.to_owned(),
            path,
        })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    // metadata() follows the symlinks build.sh creates.
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
