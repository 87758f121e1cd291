//! Gradient checks: the autodiff pass against central finite differences, in f64.
//!
//! Every primitive's vector-Jacobian rule is checked on small graphs (each op applied to
//! parameters, the result contracted with a fixed random tensor to a scalar loss); whole
//! models (`models/llava_tiny.vlm`, `models/clip_tiny.vlm`) are promoted to f64 and checked
//! on a sample of parameter elements.

mod common;
use common::load;

use std::collections::BTreeMap;
use vlmc::ir::{BinaryOp, DType, Dim, Graph, Init, NodeId, Op, ReduceOp, TensorType, UnaryOp};
use vlmc::passes::{self, Pass};
use vlmc_runtime::rng::uniform01;
use vlmc_runtime::Tensor;

/// Per-op tolerance: max |fd - ad| / max(|ad|) over the parameter's elements.
const OP_TOLERANCE: f64 = 1e-6;
/// Whole-model tolerance, per sampled element: |fd - ad| / max(|fd|, |ad|, 1e-5 * scale), where
/// scale is the largest gradient element of the model (the floor keeps elements whose true
/// gradient is zero, such as attention key biases under softmax, from dividing f64 rounding
/// noise of the finite difference, about 1e-12, by nothing).
const MODEL_TOLERANCE: f64 = 1e-4;

fn ty(text: &str) -> TensorType {
    TensorType::parse(text).expect("a tensor type")
}

/// Deterministic values in `[lo, hi)`.
fn values(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|i| lo + (hi - lo) * uniform01(seed, i as u64))
        .collect()
}

fn dims(t: &TensorType) -> Vec<usize> {
    t.shape
        .iter()
        .map(|d| d.as_const().expect("constant shape") as usize)
        .collect()
}

/// A graph under test: parameters with values, fixed inputs, a builder of the op.
struct Case {
    g: Graph,
    params: BTreeMap<String, Tensor>,
    inputs: BTreeMap<String, Tensor>,
    wrt: Vec<String>,
    eps: f64,
}

impl Case {
    fn new() -> Case {
        Case {
            g: Graph::new("case"),
            params: BTreeMap::new(),
            inputs: BTreeMap::new(),
            wrt: Vec::new(),
            eps: 1e-6,
        }
    }

    /// A differentiated f64 parameter with values in `[lo, hi)`.
    fn param(&mut self, name: &str, shape: &str, lo: f64, hi: f64) -> NodeId {
        let t = ty(&format!("f64{shape}"));
        let n = dims(&t).iter().product();
        let seed = 17 + self.params.len() as u64;
        self.params
            .insert(name.into(), Tensor::f64(dims(&t), values(n, seed, lo, hi)));
        self.wrt.push(name.into());
        self.g
            .add_source(
                Op::Param {
                    path: name.into(),
                    init: Init::zeros(),
                },
                t,
                "",
            )
            .expect("param")
    }

    /// A fixed input.
    fn input(&mut self, name: &str, t: Tensor, ty_text: &str) -> NodeId {
        self.inputs.insert(name.into(), t);
        self.g
            .add_source(Op::Input { name: name.into() }, ty(ty_text), "")
            .expect("input")
    }

    fn op(&mut self, op: Op, xs: &[NodeId]) -> NodeId {
        self.g.add(op, xs, "").expect("op")
    }

    /// loss = sum(y * r) for a fixed random r; sets the output `loss`.
    fn finish(&mut self, y: NodeId) {
        let t = self.g.node(y).ty.clone();
        let shape = dims(&t);
        let n = shape.iter().product();
        let r = self.input(
            "r",
            Tensor::f64(shape, values(n, 99, -1.0, 1.0)),
            &t.to_string(),
        );
        let p = self.op(Op::Binary(BinaryOp::Mul), &[y, r]);
        let mut e = passes::emit::Emit::new(&mut self.g, "test", "");
        let loss = e.sum_all(p).expect("sum");
        self.g.set_output("loss", loss).expect("output");
    }

