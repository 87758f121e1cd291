//! Common-subexpression elimination: two nodes with the same op, attributes, operands and type
//! compute the same value; later ones are replaced by the first. Random ops are never merged.

use super::{Pass, PassError};
use crate::ir::{text::op_text, Graph, NodeId, Op};
use std::collections::HashMap;

/// Merges identical computations.
pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, graph: &mut Graph) -> Result<bool, PassError> {
        let mut seen: HashMap<String, NodeId> = HashMap::new();
        let mut changed = false;
        for id in graph.topo_order() {
            let node = graph.node(id);
            if matches!(
                node.op,
                Op::Random { .. } | Op::Input { .. } | Op::Param { .. }
            ) {
                continue;
            }
            let operands: Vec<String> = graph
                .operands(id)
                .iter()
                .map(|o| format!("{}", o.index()))
                .collect();
            let key = format!("{} : {}", op_text(&node.op, &operands), node.ty);
            match seen.get(&key) {
                Some(&first) => {
                    graph.replace_uses(id, first);
                    graph.remove(id);
                    changed = true;
                }
                None => {
                    seen.insert(key, id);
                }
            }
        }
        Ok(changed)
    }
}
