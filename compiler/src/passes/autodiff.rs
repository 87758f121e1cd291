//! Reverse-mode automatic differentiation as a graph-to-graph rewrite.
//!
//! [`backward`] appends to a graph the vector-Jacobian products that carry the gradient of a
//! loss back to chosen parameters. Each primitive has one rule ([`vjp`]), written with the
//! existing primitive ops, so the backward graph is an ordinary graph: it is verified,
//! simplified, fused, planned and run like any forward.
//!
//! What is differentiated: the *active* nodes, those with a float type that depend on one of
//! the chosen parameters and that the loss depends on. Everything else (frozen parameters and
//! the branches that only lead to them, i32/bool values, index arithmetic) gets no gradient and
//! no backward ops, so DCE drops whatever activations only they would have needed. A value
//! with several users receives one contribution from each, summed with `add` in reverse
//! topological order (deterministic).
//!
//! Conventions where the derivative is not unique: `abs` has gradient 0 at 0; `maximum` and
//! `minimum` split the gradient evenly at ties (as PyTorch does); `reduce_max` divides it
//! evenly among the positions holding the maximum (as `torch.amax`); `floor`, comparisons,
//! `mod`'s divisor path through `floor` and casts to integers carry none.

use super::emit::Emit;
use super::{Pass, PassError};
use crate::ir::{BinaryOp, Dim, Graph, NodeId, Op, ReduceOp, UnaryOp};
use std::collections::{HashMap, HashSet};

const PASS: &str = "autodiff";

fn err(message: impl Into<String>) -> PassError {
    PassError {
        pass: PASS,
        message: message.into(),
    }
}

/// The pass form: differentiates the output `loss` with respect to the parameters `params`
/// (paths) and adds an output `grad.<path>` for each.
pub struct Autodiff {
    pub loss: String,
    pub params: Vec<String>,
}

impl Pass for Autodiff {
    fn name(&self) -> &'static str {
        PASS
    }

    fn run(&self, g: &mut Graph) -> Result<bool, PassError> {
        let loss = g
            .output(&self.loss)
            .ok_or_else(|| err(format!("the graph has no output `{}`", self.loss)))?;
        let grads = gradients(g, loss, &self.params)?;
        for (path, grad) in grads {
            g.set_output(&format!("grad.{path}"), grad)
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(true)
    }
}

/// The gradients of `loss` with respect to the parameters at `paths`, in that order, as new
/// nodes of `g` (a parameter the loss does not depend on gets a zero constant).
pub fn gradients(
    g: &mut Graph,
    loss: NodeId,
    paths: &[String],
) -> Result<Vec<(String, NodeId)>, PassError> {
    let mut wrt = Vec::new();
    for p in paths {
        let id = g
            .param(p)
            .ok_or_else(|| err(format!("the graph has no parameter `{p}`")))?;
        wrt.push(id);
    }
    let grads = backward(g, loss, &wrt, None)?;
    Ok(paths.iter().cloned().zip(grads).collect())
}

/// Appends the backward graph of `loss` (any float node; a non-scalar loss is summed, i.e.
/// seeded with ones, unless `seed` gives the output gradient) with respect to the nodes `wrt`,
/// and returns one gradient node per entry of `wrt`, with its type.
pub fn backward(
    g: &mut Graph,
    loss: NodeId,
    wrt: &[NodeId],
    seed: Option<NodeId>,
) -> Result<Vec<NodeId>, PassError> {
    let lty = g.node(loss).ty.clone();
    if !lty.dtype.is_float() {
        return Err(err(format!("the loss must be a float value, found {lty}")));
    }
    let order = g.topo_order();
    // Forward reachability from the differentiated nodes, through float values only.
    let targets: HashSet<NodeId> = wrt.iter().copied().collect();
    let mut from_wrt: HashSet<NodeId> = HashSet::new();
    for &id in &order {
        if !g.node(id).ty.dtype.is_float() {
            continue;
        }
        if targets.contains(&id) || g.operands(id).iter().any(|o| from_wrt.contains(o)) {
            from_wrt.insert(id);
        }
    }
    // Backward reachability from the loss.
    let mut to_loss: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![loss];
    while let Some(id) = stack.pop() {
        if to_loss.insert(id) {
            stack.extend(g.operands(id));
        }
    }
    let active = |id: NodeId| from_wrt.contains(&id) && to_loss.contains(&id);

    let mut contributions: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let mut done: HashMap<NodeId, NodeId> = HashMap::new();
    if active(loss) {
        let seed = match seed {
            Some(s) => {
                if g.node(s).ty != lty {
                    return Err(err(format!(
                        "the seed is {}, but the loss is {lty}",
                        g.node(s).ty
                    )));
                }
                s
            }
            None => g
                .add_source(Op::Const { value: 1.0 }, lty.clone(), "")
                .map_err(|e| err(e.to_string()))?,
        };
        contributions.insert(loss, vec![seed]);
    }
    for &id in order.iter().rev() {
        if !active(id) {
            continue;
        }
        let Some(parts) = contributions.remove(&id) else {
            continue;
        };
        let scope = g.node(id).scope.clone();
        let mut e = Emit::new(g, PASS, &scope);
        let mut total = parts[0];
        for &p in &parts[1..] {
            total = e.add(total, p)?;
        }
        done.insert(id, total);
        let operands = e.g.operands(id);
        let want: Vec<bool> = operands.iter().map(|&o| active(o)).collect();
        if !want.iter().any(|&w| w) {
            continue;
        }
        let grads = vjp(&mut e, id, &operands, &want, total)?;
        for ((o, w), gr) in operands.iter().zip(&want).zip(grads) {
            if let (true, Some(gr)) = (w, gr) {
                contributions.entry(*o).or_default().push(gr);
            }
        }
    }
    let mut out = Vec::new();
    for &w in wrt {
        match done.get(&w) {
            Some(&gr) => out.push(gr),
            None => {
                let ty = g.node(w).ty.clone();
                let scope = g.node(w).scope.clone();
                out.push(
                    g.add_source(Op::Const { value: 0.0 }, ty, &scope)
                        .map_err(|e| err(e.to_string()))?,
                );
            }
        }
    }
    Ok(out)
}

