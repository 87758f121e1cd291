//! The reference interpreter: the definition of what the graph IR means.
//!
//! Every op is evaluated in the simplest way that is obviously right: elementwise float ops are
//! computed in f64 and rounded to f32, sums and matmuls accumulate in f64, every index is
//! checked. It is slow on purpose; compiled kernels are compared against it.
//!
//! Random numbers are counter-based so that any backend can reproduce them: element `i` of a
//! `random` op with seed `s` draws `u = (splitmix64(s * 2^32 + i) >> 11) / 2^53` in `[0, 1)`.

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
    let order = graph.topo_order();
    // How many uses each value still has, to free intermediates early.
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for o in graph.operands(id) {
            *uses.entry(o).or_default() += 1;
        }
    }
    for (_, o) in &graph.outputs {
        *uses.entry(*o).or_default() += 1;
    }
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let shape = concrete(&node.ty.shape.0, &dims)?;
        let operands = graph.operands(id);
        let args: Vec<&Tensor> = operands
            .iter()
            .map(|o| {
                values.get(o).ok_or_else(|| RunError {
                    message: "internal: operand not computed".into(),
                })
            })
            .collect::<R<_>>()?;
        let out = eval(
            &node.op,
            node.ty.dtype,
            &shape,
            &args,
            &dims,
            inputs,
            params,
        )
        .map_err(|e| RunError {
            message: format!(
                "{} ({}{}): {}",
                node.op.name(),
                node.ty,
                if node.scope.is_empty() {
                    String::new()
                } else {
                    format!(" in `{}`", node.scope)
                },
                e.message
            ),
        })?;
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
    let mut outs = BTreeMap::new();
    for (name, id) in &graph.outputs {
        let t = values.get(id).cloned().ok_or_else(|| RunError {
            message: format!("output `{name}` was not computed"),
        })?;
        outs.insert(name.clone(), t);
    }
    Ok(outs)
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
            Some(v) if v >= 0 => Ok(v as usize),
            Some(v) => fail(format!("dimension {d} is negative ({v})")),
            None => fail(format!("dimension {d} has an unknown size")),
        })
        .collect()
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
    let n: usize = shape.iter().product();
    match op {
        Op::Input { name } => inputs.get(name).cloned().ok_or_else(|| RunError {
            message: format!("missing input `{name}`"),
        }),
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
            Ok(t.clone())
        }
        Op::Const { value } => Ok(fill(dtype, shape, *value)),
        Op::Iota { axis } => {
            let st = strides(shape);
            let idx: Vec<f64> = (0..n)
                .map(|i| ((i / st[*axis]) % shape[*axis]) as f64)
                .collect();
            Ok(from_f64(dtype, shape, &idx))
        }
        Op::Random { dist, seed } => {
            let u = |i: usize, k: u64| uniform01(*seed, (i as u64) * 2 + k);
            let vals: Vec<f64> = (0..n)
                .map(|i| match dist {
                    Dist::Uniform { lo, hi } => lo + (hi - lo) * u(i, 0),
                    Dist::Bernoulli { p } => f64::from(u8::from(u(i, 0) < *p)),
                    Dist::Normal { mean, std } => {
                        let (a, b) = (u(i, 0).max(f64::MIN_POSITIVE), u(i, 1));
                        mean + std * (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
                    }
                })
                .collect();
            Ok(from_f64(dtype, shape, &vals))
        }
        Op::Unary(u) => unary(*u, args[0]),
        Op::Binary(b) => binary(*b, args[0], args[1]),
        Op::Select => {
            let c = args[0].as_bool().ok_or_else(|| RunError {
                message: "condition is not bool".into(),
            })?;
            let pick = |i: usize| if c[i] { 1 } else { 2 };
            Ok(match (&args[1].data, &args[2].data) {
                (Data::F32(a), Data::F32(b)) => Tensor::f32(
                    shape.to_vec(),
                    (0..n)
                        .map(|i| if pick(i) == 1 { a[i] } else { b[i] })
                        .collect(),
                ),
                (Data::I32(a), Data::I32(b)) => Tensor::i32(
                    shape.to_vec(),
                    (0..n)
                        .map(|i| if pick(i) == 1 { a[i] } else { b[i] })
                        .collect(),
                ),
                (Data::Bool(a), Data::Bool(b)) => Tensor::bool(
                    shape.to_vec(),
                    (0..n)
                        .map(|i| if pick(i) == 1 { a[i] } else { b[i] })
                        .collect(),
                ),
                _ => return fail("operands differ in dtype"),
            })
        }
        Op::Reduce { op, axis } => Ok(reduce(*op, *axis, args[0])),
        Op::MatMul => matmul(args[0], args[1], shape),
        Op::Gather { axis } => gather(args[0], args[1], *axis, shape),
        Op::Reshape { .. } => Ok(Tensor {
            shape: shape.to_vec(),
            data: args[0].data.clone(),
        }),
        Op::Permute { perm } => Ok(permute(args[0], perm, shape)),
        Op::Expand { .. } => Ok(expand(args[0], shape)),
        Op::Slice {
            axis, start, step, ..
        } => {
            let start = concrete(std::slice::from_ref(start), dims)?[0];
            let st = *step as usize;
            let x = args[0];
            Ok(gather_view(x, shape, |idx, out| {
                out.copy_from_slice(idx);
                out[*axis] = start + idx[*axis] * st;
            }))
        }
        Op::Concat { axis } => Ok(concat(args, *axis, shape)),
        Op::Pad {
            axis,
            before,
            value,
            ..
        } => {
            let b = concrete(std::slice::from_ref(before), dims)?[0];
            let x = args[0];
            let mut out = fill(dtype, shape, *value);
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
        Op::Cast { dtype: to } => Ok(cast(args[0], *to)),
    }
}

