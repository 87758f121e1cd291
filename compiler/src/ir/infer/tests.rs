//! Each op's typing rule: a good case and the error text of bad ones.

use super::*;
use crate::ir::op::{Init, ReduceOp};

fn t(text: &str) -> TensorType {
    TensorType::parse(text).expect("test type parses")
}

fn d(text: &str) -> Dim {
    Dim::parse(text).expect("test dimension parses")
}

fn shape(dims: &[&str]) -> Shape {
    dims.iter().map(|s| d(s)).collect()
}

/// Infers `op` on operands written as types, returning the type or the error text.
fn run(op: Op, operands: &[&str]) -> Result<String, String> {
    let types: Vec<TensorType> = operands.iter().map(|s| t(s)).collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    infer(&op, &refs)
        .map(|ty| ty.to_string())
        .map_err(|e| e.to_string())
}

fn ok(text: &str) -> Result<String, String> {
    Ok(text.to_string())
}

fn err(text: &str) -> Result<String, String> {
    Err(text.to_string())
}

#[test]
fn unary() {
    let exp = Op::Unary(UnaryOp::Exp);
    assert_eq!(run(exp.clone(), &["bf16[B, T]"]), ok("bf16[B, T]"));
    assert_eq!(
        run(exp.clone(), &["i32[B]"]),
        err("exp: expected a float operand, found i32[B]")
    );
    assert_eq!(run(Op::Unary(UnaryOp::Neg), &["i32[B]"]), ok("i32[B]"));
    assert_eq!(run(Op::Unary(UnaryOp::Not), &["bool[B]"]), ok("bool[B]"));
    assert_eq!(
        run(Op::Unary(UnaryOp::Not), &["f32[B]"]),
        err("not: expected a bool operand, found f32[B]")
    );
    assert_eq!(
        run(exp, &["f32[B]", "f32[B]"]),
        err("exp: expected 1 operand, found 2")
    );
}

#[test]
fn binary() {
    let add = Op::Binary(BinaryOp::Add);
    assert_eq!(
        run(add.clone(), &["f32[B, T]", "f32[B, T]"]),
        ok("f32[B, T]")
    );
    assert_eq!(
        run(add.clone(), &["f32[B, T]", "f32[B, 1]"]),
        err("add: shapes differ: f32[B, T] vs f32[B, 1] (binary ops do not broadcast; expand first)")
    );
    assert_eq!(
        run(add.clone(), &["f32[B]", "f16[B]"]),
        err("add: element types differ: f32[B] vs f16[B]")
    );
    assert_eq!(
        run(add, &["bool[B]", "bool[B]"]),
        err("add: expected float or i32 operands, found bool[B]")
    );
    assert_eq!(
        run(Op::Binary(BinaryOp::Lt), &["i32[T]", "i32[T]"]),
        ok("bool[T]")
    );
    assert_eq!(
        run(Op::Binary(BinaryOp::And), &["bool[T]", "bool[T]"]),
        ok("bool[T]")
    );
    assert_eq!(
        run(Op::Binary(BinaryOp::Or), &["i32[T]", "i32[T]"]),
        err("or: expected bool operands, found i32[T]")
    );
    assert_eq!(
        run(Op::Binary(BinaryOp::Pow), &["i32[T]", "i32[T]"]),
        err("pow: expected float operands, found i32[T]")
    );
}

#[test]
fn select() {
    assert_eq!(
        run(Op::Select, &["bool[B, T]", "f32[B, T]", "f32[B, T]"]),
        ok("f32[B, T]")
    );
    assert_eq!(
        run(Op::Select, &["f32[B, T]", "f32[B, T]", "f32[B, T]"]),
        err("select: the condition must be bool, found f32[B, T]")
    );
    assert_eq!(
        run(Op::Select, &["bool[B, T]", "f32[B, T]", "f16[B, T]"]),
        err("select: branch types differ: f32[B, T] vs f16[B, T]")
    );
    assert_eq!(
        run(Op::Select, &["bool[1, T]", "f32[B, T]", "f32[B, T]"]),
        err("select: condition bool[1, T] and branches f32[B, T] differ in shape (expand first)")
    );
}

