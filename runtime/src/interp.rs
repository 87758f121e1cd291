//! The reference interpreter: the definition of what the graph IR means.
//!
//! Every op is evaluated in the simplest way that is obviously right: float ops are computed in
//! f64 and rounded once to the node's dtype (f32, or f16/bf16, whose values are then exactly
//! those of the narrow type; f64 nodes, used by gradient checks, are not rounded at all), sums
//! and matmuls accumulate in f64, i32 arithmetic wraps around
//! like two's-complement hardware, and every index is checked. It is slow on purpose; compiled
//! kernels are compared against it.
//!
//! Memory is checked before each op runs: its result and the f64 working copies it makes must
//! fit in what the machine has ([`crate::alloc`]), else the run stops with an error naming the
//! op, its shape and the bytes it needs; every buffer is allocated fallibly.
//!
//! Random numbers are counter-based so that any backend can reproduce them. Element `i` (in
//! row-major order) of a `random` op with seed `s` draws `u(c) = (splitmix64(s * 2^32 + c) >> 11)
//! / 2^53` in `[0, 1)` at counter `c = 2i` (and `c = 2i + 1` for the second number that `normal`
//! needs), where `splitmix64(x)` is the first output of SplitMix64 started at state `x`:
//!
//! ```text
//! z = x + 0x9E3779B97F4A7C15
//! z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//! z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//! splitmix64(x) = z ^ (z >> 31)                  (all arithmetic mod 2^64)
//! ```
//!
//! `uniform(lo, hi)` is `lo + (hi - lo) * u(2i)`, `bernoulli(p)` is `u(2i) < p`, and
//! `normal(mean, std)` is Box-Muller: `mean + std * sqrt(-2 ln u(2i)) * cos(2 pi u(2i + 1))`.
//! For example `splitmix64(0) = 0xE220A8397B1DCDAF`, so element 0 of `rand(seed: 0)` is
//! `0xE220A8397B1DC / 2^53 = 0.8833108...`.

use crate::alloc;
use crate::rng::uniform01;
use crate::tensor::{strides, Data, Tensor};
use std::collections::{BTreeMap, HashMap};
use vlmc::ir::{BinaryOp, DType, Dim, Dist, Graph, NodeId, Op, ReduceOp, UnaryOp};

/// A failure while running a graph: which op, and why.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct RunError {
    pub message: String,
}

fn fail<T>(message: impl Into<String>) -> Result<T, RunError> {
    Err(RunError {
        message: message.into(),
    })
}

type R<T> = Result<T, RunError>;

/// Sizes of the symbolic dims (`B`, `T`) of one run.
pub type Bindings = HashMap<String, i64>;

/// Runs `graph` on named inputs with named parameters; returns the named outputs.
pub fn run(
    graph: &Graph,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
) -> R<BTreeMap<String, Tensor>> {
    let dims = bind_dims(graph, inputs)?;
    let wanted: Vec<NodeId> = graph.outputs.iter().map(|(_, id)| *id).collect();
    let mut values = evaluate(graph, &dims, inputs, params, &wanted)?;
    let mut outs = BTreeMap::new();
    for (name, id) in &graph.outputs {
        let t = values.get(id).cloned().ok_or_else(|| RunError {
            message: format!("output `{name}` was not computed"),
        })?;
        outs.insert(name.clone(), t);
    }
    values.clear();
    Ok(outs)
}

/// Computes only the nodes `wanted` need (for values computed once at load time, which
/// depend on parameters and constants only).
pub fn run_nodes(
    graph: &Graph,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
    wanted: &[NodeId],
) -> R<HashMap<NodeId, Tensor>> {
    let dims = bind_dims(graph, inputs).unwrap_or_default();
    evaluate(graph, &dims, inputs, params, wanted)
}

/// Evaluates the nodes `wanted` depend on, in order, freeing intermediates after their last
/// use; returns the wanted values.
fn evaluate(
    graph: &Graph,
    dims: &Bindings,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
    wanted: &[NodeId],
) -> R<HashMap<NodeId, Tensor>> {
    let mut needed = std::collections::HashSet::new();
    let mut stack: Vec<NodeId> = wanted.to_vec();
    while let Some(id) = stack.pop() {
        if needed.insert(id) {
            stack.extend(graph.operands(id));
        }
    }
    let order: Vec<NodeId> = graph
        .topo_order()
        .into_iter()
        .filter(|id| needed.contains(id))
        .collect();
    // How many uses each value still has, to free intermediates early.
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for o in graph.operands(id) {
            *uses.entry(o).or_default() += 1;
        }
    }
    for o in wanted {
        *uses.entry(*o).or_default() += 1;
    }
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        // Errors say which op failed: `gather (f32[B, T, 64] in `embed`): index ...`.
        let scope = if node.scope.is_empty() {
            String::new()
        } else {
            format!(" in `{}`", node.scope)
        };
        let context = |e: RunError| RunError {
            message: format!("{} ({}{scope}): {}", node.op.name(), node.ty, e.message),
        };
        let shape = concrete(&node.ty.shape.0, dims).map_err(context)?;
        let operands = graph.operands(id);
        let args: Vec<&Tensor> = operands
            .iter()
            .map(|o| {
                values.get(o).ok_or_else(|| RunError {
                    message: "internal: operand not computed".into(),
                })
            })
            .collect::<R<_>>()?;
        alloc::ensure(
            working_bytes(&node.op, node.ty.dtype, &shape, &args),
            || working_what(&node.op, node.ty.dtype, &shape),
        )
        .map_err(|e| context(e.into()))?;
        let out =
            eval(&node.op, node.ty.dtype, &shape, &args, dims, inputs, params).map_err(context)?;
        debug_assert_eq!(out.shape, shape);
        for o in operands {
            if let Some(n) = uses.get_mut(&o) {
                *n -= 1;
                if *n == 0 {
                    values.remove(&o);
                }
            }
        }
        values.insert(id, out);
    }
    Ok(wanted
        .iter()
        .filter_map(|id| values.get(id).map(|t| (*id, t.clone())))
        .collect())
}

