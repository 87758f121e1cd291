//! Fusion: partitions the per-run ops into kernels (fusion groups).
//!
//! Every op has a kind (TVM's lattice, simplified): elementwise, view (reshape, permute,
//! expand, slice, pad, concat, gather), reduction, contraction (matmul), source. The rules:
//!
//! - values computed only from parameters and constants are computed at load time, not in a
//!   kernel; constants, iotas and views of them are cheap and recomputed inside every kernel;
//! - elementwise and view chains fuse with their producer when they have its shape;
//! - a reduction absorbs its elementwise producers; the ops over the same rows after it join
//!   too, including a broadcast of the reduced value back along the reduced axis (a *row
//!   kernel*: softmax and layer norm become one kernel each);
//! - pointwise kernels of one shape that an elementwise op reads from become one kernel;
//! - a matmul starts a kernel and takes an elementwise epilogue of its size (bias, activation,
//!   residual, scale), through reshapes that only relabel its rows;
//! - a scatter-add is a kernel of its own over materialised operands;
//! - a value used by another kernel (or an output) is materialised in a buffer; nothing that is
//!   not cheap is computed twice.

use super::load_time_with;
use crate::ir::{Dim, Graph, NodeId, Op, OpKind, Shape};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// What a kernel is built around.
#[derive(Clone, Debug, PartialEq)]
pub enum Anchor {
    /// Elementwise and view ops only.
    Pointwise,
    /// Reductions over the last-reduced axis of rows of `rows` (the reduction's input shape).
    Rows { rows: Shape, axis: usize },
    /// A matmul with its epilogue.
    Contraction,
    /// A scatter-add, alone.
    Scatter,
}

/// One kernel: its ops in order, and the values it writes for others.
#[derive(Clone, Debug)]
pub struct Group {
    pub anchor: Anchor,
    pub nodes: Vec<NodeId>,
    /// Values read by other kernels or named as outputs.
    pub outputs: Vec<NodeId>,
}

/// The partition of a graph into kernels.
#[derive(Clone, Debug, Default)]
pub struct FusionPlan {
    pub groups: Vec<Group>,
    /// Nodes computed once when the weights are loaded.
    pub load_time: HashSet<NodeId>,
    /// Cheap nodes recomputed inside the kernels that use them.
    pub cheap: HashSet<NodeId>,
    /// The group of each fused node.
    pub group_of: HashMap<NodeId, usize>,
}

impl FusionPlan {
    /// Ops that would each be a kernel without fusion (per-run ops that are not cheap).
    pub fn unfused_kernels(&self) -> usize {
        self.group_of.len()
    }
}

fn numel(shape: &Shape) -> Option<Dim> {
    shape.numel()
}

/// Partitions `graph` into kernels.
pub fn plan(graph: &Graph) -> FusionPlan {
    plan_with(graph, true)
}

