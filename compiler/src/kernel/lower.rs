//! Lowering: from a graph partitioned into fusion groups, at concrete sizes, to a [`Plan`].
//!
//! Inside a kernel every op becomes scalar math at an index; views become index arithmetic
//! (reshape: linearise and split; permute: reorder; expand: zero; slice: scale and shift;
//! pad and concat: a range test and a clamped load; gather: an index loaded from a buffer).
//! Values from other kernels, inputs, parameters and load-time values are loads from buffers.

use super::*;
use crate::ir::{Graph, NodeId, Op, OpKind};
use crate::passes::fusion::{Anchor, FusionPlan};
use crate::passes::memory::MemoryPlan;
use std::collections::HashMap;

/// Something the lowering cannot express (yet).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct LowerError {
    pub message: String,
}

fn lerr<T>(message: impl Into<String>) -> Result<T, LowerError> {
    Err(LowerError {
        message: message.into(),
    })
}

type R<T> = Result<T, LowerError>;

struct Lowering<'g> {
    g: &'g Graph,
    fusion: &'g FusionPlan,
    dims: &'g HashMap<String, i64>,
    buffers: Vec<Buffer>,
    buffer_of: HashMap<NodeId, usize>,
    /// Load-time views stored in their own layout (see [`weights_to_materialise`]).
    materialised: std::collections::HashSet<NodeId>,
    gathers: Vec<GatherBound>,
}

/// The right operands of matmuls that are permuted (and reshaped) parameters, such as the
/// transposed weight of `x · Wᵀ`: they are copied once at load time in row-major order. The
/// GEMM packs a row-major right operand much faster than the column-major view: on this
/// machine's AVX-512 kernels 1.5-3.4× on 32-row products and up to 1.2× on 1024-row ones
/// (`docs/performance.md`). It costs a second copy of those weights. Only views that keep
/// every element once (permutes and reshapes of one parameter) qualify.
fn weights_to_materialise(g: &Graph, fusion: &FusionPlan) -> std::collections::HashSet<NodeId> {
    let mut out = std::collections::HashSet::new();
    for grp in &fusion.groups {
        let Some(&m) = grp.nodes.first() else {
            continue;
        };
        if !matches!(g.node(m).op, Op::MatMul) {
            continue;
        }
        let b = g.operands(m)[1];
        let mut v = b;
        let mut permuted = false;
        let plain = loop {
            match &g.node(v).op {
                Op::Permute { .. } => permuted = true,
                Op::Reshape { .. } => {}
                Op::Param { .. } => break true,
                _ => break false,
            }
            v = g.operands(v)[0];
        };
        if plain && permuted && fusion.load_time.contains(&b) {
            out.insert(b);
        }
    }
    out
}

/// Choices of the lowering that depend on the backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct LowerOptions {
    /// Copy transposed weights into row-major load-time buffers ([`weights_to_materialise`]):
    /// for the CPU's GEMM; cuBLAS reads the transposed view as fast, so the GPU keeps one copy.
    pub row_major_weights: bool,
}

impl LowerOptions {
    /// What the CPU backend wants.
    pub fn cpu() -> LowerOptions {
        LowerOptions {
            row_major_weights: true,
        }
    }
}

/// Lowers a compiled graph at the sizes `dims` (every symbolic dim must be bound).
pub fn lower(
    g: &Graph,
    fusion: &FusionPlan,
    memory: &MemoryPlan,
    dims: &HashMap<String, i64>,
) -> R<Plan> {
    lower_with(g, fusion, memory, dims, LowerOptions::default())
}

/// [`lower`] with backend-specific choices.
pub fn lower_with(
    g: &Graph,
    fusion: &FusionPlan,
    memory: &MemoryPlan,
    dims: &HashMap<String, i64>,
    opts: LowerOptions,
) -> R<Plan> {
    let mut l = Lowering {
        g,
        fusion,
        dims,
        buffers: Vec::new(),
        buffer_of: HashMap::new(),
        materialised: match opts.row_major_weights {
            true => weights_to_materialise(g, fusion),
            false => Default::default(),
        },
        gathers: Vec::new(),
    };
    // Temporaries: every value a kernel writes for others, at its planned offset (the plan
    // counts 4-byte slots: every dtype is stored in one).
    let mut arena = 0;
    for grp in &fusion.groups {
        for &v in &grp.outputs {
            let (offset, _) = memory.slots.get(&v).copied().unwrap_or((0, 0));
            let shape = l.shape(v)?;
            let off = offset / crate::passes::memory::SLOT_BYTES;
            arena = arena.max(off + shape.iter().product::<usize>());
            l.add_buffer(v, BufferKind::Temp { offset: off }, shape);
        }
    }
    let mut kernels = Vec::new();
    for (gi, grp) in fusion.groups.iter().enumerate() {
        kernels.push(l.kernel(gi, grp)?);
    }
    let mut outputs = Vec::new();
    for (name, id) in &g.outputs {
        let b = l.leaf_buffer(*id)?.ok_or_else(|| LowerError {
            message: format!("output `{name}` is not materialised"),
        })?;
        outputs.push((name.clone(), b));
    }
    Ok(Plan {
        buffers: l.buffers,
        kernels,
        outputs,
        arena,
        gathers: l.gathers,
    })
}