/// Solves the symbolic dims from the inputs' shapes and checks every input against its type.
pub fn bind_dims(graph: &Graph, inputs: &BTreeMap<String, Tensor>) -> R<Bindings> {
    let mut dims = Bindings::new();
    let declared = graph.inputs();
    for (_, name, ty) in &declared {
        let Some(t) = inputs.get(*name) else {
            let names: Vec<&str> = declared.iter().map(|(_, n, _)| *n).collect();
            return fail(format!(
                "missing input `{name}` ({ty}); the model's inputs are: {}",
                names.join(", ")
            ));
        };
        if t.shape.len() != ty.rank() {
            return fail(format!(
                "input `{name}` has shape {}, but the model expects {ty}",
                t.shape_text()
            ));
        }
        if !t.holds(ty.dtype) {
            return fail(format!(
                "input `{name}` is {}, but the model expects {ty}",
                t.dtype()
            ));
        }
        for (d, &n) in ty.shape.0.iter().zip(&t.shape) {
            if let Some(s) = d.as_symbol() {
                dims.entry(s.to_string()).or_insert(n as i64);
            }
        }
    }
    for (_, name, ty) in &declared {
        let t = &inputs[*name];
        let want = concrete(&ty.shape.0, &dims)?;
        if want != t.shape {
            let mut b: Vec<String> = dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
            b.sort();
            return fail(format!(
                "input `{name}` has shape {}, but the model expects {ty} = {want:?} (with {})",
                t.shape_text(),
                b.join(", ")
            ));
        }
    }
    Ok(dims)
}

/// Evaluates symbolic dims with the bindings.
pub fn concrete(dims: &[Dim], b: &Bindings) -> R<Vec<usize>> {
    dims.iter()
        .map(|d| match d.eval(&|s| b.get(s).copied()) {
            Some(v) if v >= 0 => usize::try_from(v).map_err(|_| RunError {
                message: format!("dimension {d} = {v} does not fit this machine's sizes"),
            }),
            Some(v) => fail(format!("dimension {d} is negative ({v})")),
            None if d.symbols().iter().all(|s| b.contains_key(*s)) => {
                let mut with: Vec<String> = d
                    .symbols()
                    .iter()
                    .map(|s| format!("{s}={}", b[*s]))
                    .collect();
                with.sort();
                fail(format!(
                    "dimension {d} overflows a 64-bit integer with {}",
                    with.join(", ")
                ))
            }
            None => fail(format!("dimension {d} has an unknown size")),
        })
        .collect()
}

/// Bytes of one element as the interpreter stores `dtype` (f16/bf16 as f32, bool as a byte).
fn elem_bytes(dtype: DType) -> usize {
    match dtype {
        DType::F64 => 8,
        DType::Bool => 1,
        _ => 4,
    }
}

/// The memory an op needs while it is computed (`None` on overflow): its result, plus the
/// f64 working copies the interpreter makes (of the result, or the index table of a view, and
/// of each operand of an arithmetic op).
fn working_bytes(op: &Op, dtype: DType, shape: &[usize], args: &[&Tensor]) -> Option<u128> {
    let n = alloc::numel(shape)? as u128;
    let result = n.checked_mul(elem_bytes(dtype) as u128)?;
    let copies = match op {
        Op::Reshape { .. } | Op::StopGradient | Op::Concat { .. } | Op::Const { .. } => 0,
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Iota { .. }
        | Op::Random { .. }
        | Op::Gather { .. }
        | Op::Permute { .. }
        | Op::Expand { .. }
        | Op::Slice { .. } => n.checked_mul(8)?,
        _ => args.iter().try_fold(n.checked_mul(8)?, |acc, a| {
            acc.checked_add((a.numel() as u128).checked_mul(8)?)
        })?,
    };
    result.checked_add(copies)
}

/// What [`working_bytes`] measures, for its error.
fn working_what(op: &Op, dtype: DType, shape: &[usize]) -> String {
    let value = alloc::describe(shape, dtype);
    match op {
        Op::Input { name } => format!("input `{name}` {value}"),
        Op::Param { path, .. } => format!("parameter `{path}` {value}"),
        Op::Reshape { .. } | Op::StopGradient | Op::Concat { .. } | Op::Const { .. } => {
            format!("its value {value}")
        }
        _ => format!("its value {value} with the interpreter's f64 working copies"),
    }
}

/// The what of an allocation inside an op (the op itself is named by the caller).
fn buffer_what() -> String {
    "a buffer of the op".to_string()
}

/// `n` items collected into memory checked and allocated through [`alloc`].
fn collect<T>(n: usize, items: impl IntoIterator<Item = T>) -> R<Vec<T>> {
    Ok(alloc::collect(n, items, buffer_what)?)
}

/// `vec![value; n]` through [`alloc`].
fn zeros<T: Clone>(n: usize, value: T) -> R<Vec<T>> {
    Ok(alloc::checked_vec(n, value, buffer_what)?)
}

/// Every element of `t` as f64, in memory allocated through [`alloc`].
fn f64s(t: &Tensor) -> R<Vec<f64>> {
    Ok(t.try_to_f64()?)
}

/// A copy of a tensor's elements through [`alloc`].
fn copy_data(d: &Data) -> R<Data> {
    Ok(match d {
        Data::F32(v) => Data::F32(collect(v.len(), v.iter().copied())?),
        Data::F64(v) => Data::F64(collect(v.len(), v.iter().copied())?),
        Data::I32(v) => Data::I32(collect(v.len(), v.iter().copied())?),
        Data::Bool(v) => Data::Bool(collect(v.len(), v.iter().copied())?),
    })
}

/// A copy of a tensor through [`alloc`].
fn copy(t: &Tensor) -> R<Tensor> {
    Ok(Tensor {
        shape: t.shape.clone(),
        data: copy_data(&t.data)?,
    })
}

/// One symbolic dim's size.
fn size(d: &Dim, b: &Bindings) -> R<usize> {
    Ok(concrete(std::slice::from_ref(d), b)?[0])
}

