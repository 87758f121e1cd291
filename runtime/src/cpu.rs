//! The compiled CPU path: a kernel [`Plan`] compiled to machine code
//! ([`vlmc::backend::cpu`]), run over buffers allocated once: the activation arena the memory
//! plan laid out, one scratch area shared by the kernels' private buffers, load-time values
//! computed when the plan is prepared. Inputs and parameters are read in place. Loop nests are
//! split across the rayon pool by outer iterations; matmuls go to the `gemm` crate, those of a
//! few rows against operands contiguous along `k` (decoding) to [`crate::gemv`].
//!
//! [`CpuModel`] keeps one prepared plan per set of dims (compiled on first use).
//!
//! The memory a plan needs is known before it runs: [`check_plan_memory`] compares the memory
//! plan's peak and the outputs with what the machine has before anything is lowered, and
//! [`CpuPlan::new`] the buffers of the lowered plan before any is allocated.

use crate::alloc::{self, human_bytes};
use crate::interp::RunError;
use crate::tensor::{Data, Tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use vlmc::backend::cpu::{self as backend, CpuOptions, CpuProgram, CpuStep, KernelFn};
use vlmc::ir::{DType, Graph};
use vlmc::kernel::{BufferKind, Idx, MatMul, Plan, ScatterAdd, Step, Stmt, Val};

fn fail<T>(message: impl Into<String>) -> Result<T, RunError> {
    Err(RunError {
        message: message.into(),
    })
}

/// Loop nests with fewer element operations than this run on one thread.
const PARALLEL_MIN: usize = 1 << 14;

/// A plan compiled to machine code, with its buffers.
pub struct CpuPlan {
    pub plan: Plan,
    pub program: CpuProgram,
    /// Load-time values in 4-byte storage, by buffer.
    load_time: HashMap<usize, Vec<u32>>,
    /// Offset of each scratch buffer in the scratch area (4-byte slots).
    scratch_at: HashMap<usize, usize>,
    /// The arena and the scratch area, reused by every run.
    mem: Mutex<(Vec<u32>, Vec<u32>)>,
    threads: usize,
}

/// Element `i` of a tensor in 4-byte storage (bools as 0/1); `what` names the tensor.
fn storage(t: &Tensor, what: impl Fn() -> String) -> Result<Vec<u32>, RunError> {
    let n = t.numel();
    let what = || format!("{} {} (in 4-byte storage)", what(), t.shape_text());
    #[allow(unreachable_patterns)]
    Ok(match &t.data {
        Data::F32(v) => alloc::collect(n, v.iter().map(|x| x.to_bits()), what)?,
        Data::I32(v) => alloc::collect(n, v.iter().map(|&x| x as u32), what)?,
        Data::Bool(v) => alloc::collect(n, v.iter().map(|&x| u32::from(x)), what)?,
        _ => return fail("the CPU backend stores only f32, i32 and bool tensors"),
    })
}

/// The bytes of a graph's outputs at `dims` in 4-byte slots (`None` on overflow); outputs whose
/// sizes are unknown are left out (the lowering then says which dim is missing).
pub fn output_bytes(graph: &Graph, dims: &HashMap<String, i64>) -> Option<u128> {
    graph.outputs.iter().try_fold(0u128, |acc, (_, id)| {
        let ty = &graph.node(*id).ty;
        match crate::interp::concrete(&ty.shape.0, dims) {
            Ok(shape) => acc.checked_add(alloc::shape_bytes(&shape, 4)?),
            Err(_) => Some(acc),
        }
    })
}

/// ` at B=4,T=128` (empty without dims), for messages.
pub fn dims_at(dims: &HashMap<String, i64>) -> String {
    let mut at: Vec<String> = dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    at.sort();
    match at.is_empty() {
        true => String::new(),
        false => format!(" at {}", at.join(",")),
    }
}

/// Checks, before a plan is lowered, that it fits in the memory available: the activation arena
/// its memory plan laid out, and the outputs copied out of it (inputs and parameters are in
/// memory already). The error names the graph and the sizes, e.g. ``the compiled plan of `M` at
/// B=1000000 (activations 4.0 TB, outputs 4.0 TB) needs 8.0 TB; this machine has 21.3 GB
/// available``.
pub fn check_plan_memory(
    graph: &Graph,
    mem: &vlmc::passes::memory::MemoryPlan,
    dims: &HashMap<String, i64>,
) -> Result<(), RunError> {
    let outputs = output_bytes(graph, dims);
    let total = mem.peak.zip(outputs).and_then(|(p, o)| p.checked_add(o));
    let at = dims_at(dims);
    let part = |b: Option<u128>| b.map_or("too many to count".into(), human_bytes);
    Ok(alloc::ensure(total, || {
        format!(
            "the compiled plan of `{}`{at} (activations {}, outputs {})",
            graph.name,
            part(mem.peak),
            part(outputs)
        )
    })?)
}

/// Whether a tensor's storage matches a buffer's dtype.
fn holds(t: &Tensor, d: DType) -> bool {
    #[allow(unreachable_patterns)]
    match &t.data {
        Data::F32(_) => matches!(d, DType::F32 | DType::F16 | DType::BF16),
        Data::I32(_) => d == DType::I32,
        Data::Bool(_) => d == DType::Bool,
        _ => false,
    }
}

fn idx_buffers(i: &Idx, out: &mut Vec<usize>) {
    match i {
        Idx::Var(_) | Idx::Const(_) => {}
        Idx::Add(a, b) => {
            idx_buffers(a, out);
            idx_buffers(b, out);
        }
        Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) | Idx::Clamp(a, _, _) => {
            idx_buffers(a, out)
        }
        Idx::Load(b, a) => {
            out.push(*b);
            idx_buffers(a, out);
        }
    }
}