#[test]
fn reduce() {
    let sum = |axis| Op::Reduce {
        op: ReduceOp::Sum,
        axis,
    };
    assert_eq!(run(sum(1), &["f32[B, T, 64]"]), ok("f32[B, 1, 64]"));
    assert_eq!(
        run(sum(3), &["f32[B, T, 64]"]),
        err("reduce_sum: axis 3 is out of range for f32[B, T, 64] (rank 3)")
    );
    assert_eq!(
        run(sum(0), &["bool[B]"]),
        err("reduce_sum: expected a float or i32 operand, found bool[B]")
    );
}

#[test]
fn matmul() {
    assert_eq!(
        run(Op::MatMul, &["f32[B, T, 64]", "f32[B, 64, 96]"]),
        ok("f32[B, T, 96]")
    );
    assert_eq!(
        run(Op::MatMul, &["f32[B, T, 64]", "f32[32, 96]"]),
        err("matmul: inner dimensions differ: f32[B, T, 64] @ f32[32, 96] (64 vs 32)")
    );
    assert_eq!(
        run(Op::MatMul, &["f32[B, T, 64]", "f32[64, 96]"]),
        err("matmul: ranks differ: f32[B, T, 64] @ f32[64, 96] (batch dimensions must be identical; reshape or expand first)")
    );
    assert_eq!(
        run(Op::MatMul, &["f32[B, T, 64]", "f32[2, 64, 96]"]),
        err("matmul: batch dimensions differ: f32[B, T, 64] @ f32[2, 64, 96] ([B] vs [2])")
    );
    assert_eq!(
        run(Op::MatMul, &["f32[64]", "f32[64, 3]"]),
        err("matmul: operands need rank >= 2: f32[64] @ f32[64, 3]")
    );
    assert_eq!(
        run(Op::MatMul, &["i32[2, 2]", "i32[2, 2]"]),
        err("matmul: expected float operands, found i32[2, 2] @ i32[2, 2]")
    );
    assert_eq!(
        run(Op::MatMul, &["f32[2, 2]", "bf16[2, 2]"]),
        err("matmul: element types differ: f32[2, 2] @ bf16[2, 2]")
    );
}

#[test]
fn scatter_add() {
    let scatter = |axis, size: &str| Op::ScatterAdd {
        axis,
        size: d(size),
    };
    assert_eq!(
        run(scatter(0, "V"), &["f32[B, T, 64]", "i32[B, T]"]),
        ok("f32[V, 64]")
    );
    assert_eq!(
        run(scatter(1, "4"), &["f32[2, 3, 5]", "i32[3]"]),
        ok("f32[2, 4, 5]")
    );
    assert_eq!(
        run(scatter(0, "V"), &["f32[B, 64]", "f32[B]"]),
        err("scatter_add: indices must be i32, found f32[B]")
    );
    assert_eq!(
        run(scatter(0, "V"), &["f32[B, 64]", "i32[T]"]),
        err("scatter_add: f32[B, 64] does not hold the indices i32[T] at axis 0")
    );
}

#[test]
fn gather() {
    let gather = |axis| Op::Gather { axis };
    assert_eq!(
        run(gather(0), &["f32[V, 64]", "i32[B, T]"]),
        ok("f32[B, T, 64]")
    );
    assert_eq!(run(gather(1), &["f32[V, 64]", "i32[B]"]), ok("f32[V, B]"));
    assert_eq!(
        run(gather(0), &["f32[V, 64]", "f32[B, T]"]),
        err("gather: indices must be i32, found f32[B, T]")
    );
    assert_eq!(
        run(gather(2), &["f32[V, 64]", "i32[B]"]),
        err("gather: axis 2 is out of range for f32[V, 64] (rank 2)")
    );
}

