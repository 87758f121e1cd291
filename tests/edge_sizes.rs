//! Sizes at the edges: every small model with one of its dims set to 0 (an empty batch, an
//! empty sequence) runs compiled exactly as the interpreter runs it, or both refuse with an
//! error; every plan at those sizes is proven in bounds; an index that a size makes negative is
//! an error on both paths, never a read outside a buffer; a gather index out of range is named.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use vlmc::passes::{compile, CompileOptions};
use vlmc_runtime::Tensor;

/// The symbolic dims of a graph's inputs.
fn input_dims(g: &vlmc::ir::Graph) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, _, ty) in g.inputs() {
        for d in &ty.shape.0 {
            let text = d.to_string();
            if text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !text.chars().all(|c| c.is_ascii_digit())
            {
                out.insert(text);
            }
        }
    }
    out
}

/// Equal shapes and values, NaN equal to NaN (a mean over nothing is NaN on both paths).
fn same(got: &Tensor, want: &Tensor) -> bool {
    let (a, b) = (got.to_f64(), want.to_f64());
    got.shape == want.shape
        && a.iter().zip(&b).all(|(x, y)| {
            (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-4 * y.abs().max(1.0)
        })
}

fn run_compiled(
    m: &vlmc::elab::Elaborated,
    ins: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, String> {
    let compiled = compile(m, &CompileOptions::default()).map_err(|e| e.to_string())?;
    let model = vlmc_runtime::cpu::CpuModel::new(compiled, params.clone(), Default::default());
    model.run(ins).map_err(|e| e.to_string())
}

#[test]
fn zero_sizes_run_compiled_as_interpreted() {
    let mut failures = Vec::new();
    let (mut ran, mut refused) = (0, 0);
    for path in common::small_models(&["tests/blocks"]) {
        let c = vlmc::elab::check_file(&path);
        let Ok(models) = c.result else { continue };
        for m in models {
            let params = vlmc_runtime::init::init_params(&m.graph, 3).expect("init");
            let names = input_dims(&m.graph);
            for zero in &names {
                let mut dims: HashMap<String, i64> = common::small_dims();
                for n in &names {
                    dims.entry(n.clone()).or_insert(3);
                }
                dims.insert(zero.clone(), 0);
                let ins = common::small_inputs(&m.graph, &dims);
                let what = format!("{} {} at {zero} = 0", path.display(), m.model);
                let want = vlmc_runtime::run(&m.graph, &ins, &params);
                let got = run_compiled(&m, &ins, &params);
                match (want, got) {
                    (Ok(w), Ok(g)) => {
                        ran += 1;
                        for (name, wt) in &w {
                            if !g.get(name).is_some_and(|gt| same(gt, wt)) {
                                failures.push(format!("{what}: `{name}` differs"));
                            }
                        }
                    }
                    (Err(_), Err(_)) => refused += 1,
                    (Ok(_), Err(e)) => failures.push(format!("{what}: compiled fails: {e}")),
                    (Err(e), Ok(_)) => {
                        failures.push(format!("{what}: interpreter fails ({e}), compiled runs"))
                    }
                }
            }
        }
    }
    println!("{ran} runs at a zero size matched, {refused} refused on both paths");
    assert!(ran >= 40, "only {ran} runs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every plan of the small models at sizes with 0 and 1 in them: proven in bounds, and its CUDA
/// launches within the device's limits.
#[test]
fn plans_at_every_size_are_proven_in_bounds() {
    let mut checked = 0;
    for path in common::small_models(&["tests/blocks"]) {
        let c = vlmc::elab::check_file(&path);
        let Ok(models) = c.result else { continue };
        for m in models {
            let compiled = compile(&m, &CompileOptions::default()).expect("compiles");
            for b in [0, 1, 3] {
                for t in [0, 1, 7] {
                    let mut dims = common::small_dims();
                    dims.insert("B".into(), b);
                    dims.insert("T".into(), t);
                    let g = &compiled.graph;
                    let mem = vlmc::passes::memory::plan(g, &compiled.fusion, &dims);
                    let lowered = vlmc::kernel::lower_with(
                        g,
                        &compiled.fusion,
                        &mem,
                        &dims,
                        vlmc::kernel::LowerOptions::cpu(),
                    );
                    let Ok(plan) = lowered else { continue };
                    if let Err(e) = vlmc::kernel::bounds::prove(&plan) {
                        panic!("{} at B={b} T={t}: {e}", path.display());
                    }
                    // The CUDA launches at these sizes: no grid of 0 blocks, no launch past
                    // the device's limits (an empty kernel is not launched).
                    for cublas in [true, false] {
                        use vlmc::backend::cuda;
                        let p = cuda::generate(&plan, &cuda::Options { cublas })
                            .unwrap_or_else(|e| panic!("{} at B={b} T={t}: {e}", path.display()));
                        let errors = cuda::launch::check(&plan, &p.launches);
                        assert!(
                            errors.is_empty(),
                            "{} at B={b} T={t}: {}",
                            path.display(),
                            errors.join("; ")
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 200, "only {checked} plans");
}

const LAST: &str = "model M { fn forward(x: f32[B, T]) -> f32[B] { return x[:, T - 1] } }";

#[test]
fn an_index_made_negative_by_a_size_is_an_error_on_both_paths() {
    let dir = std::env::temp_dir().join(format!("vlmc-edge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("last.vlm");
    std::fs::write(&path, LAST).unwrap();
    let m = common::load(path.to_str().unwrap());
    let params = BTreeMap::new();
    let empty: BTreeMap<String, Tensor> =
        [("x".to_string(), Tensor::f32(vec![2, 0], vec![]))].into();
    let e = vlmc_runtime::run(&m.graph, &empty, &params).unwrap_err();
    assert!(e.to_string().contains("negative"), "{e}");
    let e = run_compiled(&m, &empty, &params).unwrap_err();
    assert!(
        e.contains("slice T - 1..T = -1..0 is out of range for axis 1 of size 0"),
        "{e}"
    );
    // The same model at T = 3 takes the last column.
    let x = Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let got = run_compiled(&m, &[("x".to_string(), x)].into(), &params).unwrap();
    assert_eq!(got.values().next().unwrap().as_f32().unwrap(), &[3.0, 6.0]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_gather_index_out_of_range_is_named_on_the_compiled_path() {
    let m = common::load("models/llava_tiny.vlm");
    let params = vlmc_runtime::init::init_params(&m.graph, 1).expect("init");
    let mut dims = common::small_dims();
    dims.insert("T".into(), 3);
    let mut ins = common::small_inputs(&m.graph, &dims);
    ins.insert(
        "ids".into(),
        Tensor::i32(vec![2, 3], vec![1, 2, 3, 4, 99999, 5]),
    );
    let want = vlmc_runtime::run(&m.graph, &ins, &params)
        .unwrap_err()
        .to_string();
    let got = run_compiled(&m, &ins, &params).unwrap_err();
    assert!(
        want.contains("index 99999 is out of range for an axis of size 512"),
        "{want}"
    );
    assert!(
        got.contains("index 99999 is out of range for an axis of size 512"),
        "{got}"
    );
    assert!(got.contains("gather ("), "{got}");
}

/// Nodes of a kernel value's tree.
fn val_size(v: &vlmc::kernel::Val) -> usize {
    use vlmc::kernel::Val;
    1 + match v {
        Val::Unary(_, a) | Val::Cast { value: a, .. } => val_size(a),
        Val::Binary(_, a, b) => val_size(a) + val_size(b),
        Val::Select(c, a, b) => val_size(c) + val_size(a) + val_size(b),
        _ => 0,
    }
}

fn stmts_max(body: &[vlmc::kernel::Stmt]) -> usize {
    use vlmc::kernel::Stmt;
    body.iter()
        .map(|s| match s {
            Stmt::Store { value, .. } | Stmt::Reduce { value, .. } => val_size(value),
            Stmt::Inner { body, .. } => stmts_max(body),
        })
        .max()
        .unwrap_or(0)
}

/// Chains generated by loops: a tree that triples each step (`y * y + y`), a rotation by two
/// slices (a view read twice, doubling each step), and a long linear chain. Each compiles to
/// kernels whose values stay below the fusion bound, and computes what the interpreter does.
#[test]
fn generated_chains_compile_to_bounded_kernels() {
    let bodies = [
        ("for i in 0..22 { y = y * y + y * 0.25 }", 2),
        (
            "for i in 0..41 { y = concat([y[:, 1:], y[:, :1]], axis: 1) }",
            1,
        ),
        (
            "for i in 0..41 { y = concat([y[:, 1:], y[:, :1]], axis: 1) * 1.01 }",
            1,
        ),
        ("for i in 0..3000 { y = y * 0.999 + x * 0.001 }", 2),
    ];
    let dir = std::env::temp_dir().join(format!("vlmc-chains-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (body, min_kernels)) in bodies.iter().enumerate() {
        let path = dir.join(format!("chain{i}.vlm"));
        let text = format!(
            "model M {{ fn forward(x: f32[B, 4]) -> f32[B, 4] {{ let y = x * 0.5\n {body}\n return y }} }}"
        );
        std::fs::write(&path, text).unwrap();
        let m = common::load(path.to_str().unwrap());
        let x = Tensor::f32(vec![2, 4], (0..8).map(|k| k as f32 / 10.0 - 0.3).collect());
        let ins: BTreeMap<String, Tensor> = [("x".to_string(), x)].into();
        let params = BTreeMap::new();
        let want = vlmc_runtime::run(&m.graph, &ins, &params).expect("interpreter");
        let got = run_compiled(&m, &ins, &params).expect("compiled");
        for (name, w) in &want {
            assert!(same(&got[name], w), "{body}: `{name}` differs");
        }
        let compiled = compile(&m, &CompileOptions::default()).expect("compiles");
        let dims: HashMap<String, i64> = [("B".to_string(), 2)].into();
        let mem = vlmc::passes::memory::plan(&compiled.graph, &compiled.fusion, &dims);
        let plan = vlmc::kernel::lower_with(
            &compiled.graph,
            &compiled.fusion,
            &mem,
            &dims,
            vlmc::kernel::LowerOptions::cpu(),
        )
        .expect("lowers");
        let largest = plan
            .kernels
            .iter()
            .flat_map(|k| &k.steps)
            .filter_map(|s| match s {
                vlmc::kernel::Step::Loop(l) => Some(stmts_max(&l.body)),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let bound = 2 * vlmc::passes::fusion::MAX_KERNEL_TREE;
        assert!(
            largest <= bound,
            "{body}: a kernel value of {largest} nodes"
        );
        // The CUDA generator walks the same trees (on this test thread's stack).
        let cuda = vlmc::backend::cuda::generate(&plan, &vlmc::backend::cuda::Options::default())
            .expect("CUDA C");
        assert!(!cuda.launches.is_empty(), "{body}");
        assert!(
            plan.kernels.len() >= *min_kernels,
            "{body}: {} kernels",
            plan.kernels.len()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
