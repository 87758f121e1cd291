//! The CPU backend: every loop nest of a kernel [`Plan`] becomes a native function compiled by
//! Cranelift (see [`codegen`] for the code it emits); matmuls stay [`MatMul`] steps that the
//! runtime hands to a GEMM library.
//!
//! A compiled loop nest has the signature `fn(bufs, lo, hi, err)`: `bufs` points to one base
//! pointer per plan buffer (elements of 4 bytes: f32, i32, bools as i32 0/1), `lo..hi` is the
//! range of outer iterations to run (so the runtime can split them across threads), `err` is an
//! i32 set non-zero when an index was out of range (bit 0) or an integer divided by zero (bit 1).
//!
//! With [`CpuOptions::cache_dir`] set, the machine code of every function is cached on disk
//! ([`cache`]) under its Cranelift IR and the target, so a second compilation of the same plan
//! skips Cranelift's code generation.

mod cache;
mod codegen;
mod loops;
pub mod math;
pub mod nest;
mod ops;

pub use cache::CacheStats;

use crate::kernel::{MatMul, Plan, ScatterAdd, Step};
use cache::DiskCache;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::{types, AbiParam, FuncRef, Function, UserFuncName};
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module, ModuleReloc};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Something the CPU backend cannot compile.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct CpuError {
    pub message: String,
}

impl CpuError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> CpuError {
        CpuError {
            message: message.into(),
        }
    }
}

/// Code generation switches (all on by default; the tests turn them off to check the scalar
/// paths). The default has no disk cache; [`CpuOptions::with_disk_cache`] is what the command
/// line uses.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Emit f32x4 inner loops.
    pub vectorize: bool,
    /// Merge adjacent loops whose accesses stay affine.
    pub merge: bool,
    /// Keep the Cranelift IR text of every function.
    pub clif: bool,
    /// The folder of the disk cache of compiled functions (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            vectorize: true,
            merge: true,
            clif: false,
            cache_dir: None,
        }
    }
}

impl CpuOptions {
    /// The default options with the disk cache in [`default_cache_dir`], unless `$VLMC_NO_CACHE`
    /// is set (to anything but `0` or nothing). Without a home for the cache it warns once and
    /// compiles without one.
    pub fn with_disk_cache() -> CpuOptions {
        let off = std::env::var_os("VLMC_NO_CACHE").is_some_and(|v| !v.is_empty() && v != "0");
        let cache_dir = match off {
            true => None,
            false => {
                let d = default_cache_dir();
                if d.is_none() {
                    cache::warn_once(
                        "no folder for the kernel cache (set VLMC_CACHE_DIR, XDG_CACHE_HOME or HOME)",
                    );
                }
                d
            }
        };
        CpuOptions {
            cache_dir,
            ..CpuOptions::default()
        }
    }
}

/// Where compiled CPU functions are cached by default: `cpu/` under
/// [`crate::backend::cache_root`] (`$VLMC_CACHE_DIR/cpu`, else `$XDG_CACHE_HOME/vlmc/cpu`,
/// else `~/.cache/vlmc/cpu`).
pub fn default_cache_dir() -> Option<PathBuf> {
    super::cache_root().map(|d| d.join("cpu"))
}

/// A compiled loop nest: `f(bufs, lo, hi, err)`.
pub type KernelFn = unsafe extern "C" fn(*const *mut u8, i64, i64, *mut i32);

/// One step of a compiled kernel.
#[derive(Clone, Debug)]
pub enum CpuStep {
    /// A compiled loop nest over `outer` outer iterations, each about `work` element operations.
    Loop {
        f: KernelFn,
        outer: usize,
        work: usize,
    },
    MatMul(MatMul),
    /// Run by the runtime (rows of `inner` elements added in index order).
    ScatterAdd(ScatterAdd),
}

/// A compiled kernel: its steps in order.
#[derive(Clone, Debug)]
pub struct CpuKernel {
    pub name: String,
    pub steps: Vec<CpuStep>,
}

