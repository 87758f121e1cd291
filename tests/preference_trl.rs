//! Preference objectives against TRL 1.16 (tests/fixtures/preference_trl/make.py): each DPO loss
//! type, CPO/SimPO, ORPO, KTO, the reward model and PRM — loss, gradients (in f64) and TRL's
//! metrics on the same weights and batch — and one whole optimiser step of each trainer.

mod common;

use std::collections::BTreeMap;
use vlmc::train::{self, StepKind, TrainConfig};
use vlmc_runtime::Tensor;

/// The fixture spec with one more trainer (objective `objective`, e.g. `dpo(beta: 0.1)`).
fn with_trainer(objective: &str) -> (vlmc::elab::Elaborated, TrainConfig) {
    common::with_trainer(
        "tests/fixtures/train/preference.vlm",
        "TinyLlama",
        objective,
    )
}

/// The TRL 1.16 reference (tests/fixtures/preference_trl/make.py).
fn trl() -> vlmc_runtime::weights::WeightFile {
    vlmc_runtime::weights::WeightFile::open(std::path::Path::new(
        "tests/fixtures/preference_trl/reference.safetensors",
    ))
    .expect("reference")
}

/// The tensors named `<prefix><name>` of the reference, by `<name>`, in f64.
fn group(r: &vlmc_runtime::weights::WeightFile, prefix: &str) -> BTreeMap<String, Tensor> {
    r.names()
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix(prefix).map(|p| {
                let t = r.get(&n).unwrap_or_else(|e| panic!("{e}"));
                (
                    p.to_string(),
                    if t.is_float() { t.to_f64_tensor() } else { t },
                )
            })
        })
        .collect()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_f64(), b.to_f64());
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// Runs a graph promoted to f64 on the interpreter.
fn run_f64(
    mut g: vlmc::ir::Graph,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    vlmc::passes::promote_f64(&mut g);
    let inputs: BTreeMap<String, Tensor> = inputs
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                if v.is_float() {
                    v.to_f64_tensor()
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    vlmc_runtime::run(&g, &inputs, params).unwrap_or_else(|e| panic!("{e}"))
}

/// The cases of make.py: (case, objective as written in a trainer).
const CASES: &[(&str, &str)] = &[
    ("dpo_sigmoid", "dpo(beta: 0.1, loss_type: sigmoid)"),
    ("dpo_hinge", "dpo(beta: 0.1, loss_type: hinge)"),
    ("dpo_ipo", "dpo(beta: 0.1, loss_type: ipo)"),
    (
        "dpo_robust",
        "dpo(beta: 0.1, loss_type: robust, label_smoothing: 0.1)",
    ),
    (
        "dpo_exo_pair",
        "dpo(beta: 0.1, loss_type: exo_pair, label_smoothing: 0.1)",
    ),
    ("dpo_nca_pair", "dpo(beta: 0.1, loss_type: nca_pair)"),
    ("dpo_bco_pair", "dpo(beta: 0.1, loss_type: bco_pair)"),
    ("dpo_sppo_hard", "dpo(beta: 0.1, loss_type: sppo_hard)"),
    ("dpo_aot", "dpo(beta: 0.1, loss_type: aot)"),
    (
        "dpo_aot_unpaired",
        "dpo(beta: 0.1, loss_type: aot_unpaired)",
    ),
    ("dpo_apo_zero", "dpo(beta: 0.1, loss_type: apo_zero)"),
    ("dpo_apo_down", "dpo(beta: 0.1, loss_type: apo_down)"),
    ("dpo_discopop", "dpo(beta: 0.1, loss_type: discopop)"),
    ("dpo_sft", "dpo(beta: 0.1, loss_type: sft)"),
    (
        "dpo_sigmoid_norm",
        "dpo(beta: 0.1, loss_type: sigmoid_norm)",
    ),
    ("mpo", "mpo(beta: 0.1)"),
    (
        "dpo_forward_kl",
        "dpo(beta: 0.1, f_divergence_type: forward_kl)",
    ),
    ("dpo_js", "dpo(beta: 0.1, f_divergence_type: js_divergence)"),
    (
        "dpo_alpha_divergence",
        "dpo(beta: 0.1, f_divergence_type: alpha_divergence, f_alpha_divergence_coef: 0.5)",
    ),
    ("dpo_wpo", "dpo(beta: 0.1, use_weighting: true)"),
    ("dpo_ld", "dpo(beta: 0.1, ld_alpha: 0.5)"),
    ("cpo_sigmoid", "cpo(beta: 0.1)"),
    ("cpo_hinge", "cpo(beta: 0.1, loss_type: hinge)"),
    ("cpo_ipo", "cpo(beta: 0.1, loss_type: ipo)"),
    ("simpo", "simpo(beta: 0.1, simpo_gamma: 0.5)"),
    (
        "cpo_simpo",
        "cpo(beta: 0.1, loss_type: simpo, cpo_alpha: 1.0)",
    ),
    ("alphapo", "cpo(beta: 0.1, loss_type: alphapo, alpha: 0.25)"),
    ("orpo", "orpo(beta: 0.1)"),
];

/// The reference policy's log-probabilities of the fixture's batch (our reference graph on
/// make.py's reference weights), as the step graph's inputs.
fn with_reference(
    model: &vlmc::elab::Elaborated,
    cfg: &TrainConfig,
    data: &BTreeMap<String, Tensor>,
    refp: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    let vlmc::train::Objective::Preference(p) = &cfg.objective else {
        panic!("not a preference objective")
    };
    let mut inputs = data.clone();
    if p.reference {
        let g = train::preference::build_logps(model, cfg, p, false).expect("reference graph");
        for (k, v) in run_f64(g, data, refp) {
            inputs.insert(format!("ref_{k}"), v);
        }
    }
    inputs.insert("loss_scale".into(), Tensor::f64(vec![], vec![1.0]));
    inputs
}

/// Compares one case's loss, gradients and metrics with TRL's; returns the worst gradient
/// error.
fn check_case(
    r: &vlmc_runtime::weights::WeightFile,
    case: &str,
    model: &vlmc::elab::Elaborated,
    cfg: &TrainConfig,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
    strip: &str,
) -> f64 {
    use vlmc_runtime::train::{Backend, Session};
    let g = train::build(model, cfg, StepKind::Grad).unwrap_or_else(|e| panic!("{case}: {e}"));
    let out = run_f64(g.graph, inputs, params);
    let loss = out["loss"].to_f64()[0];
    let want = r.get(&format!("{case}.loss")).expect("loss").to_f64()[0];
    assert!(
        (loss - want).abs() <= 1e-9 + 1e-6 * want.abs(),
        "{case}: loss {loss} vs TRL {want}"
    );
    let mut worst = 0f64;
    // PyTorch leaves the gradient of a parameter the loss does not reach unset (LLaVA's last
    // vision layer, past the one its features come from): ours must be zero there
    let want_of = |p: &String| {
        let name = format!("{case}.grad.{}", p.strip_prefix(strip).unwrap_or(p));
        r.get(&name).unwrap_or_else(|_| {
            let ours = &out[&format!("grad.{p}")];
            assert!(
                ours.to_f64().iter().all(|&x| x == 0.0),
                "{case}: TRL has no gradient for {p} but ours is not zero"
            );
            ours.clone()
        })
    };
    // a gradient that is zero in exact arithmetic (attention key biases: softmax ignores a
    // constant per query) is rounding noise on both sides: errors are relative to the
    // tensor's scale, or to 1e-4 of the largest gradient when the tensor's is below that
    let global = g
        .trainable
        .iter()
        .map(|p| want_of(p).to_f64().iter().fold(0f64, |m, x| m.max(x.abs())))
        .fold(0f64, f64::max);
    for p in &g.trainable {
        let want = want_of(p);
        let scale = want.to_f64().iter().fold(0f64, |m, x| m.max(x.abs()));
        let e = max_rel(&out[&format!("grad.{p}")], &want) * scale.max(1e-30)
            / scale.max(1e-4 * global);
        assert!(e <= 1e-5, "{case}: gradient of {p}: max rel err {e:.2e}");
        worst = worst.max(e);
    }
    // TRL's metrics, from the step's statistics
    let s = Session::with_backend(model, cfg.clone(), params.clone(), 1, &Backend::Interp)
        .expect("session");
    let stats: BTreeMap<String, Tensor> = out
        .iter()
        .filter(|(k, _)| k.starts_with("stat."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let seen: BTreeMap<String, Tensor> = inputs
        .iter()
        .filter(|(k, _)| k.starts_with("ref_") || *k == "label")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let kl = r
        .get(&format!("{case}.metric.kl"))
        .ok()
        .map(|t| t.to_f64()[0]);
    let metrics = s
        .pref
        .as_ref()
        .expect("pref")
        .metrics(&[seen], &[stats], kl);
    let mut compared = 0;
    // CPO's and ORPO's `logits/*` average the logits of every position, padding included; the
    // fixture model has no attention-mask input, so its padding positions' logits (never a
    // target) differ from transformers' masked ones: those two are not compared
    let padded = case.starts_with("cpo") || ["simpo", "alphapo", "orpo"].contains(&case);
    for (k, v) in &metrics {
        if padded && k.starts_with("logits/") {
            continue;
        }
        let name = format!("{case}.metric.{}", k.replace('/', "."));
        if let Ok(t) = r.get(&name) {
            let w = t.to_f64()[0];
            assert!(
                (v - w).abs() <= 1e-7 + 1e-5 * w.abs(),
                "{case}: metric {k} {v} vs TRL {w}"
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 4,
        "{case}: only {compared} metrics compared: {metrics:?}"
    );
    eprintln!("{case}: loss {loss:.9} (TRL {want:.9}), gradients max rel err {worst:.1e}, {compared} metrics");
    worst
}

#[test]
fn pair_objectives_match_trl() {
    let r = trl();
    let params = group(&r, "params.");
    let refp = group(&r, "ref.");
    let data: BTreeMap<String, Tensor> = group(&r, "pair.")
        .into_iter()
        .filter(|(k, _)| k.starts_with("chosen.") || k.starts_with("rejected."))
        .collect();
    let mut checked = 0;
    for (case, objective) in CASES {
        if r.get(&format!("{case}.loss")).is_err() {
            eprintln!("{case}: not in the reference");
            continue;
        }
        let (model, cfg) = with_trainer(objective);
        let inputs = with_reference(&model, &cfg, &data, &refp);
        check_case(&r, case, &model, &cfg, &inputs, &params, "");
        checked += 1;
    }
    assert!(
        checked >= CASES.len() - 2,
        "{checked} of {} cases",
        CASES.len()
    );
}

/// KTO against TRL's KTOTrainer: the KL estimate z from the mismatched rows (the policy's and
/// the reference's log-probabilities of them, mean, clamped at 0), then the loss, gradients
/// and metrics.
#[test]
fn kto_matches_trl() {
    let r = trl();
    let params = group(&r, "params.");
    let refp = group(&r, "ref.");
    let kto = group(&r, "kto.");
    let (model, cfg) = with_trainer("kto(beta: 0.1)");
    let vlmc::train::Objective::Preference(p) = &cfg.objective else {
        panic!("kto")
    };
    let rows = |prefix: &str| -> BTreeMap<String, Tensor> {
        ["ids", "loss_mask"]
            .iter()
            .map(|k| (k.to_string(), kto[&format!("{prefix}{k}")].clone()))
            .collect()
    };
    let (main, kl) = (rows(""), rows("kl."));
    let reference = train::preference::build_logps(&model, &cfg, p, false).expect("graph");
    let policy = train::preference::build_logps(&model, &cfg, p, true).expect("graph");
    let ref_main = run_f64(reference.clone(), &main, &refp)["logps"].clone();
    let ref_kl = run_f64(reference, &kl, &refp)["logps"].to_f64();
    let pol_kl = run_f64(policy, &kl, &params)["logps"].to_f64();
    let z = (pol_kl.iter().zip(&ref_kl).map(|(a, b)| a - b).sum::<f64>() / pol_kl.len() as f64)
        .max(0.0);
    let want_kl = r.get("kto.metric.kl").expect("kl").to_f64()[0];
    assert!(
        (z - want_kl).abs() < 1e-6,
        "KL estimate {z} vs TRL {want_kl}"
    );
    let mut inputs = main.clone();
    inputs.insert("label".into(), kto["label"].clone());
    inputs.insert("ref_logps".into(), ref_main);
    inputs.insert("kl".into(), Tensor::f64(vec![], vec![z]));
    inputs.insert("loss_scale".into(), Tensor::f64(vec![], vec![1.0]));
    check_case(&r, "kto", &model, &cfg, &inputs, &params, "");
}

/// The attention mask of right-padded rows whose completion ends the text.
fn real_mask(loss_mask: &Tensor) -> Tensor {
    let (b, t) = (loss_mask.shape[0], loss_mask.shape[1]);
    let m = loss_mask.to_f64();
    let mut out = vec![0i32; b * t];
    for i in 0..b {
        let last = (0..t).rev().find(|&j| m[i * t + j] > 0.0).unwrap_or(0);
        for j in 0..=last {
            out[i * t + j] = 1;
        }
    }
    Tensor::i32(vec![b, t], out)
}

/// The reward model (transformers' LlamaForSequenceClassification, TRL's RewardTrainer):
/// plain, with the margin column, with centring.
#[test]
fn reward_model_matches_trl() {
    let r = trl();
    let params: BTreeMap<String, Tensor> = group(&r, "params_rm.")
        .into_iter()
        .map(|(k, v)| (format!("rm.{k}"), v))
        .collect();
    let pair = group(&r, "pair.");
    let mut data = BTreeMap::new();
    for side in ["chosen", "rejected"] {
        data.insert(format!("{side}.ids"), pair[&format!("{side}.ids")].clone());
        data.insert(
            format!("{side}.mask"),
            real_mask(&pair[&format!("{side}.loss_mask")]),
        );
    }
    for (case, objective, margin) in [
        ("reward", "reward", false),
        ("reward_margin", "reward", true),
        (
            "reward_center",
            "reward(center_rewards_coefficient: 0.01)",
            false,
        ),
    ] {
        let (model, cfg) =
            common::with_trainer("tests/fixtures/train/preference.vlm", "TinyRm", objective);
        let mut inputs = data.clone();
        let m = if margin {
            pair["margin"].clone()
        } else {
            Tensor::f64(vec![3], vec![0.0; 3])
        };
        inputs.insert("margin".into(), m);
        inputs.insert("loss_scale".into(), Tensor::f64(vec![], vec![1.0]));
        check_case(&r, case, &model, &cfg, &inputs, &params, "rm.");
    }
}

/// One whole optimiser step of the trainer (reference: a frozen copy of the start; AdamW lr
/// 1e-3, clipping at 1.0) through vlmc's training session, against TRL's trainer step: the
/// weights after it.
#[test]
fn one_trainer_step_matches_trl() {
    use vlmc_runtime::train::{Backend, Session};
    let r = trl();
    let pair = group(&r, "pair.");
    let kto = group(&r, "kto.");
    let f32s = |m: BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
        m.into_iter()
            .map(|(k, v)| (k, if v.is_float() { v.to_f32_tensor() } else { v }))
            .collect()
    };
    let pairs: BTreeMap<String, Tensor> = f32s(
        pair.iter()
            .filter(|(k, _)| k.starts_with("chosen.") || k.starts_with("rejected."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    let mut unpaired = BTreeMap::new();
    for k in ["ids", "loss_mask", "label", "kl.ids", "kl.loss_mask"] {
        unpaired.insert(k.to_string(), kto[k].clone());
    }
    let unpaired = f32s(unpaired);
    let mut rm_data = BTreeMap::new();
    for side in ["chosen", "rejected"] {
        rm_data.insert(format!("{side}.ids"), pair[&format!("{side}.ids")].clone());
        rm_data.insert(
            format!("{side}.mask"),
            real_mask(&pair[&format!("{side}.loss_mask")]),
        );
    }
    rm_data.insert("margin".into(), pair["margin"].to_f32_tensor());
    let lm = f32s(group(&r, "params."));
    let rm: BTreeMap<String, Tensor> = f32s(group(&r, "params_rm."))
        .into_iter()
        .map(|(k, v)| (format!("rm.{k}"), v))
        .collect();
    for (case, model, objective, data, params, strip) in [
        (
            "dpo_sigmoid",
            "TinyLlama",
            "dpo(beta: 0.1)",
            &pairs,
            &lm,
            "",
        ),
        ("dpo_ipo", "TinyLlama", "ipo(beta: 0.1)", &pairs, &lm, ""),
        ("mpo", "TinyLlama", "mpo(beta: 0.1)", &pairs, &lm, ""),
        ("kto", "TinyLlama", "kto(beta: 0.1)", &unpaired, &lm, ""),
        ("reward_margin", "TinyRm", "reward", &rm_data, &rm, "rm."),
    ] {
        let (m, cfg) =
            common::with_trainer("tests/fixtures/train/preference.vlm", model, objective);
        let mut s =
            Session::with_backend(&m, cfg, params.clone(), 1, &Backend::Interp).expect("session");
        let stats = s.step(std::slice::from_ref(data)).expect("step");
        let want_loss = r.get(&format!("{case}.step.loss")).expect("loss").to_f64()[0];
        assert!(
            (stats.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1e-3),
            "{case}: loss {} vs TRL {want_loss}",
            stats.loss
        );
        let mut worst = 0f64;
        for (p, before) in params.iter() {
            let name = format!("{case}.step.after.{}", p.strip_prefix(strip).unwrap_or(p));
            let want = r.get(&name).unwrap_or_else(|e| panic!("{case}: {e}"));
            // the error relative to the size of the update itself
            let (got, want, before) = (s.params[p].to_f64(), want.to_f64(), before.to_f64());
            let upd = want
                .iter()
                .zip(&before)
                .fold(1e-30f64, |a, (x, y)| a.max((x - y).abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
            worst = worst.max(diff / upd);
        }
        eprintln!("{case}: one step, loss {:.9} (TRL {want_loss:.9}), weights within {worst:.1e} of the update", stats.loss);
        // AdamW's first step is ~lr·g/|g|: where |g| is near eps (1e-8) the f32 gradient's last
        // bits show; a wrong gradient would be off by the whole update (1.0 or 2.0)
        assert!(
            worst < 5e-3,
            "{case}: weights after the step differ by {worst:.2e} of the update"
        );
    }
}

/// DPO on a vision-language model: the tiny LLaVA (image features as a prefix of the text),
/// one image per pair shared by both sides, against TRL's DPOTrainer on
/// LlavaForConditionalGeneration with the image tokens first.
#[test]
fn llava_dpo_matches_trl() {
    let l = vlmc_runtime::weights::WeightFile::open(std::path::Path::new(
        "tests/fixtures/preference_trl/llava.safetensors",
    ))
    .expect("llava reference");
    let r = trl();
    let params = group(&l, "llava.params.");
    let refp = group(&l, "llava.ref.");
    let pixels = l.get("llava.pixels").expect("pixels").to_f64_tensor();
    let mut data: BTreeMap<String, Tensor> = group(&r, "pair.")
        .into_iter()
        .filter(|(k, _)| k.starts_with("chosen.") || k.starts_with("rejected."))
        .collect();
    data.insert("chosen.pixels".into(), pixels.clone());
    data.insert("rejected.pixels".into(), pixels);
    let (model, cfg) = common::with_trainer(
        "tests/fixtures/train/preference.vlm",
        "TinyLlava",
        "dpo(beta: 0.1)",
    );
    let inputs = with_reference(&model, &cfg, &data, &refp);
    check_case(&l, "llava_dpo_sigmoid", &model, &cfg, &inputs, &params, "");
}