/// Row-major linear index of a multi-index.
fn linearize(idx: &[Idx], shape: &[usize]) -> Idx {
    let mut acc: Option<Idx> = None;
    for (i, n) in idx.iter().zip(shape) {
        acc = Some(match acc {
            None => i.clone(),
            Some(a) => add(mul(a, *n as i64), i.clone()),
        });
    }
    acc.unwrap_or(Idx::Const(0))
}

/// The multi-index of a linear index.
fn delinearize(flat: &Idx, shape: &[usize]) -> Vec<Idx> {
    let mut out = Vec::with_capacity(shape.len());
    let mut stride: usize = shape.iter().product();
    for &n in shape {
        stride /= n.max(1);
        let q = if stride == 1 {
            flat.clone()
        } else {
            div(flat.clone(), stride as i64)
        };
        out.push(if out.is_empty() { q } else { rem(q, n as i64) });
    }
    out
}

fn add(a: Idx, b: Idx) -> Idx {
    match (&a, &b) {
        (Idx::Const(0), _) => b,
        (_, Idx::Const(0)) => a,
        (Idx::Const(x), Idx::Const(y)) => Idx::Const(x + y),
        _ => Idx::Add(Box::new(a), Box::new(b)),
    }
}

fn mul(a: Idx, c: i64) -> Idx {
    match a {
        _ if c == 1 => a,
        Idx::Const(x) => Idx::Const(x * c),
        _ if c == 0 => Idx::Const(0),
        _ => Idx::Mul(Box::new(a), c),
    }
}

/// `a / c`. A divisor of 0 comes from an empty axis, whose loops never run: any index does, and
/// `a / 1` is one that evaluates without a fault.
fn div(a: Idx, c: i64) -> Idx {
    let c = c.max(1);
    match a {
        _ if c == 1 => a,
        Idx::Const(x) => Idx::Const(x / c),
        _ => Idx::Div(Box::new(a), c),
    }
}

/// `a % c` (a divisor of 0 as in [`div`]).
fn rem(a: Idx, c: i64) -> Idx {
    let c = c.max(1);
    match a {
        _ if c == 1 => Idx::Const(0),
        Idx::Const(x) => Idx::Const(x % c),
        _ => Idx::Rem(Box::new(a), c),
    }
}