    /// Max over parameters of max |fd - ad| / max |ad| (or the absolute error when the
    /// gradient is zero).
    fn check(&self) -> f64 {
        let mut g = self.g.clone();
        passes::Autodiff {
            loss: "loss".into(),
            params: self.wrt.clone(),
        }
        .run(&mut g)
        .expect("autodiff");
        vlmc::ir::verify(&g).expect("the backward graph verifies");
        let out = vlmc_runtime::run(&g, &self.inputs, &self.params).expect("runs");
        let loss_at = |params: &BTreeMap<String, Tensor>| -> f64 {
            vlmc_runtime::run(&self.g, &self.inputs, params).expect("runs")["loss"].to_f64()[0]
        };
        let mut worst = 0f64;
        for name in &self.wrt {
            let ad = out[&format!("grad.{name}")].to_f64();
            let base = self.params[name].to_f64();
            let mut fd = Vec::new();
            for i in 0..base.len() {
                let mut p = self.params.clone();
                let shape = self.params[name].shape.clone();
                let mut v = base.clone();
                v[i] += self.eps;
                p.insert(name.clone(), Tensor::f64(shape.clone(), v.clone()));
                let up = loss_at(&p);
                v[i] -= 2.0 * self.eps;
                p.insert(name.clone(), Tensor::f64(shape, v));
                let down = loss_at(&p);
                fd.push((up - down) / (2.0 * self.eps));
            }
            let scale = ad.iter().fold(0f64, |m, x| m.max(x.abs()));
            let diff = ad
                .iter()
                .zip(&fd)
                .fold(0f64, |m, (a, f)| m.max((a - f).abs()));
            let err = if scale > 0.0 { diff / scale } else { diff };
            assert!(
                err.is_finite(),
                "{name}: non-finite error (ad {ad:?}, fd {fd:?})"
            );
            worst = worst.max(err);
        }
        worst
    }
}

/// Checks one case and reports its error.
fn expect_ok(what: &str, case: Case) -> f64 {
    let err = case.check();
    eprintln!("{what:<28} max rel err {err:.2e}");
    assert!(
        err <= OP_TOLERANCE,
        "{what}: gradient error {err:.3e} > {OP_TOLERANCE:e}"
    );
    err
}

fn unary_case(op: UnaryOp, lo: f64, hi: f64) -> Case {
    let mut c = Case::new();
    let x = c.param("x", "[3, 4]", lo, hi);
    let y = c.op(Op::Unary(op), &[x]);
    c.finish(y);
    c
}

#[test]
fn unary_rules() {
    use UnaryOp::*;
    let cases = [
        (Neg, -2.0, 2.0),
        (Abs, 0.1, 2.0),
        (Abs, -2.0, -0.1),
        (Exp, -2.0, 2.0),
        (Log, 0.2, 3.0),
        (Sqrt, 0.2, 3.0),
        (Rsqrt, 0.2, 3.0),
        (Recip, 0.3, 3.0),
        (Tanh, -2.0, 2.0),
        (Erf, -2.0, 2.0),
        (Sin, -3.0, 3.0),
        (Cos, -3.0, 3.0),
        (Floor, 0.1, 0.9),
    ];
    for (op, lo, hi) in cases {
        expect_ok(
            &format!("{} on [{lo}, {hi})", op.name()),
            unary_case(op, lo, hi),
        );
    }
}

fn binary_case(op: BinaryOp, a: (f64, f64), b: (f64, f64)) -> Case {
    let mut c = Case::new();
    let x = c.param("a", "[2, 5]", a.0, a.1);
    let y = c.param("b", "[2, 5]", b.0, b.1);
    let z = c.op(Op::Binary(op), &[x, y]);
    c.finish(z);
    c
}