#[test]
fn reshape() {
    let reshape = |dims: &[&str]| Op::Reshape { shape: shape(dims) };
    assert_eq!(
        run(
            reshape(&["B", "3", "4", "8", "4", "8"]),
            &["f32[B, 3, 32, 32]"]
        ),
        ok("f32[B, 3, 4, 8, 4, 8]")
    );
    assert_eq!(
        run(reshape(&["B*T", "64"]), &["f32[T, B, 64]"]),
        ok("f32[B*T, 64]")
    );
    assert_eq!(
        run(reshape(&["B", "8"]), &["f32[B, 16]"]),
        err("reshape: element counts differ: f32[B, 16] has 16*B, [B, 8] has 8*B")
    );
    assert_eq!(
        run(reshape(&["-1", "-16"]), &["f32[16]"]),
        err("reshape: negative dimension -1 in [-1, -16]")
    );
}

#[test]
fn permute() {
    let permute = |perm: &[usize]| Op::Permute {
        perm: perm.to_vec(),
    };
    assert_eq!(
        run(permute(&[0, 2, 1]), &["f32[B, T, 64]"]),
        ok("f32[B, 64, T]")
    );
    assert_eq!(
        run(permute(&[0, 0, 1]), &["f32[B, T, 64]"]),
        err("permute: [0, 0, 1] is not a permutation of 0..3 for f32[B, T, 64]")
    );
    assert_eq!(
        run(permute(&[1, 0]), &["f32[B, T, 64]"]),
        err("permute: [1, 0] is not a permutation of 0..3 for f32[B, T, 64]")
    );
    assert!(run(permute(&[0, 1, 3]), &["f32[B, T, 64]"]).is_err());
}

#[test]
fn expand() {
    let expand = |dims: &[&str]| Op::Expand { shape: shape(dims) };
    assert_eq!(run(expand(&["B", "T"]), &["f32[1, T]"]), ok("f32[B, T]"));
    assert_eq!(
        run(expand(&["B", "T"]), &["f32[B, 3]"]),
        err("expand: cannot expand f32[B, 3] to [B, T]: axis 1 is 3, neither 1 nor T")
    );
    assert_eq!(
        run(expand(&["B", "T"]), &["f32[T]"]),
        err("expand: target [B, T] has rank 2, but f32[T] has rank 1 (reshape first)")
    );
}

#[test]
fn slice() {
    let slice = |start: &str, end: &str, step| Op::Slice {
        axis: 1,
        start: d(start),
        end: d(end),
        step,
    };
    assert_eq!(
        run(slice("1", "T + 1", 1), &["f32[B, T + 16]"]),
        ok("f32[B, T]")
    );
    assert_eq!(run(slice("0", "10", 3), &["f32[B, 16]"]), ok("f32[B, 4]"));
    assert_eq!(run(slice("0", "2*T", 2), &["f32[B, 2*T]"]), ok("f32[B, T]"));
    assert_eq!(run(slice("0", "B", 1), &["f32[B, T]"]), ok("f32[B, B]"));
    assert_eq!(
        run(slice("0", "T", 2), &["f32[B, T]"]),
        err("slice: the length T of 0..T is not a known multiple of step 2")
    );
    assert_eq!(
        run(slice("0", "T + 17", 1), &["f32[B, T + 16]"]),
        err("slice: end T + 17 is past the size T + 16 of axis 1 of f32[B, T + 16]")
    );
    assert_eq!(
        run(slice("5", "3", 1), &["f32[B, 16]"]),
        err("slice: start 5 is past end 3")
    );
    assert_eq!(
        run(slice("-1", "3", 1), &["f32[B, 16]"]),
        err("slice: start -1 is negative")
    );
    assert_eq!(
        run(slice("0", "3", 0), &["f32[B, 16]"]),
        err("slice: step must be at least 1, found 0")
    );
}