impl Lowering<'_> {
    fn shape(&self, id: NodeId) -> R<Vec<usize>> {
        let ty = &self.g.node(id).ty;
        self.dims_of(&ty.shape).map_err(|e| LowerError {
            message: format!("{} (of {ty})", e.message),
        })
    }

    /// The value of a size expression at the run's sizes.
    fn size_of(&self, d: &crate::ir::Dim) -> R<i64> {
        d.eval(&|v| self.dims.get(v).copied())
            .ok_or_else(|| LowerError {
                message: format!("dimension {d} has no size"),
            })
    }

    fn add_buffer(&mut self, id: NodeId, kind: BufferKind, shape: Vec<usize>) -> usize {
        let b = self.buffers.len();
        self.buffers.push(Buffer {
            kind,
            dtype: self.g.node(id).ty.dtype,
            shape,
        });
        self.buffer_of.insert(id, b);
        b
    }

    /// The buffer holding `id` when it is a leaf for kernels: an input, a parameter, a
    /// load-time value that is not a view or a constant, or a materialised group output.
    fn leaf_buffer(&mut self, id: NodeId) -> R<Option<usize>> {
        if let Some(&b) = self.buffer_of.get(&id) {
            return Ok(Some(b));
        }
        let node = self.g.node(id);
        let kind = match &node.op {
            Op::Input { name } => BufferKind::Input(name.clone()),
            Op::Param { path, .. } => BufferKind::Param(path.clone()),
            Op::Const { .. } | Op::Iota { .. } => return Ok(None),
            op if self.fusion.load_time.contains(&id)
                && (op.kind() != OpKind::View || self.materialised.contains(&id)) =>
            {
                BufferKind::LoadTime(id.index())
            }
            _ => return Ok(None),
        };
        let shape = self.shape(id)?;
        Ok(Some(self.add_buffer(id, kind, shape)))
    }

    /// The value of node `id` at multi-index `idx`, inside kernel `group`. The recursion is as
    /// deep as a kernel's tree (bounded by the fusion's `MAX_KERNEL_TREE`): on a short stack it
    /// moves to a segment of its own.
    fn val(
        &mut self,
        id: NodeId,
        idx: &[Idx],
        group: usize,
        accs: &HashMap<NodeId, usize>,
    ) -> R<Val> {
        stacker::maybe_grow(256 << 10, 16 << 20, || self.val_here(id, idx, group, accs))
    }

    fn val_here(
        &mut self,
        id: NodeId,
        idx: &[Idx],
        group: usize,
        accs: &HashMap<NodeId, usize>,
    ) -> R<Val> {
        if let Some(&k) = accs.get(&id) {
            return Ok(Val::Acc(k));
        }
        let in_group = self.fusion.group_of.get(&id) == Some(&group);
        // A matmul's product is always in a buffer: its epilogue reads it from there.
        if in_group && matches!(self.g.node(id).op, Op::MatMul) {
            if let Some(&b) = self.buffer_of.get(&id) {
                let shape = self.buffers[b].shape.clone();
                return Ok(Val::Load(b, linearize(idx, &shape)));
            }
        }
        if !in_group {
            if let Some(b) = self.leaf_buffer(id)? {
                let shape = self.buffers[b].shape.clone();
                return Ok(Val::Load(b, linearize(idx, &shape)));
            }
        }
        let node = self.g.node(id);
        let dtype = node.ty.dtype;
        let ops = self.g.operands(id);
        let out_shape = self.shape(id)?;
        Ok(match &node.op {
            Op::Const { value } => Val::Const(*value, dtype),
            Op::Iota { axis } => {
                let i = Val::Index(idx[*axis].clone());
                if dtype == DType::I32 {
                    i
                } else {
                    Val::Cast {
                        to: dtype,
                        from: DType::I32,
                        value: Box::new(i),
                    }
                }
            }
            Op::Unary(u) => Val::Unary(*u, Box::new(self.val(ops[0], idx, group, accs)?)),
            Op::Binary(b) => {
                let x = self.val(ops[0], idx, group, accs)?;
                let y = self.val(ops[1], idx, group, accs)?;
                Val::Binary(*b, Box::new(x), Box::new(y))
            }
            Op::Select => Val::Select(
                Box::new(self.val(ops[0], idx, group, accs)?),
                Box::new(self.val(ops[1], idx, group, accs)?),
                Box::new(self.val(ops[2], idx, group, accs)?),
            ),
            Op::Cast { dtype: to } => Val::Cast {
                to: *to,
                from: self.g.node(ops[0]).ty.dtype,
                value: Box::new(self.val(ops[0], idx, group, accs)?),
            },
            Op::StopGradient => self.val(ops[0], idx, group, accs)?,
            Op::Reshape { .. } => {
                let in_shape = self.shape(ops[0])?;
                let flat = linearize(idx, &out_shape);
                let src = delinearize(&flat, &in_shape);
                self.val(ops[0], &src, group, accs)?
            }
            Op::Permute { perm } => {
                let mut src = vec![Idx::Const(0); perm.len()];
                for (o, &p) in perm.iter().enumerate() {
                    src[p] = idx[o].clone();
                }
                self.val(ops[0], &src, group, accs)?
            }
            Op::Expand { .. } => {
                let in_shape = self.shape(ops[0])?;
                let src: Vec<Idx> = idx
                    .iter()
                    .zip(&in_shape)
                    .map(|(i, &n)| if n == 1 { Idx::Const(0) } else { i.clone() })
                    .collect();
                self.val(ops[0], &src, group, accs)?
            }
            Op::Slice {
                axis,
                start,
                end,
                step,
            } => {
                // With symbolic sizes (`x[:, T - 1]`) the bounds are only known now: a slice
                // outside its operand would read outside its buffer.
                let (s, e) = (self.size_of(start)?, self.size_of(end)?);
                let n = self.shape(ops[0])?[*axis] as i64;
                if s < 0 || s > e || e > n {
                    return lerr(format!(
                        "slice {start}..{end} = {s}..{e} is out of range for axis {axis} of size \
                         {n} (of {})",
                        self.g.node(ops[0]).ty
                    ));
                }
                let mut src = idx.to_vec();
                src[*axis] = add(mul(idx[*axis].clone(), *step), Idx::Const(s));
                self.val(ops[0], &src, group, accs)?
            }
            Op::Pad {
                axis,
                before,
                value,
                ..
            } => {
                let b = self.size_of(before)?;
                if b < 0 {
                    return lerr(format!("pad before {before} = {b} is negative"));
                }
                let len = self.shape(ops[0])?[*axis] as i64;
                // Padding around nothing is all padding (the operand is empty: no load).
                if len == 0 {
                    return Ok(Val::Const(*value, dtype));
                }
                let mut src = idx.to_vec();
                src[*axis] = Idx::Clamp(
                    Box::new(add(idx[*axis].clone(), Idx::Const(-b))),
                    0,
                    (len - 1).max(0),
                );
                let inner = self.val(ops[0], &src, group, accs)?;
                Val::Select(
                    Box::new(Val::InRange(idx[*axis].clone(), b, b + len)),
                    Box::new(inner),
                    Box::new(Val::Const(*value, dtype)),
                )
            }
            Op::Concat { axis } => {
                let mut parts = Vec::new();
                let mut off = 0i64;
                for &o in &ops {
                    let len = self.shape(o)?[*axis] as i64;
                    // An empty part is never selected, but its load would still be computed
                    // (both sides of a select are): it is left out.
                    if len == 0 {
                        continue;
                    }
                    let mut src = idx.to_vec();
                    src[*axis] = Idx::Clamp(
                        Box::new(add(idx[*axis].clone(), Idx::Const(-off))),
                        0,
                        (len - 1).max(0),
                    );
                    parts.push((off, off + len, self.val(o, &src, group, accs)?));
                    off += len;
                }
                // Every part empty: so is the result, and nothing reads this value.
                let Some((_, _, mut v)) = parts.pop() else {
                    return Ok(Val::Const(0.0, dtype));
                };
                while let Some((lo, hi, p)) = parts.pop() {
                    v = Val::Select(
                        Box::new(Val::InRange(idx[*axis].clone(), lo, hi)),
                        Box::new(p),
                        Box::new(v),
                    );
                }
                v
            }
            Op::Gather { axis } => {
                let idx_shape = self.shape(ops[1])?;
                let ir = idx_shape.len();
                let at =
                    match self.val(ops[1], &idx[*axis..*axis + ir], group, accs)? {
                        Val::Load(b, i) => {
                            let len = self.shape(ops[0])?[*axis] as i64;
                            if !self.gathers.iter().any(|g| g.index == b && g.len == len) {
                                let scope = match node.scope.is_empty() {
                                    true => String::new(),
                                    false => format!(" in `{}`", node.scope),
                                };
                                self.gathers.push(GatherBound {
                                    index: b,
                                    len,
                                    what: format!("gather ({}{scope})", node.ty),
                                });
                            }
                            Idx::Load(b, Box::new(i))
                        }
                        Val::Index(i) => i,
                        _ => return lerr(
                            "gather with a computed index tensor: materialise the indices first",
                        ),
                    };
                let mut src: Vec<Idx> = idx[..*axis].to_vec();
                src.push(at);
                src.extend(idx[*axis + ir..].iter().cloned());
                self.val(ops[0], &src, group, accs)?
            }
            Op::Input { .. } | Op::Param { .. } => {
                return lerr("internal: a leaf without a buffer")
            }
            Op::Random { .. } => {
                return lerr("random ops (dropout) are not supported by compiled kernels yet")
            }
            Op::Reduce { .. } | Op::MatMul | Op::ScatterAdd { .. } => {
                return lerr(format!(
                    "internal: `{}` read inside another kernel without a buffer",
                    node.op.name()
                ))
            }
        })
    }

    fn kernel(&mut self, gi: usize, grp: &crate::passes::fusion::Group) -> R<Kernel> {
        let name = format!(
            "k{gi}_{}",
            self.g
                .node(grp.nodes[0])
                .scope
                .replace('.', "_")
                .trim_matches('_')
        );
        let mut steps = Vec::new();
        match &grp.anchor {
            Anchor::Pointwise => steps.extend(self.pointwise_nests(&grp.outputs, gi)?),
            Anchor::Rows { rows, axis } => {
                let rows = self.dims_of(rows)?;
                let axis = *axis;
                let outer: Vec<usize> = rows
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != axis)
                    .map(|(_, &n)| n)
                    .collect();
                let r = outer.len();
                // Index in row space (axis = r) and in reduced space (axis = 0).
                let with_axis = |a: Idx| -> Vec<Idx> {
                    let mut v: Vec<Idx> = (0..outer.len()).map(Idx::Var).collect();
                    v.insert(axis, a);
                    v
                };
                let mut accs: HashMap<NodeId, usize> = HashMap::new();
                let mut body = Vec::new();
                for &n in &grp.nodes {
                    if let Op::Reduce { op, .. } = self.g.node(n).op {
                        let operand = self.g.operands(n)[0];
                        let value = self.val(operand, &with_axis(Idx::Var(r)), gi, &accs)?;
                        let k = accs.len();
                        body.push(Stmt::Reduce {
                            acc: k,
                            op,
                            len: rows[axis],
                            value,
                            dtype: self.g.node(n).ty.dtype,
                        });
                        accs.insert(n, k);
                    }
                    if grp.outputs.contains(&n) {
                        let shape = self.shape(n)?;
                        let buf = self.buffer_of[&n];
                        if shape == rows {
                            let idx = with_axis(Idx::Var(r));
                            let value = self.val(n, &idx, gi, &accs)?;
                            body.push(Stmt::Inner {
                                len: rows[axis],
                                body: vec![Stmt::Store {
                                    buf,
                                    at: linearize(&idx, &shape),
                                    value,
                                }],
                            });
                        } else {
                            let idx = with_axis(Idx::Const(0));
                            let value = self.val(n, &idx, gi, &accs)?;
                            body.push(Stmt::Store {
                                buf,
                                at: linearize(&idx, &shape),
                                value,
                            });
                        }
                    }
                }
                store_reduced_once(&mut body, &self.buffers);
                steps.push(Step::Loop(LoopNest {
                    shape: outer,
                    inner_var: Some(r),
                    body,
                }));
            }
            Anchor::Contraction => {
                let m = grp.nodes[0];
                let out_shape = self.shape(m)?;
                let ops = self.g.operands(m);
                let rank = out_shape.len();
                let (mm, n) = (out_shape[rank - 2], out_shape[rank - 1]);
                let k = self.shape(ops[0])?[rank - 1];
                let batch: usize = out_shape[..rank - 2].iter().product();
                let out = match self.buffer_of.get(&m) {
                    Some(&b) => b,
                    None => self.scratch(m, out_shape.clone()),
                };
                let mut pre = Vec::new();
                let a = self.strided(ops[0], gi, &mut pre)?;
                let b = self.strided(ops[1], gi, &mut pre)?;
                steps.extend(pre);
                steps.push(Step::MatMul(MatMul {
                    a,
                    b,
                    out,
                    batch,
                    m: mm,
                    n,
                    k,
                }));
                // The epilogue: the other outputs, reading the product from its buffer, one
                // loop nest per output shape.
                let outs: Vec<NodeId> = grp.outputs.iter().copied().filter(|&o| o != m).collect();
                steps.extend(self.pointwise_nests(&outs, gi)?);
            }
            Anchor::Scatter => steps.extend(self.scatter(grp.nodes[0], gi)?),
        }
        Ok(Kernel { name, steps })
    }

    /// The loop nests that store `outs` (values of kernel `gi`): one per distinct shape.
    fn pointwise_nests(&mut self, outs: &[NodeId], gi: usize) -> R<Vec<Step>> {
        let mut by_shape: Vec<(Vec<usize>, Vec<NodeId>)> = Vec::new();
        for &o in outs {
            let s = self.shape(o)?;
            match by_shape.iter_mut().find(|(sh, _)| *sh == s) {
                Some((_, v)) => v.push(o),
                None => by_shape.push((s, vec![o])),
            }
        }
        let mut steps = Vec::new();
        for (shape, outs) in by_shape {
            let idx: Vec<Idx> = (0..shape.len()).map(Idx::Var).collect();
            let mut body = Vec::new();
            for o in outs {
                let value = self.val(o, &idx, gi, &HashMap::new())?;
                let buf = self.buffer_of[&o];
                body.push(Stmt::Store {
                    buf,
                    at: linearize(&idx, &shape),
                    value,
                });
            }
            steps.push(Step::Loop(LoopNest {
                shape,
                inner_var: None,
                body,
            }));
        }
        Ok(steps)
    }

    /// A scatter-add: its operands as strided views (copied first when they are not), the
    /// output in its group buffer.
    fn scatter(&mut self, node: NodeId, gi: usize) -> R<Vec<Step>> {
        let Op::ScatterAdd { axis, .. } = self.g.node(node).op else {
            return lerr("internal: a scatter kernel without a scatter-add");
        };
        let ops = self.g.operands(node);
        let src_shape = self.shape(ops[0])?;
        let idx_shape = self.shape(ops[1])?;
        let ir = idx_shape.len();
        let outer: usize = src_shape[..axis].iter().product();
        let k: usize = idx_shape.iter().product();
        let inner: usize = src_shape[axis + ir..].iter().product();
        let n = self.shape(node)?[axis];
        let out = match self.buffer_of.get(&node) {
            Some(&b) => b,
            None => {
                let shape = self.shape(node)?;
                self.scratch(node, shape)
            }
        };
        let mut pre = Vec::new();
        // Source (p, k, s) -> its multi-index.
        let vars: Vec<Idx> = (0..3).map(Idx::Var).collect();
        let mut at = delinearize(&vars[0], &src_shape[..axis]);
        at.extend(delinearize(&vars[1], &idx_shape));
        at.extend(delinearize(&vars[2], &src_shape[axis + ir..]));
        let src = self.view3(ops[0], &at, [outer, k, inner], gi, &mut pre)?;
        let at = delinearize(&vars[2], &idx_shape);
        let idx = self.view3(ops[1], &at, [1, 1, k], gi, &mut pre)?;
        pre.push(Step::ScatterAdd(ScatterAdd {
            src,
            idx,
            out,
            outer,
            k,
            n,
            inner,
        }));
        Ok(pre)
    }

    /// Node `id` read at `at` (over three variables of extents `shape`) as a strided view, or
    /// a contiguous copy of it made by a loop added to `pre`.
    fn view3(
        &mut self,
        id: NodeId,
        at: &[Idx],
        shape: [usize; 3],
        gi: usize,
        pre: &mut Vec<Step>,
    ) -> R<Strided> {
        let v = self.val(id, at, gi, &HashMap::new())?;
        if let Val::Load(buf, i) = &v {
            if !contains_load(i) {
                if let Linear::Strided(s) = linear_strides(*buf, i, &shape) {
                    return Ok(s);
                }
            }
        }
        let vars: Vec<Idx> = (0..3).map(Idx::Var).collect();
        Ok(self.copy_operand(id, shape.to_vec(), vars, v, pre))
    }

    /// A scratch buffer of `id`'s dtype, private to the kernel.
    fn scratch(&mut self, id: NodeId, shape: Vec<usize>) -> usize {
        let b = self.buffers.len();
        self.buffers.push(Buffer {
            kind: BufferKind::Scratch,
            dtype: self.g.node(id).ty.dtype,
            shape,
        });
        self.buffer_of.insert(id, b);
        b
    }

    /// A shape's sizes at the run's sizes (a negative one is an error).
    fn dims_of(&self, shape: &crate::ir::Shape) -> R<Vec<usize>> {
        shape
            .0
            .iter()
            .map(|d| match self.size_of(d)? {
                v if v >= 0 => Ok(v as usize),
                v => lerr(format!("dimension {d} is negative ({v}) at these sizes")),
            })
            .collect()
    }

    /// A matmul operand as a strided view of a buffer; when its index is not affine in
    /// (batch, row, col), a copy loop materialises it first.
    fn strided(&mut self, id: NodeId, gi: usize, pre: &mut Vec<Step>) -> R<Strided> {
        let shape = self.shape(id)?;
        let rank = shape.len();
        let (rows, cols) = (shape[rank - 2], shape[rank - 1]);
        let batch_shape = shape[..rank - 2].to_vec();
        let batch: usize = batch_shape.iter().product();
        // The operand at symbolic (b..., i, j).
        let idx: Vec<Idx> = (0..rank).map(Idx::Var).collect();
        let v = self.val(id, &idx, gi, &HashMap::new())?;
        if let Val::Load(buf, at) = &v {
            if !contains_load(at) {
                match linear_strides(*buf, at, &shape) {
                    Linear::Strided(s) => return Ok(s),
                    Linear::NotStrided => return Ok(self.copy_operand(id, shape, idx, v, pre)),
                    Linear::Unknown => {}
                }
                let mut p = vec![0i64; rank];
                // The index at batch b (row-major over the batch dims), row i, column j.
                let mut f = |b: usize, i: i64, j: i64| -> i64 {
                    let mut rest = b;
                    for d in (0..rank - 2).rev() {
                        p[d] = (rest % batch_shape[d].max(1)) as i64;
                        rest /= batch_shape[d].max(1);
                    }
                    p[rank - 2] = i;
                    p[rank - 1] = j;
                    eval_idx(at, &p)
                };
                let base = f(0, 0, 0);
                let row = if rows > 1 { f(0, 1, 0) - base } else { 0 };
                let col = if cols > 1 { f(0, 0, 1) - base } else { 0 };
                let bstride = if batch > 1 { f(1, 0, 0) - base } else { 0 };
                // Affine in (b, i, j): checked at every point for operands up to 2^20
                // elements, else along every row and column edge and a lattice of interior
                // points (index maps of views are periodic in at most a few divisors).
                let exhaustive = batch * rows * cols <= 1 << 20;
                let (ri, rj): (Vec<i64>, Vec<i64>) = if exhaustive {
                    ((0..rows as i64).collect(), (0..cols as i64).collect())
                } else {
                    let pick = |n: usize| -> Vec<i64> {
                        let mut v: Vec<i64> = (0..n.min(64) as i64).collect();
                        v.extend((0..64).map(|k| (k * 7919 % n.max(1)) as i64));
                        v.push(n as i64 - 1);
                        v
                    };
                    (pick(rows), pick(cols))
                };
                let affine = (0..batch).all(|b| {
                    ri.iter().all(|&i| {
                        rj.iter()
                            .all(|&j| f(b, i, j) == base + b as i64 * bstride + i * row + j * col)
                    })
                });
                if affine && base >= 0 && row >= 0 && col >= 0 && bstride >= 0 {
                    return Ok(Strided {
                        buf: *buf,
                        offset: base as usize,
                        batch: bstride as usize,
                        row: row as usize,
                        col: col as usize,
                    });
                }
            }
        }
        Ok(self.copy_operand(id, shape, idx, v, pre))
    }

    /// Not a plain strided view: a loop copies the operand (`v` at `idx`) into a contiguous
    /// scratch buffer.
    fn copy_operand(
        &mut self,
        id: NodeId,
        shape: Vec<usize>,
        idx: Vec<Idx>,
        v: Val,
        pre: &mut Vec<Step>,
    ) -> Strided {
        let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let b = self.buffers.len();
        self.buffers.push(Buffer {
            kind: BufferKind::Scratch,
            dtype: self.g.node(id).ty.dtype,
            shape: shape.clone(),
        });
        pre.push(Step::Loop(LoopNest {
            shape: shape.clone(),
            inner_var: None,
            body: vec![Stmt::Store {
                buf: b,
                at: linearize(&idx, &shape),
                value: v,
            }],
        }));
        Strided {
            buf: b,
            offset: 0,
            batch: rows * cols,
            row: cols,
            col: 1,
        }
    }
}

