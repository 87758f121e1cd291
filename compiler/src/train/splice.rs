//! Copying one graph into another: used to join an objective's loss graph (elaborated from
//! `std.losses`) to a model's forward.

use crate::ir::{Graph, NodeId, Op};
use std::collections::HashMap;

/// Copies every node of `src` into `dst` in topological order. An input of `src` named in
/// `bind` becomes that node of `dst`; other inputs become inputs of `dst` (reusing an input of
/// the same name and type). Parameters are shared by path. Returns the map from `src` nodes to
/// `dst` nodes; every copied node is type-checked again by [`Graph::add`].
pub fn splice(
    dst: &mut Graph,
    src: &Graph,
    bind: &HashMap<String, NodeId>,
    scope: &str,
) -> Result<HashMap<NodeId, NodeId>, String> {
    for d in &src.dims {
        if !dst.dims.contains(d) {
            dst.dims.push(d.clone());
        }
    }
    let mut map = HashMap::new();
    for id in src.topo_order() {
        let node = src.node(id);
        let new = match &node.op {
            Op::Input { name } => match bind.get(name) {
                Some(&b) => {
                    if dst.node(b).ty != node.ty {
                        return Err(format!(
                            "`{name}` is {} here but the loss expects {}",
                            dst.node(b).ty,
                            node.ty
                        ));
                    }
                    b
                }
                None => match dst.input(name) {
                    Some(b) if dst.node(b).ty == node.ty => b,
                    Some(b) => {
                        return Err(format!(
                            "input `{name}` is {} in the model but {} in the loss",
                            dst.node(b).ty,
                            node.ty
                        ))
                    }
                    None => dst
                        .add_source(node.op.clone(), node.ty.clone(), scope)
                        .map_err(|e| e.to_string())?,
                },
            },
            Op::Param { path, .. } => match dst.param(path) {
                Some(b) => b,
                None => dst
                    .add_source(node.op.clone(), node.ty.clone(), scope)
                    .map_err(|e| e.to_string())?,
            },
            op if op.is_source() => dst
                .add_source(op.clone(), node.ty.clone(), scope)
                .map_err(|e| e.to_string())?,
            op => {
                let operands: Vec<NodeId> = src.operands(id).iter().map(|o| map[o]).collect();
                let s = if node.scope.is_empty() {
                    scope.to_string()
                } else {
                    format!("{scope}.{}", node.scope)
                };
                dst.add(op.clone(), &operands, &s)
                    .map_err(|e| e.to_string())?
            }
        };
        map.insert(id, new);
    }
    Ok(map)
}
