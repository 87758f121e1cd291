//! Built-in functions: the primitive ops as the language spells them (`exp`, `sum`, `reshape`,
//! `gather`, `where`, ...) and a few compile-time helpers (`len`, `min`, `int`). Math functions
//! also work on compile-time numbers. Composites (softmax, norms, attention) live in `models/std`.

use super::eval::ArgVal;
use super::value::Value;
use super::{Ctx, Elaborator};
use crate::diag::Diagnostic;
use crate::ir::{BinaryOp, DType, Dim, Dist, NodeId, Op, ReduceOp, Shape, TensorType, UnaryOp};
use std::collections::HashMap;
use vlmc_grammar::ast::Span;

type R<T> = Result<T, Diagnostic>;

/// Every builtin with its parameters: `name` is required, `name=default` optional.
const SIGS: &[(&str, &[&str])] = &[
    ("exp", &["x"]),
    ("log", &["x"]),
    ("sqrt", &["x"]),
    ("rsqrt", &["x"]),
    ("recip", &["x"]),
    ("tanh", &["x"]),
    ("erf", &["x"]),
    ("sin", &["x"]),
    ("cos", &["x"]),
    ("abs", &["x"]),
    ("floor", &["x"]),
    ("pow", &["x", "y"]),
    ("maximum", &["x", "y"]),
    ("minimum", &["x", "y"]),
    ("where", &["cond", "x", "y"]),
    ("sum", &["x", "axis=-1", "keepdim=false"]),
    ("max", &["x", "axis=none", "keepdim=false"]),
    ("min", &["x", "y"]),
    ("matmul", &["x", "y"]),
    ("transpose", &["x", "a=-2", "b=-1"]),
    ("permute", &["x", "perm"]),
    ("reshape", &["x", "shape"]),
    ("unsqueeze", &["x", "axis"]),
    ("squeeze", &["x", "axis"]),
    ("flatten", &["x", "start=0", "end=-1"]),
    ("expand", &["x", "shape"]),
    ("concat", &["xs", "axis=0"]),
    ("stack", &["xs", "axis=0"]),
    ("pad", &["x", "axis", "before=0", "after=0", "value=0.0"]),
    ("gather", &["table", "idx", "axis=0"]),
    ("scatter_add", &["src", "idx", "size", "axis=0"]),
    ("cast", &["x", "dtype"]),
    ("detach", &["x"]),
    ("full", &["shape", "value", "dtype=f32"]),
    ("zeros", &["shape", "dtype=f32"]),
    ("ones", &["shape", "dtype=f32"]),
    ("arange", &["n", "dtype=i32"]),
    ("iota", &["shape", "axis", "dtype=i32"]),
    ("rand", &["shape", "seed=0"]),
    ("bernoulli", &["shape", "p", "seed=0"]),
    ("len", &["x"]),
    ("int", &["x"]),
    ("float", &["x"]),
    ("generating", &[]),
    ("cache_capacity", &[]),
    ("gen_input", &["name", "shape", "dtype=i32"]),
    ("past", &["x", "name"]),
    ("keep", &["x", "name"]),
    ("kept", &["name", "shape", "dtype=f32"]),
];

/// The names of all builtins (for suggestions).
pub const NAMES: &[&str] = &[
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "recip",
    "tanh",
    "erf",
    "sin",
    "cos",
    "abs",
    "floor",
    "pow",
    "maximum",
    "minimum",
    "where",
    "sum",
    "max",
    "min",
    "matmul",
    "transpose",
    "permute",
    "reshape",
    "unsqueeze",
    "squeeze",
    "flatten",
    "expand",
    "concat",
    "stack",
    "pad",
    "gather",
    "scatter_add",
    "cast",
    "detach",
    "full",
    "zeros",
    "ones",
    "arange",
    "iota",
    "rand",
    "bernoulli",
    "len",
    "int",
    "float",
    "generating",
    "cache_capacity",
    "gen_input",
    "past",
    "keep",
    "kept",
];