/// Whether a value costs a transcendental function (worth computing once).
fn is_costly(v: &Val) -> bool {
    use crate::ir::UnaryOp as U;
    match v {
        Val::Unary(op, a) => {
            matches!(op, U::Exp | U::Log | U::Tanh | U::Erf | U::Sin | U::Cos) || is_costly(a)
        }
        Val::Binary(_, a, b) => is_costly(a) || is_costly(b),
        Val::Select(c, a, b) => is_costly(c) || is_costly(a) || is_costly(b),
        Val::Cast { value, .. } => is_costly(value),
        Val::Load(..) | Val::Const(..) | Val::Index(_) | Val::InRange(..) | Val::Acc(_) => false,
    }
}

/// Whether `v` is `part` or contains it.
fn contains_val(v: &Val, part: &Val) -> bool {
    v == part
        || match v {
            Val::Unary(_, a) | Val::Cast { value: a, .. } => contains_val(a, part),
            Val::Binary(_, a, b) => contains_val(a, part) || contains_val(b, part),
            Val::Select(c, a, b) => {
                contains_val(c, part) || contains_val(a, part) || contains_val(b, part)
            }
            _ => false,
        }
}

/// `v` with every occurrence of `part` replaced by `by`.
fn replace_val(v: &Val, part: &Val, by: &Val) -> Val {
    if v == part {
        return by.clone();
    }
    let r = |x: &Val| Box::new(replace_val(x, part, by));
    match v {
        Val::Unary(op, a) => Val::Unary(*op, r(a)),
        Val::Cast { to, from, value } => Val::Cast {
            to: *to,
            from: *from,
            value: r(value),
        },
        Val::Binary(op, a, b) => Val::Binary(*op, r(a), r(b)),
        Val::Select(c, a, b) => Val::Select(r(c), r(a), r(b)),
        other => other.clone(),
    }
}

