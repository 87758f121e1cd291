//! The verifier, run after every pass: it re-derives everything insertion guarantees, so that
//! unchecked edits ([`Graph::node_mut`], [`Graph::set_operands`]) cannot go unnoticed.
//!
//! Checks: declared dimensions are distinct identifiers; the graph is acyclic; operand
//! positions are `0..n`; every node's stored type equals the type inferred from its operands
//! (or passes the source check); every dimension is declared; outputs exist; input names,
//! parameter paths and output names are unique.

use std::collections::HashSet;

use super::error::IrError;
use super::graph::{Graph, NodeId};
use super::infer::{check_source, infer};
use super::op::Op;
use super::text::is_ident;
use super::types::TensorType;

/// A broken invariant of a graph.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The node lies on or after a cycle.
    #[error("node {} ({op}) is on a cycle", .node.index())]
    Cycle {
        /// The node.
        node: NodeId,
        /// Its op's name.
        op: &'static str,
    },
    /// The operand edges are not numbered `0..n`.
    #[error("node {} ({op}) has operand positions {positions:?}, expected 0..{}", .node.index(), .positions.len())]
    OperandPositions {
        /// The node.
        node: NodeId,
        /// Its op's name.
        op: &'static str,
        /// The positions found, sorted.
        positions: Vec<u32>,
    },
    /// The node's op rejects its operands or its given type.
    #[error("node {} ({}): {error}", .node.index(), .node_op)]
    Invalid {
        /// The node.
        node: NodeId,
        /// Its op's name.
        node_op: &'static str,
        /// The typing error.
        error: IrError,
    },
    /// The stored type differs from the inferred one.
    #[error("node {} ({op}) has type {stored}, but its operands give {inferred}", .node.index())]
    TypeMismatch {
        /// The node.
        node: NodeId,
        /// Its op's name.
        op: &'static str,
        /// The type stored on the node.
        stored: TensorType,
        /// The type inferred from the operands.
        inferred: TensorType,
    },
    /// A type mentions a dimension missing from `Graph::dims`.
    #[error("node {} ({op}) has type {ty}, whose dimension `{symbol}` is not declared", .node.index())]
    UndeclaredDim {
        /// The node.
        node: NodeId,
        /// Its op's name.
        op: &'static str,
        /// The node's type.
        ty: TensorType,
        /// The undeclared symbol.
        symbol: String,
    },
    /// An output names a node that is not in the graph.
    #[error("output \"{name}\" names node {}, which is not in the graph", .node.index())]
    MissingOutput {
        /// The output's name.
        name: String,
        /// The missing node.
        node: NodeId,
    },
    /// A declared dimension is not an identifier, so it would not read back.
    #[error("declared dimension `{0}` is not an identifier")]
    BadDimName(String),
    /// A name that must be unique is not.
    #[error("{kind} \"{name}\" is declared twice")]
    Duplicate {
        /// `dimension`, `input`, `parameter` or `output`.
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
}

