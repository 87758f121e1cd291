//! A model loaded on one GPU: its compiled module, its buffers and its launches.

use super::slots::{from_slots, to_slots};
use super::{fail, CudaOptions};
use crate::interp::RunError;
use crate::tensor::Tensor;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use vlmc::backend::cuda::nvrtc::{self, NvrtcOptions};
use vlmc::backend::cuda::{Gemm, Launch, Program};
use vlmc::kernel::{BufferKind, Plan};

fn err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> RunError + '_ {
    move |e| RunError {
        message: format!("CUDA: {what}: {e:?}"),
    }
}

/// One launch, resolved to device pointers.
enum Step {
    Kernel {
        f: CudaFunction,
        cfg: LaunchConfig,
        args: Vec<u64>,
    },
    Gemm {
        g: Gemm,
        a: u64,
        b: u64,
        c: u64,
    },
}

/// A compiled model on the GPU, ready to run many times.
pub struct GpuModel {
    plan: Plan,
    stream: Arc<CudaStream>,
    blas: Option<CudaBlas>,
    _module: Arc<CudaModule>,
    /// The activation arena (every `Temp` buffer at its offset).
    arena: CudaSlice<u32>,
    /// The other buffers, each its own allocation.
    own: HashMap<usize, CudaSlice<u32>>,
    steps: Vec<Step>,
    /// The device's name and architecture.
    pub device: String,
    /// Whether the compiled module came from the disk cache.
    pub cached: bool,
}

impl GpuModel {
    /// Compiles `program` for the device, allocates every buffer and uploads the parameters and
    /// load-time values. A driver that fails inside the CUDA bindings (a missing function) is
    /// an error, not a panic.
    pub fn new(
        plan: Plan,
        program: &Program,
        params: &BTreeMap<String, Tensor>,
        load_time: &HashMap<usize, Tensor>,
        opts: &CudaOptions,
    ) -> Result<GpuModel, RunError> {
        super::check_driver()?;
        super::guarded("loading the model", || {
            Self::load(plan, program, params, load_time, opts)
        })
    }

    fn load(
        plan: Plan,
        program: &Program,
        params: &BTreeMap<String, Tensor>,
        load_time: &HashMap<usize, Tensor>,
        opts: &CudaOptions,
    ) -> Result<GpuModel, RunError> {
        let ctx = CudaContext::new(opts.device).map_err(|e| RunError {
            message: format!("no usable CUDA device {}: {e:?}", opts.device),
        })?;
        // One stream: its order is the only synchronisation the plan needs.
        // SAFETY: no slice exists yet; every later one lives on this context's default stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(err("compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().unwrap_or_else(|_| "GPU".into());
        let stream = ctx.default_stream();

        let mut nv = NvrtcOptions::new(&arch);
        if opts.cache_dir.is_some() {
            nv.cache_dir = opts.cache_dir.clone();
        }
        nvrtc::available().map_err(|e| RunError {
            message: e.to_string(),
        })?;
        let bin = nvrtc::compile_program(program, &nv).map_err(|e| RunError {
            message: e.to_string(),
        })?;
        let module = ctx
            .load_module(Ptx::from_binary(bin.cubin))
            .map_err(err("loading the compiled module"))?;

        let arena = stream
            .alloc_zeros::<u32>(plan.arena.max(1))
            .map_err(err("allocating the arena"))?;
        let mut own = HashMap::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            let host = match &b.kind {
                BufferKind::Temp { .. } => continue,
                BufferKind::Input(_) | BufferKind::Scratch => None,
                BufferKind::Param(p) => Some(params.get(p).ok_or_else(|| RunError {
                    message: format!("missing parameter `{p}`"),
                })?),
                BufferKind::LoadTime(n) => Some(load_time.get(n).ok_or_else(|| RunError {
                    message: format!("missing load-time value %{n}"),
                })?),
            };
            let mut slice = stream
                .alloc_zeros::<u32>(b.len().max(1))
                .map_err(err("allocating a buffer"))?;
            if let Some(t) = host {
                if t.numel() != b.len() {
                    return fail(format!(
                        "{:?} has {} elements, the plan expects {:?}",
                        b.kind,
                        t.numel(),
                        b.shape
                    ));
                }
                let v = to_slots(t, b.dtype);
                if !v.is_empty() {
                    stream
                        .memcpy_htod(&v, &mut slice)
                        .map_err(err("uploading weights"))?;
                }
            }
            own.insert(i, slice);
        }

        let base = |s: &CudaSlice<u32>| -> u64 {
            let (p, _sync) = s.device_ptr(&stream);
            p
        };
        let arena_ptr = base(&arena);
        let mut ptrs = Vec::with_capacity(plan.buffers.len());
        for (i, b) in plan.buffers.iter().enumerate() {
            ptrs.push(match b.kind {
                BufferKind::Temp { offset } => arena_ptr + 4 * offset as u64,
                _ => own.get(&i).map(base).unwrap_or(0),
            });
        }
        let ptr = |buf: usize, offset: usize| -> Result<u64, RunError> {
            match ptrs.get(buf) {
                Some(p) => Ok(p + 4 * offset as u64),
                None => fail(format!("the launch plan names a missing buffer b{buf}")),
            }
        };

