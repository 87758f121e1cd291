//! Inputs the training session draws before each run (LoRA dropout masks, uniform numbers):
//! which inputs they are, their sizes (solved from the data inputs) and their values, element
//! `i` a pure function of (tag, trainer seed, optimiser step, micro-batch, input name, `i`)
//! through the counter-based generator of [`crate::rng`], so every step draws anew and a
//! resumed run draws exactly what an uninterrupted one would.

use crate::interp::{concrete, Bindings};
use crate::rng::{fnv1a, uniform01};
use crate::tensor::Tensor;
use crate::train::TrainRunError;
use std::collections::BTreeMap;
use vlmc::ir::{DType, Graph, TensorType};

/// The inputs (name, type) of a graph when one of them starts with `prefix`: every input (the
/// drawn ones' sizes are solved from the others); none otherwise.
pub fn inputs_with(graph: &Graph, prefix: &str) -> Vec<(String, TensorType)> {
    let all: Vec<(String, TensorType)> = graph
        .inputs()
        .into_iter()
        .map(|(_, n, t)| (n.to_string(), t.clone()))
        .collect();
    if all.iter().any(|(n, _)| n.starts_with(prefix)) {
        all
    } else {
        Vec::new()
    }
}

/// What is drawn: the inputs starting with `prefix`, from streams named by `tag`, described as
/// `what` in errors.
pub struct Draw<'a> {
    pub prefix: &'a str,
    pub tag: &'a str,
    pub what: &'a str,
}

/// Where a run is: the trainer's seed, the optimiser step and the micro-batch.
#[derive(Clone, Copy)]
pub struct At {
    pub seed: u64,
    pub step: u64,
    pub micro: usize,
}

impl Draw<'_> {
    /// The seed of one input's stream.
    pub fn stream_seed(&self, at: At, name: &str) -> u64 {
        fnv1a(&format!(
            "{}/{}/{}/{}/{name}",
            self.tag, at.seed, at.step, at.micro
        ))
    }

    /// The drawn inputs among `inputs` (see [`inputs_with`]), sized from the data in `data`:
    /// element i is `value(u)` for the stream's i-th uniform `u`; f32 or f64 only.
    pub fn draw(
        &self,
        inputs: &[(String, TensorType)],
        data: &BTreeMap<String, Tensor>,
        at: At,
        value: &dyn Fn(f64) -> f64,
    ) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
        let mut out = BTreeMap::new();
        let mut dims = Bindings::new();
        for (name, ty) in inputs {
            if let Some(t) = data.get(name) {
                for (d, &n) in ty.shape.0.iter().zip(&t.shape) {
                    if let Some(s) = d.as_symbol() {
                        dims.entry(s.to_string()).or_insert(n as i64);
                    }
                }
            }
        }
        for (name, ty) in inputs.iter().filter(|(n, _)| n.starts_with(self.prefix)) {
            let shape = concrete(&ty.shape.0, &dims).map_err(|e| TrainRunError {
                message: format!("the {} `{name}` ({ty}): {}", self.what, e.message),
            })?;
            let n: usize = shape.iter().product();
            let s = self.stream_seed(at, name);
            let vals = (0..n).map(|i| value(uniform01(s, i as u64)));
            let t = match ty.dtype {
                DType::F32 => Tensor::f32(shape, vals.map(|v| v as f32).collect()),
                DType::F64 => Tensor::f64(shape, vals.collect()),
                other => {
                    return Err(TrainRunError {
                        message: format!(
                            "the {} `{name}` must be f32 or f64, not {other}",
                            self.what
                        ),
                    })
                }
            };
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}
