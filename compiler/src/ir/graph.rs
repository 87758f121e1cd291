//! The graph: nodes holding an op, its result type and its scope, with edges from operands.
//!
//! Nodes are inserted through [`Graph::add_source`] and [`Graph::add`], which type-check as they
//! go, so a graph built that way is well typed and acyclic. The few editing methods for passes
//! ([`Graph::node_mut`], [`Graph::set_operands`], [`Graph::replace_uses`]) are unchecked; the
//! verifier runs after every pass.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;

use super::error::IrError;
use super::infer::{check_source, infer};
use super::op::{Init, Op};
use super::types::TensorType;

/// The identity of a node; stable across removals of other nodes.
pub type NodeId = NodeIndex;

/// One operation in the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// The type of its result.
    pub ty: TensorType,
    /// The block-instance path it came from, e.g. `vision.layers.0.self_attn`; may be empty.
    pub scope: String,
}

/// A typed dataflow graph of primitive ops, with named inputs, parameters and outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The graph's name, e.g. the model's.
    pub name: String,
    /// The declared symbolic dimensions, in order.
    pub dims: Vec<String>,
    /// Nodes, with one edge per operand weighted by the operand's position.
    g: StableDiGraph<Node, u32>,
    /// Named results, in declaration order.
    pub outputs: Vec<(String, NodeId)>,
    /// Parameter nodes by path, for uniqueness and lookup.
    params_by_path: HashMap<String, NodeId>,
    /// Input nodes by name, for uniqueness and lookup.
    inputs_by_name: HashMap<String, NodeId>,
}

impl Graph {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Graph {
        Graph {
            name: name.to_string(),
            ..Graph::default()
        }
    }

    /// Inserts a source op (input, param, const, iota, random) with its given type.
    pub fn add_source(&mut self, op: Op, ty: TensorType, scope: &str) -> Result<NodeId, IrError> {
        check_source(&op, &ty)?;
        match &op {
            Op::Param { path, .. } if self.param(path).is_some() => {
                return Err(IrError::DuplicateParam(path.clone()));
            }
            Op::Input { name } if self.input(name).is_some() => {
                return Err(IrError::DuplicateInput(name.clone()));
            }
            _ => {}
        }
        let key = match &op {
            Op::Param { path, .. } => Some((true, path.clone())),
            Op::Input { name } => Some((false, name.clone())),
            _ => None,
        };
        let id = self.insert(op, ty, scope, &[]);
        match key {
            Some((true, path)) => self.params_by_path.insert(path, id),
            Some((false, name)) => self.inputs_by_name.insert(name, id),
            None => None,
        };
        Ok(id)
    }

    /// Inserts an op applied to `operands`, inferring its result type.
    pub fn add(&mut self, op: Op, operands: &[NodeId], scope: &str) -> Result<NodeId, IrError> {
        if let Some(&missing) = operands.iter().find(|&&id| !self.contains(id)) {
            return Err(IrError::UnknownNode(missing));
        }
        let types: Vec<&TensorType> = operands.iter().map(|&id| &self.g[id].ty).collect();
        let ty = infer(&op, &types)?;
        Ok(self.insert(op, ty, scope, operands))
    }

    fn insert(&mut self, op: Op, ty: TensorType, scope: &str, operands: &[NodeId]) -> NodeId {
        let scope = scope.to_string();
        let id = self.g.add_node(Node { op, ty, scope });
        for (index, &operand) in (0u32..).zip(operands) {
            self.g.add_edge(operand, id, index);
        }
        id
    }

