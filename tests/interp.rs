//! Interpreter tests: every `tests/interp/*.vlm` is a small model that exercises one primitive op
//! or builtin, run by the reference interpreter against values computed by hand.
//!
//! Comment lines in the file give the run:
//!
//! ```text
//! // input x: f32[2, 3] = [1, 2, 3, 4, 5, 6]     a graph input (row-major values)
//! // param w: f32[3] = [0.5, -1, 2]              a parameter, by its path (`ln.weight`)
//! // expect y: f32[2, 1] = [6, 15]               an output: dtype, shape and values
//! // tolerance: 1e-6                             relative: |a - b| <= tol * max(1, |b|)
//! // expect-error: TEXT                          the run fails with a message containing TEXT
//! ```
//!
//! Values are numbers, `a/b` fractions, `nan`, `inf`, `-inf`, `true` and `false`. A single
//! unnamed output is called `output`. Every output of the model must be expected (unless the
//! run must fail); NaN matches NaN, bools and i32 match exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use vlmc::ir::{BinaryOp, DType, Graph, Op, UnaryOp};
use vlmc_runtime::{Data, Tensor};

const DIR: &str = "tests/interp";

/// The `.vlm` files of the suite, sorted.
fn cases() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DIR)
        .expect("read tests/interp")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "vlm"))
        .collect();
    files.sort();
    files
}

/// What a case file says about its run.
#[derive(Default)]
struct Case {
    inputs: BTreeMap<String, Tensor>,
    params: BTreeMap<String, Tensor>,
    expects: Vec<(String, DType, Tensor)>,
    error: Option<String>,
    tolerance: f64,
}

fn parse_value(text: &str) -> Result<f64, String> {
    let text = text.trim();
    match text {
        "true" => return Ok(1.0),
        "false" => return Ok(0.0),
        "nan" => return Ok(f64::NAN),
        _ => {}
    }
    let num = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|_| format!("bad value `{text}`"))
    };
    match text.split_once('/') {
        Some((a, b)) => Ok(num(a)? / num(b)?),
        None => num(text),
    }
}

/// `x: f32[2, 3] = [1, 2, 3, 4, 5, 6]` as a name, a dtype and a tensor.
fn parse_tensor(spec: &str) -> Result<(String, DType, Tensor), String> {
    let bad = || format!("bad tensor `{spec}`: expected `NAME: DTYPE[SHAPE] = [VALUES]`");
    let (name, rest) = spec.split_once(':').ok_or_else(bad)?;
    let (ty, values) = rest.split_once('=').ok_or_else(bad)?;
    let (dtype, shape) = ty.trim().split_once('[').ok_or_else(bad)?;
    let dtype = DType::parse(dtype.trim()).ok_or_else(bad)?;
    let shape: Vec<usize> = shape
        .trim_end_matches(']')
        .split(',')
        .filter(|d| !d.trim().is_empty())
        .map(|d| d.trim().parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let values = values.trim().strip_prefix('[').ok_or_else(bad)?;
    let values: Vec<f64> = values
        .strip_suffix(']')
        .ok_or_else(bad)?
        .split(',')
        .filter(|v| !v.trim().is_empty())
        .map(parse_value)
        .collect::<Result<_, _>>()?;
    if values.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "`{spec}`: {} values for shape {shape:?}",
            values.len()
        ));
    }
    let tensor = match dtype {
        DType::I32 => Tensor::i32(shape, values.iter().map(|&v| v as i32).collect()),
        DType::Bool => Tensor::bool(shape, values.iter().map(|&v| v != 0.0).collect()),
        _ => Tensor::f32(shape, values.iter().map(|&v| v as f32).collect()),
    };
    Ok((name.trim().to_string(), dtype, tensor))
}

fn parse_case(text: &str) -> Result<Case, String> {
    let mut case = Case {
        tolerance: 1e-6,
        ..Case::default()
    };
    for line in text.lines() {
        let Some((key, rest)) = line
            .strip_prefix("//")
            .and_then(|l| l.trim().split_once(' '))
        else {
            continue;
        };
        match key {
            "input" => {
                let (name, _, t) = parse_tensor(rest)?;
                case.inputs.insert(name, t);
            }
            "param" => {
                let (name, _, t) = parse_tensor(rest)?;
                case.params.insert(name, t);
            }
            "expect" => case.expects.push(parse_tensor(rest)?),
            "expect-error:" => case.error = Some(rest.trim().to_string()),
            "tolerance:" => case.tolerance = parse_value(rest)?,
            _ => {}
        }
    }
    if case.expects.is_empty() == case.error.is_none() {
        return Err("a case needs `expect` lines or one `expect-error`, not both".into());
    }
    Ok(case)
}

