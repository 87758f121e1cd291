//! Helpers shared by the test files that run every small model (`mod common;` in each): the
//! list of models, their synthetic inputs, and relative errors.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use vlmc_runtime::Tensor;

mod files;
#[allow(unused_imports)] // not every test binary uses them
pub use files::*;
mod zoo_data;
#[allow(unused_imports)]
pub use zoo_data::*;

/// Every parameter path of a model (a trainer that trains them all).
pub fn all_params(m: &vlmc::elab::Elaborated) -> Vec<String> {
    m.graph.params().iter().map(|p| p.1.to_string()).collect()
}

/// The last model of a `.vlm` file, or a panic with its diagnostics.
pub fn load(path: &str) -> vlmc::elab::Elaborated {
    let checked = vlmc::elab::check_file(std::path::Path::new(path));
    let text = checked.render();
    let mut models = checked.result.unwrap_or_else(|_| panic!("{text}"));
    models.pop().expect("a model")
}

/// The model `name` of the spec at `path`, elaborated.
pub fn load_named(path: &str, name: &str) -> vlmc::elab::Elaborated {
    let checked = vlmc::elab::check_file(std::path::Path::new(path));
    let text = checked.render();
    let models = checked.result.unwrap_or_else(|_| panic!("{text}"));
    models
        .into_iter()
        .find(|m| m.model == name)
        .unwrap_or_else(|| panic!("{path} has no model {name}"))
}

/// The `.vlm` files of a folder, sorted.
pub fn vlm_files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "vlm"))
        .collect();
    v.sort();
    v
}

/// The small models: the tiny examples, the zoo at fixture size, and the `.vlm` files of
/// `dirs` (e.g. the block and pass tests).
pub fn small_models(dirs: &[&str]) -> Vec<PathBuf> {
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
    for dir in dirs {
        out.extend(vlm_files(dir));
    }
    out
}

/// The sizes the small models run at.
pub fn small_dims() -> HashMap<String, i64> {
    [("B", 2), ("T", 5), ("N", 3), ("S", 4)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

/// Inputs at small sizes; ids 1..7 stay inside every table of the test models; masks and
/// token types are 0/1 with a 1 first (no fully masked row).
pub fn small_inputs(g: &vlmc::ir::Graph, dims: &HashMap<String, i64>) -> BTreeMap<String, Tensor> {
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

/// max |got - want| / max |want| (equal values, infinities included, count as no error).
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (a, b) = (got.to_f64(), want.to_f64());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0f64, f64::max)
        / scale
}

/// The spec `path` with one more trainer `case` for model `model` (objective `objective`,
/// AdamW lr 1e-3 without weight decay, batch 3, one step, clipping at 1.0), elaborated, and
/// that trainer read.
pub fn with_trainer(
    path: &str,
    model: &str,
    objective: &str,
) -> (vlmc::elab::Elaborated, vlmc::train::TrainConfig) {
    let path = std::path::Path::new(path);
    let mut text = std::fs::read_to_string(path).expect("spec");
    text.push_str(&format!(
        "\ntrainer case for {model} {{\n  objective {objective}\n  optimizer adamw(lr: 1e-3, \
         weight_decay: 0.0)\n  batch 3, steps 1, clip_grad 1.0\n}}\n"
    ));
    let checked = vlmc::elab::check_text(path, text);
    let rendered = checked.render();
    let name = model;
    let model = checked
        .result
        .unwrap_or_else(|_| panic!("{rendered}"))
        .into_iter()
        .find(|m| m.model == name)
        .expect("model");
    let cfg = vlmc::train::TrainConfig::of(&model, "case").expect("trainer");
    (model, cfg)
}
