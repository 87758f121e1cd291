//! The printer of the IR text form, the contract of the IR: print, read, print is the identity.
//!
//! One op per line, nodes numbered `%0, %1, …` in [`Graph::topo_order`]:
//!
//! ```text
//! graph LlavaTiny
//! dims B, T
//! %0 = input "pixels" : f32[B, 3, 32, 32]
//! %1 = param "vision.proj.weight" init=normal(std=0.02) : f32[64, 192] @vision
//! %2 = slice(%0) axis=1 start=1 end=3 step=1 : f32[B, 2, 32, 32]
//! output "logits" = %2
//! ```
//!
//! The `dims` line is left out when there are none, ` @scope` when the scope is empty.
//! Attributes come in a fixed order per op; floats print so that they read back bit-exactly.

use std::collections::HashMap;
use std::fmt::{self, Write};

use super::graph::{Graph, NodeId};
use super::op::Op;

/// The text form of `graph`.
pub fn print(graph: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph {}", name_text(&graph.name));
    if !graph.dims.is_empty() {
        let _ = writeln!(out, "dims {}", graph.dims.join(", "));
    }
    let order = numbering(graph);
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let value = |id: NodeId| {
        number
            .get(&id)
            .map_or("%?".to_string(), |n| format!("%{n}"))
    };
    for (i, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        let operands: Vec<String> = graph.operands(id).into_iter().map(value).collect();
        let _ = write!(out, "%{i} = {} : {}", op_text(&node.op, &operands), node.ty);
        if !node.scope.is_empty() {
            let _ = write!(out, " @{}", scope_text(&node.scope));
        }
        out.push('\n');
    }
    for (name, id) in &graph.outputs {
        let _ = writeln!(out, "output {} = {}", quote(name), value(*id));
    }
    out
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&print(self))
    }
}

/// The print order: topological, then (only in a graph with a cycle) the remaining nodes.
pub(crate) fn numbering(graph: &Graph) -> Vec<NodeId> {
    let mut order = graph.topo_order();
    if order.len() < graph.len() {
        let placed: std::collections::HashSet<NodeId> = order.iter().copied().collect();
        order.extend(
            graph
                .node_ids()
                .into_iter()
                .filter(|id| !placed.contains(id)),
        );
    }
    order
}

/// An op with its operands and attributes, without the type: `slice(%4) axis=1 start=1 …`.
pub(crate) fn op_text(op: &Op, operands: &[String]) -> String {
    let head = match op {
        Op::Input { name } => return format!("input {}", quote(name)),
        Op::Param { path, init } => return format!("param {} init={init}", quote(path)),
        Op::Const { value } => return format!("const value={}", float_text(*value)),
        Op::Iota { axis } => return format!("iota axis={axis}"),
        Op::Random { dist, seed } => return format!("random dist={dist} seed={seed}"),
        _ => format!("{}({})", op.name(), operands.join(", ")),
    };
    let attrs = match op {
        Op::Reduce { axis, .. } | Op::Gather { axis } | Op::Concat { axis } => {
            format!(" axis={axis}")
        }
        Op::Reshape { shape } | Op::Expand { shape } => format!(" shape={shape}"),
        Op::Permute { perm } => format!(" perm={perm:?}"),
        Op::Slice {
            axis,
            start,
            end,
            step,
        } => format!(" axis={axis} start={start} end={end} step={step}"),
        Op::Pad {
            axis,
            before,
            after,
            value,
        } => format!(
            " axis={axis} before={before} after={after} value={}",
            float_text(*value)
        ),
        Op::Cast { dtype } => format!(" dtype={dtype}"),
        Op::ScatterAdd { axis, size } => format!(" axis={axis} size={size}"),
        _ => String::new(),
    };
    head + &attrs
}

/// A float that reads back bit-exactly: shortest round-trip digits, exponent form for very
/// small or large magnitudes, and `inf`, `-inf`, `nan`.
pub(crate) fn float_text(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e16) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// A string literal with `\"`, `\\`, `\n`, `\r` and `\t` escaped.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether `s` is an identifier: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `c` may appear in an unquoted scope path such as `vision.layers.0.self_attn`.
pub(crate) fn is_scope_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// The graph name, bare when it is an identifier.
fn name_text(name: &str) -> String {
    if is_ident(name) {
        name.to_string()
    } else {
        quote(name)
    }
}

/// A scope path, bare when it has only identifier characters and dots.
fn scope_text(scope: &str) -> String {
    if scope.chars().all(is_scope_char) {
        scope.to_string()
    } else {
        quote(scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip() {
        for x in [
            0.0,
            -0.0,
            1.0,
            0.02,
            0.9,
            -1.5,
            1e-5,
            1e-300,
            f64::MIN_POSITIVE,
            5e-324,
            1e16,
            f64::MAX,
            -f64::MAX,
            1.0 / 3.0,
            123456.789,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let text = float_text(x);
            let back: f64 = text.parse().expect("float text parses");
            assert_eq!(back.to_bits(), x.to_bits(), "{x} printed as {text}");
        }
        assert_eq!(float_text(f64::NAN), "nan");
        assert_eq!(float_text(0.02), "0.02");
        assert_eq!(float_text(1e-5), "1e-5");
        assert_eq!(float_text(-0.0), "-0");
        assert_eq!(float_text(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        assert!(is_ident("LlavaTiny") && !is_ident("llava-tiny") && !is_ident("1x"));
        assert_eq!(scope_text("vision.layers.0"), "vision.layers.0");
        assert_eq!(scope_text("a b"), "\"a b\"");
    }
}
