//! The model zoo against Hugging Face `transformers`: every folder of `tests/fixtures/zoo/`
//! holds a tiny randomly initialised model saved with `save_pretrained`, fixed inputs and the
//! outputs transformers computed (`make.py` in the folder made them). The zoo spec, sized by
//! the folder's `fixture.vlm`, must load the checkpoint with no conversion and reproduce every
//! output with the reference interpreter: relative error <= 1e-4.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc_runtime::weights::WeightFile;
use vlmc_runtime::Tensor;

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/zoo")
        .expect("tests/fixtures/zoo")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("fixture.vlm").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// max |got - want| / max(|want|): the error relative to the output's scale.
fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_f64(), want.to_f64());
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max)
        / scale
}

/// Runs one fixture; returns (output, relative error) for every expected output.
fn check_fixture(dir: &Path) -> Result<Vec<(String, f64)>, String> {
    let checked = vlmc::elab::check_file(&dir.join("fixture.vlm"));
    let text = checked.render();
    let mut models = checked.result.map_err(|_| text)?;
    let model = models.pop().ok_or("fixture.vlm declares no model")?;
    let weights = WeightFile::open(&dir.join("model.safetensors")).map_err(|e| e.message)?;
    let bound = vlmc_runtime::weights::bind(&model.graph, &weights, &model.checkpoint)
        .map_err(|e| e.message)?;
    if !bound.unused.is_empty() {
        return Err(format!(
            "checkpoint tensors not used by the spec: {:?}",
            bound.unused
        ));
    }
    let io = WeightFile::open(&dir.join("io.safetensors")).map_err(|e| e.message)?;
    let mut inputs = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for name in io.names() {
        let t = io.get(&name).map_err(|e| e.message)?;
        match name.strip_prefix("expect.") {
            Some(out) => expected.insert(out.to_string(), t),
            None => inputs.insert(name, t),
        };
    }
    let outputs = vlmc_runtime::run(&model.graph, &inputs, &bound.params).map_err(|e| e.message)?;
    if expected.is_empty() {
        return Err("io.safetensors has no expected outputs".into());
    }
    let mut report = Vec::new();
    for (name, want) in &expected {
        let got = outputs.get(name).ok_or_else(|| {
            format!(
                "the spec has no output `{name}` (it has {:?})",
                outputs.keys().collect::<Vec<_>>()
            )
        })?;
        if got.shape != want.shape {
            return Err(format!(
                "output `{name}` is {:?}, expected {:?}",
                got.shape, want.shape
            ));
        }
        report.push((name.clone(), relative_error(got, want)));
    }
    Ok(report)
}

#[test]
fn zoo_matches_transformers() {
    let dirs = fixtures();
    assert!(!dirs.is_empty(), "no fixtures in tests/fixtures/zoo");
    let mut failures = Vec::new();
    for dir in &dirs {
        match check_fixture(dir) {
            Err(e) => failures.push(format!("{}: {e}", dir.display())),
            Ok(report) => {
                for (name, err) in report {
                    println!("{}: {name}: relative error {err:.2e}", dir.display());
                    if err > TOLERANCE {
                        failures.push(format!(
                            "{}: output `{name}` differs: relative error {err:.2e}",
                            dir.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
