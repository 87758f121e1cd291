//! Running a compiled model on an NVIDIA GPU: the kernel plan's CUDA C (from
//! [`vlmc::backend::cuda`]) compiled by NVRTC for the device's architecture, device buffers
//! allocated once (the activation arena and each other buffer), weights uploaded once, every
//! launch of the plan in order on one stream, outputs copied back.
//!
//! Everything CUDA is loaded at run time: without a driver, [`run_model`] returns an error that
//! says so (the library is probed before any driver call, so nothing panics).

mod device;
mod slots;

pub use device::GpuModel;
pub use slots::{from_slots, to_slots};

use crate::interp::RunError;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;
use vlmc::backend::cuda::{self as gen, Options, Program};
use vlmc::elab::Elaborated;
use vlmc::kernel::Plan;
use vlmc::passes::{compile, CompileOptions};

/// How to run on the GPU.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// The device ordinal.
    pub device: usize,
    /// Where compiled kernels are cached (`None`: the default, `~/.cache/vlmc/cuda`).
    pub cache_dir: Option<PathBuf>,
    /// Use generated matmul kernels even where cuBLAS is available.
    pub no_cublas: bool,
}

pub(crate) fn fail<T>(message: impl Into<String>) -> Result<T, RunError> {
    Err(RunError {
        message: message.into(),
    })
}

/// The driver functions vlmc's use of cudarc needs (cudarc loads each on first use and panics
/// when one is missing, so they are all looked up first).
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuCtxSynchronize",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemsetD8Async",
    "cuStreamSynchronize",
    "cuGetErrorName",
    "cuGetErrorString",
];

/// The cuBLAS functions vlmc calls through cudarc.
pub const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSgemmStridedBatched",
];

/// Finds the library cudarc would load for `names` (the same candidates, in the same order) and
/// checks that it exports every one of `symbols`. `Ok(None)`: no candidate loads; `Err`: the
/// library that loads lacks symbols (it is named with the ones missing).
fn probe_library(names: &[&str], symbols: &[&str]) -> Result<Option<String>, String> {
    for name in names {
        for candidate in cudarc::get_lib_name_candidates(name) {
            // SAFETY: loading a shared library runs its initialisers; this is the library
            // cudarc itself would load next, so nothing is run that would not be anyway.
            let Ok(lib) = (unsafe { libloading::Library::new(&candidate) }) else {
                continue;
            };
            let missing: Vec<&str> = symbols
                .iter()
                .copied()
                // SAFETY: only looks the symbol up; it is never called here.
                .filter(|s| unsafe { lib.get::<*const ()>(s.as_bytes()) }.is_err())
                .collect();
            return match missing.len() {
                0 => Ok(Some(candidate)),
                n => Err(format!(
                    "{candidate} was found but lacks {n} of the {} functions vlmc needs ({}{}): \
                     it is not a working NVIDIA library, or it is too old",
                    symbols.len(),
                    missing
                        .iter()
                        .take(4)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if n > 4 { ", ..." } else { "" }
                )),
            };
        }
    }
    Ok(None)
}

/// Whether a usable CUDA driver library (`libcuda.so`, exporting every function vlmc needs)
/// can be loaded; calls no driver function.
pub fn driver_present() -> bool {
    matches!(
        probe_library(&["cuda", "nvcuda"], DRIVER_SYMBOLS),
        Ok(Some(_))
    )
}

/// An error unless a usable CUDA driver library is present: not found, or found without the
/// functions vlmc needs ("no usable CUDA driver: ...").
pub fn check_driver() -> Result<(), RunError> {
    match probe_library(&["cuda", "nvcuda"], DRIVER_SYMBOLS) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => fail(
            "--target cuda needs an NVIDIA GPU and its driver, but the CUDA driver library \
             (libcuda.so) was not found on this machine; run on the CPU instead (without \
             --target cuda)",
        ),
        Err(why) => fail(format!(
            "no usable CUDA driver: {why}; run on the CPU instead (without --target cuda)"
        )),
    }
}

