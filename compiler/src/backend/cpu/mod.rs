//! The CPU backend: every loop nest of a kernel [`Plan`] becomes a native function compiled by
//! Cranelift (see [`codegen`] for the code it emits); matmuls stay [`MatMul`] steps that the
//! runtime hands to a GEMM library.
//!
//! A compiled loop nest has the signature `fn(bufs, lo, hi, err)`: `bufs` points to one base
//! pointer per plan buffer (elements of 4 bytes: f32, i32, bools as i32 0/1), `lo..hi` is the
//! range of outer iterations to run (so the runtime can split them across threads), `err` is an
//! i32 set non-zero when an index was out of range (bit 0) or an integer divided by zero (bit 1).

mod codegen;
mod loops;
pub mod math;
pub mod nest;
mod ops;

use crate::kernel::{MatMul, Plan, Step};
use cranelift_codegen::ir::{types, AbiParam, FuncRef, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use std::collections::HashMap;

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
/// paths).
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Emit f32x4 inner loops.
    pub vectorize: bool,
    /// Merge adjacent loops whose accesses stay affine.
    pub merge: bool,
    /// Keep the Cranelift IR text of every function.
    pub clif: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            vectorize: true,
            merge: true,
            clif: false,
        }
    }
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
    let last = |s: &crate::kernel::Strided, rows: usize, cols: usize| -> Option<usize> {
        if m.batch == 0 || rows == 0 || cols == 0 {
            return Some(0);
        }
        s.offset
            .checked_add((m.batch - 1).checked_mul(s.batch)?)?
            .checked_add((rows - 1).checked_mul(s.row)?)?
            .checked_add((cols - 1).checked_mul(s.col)?)
    };
    let fits = |s: &crate::kernel::Strided, rows, cols| match (last(s, rows, cols), len(s.buf)) {
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
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut clif = String::new();
    let mut pending: Vec<(usize, FuncId, usize, usize)> = Vec::new();
    let mut kernels = Vec::new();
    for (ki, k) in plan.kernels.iter().enumerate() {
        let mut steps = Vec::new();
        for (si, step) in k.steps.iter().enumerate() {
            match step {
                Step::MatMul(m) => {
                    check_matmul(plan, m)?;
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
                    module
                        .define_function(id, &mut ctx)
                        .map_err(|e| CpuError::new(format!("{name}: cranelift: {e:?}")))?;
                    module.clear_context(&mut ctx);
                    let work = nest_work(&nest);
                    pending.push((ki, id, nest.outer_count(), work));
                    steps.push(Some(pending.len() - 1));
                }
            }
        }
        kernels.push(steps);
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
    for (name, id) in sigs {
        fns.insert(name, module.declare_func_in_func(*id, b.func));
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
