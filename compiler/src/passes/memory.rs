//! Memory planning: every value a kernel writes for another gets a region of one arena;
//! values whose lifetimes do not overlap share memory. Lifetimes run from the producing kernel
//! to the last consuming kernel (outputs live to the end). Placement is greedy: each value, in
//! order of size, takes the lowest offset that no overlapping-lifetime value occupies.
//!
//! Sizes and offsets are computed in 128-bit arithmetic with overflow checks, so the figures at
//! huge dims (`--dims B=100000,T=100000`) are exact, or missing when even that overflows;
//! never wrapped or saturated.

use super::fusion::FusionPlan;
use crate::ir::{Graph, NodeId};
use std::collections::HashMap;

/// Where each materialised value lives.
#[derive(Clone, Debug, Default)]
pub struct MemoryPlan {
    /// Byte offset and size of each value in the arena (when [`MemoryPlan::fits`]).
    pub slots: HashMap<NodeId, (usize, usize)>,
    /// The arena size in bytes: the planned peak; `None` when a size or an offset at these
    /// dims overflows 128-bit arithmetic.
    pub peak: Option<u128>,
    /// The sum of all value sizes: the peak without reuse (`None` likewise).
    pub naive: Option<u128>,
}

impl MemoryPlan {
    /// Whether the plan can be laid out in this machine's address space: every offset and size
    /// of `slots` is then exact.
    pub fn fits(&self) -> bool {
        self.peak.is_some_and(|p| usize::try_from(p).is_ok())
    }
}

/// Bytes per element as the runtime stores activations: every dtype in a 4-byte slot (f32,
/// i32, and bool as i32), so one arena offset works for all of them.
pub const SLOT_BYTES: usize = 4;

/// Plans the buffers of `fusion` with the symbolic dims bound to `dims` (unbound ones: 1).
pub fn plan(graph: &Graph, fusion: &FusionPlan, dims: &HashMap<String, i64>) -> MemoryPlan {
    let size_of = |id: NodeId| -> Option<u128> { value_bytes(graph, id, dims) };
    let n_groups = fusion.groups.len();
    let is_output: Vec<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    // (value, first kernel, last kernel, bytes)
    let mut values: Vec<(NodeId, usize, usize, u128)> = Vec::new();
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
            let Some(size) = size_of(v) else {
                return MemoryPlan::default();
            };
            values.push((v, g, last, size));
        }
    }
    let naive = values.iter().try_fold(0u128, |acc, v| acc.checked_add(v.3));
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(values[i].3), values[i].1));
    let mut placed: Vec<(usize, usize, u128, u128)> = Vec::new(); // (start, end, offset, size)
    let mut slots = HashMap::new();
    let mut peak = Some(0u128);
    for i in order {
        let (v, start, end, size) = values[i];
        // Every placed value ends at most at the peak so far, which fits (else it is `None`).
        let mut conflicts: Vec<(u128, u128)> = placed
            .iter()
            .filter(|p| p.0 <= end && start <= p.1)
            .map(|p| (p.2, p.2 + p.3))
            .collect();
        conflicts.sort();
        let mut offset = 0u128;
        for (lo, hi) in conflicts {
            if offset.checked_add(size).is_some_and(|e| e <= lo) {
                break;
            }
            offset = offset.max(hi);
        }
        let Some(end_byte) = offset.checked_add(size) else {
            return MemoryPlan {
                slots: HashMap::new(),
                peak: None,
                naive,
            };
        };
        placed.push((start, end, offset, size));
        // Beyond `usize` the offsets mean nothing (`fits` is false); they are not used then.
        let at = |x: u128| usize::try_from(x).unwrap_or(usize::MAX);
        slots.insert(v, (at(offset), at(size)));
        peak = peak.map(|p| p.max(end_byte));
    }
    MemoryPlan { slots, peak, naive }
}

/// The bytes of a value at `dims` (unbound dims: 1; negative sizes: 0), exactly, or `None` on
/// overflow of 128-bit arithmetic.
pub fn value_bytes(graph: &Graph, id: NodeId, dims: &HashMap<String, i64>) -> Option<u128> {
    let n = numel(&graph.node(id).ty.shape.0, dims)?;
    n.checked_mul(SLOT_BYTES as u128)
}

/// The number of elements of a shape at `dims` (unbound dims: 1; negative sizes: 0), exactly,
/// or `None` on overflow of 128-bit arithmetic.
pub fn numel(shape: &[crate::ir::Dim], dims: &HashMap<String, i64>) -> Option<u128> {
    let sizes: Vec<u128> = shape
        .iter()
        .map(|d| {
            let v = d.eval_i128(&|s| Some(dims.get(s).copied().unwrap_or(1)))?;
            Some(u128::try_from(v).unwrap_or(0))
        })
        .collect::<Option<_>>()?;
    if sizes.contains(&0) {
        return Some(0);
    }
    sizes.iter().try_fold(1u128, |acc, &d| acc.checked_mul(d))
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
