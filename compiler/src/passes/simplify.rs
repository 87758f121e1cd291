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
//!
//! The last two turn a weight gradient (autodiff's `transpose(xᵀ · dy)`, summed over the uses
//! of the weight) into products computed in the weight's own layout, so that nothing reads a
//! product transposed. The last one makes the gradient of a table gathered twice (a word
//! embedding applied to two batches) one scatter-add instead of two full-size tables and a sum.
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
        Op::Reshape { .. } | Op::Expand { .. } | Op::Permute { .. } | Op::Cast { .. } => vals[0],
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
