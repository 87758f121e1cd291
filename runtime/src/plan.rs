//! Executing a kernel [`Plan`] by evaluating its kernel IR directly: the reference for what
//! the code generators must compute, and a check of the lowering against the interpreter.
//! Values are held as f64 and rounded to their dtype after every operation, as the
//! interpreter does.

use crate::alloc;
use crate::interp::RunError;
use crate::tensor::{Data, Tensor};
use std::collections::{BTreeMap, HashMap};
use vlmc::ir::{BinaryOp, DType, Graph, NodeId, ReduceOp, UnaryOp};
use vlmc::kernel::{BufferKind, Idx, MatMul, Plan, ScatterAdd, Step, Stmt, Val};

fn fail<T>(message: impl Into<String>) -> Result<T, RunError> {
    Err(RunError {
        message: message.into(),
    })
}

/// Values computed once at load time: every `LoadTime` buffer, from the graph, with the
/// interpreter.
pub fn load_time_values(
    plan: &Plan,
    graph: &Graph,
    params: &BTreeMap<String, Tensor>,
) -> Result<HashMap<usize, Tensor>, RunError> {
    let wanted: Vec<NodeId> = plan
        .buffers
        .iter()
        .filter_map(|b| match b.kind {
            BufferKind::LoadTime(i) => Some(NodeId::new(i)),
            _ => None,
        })
        .collect();
    // Transposed weights (the CPU's row-major copies of `Wᵀ`) directly; the rest through the
    // interpreter.
    let mut out = HashMap::new();
    let mut rest = Vec::new();
    for id in wanted {
        match transposed_param(graph, id, params) {
            Some(t) => {
                out.insert(id.index(), t);
            }
            None => rest.push(id),
        }
    }
    let values = crate::interp::run_nodes(graph, &BTreeMap::new(), params, &rest)?;
    out.extend(values.into_iter().map(|(id, t)| (id.index(), t)));
    Ok(out)
}

/// `permute(W, [.., r-1, r-2])` of an f32 parameter (a batch of matrix transposes), computed
/// directly: the interpreter's general permute takes seconds on a model's weights.
fn transposed_param(
    graph: &Graph,
    id: NodeId,
    params: &BTreeMap<String, Tensor>,
) -> Option<Tensor> {
    let vlmc::ir::Op::Permute { perm } = &graph.node(id).op else {
        return None;
    };
    let src = graph.operands(id)[0];
    let vlmc::ir::Op::Param { path, .. } = &graph.node(src).op else {
        return None;
    };
    let t = params.get(path.as_str())?;
    let r = perm.len();
    let swaps_last = r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p);
    if !swaps_last || t.shape.len() != r {
        return None;
    }
    transpose_last_two(t)
}

/// An f32 tensor of rank ≥ 2 with its last two axes swapped (blocks of 32 × 32, the output's
/// rows split across the rayon pool); `None` for other tensors or when the copy does not fit.
pub fn transpose_last_two(t: &Tensor) -> Option<Tensor> {
    use rayon::prelude::*;
    let r = t.shape.len();
    let Data::F32(v) = &t.data else {
        return None;
    };
    if r < 2 || v.is_empty() {
        return None;
    }
    let (rows, cols) = (t.shape[r - 2], t.shape[r - 1]);
    // A copy of a parameter the user sized: through `alloc`, or the caller's fallback (which
    // reports the memory it lacks) when it does not fit.
    let mut out = alloc::checked_vec(v.len(), 0f32, String::new).ok()?;
    const B: usize = 32;
    for (src, dst) in v.chunks(rows * cols).zip(out.chunks_mut(rows * cols)) {
        // output rows j0..j0 + B (input columns) per task
        dst.par_chunks_mut(B * rows)
            .enumerate()
            .for_each(|(jb, d)| {
                let j0 = jb * B;
                let jn = (j0 + B).min(cols);
                for i0 in (0..rows).step_by(B) {
                    for j in j0..jn {
                        for i in i0..(i0 + B).min(rows) {
                            d[(j - j0) * rows + i] = src[i * cols + j];
                        }
                    }
                }
            });
    }
    let mut shape = t.shape.clone();
    shape.swap(r - 2, r - 1);
    Some(Tensor::f32(shape, out))
}

fn round(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => f64::from(v as f32),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::I32 => f64::from(v as i64 as i32),
        DType::Bool => f64::from(u8::from(v != 0.0)),
        DType::NF4 | DType::F64 => v,
    }
}

