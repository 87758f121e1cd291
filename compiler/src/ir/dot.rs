//! Graphviz output: one node per op, nested clusters per scope path.
//!
//! Nodes are named `n0, n1, …` with the numbering of the text form, so `n12` is `%12`. Scopes
//! nest by path (`vision` ⊃ `vision.layers.0` ⊃ `vision.layers.0.self_attn`), a numeric
//! segment staying with the one before it, since `layers` alone is not a block instance.

use std::collections::HashMap;
use std::fmt::Write;

use super::graph::{Graph, NodeId};
use super::op::Op;
use super::text::numbering;

/// The graph in Graphviz DOT form.
pub fn to_dot(graph: &Graph) -> String {
    let order = numbering(graph);
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut root = Cluster::default();
    for (i, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        let line = format!("n{i} [{}];", node_style(&node.op, &node.ty.to_string()));
        root.find(&scope_segments(&node.scope)).nodes.push(line);
    }

    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&graph.name));
    out.push_str(concat!(
        "  node [shape=box, style=\"rounded,filled\", fillcolor=white, ",
        "fontname=\"monospace\", fontsize=10];\n"
    ));
    root.write(&mut out, "", 1);
    for (i, &id) in order.iter().enumerate() {
        let operands = graph.operands(id);
        for (position, operand) in operands.iter().enumerate() {
            let from = number
                .get(operand)
                .map_or("missing".to_string(), |n| format!("n{n}"));
            let label = if operands.len() > 1 {
                format!(" [label=\"{position}\"]")
            } else {
                String::new()
            };
            let _ = writeln!(out, "  {from} -> n{i}{label};");
        }
    }
    for (k, (name, id)) in graph.outputs.iter().enumerate() {
        let _ = writeln!(
            out,
            "  out{k} [label={}, shape=house, fillcolor=\"#c8e6c9\"];",
            quote(name)
        );
        if let Some(n) = number.get(id) {
            let _ = writeln!(out, "  n{n} -> out{k};");
        }
    }
    out.push_str("}\n");
    out
}

/// A block-level picture: every op is folded into its scope cut to `depth` segments (a
/// numbered layer counts as one segment with its list: `layers.3`), one box per block with its
/// op and parameter counts, one arrow per distinct tensor type flowing between blocks.
pub fn to_block_dot(graph: &Graph, depth: usize) -> String {
    let order = numbering(graph);
    let block_of = |id: NodeId| -> String {
        let node = graph.node(id);
        match &node.op {
            Op::Input { name } => format!("input {name}"),
            _ => {
                let segs = scope_segments(&node.scope);
                let cut: Vec<&str> = segs.iter().take(depth.max(1)).map(String::as_str).collect();
                if cut.is_empty() {
                    "(model)".to_string()
                } else {
                    cut.join(".")
                }
            }
        }
    };
    let mut blocks: Vec<String> = Vec::new();
    let mut ops: HashMap<String, usize> = HashMap::new();
    let mut params: HashMap<String, usize> = HashMap::new();
    let mut owner: HashMap<NodeId, String> = HashMap::new();
    for &id in &order {
        let b = block_of(id);
        if !ops.contains_key(&b) {
            blocks.push(b.clone());
        }
        let node = graph.node(id);
        if let Op::Param { .. } = node.op {
            let n = node
                .ty
                .shape
                .numel()
                .and_then(|d| d.as_const())
                .unwrap_or(0) as usize;
            *params.entry(b.clone()).or_default() += n;
            ops.entry(b.clone()).or_default();
        } else {
            *ops.entry(b.clone()).or_default() += 1;
        }
        owner.insert(id, b);
    }
    let index: HashMap<&String, usize> = blocks.iter().enumerate().map(|(i, b)| (b, i)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&graph.name));
    out.push_str("  rankdir=TB;\n  node [shape=box, style=\"rounded,filled\", fillcolor=white, fontname=\"monospace\", fontsize=11];\n  edge [fontname=\"monospace\", fontsize=9];\n");
    for (i, b) in blocks.iter().enumerate() {
        let (n_ops, n_params) = (
            ops.get(b).copied().unwrap_or(0),
            params.get(b).copied().unwrap_or(0),
        );
        let (label, style) = if let Some(name) = b.strip_prefix("input ") {
            (name.to_string(), ", shape=invhouse, fillcolor=\"#bbdefb\"")
        } else if n_params > 0 {
            (
                format!("{b}\n{n_ops} ops, {n_params} params"),
                ", fillcolor=\"#fff9c4\"",
            )
        } else {
            (format!("{b}\n{n_ops} ops"), "")
        };
        let _ = writeln!(out, "  b{i} [label={}{style}];", quote(&label));
    }
    let mut edges: Vec<(usize, usize, String)> = Vec::new();
    for &id in &order {
        let to = index[&owner[&id]];
        for o in graph.operands(id) {
            let from = index[&owner[&o]];
            if from != to
                && !matches!(
                    graph.node(o).op,
                    Op::Param { .. } | Op::Const { .. } | Op::Iota { .. }
                )
            {
                let e = (from, to, graph.node(o).ty.to_string());
                if !edges.contains(&e) {
                    edges.push(e);
                }
            }
        }
    }
    for (from, to, ty) in &edges {
        let _ = writeln!(out, "  b{from} -> b{to} [label={}];", quote(ty));
    }
    for (k, (name, id)) in graph.outputs.iter().enumerate() {
        let _ = writeln!(
            out,
            "  out{k} [label={}, shape=house, fillcolor=\"#c8e6c9\"];",
            quote(name)
        );
        if let Some(b) = owner.get(id) {
            let _ = writeln!(
                out,
                "  b{} -> out{k} [label={}];",
                index[b],
                quote(&graph.node(*id).ty.to_string())
            );
        }
    }
    out.push_str("}\n");
    out
}

