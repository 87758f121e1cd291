//! Parameter initialisation: every parameter gets the values of its declared init rule,
//! deterministically from a seed. Each parameter draws from its own stream, seeded by the run's
//! seed and a hash of its path, so adding a parameter does not change the others.
//!
//! Fan-in and fan-out follow PyTorch: for a weight `[out, in, k...]`, fan-in is
//! `in * prod(k)` and fan-out `out * prod(k)`; a 1-D parameter has fan-in = fan-out = its length.

use crate::alloc;
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

/// Materialises every parameter of `graph`. The sizes are checked first: a parameter, or all
/// of them together, larger than the memory available is an error before anything is
/// allocated (``parameter `w` [100000, 100000] f32 needs 40.0 GB; this machine has 21.3 GB
/// available``).
pub fn init_params(graph: &Graph, seed: u64) -> Result<BTreeMap<String, Tensor>, InitError> {
    let params = graph.params();
    let mut total: Option<u128> = Some(0);
    for (_, path, ty, _) in &params {
        let shape = concrete_shape(path, ty)?;
        let bytes = alloc::shape_bytes(&shape, elem_bytes(ty.dtype));
        alloc::ensure(bytes, || describe(path, &shape, ty.dtype))?;
        total = total.zip(bytes).and_then(|(t, b)| t.checked_add(b));
    }
    alloc::ensure(total, || {
        format!("initialising the model's {} parameters", params.len())
    })?;
    let mut out = BTreeMap::new();
    for (_, path, ty, init) in params {
        out.insert(path.to_string(), init_param(path, ty, init, seed)?);
    }
    Ok(out)
}

/// Bytes per element of a parameter as a host tensor holds it (every float dtype as f32).
fn elem_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Bool => 1,
        _ => 4,
    }
}

/// ``parameter `w` [100000, 100000] f32``.
fn describe(path: &str, shape: &[usize], dtype: DType) -> String {
    format!("parameter `{path}` {}", alloc::describe(shape, dtype))
}

/// The concrete shape of a parameter.
fn concrete_shape(path: &str, ty: &TensorType) -> Result<Vec<usize>, InitError> {
    ty.shape
        .0
        .iter()
        .map(|d| {
            d.as_const()
                .and_then(|c| usize::try_from(c).ok())
                .ok_or_else(|| InitError {
                    message: format!("parameter `{path}` has a symbolic shape {ty}"),
                })
        })
        .collect()
}

/// Fan-in and fan-out (in f64: a shape with no elements may have a product past `usize`).
fn fans(shape: &[usize]) -> (f64, f64) {
    match shape {
        [] => (1.0, 1.0),
        [n] => (*n as f64, *n as f64),
        [out, inp, rest @ ..] => {
            let k: f64 = rest.iter().map(|&d| d as f64).product();
            (*inp as f64 * k, *out as f64 * k)
        }
    }
}

/// `n` values drawn in order from `next`, stored as `dtype` in memory checked and allocated
/// through [`alloc`].
fn fill(
    dtype: DType,
    shape: Vec<usize>,
    n: usize,
    what: impl Fn() -> String,
    mut next: impl FnMut(usize) -> Result<f64, InitError>,
) -> Result<Tensor, InitError> {
    Ok(match dtype {
        DType::I32 => {
            let mut v = alloc::with_capacity(n, what)?;
            for i in 0..n {
                v.push(next(i)?.round() as i32);
            }
            Tensor::i32(shape, v)
        }
        DType::Bool => {
            let mut v = alloc::with_capacity(n, what)?;
            for i in 0..n {
                v.push(next(i)? != 0.0);
            }
            Tensor::bool(shape, v)
        }
        _ => {
            let mut v = alloc::with_capacity(n, what)?;
            for i in 0..n {
                v.push(next(i)? as f32);
            }
            Tensor::f32(shape, v)
        }
    })
}

