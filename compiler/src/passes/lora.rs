//! LoRA: adding adapters to linear layers, and the LoRA-merge pass that folds them away.
//!
//! [`apply`] rewrites each targeted linear layer `y = x·Wᵀ` into
//! `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with new parameters `<layer>.lora_A.weight` `[r, in]`
//! (kaiming-uniform) and `<layer>.lora_B.weight` `[out, r]` (zeros), `s = alpha / r`
//! (`alpha / sqrt(r)` for rsLoRA), as PEFT does.
//!
//! For training, [`apply_with_dropout`] applies PEFT's LoRA dropout to the adapter branch's
//! input only: `y = x·Wᵀ + s·((x ⊙ mask)·Aᵀ)·Bᵀ`. The mask is a graph input
//! (`lora_dropout.<layer>`, the type of `x`) holding `0` or `1 / (1 - p)` (inverted dropout):
//! the driver draws it per step, so a compiled step serves every step and the masks are a
//! function of (seed, step) that a resumed run reproduces. Inference and merging never drop.
//!
//! [`LoraMerge`] rewrites `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` into `x·(W + s·B·A)ᵀ`. The merged weight depends
//! only on parameters, so it is computed once when the weights are loaded: per run, the merged
//! model costs exactly what the base model costs.

use super::{Pass, PassError};
use crate::ir::{BinaryOp, Dim, Graph, Init, NodeId, Op, TensorType};

/// How adapters are added.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub rslora: bool,
}

