//! The kernel IR: every model, compiled (passes, fusion, memory plan) and lowered to kernels at
//! concrete sizes, computes what the reference interpreter computes when the plan is executed.
//! Temporaries share one arena as the memory plan places them, so an overlap of two live
//! values would show up as a wrong result.

mod common;

use std::collections::HashMap;
use vlmc::passes::{compile, CompileOptions};

#[test]
fn lowered_kernels_compute_what_the_interpreter_computes() {
    let dims = common::small_dims();
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in common::small_models(&["tests/blocks", "tests/passes"]) {
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
                common::small_inputs(&m.graph, &dims)
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
