//! Compiling generated CUDA C with NVRTC, loaded at run time through cudarc (no CUDA toolkit is
//! needed to build vlmc), for one real architecture (`sm_80`: a CUBIN, which the driver loads
//! without a JIT step). Binaries are cached on disk under a hash of the NVRTC version, the
//! options and the source.
//!
//! NVRTC is found by cudarc's search (`libnvrtc.so.12` on the loader's path) or, first, at the
//! path in `$VLMC_NVRTC` (or given to [`load_from`]): loading a library by path makes the later
//! load by name find it, as the dynamic loader matches its soname.

use super::Program;
use cudarc::nvrtc::{result, sys};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// How to compile.
#[derive(Clone, Debug, PartialEq)]
pub struct NvrtcOptions {
    /// The real architecture, `sm_XY`.
    pub arch: String,
    /// Extra include directories (the generated code includes no header; for hand-written code).
    pub include_dirs: Vec<PathBuf>,
    /// Where compiled binaries are cached (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

impl NvrtcOptions {
    /// Options for `arch` with the default cache directory.
    pub fn new(arch: &str) -> Self {
        NvrtcOptions {
            arch: arch.to_string(),
            include_dirs: Vec::new(),
            cache_dir: default_cache_dir(),
        }
    }
}

/// Why compilation failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NvrtcError {
    /// NVRTC could not be loaded.
    #[error("{0}")]
    Unavailable(String),
    /// NVRTC rejected the source; the log names the line.
    #[error("NVRTC rejected kernel `{kernel}` for {arch}:\n{log}")]
    Compile {
        kernel: String,
        arch: String,
        log: String,
    },
    /// Anything else (a bad option, a failed NVRTC call).
    #[error("NVRTC: {0}")]
    Other(String),
}

/// A compiled module.
#[derive(Clone, Debug, PartialEq)]
pub struct Binary {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// Whether it came from the disk cache.
    pub cached: bool,
    /// The cache key (hex).
    pub key: String,
}

/// Libraries loaded by path, kept loaded for the life of the process.
static LOADED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

/// Loads `libnvrtc.so.12` (or another NVRTC) from a path, so that cudarc finds it.
pub fn load_from(path: &Path) -> Result<(), NvrtcError> {
    // SAFETY: loading NVRTC runs no initialisers with preconditions of ours.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        NvrtcError::Unavailable(format!("cannot load NVRTC from {}: {e}", path.display()))
    })?;
    if let Ok(mut v) = LOADED.lock() {
        v.push(lib);
    }
    Ok(())
}

/// Makes sure NVRTC can be used: loads `$VLMC_NVRTC` when set, then checks that cudarc finds
/// the library (never panics when it is missing).
pub fn available() -> Result<(), NvrtcError> {
    static FROM_ENV: OnceLock<Result<(), NvrtcError>> = OnceLock::new();
    FROM_ENV
        .get_or_init(|| match std::env::var_os("VLMC_NVRTC") {
            Some(p) => load_from(Path::new(&p)),
            None => Ok(()),
        })
        .clone()?;
    // SAFETY: only probes for the library by name.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(NvrtcError::Unavailable(
            "NVRTC (libnvrtc.so.12) was not found: install the CUDA toolkit or the PyPI wheel \
             nvidia-cuda-nvrtc-cu12, and put its lib directory on LD_LIBRARY_PATH or set \
             VLMC_NVRTC=/path/to/libnvrtc.so.12"
                .into(),
        ))
    }
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32), NvrtcError> {
    available()?;
    guarded(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| NvrtcError::Other(format!("nvrtcVersion: {e:?}")))?;
        Ok((major, minor))
    })
}

/// Runs `f`, which calls NVRTC through cudarc: cudarc panics when the library lacks a function
/// it looks up (a wrong or broken `libnvrtc.so`); that becomes an error, and the panic message
/// is not printed.
fn guarded<T>(f: impl FnOnce() -> Result<T, NvrtcError>) -> Result<T, NvrtcError> {
    crate::backend::catch_library_panic(f).unwrap_or_else(|why| {
        Err(NvrtcError::Unavailable(format!(
            "the NVRTC library that was found is not usable ({why}): point VLMC_NVRTC or \
             LD_LIBRARY_PATH at a real libnvrtc.so.12"
        )))
    })
}

/// Whether `arch` is a real architecture name such as `sm_80` or `sm_90a`.
pub fn valid_arch(arch: &str) -> bool {
    arch.strip_prefix("sm_").is_some_and(|v| {
        let digits = v.trim_end_matches(['a', 'f']);
        digits.len() >= 2
            && digits.chars().all(|c| c.is_ascii_digit())
            && v.len() - digits.len() <= 1
    })
}

/// The default cache directory: `cuda/` under [`crate::backend::cache_root`]
/// (`$VLMC_CACHE_DIR/cuda`, else `$VLMC_CACHE/cuda`, else `$XDG_CACHE_HOME/vlmc/cuda`, else
/// `~/.cache/vlmc/cuda`).
pub fn default_cache_dir() -> Option<PathBuf> {
    crate::backend::cache_root().map(|d| d.join("cuda"))
}

