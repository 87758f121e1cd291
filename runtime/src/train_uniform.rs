//! Uniform numbers drawn per training step for models that sample inside their forward.
//!
//! A model input whose name begins with [`UNIFORM_INPUT`] (`uniform_`, f32) is not data: the
//! training session fills it before each run with numbers uniform in [0, 1) (BLIP-2's ITM
//! draws its hard negatives from them, as LAVIS draws with `torch.multinomial`). Element `i`
//! is a pure function of (trainer seed, optimiser step, micro-batch, input name, `i`) through
//! the counter-based generator of [`crate::rng`], like the LoRA dropout masks
//! ([`crate::train_dropout`]): every step draws anew and a resumed run draws exactly what an
//! uninterrupted one would. Evaluation draws with step 0 and the batch's index as the
//! micro-batch, so an evaluation set scores the same every time.

use crate::tensor::Tensor;
use crate::train::TrainRunError;
use crate::train_draw::{At, Draw};
use std::collections::BTreeMap;
use vlmc::ir::{Graph, TensorType};

/// The name prefix of the inputs the session fills with uniform numbers.
pub const UNIFORM_INPUT: &str = "uniform_";

const DRAW: Draw<'static> = Draw {
    prefix: UNIFORM_INPUT,
    tag: "uniform",
    what: "uniform input",
};

/// The seed of one input's stream.
pub fn stream_seed(seed: u64, step: u64, micro: usize, name: &str) -> u64 {
    DRAW.stream_seed(At { seed, step, micro }, name)
}

/// The inputs (name, type) of a graph with uniform inputs: every input when one of them is
/// (their sizes are solved from the others), none otherwise.
pub fn inputs_of(graph: &Graph) -> Vec<(String, TensorType)> {
    crate::train_draw::inputs_with(graph, UNIFORM_INPUT)
}

/// The uniform inputs among `inputs` (a graph's, see [`inputs_of`]) for optimiser step
/// `step` and micro-batch `micro`; their sizes come from the data inputs in `data`. Empty
/// when there is none.
pub fn draws(
    inputs: &[(String, TensorType)],
    data: &BTreeMap<String, Tensor>,
    seed: u64,
    step: u64,
    micro: usize,
) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
    DRAW.draw(inputs, data, At { seed, step, micro }, &|u| u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmc::ir::Op;

    #[test]
    fn draws_are_uniform_sized_from_the_data_and_change_per_step() {
        let mut g = Graph::new("g");
        let ty = |s: &str| TensorType::parse(s).expect("type");
        g.dims.push("B".into());
        g.add_source(Op::Input { name: "ids".into() }, ty("i32[B, 3]"), "")
            .expect("ids");
        g.add_source(
            Op::Input {
                name: "uniform_x".into(),
            },
            ty("f32[2, B]"),
            "",
        )
        .expect("uniform");
        let inputs = inputs_of(&g);
        let mut data = BTreeMap::new();
        data.insert("ids".to_string(), Tensor::i32(vec![500, 3], vec![1; 1500]));
        let a = draws(&inputs, &data, 7, 1, 0).expect("draws");
        let v = a["uniform_x"].to_f64();
        assert_eq!(a["uniform_x"].shape, vec![2, 500]);
        assert!(v.iter().all(|&x| (0.0..1.0).contains(&x)));
        // 1000 draws: the mean's standard deviation is 0.009.
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!((mean - 0.5).abs() < 0.04, "mean {mean}");
        assert_eq!(draws(&inputs, &data, 7, 1, 0).expect("again"), a);
        for (s, k) in [(2, 0), (1, 1)] {
            let w = draws(&inputs, &data, 7, s, k).expect("draws")["uniform_x"].to_f64();
            assert!(v.iter().zip(&w).filter(|(x, y)| x == y).count() < 5);
        }
    }

    #[test]
    fn no_uniform_input_no_draw() {
        let mut g = Graph::new("g");
        g.add_source(
            Op::Input { name: "x".into() },
            TensorType::parse("f32[2]").expect("type"),
            "",
        )
        .expect("x");
        assert!(inputs_of(&g).is_empty());
        assert!(draws(&inputs_of(&g), &BTreeMap::new(), 0, 1, 0)
            .expect("draws")
            .is_empty());
    }
}
