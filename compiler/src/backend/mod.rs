//! Code generators from the kernel IR ([`crate::kernel`]) to machine code.

pub mod cpu;
pub mod cuda;

use std::path::PathBuf;

/// The root of vlmc's on-disk caches (each backend uses a subfolder: `cpu/`, `cuda/`):
/// `$VLMC_CACHE_DIR`, else `$VLMC_CACHE` (the older name), else `$XDG_CACHE_HOME/vlmc`, else
/// `~/.cache/vlmc`; `None` when none of these variables is set.
pub fn cache_root() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("VLMC_CACHE_DIR").or_else(|| env("VLMC_CACHE")) {
        return Some(d);
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return Some(d.join("vlmc"));
    }
    env("HOME").map(|h| h.join(".cache").join("vlmc"))
}
