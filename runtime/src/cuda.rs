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

/// Whether the CUDA driver library (`libcuda.so`) can be loaded; touches no driver function.
pub fn driver_present() -> bool {
    // SAFETY: only probes for the library by name.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// An error unless the CUDA driver library is present.
pub fn check_driver() -> Result<(), RunError> {
    if driver_present() {
        Ok(())
    } else {
        fail(
            "--target cuda needs an NVIDIA GPU and its driver, but the CUDA driver library \
             (libcuda.so) was not found on this machine; run on the CPU instead (without \
             --target cuda)",
        )
    }
}

/// Whether cuBLAS (`libcublas.so`) can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only probes for the library by name.
    unsafe { cudarc::cublas::sys::is_culib_present() }
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