/// The builtin with this name.
pub fn lookup(name: &str) -> Option<&'static str> {
    SIGS.iter().find(|(n, _)| *n == name).map(|(n, _)| *n)
}

/// Bound arguments of a builtin call.
struct Args {
    vals: HashMap<&'static str, (Value, Span)>,
}

impl Args {
    fn get(&self, k: &str) -> &Value {
        &self.vals[k].0
    }
    fn span(&self, k: &str) -> Span {
        self.vals[k].1
    }
}

fn parse_default(s: &str) -> Value {
    match s {
        "none" => Value::None,
        "false" => Value::Bool(false),
        "true" => Value::Bool(true),
        "f32" => Value::DType(DType::F32),
        "i32" => Value::DType(DType::I32),
        _ => s
            .parse::<i64>()
            .map(Value::Int)
            .or_else(|_| s.parse::<f64>().map(Value::Float))
            .unwrap_or(Value::None),
    }
}

impl Elaborator<'_> {
    fn bind_builtin(&self, cx: &Ctx, name: &'static str, args: Vec<ArgVal>, span: Span) -> R<Args> {
        let sig = SIGS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .unwrap_or(&[]);
        let names: Vec<&'static str> = sig
            .iter()
            .map(|p| p.split('=').next().unwrap_or(p))
            .collect();
        let mut vals: HashMap<&'static str, (Value, Span)> = HashMap::new();
        let mut pos = 0;
        for a in args {
            let key = match &a.name {
                Some(n) => *names.iter().find(|k| **k == n.name).ok_or_else(|| {
                    self.err(
                        cx,
                        n.span,
                        format!("`{name}` has no parameter `{}`", n.name),
                    )
                    .label("unknown parameter")
                    .note(format!("`{name}({})`", sig.join(", ")))
                })?,
                None => {
                    let k = *names.get(pos).ok_or_else(|| {
                        self.err(cx, a.span, format!("too many arguments for `{name}`"))
                            .label("extra argument")
                            .note(format!("`{name}({})`", sig.join(", ")))
                    })?;
                    pos += 1;
                    k
                }
            };
            if let Value::Enum(n) = &a.value {
                let mut d = self
                    .err(cx, a.span, format!("unknown name `{n}`"))
                    .label("not defined here");
                if key == "dtype" {
                    d = d.note(super::DTYPES_NOTE);
                }
                return Err(d);
            }
            if vals.insert(key, (a.value, a.span)).is_some() {
                return Err(self.err(cx, a.span, format!("argument `{key}` is given twice")));
            }
        }
        for (p, k) in sig.iter().zip(&names) {
            if vals.contains_key(k) {
                continue;
            }
            match p.split_once('=') {
                Some((_, d)) => {
                    vals.insert(k, (parse_default(d), span));
                }
                None => {
                    return Err(self
                        .err(cx, span, format!("missing argument `{k}` for `{name}`"))
                        .note(format!("`{name}({})`", sig.join(", "))))
                }
            }
        }
        Ok(Args { vals })
    }

    /// Calls a builtin.
    pub fn call_builtin(
        &mut self,
        cx: &mut Ctx,
        name: &'static str,
        args: Vec<ArgVal>,
        span: Span,
    ) -> R<Value> {
        let a = self.bind_builtin(cx, name, args, span)?;
        let t = |s: &Self, k: &str| -> R<NodeId> {
            match a.get(k) {
                Value::Tensor(t) => Ok(*t),
                v => Err(s
                    .err(
                        cx,
                        a.span(k),
                        format!("`{name}` expects a tensor for `{k}`, got {}", v.kind()),
                    )
                    .label(format!("this is {}", v.kind()))),
            }
        };
        let int = |s: &Self, k: &str| -> R<i64> {
            match a.get(k) {
                Value::Int(i) => Ok(*i),
                v => Err(s
                    .err(
                        cx,
                        a.span(k),
                        format!("`{name}` expects an integer for `{k}`, got {}", v.kind()),
                    )
                    .label("not an integer")),
            }
        };
        let unary = match name {
            "exp" => Some((UnaryOp::Exp, f64::exp as fn(f64) -> f64)),
            "log" => Some((UnaryOp::Log, f64::ln as fn(f64) -> f64)),
            "sqrt" => Some((UnaryOp::Sqrt, f64::sqrt as fn(f64) -> f64)),
            "rsqrt" => Some((UnaryOp::Rsqrt, (|x: f64| 1.0 / x.sqrt()) as fn(f64) -> f64)),
            "recip" => Some((UnaryOp::Recip, (|x: f64| 1.0 / x) as fn(f64) -> f64)),
            "tanh" => Some((UnaryOp::Tanh, f64::tanh as fn(f64) -> f64)),
            "erf" => Some((UnaryOp::Erf, erf as fn(f64) -> f64)),
            "sin" => Some((UnaryOp::Sin, f64::sin as fn(f64) -> f64)),
            "cos" => Some((UnaryOp::Cos, f64::cos as fn(f64) -> f64)),
            "abs" => Some((UnaryOp::Abs, f64::abs as fn(f64) -> f64)),
            "floor" => Some((UnaryOp::Floor, f64::floor as fn(f64) -> f64)),
            _ => None,
        };
        if let Some((op, f)) = unary {
            return match a.get("x") {
                Value::Tensor(x) => Ok(Value::Tensor(self.prim_unary(cx, op, *x, span)?)),
                Value::Int(i) if name == "abs" => i
                    .checked_abs()
                    .map(Value::Int)
                    .ok_or_else(|| self.overflow(cx, span, format!("`abs({i})`"))),
                v => match v.as_f64() {
                    Some(x) => Ok(Value::Float(f(x))),
                    None => Err(self
                        .err(
                            cx,
                            a.span("x"),
                            format!("`{name}` expects a tensor or a number, got {}", v.kind()),
                        )
                        .label("not a tensor or number")),
                },
            };
        }
        match name {
            "pow" | "maximum" | "minimum" => {
                let (x, y) = (a.get("x").clone(), a.get("y").clone());
                if !matches!(x, Value::Tensor(_)) && !matches!(y, Value::Tensor(_)) {
                    let (Some(p), Some(q)) = (x.as_f64(), y.as_f64()) else {
                        return Err(self.err(
                            cx,
                            span,
                            format!("`{name}` expects tensors or numbers"),
                        ));
                    };
                    return Ok(Value::Float(match name {
                        "pow" => p.powf(q),
                        "maximum" => p.max(q),
                        _ => p.min(q),
                    }));
                }
                let op = match name {
                    "pow" => BinaryOp::Pow,
                    "maximum" => BinaryOp::Max,
                    _ => BinaryOp::Min,
                };
                Ok(Value::Tensor(self.tensor_binary(
                    cx,
                    op,
                    x,
                    y,
                    a.span("x"),
                    a.span("y"),
                    span,
                )?))
            }
            "min" => {
                let (x, y) = (a.get("x"), a.get("y"));
                match (x, y) {
                    (Value::Int(p), Value::Int(q)) => Ok(Value::Int(*p.min(q))),
                    _ => match (x.as_f64(), y.as_f64()) {
                        (Some(p), Some(q)) => Ok(Value::Float(p.min(q))),
                        _ => Err(self
                            .err(cx, span, "`min` compares two compile-time numbers")
                            .note(
                                "for tensors use `minimum(x, y)`; to reduce use `-max(-x, axis)`",
                            )),
                    },
                }
            }
            "max" => match (a.get("x"), a.get("axis")) {
                (Value::Tensor(x), Value::Int(ax)) => {
                    let keep = matches!(a.get("keepdim"), Value::Bool(true));
                    self.reduce(cx, ReduceOp::Max, *x, *ax, keep, a.span("axis"), span)
                        .map(Value::Tensor)
                }
                (Value::Tensor(_), _) => Err(self
                    .err(
                        cx,
                        span,
                        "`max` of a tensor needs an axis: `max(x, axis: -1)`",
                    )
                    .note("for the elementwise maximum of two tensors use `maximum(x, y)`")),
                (x, y) => match (x, y) {
                    (Value::Int(p), Value::Int(q)) => Ok(Value::Int(*p.max(q))),
                    _ => match (x.as_f64(), y.as_f64()) {
                        (Some(p), Some(q)) => Ok(Value::Float(p.max(q))),
                        _ => Err(self.err(
                            cx,
                            span,
                            "`max` takes a tensor and an axis, or two numbers",
                        )),
                    },
                },
            },
            "where" => {
                let c = t(self, "cond")?;
                if self.ty(c).dtype != DType::Bool {
                    return Err(self
                        .err(
                            cx,
                            a.span("cond"),
                            format!("`where` needs a bool condition, got {}", self.ty(c)),
                        )
                        .label("not bool"));
                }
                let (x, y) = (a.get("x").clone(), a.get("y").clone());
                let dtype = match (&x, &y) {
                    (Value::Tensor(p), _) | (_, Value::Tensor(p)) => self.ty(*p).dtype,
                    _ => DType::F32,
                };
                let xt = self.as_tensor(cx, &x, dtype, a.span("x"))?;
                let yt = self.as_tensor(cx, &y, dtype, a.span("y"))?;
                let s1 = self.broadcast_shape(cx, &self.ty(c), &self.ty(xt), span)?;
                let s = self.broadcast_shape(
                    cx,
                    &TensorType::new(DType::Bool, s1),
                    &self.ty(yt),
                    span,
                )?;
                let c = self.broadcast_to(cx, c, &s, span)?;
                let xt = self.broadcast_to(cx, xt, &s, span)?;
                let yt = self.broadcast_to(cx, yt, &s, span)?;
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::Select,
                    &[c, xt, yt],
                    span,
                )?))
            }
            "sum" => {
                let x = t(self, "x")?;
                let ax = int(self, "axis")?;
                let keep = matches!(a.get("keepdim"), Value::Bool(true));
                self.reduce(cx, ReduceOp::Sum, x, ax, keep, a.span("axis"), span)
                    .map(Value::Tensor)
            }
            "matmul" => {
                let (x, y) = (t(self, "x")?, t(self, "y")?);
                Ok(Value::Tensor(self.matmul(cx, x, y, span)?))
            }
            "transpose" => {
                let x = t(self, "x")?;
                let r = self.ty(x).rank();
                let i = self.axis(cx, int(self, "a")?, r, a.span("a"))?;
                let j = self.axis(cx, int(self, "b")?, r, a.span("b"))?;
                let mut perm: Vec<usize> = (0..r).collect();
                perm.swap(i, j);
                Ok(Value::Tensor(self.permute(cx, x, perm, span)?))
            }
            "permute" => {
                let x = t(self, "x")?;
                let r = self.ty(x).rank();
                let perm = self.int_list(cx, a.get("perm"), a.span("perm"))?;
                let mut p = Vec::new();
                for v in perm {
                    p.push(self.axis(cx, v, r, a.span("perm"))?);
                }
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::Permute { perm: p },
                    &[x],
                    span,
                )?))
            }
            "reshape" => {
                let x = t(self, "x")?;
                let dims = self.shape_arg(cx, a.get("shape"), a.span("shape"), Some(x))?;
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::Reshape { shape: Shape(dims) },
                    &[x],
                    span,
                )?))
            }
            "unsqueeze" | "squeeze" => {
                let x = t(self, "x")?;
                let ty = self.ty(x);
                let mut dims = ty.shape.0.clone();
                let ax = int(self, "axis")?;
                if name == "unsqueeze" {
                    let i = self.axis(cx, ax, dims.len() + 1, a.span("axis"))?;
                    dims.insert(i, Dim::c(1));
                } else {
                    let i = self.axis(cx, ax, dims.len(), a.span("axis"))?;
                    if dims[i] != Dim::c(1) {
                        return Err(self
                            .err(
                                cx,
                                a.span("axis"),
                                format!(
                                    "cannot squeeze axis {ax} of {ty}: its size is {}",
                                    dims[i]
                                ),
                            )
                            .label("not size 1"));
                    }
                    dims.remove(i);
                }
                Ok(Value::Tensor(self.reshape(cx, x, dims, span)?))
            }
            "flatten" => {
                let x = t(self, "x")?;
                let ty = self.ty(x);
                let r = ty.rank();
                let s = self.axis(cx, int(self, "start")?, r, a.span("start"))?;
                let e = self.axis(cx, int(self, "end")?, r, a.span("end"))?;
                if e < s {
                    return Err(self.err(cx, span, "flatten: `end` is before `start`"));
                }
                let mut dims = ty.shape.0[..s].to_vec();
                let prod = ty.shape.0[s..=e]
                    .iter()
                    .try_fold(Dim::c(1), |acc, d| acc.checked_mul(d))
                    .ok_or_else(|| {
                        self.overflow(cx, span, format!("the product of the dimensions of {ty}"))
                    })?;
                dims.push(prod);
                dims.extend(ty.shape.0[e + 1..].iter().cloned());
                Ok(Value::Tensor(self.reshape(cx, x, dims, span)?))
            }
            "expand" => {
                let x = t(self, "x")?;
                let dims = self.shape_arg(cx, a.get("shape"), a.span("shape"), None)?;
                Ok(Value::Tensor(self.broadcast_to(
                    cx,
                    x,
                    &Shape(dims),
                    span,
                )?))
            }
            "concat" | "stack" => {
                let xs = match a.get("xs") {
                    Value::List(v) | Value::Tuple(v) => v.to_vec(),
                    v => {
                        return Err(self
                            .err(
                                cx,
                                a.span("xs"),
                                format!("`{name}` takes a list of tensors, got {}", v.kind()),
                            )
                            .label("not a list"))
                    }
                };
                if xs.is_empty() {
                    return Err(self.err(cx, a.span("xs"), format!("`{name}` of an empty list")));
                }
                let mut ids = Vec::new();
                for v in &xs {
                    match v {
                        Value::Tensor(t) => ids.push(*t),
                        v => {
                            return Err(self
                                .err(
                                    cx,
                                    a.span("xs"),
                                    format!("`{name}` takes tensors, found {}", v.kind()),
                                )
                                .label("not all tensors"))
                        }
                    }
                }
                let first = self.ty(ids[0]);
                for (i, id) in ids.iter().enumerate().skip(1) {
                    let ty = self.ty(*id);
                    if ty.dtype != first.dtype || ty.rank() != first.rank() {
                        let what = if ty.dtype != first.dtype {
                            "dtype"
                        } else {
                            "rank"
                        };
                        return Err(self
                            .err(cx, a.span("xs"), format!("`{name}`: tensors differ in {what}: tensor {i} is {ty} but tensor 0 is {first}"))
                            .label(format!("the {what}s differ")));
                    }
                }
                let r = first.rank();
                let ax = int(self, "axis")?;
                if name == "stack" {
                    let i = self.axis(cx, ax, r + 1, a.span("axis"))?;
                    for id in ids.iter_mut() {
                        let mut d = self.ty(*id).shape.0.clone();
                        if i > d.len() {
                            return Err(self.err(
                                cx,
                                a.span("axis"),
                                "stack: tensors differ in rank",
                            ));
                        }
                        d.insert(i, Dim::c(1));
                        *id = self.reshape(cx, *id, d, span)?;
                    }
                    return Ok(Value::Tensor(self.op(
                        cx,
                        Op::Concat { axis: i },
                        &ids,
                        span,
                    )?));
                }
                let i = self.axis(cx, ax, r, a.span("axis"))?;
                if ids.len() == 1 {
                    return Ok(Value::Tensor(ids[0]));
                }
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::Concat { axis: i },
                    &ids,
                    span,
                )?))
            }
            "pad" => {
                let x = t(self, "x")?;
                let r = self.ty(x).rank();
                let ax = self.axis(cx, int(self, "axis")?, r, a.span("axis"))?;
                let before = self.size_arg(cx, a.get("before"), a.span("before"))?;
                let after = self.size_arg(cx, a.get("after"), a.span("after"))?;
                let Some(value) = a.get("value").as_f64() else {
                    return Err(self.err(cx, a.span("value"), "pad value must be a number"));
                };
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::Pad {
                        axis: ax,
                        before,
                        after,
                        value,
                    },
                    &[x],
                    span,
                )?))
            }
            "gather" => {
                let (table, idx) = (t(self, "table")?, t(self, "idx")?);
                let r = self.ty(table).rank();
                let ax = self.axis(cx, int(self, "axis")?, r, a.span("axis"))?;
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::Gather { axis: ax },
                    &[table, idx],
                    span,
                )?))
            }
            "detach" => {
                let x = t(self, "x")?;
                Ok(Value::Tensor(self.op(cx, Op::StopGradient, &[x], span)?))
            }
            "scatter_add" => {
                let (src, idx) = (t(self, "src")?, t(self, "idx")?);
                let r = self.ty(src).rank();
                let ax = self.axis(cx, int(self, "axis")?, r, a.span("axis"))?;
                let size = self.size_arg(cx, a.get("size"), a.span("size"))?;
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::ScatterAdd { axis: ax, size },
                    &[src, idx],
                    span,
                )?))
            }
            "cast" => {
                let x = t(self, "x")?;
                let Value::DType(dt) = a.get("dtype") else {
                    return Err(self.err(cx, a.span("dtype"), "expected a dtype such as `f32`"));
                };
                if self.ty(x).dtype == *dt {
                    return Ok(Value::Tensor(x));
                }
                Ok(Value::Tensor(self.op(
                    cx,
                    Op::Cast { dtype: *dt },
                    &[x],
                    span,
                )?))
            }
            "full" | "zeros" | "ones" => {
                let dims = self.shape_arg(cx, a.get("shape"), a.span("shape"), None)?;
                let Value::DType(dt) = a.get("dtype") else {
                    return Err(self.err(cx, a.span("dtype"), "expected a dtype such as `f32`"));
                };
                let value = match name {
                    "zeros" => 0.0,
                    "ones" => 1.0,
                    _ => match a.get("value") {
                        Value::Bool(b) => f64::from(u8::from(*b)),
                        v => v.as_f64().ok_or_else(|| {
                            self.err(cx, a.span("value"), "fill value must be a number")
                        })?,
                    },
                };
                Ok(Value::Tensor(self.source(
                    cx,
                    Op::Const { value },
                    TensorType::new(*dt, dims),
                    span,
                )?))
            }
            "arange" | "iota" => {
                let (dims, axis) = if name == "arange" {
                    (vec![self.size_arg(cx, a.get("n"), a.span("n"))?], 0)
                } else {
                    let dims = self.shape_arg(cx, a.get("shape"), a.span("shape"), None)?;
                    let ax = self.axis(cx, int(self, "axis")?, dims.len(), a.span("axis"))?;
                    (dims, ax)
                };
                let Value::DType(dt) = a.get("dtype") else {
                    return Err(self.err(cx, a.span("dtype"), "expected a dtype such as `i32`"));
                };
                Ok(Value::Tensor(self.source(
                    cx,
                    Op::Iota { axis },
                    TensorType::new(*dt, dims),
                    span,
                )?))
            }
            "rand" | "bernoulli" => {
                let dims = self.shape_arg(cx, a.get("shape"), a.span("shape"), None)?;
                let seed = int(self, "seed")?;
                if seed < 0 {
                    return Err(self
                        .err(
                            cx,
                            a.span("seed"),
                            format!("a seed must be >= 0, got {seed}"),
                        )
                        .label("negative seed"));
                }
                let (dist, dt) = if name == "rand" {
                    (Dist::Uniform { lo: 0.0, hi: 1.0 }, DType::F32)
                } else {
                    let p = a
                        .get("p")
                        .as_f64()
                        .ok_or_else(|| self.err(cx, a.span("p"), "p must be a number"))?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(self.err(
                            cx,
                            a.span("p"),
                            format!("p must be in [0, 1], got {p}"),
                        ));
                    }
                    (Dist::Bernoulli { p }, DType::Bool)
                };
                Ok(Value::Tensor(self.source(
                    cx,
                    Op::Random {
                        dist,
                        seed: seed as u64,
                    },
                    TensorType::new(dt, dims),
                    span,
                )?))
            }
            "len" => match a.get("x") {
                Value::List(v) | Value::Tuple(v) => Ok(Value::Int(v.len() as i64)),
                Value::Range(lo, hi) if hi <= lo => Ok(Value::Int(0)),
                Value::Range(lo, hi) => hi
                    .checked_sub(*lo)
                    .map(Value::Int)
                    .ok_or_else(|| self.overflow(cx, span, format!("`len({lo}..{hi})`"))),
                Value::Str(s) => Ok(Value::Int(s.chars().count() as i64)),
                v => Err(self.err(cx, a.span("x"), format!("`len` of {}", v.kind()))),
            },
            "int" => match a.get("x") {
                Value::Int(i) => Ok(Value::Int(*i)),
                // Truncated toward zero; the range check is on the truncated value, whose
                // bounds -2^63 and 2^63 are exact in f64.
                Value::Float(f) if f.is_finite() => {
                    let t = f.trunc();
                    if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&t) {
                        Ok(Value::Int(t as i64))
                    } else {
                        Err(self.overflow(cx, span, format!("`int({f:e})`")))
                    }
                }
                Value::Float(f) => Err(self
                    .err(cx, a.span("x"), format!("cannot convert {f} to int"))
                    .label("not a finite number")),
                Value::Bool(b) => Ok(Value::Int(i64::from(*b))),
                v => Err(self.err(
                    cx,
                    a.span("x"),
                    format!("cannot convert {} to int", v.kind()),
                )),
            },
            "float" => a
                .get("x")
                .as_f64()
                .map(Value::Float)
                .ok_or_else(|| self.err(cx, a.span("x"), "cannot convert to float")),
            "generating" => Ok(Value::Bool(self.gen.is_some())),
            "cache_capacity" => {
                let name = super::gen::CAPACITY.to_string();
                if !self.graph.dims.contains(&name) {
                    self.graph.dims.push(name);
                }
                Ok(Value::Dim(Dim::sym(super::gen::CAPACITY)))
            }
            "gen_input" => {
                let dims = self.shape_arg(cx, a.get("shape"), a.span("shape"), None)?;
                let Value::DType(dt) = a.get("dtype") else {
                    return Err(self.err(cx, a.span("dtype"), "expected a dtype such as `i32`"));
                };
                self.gen_input(cx, a.get("name"), dims, *dt, span)
            }
            "past" => {
                let x = t(self, "x")?;
                self.past(cx, x, a.get("name"), span)
            }
            "keep" => {
                let x = t(self, "x")?;
                self.keep(cx, x, a.get("name"), span)
            }
            "kept" => {
                // a string entry names a symbolic size of its own (`[b, heads, "S", d]`)
                let shape = match a.get("shape") {
                    Value::List(items) | Value::Tuple(items) => Value::List(std::rc::Rc::new(
                        items
                            .iter()
                            .map(|it| match it {
                                Value::Str(s) => {
                                    if !self.graph.dims.contains(s) {
                                        self.graph.dims.push(s.clone());
                                    }
                                    Value::Dim(Dim::sym(s))
                                }
                                v => v.clone(),
                            })
                            .collect(),
                    )),
                    v => v.clone(),
                };
                let dims = self.shape_arg(cx, &shape, a.span("shape"), None)?;
                let Value::DType(dt) = a.get("dtype") else {
                    return Err(self.err(cx, a.span("dtype"), "expected a dtype such as `f32`"));
                };
                self.kept(cx, a.get("name"), dims, *dt, span)
            }
            _ => Err(self.err(
                cx,
                span,
                format!("internal error: builtin `{name}` has no implementation"),
            )),
        }
    }

    /// A reduction over one axis (the IR keeps the axis as size 1; `keepdim: false` drops it).
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &mut self,
        cx: &Ctx,
        op: ReduceOp,
        x: NodeId,
        axis: i64,
        keep: bool,
        axis_span: Span,
        span: Span,
    ) -> R<NodeId> {
        let ty = self.ty(x);
        let ax = self.axis(cx, axis, ty.rank(), axis_span)?;
        let r = self.op(cx, Op::Reduce { op, axis: ax }, &[x], span)?;
        if keep {
            return Ok(r);
        }
        let mut dims = ty.shape.0.clone();
        dims.remove(ax);
        self.reshape(cx, r, dims, span)
    }

    fn int_list(&self, cx: &Ctx, v: &Value, span: Span) -> R<Vec<i64>> {
        match v {
            Value::List(items) | Value::Tuple(items) => items
                .iter()
                .map(|i| match i {
                    Value::Int(i) => Ok(*i),
                    v => Err(self.err(
                        cx,
                        span,
                        format!("expected a list of integers, found {}", v.kind()),
                    )),
                })
                .collect(),
            v => Err(self.err(
                cx,
                span,
                format!("expected a list of integers, got {}", v.kind()),
            )),
        }
    }

    fn size_arg(&self, cx: &Ctx, v: &Value, span: Span) -> R<Dim> {
        match v.as_dim() {
            Some(d) if d.as_const().is_none_or(|c| c >= 0) => Ok(d),
            Some(d) => Err(self.err(cx, span, format!("size must not be negative, got {d}"))),
            None => Err(self
                .err(cx, span, format!("expected a size, got {}", v.kind()))
                .label("not a size")),
        }
    }

    /// A shape argument (`[B, T * heads, -1]`); `-1` is inferred from `like`'s element count.
    fn shape_arg(&self, cx: &Ctx, v: &Value, span: Span, like: Option<NodeId>) -> R<Vec<Dim>> {
        let items = match v {
            Value::List(items) | Value::Tuple(items) => items.to_vec(),
            v => {
                return Err(self
                    .err(
                        cx,
                        span,
                        format!("expected a shape (a list of sizes), got {}", v.kind()),
                    )
                    .label("not a list"))
            }
        };
        let mut dims = Vec::new();
        let mut infer_at = None;
        for (i, it) in items.iter().enumerate() {
            match it.as_dim() {
                Some(d) if d.as_const() == Some(-1) && like.is_some() => {
                    if infer_at.replace(i).is_some() {
                        return Err(self.err(cx, span, "only one `-1` is allowed in a shape"));
                    }
                    dims.push(Dim::c(1));
                }
                Some(d) if d.as_const().is_none_or(|c| c >= 0) => dims.push(d),
                Some(d) => return Err(self.err(cx, span, format!("negative size {d} in shape"))),
                None => {
                    return Err(self
                        .err(
                            cx,
                            span,
                            format!("shape entries must be sizes, found {}", it.kind()),
                        )
                        .label("not a size"))
                }
            }
        }
        if let (Some(i), Some(x)) = (infer_at, like) {
            let ty = self.ty(x);
            let total = ty
                .shape
                .0
                .iter()
                .try_fold(Dim::c(1), |acc, d| acc.checked_mul(d));
            let known = dims.iter().try_fold(Dim::c(1), |acc, d| acc.checked_mul(d));
            let inferred = match (total, known) {
                (Some(t), Some(k)) => t.div_exact(&k),
                _ => None,
            };
            match inferred {
                Some(d) => dims[i] = d,
                None => {
                    return Err(self
                        .err(
                            cx,
                            span,
                            format!("cannot infer `-1`: {ty} does not split into this shape"),
                        )
                        .label("bad shape"))
                }
            }
        }
        Ok(dims)
    }
}

/// The error function (Abramowitz–Stegun 7.1.26 is too coarse; this uses erfc's continued
/// expansion via the complementary series to ~1e-15), for compile-time constants.
fn erf(x: f64) -> f64 {
    // Series for small |x|, asymptotic continued fraction otherwise.
    if x.abs() < 2.5 {
        let mut sum = x;
        let mut term = x;
        let x2 = x * x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Lentz continued fraction for erfc.
        let ax = x.abs();
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        let erfc = (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f);
        (1.0 - erfc).copysign(x)
    }
}