/// Whether statements load from or store to buffer `buf`.
fn touches(stmts: &[Stmt], buf: usize) -> bool {
    fn in_val(v: &Val, buf: usize) -> bool {
        match v {
            Val::Load(b, _) => *b == buf,
            Val::Unary(_, a) | Val::Cast { value: a, .. } => in_val(a, buf),
            Val::Binary(_, a, b) => in_val(a, buf) || in_val(b, buf),
            Val::Select(c, a, b) => in_val(c, buf) || in_val(a, buf) || in_val(b, buf),
            _ => false,
        }
    }
    stmts.iter().any(|s| match s {
        Stmt::Store { buf: b, value, .. } => *b == buf || in_val(value, buf),
        Stmt::Reduce { value, .. } => in_val(value, buf),
        Stmt::Inner { body, .. } => touches(body, buf),
    })
}

/// Whether a statement stores into `buf`.
fn stores_to(stmts: &[Stmt], buf: usize) -> bool {
    stmts.iter().any(|s| match s {
        Stmt::Store { buf: b, .. } => *b == buf,
        Stmt::Reduce { .. } => false,
        Stmt::Inner { body, .. } => stores_to(body, buf),
    })
}

/// A row kernel whose reduction sums a costly value that a later store of the same row
/// recomputes (softmax: `sum(exp(x - max))`, then `exp(x - max) / sum`) computes it once: a
/// pass stores the value into the later store's buffer, the reduction reads it from there and
/// the store reads it back. Only for f32 values and buffers (no rounding on the way), and
/// when nothing else in the kernel touches that buffer.
fn store_reduced_once(body: &mut Vec<Stmt>, buffers: &[Buffer]) {
    let mut i = 0;
    while i < body.len() {
        let Stmt::Reduce {
            len, value, dtype, ..
        } = &body[i]
        else {
            i += 1;
            continue;
        };
        let (len, v) = (*len, value.clone());
        if *dtype != DType::F32 || !is_costly(&v) {
            i += 1;
            continue;
        }
        // An earlier pass of the row already stores the value (softmax's `exp`, kept for the
        // backward): the reduction and later stores read it back from there.
        let earlier = body[..i].iter().find_map(|s| match s {
            Stmt::Inner {
                len: l,
                body: inner,
            } if *l == len && inner.len() == 1 => match &inner[0] {
                Stmt::Store { buf, at, value }
                    if *value == v
                        && buffers[*buf].dtype == DType::F32
                        && !stores_to(&body[i..], *buf) =>
                {
                    Some(Val::Load(*buf, at.clone()))
                }
                _ => None,
            },
            _ => None,
        });
        if let Some(load) = earlier {
            for s in &mut body[i..] {
                match s {
                    Stmt::Reduce { value, .. } if contains_val(value, &v) => {
                        *value = replace_val(value, &v, &load)
                    }
                    Stmt::Inner {
                        len: l,
                        body: inner,
                    } if *l == len => {
                        for st in inner {
                            if let Stmt::Store { value, .. } = st {
                                *value = replace_val(value, &v, &load);
                            }
                        }
                    }
                    _ => {}
                }
            }
            i += 1;
            continue;
        }
        // The first later row store that recomputes the value.
        let found = body
            .iter()
            .enumerate()
            .skip(i + 1)
            .find_map(|(j, s)| match s {
                Stmt::Inner {
                    len: l,
                    body: inner,
                } if *l == len && inner.len() == 1 => match &inner[0] {
                    Stmt::Store { buf, at, value } if contains_val(value, &v) => {
                        Some((j, *buf, at.clone()))
                    }
                    _ => None,
                },
                _ => None,
            });
        let Some((j, buf, at)) = found else {
            i += 1;
            continue;
        };
        let others: Vec<Stmt> = body
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != j)
            .map(|(_, s)| s.clone())
            .collect();
        if buffers[buf].dtype != DType::F32 || touches(&others, buf) {
            i += 1;
            continue;
        }
        let load = Val::Load(buf, at.clone());
        if let Stmt::Inner { body: inner, .. } = &mut body[j] {
            if let Stmt::Store { value, .. } = &mut inner[0] {
                *value = replace_val(value, &v, &load);
            }
        }
        if let Stmt::Reduce { value, .. } = &mut body[i] {
            *value = load;
        }
        body.insert(
            i,
            Stmt::Inner {
                len,
                body: vec![Stmt::Store { buf, at, value: v }],
            },
        );
        i += 2;
    }
}

