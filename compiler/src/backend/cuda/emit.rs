//! One CUDA C `__global__` function per loop nest.
//!
//! A pointwise nest (stores only) is a grid-stride loop over its flat index, split into the loop
//! variables by division by constants. A row nest (with `Reduce` statements over an inner axis)
//! gives each row to one block: the threads stride over the inner axis, every reduction ends in
//! a block-level reduction (warp shuffles, then shared memory) whose result all threads see;
//! row-level stores are done by thread 0, inner loops by all threads.

use super::bounds::{has_load, inner_len, nest_ranges, range, Range};
use super::expr::{self, ctype, Body};
use super::launch::KernelLaunch;
use super::CudaError;
use crate::ir::DType;
use crate::kernel::{Idx, LoopNest, Plan, Stmt, Val};
use std::collections::BTreeSet;

/// Threads per block of pointwise kernels.
const POINTWISE_BLOCK: usize = 256;
/// At most this many threads per block for row kernels.
const ROW_BLOCK_MAX: usize = 256;
/// At most this many blocks: larger problems loop (grid-stride).
const GRID_MAX: usize = 1 << 20;

/// A generated function and how to launch it.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    /// The CUDA C source of the function (without the prelude).
    pub source: String,
    pub launch: KernelLaunch,
}

/// The buffers a body reads and the ones it writes.
#[derive(Default)]
struct Uses {
    read: BTreeSet<usize>,
    written: BTreeSet<usize>,
}

impl Uses {
    fn stmts(&mut self, body: &[Stmt]) {
        for s in body {
            match s {
                Stmt::Store { buf, at, value } => {
                    self.written.insert(*buf);
                    self.idx(at);
                    self.val(value);
                }
                Stmt::Reduce { value, .. } => self.val(value),
                Stmt::Inner { body, .. } => self.stmts(body),
            }
        }
    }
    fn val(&mut self, v: &Val) {
        match v {
            Val::Load(b, i) => {
                self.read.insert(*b);
                self.idx(i);
            }
            Val::Index(i) | Val::InRange(i, _, _) => self.idx(i),
            Val::Const(..) | Val::Acc(_) => {}
            Val::Unary(_, a) | Val::Cast { value: a, .. } => self.val(a),
            Val::Binary(_, a, b) => {
                self.val(a);
                self.val(b);
            }
            Val::Select(c, a, b) => {
                self.val(c);
                self.val(a);
                self.val(b);
            }
        }
    }
    fn idx(&mut self, i: &Idx) {
        match i {
            Idx::Load(b, at) => {
                self.read.insert(*b);
                self.idx(at);
            }
            Idx::Var(_) | Idx::Const(_) => {}
            Idx::Add(a, b) => {
                self.idx(a);
                self.idx(b);
            }
            Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) | Idx::Clamp(a, _, _) => self.idx(a),
        }
    }
}

/// Whether every index of the nest (and its flat counter) fits `int` arithmetic.
fn fits_int(l: &LoopNest, vars: &[Range], total: usize) -> bool {
    const LIMIT: i128 = (i32::MAX as i128) / 2;
    fn idx_ok(i: &Idx, vars: &[Range]) -> bool {
        if has_load(i) {
            // Data-dependent: clamped to its buffer, which fits (checked by the caller).
            return true;
        }
        let here = range(i, vars).is_some_and(|(lo, hi)| lo > -LIMIT && hi < LIMIT);
        here && match i {
            Idx::Var(_) | Idx::Const(_) | Idx::Load(..) => true,
            Idx::Add(a, b) => idx_ok(a, vars) && idx_ok(b, vars),
            Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) | Idx::Clamp(a, _, _) => {
                idx_ok(a, vars)
            }
        }
    }
    fn val_ok(v: &Val, vars: &[Range]) -> bool {
        match v {
            Val::Load(_, i) | Val::Index(i) | Val::InRange(i, _, _) => idx_ok(i, vars),
            Val::Const(..) | Val::Acc(_) => true,
            Val::Unary(_, a) | Val::Cast { value: a, .. } => val_ok(a, vars),
            Val::Binary(_, a, b) => val_ok(a, vars) && val_ok(b, vars),
            Val::Select(c, a, b) => val_ok(c, vars) && val_ok(a, vars) && val_ok(b, vars),
        }
    }
    fn stmts_ok(body: &[Stmt], vars: &[Range]) -> bool {
        body.iter().all(|s| match s {
            Stmt::Store { at, value, .. } => idx_ok(at, vars) && val_ok(value, vars),
            Stmt::Reduce { value, .. } => val_ok(value, vars),
            Stmt::Inner { body, .. } => stmts_ok(body, vars),
        })
    }
    (total as i128) < LIMIT && stmts_ok(&l.body, vars)
}