/// The machine code of a plan; the code lives as long as this value.
pub struct CpuProgram {
    module: Option<JITModule>,
    pub kernels: Vec<CpuKernel>,
    /// The Cranelift IR of every function (when [`CpuOptions::clif`] is set).
    pub clif: String,
    /// What the disk cache did (all zero without one).
    pub cache: CacheStats,
    /// The number of compiled functions (loop nests).
    pub functions: usize,
    /// How long [`compile`] took.
    pub compile_time: std::time::Duration,
}

// SAFETY: after finalisation the module is only kept to free the code; the functions are plain
// code pointers that read and write only the buffers they are given.
unsafe impl Send for CpuProgram {}
unsafe impl Sync for CpuProgram {}

impl Drop for CpuProgram {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: no function pointer outlives `self.kernels`, which is dropped with us.
            unsafe { m.free_memory() };
        }
    }
}

impl std::fmt::Debug for CpuProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuProgram")
            .field("kernels", &self.kernels)
            .field("cache", &self.cache)
            .finish()
    }
}

fn cerr(e: impl std::fmt::Display) -> CpuError {
    CpuError::new(format!("cranelift: {e}"))
}

fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn new_module() -> Result<JITModule, CpuError> {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(cerr)?;
    flags.set("use_colocated_libcalls", "false").map_err(cerr)?;
    flags.set("is_pic", "false").map_err(cerr)?;
    let isa = cranelift_native::builder()
        .map_err(cerr)?
        .finish(settings::Flags::new(flags))
        .map_err(cerr)?;
    let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
    for (name, ptr, _) in math::symbols() {
        jb.symbol(name, ptr);
    }
    Ok(JITModule::new(jb))
}

/// Checks that a matmul's strided operands stay inside their buffers.
fn check_matmul(plan: &Plan, m: &MatMul) -> Result<(), CpuError> {
    let len = |b: usize| plan.buffers.get(b).map(|x| x.len());
    let fits =
        |s: &crate::kernel::Strided, rows, cols| match (s.last(m.batch, rows, cols), len(s.buf)) {
            (Some(l), Some(n)) => m.batch * rows * cols == 0 || l < n,
            _ => false,
        };
    if !fits(&m.a, m.m, m.k) || !fits(&m.b, m.k, m.n) {
        return Err(CpuError::new("a matmul operand reaches outside its buffer"));
    }
    if len(m.out) != Some(m.batch * m.m * m.n) {
        return Err(CpuError::new("a matmul output has the wrong size"));
    }
    for b in [m.a.buf, m.b.buf, m.out] {
        if !plan.buffers[b].dtype.is_float() {
            return Err(CpuError::new("matmuls of non-float tensors"));
        }
    }
    Ok(())
}

