//! Preference and reward objectives (TRL's DPO family, CPO/SimPO, ORPO, KTO, reward models,
//! PRM): step graphs against TRL 1.16's losses, gradients and optimiser steps
//! (tests/fixtures/preference/make.py), and a user's own objective.

mod common;

use std::collections::BTreeMap;
use vlmc::train::{self, StepKind, TrainConfig};
use vlmc_runtime::Tensor;

/// The fixture spec with one more trainer (objective `objective`, e.g. `dpo(beta: 0.1)`).
fn with_trainer(objective: &str) -> (vlmc::elab::Elaborated, TrainConfig) {
    let path = std::path::Path::new("tests/fixtures/train/preference.vlm");
    let mut text = std::fs::read_to_string(path).expect("spec");
    text.push_str(&format!(
        "\ntrainer case for TinyLlama {{\n  objective {objective}\n  optimizer adamw(lr: 1e-3, \
         weight_decay: 0.0)\n  batch 3, steps 1, clip_grad 1.0\n}}\n"
    ));
    let checked = vlmc::elab::check_text(path, text);
    let rendered = checked.render();
    let model = checked
        .result
        .unwrap_or_else(|_| panic!("{rendered}"))
        .pop()
        .expect("model");
    let cfg = TrainConfig::of(&model, "case").expect("trainer");
    (model, cfg)
}

/// A pair batch of 3 rows (prompt 2 tokens, completions of different lengths) with reference
/// log-probabilities.
fn pair_batch() -> BTreeMap<String, Tensor> {
    let t = 7;
    let mut m = BTreeMap::new();
    for (k, side) in ["chosen", "rejected"].iter().enumerate() {
        let ids: Vec<i32> = (0..3 * t)
            .map(|i| 1 + ((i * 37 + k * 11) % 95) as i32)
            .collect();
        let mask: Vec<f32> = (0..3 * t)
            .map(|i| {
                let (r, c) = (i / t, i % t);
                f32::from(u8::from(c >= 2 && c < t - (r + k) % 3))
            })
            .collect();
        m.insert(format!("{side}.ids"), Tensor::i32(vec![3, t], ids));
        m.insert(format!("{side}.loss_mask"), Tensor::f32(vec![3, t], mask));
        m.insert(
            format!("ref_{side}_logps"),
            Tensor::f32(vec![3], vec![-20.0 - k as f32, -23.5, -18.25 + k as f32]),
        );
    }
    m.insert("loss_scale".into(), Tensor::f32(vec![], vec![1.0]));
    m
}

#[test]
fn every_pair_objective_builds_and_runs() {
    let params = {
        let (model, _) = with_trainer("dpo");
        vlmc_runtime::init::init_params(&model.graph, 3).expect("init")
    };
    let mut objectives: Vec<String> = vlmc::elab::DPO_LOSS_TYPES
        .iter()
        .map(|t| format!("dpo(beta: 0.1, loss_type: {t}, label_smoothing: 0.1)"))
        .collect();
    objectives.extend(
        [
            "ipo(beta: 0.1)",
            "mpo",
            "dpo(loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5], use_weighting: true)",
            "dpo(f_divergence_type: forward_kl)",
            "dpo(f_divergence_type: js_divergence)",
            "dpo(f_divergence_type: alpha_divergence)",
            "dpo(ld_alpha: 0.5)",
            "cpo",
            "cpo(loss_type: hinge)",
            "cpo(loss_type: ipo)",
            "cpo(loss_type: alphapo, alpha: 0.25)",
            "simpo",
            "orpo",
            "length_margin_dpo(beta: 0.2)",
        ]
        .map(String::from),
    );
    for o in &objectives {
        let (model, cfg) = with_trainer(o);
        let g = train::build(&model, &cfg, StepKind::Grad).unwrap_or_else(|e| panic!("{o}: {e}"));
        let out = vlmc_runtime::run(&g.graph, &pair_batch(), &params)
            .unwrap_or_else(|e| panic!("{o}: {e}"));
        let loss = out["loss"].to_f64()[0];
        assert!(loss.is_finite(), "{o}: loss {loss}");
        eprintln!("{o}: loss {loss}");
    }
}

/// The reference policy: with an adapter trainer it is the base model with the adapter
/// switched off, on the policy's own parameter tensors (no extra memory); with full
/// fine-tuning a frozen copy of the starting weights. Either way it does not move while the
/// policy trains, and at the start (LoRA B = 0, or the copy) it equals the policy.
#[test]
fn the_reference_is_the_starting_policy_and_stays() {
    use vlmc_runtime::train::Session;
    let path = "tests/fixtures/train/preference.vlm";
    let model = common::load(path);
    let params = vlmc_runtime::init::init_params(&model.graph, 5).expect("init");
    let mut data = pair_batch();
    data.retain(|k, _| !k.starts_with("ref_") && k != "loss_scale");
    for (trainer, extra) in [("dpo_lora", false), ("dpo", true)] {
        let cfg = TrainConfig::of(&model, trainer).expect("trainer");
        let mut s = Session::new(&model, cfg, params.clone(), 3).expect("session");
        let pref = s.pref.as_ref().expect("preference state");
        let r = pref.reference.as_ref().expect("a reference");
        let bytes: usize = params.values().map(|t| t.numel() * 4).sum();
        assert_eq!(r.extra_bytes(), if extra { bytes } else { 0 }, "{trainer}");
        let before = pref.reference_logps(&data, &s.params).expect("ref");
        let first = s.step(std::slice::from_ref(&data)).expect("step");
        // At the start the policy is the reference: every logratio is 0, the rewards too.
        let m: BTreeMap<String, f64> = first.metrics.iter().cloned().collect();
        assert!(m["rewards/chosen"].abs() < 1e-6, "{trainer}: {m:?}");
        assert!(m["rewards/margins"].abs() < 1e-6, "{trainer}: {m:?}");
        // DPO sigmoid at logratio 0: -log σ(0) = ln 2.
        assert!(
            (first.loss - std::f64::consts::LN_2).abs() < 1e-6,
            "{trainer}: {}",
            first.loss
        );
        let second = s.step(std::slice::from_ref(&data)).expect("step");
        let pref = s.pref.as_ref().expect("preference state");
        let after = pref.reference_logps(&data, &s.params).expect("ref");
        assert_eq!(before, after, "{trainer}: the reference moved");
        let m: BTreeMap<String, f64> = second.metrics.iter().cloned().collect();
        assert!(m["rewards/margins"] > 0.0, "{trainer}: {m:?}");
        eprintln!("{trainer}: step 2 {m:?}");
    }
}