#[test]
fn binary_rules() {
    use BinaryOp::*;
    let cases = [
        (Add, (-2.0, 2.0), (-2.0, 2.0)),
        (Sub, (-2.0, 2.0), (-2.0, 2.0)),
        (Mul, (-2.0, 2.0), (-2.0, 2.0)),
        (Div, (-2.0, 2.0), (0.5, 2.0)),
        (Pow, (0.5, 2.0), (-1.5, 2.5)),
        (Max, (-2.0, 2.0), (-2.0, 2.0)),
        (Min, (-2.0, 2.0), (-2.0, 2.0)),
        (Mod, (0.1, 5.0), (1.3, 1.7)),
    ];
    for (op, a, b) in cases {
        expect_ok(op.name(), binary_case(op, a, b));
    }
    // The same value on both sides: contributions add up.
    let mut c = Case::new();
    let x = c.param("x", "[4]", -2.0, 2.0);
    let y = c.op(Op::Binary(Mul), &[x, x]);
    let z = c.op(Op::Binary(Div), &[y, x]);
    let w = c.op(Op::Binary(Add), &[z, y]);
    c.finish(w);
    expect_ok("x*x/x + x*x (shared)", c);
}

#[test]
fn comparisons_carry_no_gradient_and_ties_split() {
    // select(a > b, a, b) == maximum(a, b) away from ties.
    let mut c = Case::new();
    let a = c.param("a", "[6]", -1.0, 1.0);
    let b = c.param("b", "[6]", -1.0, 1.0);
    let gt = c.op(Op::Binary(BinaryOp::Gt), &[a, b]);
    let s = c.op(Op::Select, &[gt, a, b]);
    c.finish(s);
    expect_ok("select(a > b, a, b)", c);

    // maximum(x, x): each side gets half, the total is the identity's.
    let mut c = Case::new();
    let x = c.param("x", "[5]", -1.0, 1.0);
    let m = c.op(Op::Binary(BinaryOp::Max), &[x, x]);
    c.finish(m);
    expect_ok("maximum(x, x)", c);
}

#[test]
fn select_rule() {
    let mut c = Case::new();
    let a = c.param("a", "[3, 4]", -1.0, 1.0);
    let b = c.param("b", "[3, 4]", -1.0, 1.0);
    let mask: Vec<bool> = (0..12).map(|i| i % 3 != 1).collect();
    let m = c.input("m", Tensor::bool(vec![3, 4], mask), "bool[3, 4]");
    let s = c.op(Op::Select, &[m, a, b]);
    c.finish(s);
    expect_ok("select", c);
}

#[test]
fn reduction_rules() {
    for axis in 0..3 {
        let mut c = Case::new();
        let x = c.param("x", "[2, 3, 4]", -1.0, 1.0);
        let s = c.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis,
            },
            &[x],
        );
        c.finish(s);
        expect_ok(&format!("reduce_sum axis {axis}"), c);

        let mut c = Case::new();
        let x = c.param("x", "[2, 3, 4]", -1.0, 1.0);
        let s = c.op(
            Op::Reduce {
                op: ReduceOp::Max,
                axis,
            },
            &[x],
        );
        c.finish(s);
        expect_ok(&format!("reduce_max axis {axis}"), c);
    }
}

#[test]
fn matmul_rule() {
    let mut c = Case::new();
    let a = c.param("a", "[3, 4]", -1.0, 1.0);
    let b = c.param("b", "[4, 5]", -1.0, 1.0);
    let m = c.op(Op::MatMul, &[a, b]);
    c.finish(m);
    expect_ok("matmul", c);

    let mut c = Case::new();
    let a = c.param("a", "[2, 3, 4]", -1.0, 1.0);
    let b = c.param("b", "[2, 4, 2]", -1.0, 1.0);
    let m = c.op(Op::MatMul, &[a, b]);
    c.finish(m);
    expect_ok("batched matmul", c);

    // A frozen operand: only `a` is differentiated.
    let mut c = Case::new();
    let a = c.param("a", "[3, 4]", -1.0, 1.0);
    let b = c.input(
        "b",
        Tensor::f64(vec![4, 2], values(8, 5, -1.0, 1.0)),
        "f64[4, 2]",
    );
    let m = c.op(Op::MatMul, &[a, b]);
    c.finish(m);
    expect_ok("matmul, one side frozen", c);
}