fn eval(
    op: &Op,
    dtype: DType,
    shape: &[usize],
    args: &[&Tensor],
    dims: &Bindings,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
) -> R<Tensor> {
    let n = alloc::numel(shape).ok_or_else(|| RunError {
        message: format!("{shape:?} has more elements than this machine can address"),
    })?;
    match op {
        Op::Input { name } => match inputs.get(name) {
            Some(t) => narrow(dtype, t),
            None => fail(format!("missing input `{name}`")),
        },
        Op::Param { path, .. } => {
            let t = params.get(path).ok_or_else(|| RunError {
                message: format!("missing parameter `{path}`"),
            })?;
            if t.shape != shape || !t.holds(dtype) {
                return fail(format!(
                    "parameter `{path}` is {}{}, expected {dtype}{shape:?}",
                    t.dtype(),
                    t.shape_text()
                ));
            }
            narrow(dtype, t)
        }
        Op::Const { value } => fill(dtype, shape, *value),
        Op::Iota { axis } => {
            let st = strides(shape);
            let idx = collect(n, (0..n).map(|i| ((i / st[*axis]) % shape[*axis]) as f64))?;
            from_f64(dtype, shape, &idx)
        }
        Op::Random { dist, seed } => {
            let u = |i: usize, k: u64| uniform01(*seed, (i as u64) * 2 + k);
            let vals = collect(
                n,
                (0..n).map(|i| match dist {
                    Dist::Uniform { lo, hi } => lo + (hi - lo) * u(i, 0),
                    Dist::Bernoulli { p } => f64::from(u8::from(u(i, 0) < *p)),
                    Dist::Normal { mean, std } => {
                        let (a, b) = (u(i, 0).max(f64::MIN_POSITIVE), u(i, 1));
                        mean + std * (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
                    }
                }),
            )?;
            from_f64(dtype, shape, &vals)
        }
        Op::Unary(u) => unary(*u, dtype, args[0]),
        Op::Binary(b) => binary(*b, dtype, args[0], args[1]),
        Op::Select => {
            let c = args[0].as_bool().ok_or_else(|| RunError {
                message: "condition is not bool".into(),
            })?;
            let pick = |i: usize| if c[i] { 1 } else { 2 };
            Ok(match (&args[1].data, &args[2].data) {
                (Data::F64(a), Data::F64(b)) => Tensor::f64(
                    shape.to_vec(),
                    collect(n, (0..n).map(|i| if pick(i) == 1 { a[i] } else { b[i] }))?,
                ),
                (Data::F32(a), Data::F32(b)) => Tensor::f32(
                    shape.to_vec(),
                    collect(n, (0..n).map(|i| if pick(i) == 1 { a[i] } else { b[i] }))?,
                ),
                (Data::I32(a), Data::I32(b)) => Tensor::i32(
                    shape.to_vec(),
                    collect(n, (0..n).map(|i| if pick(i) == 1 { a[i] } else { b[i] }))?,
                ),
                (Data::Bool(a), Data::Bool(b)) => Tensor::bool(
                    shape.to_vec(),
                    collect(n, (0..n).map(|i| if pick(i) == 1 { a[i] } else { b[i] }))?,
                ),
                _ => return fail("operands differ in dtype"),
            })
        }
        Op::Reduce { op, axis } => reduce(*op, *axis, dtype, args[0]),
        Op::MatMul => matmul(args[0], args[1], dtype, shape),
        Op::Gather { axis } => gather(args[0], args[1], *axis, shape),
        Op::StopGradient => copy(args[0]),
        Op::ScatterAdd { axis, .. } => scatter_add(args[0], args[1], *axis, dtype, shape),
        Op::Reshape { .. } => Ok(Tensor {
            shape: shape.to_vec(),
            data: copy_data(&args[0].data)?,
        }),
        Op::Permute { perm } => permute(args[0], perm, shape),
        Op::Expand { .. } => expand(args[0], shape),
        Op::Slice {
            axis,
            start,
            end,
            step,
        } => {
            // With symbolic sizes (`x[:, 3]` of `f32[B, T]`) the bounds are only known now.
            let (start, end) = (size(start, dims)?, size(end, dims)?);
            let x = args[0];
            let n = x.shape[*axis];
            if start > end || end > n {
                return fail(format!(
                    "{start}..{end} is out of range for axis {axis} of size {n}"
                ));
            }
            let st = *step as usize;
            gather_view(x, shape, |idx, out| {
                out.copy_from_slice(idx);
                out[*axis] = start + idx[*axis] * st;
            })
        }
        Op::Concat { axis } => concat(args, *axis, shape),
        Op::Pad {
            axis,
            before,
            value,
            ..
        } => {
            let b = size(before, dims)?;
            let x = args[0];
            let mut out = fill(dtype, shape, *value)?;
            let xs = strides(&x.shape);
            let os = strides(shape);
            for i in 0..x.numel() {
                let mut o = 0;
                for d in 0..shape.len() {
                    let c = (i / xs[d]) % x.shape[d];
                    o += (if d == *axis { c + b } else { c }) * os[d];
                }
                copy_elem(&x.data, i, &mut out.data, o);
            }
            Ok(out)
        }
        Op::Cast { dtype: to } => cast(args[0], *to),
    }
}

/// A tensor as a value of `dtype`: f16/bf16 values are rounded to that precision (inputs and
/// parameters of those dtypes arrive as f32 values), f32 values given to an f64 node are
/// widened and f64 values given to a narrower float node rounded; anything else is passed
/// through.
fn narrow(dtype: DType, t: &Tensor) -> R<Tensor> {
    match (&t.data, dtype) {
        (Data::F32(_), DType::F16 | DType::BF16 | DType::F64) => {
            from_f64(dtype, &t.shape, &f64s(t)?)
        }
        (Data::F64(_), DType::F32 | DType::F16 | DType::BF16) => {
            from_f64(dtype, &t.shape, &f64s(t)?)
        }
        _ => copy(t),
    }
}

/// A tensor of `dtype` with every element `value` (as [`from_f64`] would store it).
fn fill(dtype: DType, shape: &[usize], value: f64) -> R<Tensor> {
    Ok(Tensor::full(dtype, shape.to_vec(), value, buffer_what)?)
}

/// f64 values as a tensor of `dtype` (f16/bf16 rounded to their precision).
fn from_f64(dtype: DType, shape: &[usize], v: &[f64]) -> R<Tensor> {
    let n = v.len();
    Ok(match dtype {
        DType::I32 => Tensor::i32(shape.to_vec(), collect(n, v.iter().map(|&x| x as i32))?),
        DType::Bool => Tensor::bool(shape.to_vec(), collect(n, v.iter().map(|&x| x != 0.0))?),
        DType::F64 => Tensor::f64(shape.to_vec(), collect(n, v.iter().copied())?),
        DType::F16 => Tensor::f32(
            shape.to_vec(),
            collect(n, v.iter().map(|&x| half::f16::from_f64(x).to_f32()))?,
        ),
        DType::BF16 => Tensor::f32(
            shape.to_vec(),
            collect(n, v.iter().map(|&x| half::bf16::from_f64(x).to_f32()))?,
        ),
        _ => Tensor::f32(shape.to_vec(), collect(n, v.iter().map(|&x| x as f32))?),
    })
}

fn copy_elem(src: &Data, i: usize, dst: &mut Data, o: usize) {
    match (src, dst) {
        (Data::F32(s), Data::F32(d)) => d[o] = s[i],
        (Data::F64(s), Data::F64(d)) => d[o] = s[i],
        (Data::I32(s), Data::I32(d)) => d[o] = s[i],
        (Data::Bool(s), Data::Bool(d)) => d[o] = s[i],
        _ => {}
    }
}

/// An output built by reading, for each output index, one input element.
fn gather_view(x: &Tensor, shape: &[usize], map: impl Fn(&[usize], &mut [usize])) -> R<Tensor> {
    let n = alloc::numel(shape).unwrap_or(usize::MAX);
    let os = strides(shape);
    let xs = strides(&x.shape);
    let mut idx = vec![0; shape.len()];
    let mut src = vec![0; x.shape.len()];
    let mut offsets = collect(n, [])?;
    for i in 0..n {
        for d in 0..shape.len() {
            idx[d] = (i / os[d]) % shape[d];
        }
        map(&idx, &mut src);
        offsets.push(src.iter().zip(&xs).map(|(a, b)| a * b).sum::<usize>());
    }
    let data = match &x.data {
        Data::F32(v) => Data::F32(collect(n, offsets.iter().map(|&o| v[o]))?),
        Data::F64(v) => Data::F64(collect(n, offsets.iter().map(|&o| v[o]))?),
        Data::I32(v) => Data::I32(collect(n, offsets.iter().map(|&o| v[o]))?),
        Data::Bool(v) => Data::Bool(collect(n, offsets.iter().map(|&o| v[o]))?),
    };
    Ok(Tensor {
        shape: shape.to_vec(),
        data,
    })
}

fn permute(x: &Tensor, perm: &[usize], shape: &[usize]) -> R<Tensor> {
    gather_view(x, shape, |idx, src| {
        for (o, &p) in perm.iter().enumerate() {
            src[p] = idx[o];
        }
    })
}

fn expand(x: &Tensor, shape: &[usize]) -> R<Tensor> {
    gather_view(x, shape, |idx, src| {
        for d in 0..idx.len() {
            src[d] = if x.shape[d] == 1 { 0 } else { idx[d] };
        }
    })
}

fn concat(args: &[&Tensor], axis: usize, shape: &[usize]) -> R<Tensor> {
    let os = strides(shape);
    let n = alloc::numel(shape).unwrap_or(usize::MAX);
    let mut out = match &args[0].data {
        Data::F32(_) => Tensor::f32(shape.to_vec(), zeros(n, 0.0)?),
        Data::F64(_) => Tensor::f64(shape.to_vec(), zeros(n, 0.0)?),
        Data::I32(_) => Tensor::i32(shape.to_vec(), zeros(n, 0)?),
        Data::Bool(_) => Tensor::bool(shape.to_vec(), zeros(n, false)?),
    };
    let mut offset = 0;
    for x in args {
        let xs = strides(&x.shape);
        for i in 0..x.numel() {
            let mut o = 0;
            for d in 0..shape.len() {
                let c = (i / xs[d]) % x.shape[d];
                o += (if d == axis { c + offset } else { c }) * os[d];
            }
            copy_elem(&x.data, i, &mut out.data, o);
        }
        offset += x.shape[axis];
    }
    Ok(out)
}

fn unary(op: UnaryOp, dtype: DType, x: &Tensor) -> R<Tensor> {
    let shape = x.shape.clone();
    match &x.data {
        Data::F32(_) | Data::F64(_) => {
            let f: fn(f64) -> f64 = match op {
                UnaryOp::Neg => |a| -a,
                UnaryOp::Abs => f64::abs,
                UnaryOp::Exp => f64::exp,
                UnaryOp::Log => f64::ln,
                UnaryOp::Sqrt => f64::sqrt,
                UnaryOp::Rsqrt => |a| 1.0 / a.sqrt(),
                UnaryOp::Recip => |a| 1.0 / a,
                UnaryOp::Tanh => f64::tanh,
                UnaryOp::Erf => libm::erf,
                UnaryOp::Sin => f64::sin,
                UnaryOp::Cos => f64::cos,
                UnaryOp::Floor => f64::floor,
                UnaryOp::Not => return fail("`not` of a float tensor"),
            };
            let mut out = f64s(x)?;
            out.iter_mut().for_each(|a| *a = f(*a));
            from_f64(dtype, &shape, &out)
        }
        Data::I32(v) => match op {
            UnaryOp::Neg => Ok(Tensor::i32(
                shape,
                collect(v.len(), v.iter().map(|a| a.wrapping_neg()))?,
            )),
            UnaryOp::Abs => Ok(Tensor::i32(
                shape,
                collect(v.len(), v.iter().map(|a| a.wrapping_abs()))?,
            )),
            _ => fail(format!("`{}` of an i32 tensor", op.name())),
        },
        Data::Bool(v) => match op {
            UnaryOp::Not => Ok(Tensor::bool(shape, collect(v.len(), v.iter().map(|a| !a))?)),
            _ => fail(format!("`{}` of a bool tensor", op.name())),
        },
    }
}

fn compare(op: BinaryOp, a: f64, b: f64) -> Option<bool> {
    Some(match op {
        BinaryOp::Eq => a == b,
        BinaryOp::Ne => a != b,
        BinaryOp::Lt => a < b,
        BinaryOp::Le => a <= b,
        BinaryOp::Gt => a > b,
        BinaryOp::Ge => a >= b,
        _ => return None,
    })
}

fn binary(op: BinaryOp, dtype: DType, x: &Tensor, y: &Tensor) -> R<Tensor> {
    let shape = x.shape.clone();
    if op.is_comparison() {
        let (a, b) = (f64s(x)?, f64s(y)?);
        let v = collect(
            a.len(),
            a.iter()
                .zip(&b)
                .map(|(&p, &q)| compare(op, p, q).unwrap_or(false)),
        )?;
        return Ok(Tensor::bool(shape, v));
    }
    match (&x.data, &y.data) {
        (Data::F32(_) | Data::F64(_), Data::F32(_) | Data::F64(_)) => {
            let f: fn(f64, f64) -> f64 = match op {
                BinaryOp::Add => |p, q| p + q,
                BinaryOp::Sub => |p, q| p - q,
                BinaryOp::Mul => |p, q| p * q,
                BinaryOp::Div => |p, q| p / q,
                BinaryOp::Pow => f64::powf,
                // NaN propagates, as in torch.maximum / torch.minimum.
                BinaryOp::Max => |p, q| {
                    if p.is_nan() || q.is_nan() {
                        f64::NAN
                    } else {
                        p.max(q)
                    }
                },
                BinaryOp::Min => |p, q| {
                    if p.is_nan() || q.is_nan() {
                        f64::NAN
                    } else {
                        p.min(q)
                    }
                },
                // Python / torch.remainder: the result has the divisor's sign.
                BinaryOp::Mod => |p, q| p - q * (p / q).floor(),
                _ => return fail(format!("`{}` of float tensors", op.name())),
            };
            let mut out = f64s(x)?;
            let q = f64s(y)?;
            out.iter_mut().zip(q).for_each(|(p, q)| *p = f(*p, q));
            from_f64(dtype, &shape, &out)
        }
        (Data::I32(a), Data::I32(b)) => {
            let mut out = collect(a.len(), [])?;
            for (&p, &q) in a.iter().zip(b) {
                out.push(match op {
                    BinaryOp::Add => p.wrapping_add(q),
                    BinaryOp::Sub => p.wrapping_sub(q),
                    BinaryOp::Mul => p.wrapping_mul(q),
                    BinaryOp::Max => p.max(q),
                    BinaryOp::Min => p.min(q),
                    // Floor division and remainder with the divisor's sign, as in Python.
                    BinaryOp::Div | BinaryOp::Mod => {
                        if q == 0 {
                            return fail("integer division by zero");
                        }
                        // Wrapping: `i32::MIN / -1` overflows (to `i32::MIN`), as `add` does.
                        let r = p.wrapping_rem(q);
                        let d = p.wrapping_div(q) - i32::from(r != 0 && ((r < 0) != (q < 0)));
                        if op == BinaryOp::Div {
                            d
                        } else {
                            p.wrapping_sub(d.wrapping_mul(q))
                        }
                    }
                    _ => return fail(format!("`{}` of i32 tensors", op.name())),
                });
            }
            Ok(Tensor::i32(shape, out))
        }
        (Data::Bool(a), Data::Bool(b)) => {
            let f: fn(bool, bool) -> bool = match op {
                BinaryOp::And => |p, q| p && q,
                BinaryOp::Or => |p, q| p || q,
                _ => return fail(format!("`{}` of bool tensors", op.name())),
            };
            Ok(Tensor::bool(
                shape,
                collect(a.len(), a.iter().zip(b).map(|(&p, &q)| f(p, q)))?,
            ))
        }
        _ => fail("operands differ in dtype"),
    }
}

/// Sum or max along `axis`: floats in f64 (NaN propagates through `max`, as in torch); i32
/// exactly, the sum wrapping around like `add`.
fn reduce(op: ReduceOp, axis: usize, dtype: DType, x: &Tensor) -> R<Tensor> {
    let mut shape = x.shape.clone();
    let len = shape[axis];
    shape[axis] = 1;
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    // The positions of the elements combined into output element (o, i).
    let lane = |o: usize, i: usize| (0..len).map(move |k| (o * len + k) * inner + i);
    let outs = (0..outer).flat_map(|o| (0..inner).map(move |i| (o, i)));
    let n = outer.saturating_mul(inner);
    if let Data::I32(v) = &x.data {
        let out = collect(
            n,
            outs.map(|(o, i)| match op {
                ReduceOp::Sum => lane(o, i).map(|at| i64::from(v[at])).sum::<i64>() as i32,
                ReduceOp::Max => lane(o, i).map(|at| v[at]).max().unwrap_or(i32::MIN),
            }),
        )?;
        return Ok(Tensor::i32(shape, out));
    }
    let vals = f64s(x)?;
    let out = collect(
        n,
        outs.map(|(o, i)| match op {
            ReduceOp::Sum => lane(o, i).map(|at| vals[at]).sum::<f64>(),
            ReduceOp::Max => lane(o, i).fold(f64::NEG_INFINITY, |m, at| {
                if m.is_nan() || vals[at].is_nan() {
                    f64::NAN
                } else {
                    m.max(vals[at])
                }
            }),
        }),
    )?;
    from_f64(dtype, &shape, &out)
}

fn matmul(a: &Tensor, b: &Tensor, dtype: DType, shape: &[usize]) -> R<Tensor> {
    if !a.is_float() || !b.is_float() {
        return fail("matmul of non-float tensors");
    }
    let (av, bv) = (f64s(a)?, f64s(b)?);
    let r = a.shape.len();
    let (m, k, n) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1]);
    let batch: usize = a.shape[..r - 2].iter().product();
    let mut out = zeros(alloc::numel(shape).unwrap_or(usize::MAX), 0f64)?;
    let mut row = zeros(n, 0f64)?;
    for bi in 0..batch {
        let (ao, bo, oo) = (bi * m * k, bi * k * n, bi * m * n);
        for i in 0..m {
            row.iter_mut().for_each(|x| *x = 0.0);
            for p in 0..k {
                let aip = av[ao + i * k + p];
                let brow = &bv[bo + p * n..bo + (p + 1) * n];
                for (acc, &bj) in row.iter_mut().zip(brow) {
                    *acc += aip * bj;
                }
            }
            out[oo + i * n..oo + (i + 1) * n].copy_from_slice(&row);
        }
    }
    from_f64(dtype, shape, &out)
}

