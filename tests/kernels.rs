//! The kernel IR: every model, compiled (passes, fusion, memory plan) and lowered to kernels at
//! concrete sizes, computes what the reference interpreter computes when the plan is executed.
//! Temporaries share one arena as the memory plan places them, so an overlap of two live
//! values would show up as a wrong result.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use vlmc::passes::{compile, CompileOptions};
use vlmc_runtime::Tensor;

/// The small models: the tiny examples, the block and pass tests, and the zoo at fixture size.
fn files() -> Vec<PathBuf> {
    let mut out = vec![
        PathBuf::from("models/llava_tiny.vlm"),
        PathBuf::from("models/clip_tiny.vlm"),
    ];
    let mut zoo: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/zoo")
        .expect("zoo")
        .map(|e| e.expect("entry").path().join("fixture.vlm"))
        .filter(|p| p.is_file())
        .collect();
    zoo.sort();
    out.extend(zoo);
    for dir in ["tests/blocks", "tests/passes"] {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "vlm"))
            .collect();
        v.sort();
        out.extend(v);
    }
    out
}

/// Inputs at small sizes; ids 1..7 stay inside every table of the test models.
fn inputs(g: &vlmc::ir::Graph, dims: &HashMap<String, i64>) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (k, (_, name, ty)) in g.inputs().into_iter().enumerate() {
        let shape: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| d.eval(&|s| dims.get(s).copied()).expect("size") as usize)
            .collect();
        let n: usize = shape.iter().product();
        let t = match ty.dtype {
            // Masks and token types are 0/1 (with a 1 first: no fully masked row).
            vlmc::ir::DType::I32 if name.contains("mask") || name.contains("type") => {
                Tensor::i32(shape, (0..n).map(|i| i32::from(i % 5 != 3)).collect())
            }
            vlmc::ir::DType::I32 => Tensor::i32(
                shape,
                (0..n).map(|i| ((i * 7 + k) % 7) as i32 + 1).collect(),
            ),
            vlmc::ir::DType::Bool => Tensor::bool(shape, (0..n).map(|i| i % 3 != 0).collect()),
            _ => Tensor::f32(
                shape,
                (0..n)
                    .map(|i| (((i * 7919 + k * 31) % 1000) as f32 / 500.0) - 1.0)
                    .collect(),
            ),
        };
        out.insert(name.to_string(), t);
    }
    out
}

#[test]
fn lowered_kernels_compute_what_the_interpreter_computes() {
    let dims: HashMap<String, i64> = [("B", 2), ("T", 5), ("N", 3), ("S", 4)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in files() {
        eprintln!("{}", path.display());
        let c = vlmc::elab::check_file(&path);
        let Ok(models) = c.result else { continue };
        for m in models {
            // Zoo fixtures run on their own inputs (ids must be valid positions and tokens).
            let io = path.with_file_name("io.safetensors");
            let ins = if io.is_file() {
                let f = vlmc_runtime::weights::WeightFile::open(&io).expect("io");
                f.names()
                    .into_iter()
                    .filter(|n| !n.starts_with("expect."))
                    .map(|n| {
                        let t = f.get(&n).expect("tensor");
                        (n, t)
                    })
                    .collect()
            } else {
                inputs(&m.graph, &dims)
            };
            let dims: HashMap<String, i64> =
                vlmc_runtime::interp::bind_dims(&m.graph, &ins).expect("inputs fit");
            let compiled = compile(&m, &CompileOptions::default()).expect("compiles");
            let mem = vlmc::passes::memory::plan(&compiled.graph, &compiled.fusion, &dims);
            let plan = match vlmc::kernel::lower(&compiled.graph, &compiled.fusion, &mem, &dims) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{}: lowering: {e}", path.display()));
                    continue;
                }
            };
            let params = vlmc_runtime::init::init_params(&m.graph, 3).expect("init");
            let want = vlmc_runtime::run(&m.graph, &ins, &params).expect("interpreter");
            let lt = vlmc_runtime::plan::load_time_values(&plan, &compiled.graph, &params)
                .expect("load time");
            let got = match vlmc_runtime::plan::execute(&plan, &ins, &params, &lt) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{}: plan: {e}", path.display()));
                    continue;
                }
            };
            for (name, w) in &want {
                let g = &got[name];
                let (a, b) = (g.to_f64(), w.to_f64());
                let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
                let err = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f64, f64::max)
                    / scale;
                if g.shape != w.shape || err > 1e-5 {
                    failures.push(format!(
                        "{}: {}: `{name}` differs by {err:e}",
                        path.display(),
                        m.model
                    ));
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} models checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