fn val_buffers(v: &Val, out: &mut Vec<usize>) {
    match v {
        Val::Load(b, i) => {
            out.push(*b);
            idx_buffers(i, out);
        }
        Val::Index(i) | Val::InRange(i, _, _) => idx_buffers(i, out),
        Val::Const(..) | Val::Acc(_) => {}
        Val::Unary(_, a) | Val::Cast { value: a, .. } => val_buffers(a, out),
        Val::Binary(_, a, b) => {
            val_buffers(a, out);
            val_buffers(b, out);
        }
        Val::Select(c, a, b) => {
            val_buffers(c, out);
            val_buffers(a, out);
            val_buffers(b, out);
        }
    }
}

fn stmt_buffers(s: &Stmt, out: &mut Vec<usize>) {
    match s {
        Stmt::Store { buf, at, value } => {
            out.push(*buf);
            idx_buffers(at, out);
            val_buffers(value, out);
        }
        Stmt::Reduce { value, .. } => val_buffers(value, out),
        Stmt::Inner { body, .. } => body.iter().for_each(|s| stmt_buffers(s, out)),
    }
}

/// Scratch buffers get offsets in one shared area: kernels run one after another, so the
/// buffers of different kernels overlap; a buffer used by several kernels gets its own place.
fn place_scratch(plan: &Plan) -> Option<(HashMap<usize, usize>, usize)> {
    let mut users: HashMap<usize, Vec<usize>> = HashMap::new();
    for (ki, k) in plan.kernels.iter().enumerate() {
        let mut used = Vec::new();
        for s in &k.steps {
            match s {
                Step::Loop(l) => l.body.iter().for_each(|s| stmt_buffers(s, &mut used)),
                Step::MatMul(m) => used.extend([m.a.buf, m.b.buf, m.out]),
                Step::ScatterAdd(s) => used.extend([s.src.buf, s.idx.buf, s.out]),
            }
        }
        used.sort_unstable();
        used.dedup();
        for b in used {
            if matches!(
                plan.buffers.get(b).map(|x| &x.kind),
                Some(BufferKind::Scratch)
            ) {
                users.entry(b).or_default().push(ki);
            }
        }
    }
    let mut shared_end = 0usize;
    let mut at = HashMap::new();
    let mut per_kernel: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut bufs: Vec<_> = users.into_iter().collect();
    bufs.sort_unstable();
    for (b, ks) in bufs {
        if ks.len() == 1 {
            per_kernel.entry(ks[0]).or_default().push(b);
        } else {
            at.insert(b, shared_end);
            shared_end = shared_end.checked_add(alloc::numel(&plan.buffers[b].shape)?)?;
        }
    }
    let mut end = shared_end;
    for bs in per_kernel.values() {
        let mut off = shared_end;
        for &b in bs {
            at.insert(b, off);
            off = off.checked_add(alloc::numel(&plan.buffers[b].shape)?)?;
        }
        end = end.max(off);
    }
    Some((at, end))
}