fn gather(table: &Tensor, idx: &Tensor, axis: usize, shape: &[usize]) -> R<Tensor> {
    let ids = idx.as_i32().ok_or_else(|| RunError {
        message: "gather indices are not i32".into(),
    })?;
    let size = table.shape[axis];
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= size) {
        return fail(format!(
            "index {bad} is out of range for an axis of size {size}"
        ));
    }
    let ir = idx.shape.len();
    let istr = strides(&idx.shape);
    gather_view(table, shape, |o, src| {
        // out = table[:axis] ++ idx.shape ++ table[axis+1:]
        src[..axis].copy_from_slice(&o[..axis]);
        let flat: usize = (0..ir).map(|d| o[axis + d] * istr[d]).sum();
        src[axis] = ids[flat] as usize;
        src[axis + 1..].copy_from_slice(&o[axis + ir..]);
    })
}

/// `out[p, idx[k], s] += src[p, k, s]` into zeros of `shape`, summed in f64 in index order.
fn scatter_add(
    src: &Tensor,
    idx: &Tensor,
    axis: usize,
    dtype: DType,
    shape: &[usize],
) -> R<Tensor> {
    let ids = idx.as_i32().ok_or_else(|| RunError {
        message: "scatter-add indices are not i32".into(),
    })?;
    let size = shape[axis];
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= size) {
        return fail(format!(
            "index {bad} is out of range for an axis of size {size}"
        ));
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let x = f64s(src)?;
    let mut out = zeros(alloc::numel(shape).unwrap_or(usize::MAX), 0f64)?;
    for p in 0..outer {
        for (k, &j) in ids.iter().enumerate() {
            let from = (p * ids.len() + k) * inner;
            let to = (p * size + j as usize) * inner;
            for s in 0..inner {
                out[to + s] += x[from + s];
            }
        }
    }
    from_f64(dtype, shape, &out)
}

