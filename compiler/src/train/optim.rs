//! The optimiser update as graph code, appended after the backward graph so that one step is
//! one graph: gradient clipping by global norm, then AdamW / Adam / SGD with momentum, exactly
//! as PyTorch's single-tensor implementations order their operations.
//!
//! Inputs it adds: `lr` and `step` (f32 scalars: the learning rate of this step and the
//! 1-based step count for Adam's bias correction) and one input per state slot and parameter,
//! `optim.<slot>.<path>`. Outputs: `param.<path>` (the new value), `optim.<slot>.<path>`
//! (the new state) and `grad_norm` (the global gradient norm before clipping).

use super::config::{Optimizer, OptimizerKind};
use crate::ir::{BinaryOp, DType, Graph, NodeId, Op, TensorType, UnaryOp};
use crate::passes::emit::Emit;
use crate::passes::PassError;

/// A parameter to update: its path, its node and its gradient.
pub struct Updated {
    pub path: String,
    pub param: NodeId,
    pub grad: NodeId,
}

/// Appends the update of every parameter in `items`; `clamp` limits the new value of the
/// parameters whose last path segment is named (`logit_scale` for CLIP).
pub fn append_update(
    g: &mut Graph,
    items: &[Updated],
    opt: &Optimizer,
    clip_grad: Option<f64>,
    clamp: &[(&str, f64, f64)],
) -> Result<(), PassError> {
    let scalar = TensorType::new(DType::F32, vec![]);
    let mut e = Emit::new(g, "optimizer", "optimizer");
    let lr = e.source(Op::Input { name: "lr".into() }, scalar.clone())?;
    let step = e.source(
        Op::Input {
            name: "step".into(),
        },
        scalar.clone(),
    )?;
    // Global norm: sqrt(sum over parameters of sum(g^2)), accumulated in f32.
    let mut total = e.constant(0.0, scalar.clone())?;
    let mut grads: Vec<NodeId> = Vec::new();
    for it in items {
        let gr = e.cast(it.grad, DType::F32)?;
        let sq = e.mul(gr, gr)?;
        let s = e.sum_all(sq)?;
        total = e.add(total, s)?;
        grads.push(it.grad);
    }
    let norm = e.un(UnaryOp::Sqrt, total)?;
    e.g.set_output("grad_norm", norm)
        .map_err(|x| e.err(x.to_string()))?;
    if let Some(max_norm) = clip_grad {
        // torch.nn.utils.clip_grad_norm_: coef = min(max_norm / (norm + 1e-6), 1)
        let eps = e.constant(1e-6, scalar.clone())?;
        let denom = e.add(norm, eps)?;
        let mx = e.constant(max_norm, scalar.clone())?;
        let coef = e.div(mx, denom)?;
        let one = e.constant(1.0, scalar.clone())?;
        let coef = e.bin(BinaryOp::Min, coef, one)?;
        for gr in grads.iter_mut() {
            let dt = e.ty(*gr).dtype;
            let c = e.cast(coef, dt)?;
            let c = e.broadcast_scalar(c, *gr)?;
            *gr = e.mul(*gr, c)?;
        }
    }
    // Scalars shared by every parameter.
    let c = |e: &mut Emit, v: f64| e.constant(v, TensorType::new(DType::F32, vec![]));
    let (bc1, bc2) = match opt.kind {
        OptimizerKind::AdamW | OptimizerKind::Adam => {
            let b1 = c(&mut e, opt.beta1)?;
            let b2 = c(&mut e, opt.beta2)?;
            let one = c(&mut e, 1.0)?;
            let p1 = e.bin(BinaryOp::Pow, b1, step)?;
            let p2 = e.bin(BinaryOp::Pow, b2, step)?;
            (Some(e.sub(one, p1)?), Some(e.sub(one, p2)?))
        }
        OptimizerKind::Sgd => (None, None),
    };
    for (it, &gr) in items.iter().zip(&grads) {
        e.scope = format!("optimizer.{}", it.path);
        let ty = e.ty(it.param);
        let state = |e: &mut Emit, slot: &str| {
            e.source(
                Op::Input {
                    name: format!("optim.{slot}.{}", it.path),
                },
                ty.clone(),
            )
        };
        let dt = ty.dtype;
        let bcast = |e: &mut Emit, s: NodeId| -> Result<NodeId, PassError> {
            let s = e.cast(s, dt)?;
            e.broadcast_scalar(s, it.param)
        };
        let gr = e.cast(gr, dt)?;
        let mut p = it.param;
        let mut outs: Vec<(String, NodeId)> = Vec::new();
        match opt.kind {
            OptimizerKind::AdamW | OptimizerKind::Adam => {
                let (bc1, bc2) = (bc1.expect("adam"), bc2.expect("adam"));
                if opt.kind == OptimizerKind::AdamW && opt.weight_decay != 0.0 {
                    // p *= 1 - lr * wd (decoupled weight decay, applied first)
                    let wd = c(&mut e, opt.weight_decay)?;
                    let lwd = e.mul(lr, wd)?;
                    let one = c(&mut e, 1.0)?;
                    let f = e.sub(one, lwd)?;
                    let f = bcast(&mut e, f)?;
                    p = e.mul(p, f)?;
                }
                let gr = if opt.kind == OptimizerKind::Adam && opt.weight_decay != 0.0 {
                    let wd = e.const_like(opt.weight_decay, p)?;
                    let d = e.mul(p, wd)?;
                    e.add(gr, d)?
                } else {
                    gr
                };
                let m = state(&mut e, "m")?;
                let v = state(&mut e, "v")?;
                // m = m + (g - m)(1 - b1)  (lerp);  v = b2 v + (1 - b2) g^2
                let d = e.sub(gr, m)?;
                let d = e.scale(d, 1.0 - opt.beta1)?;
                let m2 = e.add(m, d)?;
                let vb = e.scale(v, opt.beta2)?;
                let g2 = e.mul(gr, gr)?;
                let g2 = e.scale(g2, 1.0 - opt.beta2)?;
                let v2 = e.add(vb, g2)?;
                // p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
                let step_size = e.div(lr, bc1)?;
                let sbc2 = e.un(UnaryOp::Sqrt, bc2)?;
                let sv = e.un(UnaryOp::Sqrt, v2)?;
                let sbc2 = bcast(&mut e, sbc2)?;
                let den = e.div(sv, sbc2)?;
                let eps = e.const_like(opt.eps, den)?;
                let den = e.add(den, eps)?;
                let q = e.div(m2, den)?;
                let ss = bcast(&mut e, step_size)?;
                let upd = e.mul(q, ss)?;
                p = e.sub(p, upd)?;
                outs.push((format!("optim.m.{}", it.path), m2));
                outs.push((format!("optim.v.{}", it.path), v2));
            }
            OptimizerKind::Sgd => {
                let mut d = gr;
                if opt.weight_decay != 0.0 {
                    let wd = e.const_like(opt.weight_decay, p)?;
                    let x = e.mul(p, wd)?;
                    d = e.add(d, x)?;
                }
                if opt.momentum != 0.0 {
                    // buf = momentum * buf + g (PyTorch, dampening 0; buf starts at g, which
                    // equals this with a zero initial buffer)
                    let buf = state(&mut e, "m")?;
                    let mb = e.scale(buf, opt.momentum)?;
                    let nb = e.add(mb, d)?;
                    d = if opt.nesterov {
                        let x = e.scale(nb, opt.momentum)?;
                        e.add(d, x)?
                    } else {
                        nb
                    };
                    outs.push((format!("optim.m.{}", it.path), nb));
                }
                let l = bcast(&mut e, lr)?;
                let upd = e.mul(d, l)?;
                p = e.sub(p, upd)?;
            }
        }
        let last = it.path.rsplit('.').next().unwrap_or("");
        if let Some(&(_, lo, hi)) = clamp.iter().find(|(n, _, _)| *n == last) {
            let lo = e.const_like(lo, p)?;
            let hi = e.const_like(hi, p)?;
            let x = e.bin(BinaryOp::Max, p, lo)?;
            p = e.bin(BinaryOp::Min, x, hi)?;
        }
        outs.push((format!("param.{}", it.path), p));
        for (name, id) in outs {
            e.g.set_output(&name, id)
                .map_err(|x| e.err(x.to_string()))?;
        }
    }
    Ok(())
}
