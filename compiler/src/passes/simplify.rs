//! Algebraic simplification: a table of local rewrite rules applied until nothing changes.
//!
//! | rule | rewrites |
//! |---|---|
//! | `noop_view` | `reshape`, `expand`, identity `permute`, `cast` to the same type, `stop_gradient` → the operand |
//! | `reshape_reshape` | `reshape(reshape(x))` → `reshape(x)` |
//! | `permute_permute` | `permute(permute(x, p), q)` → `permute(x, p∘q)` (or `x`) |
//! | `double_neg` | `neg(neg(x))` → `x` |
//! | `identity_operand` | `x + 0`, `0 + x`, `x - 0`, `x * 1`, `1 * x`, `x / 1` → `x` |
//! | `fold_const` | an elementwise op, cast or view of constants → one constant |
//! | `transpose_product` | `transpose(a · b)` → `bᵀ · aᵀ` when the product has no other use |
//! | `transpose_sum` | `transpose(x + y)` → `xᵀ + yᵀ` when each of `x`, `y` is such a product or a transpose |
//! | `sum_of_scatters` | `scatter_add(a, i) + scatter_add(b, j)` (axis 0) → `scatter_add(a ++ b, i ++ j)` when neither has another use |
//! | `sink_slice` | `slice(f(x, y))` → `f(slice(x), slice(y))` for an elementwise op, a reduction along another axis, a broadcast, a permute, a matmul or a linear layer that has no other use, when the slice keeps at most half of the axis |
//!
//! The last two turn a weight gradient (autodiff's `transpose(xᵀ · dy)`, summed over the uses
//! of the weight) into products computed in the weight's own layout, so that nothing reads a
//! product transposed. The last one makes the gradient of a table gathered twice (a word
//! embedding applied to two batches) one scatter-add instead of two full-size tables and a sum.
//!
//! `sink_slice` computes only what is kept: generation's prefill keeps the logits of the last
//! position alone (`elab::gen::last_position`), and the slice sinks through the final norm to
//! the language head, which then multiplies one row per sequence instead of every position.
//!
//! Constants fill their whole shape with one value, so folding computes one scalar, with the
//! interpreter's rounding (operands rounded to their dtype, the result computed in f64).

use super::{Pass, PassError};
use crate::ir::{BinaryOp, DType, Graph, NodeId, Op, UnaryOp};

/// Applies the rewrite rules to a fixed point.
pub struct Simplify;

type Rule = fn(&mut Graph, NodeId) -> Option<NodeId>;

const RULES: &[Rule] = &[
    noop_view,
    reshape_reshape,
    permute_permute,
    double_neg,
    identity_operand,
    fold_const,
    transpose_product,
    transpose_sum,
    sum_of_scatters,
    sink_slice,
];

impl Pass for Simplify {
    fn name(&self) -> &'static str {
        "simplify"
    }

    fn run(&self, graph: &mut Graph) -> Result<bool, PassError> {
        let mut changed = false;
        for _round in 0..100 {
            let mut any = false;
            for id in graph.topo_order() {
                if !graph.contains(id) {
                    continue;
                }
                for rule in RULES {
                    if let Some(new) = rule(graph, id) {
                        if new != id {
                            graph.replace_uses(id, new);
                            remove_dead(graph, id);
                            any = true;
                            break;
                        }
                    }
                }
            }
            changed |= any;
            if !any {
                return Ok(changed);
            }
        }
        Err(PassError {
            pass: "simplify",
            message: "no fixed point after 100 rounds".into(),
        })
    }
}

/// Removes `id` and then every operand left without a use (not sources: inputs and
/// parameters stay), so that rules that want a value's only use see it at once.
fn remove_dead(g: &mut Graph, id: NodeId) {
    let mut stack = vec![id];
    while let Some(n) = stack.pop() {
        if !g.contains(n) || !g.users(n).is_empty() || is_output(g, n) {
            continue;
        }
        let ops = g.operands(n);
        let source = g.node(n).op.is_source();
        if source && n != id {
            continue;
        }
        g.remove(n);
        stack.extend(ops);
    }
}

