//! Memory planning: every value a kernel writes for another gets a region of one arena;
//! values whose lifetimes do not overlap share memory. Lifetimes run from the producing kernel
//! to the last consuming kernel (outputs live to the end). Placement is greedy: each value, in
//! order of size, takes the lowest offset that no overlapping-lifetime value occupies.

use super::fusion::FusionPlan;
use crate::ir::{Graph, NodeId};
use std::collections::HashMap;

/// Where each materialised value lives.
#[derive(Clone, Debug, Default)]
pub struct MemoryPlan {
    /// Byte offset and size of each value in the arena.
    pub slots: HashMap<NodeId, (usize, usize)>,
    /// The arena size: the planned peak.
    pub peak: usize,
    /// The sum of all value sizes: the peak without reuse.
    pub naive: usize,
}

/// Bytes per element as the runtime stores activations: every dtype in a 4-byte slot (f32,
/// i32, and bool as i32), so one arena offset works for all of them.
pub const SLOT_BYTES: usize = 4;

/// Plans the buffers of `fusion` with the symbolic dims bound to `dims` (unbound ones: 1).
pub fn plan(graph: &Graph, fusion: &FusionPlan, dims: &HashMap<String, i64>) -> MemoryPlan {
    let size_of = |id: NodeId| -> usize {
        let n = graph.node(id).ty.shape.0.iter().fold(1i64, |acc, d| {
            acc.saturating_mul(
                d.eval(&|s| Some(dims.get(s).copied().unwrap_or(1)))
                    .unwrap_or(0)
                    .max(0),
            )
        });
        (n as usize).saturating_mul(SLOT_BYTES)
    };
    let n_groups = fusion.groups.len();
    let is_output: Vec<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    // (value, first kernel, last kernel, bytes)
    let mut values: Vec<(NodeId, usize, usize, usize)> = Vec::new();
    for (g, grp) in fusion.groups.iter().enumerate() {
        for &v in &grp.outputs {
            // The last kernel that reads v, directly or through cheap views.
            let mut last = g;
            let mut stack = graph.users(v);
            while let Some(u) = stack.pop() {
                match fusion.group_of.get(&u) {
                    Some(&h) => last = last.max(h),
                    None if fusion.cheap.contains(&u) => stack.extend(graph.users(u)),
                    None => {}
                }
            }
            if is_output.contains(&v) || reaches_output(graph, fusion, v) {
                last = n_groups;
            }
            values.push((v, g, last, size_of(v)));
        }
    }
    let naive = values.iter().map(|v| v.3).sum();
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(values[i].3), values[i].1));
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // (start, end, offset, size)
    let mut slots = HashMap::new();
    let mut peak = 0;
    for i in order {
        let (v, start, end, size) = values[i];
        let mut conflicts: Vec<(usize, usize)> = placed
            .iter()
            .filter(|p| p.0 <= end && start <= p.1)
            .map(|p| (p.2, p.2 + p.3))
            .collect();
        conflicts.sort();
        let mut offset = 0;
        for (lo, hi) in conflicts {
            if offset + size <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        placed.push((start, end, offset, size));
        slots.insert(v, (offset, size));
        peak = peak.max(offset + size);
    }
    MemoryPlan { slots, peak, naive }
}

/// Whether an output names `v` through cheap views.
fn reaches_output(graph: &Graph, fusion: &FusionPlan, v: NodeId) -> bool {
    let outs: Vec<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    let mut stack = graph.users(v);
    while let Some(u) = stack.pop() {
        if outs.contains(&u) {
            return true;
        }
        if fusion.cheap.contains(&u) {
            stack.extend(graph.users(u));
        }
    }
    false
}