        let mut blas_handle = None;
        let mut steps = Vec::with_capacity(program.launches.len());
        for l in &program.launches {
            steps.push(match l {
                Launch::Kernel(k) => Step::Kernel {
                    f: module
                        .load_function(&k.function)
                        .map_err(err(&format!("finding kernel {}", k.function)))?,
                    cfg: LaunchConfig {
                        grid_dim: (k.grid[0], k.grid[1], k.grid[2]),
                        block_dim: (k.block, 1, 1),
                        shared_mem_bytes: 0,
                    },
                    args: k
                        .args
                        .iter()
                        .map(|&a| ptr(a, 0))
                        .collect::<Result<_, _>>()?,
                },
                Launch::Gemm(g) => {
                    if blas_handle.is_none() {
                        if !super::cublas_present() {
                            return fail("the plan calls cuBLAS, but libcublas.so was not found");
                        }
                        blas_handle =
                            Some(CudaBlas::new(stream.clone()).map_err(|e| RunError {
                                message: format!("cuBLAS: {e:?}"),
                            })?);
                    }
                    Step::Gemm {
                        g: g.clone(),
                        a: ptr(g.a.buf, g.a.offset)?,
                        b: ptr(g.b.buf, g.b.offset)?,
                        c: ptr(g.c.buf, g.c.offset)?,
                    }
                }
            });
        }
        Ok(GpuModel {
            plan,
            stream,
            blas: blas_handle,
            _module: module,
            arena,
            own,
            steps,
            device: format!("{name} ({arch})"),
            cached: bin.cached,
        })
    }

    /// Copies the inputs to the device.
    pub fn set_inputs(&mut self, inputs: &BTreeMap<String, Tensor>) -> Result<(), RunError> {
        for (i, b) in self.plan.buffers.iter().enumerate() {
            let BufferKind::Input(name) = &b.kind else {
                continue;
            };
            let t = inputs.get(name).ok_or_else(|| RunError {
                message: format!("missing input `{name}`"),
            })?;
            if t.numel() != b.len() {
                return fail(format!(
                    "input `{name}` has {} elements, the compiled plan expects {:?}",
                    t.numel(),
                    b.shape
                ));
            }
            let v = to_slots(t, b.dtype);
            if let (Some(slice), false) = (self.own.get_mut(&i), v.is_empty()) {
                self.stream
                    .memcpy_htod(&v, slice)
                    .map_err(err("uploading inputs"))?;
            }
        }
        Ok(())
    }

    /// Queues every launch of the plan on the stream (does not wait).
    pub fn launch(&self) -> Result<(), RunError> {
        for s in &self.steps {
            match s {
                Step::Kernel { f, cfg, args } => {
                    let mut b = self.stream.launch_builder(f);
                    for a in args {
                        b.arg(a);
                    }
                    // SAFETY: the arguments are device pointers to buffers of the sizes the
                    // generated function indexes (checked by the launch plan's bounds check).
                    unsafe { b.launch(*cfg) }.map_err(err("launching a kernel"))?;
                }
                Step::Gemm { g, a, b, c } => self.gemm(g, *a, *b, *c)?,
            }
        }
        Ok(())
    }

    fn gemm(&self, g: &Gemm, a: u64, b: u64, c: u64) -> Result<(), RunError> {
        let Some(handle) = &self.blas else {
            return fail("cuBLAS is not loaded");
        };
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let int = |x: usize| {
            i32::try_from(x).map_err(|_| RunError {
                message: format!("{}: a matmul size past the i32 range", g.group),
            })
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers address buffers that hold every element the call reads and
        // writes (checked by the launch plan's check); alpha and beta live across the call.
        unsafe {
            blas::sgemm_strided_batched(
                *handle.handle(),
                op(g.a.trans),
                op(g.b.trans),
                int(g.m)?,
                int(g.n)?,
                int(g.k)?,
                &alpha,
                a as *const f32,
                int(g.a.ld)?,
                g.a.stride as i64,
                b as *const f32,
                int(g.b.ld)?,
                g.b.stride as i64,
                &beta,
                c as *mut f32,
                int(g.c.ld)?,
                g.c.stride as i64,
                int(g.batch)?,
            )
        }
        .map_err(|e| RunError {
            message: format!("cuBLAS in {}: {e:?}", g.group),
        })
    }

    /// Waits for everything queued.
    pub fn synchronize(&self) -> Result<(), RunError> {
        self.stream.synchronize().map_err(err("synchronising"))
    }

    /// Copies the outputs back.
    pub fn outputs(&self) -> Result<BTreeMap<String, Tensor>, RunError> {
        let mut out = BTreeMap::new();
        for (name, b) in &self.plan.outputs {
            let buf = &self.plan.buffers[*b];
            let v = match (&buf.kind, self.own.get(b)) {
                (BufferKind::Temp { offset }, _) => self
                    .stream
                    .clone_dtoh(&self.arena.slice(*offset..*offset + buf.len()))
                    .map_err(err("copying outputs back"))?,
                (_, Some(s)) => {
                    let mut v = self
                        .stream
                        .clone_dtoh(s)
                        .map_err(err("copying outputs back"))?;
                    v.truncate(buf.len());
                    v
                }
                _ => return fail(format!("output `{name}` has no device buffer")),
            };
            out.insert(name.clone(), from_slots(&v, buf.dtype, buf.shape.clone()));
        }
        Ok(out)
    }

    /// Uploads the inputs, runs every launch and returns the outputs.
    pub fn run(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        super::guarded("running the model", || {
            self.set_inputs(inputs)?;
            self.launch()?;
            self.synchronize()?;
            self.outputs()
        })
    }

    /// The number of launches (kernels and cuBLAS calls) per run.
    pub fn launches(&self) -> usize {
        self.steps.len()
    }
}