#[test]
fn concat() {
    let concat = Op::Concat { axis: 1 };
    assert_eq!(
        run(
            concat.clone(),
            &["f32[B, 1, 64]", "f32[B, T, 64]", "f32[B, 16, 64]"]
        ),
        ok("f32[B, T + 17, 64]")
    );
    assert_eq!(run(concat.clone(), &["f32[B, T]"]), ok("f32[B, T]"));
    assert_eq!(
        run(concat.clone(), &["f32[B, 1, 64]", "f32[B, T, 32]"]),
        err("concat: operand 1 is f32[B, T, 32], which does not match operand 0 f32[B, 1, 64] outside axis 1")
    );
    assert_eq!(
        run(concat, &[]),
        err("concat: expected at least 1 operand, found 0")
    );
}

#[test]
fn pad() {
    let pad = |before: &str, value| Op::Pad {
        axis: 0,
        before: d(before),
        after: d("1"),
        value,
    };
    assert_eq!(run(pad("T", 0.0), &["f32[T]"]), ok("f32[2*T + 1]"));
    assert_eq!(
        run(pad("-2", 0.0), &["f32[T]"]),
        err("pad: before is negative (-2)")
    );
    assert_eq!(
        run(pad("0", 0.5), &["i32[T]"]),
        err("pad: value 0.5 is not representable in i32")
    );
}

#[test]
fn cast() {
    assert_eq!(
        run(Op::Cast { dtype: DType::BF16 }, &["nf4[64, 64]"]),
        ok("bf16[64, 64]")
    );
}

#[test]
fn sources_are_not_inferred() {
    assert_eq!(
        run(Op::Const { value: 1.0 }, &[]),
        err("const: is a source: its type is given at insertion, not inferred from operands")
    );
}

#[test]
fn source_types() {
    let check = |op: Op, ty: &str| check_source(&op, &t(ty)).map_err(|e| e.to_string());
    assert_eq!(check(Op::Const { value: 1.0 }, "bool[]"), Ok(()));
    assert_eq!(
        check(Op::Const { value: 2.0 }, "bool[]"),
        Err("const: value 2 is not representable in bool".into())
    );
    assert_eq!(
        check(
            Op::Const {
                value: f64::NEG_INFINITY
            },
            "i32[]"
        ),
        Err("const: value -inf is not representable in i32".into())
    );
    assert_eq!(check(Op::Iota { axis: 1 }, "i32[B, T]"), Ok(()));
    assert_eq!(
        check(Op::Iota { axis: 2 }, "i32[B, T]"),
        Err("iota: axis 2 is out of range for i32[B, T] (rank 2)".into())
    );
    assert_eq!(
        check(
            Op::Random {
                dist: Dist::Normal {
                    mean: 0.0,
                    std: 1.0
                },
                seed: 1
            },
            "bool[B]"
        ),
        Err("random: normal cannot produce bool[B]".into())
    );
    assert_eq!(
        check(
            Op::Random {
                dist: Dist::Bernoulli { p: 1.5 },
                seed: 1
            },
            "bool[B]"
        ),
        Err("random: invalid distribution bernoulli(p=1.5)".into())
    );
    let param = Op::Param {
        path: "w".into(),
        init: Init::zeros(),
    };
    let bad_init = Op::Param {
        path: "w".into(),
        init: Init::new("he-normal", &[]),
    };
    assert_eq!(
        check(bad_init, "f32[3]"),
        Err("param: initialiser `he-normal` must use identifier names".into())
    );
    assert_eq!(
        check(param, "f32[-3]"),
        Err("param: negative dimension -3 in [-3]".into())
    );
    assert_eq!(
        check(Op::MatMul, "f32[]"),
        Err("matmul: has operands: insert it with `Graph::add`, not `add_source`".into())
    );
}