/// What the simplified index of a matmul operand shows.
#[derive(Debug, PartialEq)]
enum Linear {
    /// Affine in the loop variables with one stride per axis of (batch, row, column).
    Strided(Strided),
    /// Affine in the loop variables, but not a strided view (batch dims that do not flatten to
    /// one stride, or a negative stride): it must be copied.
    NotStrided,
    /// Not shown affine (division, remainder or clamp atoms remain): points must be checked.
    Unknown,
}

/// The strides of a matmul operand read at `at` (over its loop variables, `shape`). When the
/// simplified index is affine in the variables alone it is exactly
/// `base + Σ coefᵥ·v` at every point, so whether it is `base + b·batch + i·row + j·col`
/// (`b` row-major over the batch dims) is decided without evaluating any point.
fn linear_strides(buf: usize, at: &Idx, shape: &[usize]) -> Linear {
    let rank = shape.len();
    if rank < 2 || shape.contains(&0) {
        return Linear::Unknown;
    }
    let ranges: Vec<(i64, i64)> = shape.iter().map(|&n| (0, n as i64 - 1)).collect();
    let a = simplify::Affine::from_idx(at, &ranges);
    let mut coef = vec![0i64; rank];
    for (atom, k) in &a.terms {
        match atom {
            simplify::Atom::Var(v) if *v < rank => match coef[*v].checked_add(*k) {
                Some(c) => coef[*v] = c,
                None => return Linear::Unknown,
            },
            _ => return Linear::Unknown,
        }
    }
    // A dim of size one never moves the index; the batch dims must flatten to one stride.
    let mut batch: Option<i64> = None;
    let mut weight = 1i64;
    for d in (0..rank - 2).rev() {
        if shape[d] > 1 {
            let s = *batch.get_or_insert(coef[d] / weight);
            match s.checked_mul(weight) {
                Some(x) if x == coef[d] => {}
                Some(_) => return Linear::NotStrided,
                None => return Linear::Unknown,
            }
        }
        match weight.checked_mul(shape[d] as i64) {
            Some(w) => weight = w,
            None => return Linear::Unknown,
        }
    }
    let row = if shape[rank - 2] > 1 {
        coef[rank - 2]
    } else {
        0
    };
    let col = if shape[rank - 1] > 1 {
        coef[rank - 1]
    } else {
        0
    };
    let batch = batch.unwrap_or(0);
    if a.c < 0 || row < 0 || col < 0 || batch < 0 {
        return Linear::NotStrided;
    }
    Linear::Strided(Strided {
        buf,
        offset: a.c as usize,
        batch: batch as usize,
        row: row as usize,
        col: col as usize,
    })
}