fn is_output(g: &Graph, id: NodeId) -> bool {
    g.outputs.iter().any(|(_, o)| *o == id)
}

fn operand(g: &Graph, id: NodeId, i: usize) -> Option<NodeId> {
    g.operands(id).get(i).copied()
}

fn add(g: &mut Graph, op: Op, operands: &[NodeId], like: NodeId) -> Option<NodeId> {
    let scope = g.node(like).scope.clone();
    g.add(op, operands, &scope).ok()
}

fn noop_view(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let node = g.node(id);
    let x = operand(g, id, 0)?;
    let same = g.node(x).ty == node.ty;
    let is_view = match &node.op {
        Op::Reshape { .. } | Op::Expand { .. } | Op::Cast { .. } | Op::StopGradient => true,
        Op::Permute { perm } => perm.iter().enumerate().all(|(i, &p)| i == p),
        _ => false,
    };
    (is_view && same).then_some(x)
}

fn reshape_reshape(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let Op::Reshape { shape } = &g.node(id).op else {
        return None;
    };
    let inner = operand(g, id, 0)?;
    if !matches!(g.node(inner).op, Op::Reshape { .. }) {
        return None;
    }
    let x = operand(g, inner, 0)?;
    let shape = shape.clone();
    add(g, Op::Reshape { shape }, &[x], id)
}

fn permute_permute(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let Op::Permute { perm: outer } = &g.node(id).op else {
        return None;
    };
    let inner = operand(g, id, 0)?;
    let Op::Permute { perm: first } = &g.node(inner).op else {
        return None;
    };
    // out[i] = mid[outer[i]] = x[first[outer[i]]]
    let composed: Vec<usize> = outer.iter().map(|&o| first[o]).collect();
    let x = operand(g, inner, 0)?;
    if composed.iter().enumerate().all(|(i, &p)| i == p) {
        return Some(x);
    }
    add(g, Op::Permute { perm: composed }, &[x], id)
}

fn double_neg(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let Op::Unary(UnaryOp::Neg) = g.node(id).op else {
        return None;
    };
    let inner = operand(g, id, 0)?;
    let Op::Unary(UnaryOp::Neg) = g.node(inner).op else {
        return None;
    };
    operand(g, inner, 0)
}

fn const_value(g: &Graph, id: NodeId) -> Option<f64> {
    match g.node(id).op {
        Op::Const { value } => Some(round_to(g.node(id).ty.dtype, value)),
        _ => None,
    }
}

fn identity_operand(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let Op::Binary(op) = g.node(id).op else {
        return None;
    };
    let (a, b) = (operand(g, id, 0)?, operand(g, id, 1)?);
    let (ca, cb) = (const_value(g, a), const_value(g, b));
    match op {
        BinaryOp::Add if cb == Some(0.0) => Some(a),
        BinaryOp::Add if ca == Some(0.0) => Some(b),
        BinaryOp::Sub if cb == Some(0.0) => Some(a),
        BinaryOp::Mul | BinaryOp::Div if cb == Some(1.0) => Some(a),
        BinaryOp::Mul if ca == Some(1.0) => Some(b),
        _ => None,
    }
}

/// A value as the interpreter holds it in `dtype`.
fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => f64::from(v as f32),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::I32 => f64::from(v as i32),
        DType::Bool => f64::from(u8::from(v != 0.0)),
        DType::NF4 | DType::F64 => v,
    }
}

