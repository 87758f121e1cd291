//! Dead-code elimination: removes every node no output depends on (parameters included: an
//! unused weight is not loaded).

use super::{Pass, PassError};
use crate::ir::Graph;
use std::collections::HashSet;

/// Removes nodes that do not reach an output.
pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, graph: &mut Graph) -> Result<bool, PassError> {
        let mut live = HashSet::new();
        let mut stack: Vec<_> = graph.outputs.iter().map(|(_, id)| *id).collect();
        while let Some(id) = stack.pop() {
            if live.insert(id) {
                stack.extend(graph.operands(id));
            }
        }
        let dead: Vec<_> = graph
            .topo_order()
            .into_iter()
            .rev()
            .filter(|id| !live.contains(id))
            .collect();
        let mut changed = false;
        for id in dead {
            changed |= graph.remove(id).is_some();
        }
        Ok(changed)
    }
}