/// The attributes of an op's node: its label, and a shape and colour by kind.
fn node_style(op: &Op, ty: &str) -> String {
    match op {
        Op::Input { name } => format!(
            "label={}, shape=invhouse, fillcolor=\"#bbdefb\"",
            quote(&format!("{name}\n{ty}"))
        ),
        Op::Param { path, .. } => format!(
            "label={}, shape=note, style=filled, fillcolor=\"#fff9c4\"",
            quote(&format!("{}\n{ty}", short_path(path)))
        ),
        Op::MatMul => format!(
            "label={}, fillcolor=\"#ffccbc\"",
            quote(&format!("matmul\n{ty}"))
        ),
        _ => format!("label={}", quote(&format!("{}\n{ty}", op.name()))),
    }
}

/// The last two segments of a parameter path: `q_proj.weight`.
fn short_path(path: &str) -> &str {
    let mut dots = path.rmatch_indices('.').map(|(i, _)| i);
    match (dots.next(), dots.next()) {
        (Some(_), Some(second)) => &path[second + 1..],
        _ => path,
    }
}

/// `vision.layers.0.self_attn` as `["vision", "layers.0", "self_attn"]`.
fn scope_segments(scope: &str) -> Vec<String> {
    let mut segments: Vec<String> = Vec::new();
    for part in scope.split('.').filter(|p| !p.is_empty()) {
        match segments.last_mut() {
            Some(last) if part.chars().all(|c| c.is_ascii_digit()) => {
                last.push('.');
                last.push_str(part);
            }
            _ => segments.push(part.to_string()),
        }
    }
    segments
}

/// A DOT string literal.
fn quote(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// The nodes of one scope and its sub-scopes, in first-appearance order.
#[derive(Default)]
struct Cluster {
    nodes: Vec<String>,
    children: Vec<(String, Cluster)>,
}

impl Cluster {
    /// The cluster at `path` below this one, created as needed.
    fn find(&mut self, path: &[String]) -> &mut Cluster {
        let Some((first, rest)) = path.split_first() else {
            return self;
        };
        let at = match self.children.iter().position(|(name, _)| name == first) {
            Some(at) => at,
            None => {
                self.children.push((first.clone(), Cluster::default()));
                self.children.len() - 1
            }
        };
        self.children[at].1.find(rest)
    }

    /// Writes the nodes and nested subgraphs; `path` is this cluster's full scope.
    fn write(&self, out: &mut String, path: &str, depth: usize) {
        let indent = "  ".repeat(depth);
        for line in &self.nodes {
            let _ = writeln!(out, "{indent}{line}");
        }
        for (name, child) in &self.children {
            let full = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            let _ = writeln!(
                out,
                "{indent}subgraph {} {{",
                quote(&format!("cluster_{full}"))
            );
            let _ = writeln!(
                out,
                "{indent}  label={}; tooltip={}; style=rounded; color=gray60;",
                quote(name),
                quote(&full)
            );
            child.write(out, &full, depth + 1);
            let _ = writeln!(out, "{indent}}}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::{Init, UnaryOp};
    use crate::ir::types::TensorType;

    #[test]
    fn scopes_nest_with_numeric_segments_attached() {
        assert_eq!(
            scope_segments("vision.layers.0.self_attn"),
            vec!["vision", "layers.0", "self_attn"]
        );
        assert!(scope_segments("").is_empty());
        assert_eq!(
            short_path("vision.layers.3.attn.q_proj.weight"),
            "q_proj.weight"
        );
        assert_eq!(short_path("bias"), "bias");
    }

    #[test]
    fn small_graph() {
        let t = |s: &str| TensorType::parse(s).expect("type");
        let mut g = Graph::new("tiny \"net\"");
        let x = g
            .add_source(Op::Input { name: "x".into() }, t("f32[2, 4]"), "")
            .expect("x");
        let w = g
            .add_source(
                Op::Param {
                    path: "vision.layers.0.self_attn.q_proj.weight".into(),
                    init: Init::normal(0.02),
                },
                t("f32[4, 4]"),
                "vision.layers.0.self_attn",
            )
            .expect("w");
        let y = g
            .add(Op::MatMul, &[x, w], "vision.layers.0.self_attn")
            .expect("y");
        let z = g.add(Op::Unary(UnaryOp::Tanh), &[y], "vision").expect("z");
        g.set_output("out", z).expect("output");
        let dot = to_dot(&g);
        assert_eq!(dot, to_dot(&g), "deterministic");
        let expected = r##"digraph "tiny \"net\"" {
  node [shape=box, style="rounded,filled", fillcolor=white, fontname="monospace", fontsize=10];
  n0 [label="x\nf32[2, 4]", shape=invhouse, fillcolor="#bbdefb"];
  subgraph "cluster_vision" {
    label="vision"; tooltip="vision"; style=rounded; color=gray60;
    n3 [label="tanh\nf32[2, 4]"];
    subgraph "cluster_vision.layers.0" {
      label="layers.0"; tooltip="vision.layers.0"; style=rounded; color=gray60;
      subgraph "cluster_vision.layers.0.self_attn" {
        label="self_attn"; tooltip="vision.layers.0.self_attn"; style=rounded; color=gray60;
        n1 [label="q_proj.weight\nf32[4, 4]", shape=note, style=filled, fillcolor="#fff9c4"];
        n2 [label="matmul\nf32[2, 4]", fillcolor="#ffccbc"];
      }
    }
  }
  n0 -> n2 [label="0"];
  n1 -> n2 [label="1"];
  n2 -> n3;
  out0 [label="out", shape=house, fillcolor="#c8e6c9"];
  n3 -> out0;
}
"##;
        assert_eq!(dot, expected);
    }
}