fn contains_load(i: &Idx) -> bool {
    match i {
        Idx::Load(..) => true,
        Idx::Var(_) | Idx::Const(_) => false,
        Idx::Add(a, b) => contains_load(a) || contains_load(b),
        Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) | Idx::Clamp(a, _, _) => contains_load(a),
    }
}

/// Evaluates an index without loads at a point (one value per variable).
pub fn eval_idx(i: &Idx, vars: &[i64]) -> i64 {
    match i {
        Idx::Var(v) => vars.get(*v).copied().unwrap_or(0),
        Idx::Const(c) => *c,
        Idx::Add(a, b) => eval_idx(a, vars) + eval_idx(b, vars),
        Idx::Mul(a, c) => eval_idx(a, vars) * c,
        Idx::Div(a, c) => eval_idx(a, vars).div_euclid(*c),
        Idx::Rem(a, c) => eval_idx(a, vars).rem_euclid(*c),
        Idx::Clamp(a, lo, hi) => eval_idx(a, vars).clamp(*lo, *hi),
        Idx::Load(..) => 0,
    }
}

#[cfg(test)]
mod strided_tests {
    use super::*;

    /// Every point of `shape` against the strides (the definition `linear_strides` must meet).
    fn holds(at: &Idx, shape: &[usize], s: &Strided) -> bool {
        let rank = shape.len();
        let batch: usize = shape[..rank - 2].iter().product();
        (0..batch).all(|b| {
            (0..shape[rank - 2]).all(|i| {
                (0..shape[rank - 1]).all(|j| {
                    let mut p = vec![0i64; rank];
                    let mut rest = b;
                    for d in (0..rank - 2).rev() {
                        p[d] = (rest % shape[d]) as i64;
                        rest /= shape[d];
                    }
                    p[rank - 2] = i as i64;
                    p[rank - 1] = j as i64;
                    eval_idx(at, &p) == (s.offset + b * s.batch + i * s.row + j * s.col) as i64
                })
            })
        })
    }