/// The differences between an output and its expected value, as messages.
fn compare(name: &str, dtype: DType, got: &Tensor, want: &Tensor, tol: f64) -> Vec<String> {
    if !got.holds(dtype) || got.shape != want.shape {
        return vec![format!(
            "`{name}`: got {got}, expected {dtype}{:?}",
            want.shape
        )];
    }
    let close = |a: f64, b: f64| {
        a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * b.abs().max(1.0)
    };
    let exact = !matches!(got.data, Data::F32(_));
    let (g, w) = (got.to_f64(), want.to_f64());
    g.iter()
        .zip(&w)
        .enumerate()
        .filter(|&(_, (&a, &b))| if exact { a != b } else { !close(a, b) })
        .map(|(i, (a, b))| format!("`{name}`[{i}] = {a}, expected {b}"))
        .collect()
}

fn elaborate(path: &Path) -> Graph {
    let checked = vlmc::elab::check_file(path);
    match checked.result {
        Ok(mut models) => models.remove(0).graph,
        Err(_) => panic!("{} does not check:\n{}", path.display(), checked.render()),
    }
}

/// Runs one case; returns every problem found.
fn check_case(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read case");
    let case = match parse_case(&text) {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let graph = elaborate(path);
    let result = vlmc_runtime::run(&graph, &case.inputs, &case.params);
    match (result, &case.error) {
        (Err(e), Some(want)) if e.message.contains(want.as_str()) => vec![],
        (Err(e), Some(want)) => vec![format!("failed with `{e}`, expected `{want}`")],
        (Err(e), None) => vec![format!("failed: {e}")],
        (Ok(_), Some(want)) => vec![format!("ran, but should fail with `{want}`")],
        (Ok(outs), None) => {
            let mut problems = Vec::new();
            for name in outs.keys() {
                if !case.expects.iter().any(|(n, ..)| n == name) {
                    problems.push(format!("output `{name}` has no `expect` line"));
                }
            }
            for (name, dtype, want) in &case.expects {
                match outs.get(name) {
                    Some(got) => problems.extend(compare(name, *dtype, got, want, case.tolerance)),
                    None => problems.push(format!("no output `{name}`")),
                }
            }
            problems
        }
    }
}

#[test]
fn ops_agree_with_hand_computed_values() {
    let files = cases();
    assert!(files.len() >= 40, "{DIR} should hold at least 40 cases");
    let mut failed = Vec::new();
    for path in &files {
        let problems = catch_unwind(AssertUnwindSafe(|| check_case(path)))
            .unwrap_or_else(|_| vec!["panicked (see above)".to_string()]);
        if !problems.is_empty() {
            failed.push(format!(
                "{}:\n    {}",
                path.display(),
                problems.join("\n    ")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

/// Every primitive op appears in some case: elementwise ops with each dtype they accept
/// (`add:i32`), casts with each conversion (`cast:f32->i32`).
#[test]
fn every_op_is_covered() {
    let mut seen = BTreeSet::new();
    for path in cases() {
        let g = elaborate(&path);
        for id in g.node_ids() {
            let op = &g.node(id).op;
            let from = g.operands(id).first().map(|&o| g.node(o).ty.dtype);
            seen.insert(op.name().to_string());
            if let (Op::Unary(_) | Op::Binary(_), Some(from)) = (op, from) {
                seen.insert(format!("{}:{from}", op.name()));
            }
            if let (Op::Cast { dtype }, Some(from)) = (op, from) {
                seen.insert(format!("cast:{from}->{dtype}"));
            }
        }
    }
    let mut wanted: Vec<String> = "input param const iota random select reduce_sum reduce_max \
        matmul gather scatter_add stop_gradient reshape permute expand slice concat pad neg:i32 abs:i32 not:bool and:bool \
        or:bool eq:bool ne:bool cast:f32->i32 cast:i32->f32 cast:bool->f32 cast:f32->bool \
        cast:f32->f16 cast:f32->bf16"
        .split_whitespace()
        .map(String::from)
        .collect();
    for op in UnaryOp::ALL.iter().filter(|&&op| op != UnaryOp::Not) {
        wanted.push(format!("{}:f32", op.name()));
    }
    for op in BinaryOp::ALL
        .iter()
        .filter(|op| !matches!(op, BinaryOp::And | BinaryOp::Or))
    {
        wanted.push(format!("{}:f32", op.name()));
        if *op != BinaryOp::Pow {
            wanted.push(format!("{}:i32", op.name()));
        }
    }
    let missing: Vec<&String> = wanted.iter().filter(|w| !seen.contains(*w)).collect();
    assert!(missing.is_empty(), "no case covers {missing:?}");
}