    /// Whether `id` is a node of this graph.
    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id)
    }

    /// The node `id`; panics if it is not in the graph.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    /// The node `id` for editing, unchecked: run the verifier afterwards. Renaming an input or
    /// parameter here is not seen by [`Graph::input`] and [`Graph::param`].
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    /// The operands of `id`, in operand order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort_unstable();
        edges.into_iter().map(|(_, source)| source).collect()
    }

    /// The operand positions of `id`'s incoming edges, sorted (the verifier checks they are
    /// `0..n`).
    pub(crate) fn operand_positions(&self, id: NodeId) -> Vec<u32> {
        let mut positions: Vec<u32> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| *e.weight())
            .collect();
        positions.sort_unstable();
        positions
    }

    /// The nodes that use `id` as an operand, sorted, each once.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .g
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    /// All node ids, in increasing order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.g.node_indices().collect();
        ids.sort_unstable();
        ids
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Nodes with operands before users, taking the smallest ready id first (Kahn's algorithm),
    /// so the order is deterministic. Nodes on or after a cycle are left out.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let mut waiting = vec![0usize; self.g.node_bound()];
        let mut ready = BinaryHeap::new();
        for id in self.g.node_indices() {
            waiting[id.index()] = self.g.edges_directed(id, Direction::Incoming).count();
            if waiting[id.index()] == 0 {
                ready.push(Reverse(id));
            }
        }
        let mut order = Vec::with_capacity(self.len());
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for edge in self.g.edges_directed(id, Direction::Outgoing) {
                let user = edge.target();
                waiting[user.index()] -= 1;
                if waiting[user.index()] == 0 {
                    ready.push(Reverse(user));
                }
            }
        }
        order
    }

    /// Names `id` as the output `name`.
    pub fn set_output(&mut self, name: &str, id: NodeId) -> Result<(), IrError> {
        if !self.contains(id) {
            return Err(IrError::UnknownNode(id));
        }
        if self.output(name).is_some() {
            return Err(IrError::DuplicateOutput(name.to_string()));
        }
        self.outputs.push((name.to_string(), id));
        Ok(())
    }

    /// The node of the output `name`.
    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }

    /// The parameter node with checkpoint path `path`.
    pub fn param(&self, path: &str) -> Option<NodeId> {
        let id = *self.params_by_path.get(path)?;
        let current = self.g.node_weight(id).map(|n| &n.op);
        matches!(current, Some(Op::Param { path: p, .. }) if p == path).then_some(id)
    }

    /// The input node named `name`.
    pub fn input(&self, name: &str) -> Option<NodeId> {
        let id = *self.inputs_by_name.get(name)?;
        let current = self.g.node_weight(id).map(|n| &n.op);
        matches!(current, Some(Op::Input { name: n }) if n == name).then_some(id)
    }

    /// All parameters as `(id, path, type, init)`, in id order.
    pub fn params(&self) -> Vec<(NodeId, &str, &TensorType, &Init)> {
        self.node_ids()
            .into_iter()
            .filter_map(|id| match &self.g[id] {
                Node {
                    op: Op::Param { path, init },
                    ty,
                    ..
                } => Some((id, path.as_str(), ty, init)),
                _ => None,
            })
            .collect()
    }

    /// All inputs as `(id, name, type)`, in id order.
    pub fn inputs(&self) -> Vec<(NodeId, &str, &TensorType)> {
        self.node_ids()
            .into_iter()
            .filter_map(|id| match &self.g[id] {
                Node {
                    op: Op::Input { name },
                    ty,
                    ..
                } => Some((id, name.as_str(), ty)),
                _ => None,
            })
            .collect()
    }

    /// Replaces the operands of `id`, unchecked: run the verifier afterwards.
    pub fn set_operands(&mut self, id: NodeId, operands: &[NodeId]) {
        let old: Vec<_> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| e.id())
            .collect();
        for edge in old {
            self.g.remove_edge(edge);
        }
        for (index, &operand) in (0u32..).zip(operands) {
            self.g.add_edge(operand, id, index);
        }
    }

    /// Makes every user of `from` (other than `to` itself) and every output naming it use `to`.
    pub fn replace_uses(&mut self, from: NodeId, to: NodeId) {
        let edges: Vec<_> = self
            .g
            .edges_directed(from, Direction::Outgoing)
            .filter(|e| e.target() != to)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (edge, user, index) in edges {
            self.g.remove_edge(edge);
            self.g.add_edge(to, user, index);
        }
        for (_, id) in &mut self.outputs {
            if *id == from {
                *id = to;
            }
        }
    }

    /// Removes `id` if nothing uses it and no output names it; returns the removed node.
    pub fn remove(&mut self, id: NodeId) -> Option<Node> {
        let used = !self.users(id).is_empty() || self.outputs.iter().any(|&(_, o)| o == id);
        if used {
            return None;
        }
        let node = self.g.remove_node(id)?;
        match &node.op {
            Op::Param { path, .. } if self.params_by_path.get(path) == Some(&id) => {
                self.params_by_path.remove(path);
            }
            Op::Input { name } if self.inputs_by_name.get(name) == Some(&id) => {
                self.inputs_by_name.remove(name);
            }
            _ => {}
        }
        Some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::{BinaryOp, UnaryOp};
    use crate::ir::types::DType;

    fn t(text: &str) -> TensorType {
        TensorType::parse(text).expect("test type parses")
    }

    fn input(g: &mut Graph, name: &str, ty: &str) -> NodeId {
        let op = Op::Input {
            name: name.to_string(),
        };
        g.add_source(op, t(ty), "").expect("input inserts")
    }

    #[test]
    fn insertion_infers_types_and_keeps_operand_order() {
        let mut g = Graph::new("g");
        let x = input(&mut g, "x", "f32[B, 4]");
        let y = input(&mut g, "y", "f32[B, 4]");
        let sub = g.add(Op::Binary(BinaryOp::Sub), &[y, x], "s").expect("sub");
        assert_eq!(g.node(sub).ty, t("f32[B, 4]"));
        assert_eq!(g.node(sub).scope, "s");
        assert_eq!(g.operands(sub), vec![y, x]);
        let sq = g
            .add(Op::Binary(BinaryOp::Mul), &[sub, sub], "")
            .expect("mul");
        assert_eq!(g.operands(sq), vec![sub, sub]);
        assert_eq!(g.users(sub), vec![sq]);
        assert_eq!(g.len(), 4);
    }

    #[test]
    fn insertion_rejects_bad_types_and_duplicates() {
        let mut g = Graph::new("g");
        let x = input(&mut g, "x", "f32[B, 4]");
        let err = g.add(Op::Unary(UnaryOp::Not), &[x], "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "not: expected a bool operand, found f32[B, 4]"
        );
        let dup = g.add_source(Op::Input { name: "x".into() }, t("f32[]"), "");
        assert_eq!(dup, Err(IrError::DuplicateInput("x".into())));
        let param = |path: &str| Op::Param {
            path: path.into(),
            init: Init::zeros(),
        };
        g.add_source(param("w"), t("f32[4]"), "").expect("param");
        let dup = g.add_source(param("w"), t("f32[4]"), "").unwrap_err();
        assert_eq!(dup.to_string(), "parameter \"w\" is declared twice");
        g.set_output("y", x).expect("output");
        assert_eq!(
            g.set_output("y", x),
            Err(IrError::DuplicateOutput("y".into()))
        );
        let gone = NodeId::new(99);
        assert_eq!(
            g.add(Op::Unary(UnaryOp::Neg), &[gone], ""),
            Err(IrError::UnknownNode(gone))
        );
    }

    #[test]
    fn topo_order_takes_smallest_ready_first() {
        let mut g = Graph::new("g");
        let a = input(&mut g, "a", "f32[2]");
        let neg = g.add(Op::Unary(UnaryOp::Neg), &[a], "").expect("neg");
        let b = input(&mut g, "b", "f32[2]");
        let sum = g
            .add(Op::Binary(BinaryOp::Add), &[b, neg], "")
            .expect("add");
        assert_eq!(g.topo_order(), vec![a, neg, b, sum]);
        g.remove(sum).expect("unused node removes");
        assert_eq!(g.topo_order(), vec![a, neg, b]);
        assert!(g.remove(a).is_none(), "a is still used");
    }

    #[test]
    fn lookups_and_lists() {
        let mut g = Graph::new("g");
        let x = input(&mut g, "x", "i32[T]");
        let w = g
            .add_source(
                Op::Param {
                    path: "emb.weight".into(),
                    init: Init::normal(0.02),
                },
                t("f32[V, 8]"),
                "emb",
            )
            .expect("param");
        assert_eq!(g.input("x"), Some(x));
        assert_eq!(g.param("emb.weight"), Some(w));
        assert_eq!(g.params().len(), 1);
        assert_eq!(g.params()[0].1, "emb.weight");
        assert_eq!(g.inputs(), vec![(x, "x", &t("i32[T]"))]);
        let cast = g
            .add(Op::Cast { dtype: DType::F32 }, &[x], "")
            .expect("cast");
        let neg = g.add(Op::Unary(UnaryOp::Neg), &[cast], "").expect("neg");
        let abs = g.add(Op::Unary(UnaryOp::Abs), &[cast], "").expect("abs");
        g.set_output("out", neg).expect("output");
        g.replace_uses(neg, abs);
        assert_eq!(g.output("out"), Some(abs));
        assert!(g.remove(neg).is_some());
    }
}