fn cast(x: &Tensor, to: DType) -> R<Tensor> {
    let shape = x.shape.clone();
    let n = x.numel();
    Ok(match to {
        DType::I32 => match &x.data {
            // Toward zero, saturating (NaN becomes 0), like Rust's `as`.
            Data::F32(v) => Tensor::i32(shape, collect(n, v.iter().map(|&a| a as i32))?),
            Data::F64(v) => Tensor::i32(shape, collect(n, v.iter().map(|&a| a as i32))?),
            Data::I32(v) => Tensor::i32(shape, collect(n, v.iter().copied())?),
            Data::Bool(v) => Tensor::i32(shape, collect(n, v.iter().map(|&a| i32::from(a)))?),
        },
        DType::Bool => Tensor::bool(shape, collect(n, f64s(x)?.iter().map(|&a| a != 0.0))?),
        _ => from_f64(to, &shape, &f64s(x)?)?,
    })
}

#[cfg(test)]
mod tests {
    //! What `.vlm` cannot express; the per-op cases are `tests/interp/*.vlm` at the root.

    use super::*;
    use vlmc::ir::TensorType;

    fn ty(text: &str) -> TensorType {
        TensorType::parse(text).expect("a tensor type")
    }

    /// A graph of inputs (name, type), then one op applied to the first input, as `out`.
    fn graph(inputs: &[(&str, &str)], op: Op) -> Graph {
        let mut g = Graph::new("test");
        let ids: Vec<NodeId> = inputs
            .iter()
            .map(|(name, t)| {
                let op = Op::Input {
                    name: name.to_string(),
                };
                g.add_source(op, ty(t), "").expect("input")
            })
            .collect();
        let out = g.add(op, &ids[..1], "").expect("op");
        g.set_output("out", out).expect("output");
        g
    }

