//! LoRA dropout masks for the training step.
//!
//! A step graph with LoRA dropout (`vlmc::passes::lora::apply_with_dropout`) reads one mask
//! input `lora_dropout.<layer>` per adapted matmul, of the type of the layer's input `x`. The
//! driver fills it before each run with PyTorch's inverted dropout: an element is kept with
//! probability `1 - p` and then holds `1 / (1 - p)`, else it holds 0. Element `i` of a mask is
//! a pure function of (trainer seed, optimiser step, micro-batch, input name, `i`) through the
//! counter-based generator of [`crate::rng`], so every step draws new masks, and a resumed run
//! (which restores the step) draws exactly the masks of an uninterrupted one.

use crate::tensor::Tensor;
use crate::train::TrainRunError;
use crate::train_draw::{At, Draw};
use std::collections::BTreeMap;
use vlmc::ir::{Graph, TensorType};
use vlmc::passes::lora::DROPOUT_INPUT;

const DRAW: Draw<'static> = Draw {
    prefix: DROPOUT_INPUT,
    tag: "lora-dropout",
    what: "LoRA dropout mask",
};

/// The seed of one mask's stream.
pub fn stream_seed(seed: u64, step: u64, micro: usize, name: &str) -> u64 {
    DRAW.stream_seed(At { seed, step, micro }, name)
}

/// The inputs (name, type) of a graph with LoRA dropout masks: every input when one of them
/// is a mask (the masks' sizes are solved from the others), none otherwise.
pub fn inputs_of(graph: &Graph) -> Vec<(String, TensorType)> {
    crate::train_draw::inputs_with(graph, DROPOUT_INPUT)
}

/// The masks of the dropout inputs among `inputs` (a graph's, see [`inputs_of`]) for
/// optimiser step `step` (1-based) and micro-batch `micro`, with probability `p`; their sizes
/// come from the data inputs in `data`. Empty when there is no dropout input.
pub fn masks(
    inputs: &[(String, TensorType)],
    data: &BTreeMap<String, Tensor>,
    p: f64,
    seed: u64,
    step: u64,
    micro: usize,
) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
    if !inputs.iter().any(|(n, _)| n.starts_with(DROPOUT_INPUT)) {
        return Ok(BTreeMap::new());
    }
    if !(0.0..1.0).contains(&p) {
        return Err(TrainRunError {
            message: format!("LoRA dropout must be in [0, 1), got {p}"),
        });
    }
    let keep = 1.0 / (1.0 - p);
    DRAW.draw(inputs, data, At { seed, step, micro }, &|u| {
        if u < p {
            0.0
        } else {
            keep
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmc::ir::Op;

    fn graph() -> Graph {
        let mut g = Graph::new("g");
        let ty = |s: &str| TensorType::parse(s).expect("type");
        g.dims.push("B".into());
        g.dims.push("T".into());
        g.add_source(Op::Input { name: "ids".into() }, ty("i32[B, T]"), "")
            .expect("ids");
        g.add_source(
            Op::Input {
                name: "lora_dropout.l".into(),
            },
            ty("f32[B, 4 + T, 64]"),
            "",
        )
        .expect("mask");
        g
    }

    #[test]
    fn masks_keep_one_minus_p_scaled_and_change_per_step() {
        let g = inputs_of(&graph());
        assert_eq!(g.len(), 2);
        let mut data = BTreeMap::new();
        data.insert("ids".to_string(), Tensor::i32(vec![8, 12], vec![0; 96]));
        let p = 0.25;
        let m1 = masks(&g, &data, p, 3, 1, 0).expect("masks");
        let m = &m1["lora_dropout.l"];
        assert_eq!(m.shape, vec![8, 16, 64]);
        let v = m.to_f64();
        let kept = v.iter().filter(|&&x| x != 0.0).count() as f64 / v.len() as f64;
        // 8192 draws: the keep fraction's standard deviation is 0.0048.
        assert!((kept - 0.75).abs() < 0.02, "keep fraction {kept}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        // Reproducible from (seed, step, micro); different across steps and micro-batches.
        assert_eq!(masks(&g, &data, p, 3, 1, 0).expect("again"), m1);
        let other = |s, k| masks(&g, &data, p, 3, s, k).expect("masks")["lora_dropout.l"].to_f64();
        for (s, k) in [(2, 0), (1, 1)] {
            let w = other(s, k);
            let same = v.iter().zip(&w).filter(|(a, b)| a == b).count() as f64 / v.len() as f64;
            // Independent masks agree where both keep or both drop: 0.75² + 0.25² = 0.625.
            assert!((same - 0.625).abs() < 0.03, "step {s} micro {k}: {same}");
        }
    }

    #[test]
    fn no_dropout_input_no_mask() {
        let mut g = Graph::new("g");
        g.add_source(
            Op::Input { name: "x".into() },
            TensorType::parse("f32[2]").expect("type"),
            "",
        )
        .expect("x");
        assert!(inputs_of(&g).is_empty());
        let m = masks(&inputs_of(&g), &BTreeMap::new(), 0.1, 0, 1, 0).expect("masks");
        assert!(m.is_empty());
    }
}