fn fold_const(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let node = g.node(id);
    let ty = node.ty.clone();
    let operands = g.operands(id);
    if operands.is_empty() {
        return None;
    }
    let vals: Vec<f64> = operands
        .iter()
        .map(|&o| const_value(g, o))
        .collect::<Option<_>>()?;
    let float = ty.dtype.is_float() || matches!(node.op, Op::Binary(b) if b.is_comparison());
    let value = match &node.op {
        Op::Reshape { .. }
        | Op::Expand { .. }
        | Op::Permute { .. }
        | Op::Slice { .. }
        | Op::Cast { .. } => vals[0],
        Op::Unary(u) if float => {
            let x = vals[0];
            match u {
                UnaryOp::Neg => -x,
                UnaryOp::Abs => x.abs(),
                UnaryOp::Exp => x.exp(),
                UnaryOp::Log => x.ln(),
                UnaryOp::Sqrt => x.sqrt(),
                UnaryOp::Rsqrt => 1.0 / x.sqrt(),
                UnaryOp::Recip => 1.0 / x,
                UnaryOp::Tanh => x.tanh(),
                UnaryOp::Sin => x.sin(),
                UnaryOp::Cos => x.cos(),
                UnaryOp::Floor => x.floor(),
                UnaryOp::Erf | UnaryOp::Not => return None,
            }
        }
        Op::Binary(b) if float && g.node(operands[0]).ty.dtype.is_float() => {
            let (x, y) = (vals[0], vals[1]);
            match b {
                BinaryOp::Add => x + y,
                BinaryOp::Sub => x - y,
                BinaryOp::Mul => x * y,
                BinaryOp::Div => x / y,
                BinaryOp::Pow => x.powf(y),
                BinaryOp::Eq => f64::from(u8::from(x == y)),
                BinaryOp::Ne => f64::from(u8::from(x != y)),
                BinaryOp::Lt => f64::from(u8::from(x < y)),
                BinaryOp::Le => f64::from(u8::from(x <= y)),
                BinaryOp::Gt => f64::from(u8::from(x > y)),
                BinaryOp::Ge => f64::from(u8::from(x >= y)),
                _ => return None,
            }
        }
        _ => return None,
    };
    let scope = node.scope.clone();
    g.add_source(Op::Const { value }, ty, &scope).ok()
}

/// Whether `perm` swaps the last two axes and keeps the others.
fn swaps_last_two(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
}

/// The permutation of `id` when it is a transpose of the last two axes.
fn transpose_perm(g: &Graph, id: NodeId) -> Option<Vec<usize>> {
    match &g.node(id).op {
        Op::Permute { perm } if swaps_last_two(perm) => Some(perm.clone()),
        _ => None,
    }
}

/// A matmul used only once (by the transpose being rewritten).
fn sole_product(g: &Graph, id: NodeId) -> bool {
    matches!(g.node(id).op, Op::MatMul) && g.users(id).len() == 1 && !is_output(g, id)
}

fn transpose_product(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let perm = transpose_perm(g, id)?;
    let m = operand(g, id, 0)?;
    if !sole_product(g, m) {
        return None;
    }
    let (a, b) = (operand(g, m, 0)?, operand(g, m, 1)?);
    let bt = add(g, Op::Permute { perm: perm.clone() }, &[b], id)?;
    let at = add(g, Op::Permute { perm }, &[a], id)?;
    add(g, Op::MatMul, &[bt, at], id)
}

fn transpose_sum(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let perm = transpose_perm(g, id)?;
    let s = operand(g, id, 0)?;
    if !matches!(g.node(s).op, Op::Binary(BinaryOp::Add))
        || g.users(s).len() != 1
        || is_output(g, s)
    {
        return None;
    }
    let (x, y) = (operand(g, s, 0)?, operand(g, s, 1)?);
    let movable = |v: NodeId| sole_product(g, v) || transpose_perm(g, v).is_some();
    if !(movable(x) && movable(y)) {
        return None;
    }
    let xt = add(g, Op::Permute { perm: perm.clone() }, &[x], id)?;
    let yt = add(g, Op::Permute { perm }, &[y], id)?;
    add(g, Op::Binary(BinaryOp::Add), &[xt, yt], id)
}