type Grads = Vec<Option<NodeId>>;

/// The vector-Jacobian product of node `y`: for each operand with `want[i]`, the gradient
/// contribution `gy · ∂y/∂x_i` (or `None` where it is zero).
fn vjp(
    e: &mut Emit,
    y: NodeId,
    xs: &[NodeId],
    want: &[bool],
    gy: NodeId,
) -> Result<Grads, PassError> {
    let op = e.g.node(y).op.clone();
    Ok(match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Const { .. }
        | Op::Iota { .. }
        | Op::Random { .. } => Vec::new(),
        Op::Unary(u) => vec![unary(e, u, y, xs[0], gy)?],
        Op::Binary(b) => binary(e, b, y, xs[0], xs[1], want, gy)?,
        Op::Select => {
            let zero = e.const_like(0.0, gy)?;
            let a = if want[1] {
                Some(e.select(xs[0], gy, zero)?)
            } else {
                None
            };
            let b = if want[2] {
                Some(e.select(xs[0], zero, gy)?)
            } else {
                None
            };
            vec![None, a, b]
        }
        Op::Reduce { op, axis } => {
            let shape = e.shape(xs[0]).0;
            let back = e.expand(gy, shape.clone())?;
            match op {
                ReduceOp::Sum => vec![Some(back)],
                ReduceOp::Max => {
                    let m = e.expand(y, shape)?;
                    let hit = e.bin(BinaryOp::Eq, xs[0], m)?;
                    let dt = e.ty(xs[0]).dtype;
                    let mask = e.cast(hit, dt)?;
                    let count = e.sum(mask, axis)?;
                    let share = e.div(gy, count)?;
                    let share = e.expand(share, e.shape(xs[0]).0)?;
                    vec![Some(e.mul(share, mask)?)]
                }
            }
        }
        Op::MatMul => {
            let a = if want[0] {
                let bt = e.transpose(xs[1])?;
                Some(e.matmul(gy, bt)?)
            } else {
                None
            };
            let b = if want[1] {
                let at = e.transpose(xs[0])?;
                Some(e.matmul(at, gy)?)
            } else {
                None
            };
            vec![a, b]
        }
        // gather and scatter-add are each other's transpose.
        Op::Gather { axis } => {
            let size = e.shape(xs[0])[axis].clone();
            vec![
                Some(e.op(Op::ScatterAdd { axis, size }, &[gy, xs[1]])?),
                None,
            ]
        }
        Op::ScatterAdd { axis, .. } => vec![Some(e.op(Op::Gather { axis }, &[gy, xs[1]])?), None],
        Op::StopGradient => vec![None],
        Op::Reshape { .. } => {
            let shape = e.shape(xs[0]).0;
            vec![Some(e.reshape(gy, shape)?)]
        }
        Op::Permute { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![Some(e.permute(gy, inv)?)]
        }
        Op::Expand { shape } => {
            let from = e.shape(xs[0]);
            let mut g = gy;
            for (axis, (f, t)) in from.iter().zip(shape.iter()).enumerate() {
                if f != t {
                    g = e.sum(g, axis)?;
                }
            }
            vec![Some(g)]
        }
        Op::Slice {
            axis,
            start,
            end,
            step,
        } => vec![Some(slice_grad(e, xs[0], axis, &start, &end, step, gy)?)],
        Op::Concat { axis } => {
            let mut out = Vec::new();
            let mut offset = Dim::c(0);
            for (&x, &w) in xs.iter().zip(want) {
                let size = e.shape(x)[axis].clone();
                let end = offset
                    .checked_add(&size)
                    .ok_or_else(|| err("dimension overflow"))?;
                out.push(if w {
                    Some(e.op(
                        Op::Slice {
                            axis,
                            start: offset.clone(),
                            end: end.clone(),
                            step: 1,
                        },
                        &[gy],
                    )?)
                } else {
                    None
                });
                offset = end;
            }
            out
        }
        Op::Pad { axis, before, .. } => {
            let size = e.shape(xs[0])[axis].clone();
            let end = before
                .checked_add(&size)
                .ok_or_else(|| err("dimension overflow"))?;
            vec![Some(e.op(
                Op::Slice {
                    axis,
                    start: before,
                    end,
                    step: 1,
                },
                &[gy],
            )?)]
        }
        Op::Cast { .. } => {
            let from = e.ty(xs[0]).dtype;
            if from.is_float() && e.ty(y).dtype.is_float() {
                vec![Some(e.cast(gy, from)?)]
            } else {
                vec![None]
            }
        }
    })
}