/// Compiles every kernel of a plan to machine code.
pub fn compile(plan: &Plan, opts: &CpuOptions) -> Result<CpuProgram, CpuError> {
    let t0 = std::time::Instant::now();
    crate::kernel::bounds::prove(plan).map_err(CpuError::new)?;
    let mut module = new_module()?;
    let mut sigs: HashMap<&'static str, FuncId> = HashMap::new();
    for (name, _, n) in math::symbols() {
        let mut sig = module.make_signature();
        for _ in 0..n {
            sig.params.push(AbiParam::new(types::F32));
        }
        sig.returns.push(AbiParam::new(types::F32));
        let id = module
            .declare_function(name, Linkage::Import, &sig)
            .map_err(cerr)?;
        sigs.insert(name, id);
    }
    let mut sig = module.make_signature();
    for _ in 0..4 {
        sig.params.push(AbiParam::new(types::I64));
    }
    let imports: Vec<(&str, usize)> = math::symbols().iter().map(|s| (s.0, s.2)).collect();
    let mut cache = opts
        .cache_dir
        .as_deref()
        .map(|d| DiskCache::new(d, module.isa(), &imports));
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut clif = String::new();
    let mut pending: Vec<(usize, FuncId, usize, usize)> = Vec::new();
    // Functions for Cranelift (the cache missed), compiled together at the end.
    let mut jobs: Vec<Job> = Vec::new();
    let mut kernels = Vec::new();
    for (ki, k) in plan.kernels.iter().enumerate() {
        let mut steps = Vec::new();
        for (si, step) in k.steps.iter().enumerate() {
            match step {
                Step::MatMul(m) => {
                    check_matmul(plan, m)?;
                    steps.push(None);
                }
                Step::ScatterAdd(s) => {
                    s.check(&plan.buffers)
                        .map_err(|e| CpuError::new(format!("{}: {e}", k.name)))?;
                    steps.push(None);
                }
                Step::Loop(l) => {
                    let Some(nest) = nest::prepare(l, &plan.buffers, opts.merge)
                        .map_err(|e| CpuError::new(format!("{}: {}", k.name, e.message)))?
                    else {
                        continue;
                    };
                    let name = format!("{}_{si}", k.name);
                    let id = module
                        .declare_function(&name, Linkage::Local, &sig)
                        .map_err(cerr)?;
                    ctx.func.signature = sig.clone();
                    ctx.func.name = UserFuncName::user(0, id.as_u32());
                    build_function(&mut module, &mut ctx, &mut fctx, &sigs, &nest, plan, opts)
                        .map_err(|e| CpuError::new(format!("{}: {}", k.name, e.message)))?;
                    if opts.clif {
                        clif.push_str(&format!("; {name}\n{}\n", ctx.func.display()));
                    }
                    let mut func = std::mem::replace(&mut ctx.func, Function::new());
                    module.clear_context(&mut ctx);
                    let key = match cache.as_mut() {
                        Some(c) => {
                            let key = c.key(&mut func);
                            if from_cache(&mut module, c, &key, id)? {
                                None
                            } else {
                                c.stats.misses += 1;
                                Some(Some(key))
                            }
                        }
                        None => Some(None),
                    };
                    if let Some(key) = key {
                        jobs.push(Job {
                            id,
                            name,
                            func,
                            key,
                        });
                    }
                    let work = nest_work(&nest);
                    pending.push((ki, id, nest.outer_count(), work));
                    steps.push(Some(pending.len() - 1));
                }
            }
        }
        kernels.push(steps);
    }
    let code = compile_all(module.isa(), &jobs)?;
    for (job, c) in jobs.iter().zip(&code) {
        if let (Some(cache), Some(key)) = (cache.as_mut(), &job.key) {
            if let Some(entry) =
                cache::Entry::portable(&module, job.id, c.align, &c.bytes, &c.relocs)
            {
                cache.store(key, &entry);
            }
        }
        module
            .define_function_bytes(job.id, c.align, &c.bytes, &c.relocs)
            .map_err(cerr)?;
    }
    module.finalize_definitions().map_err(cerr)?;
    let fns: Vec<CpuStep> = pending
        .iter()
        .map(|&(_, id, outer, work)| {
            let p = module.get_finalized_function(id);
            // SAFETY: the function was defined with `sig`: four i64 parameters, no results.
            let f: KernelFn = unsafe { std::mem::transmute::<*const u8, KernelFn>(p) };
            CpuStep::Loop { f, outer, work }
        })
        .collect();
    let mut out = Vec::new();
    for (ki, k) in plan.kernels.iter().enumerate() {
        let mut steps = Vec::new();
        let mut compiled = kernels[ki].iter();
        for step in &k.steps {
            match step {
                Step::MatMul(m) => {
                    compiled.next();
                    steps.push(CpuStep::MatMul(m.clone()));
                }
                Step::ScatterAdd(s) => {
                    compiled.next();
                    steps.push(CpuStep::ScatterAdd(s.clone()));
                }
                Step::Loop(_) => {
                    // Loops with no iterations were skipped.
                    if let Some(Some(i)) = compiled.next() {
                        steps.push(fns[*i].clone());
                    }
                }
            }
        }
        out.push(CpuKernel {
            name: k.name.clone(),
            steps,
        });
    }
    Ok(CpuProgram {
        module: Some(module),
        kernels: out,
        clif,
        cache: cache.map(|c| c.stats).unwrap_or_default(),
        functions: pending.len(),
        compile_time: t0.elapsed(),
    })
}

/// Defines `id` from the disk cache when it holds a valid entry for `key`; whether it did.
fn from_cache(
    module: &mut JITModule,
    cache: &mut DiskCache,
    key: &[u8],
    id: FuncId,
) -> Result<bool, CpuError> {
    let Some(entry) = cache.load(key) else {
        return Ok(false);
    };
    let Ok(relocs) = entry.module_relocs(&*module, id) else {
        cache.stats.rejected += 1;
        return Ok(false);
    };
    cache.stats.hits += 1;
    module
        .define_function_bytes(id, entry.align, &entry.code, &relocs)
        .map_err(cerr)?;
    Ok(true)
}