struct Ptrs(*const *mut u8);
// SAFETY: the pointer table is only read; the kernels write disjoint outer iterations.
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

fn check_err(e: i32, kernel: &str) -> Result<(), RunError> {
    if e & 1 != 0 {
        return fail(format!(
            "{kernel}: an index is out of range (a gather index?)"
        ));
    }
    if e & 2 != 0 {
        return fail(format!("{kernel}: integer division by zero"));
    }
    Ok(())
}

fn run_loop(f: KernelFn, ptrs: &Ptrs, outer: usize, work: usize, threads: usize) -> i32 {
    let chunks = if threads > 1 && outer >= 2 && outer.saturating_mul(work) >= PARALLEL_MIN {
        (threads * 2).min(outer)
    } else {
        1
    };
    let call = |lo: usize, hi: usize| {
        let mut e = 0i32;
        // SAFETY: the function was compiled for this plan's buffers, which `ptrs` points to,
        // and every access it makes is proven or checked to be inside them.
        unsafe { f(ptrs.0, lo as i64, hi as i64, &mut e) };
        e
    };
    if chunks == 1 {
        return call(0, outer);
    }
    (0..chunks)
        .into_par_iter()
        .map(|c| call(outer * c / chunks, outer * (c + 1) / chunks))
        .reduce(|| 0, |a, b| a | b)
}