#[test]
fn gather_rule() {
    // Axis 0 (an embedding) with repeated indices: the gradients of repeats add up.
    let mut c = Case::new();
    let t = c.param("table", "[5, 3]", -1.0, 1.0);
    let idx = c.input(
        "idx",
        Tensor::i32(vec![2, 3], vec![0, 4, 4, 1, 0, 4]),
        "i32[2, 3]",
    );
    let g = c.op(Op::Gather { axis: 0 }, &[t, idx]);
    c.finish(g);
    expect_ok("gather axis 0", c);

    // A middle axis, with a 2-D index.
    let mut c = Case::new();
    let t = c.param("table", "[2, 4, 3]", -1.0, 1.0);
    let idx = c.input(
        "idx",
        Tensor::i32(vec![3, 2], vec![3, 0, 3, 2, 1, 3]),
        "i32[3, 2]",
    );
    let g = c.op(Op::Gather { axis: 1 }, &[t, idx]);
    c.finish(g);
    expect_ok("gather axis 1", c);

    // The last axis.
    let mut c = Case::new();
    let t = c.param("table", "[2, 4]", -1.0, 1.0);
    let idx = c.input("idx", Tensor::i32(vec![3], vec![3, 3, 0]), "i32[3]");
    let g = c.op(Op::Gather { axis: 1 }, &[t, idx]);
    c.finish(g);
    expect_ok("gather last axis", c);
}

#[test]
fn scatter_add_rule() {
    // Rows added into a table of 5 with repeated and unused indices (gather's transpose).
    let mut c = Case::new();
    let x = c.param("x", "[2, 3, 4]", -1.0, 1.0);
    let idx = c.input(
        "idx",
        Tensor::i32(vec![2, 3], vec![0, 4, 4, 1, 0, 4]),
        "i32[2, 3]",
    );
    let op = Op::ScatterAdd {
        axis: 0,
        size: Dim::c(5),
    };
    let s = c.op(op, &[x, idx]);
    c.finish(s);
    expect_ok("scatter_add axis 0", c);

    // A middle axis.
    let mut c = Case::new();
    let x = c.param("x", "[2, 3, 2]", -1.0, 1.0);
    let idx = c.input("idx", Tensor::i32(vec![3], vec![1, 3, 1]), "i32[3]");
    let op = Op::ScatterAdd {
        axis: 1,
        size: Dim::c(4),
    };
    let s = c.op(op, &[x, idx]);
    c.finish(s);
    expect_ok("scatter_add axis 1", c);
}

fn shape(dims: &[i64]) -> vlmc::ir::Shape {
    dims.iter().map(|&d| Dim::c(d)).collect()
}

#[test]
fn view_rules() {
    let mut c = Case::new();
    let x = c.param("x", "[2, 6]", -1.0, 1.0);
    let r = c.op(
        Op::Reshape {
            shape: shape(&[3, 4]),
        },
        &[x],
    );
    c.finish(r);
    expect_ok("reshape", c);

    let mut c = Case::new();
    let x = c.param("x", "[2, 3, 4]", -1.0, 1.0);
    let p = c.op(
        Op::Permute {
            perm: vec![2, 0, 1],
        },
        &[x],
    );
    c.finish(p);
    expect_ok("permute", c);

    let mut c = Case::new();
    let x = c.param("x", "[1, 3, 1]", -1.0, 1.0);
    let e = c.op(
        Op::Expand {
            shape: shape(&[2, 3, 4]),
        },
        &[x],
    );
    c.finish(e);
    expect_ok("expand", c);

    for (start, end, step) in [(1, 5, 1), (0, 7, 2), (1, 7, 3), (2, 3, 4), (0, 7, 7)] {
        let mut c = Case::new();
        let x = c.param("x", "[2, 7]", -1.0, 1.0);
        let s = c.op(
            Op::Slice {
                axis: 1,
                start: Dim::c(start),
                end: Dim::c(end),
                step,
            },
            &[x],
        );
        c.finish(s);
        expect_ok(&format!("slice {start}..{end} step {step}"), c);
    }

    let mut c = Case::new();
    let a = c.param("a", "[2, 3]", -1.0, 1.0);
    let b = c.param("b", "[2, 1]", -1.0, 1.0);
    let k = c.input(
        "k",
        Tensor::f64(vec![2, 2], values(4, 3, -1.0, 1.0)),
        "f64[2, 2]",
    );
    let cat = c.op(Op::Concat { axis: 1 }, &[a, k, b, a]);
    c.finish(cat);
    expect_ok("concat (a frozen part)", c);

    let mut c = Case::new();
    let x = c.param("x", "[3, 2]", -1.0, 1.0);
    let p = c.op(
        Op::Pad {
            axis: 0,
            before: Dim::c(2),
            after: Dim::c(1),
            value: 0.5,
        },
        &[x],
    );
    c.finish(p);
    expect_ok("pad", c);
}