/// The compiler options for `opts`.
fn options(opts: &NvrtcOptions) -> Result<Vec<String>, NvrtcError> {
    if !valid_arch(&opts.arch) {
        return Err(NvrtcError::Other(format!(
            "`{}` is not a GPU architecture (expected sm_XY, e.g. sm_80)",
            opts.arch
        )));
    }
    let mut v = vec![
        format!("--gpu-architecture={}", opts.arch),
        "--std=c++17".to_string(),
    ];
    for d in &opts.include_dirs {
        let d = d.to_string_lossy();
        if d.contains('\0') {
            return Err(NvrtcError::Other("an include path contains NUL".into()));
        }
        v.push(format!("--include-path={d}"));
    }
    Ok(v)
}

/// A 128-bit FNV-1a hash as hex: stable across Rust versions, unlike `DefaultHasher`.
fn hash_hex(parts: &[&[u8]]) -> String {
    let mut h = crate::hash::Fnv128::default();
    for p in parts {
        h.write(p);
        h.write(&[0xff]);
    }
    format!("{:032x}", h.finish())
}

/// Compiles a whole program (one translation unit), through the cache.
pub fn compile_program(p: &Program, opts: &NvrtcOptions) -> Result<Binary, NvrtcError> {
    let (src, starts) = p.module_source();
    compile(&src, &starts, opts)
}

/// Compiles one source through the cache; `starts` names the function starting at each line,
/// to say which kernel an error is in.
pub fn compile(
    src: &str,
    starts: &[(usize, String)],
    opts: &NvrtcOptions,
) -> Result<Binary, NvrtcError> {
    let options = options(opts)?;
    let (major, minor) = version()?;
    let ver = format!("{major}.{minor}");
    let key = hash_hex(&[ver.as_bytes(), options.join(" ").as_bytes(), src.as_bytes()]);
    let path = opts
        .cache_dir
        .as_ref()
        .map(|d| d.join(format!("{key}.cubin")));
    if let Some(p) = &path {
        if let Ok(cubin) = crate::files::read(p) {
            if !cubin.is_empty() {
                return Ok(Binary {
                    cubin,
                    cached: true,
                    key,
                });
            }
        }
    }
    let cubin = guarded(|| Ok(compile_uncached(src, &options)))?.map_err(|log| {
        let kernel = error_line(&log)
            .map(|line| kernel_at(starts, line))
            .unwrap_or_else(|| "?".into());
        NvrtcError::Compile {
            kernel,
            arch: opts.arch.clone(),
            log,
        }
    })?;
    if let (Some(p), Some(dir)) = (&path, &opts.cache_dir) {
        // A cache that cannot be written is only slower.
        let _ = std::fs::create_dir_all(dir).and_then(|_| {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &cubin)?;
            std::fs::rename(&tmp, p)
        });
    }
    Ok(Binary {
        cubin,
        cached: false,
        key,
    })
}

/// The line of the first error in an NVRTC log (`vlmc.cu(123): error: ...`).
fn error_line(log: &str) -> Option<usize> {
    log.lines().find(|l| l.contains("error")).and_then(|l| {
        let open = l.find('(')?;
        let close = l[open..].find(')')? + open;
        l[open + 1..close].parse().ok()
    })
}

/// The function a line falls in (`prelude` before the first).
fn kernel_at(starts: &[(usize, String)], line: usize) -> String {
    starts
        .iter()
        .rev()
        .find(|(s, _)| *s <= line)
        .map(|(_, n)| n.clone())
        .unwrap_or_else(|| "prelude".into())
}

/// Runs NVRTC; on failure returns its log.
fn compile_uncached(src: &str, options: &[String]) -> Result<Vec<u8>, String> {
    let csrc = CString::new(src).map_err(|_| "the source contains NUL".to_string())?;
    let prog = result::create_program(&csrc, Some(c"vlmc.cu"))
        .map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
    // SAFETY: `prog` is a live program until destroyed below; buffers are sized by NVRTC.
    unsafe {
        let compiled = result::compile_program(prog, options);
        let log = result::get_program_log(prog)
            .map(|v| chars_to_string(&v))
            .unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(if log.trim().is_empty() {
                format!("{e:?}")
            } else {
                log
            }),
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(format!("nvrtcGetCUBINSize: {e:?}")),
                    Ok(()) => {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                            .result()
                            .map(|_| buf)
                            .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

fn chars_to_string(v: &[c_char]) -> String {
    if v.is_empty() {
        return String::new();
    }
    // SAFETY: NVRTC's log is NUL-terminated within the buffer it sized.
    unsafe { CStr::from_ptr(v.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert!(valid_arch("sm_80") && valid_arch("sm_90a") && valid_arch("sm_120"));
        assert!(!valid_arch("compute_80") && !valid_arch("sm_8") && !valid_arch("sm_8x"));
    }

    #[test]
    fn errors_name_their_kernel() {
        let starts = vec![(10, "k0_a".to_string()), (20, "k1_b".to_string())];
        let log = "vlmc.cu(23): error: identifier \"x\" is undefined\n";
        assert_eq!(error_line(log), Some(23));
        assert_eq!(kernel_at(&starts, 23), "k1_b");
        assert_eq!(kernel_at(&starts, 3), "prelude");
    }

    #[test]
    fn hashes_are_stable() {
        assert_eq!(hash_hex(&[b"a"]), hash_hex(&[b"a"]));
        assert_ne!(hash_hex(&[b"a", b"b"]), hash_hex(&[b"ab"]));
    }
}