    fn vars(n: usize) -> Vec<Idx> {
        (0..n).map(Idx::Var).collect()
    }

    #[test]
    fn views_that_fold_to_strides_are_proven_without_points() {
        // A permuted [3, 2, 4] buffer read as [2, 3, 4]; then a reshape round trip
        // ([2, 3, 4] -> [24] -> [2, 3, 4]) with an offset of 5; then batch dims [2, 1, 3].
        let v = vars(4);
        let permuted = linearize(&[v[1].clone(), v[0].clone(), v[2].clone()], &[3, 2, 4]);
        let flat = linearize(&v[..3], &[2, 3, 4]);
        let round = add(
            linearize(&delinearize(&flat, &[2, 3, 4]), &[2, 3, 4]),
            Idx::Const(5),
        );
        let batched = linearize(&v, &[2, 1, 3, 4]);
        for (at, shape, want) in [
            (permuted, vec![2, 3, 4], (0, 4, 8, 1)),
            (round, vec![2, 3, 4], (5, 12, 4, 1)),
            (batched, vec![2, 1, 3, 4], (0, 12, 4, 1)),
        ] {
            let Linear::Strided(s) = linear_strides(7, &at, &shape) else {
                panic!("{at} is a strided view of {shape:?}");
            };
            assert_eq!(
                (s.buf, s.offset, s.batch, s.row, s.col),
                (7, want.0, want.1, want.2, want.3)
            );
            assert!(holds(&at, &shape, &s));
        }
    }

    #[test]
    fn linear_indices_without_one_stride_per_axis_are_copied_and_the_rest_checked() {
        let v = vars(4);
        // A remainder that does not fold (unknown), batch dims in the wrong order and a
        // negative stride (linear, but no strided view), an empty operand.
        let rem = Idx::Rem(Box::new(v[1].clone()), 2);
        let swapped = linearize(
            &[v[1].clone(), v[0].clone(), v[2].clone(), v[3].clone()],
            &[3, 2, 4, 5],
        );
        let reversed = add(Idx::Const(3), mul(v[2].clone(), -1));
        assert_eq!(linear_strides(0, &rem, &[3, 4]), Linear::Unknown);
        assert_eq!(
            linear_strides(0, &swapped, &[2, 3, 4, 5]),
            Linear::NotStrided
        );
        assert_eq!(linear_strides(0, &reversed, &[2, 4, 3]), Linear::NotStrided);
        assert_eq!(linear_strides(0, &v[0], &[0, 4]), Linear::Unknown);
    }
}