#[test]
fn cast_rule() {
    // f64 -> f32 -> f64 on values exact in f32 (multiples of 1/64 with a step of 1/64): the
    // finite differences are exact, and the gradient is cast back.
    let mut c = Case::new();
    c.eps = 1.0 / 64.0;
    let x = c.param("x", "[4]", 0.0, 1.0);
    let exact: Vec<f64> = (0..4).map(|i| f64::from(i * 3 - 5) / 64.0).collect();
    c.params.insert("x".into(), Tensor::f64(vec![4], exact));
    let lo = c.op(Op::Cast { dtype: DType::F32 }, &[x]);
    let sq = c.op(Op::Binary(BinaryOp::Mul), &[lo, lo]);
    let hi = c.op(Op::Cast { dtype: DType::F64 }, &[sq]);
    c.finish(hi);
    // The contraction with r is in f64; x*x is exact in f32 for these values.
    expect_ok("cast f64 -> f32 -> f64", c);

    // A cast to i32 stops the gradient: floor-like, zero almost everywhere.
    let mut c = Case::new();
    let x = c.param("x", "[4]", 0.1, 0.9);
    let i = c.op(Op::Cast { dtype: DType::I32 }, &[x]);
    let f = c.op(Op::Cast { dtype: DType::F64 }, &[i]);
    let y = c.op(Op::Binary(BinaryOp::Add), &[f, x]);
    c.finish(y);
    expect_ok("cast to i32 and back", c);
}

#[test]
fn frozen_parameters_get_no_backward_ops() {
    // y = (x @ w_frozen) @ w_train: differentiating w_train only needs x @ w_frozen, not any
    // product with w_frozen's gradient.
    let mut g = Graph::new("g");
    g.dims = vec!["B".into()];
    let p = |g: &mut Graph, name: &str, t: &str| {
        g.add_source(
            Op::Param {
                path: name.into(),
                init: Init::zeros(),
            },
            ty(t),
            "",
        )
        .expect("param")
    };
    let x = g
        .add_source(Op::Input { name: "x".into() }, ty("f32[B, 4]"), "")
        .expect("x");
    let wf = p(&mut g, "frozen", "f32[4, 4]");
    let wt = p(&mut g, "train", "f32[4, 2]");
    let h = g.add(Op::MatMul, &[x, wf], "").expect("mm");
    let y = g.add(Op::MatMul, &[h, wt], "").expect("mm");
    let mut e = passes::emit::Emit::new(&mut g, "test", "");
    let loss = e.sum_all(y).expect("sum");
    g.set_output("loss", loss).expect("out");
    let before = g.len();
    passes::Autodiff {
        loss: "loss".into(),
        params: vec!["train".into()],
    }
    .run(&mut g)
    .expect("autodiff");
    passes::Dce.run(&mut g).expect("dce");
    vlmc::ir::verify(&g).expect("verifies");
    let matmuls = g
        .node_ids()
        .into_iter()
        .filter(|&id| matches!(g.node(id).op, Op::MatMul))
        .count();
    // Forward: 2; backward: only hᵀ·g for `train` (no g·trainᵀ toward the frozen side).
    assert_eq!(matmuls, 3, "{}", vlmc::ir::print(&g));
    assert!(g.output("grad.train").is_some());
    assert!(g.len() > before);
    // An i32 value on the way gets nothing; a parameter the loss ignores gets zeros.
    let mut g2 = Graph::new("g");
    let a = p(&mut g2, "a", "f32[3]");
    let unused = p(&mut g2, "unused", "f32[3]");
    let i = g2.add(Op::Cast { dtype: DType::I32 }, &[a], "").unwrap();
    let f = g2.add(Op::Cast { dtype: DType::F32 }, &[i], "").unwrap();
    let s = g2.add(Op::Binary(BinaryOp::Mul), &[f, a], "").unwrap();
    g2.set_output("loss", s).unwrap();
    let grads =
        passes::autodiff::gradients(&mut g2, s, &["a".into(), "unused".into()]).expect("autodiff");
    assert!(matches!(
        g2.node(grads[1].1).op,
        Op::Const { value } if value == 0.0
    ));
    let _ = unused;
}

