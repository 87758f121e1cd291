//! Parameter initialisation: every parameter gets the values of its declared init rule,
//! deterministically from a seed. Each parameter draws from its own stream, seeded by the run's
//! seed and a hash of its path, so adding a parameter does not change the others.
//!
//! Fan-in and fan-out follow PyTorch: for a weight `[out, in, k...]`, fan-in is
//! `in * prod(k)` and fan-out `out * prod(k)`; a 1-D parameter has fan-in = fan-out = its length.

use crate::rng::{fnv1a, normal01, uniform01};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use vlmc::ir::{DType, Graph, Init, TensorType};

/// A rule that cannot be applied to a parameter.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct InitError {
    pub message: String,
}

/// Materialises every parameter of `graph`.
pub fn init_params(graph: &Graph, seed: u64) -> Result<BTreeMap<String, Tensor>, InitError> {
    let mut out = BTreeMap::new();
    for (_, path, ty, init) in graph.params() {
        out.insert(path.to_string(), init_param(path, ty, init, seed)?);
    }
    Ok(out)
}

fn fans(shape: &[usize]) -> (f64, f64) {
    match shape {
        [] => (1.0, 1.0),
        [n] => (*n as f64, *n as f64),
        [out, inp, rest @ ..] => {
            let k: usize = rest.iter().product();
            ((inp * k) as f64, (out * k) as f64)
        }
    }
}

/// The values of one parameter.
pub fn init_param(
    path: &str,
    ty: &TensorType,
    init: &Init,
    seed: u64,
) -> Result<Tensor, InitError> {
    let shape: Vec<usize> = ty
        .shape
        .0
        .iter()
        .map(|d| {
            d.as_const()
                .filter(|&c| c >= 0)
                .map(|c| c as usize)
                .ok_or_else(|| InitError {
                    message: format!("parameter `{path}` has a symbolic shape {ty}"),
                })
        })
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let stream = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ fnv1a(path);
    let arg = |k: &str| init.arg(k).unwrap_or(0.0);
    let (fan_in, fan_out) = fans(&shape);
    let uniform = |lo: f64, hi: f64| -> Vec<f64> {
        (0..n)
            .map(|i| lo + (hi - lo) * uniform01(stream, i as u64))
            .collect()
    };
    let normal = |mean: f64, std: f64| -> Vec<f64> {
        (0..n)
            .map(|i| mean + std * normal01(stream, i as u64))
            .collect()
    };
    let gain = |a: f64| (2.0 / (1.0 + a * a)).sqrt();
    let values: Vec<f64> = match init.name.as_str() {
        "zeros" => vec![0.0; n],
        "ones" => vec![1.0; n],
        "constant" => vec![arg("value"); n],
        "normal" => normal(arg("mean"), arg("std")),
        "uniform" => uniform(arg("lo"), arg("hi")),
        "kaiming_uniform" => {
            let bound = gain(arg("a")) * (3.0 / fan_in).sqrt();
            uniform(-bound, bound)
        }
        "kaiming_normal" => normal(0.0, gain(arg("a")) / fan_in.sqrt()),
        "xavier_uniform" => {
            let bound = arg("gain") * (6.0 / (fan_in + fan_out)).sqrt();
            uniform(-bound, bound)
        }
        "xavier_normal" => normal(0.0, arg("gain") * (2.0 / (fan_in + fan_out)).sqrt()),
        "trunc_normal" => {
            // Rejection sampling from N(mean, std) restricted to [lo, hi] (absolute bounds, as
            // torch.nn.init.trunc_normal_'s a and b).
            let (mean, std, lo, hi) = (arg("mean"), arg("std"), arg("lo"), arg("hi"));
            if lo >= hi {
                return Err(InitError {
                    message: format!("parameter `{path}`: trunc_normal needs lo < hi"),
                });
            }
            let mut v = Vec::with_capacity(n);
            let mut counter = 0u64;
            while v.len() < n {
                let x = mean + std * normal01(stream, counter);
                counter += 1;
                if (lo..=hi).contains(&x) {
                    v.push(x);
                } else if counter > 1000 * (n as u64 + 1) {
                    return Err(InitError {
                        message: format!("parameter `{path}`: trunc_normal bounds [{lo}, {hi}] are too far from N({mean}, {std})"),
                    });
                }
            }
            v
        }
        other => {
            return Err(InitError {
                message: format!("parameter `{path}`: unknown init rule `{other}`"),
            })
        }
    };
    Ok(match ty.dtype {
        DType::I32 => Tensor::i32(shape, values.iter().map(|&x| x.round() as i32).collect()),
        DType::Bool => Tensor::bool(shape, values.iter().map(|&x| x != 0.0).collect()),
        _ => Tensor::f32(shape, values.iter().map(|&x| x as f32).collect()),
    })
}