/// splitmix64 of (seed, counter), as a uniform number in [0, 1).
fn uniform01(seed: u64, counter: u64) -> f64 {
    let mut z = seed
        .wrapping_mul(1 << 32)
        .wrapping_add(counter)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A tensor of `dtype` with every element `value`.
fn fill(dtype: DType, shape: &[usize], value: f64) -> Tensor {
    let n = shape.iter().product();
    from_f64(dtype, shape, &vec![value; n])
}

/// f64 values as a tensor of `dtype` (f16/bf16 rounded to their precision).
fn from_f64(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    match dtype {
        DType::I32 => Tensor::i32(shape.to_vec(), v.iter().map(|&x| x as i32).collect()),
        DType::Bool => Tensor::bool(shape.to_vec(), v.iter().map(|&x| x != 0.0).collect()),
        DType::F16 => Tensor::f32(
            shape.to_vec(),
            v.iter().map(|&x| half::f16::from_f64(x).to_f32()).collect(),
        ),
        DType::BF16 => Tensor::f32(
            shape.to_vec(),
            v.iter()
                .map(|&x| half::bf16::from_f64(x).to_f32())
                .collect(),
        ),
        _ => Tensor::f32(shape.to_vec(), v.iter().map(|&x| x as f32).collect()),
    }
}

fn copy_elem(src: &Data, i: usize, dst: &mut Data, o: usize) {
    match (src, dst) {
        (Data::F32(s), Data::F32(d)) => d[o] = s[i],
        (Data::I32(s), Data::I32(d)) => d[o] = s[i],
        (Data::Bool(s), Data::Bool(d)) => d[o] = s[i],
        _ => {}
    }
}

/// An output built by reading, for each output index, one input element.
fn gather_view(x: &Tensor, shape: &[usize], map: impl Fn(&[usize], &mut [usize])) -> Tensor {
    let n: usize = shape.iter().product();
    let os = strides(shape);
    let xs = strides(&x.shape);
    let mut idx = vec![0; shape.len()];
    let mut src = vec![0; x.shape.len()];
    let mut offsets = Vec::with_capacity(n);
    for i in 0..n {
        for d in 0..shape.len() {
            idx[d] = (i / os[d]) % shape[d];
        }
        map(&idx, &mut src);
        offsets.push(src.iter().zip(&xs).map(|(a, b)| a * b).sum::<usize>());
    }
    let data = match &x.data {
        Data::F32(v) => Data::F32(offsets.iter().map(|&o| v[o]).collect()),
        Data::I32(v) => Data::I32(offsets.iter().map(|&o| v[o]).collect()),
        Data::Bool(v) => Data::Bool(offsets.iter().map(|&o| v[o]).collect()),
    };
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

fn permute(x: &Tensor, perm: &[usize], shape: &[usize]) -> Tensor {
    gather_view(x, shape, |idx, src| {
        for (o, &p) in perm.iter().enumerate() {
            src[p] = idx[o];
        }
    })
}

fn expand(x: &Tensor, shape: &[usize]) -> Tensor {
    gather_view(x, shape, |idx, src| {
        for d in 0..idx.len() {
            src[d] = if x.shape[d] == 1 { 0 } else { idx[d] };
        }
    })
}

fn concat(args: &[&Tensor], axis: usize, shape: &[usize]) -> Tensor {
    let os = strides(shape);
    let mut out = match &args[0].data {
        Data::F32(_) => Tensor::f32(shape.to_vec(), vec![0.0; shape.iter().product()]),
        Data::I32(_) => Tensor::i32(shape.to_vec(), vec![0; shape.iter().product()]),
        Data::Bool(_) => Tensor::bool(shape.to_vec(), vec![false; shape.iter().product()]),
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
    out
}

fn unary(op: UnaryOp, x: &Tensor) -> R<Tensor> {
    let shape = x.shape.clone();
    match &x.data {
        Data::F32(v) => {
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
            Ok(Tensor::f32(
                shape,
                v.iter().map(|&a| f(f64::from(a)) as f32).collect(),
            ))
        }
        Data::I32(v) => match op {
            UnaryOp::Neg => Ok(Tensor::i32(
                shape,
                v.iter().map(|a| a.wrapping_neg()).collect(),
            )),
            UnaryOp::Abs => Ok(Tensor::i32(
                shape,
                v.iter().map(|a| a.wrapping_abs()).collect(),
            )),
            _ => fail(format!("`{}` of an i32 tensor", op.name())),
        },
        Data::Bool(v) => match op {
            UnaryOp::Not => Ok(Tensor::bool(shape, v.iter().map(|a| !a).collect())),
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

fn binary(op: BinaryOp, x: &Tensor, y: &Tensor) -> R<Tensor> {
    let shape = x.shape.clone();
    if op.is_comparison() {
        let (a, b) = (x.to_f64(), y.to_f64());
        let v = a
            .iter()
            .zip(&b)
            .map(|(&p, &q)| compare(op, p, q).unwrap_or(false))
            .collect();
        return Ok(Tensor::bool(shape, v));
    }
    match (&x.data, &y.data) {
        (Data::F32(a), Data::F32(b)) => {
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
            Ok(Tensor::f32(
                shape,
                a.iter()
                    .zip(b)
                    .map(|(&p, &q)| f(f64::from(p), f64::from(q)) as f32)
                    .collect(),
            ))
        }
        (Data::I32(a), Data::I32(b)) => {
            let mut out = Vec::with_capacity(a.len());
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
                        let d = p.wrapping_div(q) - i32::from((p % q != 0) && ((p < 0) != (q < 0)));
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
                a.iter().zip(b).map(|(&p, &q)| f(p, q)).collect(),
            ))
        }
        _ => fail("operands differ in dtype"),
    }
}

fn reduce(op: ReduceOp, axis: usize, x: &Tensor) -> Tensor {
    let mut shape = x.shape.clone();
    let len = shape[axis];
    shape[axis] = 1;
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let vals = x.to_f64();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| vals[(o * len + k) * inner + i];
            out.push(match op {
                ReduceOp::Sum => (0..len).map(at).sum::<f64>(),
                ReduceOp::Max => (0..len).map(at).fold(f64::NEG_INFINITY, |m, v| {
                    if m.is_nan() || v.is_nan() {
                        f64::NAN
                    } else {
                        m.max(v)
                    }
                }),
            });
        }
    }
    match x.data {
        Data::I32(_) => Tensor::i32(shape, out.iter().map(|&v| v as i32).collect()),
        _ => Tensor::f32(shape, out.iter().map(|&v| v as f32).collect()),
    }
}

fn matmul(a: &Tensor, b: &Tensor, shape: &[usize]) -> R<Tensor> {
    let (Some(av), Some(bv)) = (a.as_f32(), b.as_f32()) else {
        return fail("matmul of non-float tensors");
    };
    let r = a.shape.len();
    let (m, k, n) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1]);
    let batch: usize = a.shape[..r - 2].iter().product();
    let mut out = vec![0f32; batch * m * n];
    let mut row = vec![0f64; n];
    for bi in 0..batch {
        let (ao, bo, oo) = (bi * m * k, bi * k * n, bi * m * n);
        for i in 0..m {
            row.iter_mut().for_each(|x| *x = 0.0);
            for p in 0..k {
                let aip = f64::from(av[ao + i * k + p]);
                let brow = &bv[bo + p * n..bo + (p + 1) * n];
                for (acc, &bj) in row.iter_mut().zip(brow) {
                    *acc += aip * f64::from(bj);
                }
            }
            for (o, &v) in out[oo + i * n..oo + (i + 1) * n].iter_mut().zip(&row) {
                *o = v as f32;
            }
        }
    }
    Ok(Tensor::f32(shape.to_vec(), out))
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
    Ok(gather_view(table, shape, |o, src| {
        // out = table[:axis] ++ idx.shape ++ table[axis+1:]
        src[..axis].copy_from_slice(&o[..axis]);
        let flat: usize = (0..ir).map(|d| o[axis + d] * istr[d]).sum();
        src[axis] = ids[flat] as usize;
        src[axis + 1..].copy_from_slice(&o[axis + ir..]);
    }))
}

fn cast(x: &Tensor, to: DType) -> Tensor {
    let shape = x.shape.clone();
    match to {
        DType::I32 => match &x.data {
            // Toward zero, saturating (NaN becomes 0), like Rust's `as`.
            Data::F32(v) => Tensor::i32(shape, v.iter().map(|&a| a as i32).collect()),
            Data::I32(v) => Tensor::i32(shape, v.clone()),
            Data::Bool(v) => Tensor::i32(shape, v.iter().map(|&a| i32::from(a)).collect()),
        },
        DType::Bool => Tensor::bool(shape, x.to_f64().iter().map(|&a| a != 0.0).collect()),
        _ => from_f64(to, &shape, &x.to_f64()),
    }
}