// ---------------------------------------------------------------------------------------
// Whole models.

/// Promotes a model to f64, adds loss = Σ_outputs mean(out * r_out) and checks `samples`
/// elements of every parameter against finite differences.
fn check_model(
    path: &str,
    inputs: BTreeMap<String, Tensor>,
    samples: usize,
) -> (f64, usize, usize) {
    let model = load(path);
    let mut g = model.graph.clone();
    passes::promote_f64(&mut g);
    let params: BTreeMap<String, Tensor> = vlmc_runtime::init::init_params(&model.graph, 3)
        .expect("init")
        .into_iter()
        // Non-zero everywhere, so that every path carries a gradient (biases start at 0).
        .map(|(k, t)| {
            let v = t.to_f64();
            let n = v.len();
            let jitter = values(n, vlmc_runtime::rng::fnv1a(&k), -0.05, 0.05);
            let v: Vec<f64> = v.iter().zip(jitter).map(|(a, b)| a + b).collect();
            (k, Tensor::f64(t.shape.clone(), v))
        })
        .collect();
    let outs = vlmc_runtime::run(&g, &inputs, &params).expect("forward runs");
    let mut inputs = inputs;
    let mut terms = Vec::new();
    let out_list = g.outputs.clone();
    for (name, id) in out_list {
        let t = &outs[&name];
        if !t.is_float() {
            continue;
        }
        let rname = format!("r.{name}");
        let n = t.numel();
        inputs.insert(
            rname.clone(),
            Tensor::f64(t.shape.clone(), values(n, 7 + n as u64, -1.0, 1.0)),
        );
        let rty = g.node(id).ty.clone();
        let r = g
            .add_source(Op::Input { name: rname }, rty, "")
            .expect("r input");
        let mut e = passes::emit::Emit::new(&mut g, "test", "loss");
        let p = e.mul(id, r).expect("mul");
        let s = e.sum_all(p).expect("sum");
        let s = e.scale(s, 1.0 / n as f64).expect("scale");
        terms.push(s);
    }
    let mut e = passes::emit::Emit::new(&mut g, "test", "loss");
    let mut loss = terms[0];
    for &t in &terms[1..] {
        loss = e.add(loss, t).expect("add");
    }
    g.set_output("loss", loss).expect("loss output");
    let paths: Vec<String> = params.keys().cloned().collect();
    let mut gg = g.clone();
    passes::Autodiff {
        loss: "loss".into(),
        params: paths.clone(),
    }
    .run(&mut gg)
    .expect("autodiff");
    passes::Dce.run(&mut gg).expect("dce");
    vlmc::ir::verify(&gg).expect("verifies");
    let ad = vlmc_runtime::run(&gg, &inputs, &params).expect("backward runs");
    let loss_at = |p: &BTreeMap<String, Tensor>| -> f64 {
        vlmc_runtime::run(&g, &inputs, p).expect("runs")["loss"].to_f64()[0]
    };
    let scale = paths
        .iter()
        .flat_map(|p| ad[&format!("grad.{p}")].to_f64())
        .fold(0f64, |m, x| m.max(x.abs()));
    let eps = 1e-5;
    let mut worst = 0f64;
    let mut checked = 0;
    let mut worst_at = String::new();
    for (pi, path) in paths.iter().enumerate() {
        let grad = ad[&format!("grad.{path}")].to_f64();
        let base = params[path].to_f64();
        for s in 0..samples.min(base.len()) {
            // Spread the samples over the tensor; the first and last element always.
            let i = match s {
                0 => 0,
                1 => base.len() - 1,
                _ => (uniform01(pi as u64, s as u64) * base.len() as f64) as usize,
            };
            let mut p = params.clone();
            let mut v = base.clone();
            v[i] += eps;
            p.insert(
                path.clone(),
                Tensor::f64(params[path].shape.clone(), v.clone()),
            );
            let up = loss_at(&p);
            v[i] -= 2.0 * eps;
            p.insert(path.clone(), Tensor::f64(params[path].shape.clone(), v));
            let down = loss_at(&p);
            let fd = (up - down) / (2.0 * eps);
            let denom = fd.abs().max(grad[i].abs()).max(1e-5 * scale);
            let err = (fd - grad[i]).abs() / denom;
            if err > worst {
                worst = err;
                worst_at = format!("{path}[{i}]: ad {} fd {fd}", grad[i]);
            }
            checked += 1;
        }
    }
    eprintln!(
        "{path}: {} parameters, {checked} elements, max rel err {worst:.2e} ({worst_at})",
        paths.len()
    );
    (worst, checked, paths.len())
}