struct Exec<'p> {
    plan: &'p Plan,
    /// Private storage of inputs, parameters, load-time values and scratch buffers.
    mem: Vec<Vec<f64>>,
    /// The activation arena shared by every `Temp` buffer, at its planned offset: so a wrong
    /// memory plan (two live values overlapping) shows up as a wrong result.
    arena: Vec<f64>,
}

impl Exec<'_> {
    fn idx(&self, i: &Idx, vars: &[i64]) -> Result<i64, RunError> {
        Ok(match i {
            Idx::Var(v) => vars[*v],
            Idx::Const(c) => *c,
            Idx::Add(a, b) => self.idx(a, vars)? + self.idx(b, vars)?,
            Idx::Mul(a, c) => self.idx(a, vars)? * c,
            Idx::Div(a, c) => self.idx(a, vars)?.div_euclid(*c),
            Idx::Rem(a, c) => self.idx(a, vars)?.rem_euclid(*c),
            Idx::Clamp(a, lo, hi) => self.idx(a, vars)?.clamp(*lo, *hi),
            Idx::Load(b, at) => {
                let k = self.idx(at, vars)?;
                self.load(*b, k)? as i64
            }
        })
    }

    fn load(&self, b: usize, k: i64) -> Result<f64, RunError> {
        let len = self.plan.buffers[b].len();
        if k < 0 || k as usize >= len {
            return fail(format!(
                "index {k} is out of range for buffer b{b} of {len} elements"
            ));
        }
        Ok(match self.plan.buffers[b].kind {
            BufferKind::Temp { offset } => self.arena[offset + k as usize],
            _ => self.mem[b][k as usize],
        })
    }

    fn store(&mut self, b: usize, k: i64, v: f64) -> Result<(), RunError> {
        let len = self.plan.buffers[b].len();
        if k < 0 || k as usize >= len {
            return fail(format!(
                "store at {k} is out of range for buffer b{b} of {len} elements"
            ));
        }
        match self.plan.buffers[b].kind {
            BufferKind::Temp { offset } => self.arena[offset + k as usize] = v,
            _ => self.mem[b][k as usize] = v,
        }
        Ok(())
    }

    /// The dtype of a value (accumulators: their reduction's).
    fn dtype(&self, v: &Val, accs: &[(f64, DType)]) -> DType {
        match v {
            Val::Load(b, _) => self.plan.buffers[*b].dtype,
            Val::Const(_, d) => *d,
            Val::Index(_) => DType::I32,
            Val::InRange(..) => DType::Bool,
            Val::Unary(_, a) => self.dtype(a, accs),
            Val::Binary(op, a, _) => {
                if op.is_comparison() {
                    DType::Bool
                } else {
                    self.dtype(a, accs)
                }
            }
            Val::Select(_, a, _) => self.dtype(a, accs),
            Val::Cast { to, .. } => *to,
            Val::Acc(k) => accs[*k].1,
        }
    }

    fn val(&self, v: &Val, vars: &[i64], accs: &[(f64, DType)]) -> Result<f64, RunError> {
        let d = self.dtype(v, accs);
        Ok(match v {
            Val::Load(b, at) => self.load(*b, self.idx(at, vars)?)?,
            Val::Const(c, d) => round(*d, *c),
            Val::Index(i) => self.idx(i, vars)? as f64,
            Val::InRange(i, lo, hi) => {
                let x = self.idx(i, vars)?;
                f64::from(u8::from(*lo <= x && x < *hi))
            }
            Val::Unary(op, a) => {
                let x = self.val(a, vars, accs)?;
                let r = match op {
                    UnaryOp::Neg => -x,
                    UnaryOp::Abs => x.abs(),
                    UnaryOp::Exp => x.exp(),
                    UnaryOp::Log => x.ln(),
                    UnaryOp::Sqrt => x.sqrt(),
                    UnaryOp::Rsqrt => 1.0 / x.sqrt(),
                    UnaryOp::Recip => 1.0 / x,
                    UnaryOp::Tanh => x.tanh(),
                    UnaryOp::Erf => libm::erf(x),
                    UnaryOp::Sin => x.sin(),
                    UnaryOp::Cos => x.cos(),
                    UnaryOp::Floor => x.floor(),
                    UnaryOp::Not => f64::from(u8::from(x == 0.0)),
                };
                round(d, r)
            }
            Val::Binary(op, a, b) => {
                let (x, y) = (self.val(a, vars, accs)?, self.val(b, vars, accs)?);
                let int = self.dtype(a, accs) == DType::I32;
                let r = match op {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div if int => {
                        if y == 0.0 {
                            return fail("integer division by zero");
                        }
                        (x / y).floor()
                    }
                    BinaryOp::Div => x / y,
                    BinaryOp::Pow => x.powf(y),
                    BinaryOp::Max => {
                        if x.is_nan() || y.is_nan() {
                            f64::NAN
                        } else {
                            x.max(y)
                        }
                    }
                    BinaryOp::Min => {
                        if x.is_nan() || y.is_nan() {
                            f64::NAN
                        } else {
                            x.min(y)
                        }
                    }
                    BinaryOp::Mod => {
                        if int && y == 0.0 {
                            return fail("integer division by zero");
                        }
                        x - y * (x / y).floor()
                    }
                    BinaryOp::Eq => f64::from(u8::from(x == y)),
                    BinaryOp::Ne => f64::from(u8::from(x != y)),
                    BinaryOp::Lt => f64::from(u8::from(x < y)),
                    BinaryOp::Le => f64::from(u8::from(x <= y)),
                    BinaryOp::Gt => f64::from(u8::from(x > y)),
                    BinaryOp::Ge => f64::from(u8::from(x >= y)),
                    BinaryOp::And => f64::from(u8::from(x != 0.0 && y != 0.0)),
                    BinaryOp::Or => f64::from(u8::from(x != 0.0 || y != 0.0)),
                };
                round(d, r)
            }
            Val::Select(c, a, b) => {
                if self.val(c, vars, accs)? != 0.0 {
                    self.val(a, vars, accs)?
                } else {
                    self.val(b, vars, accs)?
                }
            }
            Val::Cast { to, value, .. } => round(*to, self.val(value, vars, accs)?),
            Val::Acc(k) => accs[*k].0,
        })
    }

    fn stmts(
        &mut self,
        body: &[Stmt],
        vars: &mut Vec<i64>,
        r: usize,
        accs: &mut Vec<(f64, DType)>,
    ) -> Result<(), RunError> {
        for s in body {
            match s {
                Stmt::Store { buf, at, value } => {
                    let v = self.val(value, vars, accs)?;
                    let k = self.idx(at, vars)?;
                    let d = self.plan.buffers[*buf].dtype;
                    self.store(*buf, k, round(d, v))?;
                }
                Stmt::Reduce {
                    acc,
                    op,
                    len,
                    value,
                    dtype,
                } => {
                    let mut a = match op {
                        ReduceOp::Sum => 0.0,
                        ReduceOp::Max => f64::NEG_INFINITY,
                    };
                    for i in 0..*len {
                        vars[r] = i as i64;
                        let x = self.val(value, vars, accs)?;
                        a = match op {
                            ReduceOp::Sum => a + x,
                            ReduceOp::Max => {
                                if a.is_nan() || x.is_nan() {
                                    f64::NAN
                                } else {
                                    a.max(x)
                                }
                            }
                        };
                    }
                    if accs.len() <= *acc {
                        accs.resize(*acc + 1, (0.0, *dtype));
                    }
                    accs[*acc] = (round(*dtype, a), *dtype);
                }
                Stmt::Inner { len, body } => {
                    for i in 0..*len {
                        vars[r] = i as i64;
                        self.stmts(body, vars, r, accs)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn scatter_add(&mut self, s: &ScatterAdd) -> Result<(), RunError> {
        let mut out = alloc::checked_vec(self.plan.buffers[s.out].len(), 0f64, || {
            format!("the scatter-add into b{}", s.out)
        })?;
        for q in 0..s.k {
            let j = self.load(s.idx.buf, (s.idx.offset + q * s.idx.col) as i64)?;
            if j < 0.0 || j >= s.n as f64 {
                continue;
            }
            for p in 0..s.outer {
                for c in 0..s.inner {
                    let at = s.src.offset + p * s.src.batch + q * s.src.row + c * s.src.col;
                    out[(p * s.n + j as usize) * s.inner + c] += self.load(s.src.buf, at as i64)?;
                }
            }
        }
        let d = self.plan.buffers[s.out].dtype;
        for (i, v) in out.into_iter().enumerate() {
            self.store(s.out, i as i64, round(d, v))?;
        }
        Ok(())
    }

    fn matmul(&mut self, m: &MatMul) -> Result<(), RunError> {
        let mut out = alloc::checked_vec(self.plan.buffers[m.out].len(), 0f64, || {
            format!("the matmul into b{}", m.out)
        })?;
        for bi in 0..m.batch {
            for i in 0..m.m {
                for j in 0..m.n {
                    let mut acc = 0f64;
                    for p in 0..m.k {
                        let x = self.load(
                            m.a.buf,
                            (m.a.offset + bi * m.a.batch + i * m.a.row + p * m.a.col) as i64,
                        )?;
                        let y = self.load(
                            m.b.buf,
                            (m.b.offset + bi * m.b.batch + p * m.b.row + j * m.b.col) as i64,
                        )?;
                        acc += x * y;
                    }
                    out[(bi * m.m + i) * m.n + j] = acc;
                }
            }
        }
        let d = self.plan.buffers[m.out].dtype;
        for (k, v) in out.into_iter().enumerate() {
            self.store(m.out, k as i64, round(d, v))?;
        }
        Ok(())
    }
}

/// Runs a plan: inputs and parameters by name, load-time values from [`load_time_values`].
pub fn execute(
    plan: &Plan,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
    load_time: &HashMap<usize, Tensor>,
) -> Result<BTreeMap<String, Tensor>, RunError> {
    // Every buffer and the arena are held as f64: check the whole before allocating any.
    let slots = plan
        .buffers
        .iter()
        .filter(|b| !matches!(b.kind, BufferKind::Temp { .. }))
        .try_fold(plan.arena as u128, |acc, b| {
            acc.checked_add(alloc::numel(&b.shape)? as u128)
        });
    alloc::ensure(slots.and_then(|n| n.checked_mul(8)), || {
        format!(
            "executing the kernel plan ({} buffers and an arena of {} elements, in f64)",
            plan.buffers.len(),
            plan.arena
        )
    })?;
    let mut mem = Vec::with_capacity(plan.buffers.len());
    for b in &plan.buffers {
        let t = match &b.kind {
            BufferKind::Input(n) => Some(inputs.get(n).ok_or(RunError {
                message: format!("missing input `{n}`"),
            })?),
            BufferKind::Param(p) => Some(params.get(p).ok_or(RunError {
                message: format!("missing parameter `{p}`"),
            })?),
            BufferKind::LoadTime(i) => Some(load_time.get(i).ok_or(RunError {
                message: format!("missing load-time value {i}"),
            })?),
            BufferKind::Temp { .. } => {
                mem.push(Vec::new());
                continue;
            }
            BufferKind::Scratch => None,
        };
        mem.push(match t {
            Some(t) => {
                if t.numel() != b.len() {
                    return fail(format!(
                        "{:?} has {} elements, the plan expects {:?}",
                        b.kind,
                        t.numel(),
                        b.shape
                    ));
                }
                t.try_to_f64()?
            }
            None => alloc::checked_vec(b.len(), 0.0, || format!("scratch buffer b{}", mem.len()))?,
        });
    }
    let mut ex = Exec {
        plan,
        mem,
        arena: alloc::checked_vec(plan.arena, 0.0, || "the activation arena".to_string())?,
    };
    for k in &plan.kernels {
        for step in &k.steps {
            match step {
                Step::MatMul(m) => ex.matmul(m)?,
                Step::ScatterAdd(s) => ex.scatter_add(s)?,
                Step::Loop(l) => {
                    let n: usize = l.shape.iter().product();
                    let r = l.inner_var.unwrap_or(l.shape.len());
                    let mut vars = vec![0i64; l.shape.len() + 1];
                    for flat in 0..n {
                        let mut rest = flat;
                        for d in (0..l.shape.len()).rev() {
                            vars[d] = (rest % l.shape[d]) as i64;
                            rest /= l.shape[d];
                        }
                        let mut accs = Vec::new();
                        ex.stmts(&l.body, &mut vars, r, &mut accs)?;
                    }
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for (name, b) in &plan.outputs {
        let buf = &plan.buffers[*b];
        let n = buf.len();
        let what = || format!("output `{name}` {:?} {}", buf.shape, buf.dtype);
        let mut v = alloc::with_capacity(n, what)?;
        for k in 0..n {
            v.push(ex.load(*b, k as i64)?);
        }
        let data = match buf.dtype {
            DType::I32 => Data::I32(alloc::collect(n, v.iter().map(|&x| x as i32), what)?),
            DType::Bool => Data::Bool(alloc::collect(n, v.iter().map(|&x| x != 0.0), what)?),
            DType::F64 => Data::F64(v),
            _ => Data::F32(alloc::collect(n, v.iter().map(|&x| x as f32), what)?),
        };
        out.insert(
            name.clone(),
            Tensor {
                shape: buf.shape.clone(),
                data,
            },
        );
    }
    Ok(out)
}
