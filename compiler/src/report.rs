//! `vlmc build --emit report`: parameters (trainable / frozen), FLOPs of one forward, kernels
//! before and after fusion, and planned peak memory next to the naive sum, at given sizes for
//! the symbolic dims.
//!
//! Every figure is computed exactly in 128-bit integers with overflow checks, so a report at
//! huge sizes (`--dims B=100000,T=100000`) prints the right large numbers; a figure that does
//! not fit even there is an error ([`ReportError`]), never a wrapped or saturated value.

use crate::ir::{Graph, NodeId, Op, OpKind};
use crate::passes::{fusion::FusionPlan, memory::MemoryPlan};
use std::collections::HashMap;
use std::fmt::Write;

/// The figures of one compiled model.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub params_trainable: u128,
    pub params_frozen: u128,
    pub flops: u128,
    pub load_time_flops: u128,
    pub ops: usize,
    pub kernels_unfused: usize,
    pub kernels: usize,
    pub peak_bytes: u128,
    pub naive_bytes: u128,
}

/// A figure of the report that overflows 128-bit arithmetic at the given sizes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ReportError {
    pub message: String,
}

/// The sizes as text: `B=8, T=128`.
fn dims_text(dims: &HashMap<String, i64>) -> String {
    let mut d: Vec<String> = dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    d.sort();
    d.join(", ")
}

/// Elements of a node's value at `dims` (unbound dims: 1).
fn size(g: &Graph, id: NodeId, dims: &HashMap<String, i64>) -> Option<u128> {
    crate::passes::memory::numel(&g.node(id).ty.shape.0, dims)
}

/// FLOPs of one op: 2·M·N·K for a matmul, one per input element for a reduction or a
/// scatter-add, one per
/// output element for other arithmetic; views and sources are free. `None` on overflow.
fn op_flops(g: &Graph, id: NodeId, dims: &HashMap<String, i64>) -> Option<u128> {
    let node = g.node(id);
    match node.op.kind() {
        OpKind::Contraction => {
            let a = g.operands(id)[0];
            let k = match g.node(a).ty.shape.0.last() {
                Some(d) => d.eval_i128(&|s| Some(dims.get(s).copied().unwrap_or(1)))?,
                None => 1,
            };
            let k = u128::try_from(k).unwrap_or(0);
            size(g, id, dims)?.checked_mul(k)?.checked_mul(2)
        }
        OpKind::Reduction | OpKind::Scatter => size(g, g.operands(id)[0], dims),
        OpKind::Elementwise => size(g, id, dims),
        _ => Some(0),
    }
}

/// Computes the report. `trainable`: parameter paths that train (all when `None`). A figure
/// that overflows 128-bit arithmetic at `dims` is an error that names it.
pub fn report(
    graph: &Graph,
    fusion: &FusionPlan,
    memory: &MemoryPlan,
    trainable: Option<&[String]>,
    dims: &HashMap<String, i64>,
) -> Result<Report, ReportError> {
    let overflow = |what: String| ReportError {
        message: format!(
            "{what} overflows 128-bit arithmetic at {}",
            match dims_text(dims) {
                d if d.is_empty() => "the model's fixed sizes".to_string(),
                d => d,
            }
        ),
    };
    let add = |acc: u128, n: Option<u128>, what: &dyn Fn() -> String| {
        n.and_then(|n| acc.checked_add(n))
            .ok_or_else(|| overflow(what()))
    };
    let (mut tr, mut fr) = (0u128, 0u128);
    for (id, path, _, _) in graph.params() {
        let n = size(graph, id, dims);
        let what = || format!("the parameter count (at `{path}`)");
        match trainable {
            Some(t) if !t.iter().any(|p| p == path) => fr = add(fr, n, &what)?,
            _ => tr = add(tr, n, &what)?,
        }
    }
    let (mut flops, mut load) = (0u128, 0u128);
    for id in graph.node_ids() {
        let f = op_flops(graph, id, dims);
        let what = || {
            let node = graph.node(id);
            format!("the FLOP count (at {} {})", node.op.name(), node.ty)
        };
        if fusion.load_time.contains(&id) {
            load = add(load, f, &what)?;
        } else {
            flops = add(flops, f, &what)?;
        }
    }
    let peak_bytes = memory
        .peak
        .ok_or_else(|| overflow("the planned activation memory".into()))?;
    let naive_bytes = memory
        .naive
        .ok_or_else(|| overflow("the naive activation memory".into()))?;
    Ok(Report {
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
        peak_bytes,
        naive_bytes,
    })
}

/// A count in SI units: `950`, `1.5 k`, `23.13 G`, `48.00 P (48000000000000000)`; from 10^12
/// on, the exact number follows in parentheses.
pub fn human(n: u128) -> String {
    const UNITS: [(u32, &str); 8] = [
        (24, "Y"),
        (21, "Z"),
        (18, "E"),
        (15, "P"),
        (12, "T"),
        (9, "G"),
        (6, "M"),
        (3, "k"),
    ];
    for (exp, unit) in UNITS {
        let scale = 10u128.pow(exp);
        if n >= scale {
            let x = n as f64 / scale as f64;
            return match exp {
                3 => format!("{x:.1} {unit}"),
                6 | 9 => format!("{x:.2} {unit}"),
                _ => format!("{x:.2} {unit} ({n})"),
            };
        }
    }
    n.to_string()
}

impl Report {
    /// The report as text, with the sizes it was computed at.
    pub fn text(&self, model: &str, dims: &HashMap<String, i64>) -> String {
        let d = dims_text(dims);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "model {model} at {}",
            if d.is_empty() {
                "its fixed sizes".into()
            } else {
                d
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
            human(self.peak_bytes),
            human(self.naive_bytes),
            self.naive_bytes as f64 / self.peak_bytes.max(1) as f64
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn counts_print_in_si_units_with_exact_large_values() {
        assert_eq!(human(0), "0");
        assert_eq!(human(999), "999");
        assert_eq!(human(1_500), "1.5 k");
        assert_eq!(human(22_570_000), "22.57 M");
        assert_eq!(human(23_130_000_000), "23.13 G");
        assert_eq!(human(48_000_000_000_000_123), "48.00 P (48000000000000123)");
        assert_eq!(
            human(u128::MAX),
            format!("340282366920938.50 Y ({})", u128::MAX)
        );
    }
}
