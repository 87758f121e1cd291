//! `vlmc build --emit report`: parameters (trainable / frozen), FLOPs of one forward, kernels
//! before and after fusion, and planned peak memory next to the naive sum, at given sizes for
//! the symbolic dims.

use crate::ir::{Graph, Op, OpKind};
use crate::passes::{fusion::FusionPlan, memory::MemoryPlan};
use std::collections::HashMap;
use std::fmt::Write;

/// The figures of one compiled model.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub params_trainable: u64,
    pub params_frozen: u64,
    pub flops: u64,
    pub load_time_flops: u64,
    pub ops: usize,
    pub kernels_unfused: usize,
    pub kernels: usize,
    pub peak_bytes: usize,
    pub naive_bytes: usize,
}

fn size(g: &Graph, id: crate::ir::NodeId, dims: &HashMap<String, i64>) -> u64 {
    g.node(id).ty.shape.0.iter().fold(1u64, |acc, d| {
        acc.saturating_mul(
            d.eval(&|s| Some(dims.get(s).copied().unwrap_or(1)))
                .unwrap_or(0)
                .max(0) as u64,
        )
    })
}

/// FLOPs of one op: 2·M·N·K for a matmul, one per input element for a reduction or a
/// scatter-add, one per
/// output element for other arithmetic; views and sources are free.
fn op_flops(g: &Graph, id: crate::ir::NodeId, dims: &HashMap<String, i64>) -> u64 {
    let node = g.node(id);
    match node.op.kind() {
        OpKind::Contraction => {
            let a = g.operands(id)[0];
            let k = g
                .node(a)
                .ty
                .shape
                .0
                .last()
                .and_then(|d| d.eval(&|s| Some(dims.get(s).copied().unwrap_or(1))))
                .unwrap_or(1);
            2 * size(g, id, dims) * k.max(0) as u64
        }
        OpKind::Reduction | OpKind::Scatter => size(g, g.operands(id)[0], dims),
        OpKind::Elementwise => size(g, id, dims),
        _ => 0,
    }
}

/// Computes the report. `trainable`: parameter paths that train (all when `None`).
pub fn report(
    graph: &Graph,
    fusion: &FusionPlan,
    memory: &MemoryPlan,
    trainable: Option<&[String]>,
    dims: &HashMap<String, i64>,
) -> Report {
    let (mut tr, mut fr) = (0, 0);
    for (id, path, _, _) in graph.params() {
        let n = size(graph, id, dims);
        match trainable {
            Some(t) if !t.iter().any(|p| p == path) => fr += n,
            _ => tr += n,
        }
    }
    let (mut flops, mut load) = (0, 0);
    for id in graph.node_ids() {
        let f = op_flops(graph, id, dims);
        if fusion.load_time.contains(&id) {
            load += f;
        } else {
            flops += f;
        }
    }
    Report {
        params_trainable: tr,
        params_frozen: fr,
        flops,
        load_time_flops: load,
        ops: graph
            .node_ids()
            .iter()
            .filter(|id| !matches!(graph.node(**id).op, Op::Param { .. } | Op::Input { .. }))
            .count(),
        kernels_unfused: fusion.unfused_kernels(),
        kernels: fusion.groups.len(),
        peak_bytes: memory.peak,
        naive_bytes: memory.naive,
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl Report {
    /// The report as text, with the sizes it was computed at.
    pub fn text(&self, model: &str, dims: &HashMap<String, i64>) -> String {
        let mut d: Vec<String> = dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
        d.sort();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "model {model} at {}",
            if d.is_empty() {
                "its fixed sizes".into()
            } else {
                d.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "parameters: {} trainable, {} frozen",
            human(self.params_trainable),
            human(self.params_frozen)
        );
        let _ = writeln!(
            out,
            "FLOPs per forward: {} (plus {} once at load time)",
            human(self.flops),
            human(self.load_time_flops)
        );
        let _ = writeln!(
            out,
            "ops: {}; kernels: {} unfused -> {} fused",
            self.ops, self.kernels_unfused, self.kernels
        );
        let _ = writeln!(
            out,
            "activation memory: planned peak {} B, naive sum {} B ({:.1}x less)",
            human(self.peak_bytes as u64),
            human(self.naive_bytes as u64),
            self.naive_bytes as f64 / self.peak_bytes.max(1) as f64
        );
        out
    }
}
