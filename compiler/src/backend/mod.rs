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

/// Runs `f`, which calls into a GPU library through cudarc, turning a panic inside it (cudarc
/// panics when a library lacks a function it looks up: a wrong or broken `libcuda.so` or
/// `libnvrtc.so`) into `Err` with the panic's message. The message is not printed: the panic
/// hook is silenced while `f` runs, one guarded call at a time so that hooks are always
/// restored in order.
pub fn catch_library_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic in the library bindings".to_string())
    })
}