/// The parameter list: read-only buffers as `const T* __restrict__`, written ones as `T*`.
fn params(plan: &Plan, uses: &Uses) -> Result<(Vec<usize>, String), CudaError> {
    let all: BTreeSet<usize> = uses.read.union(&uses.written).copied().collect();
    let mut text = Vec::new();
    for &b in &all {
        let buf = plan
            .buffers
            .get(b)
            .ok_or_else(|| CudaError::new(format!("no buffer b{b}")))?;
        check_dtype(buf.dtype, b)?;
        let ty = ctype(buf.dtype);
        if uses.written.contains(&b) {
            text.push(format!("{ty}* __restrict__ b{b}"));
        } else {
            text.push(format!("const {ty}* __restrict__ b{b}"));
        }
    }
    Ok((all.into_iter().collect(), text.join(", ")))
}

/// Buffers the CUDA backend can hold in 4-byte slots.
pub fn check_dtype(d: DType, b: usize) -> Result<(), CudaError> {
    if d.bits() > 32 || d == DType::NF4 {
        return Err(CudaError::new(format!(
            "buffer b{b} is {d}: the CUDA backend stores f32, f16, bf16, i32 and bool"
        )));
    }
    Ok(())
}

/// Declares the loop variables `i0..` of `shape` from the flat counter `flat`.
fn split(body: &mut Body<'_>, shape: &[usize], flat: &str) {
    let ty = body.idx_ty;
    let mut stride: usize = shape.iter().product();
    for (d, &n) in shape.iter().enumerate() {
        stride /= n.max(1);
        let e = if n == 1 {
            "0".to_string()
        } else {
            let q = if stride == 1 {
                flat.to_string()
            } else {
                format!("{flat} / {stride}")
            };
            if d == 0 {
                q
            } else {
                format!("{q} % {n}")
            }
        };
        body.line(format!("const {ty} i{d} = {e};"));
    }
}

/// The function for loop nest `l`, named `name`; `None` when it has no work.
pub fn nest(plan: &Plan, name: &str, l: &LoopNest) -> Result<Option<Function>, CudaError> {
    let total: usize = l.shape.iter().product();
    if total == 0 {
        return Ok(None);
    }
    let mut uses = Uses::default();
    uses.stmts(&l.body);
    let (args, param_text) = params(plan, &uses)?;
    let vars = nest_ranges(l);
    let ty = if fits_int(l, &vars, total) {
        "int"
    } else {
        "long long"
    };
    let mut body = Body::new(plan, ty, vars, 0);
    let (block, grid, work) = match l.inner_var {
        None => {
            let block = POINTWISE_BLOCK.min(total.div_ceil(32) * 32);
            let grid = total.div_ceil(block).min(GRID_MAX);
            body.open(format!(
                "extern \"C\" __global__ void __launch_bounds__({block}) {name}({param_text})"
            ));
            let (start, step) = if ty == "int" {
                (
                    format!("(int)(blockIdx.x * {block}u + threadIdx.x)"),
                    format!("(int)(gridDim.x * {block}u)"),
                )
            } else {
                (
                    format!("(long long)blockIdx.x * {block} + threadIdx.x"),
                    format!("(long long)gridDim.x * {block}"),
                )
            };
            body.open(format!("for ({ty} t = {start}; t < {total}; t += {step})"));
            split(&mut body, &l.shape, "t");
            body.alias(&flat_index(&l.shape), "t");
            body.count(&l.body);
            for s in &l.body {
                match s {
                    Stmt::Store { buf, at, value } => store(&mut body, *buf, at, value)?,
                    _ => {
                        return Err(CudaError::new(format!(
                            "{name}: a reduction in a loop nest without an inner axis"
                        )))
                    }
                }
            }
            (block, grid, format!("pointwise over {total} elements"))
        }
        Some(r) => {
            let len = inner_len(&l.body);
            let block = len.next_power_of_two().clamp(32, ROW_BLOCK_MAX);
            let grid = total.min(GRID_MAX);
            body.open(format!(
                "extern \"C\" __global__ void __launch_bounds__({block}) {name}({param_text})"
            ));
            let (float_red, int_red) = reductions(&l.body);
            if float_red {
                body.line("__shared__ float vlmc_shf[33];");
            }
            if int_red {
                body.line("__shared__ int vlmc_shi[33];");
            }
            body.open(format!(
                "for ({ty} row = blockIdx.x; row < {total}; row += gridDim.x)"
            ));
            split(&mut body, &l.shape, "row");
            row_body(&mut body, &l.body, r, block, name)?;
            (
                block,
                grid,
                format!("{total} rows of {len}, one block per row"),
            )
        }
    };
    body.close();
    body.close();
    let source = body.finish().join("\n") + "\n";
    Ok(Some(Function {
        source,
        launch: KernelLaunch {
            function: name.to_string(),
            grid: [grid as u32, 1, 1],
            block: block as u32,
            args,
            work,
        },
    }))
}