impl LoraConfig {
    /// The scale applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

fn err(message: impl Into<String>) -> PassError {
    PassError {
        pass: "lora",
        message: message.into(),
    }
}

/// The `matmul(x, permute(W))` nodes of the linear layer whose weight is `param`.
fn linear_matmuls(g: &Graph, weight: NodeId) -> Vec<(NodeId, NodeId)> {
    let mut out = Vec::new();
    for t in g.users(weight) {
        if !matches!(&g.node(t).op, Op::Permute { perm } if perm == &[1, 0]) {
            continue;
        }
        for m in g.users(t) {
            let ops = g.operands(m);
            if matches!(g.node(m).op, Op::MatMul) && ops.len() == 2 && ops[1] == t {
                out.push((m, ops[0]));
            }
        }
    }
    out
}

fn dim(g: &Graph, id: NodeId, axis: usize) -> Dim {
    g.node(id).ty.shape.0[axis].clone()
}

/// Adds a LoRA adapter to each module in `targets` (paths of linear layers). Returns how many
/// matmuls were adapted.
pub fn apply(g: &mut Graph, targets: &[String], cfg: &LoraConfig) -> Result<usize, PassError> {
    apply_with_dropout(g, targets, cfg, 0.0)
}

/// The prefix of the dropout-mask inputs that [`apply_with_dropout`] adds.
pub const DROPOUT_INPUT: &str = "lora_dropout.";

/// The name of the dropout-mask input of the `k`-th use of the linear layer `target`:
/// `lora_dropout.<target>` (and `lora_dropout.<target>.use<k>` for later uses of a shared
/// weight).
pub fn dropout_input(target: &str, k: usize) -> String {
    if k == 0 {
        format!("{DROPOUT_INPUT}{target}")
    } else {
        format!("{DROPOUT_INPUT}{target}.use{k}")
    }
}

/// [`apply`] with LoRA dropout of probability `dropout` on the adapter branch's input (for
/// training): each adapted matmul reads a mask input named by [`dropout_input`], of the type
/// of its `x`, that multiplies `x` before `Aᵀ`. `dropout = 0` adds no input and no op: the
/// graph is exactly [`apply`]'s.
pub fn apply_with_dropout(
    g: &mut Graph,
    targets: &[String],
    cfg: &LoraConfig,
    dropout: f64,
) -> Result<usize, PassError> {
    if cfg.rank <= 0 {
        return Err(err(format!("rank must be positive, got {}", cfg.rank)));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(err(format!("dropout must be in [0, 1), got {dropout}")));
    }
    let mut adapted = 0;
    for target in targets {
        let w = g
            .param(&format!("{target}.weight"))
            .ok_or_else(|| err(format!("`{target}` has no `weight` parameter")))?;
        let wty = g.node(w).ty.clone();
        if wty.rank() != 2 {
            return Err(err(format!(
                "`{target}.weight` is {wty}, not a linear weight"
            )));
        }
        let (out_dim, in_dim) = (dim(g, w, 0), dim(g, w, 1));
        let uses = linear_matmuls(g, w);
        if uses.is_empty() {
            return Err(err(format!(
                "`{target}` is not used as a linear layer (x @ weight.T)"
            )));
        }
        let r = Dim::c(cfg.rank);
        let a = g
            .add_source(
                Op::Param {
                    path: format!("{target}.lora_A.weight"),
                    init: Init::new("kaiming_uniform", &[("a", 5f64.sqrt())]),
                },
                TensorType::new(wty.dtype, vec![r.clone(), in_dim]),
                target,
            )
            .map_err(|e| err(e.to_string()))?;
        let b = g
            .add_source(
                Op::Param {
                    path: format!("{target}.lora_B.weight"),
                    init: Init::zeros(),
                },
                TensorType::new(wty.dtype, vec![out_dim, r]),
                target,
            )
            .map_err(|e| err(e.to_string()))?;
        let scope = format!("{target}.lora");
        let at = g
            .add(Op::Permute { perm: vec![1, 0] }, &[a], &scope)
            .map_err(|e| err(e.to_string()))?;
        let bt = g
            .add(Op::Permute { perm: vec![1, 0] }, &[b], &scope)
            .map_err(|e| err(e.to_string()))?;
        for (k, (m, x)) in uses.into_iter().enumerate() {
            let x = if dropout > 0.0 {
                let mask = g
                    .add_source(
                        Op::Input {
                            name: dropout_input(target, k),
                        },
                        g.node(x).ty.clone(),
                        &scope,
                    )
                    .map_err(|e| err(e.to_string()))?;
                g.add(Op::Binary(BinaryOp::Mul), &[x, mask], &scope)
                    .map_err(|e| err(e.to_string()))?
            } else {
                x
            };
            let xa = g
                .add(Op::MatMul, &[x, at], &scope)
                .map_err(|e| err(e.to_string()))?;
            let xab = g
                .add(Op::MatMul, &[xa, bt], &scope)
                .map_err(|e| err(e.to_string()))?;
            let s = g
                .add_source(
                    Op::Const { value: cfg.scale() },
                    g.node(xab).ty.clone(),
                    &scope,
                )
                .map_err(|e| err(e.to_string()))?;
            let scaled = g
                .add(Op::Binary(BinaryOp::Mul), &[xab, s], &scope)
                .map_err(|e| err(e.to_string()))?;
            let y = g
                .add(Op::Binary(BinaryOp::Add), &[m, scaled], &scope)
                .map_err(|e| err(e.to_string()))?;
            g.replace_uses(m, y);
            adapted += 1;
        }
    }
    Ok(adapted)
}

/// Folds LoRA adapters into their base weights.
pub struct LoraMerge;

/// The parts of `add(matmul(x, permute(W)), mul(matmul(matmul(x, permute(A)), permute(B)), s))`.
struct Adapted {
    base: NodeId,
    x: NodeId,
    w: NodeId,
    a: NodeId,
    b: NodeId,
    scale: NodeId,
}

fn transposed(g: &Graph, id: NodeId) -> Option<NodeId> {
    match &g.node(id).op {
        Op::Permute { perm } if perm == &[1, 0] => g.operands(id).first().copied(),
        _ => None,
    }
}

fn matmul_parts(g: &Graph, id: NodeId) -> Option<(NodeId, NodeId)> {
    if !matches!(g.node(id).op, Op::MatMul) {
        return None;
    }
    let ops = g.operands(id);
    Some((ops[0], ops[1]))
}

fn match_adapted(g: &Graph, id: NodeId) -> Option<Adapted> {
    if !matches!(g.node(id).op, Op::Binary(BinaryOp::Add)) {
        return None;
    }
    let ops = g.operands(id);
    let (base, scaled) = (ops[0], ops[1]);
    let (x, wt) = matmul_parts(g, base)?;
    let w = transposed(g, wt)?;
    if !matches!(g.node(scaled).op, Op::Binary(BinaryOp::Mul)) {
        return None;
    }
    let sops = g.operands(scaled);
    let (xab, scale) = (sops[0], sops[1]);
    if !matches!(g.node(scale).op, Op::Const { .. }) {
        return None;
    }
    let (xa, bt) = matmul_parts(g, xab)?;
    let (x2, at) = matmul_parts(g, xa)?;
    if x2 != x {
        return None;
    }
    let (a, b) = (transposed(g, at)?, transposed(g, bt)?);
    let params = [w, a, b]
        .iter()
        .all(|&p| matches!(g.node(p).op, Op::Param { .. }));
    params.then_some(Adapted {
        base,
        x,
        w,
        a,
        b,
        scale,
    })
}

impl Pass for LoraMerge {
    fn name(&self) -> &'static str {
        "lora-merge"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, PassError> {
        let mut changed = false;
        for id in g.topo_order() {
            if !g.contains(id) {
                continue;
            }
            let Some(m) = match_adapted(g, id) else {
                continue;
            };
            let scope = g.node(m.w).scope.clone();
            let e = |e: crate::ir::IrError| err(e.to_string());
            // W' = W + s·(B·A): parameters only, so computed once at load time.
            let ba = g.add(Op::MatMul, &[m.b, m.a], &scope).map_err(e)?;
            let Op::Const { value } = g.node(m.scale).op else {
                continue;
            };
            let s = g
                .add_source(Op::Const { value }, g.node(ba).ty.clone(), &scope)
                .map_err(e)?;
            let delta = g
                .add(Op::Binary(BinaryOp::Mul), &[ba, s], &scope)
                .map_err(e)?;
            let merged = g
                .add(Op::Binary(BinaryOp::Add), &[m.w, delta], &scope)
                .map_err(e)?;
            let mt = g
                .add(Op::Permute { perm: vec![1, 0] }, &[merged], &scope)
                .map_err(e)?;
            let base_scope = g.node(m.base).scope.clone();
            let y = g.add(Op::MatMul, &[m.x, mt], &base_scope).map_err(e)?;
            g.replace_uses(id, y);
            g.remove(id);
            changed = true;
        }
        if changed {
            // The old products are dead now.
            super::Dce.run(g)?;
        }
        Ok(changed)
    }
}