    fn feed(items: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
        items
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect()
    }

    fn run1(g: &Graph, inputs: &[(&str, Tensor)]) -> R<Tensor> {
        Ok(run(g, &feed(inputs), &BTreeMap::new())?["out"].clone())
    }

    /// Bit patterns, so that NaN compares equal to NaN and -0 differs from 0.
    fn bits(t: &Tensor) -> Vec<u32> {
        t.as_f32()
            .expect("f32")
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    fn f32s(values: &[f32]) -> Vec<u32> {
        values.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn dims_bind_from_the_first_input_and_are_checked_on_the_others() {
        let g = graph(
            &[("x", "f32[B, T]"), ("y", "f32[T, B]"), ("z", "f32[B + 1]")],
            Op::Unary(UnaryOp::Neg),
        );
        let x = Tensor::f32(vec![2, 3], vec![0.0; 6]);
        let ok = feed(&[
            ("x", x.clone()),
            ("y", Tensor::f32(vec![3, 2], vec![0.0; 6])),
            ("z", Tensor::f32(vec![3], vec![0.0; 3])),
        ]);
        let dims = bind_dims(&g, &ok).expect("consistent");
        assert_eq!((dims["B"], dims["T"]), (2, 3));

        let swapped = feed(&[
            ("x", x.clone()),
            ("y", Tensor::f32(vec![2, 3], vec![0.0; 6])),
            ("z", Tensor::f32(vec![3], vec![0.0; 3])),
        ]);
        assert_eq!(
            bind_dims(&g, &swapped).unwrap_err().message,
            "input `y` has shape [2, 3], but the model expects f32[T, B] = [3, 2] (with B=2, T=3)"
        );
        let short = feed(&[
            ("x", x),
            ("y", Tensor::f32(vec![3, 2], vec![0.0; 6])),
            ("z", Tensor::f32(vec![2], vec![0.0; 2])),
        ]);
        let err = bind_dims(&g, &short).unwrap_err().message;
        assert!(err.starts_with("input `z` has shape [2], but the model expects f32[B + 1] = [3]"));
    }

    #[test]
    fn a_value_larger_than_memory_is_an_error_not_an_abort() {
        // 4 TB: more than any machine that runs the tests has.
        let mut g = Graph::new("test");
        let c = g
            .add_source(Op::Const { value: 1.0 }, ty("f32[1000000, 1000000]"), "big")
            .unwrap();
        let e = g.add(Op::Unary(UnaryOp::Exp), &[c], "big").unwrap();
        g.set_output("out", e).unwrap();
        let err = run(&g, &BTreeMap::new(), &BTreeMap::new()).unwrap_err();
        let want = "const (f32[1000000, 1000000] in `big`): its value [1000000, 1000000] f32 \
                    needs 4.0 TB; this machine has ";
        assert!(err.message.starts_with(want), "{}", err.message);
        assert!(err.message.ends_with(" available"), "{}", err.message);
        // The estimate of an arithmetic op counts the f64 copies it makes.
        let x = Tensor {
            shape: vec![1_000_000, 1_000_000],
            data: Data::F32(Vec::new()),
        };
        let bytes = working_bytes(&Op::Unary(UnaryOp::Exp), DType::F32, &x.shape, &[&x]);
        assert_eq!(bytes, Some(20_000_000_000_000));
    }

    #[test]
    fn a_size_that_overflows_is_an_error() {
        let mut g = Graph::new("test");
        let x = g
            .add_source(Op::Input { name: "x".into() }, ty("i32[B]"), "")
            .unwrap();
        let c = g
            .add_source(Op::Const { value: 1.0 }, ty("f32[B*B*B]"), "")
            .unwrap();
        g.set_output("x", x).unwrap();
        g.set_output("out", c).unwrap();
        let xs = feed(&[("x", Tensor::i32(vec![3_000_000], vec![0; 3_000_000]))]);
        let err = run(&g, &xs, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            err.message,
            "const (f32[B*B*B]): dimension B*B*B overflows a 64-bit integer with B=3000000"
        );
    }

    #[test]
    fn a_size_that_no_input_gives_is_an_error() {
        let mut g = Graph::new("test");
        let c = g
            .add_source(Op::Const { value: 1.0 }, ty("f32[S]"), "")
            .unwrap();
        g.set_output("out", c).unwrap();
        let err = run(&g, &BTreeMap::new(), &BTreeMap::new()).unwrap_err();
        assert_eq!(
            err.message,
            "const (f32[S]): dimension S has an unknown size"
        );
    }

    #[test]
    fn reductions_propagate_nan_wherever_it_is() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let rows = [
            [nan, 1.0, 2.0],  // NaN first
            [1.0, 2.0, nan],  // NaN last
            [-inf, nan, inf], // NaN between infinities
            [-1.0, -3.0, -2.0],
        ];
        let x = Tensor::f32(vec![4, 3], rows.concat());
        let max = Op::Reduce {
            op: ReduceOp::Max,
            axis: 1,
        };
        let sum = Op::Reduce {
            op: ReduceOp::Sum,
            axis: 1,
        };
        let m = run1(&graph(&[("x", "f32[4, 3]")], max), &[("x", x.clone())]).unwrap();
        let s = run1(&graph(&[("x", "f32[4, 3]")], sum), &[("x", x)]).unwrap();
        assert_eq!(bits(&m), f32s(&[f32::NAN, f32::NAN, f32::NAN, -1.0]));
        assert_eq!(bits(&s), f32s(&[f32::NAN, f32::NAN, f32::NAN, -6.0]));
        assert_eq!(m.shape, vec![4, 1]);
    }

    #[test]
    fn reductions_over_an_empty_axis() {
        let empty = Tensor::f32(vec![2, 0], vec![]);
        for (op, want) in [(ReduceOp::Sum, 0.0), (ReduceOp::Max, f32::NEG_INFINITY)] {
            let g = graph(&[("x", "f32[2, 0]")], Op::Reduce { op, axis: 1 });
            let out = run1(&g, &[("x", empty.clone())]).unwrap();
            assert_eq!(out, Tensor::f32(vec![2, 1], vec![want; 2]));
        }
        let g = graph(
            &[("x", "i32[0]")],
            Op::Reduce {
                op: ReduceOp::Max,
                axis: 0,
            },
        );
        let out = run1(&g, &[("x", Tensor::i32(vec![0], vec![]))]).unwrap();
        assert_eq!(out, Tensor::i32(vec![1], vec![i32::MIN]));
    }

    #[test]
    fn f16_casts_round_to_nearest_even_and_overflow_to_inf() {
        let tiny = 2f32.powi(-24); // the smallest f16 subnormal
        let x = Tensor::f32(
            vec![9],
            vec![
                1.0 + 2f32.powi(-11),       // halfway between 1 and 1 + 2^-10: to even, 1
                1.0 + 3.0 * 2f32.powi(-11), // halfway between 1 + 2^-10 and 1 + 2^-9: 1 + 2^-9
                1.5 * tiny,                 // halfway between 1 and 2 subnormal steps: 2 steps
                0.5 * tiny,                 // halfway between 0 and 1 step: 0
                0.75 * tiny,                // above halfway: 1 step
                65519.0,                    // below the midpoint to 65536: the largest f16
                -65520.0,                   // the midpoint: overflows to -inf
                f32::NAN,
                -0.0,
            ],
        );
        let g = graph(&[("x", "f32[9]")], Op::Cast { dtype: DType::F16 });
        let out = run1(&g, &[("x", x)]).unwrap();
        let want = [
            1.0,
            1.0 + 2f32.powi(-9),
            2.0 * tiny,
            0.0,
            tiny,
            65504.0,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
        ];
        assert_eq!(bits(&out), f32s(&want));
    }

    #[test]
    fn bf16_casts_round_to_nearest_even_and_overflow_to_inf() {
        let x = Tensor::f32(
            vec![5],
            vec![
                1.0 + 2f32.powi(-8),                  // halfway between 1 and 1 + 2^-7: 1
                1.0 + 3.0 * 2f32.powi(-8), // halfway between 1 + 2^-7 and 1 + 2^-6: 1 + 2^-6
                1.0 + 2f32.powi(-8) + 2f32.powi(-20), // above halfway: 1 + 2^-7
                f32::MAX,                  // above the largest bf16 and the midpoint: inf
                1e-40,                     // an f32 subnormal; bf16 has f32's exponent range
            ],
        );
        let g = graph(&[("x", "f32[5]")], Op::Cast { dtype: DType::BF16 });
        let out = run1(&g, &[("x", x)]).unwrap();
        // 1e-40 rounds down: the 16 bits that bf16 drops are below half (0x8000).
        let sub = f32::from_bits(1e-40f32.to_bits() & 0xFFFF_0000);
        let want = [
            1.0,
            1.0 + 2f32.powi(-6),
            1.0 + 2f32.powi(-7),
            f32::INFINITY,
            sub,
        ];
        assert_eq!(bits(&out), f32s(&want));
    }

    #[test]
    fn narrow_ops_round_their_results() {
        // iota into f16: indices above 2048 are not all representable (2049 -> 2048).
        let mut g = Graph::new("test");
        let i = g
            .add_source(Op::Iota { axis: 0 }, ty("f16[2051]"), "")
            .unwrap();
        g.set_output("out", i).unwrap();
        let out = run(&g, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert_eq!(
            out["out"].as_f32().unwrap()[2047..],
            [2047.0, 2048.0, 2048.0, 2050.0]
        );
        // bf16 exp(1) = 2.71875 (2.718281... with 7 fraction bits: 2 * (1 + 46/128)).
        let g = graph(&[("x", "bf16[1]")], Op::Unary(UnaryOp::Exp));
        let out = run1(&g, &[("x", Tensor::f32(vec![1], vec![1.0]))]).unwrap();
        assert_eq!(out.as_f32().unwrap(), [2.71875]);
    }

    #[test]
    fn f64_nodes_are_not_rounded() {
        // exp(0.1) in f64 differs from its f32 rounding; an f64 graph keeps every bit, and an
        // f32 tensor fed to an f64 input is widened exactly.
        let g = graph(&[("x", "f64[2]")], Op::Unary(UnaryOp::Exp));
        let out = run1(&g, &[("x", Tensor::f64(vec![2], vec![0.1, -1e-300]))]).unwrap();
        assert_eq!(out.as_f64().unwrap(), [0.1f64.exp(), (-1e-300f64).exp()]);
        let out = run1(&g, &[("x", Tensor::f32(vec![2], vec![0.5, 2.0]))]).unwrap();
        assert_eq!(out.as_f64().unwrap(), [0.5f64.exp(), 2f64.exp()]);
        let mut g = Graph::new("test");
        let a = g
            .add_source(Op::Input { name: "a".into() }, ty("f64[2, 3]"), "")
            .unwrap();
        let b = g
            .add_source(Op::Input { name: "b".into() }, ty("f64[3, 1]"), "")
            .unwrap();
        let m = g.add(Op::MatMul, &[a, b], "").unwrap();
        let c = g.add(Op::Cast { dtype: DType::F32 }, &[m], "").unwrap();
        g.set_output("m", m).unwrap();
        g.set_output("c", c).unwrap();
        let third = 1.0 / 3.0;
        let out = run(
            &g,
            &feed(&[
                (
                    "a",
                    Tensor::f64(vec![2, 3], vec![third, 1.0, 0.0, 0.0, 1.0, third]),
                ),
                ("b", Tensor::f64(vec![3, 1], vec![third, 1e-20, 5.0])),
            ]),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(
            out["m"].as_f64().unwrap(),
            [third * third + 1e-20, 1e-20 + 5.0 * third]
        );
        assert_eq!(
            out["c"].as_f32().unwrap(),
            [(third * third) as f32, (5.0 * third) as f32]
        );
    }

    #[test]
    fn random_follows_the_documented_formula() {
        // The module doc: element 0 of seed 0 is splitmix64(0) >> 11 over 2^53.
        assert_eq!(
            uniform01(0, 0),
            (0xE220_A839_7B1D_CDAF_u64 >> 11) as f64 / 2f64.powi(53)
        );
        let mut g = Graph::new("test");
        let dist = Dist::Normal {
            mean: 1.0,
            std: 2.0,
        };
        let r = g
            .add_source(Op::Random { dist, seed: 7 }, ty("f32[20000]"), "")
            .unwrap();
        g.set_output("out", r).unwrap();
        let v = run(&g, &BTreeMap::new(), &BTreeMap::new()).unwrap()["out"].to_f64();
        // Element 3 uses counters 6 and 7 (Box-Muller).
        let (a, b) = (uniform01(7, 6), uniform01(7, 7));
        let want = 1.0 + 2.0 * (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos();
        assert_eq!(v[3], f64::from(want as f32));
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }

    #[test]
    fn uniform_draws_stay_in_range() {
        let mut g = Graph::new("test");
        let dist = Dist::Uniform { lo: -3.0, hi: -1.0 };
        let r = g
            .add_source(Op::Random { dist, seed: 1 }, ty("f32[1000]"), "")
            .unwrap();
        g.set_output("out", r).unwrap();
        let v = run(&g, &BTreeMap::new(), &BTreeMap::new()).unwrap()["out"].to_f64();
        assert!(v.iter().all(|x| (-3.0..=-1.0).contains(x)));
        assert_eq!(v[0], f64::from((-3.0 + 2.0 * uniform01(1, 0)) as f32));
    }

    #[test]
    fn a_value_used_twice_and_as_an_output_is_kept() {
        let mut g = Graph::new("test");
        let x = g
            .add_source(
                Op::Input {
                    name: "x".to_string(),
                },
                ty("i32[2]"),
                "",
            )
            .unwrap();
        let sq = g.add(Op::Binary(BinaryOp::Mul), &[x, x], "").unwrap();
        g.set_output("x", x).unwrap();
        g.set_output("sq", sq).unwrap();
        let out = run(
            &g,
            &feed(&[("x", Tensor::i32(vec![2], vec![3, -4]))]),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(out["x"], Tensor::i32(vec![2], vec![3, -4]));
        assert_eq!(out["sq"], Tensor::i32(vec![2], vec![9, 16]));
    }

    #[test]
    fn errors_name_the_op_and_its_scope() {
        let mut g = Graph::new("test");
        let table = g
            .add_source(Op::Const { value: 0.0 }, ty("f32[3]"), "")
            .unwrap();
        let idx = g
            .add_source(
                Op::Input {
                    name: "idx".to_string(),
                },
                ty("i32[1]"),
                "",
            )
            .unwrap();
        let out = g
            .add(Op::Gather { axis: 0 }, &[table, idx], "embed")
            .unwrap();
        g.set_output("out", out).unwrap();
        let idx = feed(&[("idx", Tensor::i32(vec![1], vec![3]))]);
        let err = run(&g, &idx, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            err.message,
            "gather (f32[1] in `embed`): index 3 is out of range for an axis of size 3"
        );
    }
}