fn sum_of_scatters(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    if !matches!(g.node(id).op, Op::Binary(BinaryOp::Add)) {
        return None;
    }
    let (x, y) = (operand(g, id, 0)?, operand(g, id, 1)?);
    let size = match (&g.node(x).op, &g.node(y).op) {
        (Op::ScatterAdd { axis: 0, size: a }, Op::ScatterAdd { axis: 0, size: b }) if a == b => {
            a.clone()
        }
        _ => return None,
    };
    let single = |v: NodeId| g.users(v).len() == 1 && !is_output(g, v);
    if x == y || !single(x) || !single(y) {
        return None;
    }
    // Each source as [K, rest...] and its indices as [K].
    let flat = |g: &mut Graph, s: NodeId| -> Option<(NodeId, NodeId)> {
        let (src, idx) = (operand(g, s, 0)?, operand(g, s, 1)?);
        let ir = g.node(idx).ty.rank();
        let k = g.node(idx).ty.shape.numel()?;
        let mut shape = vec![k.clone()];
        shape.extend(g.node(src).ty.shape.0[ir..].iter().cloned());
        let src = add(
            g,
            Op::Reshape {
                shape: shape.into_iter().collect(),
            },
            &[src],
            id,
        )?;
        let idx = add(
            g,
            Op::Reshape {
                shape: vec![k].into_iter().collect(),
            },
            &[idx],
            id,
        )?;
        Some((src, idx))
    };
    let (a, i) = flat(g, x)?;
    let (b, j) = flat(g, y)?;
    let src = add(g, Op::Concat { axis: 0 }, &[a, b], id)?;
    let idx = add(g, Op::Concat { axis: 0 }, &[i, j], id)?;
    add(g, Op::ScatterAdd { axis: 0, size }, &[src, idx], id)
}

/// `slice(f(x, ..))` → `f(slice(x), ..)` when `f` (elementwise, a reduction along another axis,
/// a broadcast, a permute or a matmul) has no use but the slice: the operands are sliced along
/// the axis that becomes the sliced one (a matmul's sliced row axis slices only its left
/// operand, its column axis only its right one, a batch axis both; an axis a broadcast expands
/// from size 1 is not sliced at all).
fn sink_slice(g: &mut Graph, id: NodeId) -> Option<NodeId> {
    let Op::Slice {
        axis,
        start,
        end,
        step,
    } = g.node(id).op.clone()
    else {
        return None;
    };
    let x = operand(g, id, 0)?;
    if g.users(x).len() != 1 || is_output(g, x) || !slices_most_away(g, id, x, axis) {
        return None;
    }
    let ops = g.operands(x);
    let rank = g.node(x).ty.rank();
    let mut op = g.node(x).op.clone();
    // (operand, the axis of it to slice, if any)
    let plan: Vec<(NodeId, Option<usize>)> = match &op {
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } => {
            ops.iter().map(|&o| (o, Some(axis))).collect()
        }
        Op::Reduce { axis: r, .. } if *r != axis => vec![(ops[0], Some(axis))],
        Op::Permute { perm } => vec![(ops[0], Some(*perm.get(axis)?))],
        Op::Expand { .. } => {
            let from_one = g.node(ops[0]).ty.shape.0.get(axis)?.as_const() == Some(1);
            vec![(ops[0], (!from_one).then_some(axis))]
        }
        Op::Reshape { .. } => return sink_slice_linear(g, id, x),
        Op::MatMul if rank >= 2 && ops.len() == 2 => {
            if axis == rank - 1 {
                vec![(ops[0], None), (ops[1], Some(axis))]
            } else if axis == rank - 2 {
                vec![(ops[0], Some(axis)), (ops[1], None)]
            } else {
                vec![(ops[0], Some(axis)), (ops[1], Some(axis))]
            }
        }
        _ => return None,
    };
    if let Op::Expand { shape } = &mut op {
        shape.0[axis] = g.node(id).ty.shape.0.get(axis)?.clone();
    }
    let mut made = Vec::new();
    let mut operands = Vec::new();
    for (o, a) in plan {
        let Some(a) = a else {
            operands.push(o);
            continue;
        };
        let sliced = Op::Slice {
            axis: a,
            start: start.clone(),
            end: end.clone(),
            step,
        };
        match add(g, sliced, &[o], id) {
            Some(s) => {
                made.push(s);
                operands.push(s);
            }
            None => break,
        }
    }
    let new = if operands.len() == g.operands(x).len() {
        add(g, op, &operands, x)
    } else {
        None
    };
    match new {
        Some(n) if g.node(n).ty == g.node(id).ty => Some(n),
        other => {
            made.extend(other);
            discard(g, made);
            None
        }
    }
}