/// The row-major flat index of the loop variables over `shape`, as the lowering writes it.
fn flat_index(shape: &[usize]) -> Idx {
    let mut acc: Option<Idx> = None;
    for (d, &n) in shape.iter().enumerate() {
        acc = Some(match acc {
            None => Idx::Var(d),
            Some(a) if n == 1 => Idx::Add(Box::new(a), Box::new(Idx::Var(d))),
            Some(a) => Idx::Add(
                Box::new(Idx::Mul(Box::new(a), n as i64)),
                Box::new(Idx::Var(d)),
            ),
        });
    }
    acc.unwrap_or(Idx::Const(0))
}

/// Whether the body has float and int reductions.
fn reductions(body: &[Stmt]) -> (bool, bool) {
    let mut f = false;
    let mut i = false;
    for s in body {
        if let Stmt::Reduce { dtype, .. } = s {
            match expr::class(*dtype) {
                expr::Class::Float => f = true,
                expr::Class::Int => i = true,
            }
        }
    }
    (f, i)
}

/// `b{buf}[at] = value`, converted to the buffer's dtype.
fn store(body: &mut Body<'_>, buf: usize, at: &Idx, value: &Val) -> Result<(), CudaError> {
    let from = body.dtype(value);
    let to = plan_dtype(body, buf)?;
    let v = body.val(value)?;
    let target = body.element(buf, at)?;
    body.line(format!("{target} = {};", expr::convert(v, from, to)));
    Ok(())
}

fn plan_dtype(body: &Body<'_>, buf: usize) -> Result<DType, CudaError> {
    body.buffer_dtype(buf)
        .ok_or_else(|| CudaError::new(format!("no buffer b{buf}")))
}

/// The statements of a row nest, inside the loop over rows.
fn row_body(
    body: &mut Body<'_>,
    stmts: &[Stmt],
    r: usize,
    block: usize,
    name: &str,
) -> Result<(), CudaError> {
    let ty = body.idx_ty;
    for s in stmts {
        match s {
            Stmt::Reduce {
                acc,
                op,
                len,
                value,
                dtype,
            } => {
                body.count(std::slice::from_ref(s));
                let cty = ctype(*dtype);
                let id = expr::identity(*op, *dtype);
                body.line(format!("{cty} acc{acc};"));
                body.open("");
                body.line(format!("{cty} a = {id};"));
                let saved = body.set_inner(r, *len);
                body.open(format!(
                    "for ({ty} i{r} = threadIdx.x; i{r} < {len}; i{r} += {block})"
                ));
                let from = body.dtype(value);
                let v = body.val(value)?;
                let v = expr::convert(v, from, *dtype);
                body.line(format!("a = {};", expr::combine(*op, *dtype, "a", &v)));
                body.close();
                body.restore_inner(r, saved);
                let sh = match expr::class(*dtype) {
                    expr::Class::Float => "vlmc_shf",
                    expr::Class::Int => "vlmc_shi",
                };
                let f = expr::functor(*op, *dtype);
                let red = format!("vlmc_block_reduce<{f}>(a, {id}, {sh})");
                body.line(format!("acc{acc} = {};", expr::round_acc(*dtype, red)));
                body.close();
                body.set_acc(*acc, *dtype);
            }
            Stmt::Store { buf, at, value } => {
                body.count(std::slice::from_ref(s));
                body.open("if (threadIdx.x == 0)");
                store(body, *buf, at, value)?;
                body.close();
            }
            Stmt::Inner { len, body: inner } => {
                body.count(inner);
                let saved = body.set_inner(r, *len);
                body.open(format!(
                    "for ({ty} i{r} = threadIdx.x; i{r} < {len}; i{r} += {block})"
                ));
                for s in inner {
                    match s {
                        Stmt::Store { buf, at, value } => store(body, *buf, at, value)?,
                        _ => {
                            return Err(CudaError::new(format!(
                                "{name}: only stores may sit inside an inner loop"
                            )))
                        }
                    }
                }
                body.close();
                body.restore_inner(r, saved);
            }
        }
    }
    Ok(())
}