/// `out[b] = a[b] · b[b]` with the gemm crate; batches in parallel, or one product split.
///
/// # Safety
/// The pointers must hold the plan's buffers (checked against the matmul by the backend).
unsafe fn matmul(m: &MatMul, ptrs: &[*mut u8], threads: usize) {
    let out = ptrs[m.out] as *mut f32;
    let (a, b) = (ptrs[m.a.buf] as *const f32, ptrs[m.b.buf] as *const f32);
    if m.k == 0 {
        std::ptr::write_bytes(out, 0, m.batch * m.m * m.n);
        return;
    }
    if crate::gemv::applies(m) {
        // SAFETY: as for this function.
        return crate::gemv::matmul(m, ptrs, threads);
    }
    // Addresses as integers, so that the closure can be shared across threads.
    let (oa, ob, obb) = (out as usize, a as usize, b as usize);
    let one = |bi: usize, par: gemm::Parallelism| {
        let out = oa as *mut f32;
        let a = ob as *const f32;
        let b = obb as *const f32;
        gemm::gemm(
            m.m,
            m.n,
            m.k,
            out.add(bi * m.m * m.n),
            1,
            m.n as isize,
            false,
            a.add(m.a.offset + bi * m.a.batch),
            m.a.col as isize,
            m.a.row as isize,
            b.add(m.b.offset + bi * m.b.batch),
            m.b.col as isize,
            m.b.row as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    };
    let flops = m.m * m.n * m.k;
    if threads > 1 && m.batch >= threads && flops * m.batch >= PARALLEL_MIN {
        (0..m.batch)
            .into_par_iter()
            .for_each(|bi| one(bi, gemm::Parallelism::None));
    } else {
        // A single row whose operands `gemv` cannot read runs on one thread: waking the other
        // rayon thread for each of a decode step's ~200 products cost more than it gained.
        let par = if threads > 1 && m.m > 1 && flops >= 48 * 48 * 48 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        for bi in 0..m.batch {
            one(bi, par);
        }
    }
}

/// Runs a scatter-add: the output zeroed, then every source row added to the output row its
/// index names, in index order. Threads split the columns (`p` and chunks of `s`), so no two
/// write one element.
///
/// # Safety
/// `s` must have passed [`ScatterAdd::check`] against the buffers that `ptrs` point to.
unsafe fn scatter_add(s: &ScatterAdd, ptrs: &[*mut u8], threads: usize) {
    let (out, src, idx) = (
        ptrs[s.out] as usize,
        ptrs[s.src.buf] as usize,
        ptrs[s.idx.buf] as usize,
    );
    std::ptr::write_bytes(out as *mut f32, 0, s.outer * s.n * s.inner);
    if s.k == 0 || s.inner == 0 {
        return;
    }
    let parallel = threads > 1 && s.outer * s.k * s.inner >= PARALLEL_MIN;
    let chunks = if parallel {
        threads.min(s.inner.div_ceil(16))
    } else {
        1
    };
    let width = s.inner.div_ceil(chunks);
    let column = |task: usize| {
        let (p, c) = (task / chunks, task % chunks);
        let (lo, hi) = (c * width, ((c + 1) * width).min(s.inner));
        let (out, src, idx) = (out as *mut f32, src as *const f32, idx as *const i32);
        for q in 0..s.k {
            let j = *idx.add(s.idx.offset + q * s.idx.col);
            if j < 0 || j as usize >= s.n {
                continue;
            }
            let to = out.add((p * s.n + j as usize) * s.inner);
            let from = src.add(s.src.offset + p * s.src.batch + q * s.src.row);
            if s.src.col == 1 {
                let to = std::slice::from_raw_parts_mut(to.add(lo), hi - lo);
                let from = std::slice::from_raw_parts(from.add(lo), hi - lo);
                to.iter_mut().zip(from).for_each(|(a, b)| *a += b);
            } else {
                for c in lo..hi {
                    *to.add(c) += *from.add(c * s.src.col);
                }
            }
        }
    };
    if parallel {
        (0..s.outer * chunks).into_par_iter().for_each(column);
    } else {
        (0..s.outer * chunks).for_each(column);
    }
}

fn round_buffer(d: DType, v: &mut [f32]) {
    match d {
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        _ => {}
    }
}

/// `B=4,T=128` from sorted bindings.
fn dims_text(key: &DimsKey) -> String {
    let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(",")
}

impl CpuPlan {
    /// Rounds the `n` f32 elements of buffer `b` to its dtype (f16 and bf16 are stored as f32).
    fn round_output(&self, b: usize, n: usize, ptrs: &[*mut u8]) {
        let d = self.plan.buffers[b].dtype;
        if matches!(d, DType::F16 | DType::BF16) {
            // SAFETY: the output buffer holds n f32 elements.
            let v = unsafe { std::slice::from_raw_parts_mut(ptrs[b] as *mut f32, n) };
            round_buffer(d, v);
        }
    }

    /// Compiles a plan and computes its load-time values from the graph and parameters.
    pub fn new(
        plan: Plan,
        graph: &Graph,
        params: &BTreeMap<String, Tensor>,
        opts: &CpuOptions,
    ) -> Result<CpuPlan, RunError> {
        for (i, b) in plan.buffers.iter().enumerate() {
            if !matches!(
                b.dtype,
                DType::F32 | DType::F16 | DType::BF16 | DType::I32 | DType::Bool
            ) {
                return fail(format!(
                    "buffer b{i} is {}: not supported by the CPU backend",
                    b.dtype
                ));
            }
        }
        // The buffers this plan allocates, all 4-byte slots: checked before any is made (and
        // before the code is generated).
        let placed = place_scratch(&plan);
        let scratch_len = placed.as_ref().map(|p| p.1);
        let load_time_len = plan.buffers.iter().try_fold(0usize, |acc, b| match b.kind {
            BufferKind::LoadTime(_) => acc.checked_add(alloc::numel(&b.shape)?),
            _ => Some(acc),
        });
        let slots = [Some(plan.arena), scratch_len, load_time_len];
        let bytes = |n: Option<usize>| n.and_then(|n| (n as u128).checked_mul(4));
        let total = slots
            .iter()
            .try_fold(0u128, |acc, &n| acc.checked_add(bytes(n)?));
        let part = |n: Option<usize>| bytes(n).map_or("too many to count".into(), human_bytes);
        alloc::ensure(total, || {
            format!(
                "the buffers of the compiled plan of `{}` (arena {}, scratch {}, load-time \
                 values {})",
                graph.name,
                part(slots[0]),
                part(slots[1]),
                part(slots[2])
            )
        })?;
        let Some((scratch_at, scratch_len)) = placed else {
            return fail("the scratch buffers' sizes overflow");
        };
        let t_code = std::time::Instant::now();
        let program = backend::compile(&plan, opts).map_err(|e| RunError {
            message: format!("CPU code generation: {e}"),
        })?;
        if std::env::var_os("VLMC_PROFILE").is_some() {
            eprintln!(
                "profile: machine code ({} kernels) {:.0} ms",
                program.kernels.len(),
                t_code.elapsed().as_secs_f64() * 1e3
            );
        }
        let lt = crate::plan::load_time_values(&plan, graph, params)?;
        let mut load_time = HashMap::new();
        for (i, b) in plan.buffers.iter().enumerate() {
            if let BufferKind::LoadTime(n) = b.kind {
                let t = lt.get(&n).ok_or_else(|| RunError {
                    message: format!("missing load-time value {n}"),
                })?;
                if t.numel() != b.len() || !holds(t, b.dtype) {
                    return fail(format!("load-time value {n} does not fit b{i}"));
                }
                load_time.insert(i, storage(t, || format!("load-time value {n}"))?);
            }
        }
        for (i, b) in plan.buffers.iter().enumerate() {
            if let BufferKind::Temp { offset } = b.kind {
                let end = alloc::numel(&b.shape).and_then(|n| offset.checked_add(n));
                if end.is_none_or(|e| e > plan.arena) {
                    return fail(format!("b{i} lies outside the arena"));
                }
            }
        }
        let arena = alloc::checked_vec(plan.arena, 0u32, || {
            format!("the activation arena of `{}`", graph.name)
        })?;
        let scratch = alloc::checked_vec(scratch_len, 0u32, || {
            format!("the scratch area of `{}`", graph.name)
        })?;
        let mem = Mutex::new((arena, scratch));
        Ok(CpuPlan {
            plan,
            program,
            load_time,
            scratch_at,
            mem,
            threads: rayon::current_num_threads(),
        })
    }

    /// Runs the plan on named inputs and parameters; returns the named outputs.
    pub fn run(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        let mut out = BTreeMap::new();
        self.run_into(inputs, params, &mut out)?;
        Ok(out)
    }

    /// [`CpuPlan::run`] writing each f32 output into the tensor of that name in `out` when it
    /// has the output's shape (its memory is reused: a training step returns every parameter
    /// and optimiser state, and fresh allocations of that size cost more than the copy).
    pub fn run_into(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
        out: &mut BTreeMap<String, Tensor>,
    ) -> Result<(), RunError> {
        let mut guard = self.mem.lock().map_err(|_| RunError {
            message: "a previous run panicked".into(),
        })?;
        let (arena, scratch) = &mut *guard;
        // Bool inputs and parameters are converted to 4-byte storage for the run.
        let mut converted: Vec<Vec<u32>> = Vec::new();
        let mut ptrs: Vec<*mut u8> = Vec::with_capacity(self.plan.buffers.len());
        for (i, b) in self.plan.buffers.iter().enumerate() {
            let t = match &b.kind {
                BufferKind::Input(n) => Some(inputs.get(n).ok_or_else(|| RunError {
                    message: format!("missing input `{n}`"),
                })?),
                BufferKind::Param(p) => Some(params.get(p).ok_or_else(|| RunError {
                    message: format!("missing parameter `{p}`"),
                })?),
                _ => None,
            };
            let p: *mut u8 = match (&b.kind, t) {
                (_, Some(t)) => {
                    if t.numel() != b.len() || !holds(t, b.dtype) {
                        return fail(format!(
                            "{:?} is {}{:?}, the plan expects {}{:?}",
                            b.kind,
                            t.dtype(),
                            t.shape,
                            b.dtype,
                            b.shape
                        ));
                    }
                    #[allow(unreachable_patterns)]
                    match &t.data {
                        Data::F32(v) => v.as_ptr() as *mut u8,
                        Data::I32(v) => v.as_ptr() as *mut u8,
                        _ => {
                            converted.push(storage(t, || format!("{:?}", b.kind))?);
                            converted
                                .last_mut()
                                .map_or(std::ptr::null_mut(), |v| v.as_mut_ptr() as *mut u8)
                        }
                    }
                }
                (BufferKind::LoadTime(_), None) => match self.load_time.get(&i) {
                    Some(v) => v.as_ptr() as *mut u8,
                    None => return fail(format!("missing load-time value for b{i}")),
                },
                (BufferKind::Temp { offset }, None) => {
                    // SAFETY: checked in `new` to lie inside the arena.
                    unsafe { arena.as_mut_ptr().add(*offset) as *mut u8 }
                }
                (BufferKind::Scratch, None) => match self.scratch_at.get(&i) {
                    // SAFETY: `place_scratch` sized the area to hold every placement.
                    Some(&o) => unsafe { scratch.as_mut_ptr().add(o) as *mut u8 },
                    None => std::ptr::null_mut(),
                },
                _ => std::ptr::null_mut(),
            };
            ptrs.push(p);
        }
        let table = Ptrs(ptrs.as_ptr());
        // VLMC_PROFILE=1: time every kernel and print the slowest on stderr.
        let profile = std::env::var_os("VLMC_PROFILE").is_some();
        // (total ms, of which in matmuls, kernel name)
        let mut times: Vec<(f64, f64, &str)> = Vec::new();
        // Time in matmuls and their GFLOP/s, when profiling.
        let (mut mm_ms, mut mm_flops) = (0f64, 0f64);
        for k in &self.program.kernels {
            let t0 = std::time::Instant::now();
            let mm_before = mm_ms;
            for step in &k.steps {
                match step {
                    CpuStep::Loop { f, outer, work } => {
                        let e = run_loop(*f, &table, *outer, *work, self.threads);
                        if e & 1 != 0 {
                            if let Some(m) = self.plan.bad_gather_index(|b| {
                                let buf = self.plan.buffers.get(b)?;
                                let p = *ptrs.get(b)?;
                                if buf.dtype != vlmc::ir::DType::I32 || p.is_null() {
                                    return None;
                                }
                                // SAFETY: buffer `b` holds `buf.len()` 4-byte slots at `p`.
                                Some(unsafe {
                                    std::slice::from_raw_parts(p as *const i32, buf.len())
                                })
                            }) {
                                return fail(m);
                            }
                        }
                        check_err(e, &k.name)?;
                    }
                    CpuStep::MatMul(m) => {
                        let t = profile.then(std::time::Instant::now);
                        // SAFETY: the backend checked the matmul against the buffers.
                        unsafe { matmul(m, &ptrs, self.threads) };
                        if let Some(t) = t {
                            mm_ms += t.elapsed().as_secs_f64() * 1e3;
                            mm_flops += 2.0 * (m.batch * m.m * m.n * m.k) as f64;
                        }
                        self.round_output(m.out, m.batch * m.m * m.n, &ptrs);
                    }
                    CpuStep::ScatterAdd(s) => {
                        // SAFETY: the backend checked the step against the buffers.
                        unsafe { scatter_add(s, &ptrs, self.threads) };
                        self.round_output(s.out, s.outer * s.n * s.inner, &ptrs);
                    }
                }
            }
            if profile {
                times.push((t0.elapsed().as_secs_f64() * 1e3, mm_ms - mm_before, &k.name));
            }
        }
        if profile {
            let total: f64 = times.iter().map(|t| t.0).sum();
            times.sort_by(|a, b| b.0.total_cmp(&a.0));
            eprintln!(
                "profile: {total:.2} ms in {} kernels; matmuls {mm_ms:.2} ms ({:.1} GFLOP/s), \
                 loops {:.2} ms",
                times.len(),
                mm_flops / mm_ms.max(1e-9) / 1e6,
                total - mm_ms
            );
            let all = std::env::var("VLMC_PROFILE").is_ok_and(|v| v == "all");
            for (t, mm, name) in times.iter().take(if all { usize::MAX } else { 12 }) {
                eprintln!("  {t:8.3} ms  {name}  (matmul {mm:.3} ms)");
            }
        }
        let t_out = std::time::Instant::now();
        for (name, b) in &self.plan.outputs {
            let buf = &self.plan.buffers[*b];
            let n = buf.len();
            let p = ptrs[*b];
            if p.is_null() && n > 0 {
                return fail(format!("output `{name}` has no storage"));
            }
            // SAFETY: every buffer pointer holds `len` elements of 4 bytes.
            let raw: &[u32] = if n == 0 {
                &[]
            } else {
                unsafe { std::slice::from_raw_parts(p as *const u32, n) }
            };
            let what = || format!("output `{name}` {:?} {}", buf.shape, buf.dtype);
            let data = match buf.dtype {
                DType::I32 => Data::I32(alloc::collect(n, raw.iter().map(|&x| x as i32), what)?),
                DType::Bool => Data::Bool(alloc::collect(n, raw.iter().map(|&x| x != 0), what)?),
                _ => match out.get_mut(name) {
                    Some(Tensor {
                        shape,
                        data: Data::F32(v),
                    }) if *shape == buf.shape => {
                        copy_f32(raw, v);
                        continue;
                    }
                    _ => {
                        let mut v = alloc::checked_vec(n, 0f32, what)?;
                        copy_f32(raw, &mut v);
                        Data::F32(v)
                    }
                },
            };
            out.insert(
                name.clone(),
                Tensor {
                    shape: buf.shape.clone(),
                    data,
                },
            );
        }
        drop(converted);
        if profile {
            eprintln!(
                "profile: outputs copied in {:.2} ms",
                t_out.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(())
    }
}

/// 4-byte storage as f32 values; large buffers are copied on every thread (a training step
/// returns every parameter and optimiser state: hundreds of MB).
fn copy_f32(raw: &[u32], out: &mut [f32]) {
    const CHUNK: usize = 1 << 18;
    if raw.len() < 2 * CHUNK {
        for (o, &x) in out.iter_mut().zip(raw) {
            *o = f32::from_bits(x);
        }
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(raw.par_chunks(CHUNK))
            .for_each(|(o, r)| {
                for (a, &x) in o.iter_mut().zip(r) {
                    *a = f32::from_bits(x);
                }
            });
    }
}

/// Sizes of the symbolic dims, sorted by name.
type DimsKey = Vec<(String, i64)>;

/// A compiled model bound to its parameters: plans are compiled per set of dims on first use
/// and kept.
pub struct CpuModel {
    pub compiled: vlmc::passes::Compiled,
    pub params: BTreeMap<String, Tensor>,
    pub opts: CpuOptions,
    /// The lowering's choices (by default the CPU's: transposed weights copied row-major).
    pub lower: vlmc::kernel::LowerOptions,
    cache: Mutex<HashMap<DimsKey, Arc<CpuPlan>>>,
}

impl CpuModel {
    /// A model from the optimisation pipeline's result and its parameters.
    pub fn new(
        compiled: vlmc::passes::Compiled,
        params: BTreeMap<String, Tensor>,
        opts: CpuOptions,
    ) -> CpuModel {
        CpuModel {
            compiled,
            params,
            opts,
            lower: vlmc::kernel::LowerOptions::cpu(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The plan for the sizes of these inputs (compiled now if new).
    pub fn plan_for(&self, inputs: &BTreeMap<String, Tensor>) -> Result<Arc<CpuPlan>, RunError> {
        self.plan_with(inputs, &self.params)
    }

    /// [`CpuModel::plan_for`] with parameters held elsewhere (several graphs of one model, such
    /// as generation's prefill and step, share one copy of the weights).
    pub fn plan_with(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Arc<CpuPlan>, RunError> {
        let g = &self.compiled.graph;
        let dims = crate::interp::bind_dims(g, inputs)?;
        let mut key: DimsKey = dims.iter().map(|(k, v)| (k.clone(), *v)).collect();
        key.sort();
        if let Some(p) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(p);
        }
        let fusion = &self.compiled.fusion;
        let t_lower = std::time::Instant::now();
        let mem = vlmc::passes::memory::plan(g, fusion, &dims);
        check_plan_memory(g, &mem, &dims)?;
        let memory_ms = t_lower.elapsed().as_secs_f64() * 1e3;
        let plan =
            vlmc::kernel::lower_with(g, fusion, &mem, &dims, self.lower).map_err(|e| RunError {
                message: format!("lowering: {e}"),
            })?;
        // VLMC_DUMP_PLAN=DIR: the kernel IR of every plan made, one file per graph and size.
        if let Some(dir) = std::env::var_os("VLMC_DUMP_PLAN") {
            let name = format!("{}-{}.kernels", g.name, dims_text(&key));
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(std::path::Path::new(&dir).join(name), plan.to_string());
        }
        let lowered = t_lower.elapsed();
        let t_new = std::time::Instant::now();
        let p = Arc::new(CpuPlan::new(plan, g, params, &self.opts)?);
        if std::env::var_os("VLMC_PROFILE").is_some() {
            eprintln!(
                "profile: plan {}: memory plan {memory_ms:.0} ms, lowering {:.0} ms, code and \
                 load-time values {:.0} ms",
                dims_text(&key),
                lowered.as_secs_f64() * 1e3 - memory_ms,
                t_new.elapsed().as_secs_f64() * 1e3
            );
        }
        if let Ok(mut c) = self.cache.lock() {
            c.insert(key, p.clone());
        }
        Ok(p)
    }

    /// How many plans (sizes) have been compiled.
    pub fn plans(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    /// Runs the model's forward on named inputs.
    pub fn run(
        &self,
        inputs: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        self.plan_for(inputs)?.run(inputs, &self.params)
    }
}

/// The number of threads kernels and matmuls are split across (the rayon pool's).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// The GEMM crate's speed on an `n`×`n`×`n` f32 product on every thread: the median GFLOP/s
/// of `reps` products (the ceiling that whole-model runs are compared with).
pub fn gemm_gflops(n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; n * n];
    let mut times = Vec::new();
    for r in 0..reps + 1 {
        let t = std::time::Instant::now();
        // SAFETY: three n×n row-major matrices.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads()),
            )
        };
        if r > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let t = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    2.0 * (n as f64).powi(3) / t / 1e9
}