/// Whether a usable cuBLAS (`libcublas.so` exporting the functions vlmc calls) can be loaded.
pub fn cublas_present() -> bool {
    matches!(probe_library(&["cublas"], CUBLAS_SYMBOLS), Ok(Some(_)))
}

/// Runs `f`, which calls into cudarc, turning a panic inside it (cudarc panics when a library
/// or one of its functions is missing) into an error; the panic message is not printed.
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, RunError>,
) -> Result<T, RunError> {
    vlmc::backend::catch_library_panic(f)
        .unwrap_or_else(|why| fail(format!("no usable CUDA driver: {what}: {why}")))
}

/// The kernel plan and CUDA program of a model at the sizes its inputs give.
pub fn prepare(
    m: &Elaborated,
    inputs: &BTreeMap<String, Tensor>,
    options: &Options,
) -> Result<(vlmc::passes::Compiled, Plan, Program), RunError> {
    let dims = crate::interp::bind_dims(&m.graph, inputs)?;
    let compiled = compile(m, &CompileOptions::default()).map_err(|e| RunError {
        message: e.to_string(),
    })?;
    let mem = vlmc::passes::memory::plan(&compiled.graph, &compiled.fusion, &dims);
    // The arena lives on the device (whose allocations fail cleanly); on the host, the outputs
    // come back through a copy of their slots, so twice their size.
    let host = crate::cpu::output_bytes(&compiled.graph, &dims).and_then(|b| b.checked_mul(2));
    crate::alloc::ensure(host, || {
        format!(
            "copying the outputs of `{}`{} back from the GPU",
            m.model,
            crate::cpu::dims_at(&dims)
        )
    })?;
    if !mem.fits() {
        return fail(format!(
            "the activation memory of `{}`{} does not fit a 64-bit address space",
            m.model,
            crate::cpu::dims_at(&dims)
        ));
    }
    let plan =
        vlmc::kernel::lower(&compiled.graph, &compiled.fusion, &mem, &dims).map_err(|e| {
            RunError {
                message: format!("cannot lower {} to kernels: {e}", m.model),
            }
        })?;
    let program = gen::generate(&plan, options).map_err(|e| RunError {
        message: format!("cannot generate CUDA C for {}: {e}", m.model),
    })?;
    Ok((compiled, plan, program))
}

/// Compiles `m` for the GPU at the sizes of `inputs`, loads it with its parameters and runs it
/// once: `vlmc run --target cuda`.
pub fn run_model(
    m: &Elaborated,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
    opts: &CudaOptions,
) -> Result<BTreeMap<String, Tensor>, RunError> {
    check_driver()?;
    let mut gpu = load_model(m, inputs, params, opts)?;
    gpu.run(inputs)
}

/// Compiles `m` at the sizes of `inputs` and loads it onto the GPU with its parameters (to run
/// it many times).
pub fn load_model(
    m: &Elaborated,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
    opts: &CudaOptions,
) -> Result<GpuModel, RunError> {
    check_driver()?;
    let options = Options {
        cublas: !opts.no_cublas && cublas_present(),
    };
    let (compiled, plan, program) = prepare(m, inputs, &options)?;
    let load_time = crate::plan::load_time_values(&plan, &compiled.graph, params)?;
    GpuModel::new(plan, &program, params, &load_time, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_the_cuda_bindings_becomes_an_error() {
        let r: Result<(), RunError> = guarded("loading the model", || {
            panic!("Missing symbol cuLaunchKernel: undefined symbol")
        });
        let e = r.expect_err("a panic is an error").message;
        assert_eq!(
            e,
            "no usable CUDA driver: loading the model: Missing symbol cuLaunchKernel: undefined \
             symbol"
        );
        assert_eq!(guarded("x", || Ok(3)), Ok(3));
    }
}