/// Checks every invariant of `graph`, reporting all broken ones.
pub fn verify(graph: &Graph) -> Result<(), Vec<VerifyError>> {
    let mut errors = Vec::new();
    let ordered: HashSet<NodeId> = graph.topo_order().into_iter().collect();
    let declared: HashSet<&str> = graph.dims.iter().map(String::as_str).collect();
    let mut dims = Names::new("dimension");
    for name in &graph.dims {
        if !is_ident(name) {
            errors.push(VerifyError::BadDimName(name.clone()));
        }
        dims.add(name, &mut errors);
    }
    let mut inputs = Names::new("input");
    let mut params = Names::new("parameter");
    for id in graph.node_ids() {
        let node = graph.node(id);
        let op = node.op.name();
        if !ordered.contains(&id) {
            errors.push(VerifyError::Cycle { node: id, op });
        }
        let positions = graph.operand_positions(id);
        if positions.iter().zip(0u32..).any(|(&p, i)| p != i) {
            errors.push(VerifyError::OperandPositions {
                node: id,
                op,
                positions,
            });
        }
        errors.extend(check_type(graph, id));
        for symbol in node.ty.shape.iter().flat_map(|d| d.symbols()) {
            if !declared.contains(symbol) {
                errors.push(VerifyError::UndeclaredDim {
                    node: id,
                    op,
                    ty: node.ty.clone(),
                    symbol: symbol.to_string(),
                });
                break;
            }
        }
        match &node.op {
            Op::Input { name } => inputs.add(name, &mut errors),
            Op::Param { path, .. } => params.add(path, &mut errors),
            _ => {}
        }
    }
    let mut outputs = Names::new("output");
    for (name, id) in &graph.outputs {
        outputs.add(name, &mut errors);
        if !graph.contains(*id) {
            errors.push(VerifyError::MissingOutput {
                name: name.clone(),
                node: *id,
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The stored type of `id` against its op's typing rule.
fn check_type(graph: &Graph, id: NodeId) -> Option<VerifyError> {
    let node = graph.node(id);
    let node_op = node.op.name();
    let invalid = |error| VerifyError::Invalid {
        node: id,
        node_op,
        error,
    };
    if node.op.is_source() && graph.operands(id).is_empty() {
        return check_source(&node.op, &node.ty).err().map(invalid);
    }
    let operands = graph.operands(id);
    let types: Vec<&TensorType> = operands.iter().map(|&o| &graph.node(o).ty).collect();
    match infer(&node.op, &types) {
        Err(error) => Some(invalid(error)),
        Ok(inferred) if inferred != node.ty => Some(VerifyError::TypeMismatch {
            node: id,
            op: node_op,
            stored: node.ty.clone(),
            inferred,
        }),
        Ok(_) => None,
    }
}

/// Names seen so far of one kind, reporting repeats.
struct Names<'a> {
    kind: &'static str,
    seen: HashSet<&'a str>,
}

impl<'a> Names<'a> {
    fn new(kind: &'static str) -> Names<'a> {
        Names {
            kind,
            seen: HashSet::new(),
        }
    }

    fn add(&mut self, name: &'a str, errors: &mut Vec<VerifyError>) {
        if !self.seen.insert(name) {
            errors.push(VerifyError::Duplicate {
                kind: self.kind,
                name: name.to_string(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::dim::Dim;
    use crate::ir::op::{BinaryOp, Init, UnaryOp};
    use crate::ir::types::DType;

    fn t(text: &str) -> TensorType {
        TensorType::parse(text).expect("test type parses")
    }

    /// `x: f32[B, 4]`, `y = neg(x)`, `z = add(y, x)`, output `z`.
    fn small() -> (Graph, [NodeId; 3]) {
        let mut g = Graph::new("small");
        g.dims = vec!["B".into()];
        let x = g
            .add_source(Op::Input { name: "x".into() }, t("f32[B, 4]"), "")
            .expect("x");
        let y = g.add(Op::Unary(UnaryOp::Neg), &[x], "").expect("y");
        let z = g.add(Op::Binary(BinaryOp::Add), &[y, x], "").expect("z");
        g.set_output("z", z).expect("output");
        (g, [x, y, z])
    }

    fn messages(graph: &Graph) -> Vec<String> {
        match verify(graph) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_built_graph_verifies() {
        assert_eq!(verify(&small().0), Ok(()));
    }

    #[test]
    fn catches_a_corrupted_type() {
        let (mut g, [_, y, _]) = small();
        g.node_mut(y).ty = t("f32[B, 5]");
        assert_eq!(
            messages(&g),
            vec![
                "node 1 (neg) has type f32[B, 5], but its operands give f32[B, 4]",
                "node 2 (add): add: shapes differ: f32[B, 5] vs f32[B, 4] (binary ops do not broadcast; expand first)",
            ]
        );
    }

    #[test]
    fn catches_a_cycle_and_wrong_arity() {
        let (mut g, [x, y, z]) = small();
        g.set_operands(y, &[z]);
        let errors = messages(&g);
        assert!(errors.contains(&"node 1 (neg) is on a cycle".to_string()));
        assert!(errors.contains(&"node 2 (add) is on a cycle".to_string()));
        g.set_operands(y, &[x, x]);
        assert_eq!(
            messages(&g),
            vec!["node 1 (neg): neg: expected 1 operand, found 2"]
        );
    }

    #[test]
    fn catches_undeclared_dims_outputs_and_duplicates() {
        let (mut g, [x, _, z]) = small();
        g.dims = vec!["b-1".into(), "b-1".into()];
        g.outputs.push(("z".into(), NodeId::new(40)));
        let w = g
            .add_source(
                Op::Param {
                    path: "w".into(),
                    init: Init::zeros(),
                },
                TensorType::new(DType::F32, vec![Dim::c(4)]),
                "",
            )
            .expect("w");
        g.node_mut(x).op = Op::Param {
            path: "w".into(),
            init: Init::zeros(),
        };
        assert!(g.contains(w) && g.contains(z));
        assert_eq!(
            messages(&g),
            vec![
                "declared dimension `b-1` is not an identifier",
                "declared dimension `b-1` is not an identifier",
                "dimension \"b-1\" is declared twice",
                "node 0 (param) has type f32[B, 4], whose dimension `B` is not declared",
                "node 1 (neg) has type f32[B, 4], whose dimension `B` is not declared",
                "node 2 (add) has type f32[B, 4], whose dimension `B` is not declared",
                "parameter \"w\" is declared twice",
                "output \"z\" is declared twice",
                "output \"z\" names node 40, which is not in the graph",
            ]
        );
    }
}