#[test]
fn llava_tiny_gradients_match_finite_differences() {
    let (b, t) = (2, 5);
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "pixels".into(),
        Tensor::f64(vec![b, 3, 32, 32], values(b * 3 * 32 * 32, 1, -1.0, 1.0)),
    );
    let ids: Vec<i32> = (0..b * t).map(|i| ((i * 97 + 13) % 512) as i32).collect();
    inputs.insert("ids".into(), Tensor::i32(vec![b, t], ids));
    let (err, n, params) = check_model("models/llava_tiny.vlm", inputs, 3);
    assert!(params > 50 && n >= 2 * params);
    assert!(err <= MODEL_TOLERANCE, "llava_tiny: {err:.3e}");
}

#[test]
fn clip_tiny_gradients_match_finite_differences() {
    let (b, t) = (3, 6);
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "pixels".into(),
        Tensor::f64(vec![b, 3, 32, 32], values(b * 3 * 32 * 32, 2, -1.0, 1.0)),
    );
    // Token ids with an end-of-text token (the largest id) at different places.
    let mut ids: Vec<i32> = (0..b * t).map(|i| ((i * 53 + 7) % 500) as i32).collect();
    ids[3] = 511;
    ids[t + 5] = 511;
    ids[2 * t + 1] = 511;
    inputs.insert("ids".into(), Tensor::i32(vec![b, t], ids));
    let (err, n, params) = check_model("models/clip_tiny.vlm", inputs, 3);
    assert!(params > 30 && n >= 2 * params);
    assert!(err <= MODEL_TOLERANCE, "clip_tiny: {err:.3e}");
}

#[test]
fn no_gradient_flows_through_stop_gradient() {
    // loss = sum(x * stop_gradient(x) * r): the gradient is x * r (not the 2 x r that finite
    // differences see).
    let mut c = Case::new();
    let x = c.param("x", "[3, 4]", -1.0, 1.0);
    let s = c.op(Op::StopGradient, &[x]);
    let y = c.op(Op::Binary(BinaryOp::Mul), &[x, s]);
    c.finish(y);
    let mut g = c.g.clone();
    passes::Autodiff {
        loss: "loss".into(),
        params: c.wrt.clone(),
    }
    .run(&mut g)
    .expect("autodiff");
    let out = vlmc_runtime::run(&g, &c.inputs, &c.params).expect("runs");
    let got = out["grad.x"].to_f64();
    let (xs, rs) = (c.params["x"].to_f64(), c.inputs["r"].to_f64());
    for (i, v) in got.iter().enumerate() {
        assert!((v - xs[i] * rs[i]).abs() <= 1e-12, "element {i}: {v}");
    }
}