/// Removes the nodes a rewrite made before it failed, newest first (a failure cannot happen
/// for well-typed graphs: the slice rewrites keep every type).
fn discard(g: &mut Graph, made: Vec<NodeId>) {
    for n in made.into_iter().rev() {
        if g.users(n).is_empty() {
            g.remove(n);
        }
    }
}

/// Whether the slice `id` of `x` along `axis` keeps at most half of it (a fixed length of a
/// symbolic size counts): only then is sinking it worth splitting the kernels it passes
/// through (LLaVA's `[:, 1:]` over 17 patches is not; generation's last position is).
fn slices_most_away(g: &Graph, id: NodeId, x: NodeId, axis: usize) -> bool {
    let kept = g.node(id).ty.shape.0.get(axis).and_then(|d| d.as_const());
    let size = g.node(x).ty.shape.0.get(axis).map(|d| d.as_const());
    match (kept, size) {
        (Some(k), Some(Some(n))) => 2 * k <= n,
        (Some(_), Some(None)) => true,
        _ => false,
    }
}

/// `sink_slice` through the flatten-multiply-unflatten of a linear layer: `slice(reshape(
/// matmul(reshape(a), w)))`, where the reshapes merge and restore the leading axes of
/// `a: [..lead, k]`, becomes the same three nodes on `slice(a)` (the slice along a leading axis).
fn sink_slice_linear(g: &mut Graph, id: NodeId, y: NodeId) -> Option<NodeId> {
    let Op::Slice { axis, .. } = g.node(id).op else {
        return None;
    };
    let m = operand(g, y, 0)?;
    if !matches!(g.node(m).op, Op::MatMul) || g.users(m).len() != 1 || is_output(g, m) {
        return None;
    }
    let (r, w) = (operand(g, m, 0)?, operand(g, m, 1)?);
    if !matches!(g.node(r).op, Op::Reshape { .. }) || g.node(w).ty.rank() != 2 {
        return None;
    }
    let a = operand(g, r, 0)?;
    let (a_ty, y_ty) = (g.node(a).ty.shape.0.clone(), g.node(y).ty.shape.0.clone());
    let (r_ty, m_ty) = (&g.node(r).ty.shape.0, &g.node(m).ty.shape.0);
    let lead = a_ty.len().checked_sub(1)?;
    // a: [..lead, k] → r: [prod(lead), k] → m: [prod(lead), n] → y: [..lead, n]
    let prod = |d: &[crate::ir::Dim]| {
        d.iter()
            .try_fold(crate::ir::Dim::c(1), |acc, x| acc.checked_mul(x))
    };
    let fits = r_ty.len() == 2
        && m_ty.len() == 2
        && y_ty.len() == a_ty.len()
        && axis < lead
        && a_ty[..lead] == y_ty[..lead]
        && r_ty[1] == a_ty[lead]
        && y_ty[lead] == m_ty[1]
        && Some(&r_ty[0]) == prod(&a_ty[..lead]).as_ref();
    let n = m_ty[1].clone();
    if !fits {
        return None;
    }
    let slice = g.node(id).op.clone();
    let sa = add(g, slice, &[a], id)?;
    let mut lead_dims = g.node(sa).ty.shape.0.clone();
    let k = lead_dims.pop()?;
    let rows = prod(&lead_dims)?;
    let mut out_shape = lead_dims;
    out_shape.push(n);
    let sr = add(
        g,
        Op::Reshape {
            shape: crate::ir::Shape(vec![rows, k]),
        },
        &[sa],
        r,
    )?;
    let sm = add(g, Op::MatMul, &[sr, w], m)?;
    let sy = add(
        g,
        Op::Reshape {
            shape: crate::ir::Shape(out_shape),
        },
        &[sm],
        y,
    )?;
    if g.node(sy).ty == g.node(id).ty {
        return Some(sy);
    }
    discard(g, vec![sa, sr, sm, sy]);
    None
}