/// The values of one parameter.
pub fn init_param(
    path: &str,
    ty: &TensorType,
    init: &Init,
    seed: u64,
) -> Result<Tensor, InitError> {
    let shape = concrete_shape(path, ty)?;
    let what = || describe(path, &shape, ty.dtype);
    let n = alloc::numel(&shape).ok_or_else(|| InitError {
        message: format!("{} has more elements than this machine can address", what()),
    })?;
    let stream = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ fnv1a(path);
    let arg = |k: &str| init.arg(k).unwrap_or(0.0);
    let (fan_in, fan_out) = fans(&shape);
    let uniform =
        |lo: f64, hi: f64| move |i: usize| Ok(lo + (hi - lo) * uniform01(stream, i as u64));
    let normal = |mean: f64, std: f64| move |i: usize| Ok(mean + std * normal01(stream, i as u64));
    let gain = |a: f64| (2.0 / (1.0 + a * a)).sqrt();
    let dt = ty.dtype;
    let constant = |value: f64| fill(dt, shape.clone(), n, what, move |_| Ok(value));
    let name = init.name.as_str();
    match name {
        "zeros" => constant(0.0),
        "ones" => constant(1.0),
        "constant" => constant(arg("value")),
        "normal" => fill(dt, shape.clone(), n, what, normal(arg("mean"), arg("std"))),
        "uniform" => fill(dt, shape.clone(), n, what, uniform(arg("lo"), arg("hi"))),
        "kaiming_uniform" => {
            let bound = gain(arg("a")) * (3.0 / fan_in).sqrt();
            fill(dt, shape.clone(), n, what, uniform(-bound, bound))
        }
        "kaiming_normal" => fill(
            dt,
            shape.clone(),
            n,
            what,
            normal(0.0, gain(arg("a")) / fan_in.sqrt()),
        ),
        "xavier_uniform" => {
            let bound = arg("gain") * (6.0 / (fan_in + fan_out)).sqrt();
            fill(dt, shape.clone(), n, what, uniform(-bound, bound))
        }
        "xavier_normal" => fill(
            dt,
            shape.clone(),
            n,
            what,
            normal(0.0, arg("gain") * (2.0 / (fan_in + fan_out)).sqrt()),
        ),
        "trunc_normal" => {
            // Rejection sampling from N(mean, std) restricted to [lo, hi] (absolute bounds, as
            // torch.nn.init.trunc_normal_'s a and b).
            let (mean, std, lo, hi) = (arg("mean"), arg("std"), arg("lo"), arg("hi"));
            if lo >= hi {
                return Err(InitError {
                    message: format!("parameter `{path}`: trunc_normal needs lo < hi"),
                });
            }
            let limit = 1000u64.saturating_mul(n as u64 + 1);
            let mut counter = 0u64;
            let next = |_: usize| loop {
                let x = mean + std * normal01(stream, counter);
                counter += 1;
                if (lo..=hi).contains(&x) {
                    return Ok(x);
                }
                if counter > limit {
                    return Err(InitError {
                        message: format!("parameter `{path}`: trunc_normal bounds [{lo}, {hi}] are too far from N({mean}, {std})"),
                    });
                }
            };
            fill(dt, shape.clone(), n, what, next)
        }
        other => Err(InitError {
            message: format!("parameter `{path}`: unknown init rule `{other}`"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(text: &str) -> TensorType {
        TensorType::parse(text).expect("a tensor type")
    }

    #[test]
    fn a_parameter_larger_than_memory_is_an_error() {
        // 4 TB: more than any machine that runs the tests has.
        let rule = Init::new("normal", &[("std", 0.02)]);
        let err = init_param("enc.w", &ty("f32[1000000, 1000000]"), &rule, 0).unwrap_err();
        assert!(
            err.message.starts_with(
                "parameter `enc.w` [1000000, 1000000] f32 needs 4.0 TB; this machine has "
            ),
            "{}",
            err.message
        );
        let mut g = Graph::new("m");
        for (path, t) in [("a", "f32[4]"), ("b", "i32[1000000, 1000000, 4]")] {
            let op = vlmc::ir::Op::Param {
                path: path.into(),
                init: Init::new("zeros", &[]),
            };
            g.add_source(op, ty(t), "").expect("param");
        }
        let err = init_params(&g, 0).unwrap_err();
        assert!(
            err.message
                .starts_with("parameter `b` [1000000, 1000000, 4] i32 needs 16.0 TB; "),
            "{}",
            err.message
        );
    }

    #[test]
    fn values_follow_the_rules_in_every_dtype() {
        let t = init_param(
            "p",
            &ty("f32[3]"),
            &Init::new("constant", &[("value", 0.1)]),
            0,
        );
        assert_eq!(t.unwrap(), Tensor::f32(vec![3], vec![0.1; 3]));
        let t = init_param(
            "p",
            &ty("i32[2]"),
            &Init::new("constant", &[("value", 2.5)]),
            0,
        );
        assert_eq!(t.unwrap(), Tensor::i32(vec![2], vec![3, 3]));
        let t = init_param("p", &ty("bool[2]"), &Init::new("ones", &[]), 0);
        assert_eq!(t.unwrap(), Tensor::bool(vec![2], vec![true, true]));
        let rule = Init::new("uniform", &[("lo", -1.0), ("hi", 1.0)]);
        let t = init_param("p", &ty("f32[2, 2]"), &rule, 7).unwrap();
        let stream = 7u64.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ fnv1a("p");
        let want: Vec<f32> = (0..4)
            .map(|i| (-1.0 + 2.0 * uniform01(stream, i)) as f32)
            .collect();
        assert_eq!(t, Tensor::f32(vec![2, 2], want));
        let rule = Init::new("trunc_normal", &[("std", 1.0), ("lo", -0.5), ("hi", 0.5)]);
        let t = init_param("p", &ty("f32[100]"), &rule, 1).unwrap();
        assert!(t.as_f32().unwrap().iter().all(|x| (-0.5..=0.5).contains(x)));
    }
}