/// Partitions `graph` into kernels; with `params_fixed` false (a training step, whose
/// parameters change every run) nothing computed from a parameter is left to load time.
pub fn plan_with(graph: &Graph, params_fixed: bool) -> FusionPlan {
    let lt = load_time_with(graph, params_fixed);
    let order = graph.topo_order();
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut cheap: HashSet<NodeId> = HashSet::new();
    for &id in &order {
        let node = graph.node(id);
        let ops = graph.operands(id);
        let is_cheap = match node.op {
            Op::Const { .. } | Op::Iota { .. } => true,
            _ if node.op.kind() == OpKind::View => {
                ops.iter().all(|o| cheap.contains(o) || lt.contains(o))
            }
            _ => false,
        };
        if is_cheap {
            cheap.insert(id);
        }
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: HashMap<NodeId, usize> = HashMap::new();
    // deps[g]: the kernels g reads from.
    let mut deps: Vec<HashSet<usize>> = Vec::new();
    // The size of each fused node's expression tree inside its kernel.
    let mut tree: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        if lt.contains(&id)
            || cheap.contains(&id)
            || matches!(node.op, Op::Input { .. } | Op::Param { .. })
        {
            continue;
        }
        let ops = graph.operands(id);
        let shape = &node.ty.shape;
        // The kernels this op reads from: its operands' kernels, looking through cheap views.
        let mut producer_groups: Vec<usize> = Vec::new();
        let mut stack = ops.clone();
        let mut seen = HashSet::new();
        while let Some(o) = stack.pop() {
            if !seen.insert(o) {
                continue;
            }
            if let Some(&g) = group_of.get(&o) {
                if !producer_groups.contains(&g) {
                    producer_groups.push(g);
                }
            } else if cheap.contains(&o) {
                stack.extend(graph.operands(o));
            }
        }
        // Pointwise kernels of this op's shape that it reads from (siblings such as the
        // `m`, `v` and decayed-parameter chains of an optimiser update) become one kernel, so
        // that none of them has to be materialised for the other.
        if node.op.kind() == OpKind::Elementwise {
            let same_shape = |g: &Group| {
                g.anchor == Anchor::Pointwise
                    && g.nodes.iter().any(|&n| graph.node(n).ty.shape == *shape)
            };
            let siblings: Vec<usize> = producer_groups
                .iter()
                .copied()
                .filter(|&g| same_shape(&groups[g]))
                .collect();
            if let Some((&into, rest)) = siblings.split_first() {
                for &from in rest {
                    if depends_on(&deps, into, from) || depends_on(&deps, from, into) {
                        continue;
                    }
                    merge_groups(&mut groups, &mut deps, &mut group_of, into, from, &position);
                    producer_groups.retain(|&g| g != from);
                }
            }
        }
        // Joining kernel g must not create a cycle: no other producer may depend on g.
        let acyclic = |g: usize| {
            producer_groups
                .iter()
                .all(|&h| h == g || !depends_on(&deps, h, g))
        };
        let joined = match node.op.kind() {
            OpKind::Contraction | OpKind::Opaque | OpKind::Scatter | OpKind::Source => None,
            OpKind::Reduction => match node.op {
                Op::Reduce { axis, .. } => {
                    let rows = &graph.node(ops[0]).ty.shape;
                    producer_groups
                        .iter()
                        .copied()
                        .filter(|&g| acyclic(g))
                        .find(|&g| match &groups[g].anchor {
                            Anchor::Pointwise => groups[g]
                                .nodes
                                .iter()
                                .all(|&n| graph.node(n).ty.shape == *rows),
                            Anchor::Rows { rows: r, axis: a } => r == rows && *a == axis,
                            Anchor::Contraction | Anchor::Scatter => false,
                        })
                }
                _ => None,
            },
            OpKind::Elementwise | OpKind::View => producer_groups
                .iter()
                .copied()
                .filter(|&g| acyclic(g))
                .find(|&g| {
                    let grp = &groups[g];
                    match &grp.anchor {
                        Anchor::Pointwise => {
                            grp.nodes.iter().any(|&n| graph.node(n).ty.shape == *shape)
                        }
                        Anchor::Rows { rows, axis } => {
                            // Row space, or the reduced space (rows with the axis at 1). Of
                            // the views only `expand` may join (a reduced value broadcast
                            // back along its row): any other view can move an element to
                            // another row, whose reductions this row does not hold.
                            let mut reduced = rows.clone();
                            reduced.0[*axis] = Dim::c(1);
                            let keeps_rows = node.op.kind() == OpKind::Elementwise
                                || matches!(node.op, Op::Expand { .. });
                            keeps_rows
                                && (*shape == *rows || *shape == reduced)
                                && !reads_permuted(graph, id, &group_of, &cheap)
                        }
                        Anchor::Contraction => {
                            let out = grp.nodes.first().map(|&m| graph.node(m).ty.shape.clone());
                            let relabel = matches!(node.op, Op::Reshape { .. })
                                || node.op.kind() == OpKind::Elementwise;
                            relabel && out.is_some_and(|o| numel(&o) == numel(shape))
                        }
                        Anchor::Scatter => false,
                    }
                }),
        };
        // A kernel's values are expression trees (a value used twice is computed twice):
        // past a bound, a chain starts a new kernel instead of growing one without limit.
        let joined = joined
            .filter(|&g| tree_size(graph, id, g, &group_of, &cheap, &tree) <= MAX_KERNEL_TREE);
        match joined {
            Some(g) => {
                if let (Op::Reduce { axis, .. }, Anchor::Pointwise) = (&node.op, &groups[g].anchor)
                {
                    groups[g].anchor = Anchor::Rows {
                        rows: graph.node(ops[0]).ty.shape.clone(),
                        axis: *axis,
                    };
                }
                // An elementwise op joining a row kernel brings along the pointwise kernels of
                // its shape that it reads (an optimiser's decayed parameter and `β₂·v`, which
                // read only inputs, would otherwise each be a pass over memory of their own).
                if node.op.kind() == OpKind::Elementwise
                    && matches!(groups[g].anchor, Anchor::Rows { .. })
                {
                    let elementwise_of_shape = |grp: &Group| {
                        grp.anchor == Anchor::Pointwise
                            && grp.nodes.iter().all(|&n| {
                                graph.node(n).op.kind() == OpKind::Elementwise
                                    && graph.node(n).ty.shape == *shape
                                    && !reads_permuted(graph, n, &group_of, &cheap)
                            })
                    };
                    let absorbed: Vec<usize> = producer_groups
                        .iter()
                        .copied()
                        .filter(|&h| {
                            h != g
                                && elementwise_of_shape(&groups[h])
                                && !depends_on(&deps, g, h)
                                && !depends_on(&deps, h, g)
                        })
                        .collect();
                    for h in absorbed {
                        merge_groups(&mut groups, &mut deps, &mut group_of, g, h, &position);
                        producer_groups.retain(|&x| x != h);
                    }
                }
                groups[g].nodes.push(id);
                group_of.insert(id, g);
                tree.insert(id, tree_size(graph, id, g, &group_of, &cheap, &tree));
                for &h in &producer_groups {
                    if h != g {
                        deps[g].insert(h);
                    }
                }
            }
            // A view that joins no kernel is an index transformation that its consumers apply
            // when they read the (materialised) operand.
            // (Unless what it inlines is large: a chain of views that each read their operand
            // twice, such as a rotation by `concat` of two slices in a loop, doubles each step.)
            None if node.op.kind() == OpKind::View
                && tree_size(graph, id, usize::MAX, &group_of, &cheap, &tree)
                    <= MAX_KERNEL_TREE =>
            {
                cheap.insert(id);
            }
            None => {
                let anchor = match node.op {
                    Op::MatMul => Anchor::Contraction,
                    Op::ScatterAdd { .. } => Anchor::Scatter,
                    Op::Reduce { axis, .. } => Anchor::Rows {
                        rows: graph.node(ops[0]).ty.shape.clone(),
                        axis,
                    },
                    _ => Anchor::Pointwise,
                };
                group_of.insert(id, groups.len());
                tree.insert(
                    id,
                    tree_size(graph, id, groups.len(), &group_of, &cheap, &tree),
                );
                deps.push(producer_groups.iter().copied().collect());
                groups.push(Group {
                    anchor,
                    nodes: vec![id],
                    outputs: Vec::new(),
                });
            }
        }
    }
    // An output that no kernel computes (a view of an input or of another kernel's value, a
    // constant) gets a copy kernel of its own, or, when a kernel that computes its operand also
    // reads it (a step's new keys, cached and attended to in one kernel), joins that kernel.
    let mut topo_pos: Option<HashMap<NodeId, usize>> = None;
    for (_, id) in &graph.outputs {
        if cheap.contains(id) && !group_of.contains_key(id) {
            cheap.remove(id);
            // It reads the kernels its operands come from (through cheap views) ...
            let mut producers = HashSet::new();
            let mut stack = graph.operands(*id);
            let mut seen = HashSet::new();
            while let Some(o) = stack.pop() {
                if !seen.insert(o) {
                    continue;
                }
                if let Some(&h) = group_of.get(&o) {
                    producers.insert(h);
                } else if cheap.contains(&o) {
                    stack.extend(graph.operands(o));
                }
            }
            // ... and the kernels that read it (they inlined it as a view) now read its buffer.
            let mut users = Vec::new();
            let mut stack = graph.users(*id);
            let mut seen = HashSet::new();
            while let Some(u) = stack.pop() {
                if !seen.insert(u) {
                    continue;
                }
                if let Some(&h) = group_of.get(&u) {
                    if !users.contains(&h) {
                        users.push(h);
                    }
                } else if cheap.contains(&u) {
                    stack.extend(graph.users(u));
                }
            }
            users.sort();
            let g = match users.iter().copied().find(|h| producers.contains(h)) {
                // A kernel both computes the operand and reads the output: it computes the
                // output too (a separate copy would run after it, too late for its read).
                Some(h) => {
                    let pos = topo_pos.get_or_insert_with(|| {
                        graph
                            .topo_order()
                            .into_iter()
                            .enumerate()
                            .map(|(i, n)| (n, i))
                            .collect()
                    });
                    groups[h].nodes.push(*id);
                    groups[h]
                        .nodes
                        .sort_by_key(|n| pos.get(n).copied().unwrap_or(0));
                    for &p in &producers {
                        if p != h {
                            deps[h].insert(p);
                        }
                    }
                    h
                }
                None => {
                    deps.push(producers.clone());
                    groups.push(Group {
                        anchor: Anchor::Pointwise,
                        nodes: vec![*id],
                        outputs: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            group_of.insert(*id, g);
            for h in users {
                // (Never a cycle: a kernel that also produces the operand keeps its order.)
                if h != g && !producers.contains(&h) {
                    deps[h].insert(g);
                }
            }
        }
    }
    // Kernels run in dependency order: an op that joined an earlier kernel may read a kernel
    // created after it (a RoPE table computed later in program order), so sort them. Kernels
    // merged into others are left out.
    let (groups, group_of) = sort_groups(groups, &deps, group_of);
    let (mut groups, mut group_of) = drop_empty(groups, group_of);
    // A value is materialised when a kernel other than its own reads it, directly or through
    // cheap views, or when an output names it (directly or through views).
    let mut out_ids: HashSet<NodeId> = HashSet::new();
    let mut seen_out: HashSet<NodeId> = HashSet::new();
    for (_, id) in &graph.outputs {
        let mut stack = vec![*id];
        while let Some(v) = stack.pop() {
            if out_ids.contains(&v) || !seen_out.insert(v) {
                continue;
            }
            if cheap.contains(&v) {
                stack.extend(graph.operands(v));
            } else {
                out_ids.insert(v);
            }
        }
    }
    let readers = |n: NodeId, cheap: &HashSet<NodeId>| -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut stack = graph.users(n);
        let mut seen = HashSet::new();
        while let Some(u) = stack.pop() {
            if !seen.insert(u) {
                continue;
            }
            if cheap.contains(&u) {
                stack.extend(graph.users(u));
            } else {
                out.push(u);
            }
        }
        out
    };
    // A broadcast of a kernel's value that other kernels read is not stored at its full size:
    // the value is, and the readers broadcast it as a view (a softmax's row sums, a layer
    // norm's statistics, kept for the backward).
    for (g, grp) in groups.iter_mut().enumerate() {
        let broadcasts: Vec<NodeId> = grp
            .nodes
            .iter()
            .copied()
            .filter(|&n| {
                matches!(graph.node(n).op, Op::Expand { .. })
                    && !out_ids.contains(&n)
                    && graph
                        .operands(n)
                        .first()
                        .is_some_and(|o| group_of.get(o) == Some(&g))
                    && readers(n, &cheap)
                        .iter()
                        .any(|u| group_of.get(u).is_some_and(|&h| h != g))
            })
            .collect();
        for n in broadcasts {
            grp.nodes.retain(|&x| x != n);
            group_of.remove(&n);
            cheap.insert(n);
        }
    }
    for (g, grp) in groups.iter_mut().enumerate() {
        for &n in &grp.nodes {
            let used_outside = readers(n, &cheap)
                .iter()
                .any(|u| group_of.get(u).is_some_and(|&h| h != g));
            if used_outside || out_ids.contains(&n) {
                grp.outputs.push(n);
            }
        }
    }
    FusionPlan {
        groups,
        load_time: lt,
        cheap,
        group_of,
    }
}

/// Moves every node of kernel `from` into kernel `into` (kept in topological order); `from` is
/// left empty, and kernels that read `from` now read `into`.
fn merge_groups(
    groups: &mut [Group],
    deps: &mut [HashSet<usize>],
    group_of: &mut HashMap<NodeId, usize>,
    into: usize,
    from: usize,
    position: &HashMap<NodeId, usize>,
) {
    let moved = std::mem::take(&mut groups[from].nodes);
    for &n in &moved {
        group_of.insert(n, into);
    }
    groups[into].nodes.extend(moved);
    groups[into].nodes.sort_by_key(|n| position[n]);
    let from_deps = std::mem::take(&mut deps[from]);
    deps[into].extend(from_deps.into_iter().filter(|&h| h != into));
    for d in deps.iter_mut() {
        if d.remove(&from) {
            d.insert(into);
        }
    }
    deps[into].remove(&into);
}

/// The kernels that still have nodes, renumbered.
fn drop_empty(
    groups: Vec<Group>,
    group_of: HashMap<NodeId, usize>,
) -> (Vec<Group>, HashMap<NodeId, usize>) {
    let mut new_index = vec![usize::MAX; groups.len()];
    let mut kept = Vec::new();
    for (i, g) in groups.into_iter().enumerate() {
        if !g.nodes.is_empty() {
            new_index[i] = kept.len();
            kept.push(g);
        }
    }
    let group_of = group_of
        .into_iter()
        .map(|(id, g)| (id, new_index[g]))
        .collect();
    (kept, group_of)
}

/// Orders kernels so that every kernel comes after the kernels it reads (Kahn's algorithm,
/// taking the lowest-numbered ready kernel first, so unconstrained kernels keep their order).
fn sort_groups(
    groups: Vec<Group>,
    deps: &[HashSet<usize>],
    group_of: HashMap<NodeId, usize>,
) -> (Vec<Group>, HashMap<NodeId, usize>) {
    let n = groups.len();
    let mut remaining: Vec<usize> = (0..n)
        .map(|g| deps[g].iter().filter(|&&h| h != g).count())
        .collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (g, d) in deps.iter().enumerate() {
        for &h in d {
            if h != g {
                users[h].push(g);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&g| remaining[g] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(g) = ready.pop_first() {
        order.push(g);
        for &u in &users[g] {
            remaining[u] -= 1;
            if remaining[u] == 0 {
                ready.insert(u);
            }
        }
    }
    let mut new_index = vec![0; n];
    for (i, &g) in order.iter().enumerate() {
        new_index[g] = i;
    }
    let mut slots: Vec<Option<Group>> = groups.into_iter().map(Some).collect();
    let sorted: Vec<Group> = order.iter().filter_map(|&g| slots[g].take()).collect();
    let group_of = group_of
        .into_iter()
        .map(|(id, g)| (id, new_index[g]))
        .collect();
    (sorted, group_of)
}

/// Whether kernel `from` reads, directly or not, from kernel `to`.
/// The most nodes in the expression tree of one fused value (values computed inside a kernel
/// are inlined where they are used, so a value read twice counts twice). The zoo's kernels stay
/// below half of it (the largest, 548, is a ViT's patch and position embeddings with the layer
/// norm after them; the MiniLM pairs training step's largest is 309); it keeps the kernels of
/// generated chains (`y = y * y + y` in a loop, whose tree triples every step) small, and their
/// compilation linear in the length of the chain.
pub const MAX_KERNEL_TREE: usize = 1024;

/// Whether `id` reads a kernel's value through a `permute` (looking through cheap views). Such
/// an op stays out of row kernels: a transpose of a square matrix has the row kernel's shape,
/// but its element (i, j) lies in row j, whose reductions row i's loop does not hold (the
/// gradient `g + gᵀ` of a symmetric loss over a square logit matrix read garbage).
fn reads_permuted(
    graph: &Graph,
    id: NodeId,
    group_of: &HashMap<NodeId, usize>,
    cheap: &HashSet<NodeId>,
) -> bool {
    let mut stack: Vec<(NodeId, bool)> =
        graph.operands(id).into_iter().map(|o| (o, false)).collect();
    let mut seen = HashSet::new();
    while let Some((o, permuted)) = stack.pop() {
        if !seen.insert((o, permuted)) {
            continue;
        }
        if group_of.contains_key(&o) {
            if permuted {
                return true;
            }
        } else if cheap.contains(&o) {
            let p = permuted || matches!(graph.node(o).op, Op::Permute { .. });
            stack.extend(graph.operands(o).into_iter().map(|x| (x, p)));
        }
    }
    false
}

/// The size of `id`'s expression tree if it is computed in kernel `g`: operands computed in
/// `g` count their trees, cheap views are looked through, anything else is one load. Saturates.
fn tree_size(
    graph: &Graph,
    id: NodeId,
    g: usize,
    group_of: &HashMap<NodeId, usize>,
    cheap: &HashSet<NodeId>,
    tree: &HashMap<NodeId, usize>,
) -> usize {
    let mut size = 1usize;
    let mut stack = graph.operands(id);
    while let Some(o) = stack.pop() {
        size = size.saturating_add(match group_of.get(&o) {
            Some(&h) if h == g => tree.get(&o).copied().unwrap_or(1),
            Some(_) => 1,
            None if cheap.contains(&o) => {
                stack.extend(graph.operands(o));
                1
            }
            None => 1,
        });
        if size > MAX_KERNEL_TREE {
            break;
        }
    }
    size
}

fn depends_on(deps: &[HashSet<usize>], from: usize, to: usize) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![from];
    while let Some(g) = stack.pop() {
        if g == to {
            return true;
        }
        if seen.insert(g) {
            stack.extend(deps[g].iter().copied());
        }
    }
    false
}

/// The IR text with the kernels marked: a `; kernel N (...)` comment line before each kernel's
/// first op (the reader ignores comments, so this still reads back).
pub fn print_grouped(graph: &Graph, plan: &FusionPlan) -> String {
    let text = crate::ir::text::print(graph);
    let order = crate::ir::text::numbering(graph);
    let mut first: HashMap<usize, usize> = HashMap::new();
    for (i, id) in order.iter().enumerate() {
        if let Some(&g) = plan.group_of.get(id) {
            first.entry(g).or_insert(i);
        }
    }
    let mut starts: HashMap<usize, usize> = HashMap::new();
    for (g, i) in first {
        starts.insert(i, g);
    }
    let mut out = String::new();
    let mut op_index = 0;
    for line in text.lines() {
        if line.starts_with('%') {
            if let Some(&g) = starts.get(&op_index) {
                let grp = &plan.groups[g];
                let kind = match &grp.anchor {
                    Anchor::Pointwise => "pointwise".to_string(),
                    Anchor::Rows { axis, .. } => format!("rows over axis {axis}"),
                    Anchor::Contraction => "matmul".to_string(),
                    Anchor::Scatter => "scatter-add".to_string(),
                };
                let _ = writeln!(
                    out,
                    "; kernel {g}: {kind}, {} ops, {} output(s)",
                    grp.nodes.len(),
                    grp.outputs.len()
                );
            }
            op_index += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