fn unary(
    e: &mut Emit,
    u: UnaryOp,
    y: NodeId,
    x: NodeId,
    gy: NodeId,
) -> Result<Option<NodeId>, PassError> {
    let out = match u {
        UnaryOp::Neg => e.neg(gy)?,
        UnaryOp::Abs => {
            // sign(x), with sign(0) = 0.
            let zero = e.const_like(0.0, x)?;
            let one = e.const_like(1.0, x)?;
            let minus = e.const_like(-1.0, x)?;
            let pos = e.bin(BinaryOp::Gt, x, zero)?;
            let neg = e.bin(BinaryOp::Lt, x, zero)?;
            let s = e.select(neg, minus, zero)?;
            let s = e.select(pos, one, s)?;
            e.mul(gy, s)?
        }
        UnaryOp::Exp => e.mul(gy, y)?,
        UnaryOp::Log => e.div(gy, x)?,
        UnaryOp::Sqrt => {
            // g / (2 sqrt(x))
            let two_y = e.scale(y, 2.0)?;
            e.div(gy, two_y)?
        }
        UnaryOp::Rsqrt => {
            // d x^(-1/2) = -1/2 x^(-3/2) = -1/2 y^3
            let y2 = e.mul(y, y)?;
            let y3 = e.mul(y2, y)?;
            let d = e.scale(y3, -0.5)?;
            e.mul(gy, d)?
        }
        UnaryOp::Recip => {
            let y2 = e.mul(y, y)?;
            let d = e.neg(y2)?;
            e.mul(gy, d)?
        }
        UnaryOp::Tanh => {
            let y2 = e.mul(y, y)?;
            let one = e.const_like(1.0, y)?;
            let d = e.sub(one, y2)?;
            e.mul(gy, d)?
        }
        UnaryOp::Erf => {
            // 2/sqrt(pi) exp(-x^2)
            let x2 = e.mul(x, x)?;
            let nx2 = e.neg(x2)?;
            let ex = e.un(UnaryOp::Exp, nx2)?;
            let d = e.scale(ex, std::f64::consts::FRAC_2_SQRT_PI)?;
            e.mul(gy, d)?
        }
        UnaryOp::Sin => {
            let c = e.un(UnaryOp::Cos, x)?;
            e.mul(gy, c)?
        }
        UnaryOp::Cos => {
            let s = e.un(UnaryOp::Sin, x)?;
            let ns = e.neg(s)?;
            e.mul(gy, ns)?
        }
        UnaryOp::Floor | UnaryOp::Not => return Ok(None),
    };
    Ok(Some(out))
}

