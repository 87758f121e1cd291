//! The CPU backend: every small model (the tiny examples, the block and pass tests, the zoo at
//! fixture size), compiled to machine code with Cranelift and run by the runtime, computes what
//! the reference interpreter computes (relative error ≤ 1e-4), vectorised and scalar.

mod common;

use std::collections::BTreeMap;
use vlmc::backend::cpu::CpuOptions;
use vlmc::passes::{compile, CompileOptions};
use vlmc_runtime::Tensor;

fn check_all(opts: &CpuOptions) {
    let dims = common::small_dims();
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut worst = 0f64;
    for path in common::small_models(&["tests/blocks", "tests/passes"]) {
        let c = vlmc::elab::check_file(&path);
        let Ok(models) = c.result else { continue };
        for m in models {
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
            let params = vlmc_runtime::init::init_params(&m.graph, 3).expect("init");
            let want = vlmc_runtime::run(&m.graph, &ins, &params).expect("interpreter");
            let compiled = compile(&m, &CompileOptions::default()).expect("compiles");
            let model = vlmc_runtime::cpu::CpuModel::new(compiled, params, opts.clone());
            let got = match model.run(&ins) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            for (name, w) in &want {
                let g = &got[name];
                let err = common::rel_err(g, w);
                worst = worst.max(err);
                if g.shape != w.shape || err > 1e-4 || err.is_nan() {
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
    println!("{checked} models, worst relative error {worst:e}");
    assert!(checked >= 25, "only {checked} models checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn compiled_models_compute_what_the_interpreter_computes() {
    check_all(&CpuOptions::default());
}

#[test]
fn scalar_code_computes_what_the_interpreter_computes() {
    check_all(&CpuOptions {
        vectorize: false,
        merge: false,
        ..CpuOptions::default()
    });
}

/// all-MiniLM-L6-v2 with its published weights, compiled, against sentence-transformers'
/// embeddings (`tests/fixtures/minilm/reference.safetensors`; weights from `tests/setup.sh`).
#[test]
fn minilm_compiled_matches_sentence_transformers() {
    use vlmc_runtime::weights::WeightFile;
    let dir = std::path::Path::new(".cache/minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the MiniLM weights are missing: run tests/setup.sh first"
    );
    let checked = vlmc::elab::check_file(std::path::Path::new("models/minilm.vlm"));
    let text = checked.render();
    let model = checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .remove(0);
    let file = WeightFile::open(&dir.join("model.safetensors")).expect("weights open");
    let bound =
        vlmc_runtime::weights::bind(&model.graph, &file, &model.checkpoint).expect("weights bind");
    let reference = WeightFile::open(std::path::Path::new(
        "tests/fixtures/minilm/reference.safetensors",
    ))
    .expect("reference");
    let inputs: BTreeMap<String, Tensor> = [
        ("ids", "input_ids"),
        ("mask", "attention_mask"),
        ("types", "token_type_ids"),
    ]
    .iter()
    .map(|(ours, theirs)| {
        let t = reference.get(theirs).unwrap_or_else(|_| {
            // Token types are all zero when the reference does not store them.
            let ids = reference.get("input_ids").expect("input_ids");
            Tensor::i32(ids.shape.clone(), vec![0; ids.numel()])
        });
        (ours.to_string(), t)
    })
    .collect();
    let compiled = compile(&model, &CompileOptions::default()).expect("compiles");
    let cpu = vlmc_runtime::cpu::CpuModel::new(compiled, bound.params, CpuOptions::default());
    let out = cpu.run(&inputs).expect("compiled run");
    let got = out["embedding"].as_f32().expect("f32");
    let want = reference.get("embeddings").expect("embeddings");
    let want = want.as_f32().expect("f32");
    assert_eq!(out["embedding"].shape, vec![8, 384]);
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("MiniLM compiled: max |vlmc - sentence-transformers| = {max_abs:e}");
    assert!(max_abs <= 1e-4, "max abs error {max_abs}");
}
