//! Tensor operations as the elaborator emits them: numpy-style broadcasting made explicit
//! (reshape + expand), scalars as constants, matmul with batch broadcasting, indexing and
//! slicing. Every op goes through [`crate::ir::Graph::add`], which checks its types.

use super::value::Value;
use super::{Ctx, Elaborator};
use crate::diag::Diagnostic;
use crate::ir::{BinaryOp, DType, Dim, NodeId, Op, Shape, TensorType, UnaryOp};
use vlmc_grammar::ast::{IndexItem, Span};

type R<T> = Result<T, Diagnostic>;

impl Elaborator<'_> {
    /// The type of a tensor node.
    pub fn ty(&self, id: NodeId) -> TensorType {
        self.graph.node(id).ty.clone()
    }

    /// Adds an op; a type error becomes a diagnostic at `span`.
    pub fn op(&mut self, cx: &Ctx, op: Op, operands: &[NodeId], span: Span) -> R<NodeId> {
        self.budget = self.budget.saturating_sub(1);
        let scope = cx.scope();
        self.graph
            .add(op, operands, &scope)
            .map_err(|e| self.err(cx, span, e.to_string()))
    }

    /// A source op (constant, iota, random) of a given type.
    pub fn source(&mut self, cx: &Ctx, op: Op, ty: TensorType, span: Span) -> R<NodeId> {
        self.budget = self.budget.saturating_sub(1);
        let scope = cx.scope();
        self.graph
            .add_source(op, ty, &scope)
            .map_err(|e| self.err(cx, span, e.to_string()))
    }

    /// A scalar constant (`f32[]`).
    pub fn scalar(&mut self, cx: &Ctx, value: f64, dtype: DType, span: Span) -> R<NodeId> {
        self.source(
            cx,
            Op::Const { value },
            TensorType::new(dtype, Vec::<Dim>::new()),
            span,
        )
    }

    /// A unary primitive.
    pub fn prim_unary(&mut self, cx: &Ctx, op: UnaryOp, x: NodeId, span: Span) -> R<NodeId> {
        self.op(cx, Op::Unary(op), &[x], span)
    }

    /// A value as a tensor of `dtype`: tensors pass through, numbers become constants, a
    /// symbolic size becomes the sum of ones over that size.
    pub fn as_tensor(&mut self, cx: &Ctx, v: &Value, dtype: DType, span: Span) -> R<NodeId> {
        match v {
            Value::Tensor(t) => Ok(*t),
            Value::Int(i) => self.scalar(cx, *i as f64, dtype, span),
            Value::Float(f) => {
                if !dtype.is_float() {
                    return Err(self
                        .err(
                            cx,
                            span,
                            format!("a float cannot be combined with a tensor of dtype {dtype}"),
                        )
                        .note("cast the tensor first, e.g. `cast(x, f32)`"));
                }
                self.scalar(cx, *f, dtype, span)
            }
            Value::Bool(b) => self.scalar(cx, if *b { 1.0 } else { 0.0 }, DType::Bool, span),
            Value::Dim(d) => {
                // A runtime value for a symbolic size: sum(ones[d]).
                let ones = self.source(
                    cx,
                    Op::Const { value: 1.0 },
                    TensorType::new(dtype, vec![d.clone()]),
                    span,
                )?;
                let s = self.op(
                    cx,
                    Op::Reduce {
                        op: crate::ir::ReduceOp::Sum,
                        axis: 0,
                    },
                    &[ones],
                    span,
                )?;
                self.reshape(cx, s, Vec::new(), span)
            }
            other => Err(self
                .err(
                    cx,
                    span,
                    format!("expected a tensor or a number, got {}", other.kind()),
                )
                .label(format!("this is {}", other.kind()))),
        }
    }

    /// Two operands as tensors. A number next to a tensor becomes a constant of the tensor's
    /// shape directly, so `x * 0.5` is one `const` and one `mul`.
    #[allow(clippy::too_many_arguments)]
    pub fn operands_like(
        &mut self,
        cx: &Ctx,
        l: &Value,
        r: &Value,
        dtype: DType,
        lspan: Span,
        rspan: Span,
        span: Span,
    ) -> R<(NodeId, NodeId)> {
        let is_num = |v: &Value| matches!(v, Value::Int(_) | Value::Float(_) | Value::Bool(_));
        match (l, r) {
            (Value::Tensor(a), v) if is_num(v) => {
                let b = self.const_like(cx, v, *a, rspan)?;
                Ok((*a, b))
            }
            (v, Value::Tensor(b)) if is_num(v) => {
                let a = self.const_like(cx, v, *b, lspan)?;
                Ok((a, *b))
            }
            _ => {
                let _ = span;
                Ok((
                    self.as_tensor(cx, l, dtype, lspan)?,
                    self.as_tensor(cx, r, dtype, rspan)?,
                ))
            }
        }
    }

    /// A number as a constant with the type of `like`.
    fn const_like(&mut self, cx: &Ctx, v: &Value, like: NodeId, span: Span) -> R<NodeId> {
        let ty = self.ty(like);
        let value = match v {
            Value::Float(f) if !ty.dtype.is_float() => {
                return Err(self
                    .err(
                        cx,
                        span,
                        format!(
                            "a float cannot be combined with a tensor of dtype {}",
                            ty.dtype
                        ),
                    )
                    .note("cast the tensor first, e.g. `cast(x, f32)`"))
            }
            Value::Bool(b) => f64::from(u8::from(*b)),
            v => v.as_f64().unwrap_or(0.0),
        };
        self.source(cx, Op::Const { value }, ty, span)
    }

    /// The broadcast shape of two shapes (numpy rules), or an error naming both.
    pub fn broadcast_shape(
        &self,
        cx: &Ctx,
        a: &TensorType,
        b: &TensorType,
        span: Span,
    ) -> R<Shape> {
        let (ra, rb) = (a.shape.0.len(), b.shape.0.len());
        let r = ra.max(rb);
        let one = Dim::c(1);
        let mut out = Vec::with_capacity(r);
        for i in 0..r {
            let da = if i + ra >= r {
                &a.shape.0[i + ra - r]
            } else {
                &one
            };
            let db = if i + rb >= r {
                &b.shape.0[i + rb - r]
            } else {
                &one
            };
            if da == db || *db == one {
                out.push(da.clone());
            } else if *da == one {
                out.push(db.clone());
            } else {
                return Err(self
                    .err(cx, span, format!("cannot broadcast {a} with {b}"))
                    .label(format!("{da} vs {db} at axis {}", i as i64 - r as i64))
                    .note("broadcasting aligns shapes on the right; each pair of dims must be equal or 1"));
            }
        }
        Ok(Shape(out))
    }

    /// Broadcasts `x` to `shape` (adding leading axes and expanding size-1 axes).
    pub fn broadcast_to(&mut self, cx: &Ctx, x: NodeId, shape: &Shape, span: Span) -> R<NodeId> {
        let ty = self.ty(x);
        if ty.shape == *shape {
            return Ok(x);
        }
        let mut x = x;
        let r = shape.0.len();
        if ty.shape.0.len() < r {
            let mut dims = vec![Dim::c(1); r - ty.shape.0.len()];
            dims.extend(ty.shape.0.iter().cloned());
            x = self.reshape(cx, x, dims, span)?;
        }
        if self.ty(x).shape != *shape {
            x = self.op(
                cx,
                Op::Expand {
                    shape: shape.clone(),
                },
                &[x],
                span,
            )?;
        }
        Ok(x)
    }

    /// Reshapes (no-op when the shape is already right).
    pub fn reshape(&mut self, cx: &Ctx, x: NodeId, dims: Vec<Dim>, span: Span) -> R<NodeId> {
        if self.ty(x).shape.0 == dims {
            return Ok(x);
        }
        self.op(cx, Op::Reshape { shape: Shape(dims) }, &[x], span)
    }

    /// Permutes axes (no-op for the identity).
    pub fn permute(&mut self, cx: &Ctx, x: NodeId, perm: Vec<usize>, span: Span) -> R<NodeId> {
        if perm.iter().enumerate().all(|(i, p)| i == *p) {
            return Ok(x);
        }
        self.op(cx, Op::Permute { perm }, &[x], span)
    }

    /// An elementwise binary op on values, with scalar promotion and broadcasting.
    #[allow(clippy::too_many_arguments)]
    pub fn tensor_binary(
        &mut self,
        cx: &Ctx,
        op: BinaryOp,
        l: Value,
        r: Value,
        lspan: Span,
        rspan: Span,
        span: Span,
    ) -> R<NodeId> {
        let dtype = match (&l, &r) {
            (Value::Tensor(a), _) => self.ty(*a).dtype,
            (_, Value::Tensor(b)) => self.ty(*b).dtype,
            _ => DType::F32,
        };
        let (a, b) = self.operands_like(cx, &l, &r, dtype, lspan, rspan, span)?;
        let (ta, tb) = (self.ty(a), self.ty(b));
        if ta.dtype != tb.dtype {
            return Err(self
                .err(
                    cx,
                    span,
                    format!(
                        "`{}` needs the same dtype on both sides: {ta} and {tb}",
                        op.name()
                    ),
                )
                .note("convert one side with `cast(x, f32)`"));
        }
        let shape = self.broadcast_shape(cx, &ta, &tb, span)?;
        let a = self.broadcast_to(cx, a, &shape, lspan)?;
        let b = self.broadcast_to(cx, b, &shape, rspan)?;
        self.op(cx, Op::Binary(op), &[a, b], span)
    }

    /// `a @ b` with numpy batch broadcasting; a 2-D right side keeps the weight un-expanded
    /// by folding the left side's batch axes into its rows.
    pub fn matmul(&mut self, cx: &Ctx, a: NodeId, b: NodeId, span: Span) -> R<NodeId> {
        let (ta, tb) = (self.ty(a), self.ty(b));
        if ta.rank() < 2 || tb.rank() < 2 {
            return Err(self
                .err(
                    cx,
                    span,
                    format!("matmul needs rank >= 2 on both sides, got {ta} @ {tb}"),
                )
                .note("add an axis with `unsqueeze(x, 0)`"));
        }
        let k_a = &ta.shape.0[ta.rank() - 1];
        let k_b = &tb.shape.0[tb.rank() - 2];
        if k_a != k_b {
            return Err(self
                .err(
                    cx,
                    span,
                    format!("matmul: inner dimensions differ: {ta} @ {tb} ({k_a} vs {k_b})"),
                )
                .label(format!("{ta} @ {tb}")));
        }
        if tb.rank() == 2 && ta.rank() > 2 {
            let m_rows = ta.shape.0[..ta.rank() - 1]
                .iter()
                .try_fold(Dim::c(1), |acc, d| acc.checked_mul(d))
                .ok_or_else(|| self.err(cx, span, "integer overflow"))?;
            let flat = self.reshape(cx, a, vec![m_rows, k_a.clone()], span)?;
            let prod = self.op(cx, Op::MatMul, &[flat, b], span)?;
            let mut out = ta.shape.0[..ta.rank() - 1].to_vec();
            out.push(tb.shape.0[1].clone());
            return self.reshape(cx, prod, out, span);
        }
        let batch_a = TensorType::new(ta.dtype, ta.shape.0[..ta.rank() - 2].to_vec());
        let batch_b = TensorType::new(tb.dtype, tb.shape.0[..tb.rank() - 2].to_vec());
        let batch = self.broadcast_shape(cx, &batch_a, &batch_b, span)?;
        let mut sa = batch.0.clone();
        sa.extend(ta.shape.0[ta.rank() - 2..].iter().cloned());
        let mut sb = batch.0.clone();
        sb.extend(tb.shape.0[tb.rank() - 2..].iter().cloned());
        let a = self.broadcast_to(cx, a, &Shape(sa), span)?;
        let b = self.broadcast_to(cx, b, &Shape(sb), span)?;
        self.op(cx, Op::MatMul, &[a, b], span)
    }

    /// A normalised axis (negative counts from the end).
    pub fn axis(&self, cx: &Ctx, axis: i64, rank: usize, span: Span) -> R<usize> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r {
            return Err(self
                .err(
                    cx,
                    span,
                    format!("axis {axis} is out of range for rank {rank}"),
                )
                .label("bad axis"));
        }
        Ok(a as usize)
    }

    /// `x[...]`: integer indices remove an axis, slices keep it, `...` fills the middle.
    pub fn index(
        &mut self,
        cx: &mut Ctx,
        base: Value,
        items: &[IndexItem],
        span: Span,
    ) -> R<Value> {
        match base {
            Value::Tensor(t) => self.index_tensor(cx, t, items, span).map(Value::Tensor),
            Value::List(v) | Value::Tuple(v) => {
                let [item] = items else {
                    return Err(self.err(cx, span, "lists take one index"));
                };
                match item {
                    IndexItem::At(e) => {
                        let i = self.eval_int(cx, e)?;
                        let n = v.len() as i64;
                        let j = if i < 0 { i + n } else { i };
                        if j < 0 || j >= n {
                            return Err(self
                                .err(
                                    cx,
                                    e.span,
                                    format!("index {i} is out of range for a list of {n}"),
                                )
                                .label("out of range"));
                        }
                        Ok(v[j as usize].clone())
                    }
                    IndexItem::Slice {
                        start,
                        end,
                        step,
                        span: sp,
                    } => {
                        let n = v.len() as i64;
                        let norm = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
                        let s = match start {
                            Some(e) => norm(self.eval_int(cx, e)?),
                            None => 0,
                        };
                        let e_ = match end {
                            Some(e) => norm(self.eval_int(cx, e)?),
                            None => n,
                        };
                        let st = match step {
                            Some(e) => self.eval_int(cx, e)?,
                            None => 1,
                        };
                        if st < 1 {
                            return Err(self.err(cx, *sp, "slice step must be >= 1"));
                        }
                        Ok(Value::List(
                            (s..e_.max(s))
                                .step_by(st as usize)
                                .map(|i| v[i as usize].clone())
                                .collect::<Vec<_>>()
                                .into(),
                        ))
                    }
                    IndexItem::Ellipsis(s) => Err(self.err(cx, *s, "`...` only indexes tensors")),
                }
            }
            other => Err(self
                .err(cx, span, format!("{} cannot be indexed", other.kind()))
                .label("not a tensor or list")),
        }
    }

    fn index_tensor(
        &mut self,
        cx: &mut Ctx,
        t: NodeId,
        items: &[IndexItem],
        span: Span,
    ) -> R<NodeId> {
        let ty = self.ty(t);
        let rank = ty.rank();
        let ellipses = items
            .iter()
            .filter(|i| matches!(i, IndexItem::Ellipsis(_)))
            .count();
        if ellipses > 1 {
            return Err(self.err(cx, span, "at most one `...` in an index"));
        }
        let explicit = items.len() - ellipses;
        if explicit > rank {
            return Err(self
                .err(cx, span, format!("too many indices ({explicit}) for {ty}"))
                .label("index"));
        }
        let mut x = t;
        let mut axis = 0usize;
        let mut drop = Vec::new();
        for it in items {
            match it {
                IndexItem::Ellipsis(_) => axis += rank - explicit,
                IndexItem::At(e) => {
                    let dim = self.ty(x).shape.0[axis].clone();
                    let v = self.eval(cx, e)?;
                    let Some(i) = v.as_dim() else {
                        return Err(self
                            .err(
                                cx,
                                e.span,
                                format!(
                                    "tensor index must be a compile-time size, got {}",
                                    v.kind()
                                ),
                            )
                            .note("to index with a tensor use `gather(table, idx, axis: 0)`"));
                    };
                    let start = self.norm_index(cx, i, &dim, e.span)?;
                    let end = start
                        .checked_add(&Dim::c(1))
                        .ok_or_else(|| self.err(cx, e.span, "integer overflow"))?;
                    x = self.op(
                        cx,
                        Op::Slice {
                            axis,
                            start,
                            end,
                            step: 1,
                        },
                        &[x],
                        e.span,
                    )?;
                    drop.push(axis);
                    axis += 1;
                }
                IndexItem::Slice {
                    start,
                    end,
                    step,
                    span: sp,
                } => {
                    let dim = self.ty(x).shape.0[axis].clone();
                    let s = match start {
                        Some(e) => {
                            let v = self.eval(cx, e)?;
                            let d = v.as_dim().ok_or_else(|| {
                                self.err(cx, e.span, "slice bounds must be sizes")
                            })?;
                            self.norm_bound(cx, d, &dim, e.span)?
                        }
                        None => Dim::c(0),
                    };
                    let en = match end {
                        Some(e) => {
                            let v = self.eval(cx, e)?;
                            let d = v.as_dim().ok_or_else(|| {
                                self.err(cx, e.span, "slice bounds must be sizes")
                            })?;
                            self.norm_bound(cx, d, &dim, e.span)?
                        }
                        None => dim.clone(),
                    };
                    let st = match step {
                        Some(e) => self.eval_int(cx, e)?,
                        None => 1,
                    };
                    if st < 1 {
                        return Err(self
                            .err(cx, *sp, "slice step must be >= 1")
                            .label("negative or zero step"));
                    }
                    if en.const_diff(&s).is_some_and(|d| d <= 0) {
                        return Err(self
                            .err(
                                cx,
                                *sp,
                                format!("empty slice: the end ({en}) is not after the start ({s})"),
                            )
                            .label("selects nothing"));
                    }
                    if !(s == Dim::c(0) && en == dim && st == 1) {
                        x = self.op(
                            cx,
                            Op::Slice {
                                axis,
                                start: s,
                                end: en,
                                step: st,
                            },
                            &[x],
                            *sp,
                        )?;
                    }
                    axis += 1;
                }
            }
        }
        if !drop.is_empty() {
            let dims: Vec<Dim> = self
                .ty(x)
                .shape
                .0
                .iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, d)| d.clone())
                .collect();
            x = self.reshape(cx, x, dims, span)?;
        }
        Ok(x)
    }

    /// An index in `[0, dim)`: negative counts from the end; checked when both are constant.
    fn norm_index(&self, cx: &Ctx, i: Dim, dim: &Dim, span: Span) -> R<Dim> {
        let i = match i.as_const() {
            Some(c) if c < 0 => dim
                .checked_add(&i)
                .ok_or_else(|| self.err(cx, span, "integer overflow"))?,
            _ => i,
        };
        if let (Some(c), Some(n)) = (i.as_const(), dim.as_const()) {
            if c < 0 || c >= n {
                return Err(self
                    .err(
                        cx,
                        span,
                        format!(
                            "index {} is out of range for an axis of size {n}",
                            if c < 0 { c - n } else { c }
                        ),
                    )
                    .label("out of range"));
            }
        }
        Ok(i)
    }

    /// A slice bound: negative counts from the end.
    fn norm_bound(&self, cx: &Ctx, b: Dim, dim: &Dim, span: Span) -> R<Dim> {
        let given = b.clone();
        let b = match b.as_const() {
            Some(c) if c < 0 => dim
                .checked_add(&b)
                .ok_or_else(|| self.err(cx, span, "integer overflow"))?,
            _ => b,
        };
        // Unlike Python, a bound outside the axis is an error: with static shapes it is almost
        // surely a mistake.
        let outside = match (b.as_const(), dim.as_const()) {
            (Some(c), Some(n)) => c < 0 || c > n,
            (Some(c), None) => c < 0,
            _ => b.const_diff(dim).is_some_and(|d| d > 0),
        };
        if outside {
            return Err(self
                .err(
                    cx,
                    span,
                    format!("slice bound {given} is out of range for an axis of size {dim}"),
                )
                .label("out of range"));
        }
        Ok(b)
    }
}