fn binary(
    e: &mut Emit,
    b: BinaryOp,
    y: NodeId,
    x0: NodeId,
    x1: NodeId,
    want: &[bool],
    gy: NodeId,
) -> Result<Grads, PassError> {
    let (wa, wb) = (want[0], want[1]);
    Ok(match b {
        BinaryOp::Add => vec![Some(gy), Some(gy)],
        BinaryOp::Sub => vec![Some(gy), if wb { Some(e.neg(gy)?) } else { None }],
        BinaryOp::Mul => vec![
            if wa { Some(e.mul(gy, x1)?) } else { None },
            if wb { Some(e.mul(gy, x0)?) } else { None },
        ],
        BinaryOp::Div => {
            let a = if wa { Some(e.div(gy, x1)?) } else { None };
            let b = if wb {
                // -g a / b^2 = -g y / b
                let gyy = e.mul(gy, y)?;
                let q = e.div(gyy, x1)?;
                Some(e.neg(q)?)
            } else {
                None
            };
            vec![a, b]
        }
        BinaryOp::Pow => {
            let a = if wa {
                // g b a^(b-1)
                let one = e.const_like(1.0, x1)?;
                let bm1 = e.sub(x1, one)?;
                let p = e.bin(BinaryOp::Pow, x0, bm1)?;
                let d = e.mul(x1, p)?;
                Some(e.mul(gy, d)?)
            } else {
                None
            };
            let b = if wb {
                // g y ln(a), taken as 0 where a == 0 (as PyTorch does for b >= 0).
                let ln = e.un(UnaryOp::Log, x0)?;
                let gyy = e.mul(gy, y)?;
                let d = e.mul(gyy, ln)?;
                let zero = e.const_like(0.0, x0)?;
                let at0 = e.bin(BinaryOp::Eq, x0, zero)?;
                let zg = e.const_like(0.0, gy)?;
                Some(e.select(at0, zg, d)?)
            } else {
                None
            };
            vec![a, b]
        }
        BinaryOp::Max | BinaryOp::Min => {
            // The share of the gradient that goes to `a`: 1 where a wins, 1/2 at ties, else 0.
            let wins = if b == BinaryOp::Max {
                BinaryOp::Gt
            } else {
                BinaryOp::Lt
            };
            let a_wins = e.bin(wins, x0, x1)?;
            let tie = e.bin(BinaryOp::Eq, x0, x1)?;
            let one = e.const_like(1.0, gy)?;
            let half = e.const_like(0.5, gy)?;
            let zero = e.const_like(0.0, gy)?;
            let share = e.select(tie, half, zero)?;
            let share = e.select(a_wins, one, share)?;
            let a = if wa { Some(e.mul(gy, share)?) } else { None };
            let b = if wb {
                let rest = e.sub(one, share)?;
                Some(e.mul(gy, rest)?)
            } else {
                None
            };
            vec![a, b]
        }
        BinaryOp::Mod => {
            // a mod b = a - b floor(a / b)
            let b = if wb {
                let q = e.div(x0, x1)?;
                let f = e.un(UnaryOp::Floor, q)?;
                let d = e.mul(gy, f)?;
                Some(e.neg(d)?)
            } else {
                None
            };
            vec![Some(gy), b]
        }
        BinaryOp::Eq
        | BinaryOp::Ne
        | BinaryOp::Lt
        | BinaryOp::Le
        | BinaryOp::Gt
        | BinaryOp::Ge
        | BinaryOp::And
        | BinaryOp::Or => vec![None, None],
    })
}

/// The gradient of a slice: `gy` put back at its positions, zeros elsewhere. With a step,
/// zeros are interleaved first (a new axis padded to the step, then flattened).
fn slice_grad(
    e: &mut Emit,
    x: NodeId,
    axis: usize,
    start: &Dim,
    end: &Dim,
    step: i64,
    gy: NodeId,
) -> Result<NodeId, PassError> {
    let n = e.shape(x)[axis].clone();
    let len = end
        .checked_sub(start)
        .ok_or_else(|| err("dimension overflow"))?;
    let mut g = gy;
    if step > 1 {
        let mut shape = e.shape(gy).0;
        let l = shape[axis].clone();
        shape.insert(axis + 1, Dim::c(1));
        let split = e.reshape(gy, shape)?;
        let padded = e.op(
            Op::Pad {
                axis: axis + 1,
                before: Dim::c(0),
                after: Dim::c(step - 1),
                value: 0.0,
            },
            &[split],
        )?;
        let mut flat = e.shape(gy).0;
        let spread = l
            .checked_mul(&Dim::c(step))
            .ok_or_else(|| err("dimension overflow"))?;
        flat[axis] = spread.clone();
        g = e.reshape(padded, flat)?;
        if spread != len {
            g = e.op(
                Op::Slice {
                    axis,
                    start: Dim::c(0),
                    end: len.clone(),
                    step: 1,
                },
                &[g],
            )?;
        }
    }
    let after = n
        .checked_sub(end)
        .ok_or_else(|| err("dimension overflow"))?;
    if start.as_const() == Some(0) && after.as_const() == Some(0) {
        return Ok(g);
    }
    e.op(
        Op::Pad {
            axis,
            before: start.clone(),
            after,
            value: 0.0,
        },
        &[g],
    )
}
