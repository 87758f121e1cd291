//! Precision changes over a whole graph. [`PromoteF64`] turns every f32 value into an f64 one,
//! so that a whole model can be gradient-checked by finite differences in double precision
//! (the interpreter computes f64 nodes without rounding).

use super::{Pass, PassError};
use crate::ir::{DType, Graph, Op};

/// Every f32 node (and every `cast` to f32) becomes f64; f16/bf16 casts stay as they are.
pub struct PromoteF64;

impl Pass for PromoteF64 {
    fn name(&self) -> &'static str {
        "promote-f64"
    }

    fn run(&self, g: &mut Graph) -> Result<bool, PassError> {
        Ok(promote_f64(g))
    }
}

/// Changes every f32 node of `g` to f64 (parameters and inputs included: the interpreter
/// widens f32 tensors fed to them). Returns whether anything changed. The result verifies:
/// every op's typing rule is independent of which float type it works on.
pub fn promote_f64(g: &mut Graph) -> bool {
    let mut changed = false;
    for id in g.node_ids() {
        let node = g.node_mut(id);
        if node.ty.dtype == DType::F32 {
            node.ty.dtype = DType::F64;
            changed = true;
        }
        if let Op::Cast { dtype } = &mut node.op {
            if *dtype == DType::F32 {
                *dtype = DType::F64;
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, BinaryOp, TensorType};

    #[test]
    fn promotes_every_f32_node_and_verifies() {
        let mut g = Graph::new("g");
        g.dims = vec!["B".into()];
        let t = |s: &str| TensorType::parse(s).expect("type");
        let x = g
            .add_source(Op::Input { name: "x".into() }, t("i32[B, 4]"), "")
            .expect("input");
        let c = g
            .add(Op::Cast { dtype: DType::F32 }, &[x], "")
            .expect("cast");
        let h = g
            .add(Op::Cast { dtype: DType::BF16 }, &[c], "")
            .expect("cast");
        let y = g.add(Op::Binary(BinaryOp::Mul), &[c, c], "").expect("mul");
        g.set_output("y", y).expect("output");
        g.set_output("h", h).expect("output");
        assert!(PromoteF64.run(&mut g).expect("runs"));
        verify(&g).expect("verifies");
        assert_eq!(g.node(y).ty, t("f64[B, 4]"));
        assert_eq!(g.node(h).ty, t("bf16[B, 4]"));
        assert_eq!(g.node(x).ty, t("i32[B, 4]"));
        assert!(!PromoteF64.run(&mut g).expect("runs"));
    }
}