/// A function for Cranelift: its id, name (for errors), IR and cache key (when cached).
struct Job {
    id: FuncId,
    name: String,
    func: Function,
    key: Option<Vec<u8>>,
}

/// The machine code of a job.
struct Code {
    align: u64,
    bytes: Vec<u8>,
    relocs: Vec<ModuleReloc>,
}

/// Compiles the jobs with Cranelift on every core (each thread takes the next job); the code
/// in job order.
fn compile_all(isa: &dyn TargetIsa, jobs: &[Job]) -> Result<Vec<Code>, CpuError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let work = || {
        let mut ctx = Context::new();
        let mut out = Vec::new();
        while let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
            let i = out.len();
            out.push((job.id, compile_one(isa, &mut ctx, job)));
            if out[i].1.is_err() {
                break;
            }
        }
        out
    };
    let mut done: Vec<(FuncId, Result<Code, CpuError>)> = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut all = work();
        for h in helpers {
            match h.join() {
                Ok(v) => all.extend(v),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all
    });
    done.sort_by_key(|(id, _)| *id);
    let mut code = Vec::with_capacity(jobs.len());
    for (_, c) in done {
        code.push(c?);
    }
    if code.len() != jobs.len() {
        return Err(CpuError::new("a function was not compiled"));
    }
    Ok(code)
}

/// Compiles one function.
fn compile_one(isa: &dyn TargetIsa, ctx: &mut Context, job: &Job) -> Result<Code, CpuError> {
    ctx.clear();
    ctx.func = job.func.clone();
    ctx.compile(isa, &mut ControlPlane::default())
        .map_err(|e| CpuError::new(format!("{}: cranelift: {:?}", job.name, e.inner)))?;
    let code = ctx
        .compiled_code()
        .ok_or_else(|| CpuError::new(format!("{}: cranelift produced no code", job.name)))?;
    Ok(Code {
        align: u64::from(code.buffer.alignment),
        bytes: code.code_buffer().to_vec(),
        relocs: code
            .buffer
            .relocs()
            .iter()
            .map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, job.id))
            .collect(),
    })
}

fn nest_work(n: &nest::Nest) -> usize {
    fn stmts(b: &[nest::S]) -> usize {
        b.iter()
            .map(|s| match s {
                nest::S::Store(..) => 1,
                nest::S::Reduce { len, .. } => *len,
                nest::S::Inner(len, b) => len * stmts(b).max(1),
            })
            .sum()
    }
    n.inner.unwrap_or(1) * stmts(&n.body).max(1)
}

fn build_function(
    module: &mut JITModule,
    ctx: &mut Context,
    fctx: &mut FunctionBuilderContext,
    sigs: &HashMap<&'static str, FuncId>,
    nest: &nest::Nest,
    plan: &Plan,
    opts: &CpuOptions,
) -> Result<(), CpuError> {
    let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
    let mut fns: HashMap<&'static str, FuncRef> = HashMap::new();
    // In a fixed order, so that the function's IR (the cache key) is the same in every process.
    for (name, _, _) in math::symbols() {
        fns.insert(name, module.declare_func_in_func(sigs[name], b.func));
    }
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let err = b.declare_var(types::I32);
    let mut cg = codegen::Cg {
        b,
        buffers: &plan.buffers,
        base: HashMap::new(),
        err,
        fns,
        fma: has_fma(),
        vectorize: opts.vectorize,
        ranges: nest.ranges.clone(),
        stored: nest.stored(),
    };
    cg.function(nest, entry)?;
    cg.b.seal_all_blocks();
    let config = module.target_config();
    cg.b.finalize(config);
    Ok(())
}

/// The Cranelift IR of every loop nest of a plan, as text.
pub fn clif_text(plan: &Plan) -> Result<String, CpuError> {
    let opts = CpuOptions {
        clif: true,
        ..CpuOptions::default()
    };
    Ok(std::mem::take(&mut compile(plan, &opts)?.clif))
}
