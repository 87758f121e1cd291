//! Preference and reward objectives (TRL's DPO family, CPO/SimPO, ORPO, KTO, reward models,
//! PRM): step graphs against TRL 1.16's losses, gradients and optimiser steps
//! (tests/fixtures/preference_trl/make.py), and a user's own objective.

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

/// A pair batch of 3 rows (prompt 2 tokens, completions of different lengths) with reference
/// log-probabilities.
fn pair_batch() -> BTreeMap<String, Tensor> {
    let t = 7;
    let mut m = BTreeMap::new();
    for (k, side) in ["chosen", "rejected"].iter().enumerate() {
        let ids: Vec<i32> = (0..3 * t)
            .map(|i| 1 + ((i * 37 + k * 11) % 30) as i32)
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
    let model = common::load_named("tests/fixtures/train/preference.vlm", "TinyLlama");
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

/// (right, wrong) colour indices.
type Pairs = Vec<(usize, usize)>;

const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "cyan", "magenta"];

/// Preference rows: the prompt names a colour; the chosen completion repeats it, the rejected
/// one names another. `pairs` picks (right, wrong) colour indices.
fn colour_rows(pairs: &[(usize, usize)], unpaired: bool) -> String {
    let mut out = String::new();
    for &(c, w) in pairs {
        let prompt = format!("{} square what colour is the square ?", COLOURS[c]);
        if unpaired {
            for (x, label) in [(c, true), (w, false)] {
                out.push_str(&format!(
                    "{}\n",
                    serde_json::json!({"prompt": prompt, "completion": COLOURS[x], "label": label})
                ));
            }
        } else {
            out.push_str(&format!(
                "{}\n",
                serde_json::json!({"prompt": prompt, "chosen": COLOURS[c], "rejected": COLOURS[w]})
            ));
        }
    }
    out
}

/// The colour pairs of the training set and the held-out set: every ordered pair of distinct
/// colours, split 20 / 10 so that the held-out pairs are combinations never trained on.
fn colour_split() -> (Pairs, Pairs) {
    let all: Vec<(usize, usize)> = (0..6)
        .flat_map(|c| (0..6).filter(move |&w| w != c).map(move |w| (c, w)))
        .collect();
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (i, p) in all.into_iter().enumerate() {
        if i % 3 == 2 {
            held.push(p);
        } else {
            train.push(p);
        }
    }
    (train, held)
}

/// The share of the pairs of `data` whose chosen completion the policy of trainer `trainer`
/// (with `params`; `adapted`: with its adapter) finds more likely than the rejected one.
fn pair_accuracy(
    model: &vlmc::elab::Elaborated,
    trainer: &str,
    adapted: bool,
    params: &BTreeMap<String, Tensor>,
    data: &std::path::Path,
) -> f64 {
    let cfg = TrainConfig::of(model, trainer).expect("trainer");
    let vlmc::train::Objective::Preference(p) = &cfg.objective else {
        panic!("{trainer} is not a preference trainer")
    };
    let tok_path = std::path::Path::new("tests/fixtures/train/colours/tokenizer.json");
    let tok = vlmc_runtime::train_data::Tok::load(tok_path).expect("tokenizer");
    let text = std::fs::read_to_string(data).expect("data");
    let format = vlmc_runtime::train_data::RowFormat::plain(true, None);
    let rows =
        vlmc_runtime::train_pref::parse_rows(&cfg, data, &text, &tok, &format).expect("rows");
    let plan =
        vlmc_runtime::train_inputs::BatchPlan::of(model, &tok, tok_path.parent().expect("dir"))
            .expect("plan");
    let g = train::preference::build_logps(model, &cfg, p, adapted).expect("logps graph");
    let runner = vlmc_runtime::train::GraphRunner::new(g, &Default::default());
    let (mut right, mut all) = (0, 0);
    let idx: Vec<usize> = (0..rows.len()).collect();
    for chunk in idx.chunks(16) {
        let out = runner
            .run(&rows.batch(&plan, chunk, None).expect("batch"), params)
            .expect("run");
        let (c, r) = (out["chosen_logps"].to_f64(), out["rejected_logps"].to_f64());
        right += c.iter().zip(&r).filter(|(a, b)| a > b).count();
        all += c.len();
    }
    right as f64 / all as f64
}

fn heldout_accuracy(
    model: &vlmc::elab::Elaborated,
    params: &BTreeMap<String, Tensor>,
    data: &std::path::Path,
) -> f64 {
    pair_accuracy(model, "dpo", false, params, data)
}

/// The final weights of a run (an adapter run's hold the base and the adapter).
fn final_weights(out: &std::path::Path) -> BTreeMap<String, Tensor> {
    let w =
        vlmc_runtime::weights::WeightFile::open(&out.join("model.safetensors")).expect("weights");
    w.names()
        .into_iter()
        .map(|n| {
            let t = w.get(&n).expect("tensor");
            (n, t)
        })
        .collect()
}

/// Every preference objective learns the colour preference: held-out accuracy (chosen more
/// likely than rejected, on colour combinations never trained on) from about chance to > 90 %,
/// and the training log carries TRL's metric names.
#[test]
fn preference_objectives_learn_the_colour_preference() {
    use vlmc_runtime::train_loop::{train, TrainOptions};
    let spec = "tests/fixtures/train/pref_lm.vlm";
    let model = common::load(spec);
    let dir = std::env::temp_dir().join(format!("vlmc-pref-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let (train_pairs, held_pairs) = colour_split();
    let data = dir.join("train.jsonl");
    let unpaired = dir.join("unpaired.jsonl");
    let held = dir.join("heldout.jsonl");
    std::fs::write(&data, colour_rows(&train_pairs, false)).expect("write");
    std::fs::write(&unpaired, colour_rows(&train_pairs, true)).expect("write");
    std::fs::write(&held, colour_rows(&held_pairs, false)).expect("write");
    let tok = std::path::PathBuf::from("tests/fixtures/train/colours/tokenizer.json");
    let start = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let before = heldout_accuracy(&model, &start, &held);
    assert!(
        (0.2..=0.8).contains(&before),
        "held-out accuracy before training {before}"
    );
    let only = std::env::var("VLMC_PREF").ok();
    for trainer in ["dpo", "dpo_lora", "ipo", "cpo", "simpo", "orpo", "kto"] {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x == trainer))
        {
            continue;
        }
        let out = dir.join(trainer);
        let o = TrainOptions {
            model: &model,
            trainer,
            data: if trainer == "kto" { &unpaired } else { &data },
            tokenizer: Some(tok.clone()),
            weights: Some(start.clone()),
            weights_dir: None,
            base_name: None,
            out: &out,
            resume: None,
            steps: None,
            stop_after: None,
            eval_data: None,
            skip_finished: false,
            overwrite: false,
            restart_unfinished: false,
            backend: Default::default(),
            tensorboard: false,
        };
        let s = train(&o, &mut |_| {}).unwrap_or_else(|e| panic!("{trainer}: {e}"));
        let mut merged = start.clone();
        merged.extend(final_weights(&out));
        let after = if trainer == "dpo_lora" {
            pair_accuracy(&model, trainer, true, &merged, &held)
        } else {
            heldout_accuracy(&model, &merged, &held)
        };
        let log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
        let last: serde_json::Value =
            serde_json::from_str(log.lines().last().expect("a line")).expect("json");
        // TRL's KTO logs no reward accuracy; its margin and KL estimate instead
        let acc_key = if trainer == "kto" {
            "rewards/margins"
        } else {
            "rewards/accuracies"
        };
        if trainer == "kto" {
            assert!(last.get("kl").is_some(), "kto: log line {last}");
        }
        assert!(last.get(acc_key).is_some(), "{trainer}: log line {last}");
        eprintln!(
            "{trainer}: loss {:.4} -> {:.4}, held-out accuracy {before:.2} -> {after:.2}, last \
             batch {acc_key} {}",
            s.losses[0],
            s.losses[s.losses.len() - 1],
            last[acc_key]
        );
        assert!(after > 0.9, "{trainer}: held-out accuracy {after}");
    }
}

/// A preference run is a function of its inputs: run twice it writes the same weights bit
/// for bit, and stopped and resumed it continues exactly (the reference log-probabilities,
/// precomputed or not, and KTO's KL rows included).
#[test]
fn preference_runs_rerun_and_resume_bit_identically() {
    use vlmc_runtime::train_loop::{train, TrainOptions};
    let model = common::load("tests/fixtures/train/pref_lm.vlm");
    let dir = std::env::temp_dir().join(format!("vlmc-pref-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let (pairs, _) = colour_split();
    let data = dir.join("train.jsonl");
    let unpaired = dir.join("unpaired.jsonl");
    std::fs::write(&data, colour_rows(&pairs, false)).expect("write");
    std::fs::write(&unpaired, colour_rows(&pairs, true)).expect("write");
    let tok = std::path::PathBuf::from("tests/fixtures/train/colours/tokenizer.json");
    let weights = final_weights;
    for trainer in ["dpo_lora", "kto"] {
        let run = |out: &std::path::Path, stop: Option<u64>, resume: Option<&std::path::Path>| {
            let o = TrainOptions {
                model: &model,
                trainer,
                data: if trainer == "kto" { &unpaired } else { &data },
                tokenizer: Some(tok.clone()),
                weights: None,
                weights_dir: None,
                base_name: None,
                out,
                resume,
                steps: Some(9),
                stop_after: stop,
                eval_data: None,
                skip_finished: false,
                overwrite: false,
                restart_unfinished: false,
                backend: Default::default(),
                tensorboard: false,
            };
            train(&o, &mut |_| {})
                .unwrap_or_else(|e| panic!("{trainer}: {e}"))
                .losses
        };
        let (a, b, c) = (
            dir.join(format!("{trainer}_a")),
            dir.join(format!("{trainer}_b")),
            dir.join(format!("{trainer}_c")),
        );
        let first = run(&a, None, None);
        let again = run(&b, None, None);
        assert_eq!(first, again, "{trainer}: a rerun's losses differ");
        assert_eq!(
            weights(&a),
            weights(&b),
            "{trainer}: a rerun's weights differ"
        );
        let head = run(&c, Some(4), None);
        let tail = run(&c, None, Some(&c));
        let joined: Vec<f64> = head.into_iter().chain(tail).collect();
        assert_eq!(joined, first, "{trainer}: the resumed run's losses differ");
        assert_eq!(
            weights(&c),
            weights(&a),
            "{trainer}: the resumed run's weights differ"
        );
        // the log of the resumed run has every step once, with the metrics
        let log = std::fs::read_to_string(c.join("log.jsonl")).expect("log");
        assert_eq!(log.lines().count(), 9, "{trainer}: {log}");
    }
}

/// A vision-language model learns a preference that depends on the image: llava_tiny, DPO on
/// colour images, prefers the completion that names the square's colour on held-out images.
#[test]
fn llava_learns_to_prefer_the_image_colour() {
    use vlmc_runtime::train_loop::{train, TrainOptions};
    let model = common::load("tests/fixtures/train/pref_llava.vlm");
    let dir = std::env::temp_dir().join(format!("vlmc-pref-llava-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let colours_dir = std::fs::canonicalize("tests/fixtures/train/colours").expect("colours");
    // {"image", "prompt", "completion"} rows -> pairs with a wrong colour as the rejected one
    let pairs = |name: &str| -> std::path::PathBuf {
        let text = std::fs::read_to_string(colours_dir.join(name)).expect("rows");
        let mut out = String::new();
        for (k, l) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            let right = v["completion"].as_str().expect("completion");
            let c = COLOURS.iter().position(|x| *x == right).expect("a colour");
            let wrong = COLOURS[(c + 1 + k % 5) % 6];
            let image = colours_dir.join(v["image"].as_str().expect("image"));
            out.push_str(&format!(
                "{}\n",
                serde_json::json!({"image": image, "prompt": v["prompt"], "chosen": right,
                                   "rejected": wrong})
            ));
        }
        let p = dir.join(name);
        std::fs::write(&p, out).expect("write");
        p
    };
    let (data, held) = (pairs("train.jsonl"), pairs("heldout.jsonl"));
    let start = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let before = pair_accuracy(&model, "dpo", false, &start, &held);
    let out = dir.join("dpo");
    let o = TrainOptions {
        model: &model,
        trainer: "dpo",
        data: &data,
        tokenizer: Some(colours_dir.join("tokenizer.json")),
        weights: Some(start.clone()),
        weights_dir: None,
        base_name: None,
        out: &out,
        resume: None,
        steps: None,
        stop_after: None,
        eval_data: None,
        skip_finished: false,
        overwrite: false,
        restart_unfinished: false,
        backend: Default::default(),
        tensorboard: false,
    };
    let s = train(&o, &mut |_| {}).expect("trains");
    let after = pair_accuracy(&model, "dpo", false, &final_weights(&out), &held);
    eprintln!(
        "llava_tiny DPO: loss {:.4} -> {:.4}, held-out accuracy {before:.2} -> {after:.2}",
        s.losses[0],
        s.losses[s.losses.len() - 1]
    );
    assert!(after > 0.9, "held-out accuracy {after}");
}

/// Trains trainer `trainer` of `model` on `data` from `start` into `out` (its own settings).
fn train_run(
    model: &vlmc::elab::Elaborated,
    trainer: &str,
    data: &std::path::Path,
    start: &BTreeMap<String, Tensor>,
    out: &std::path::Path,
) -> vlmc_runtime::train_loop::Summary {
    let o = vlmc_runtime::train_loop::TrainOptions {
        model,
        trainer,
        data,
        tokenizer: Some("tests/fixtures/train/colours/tokenizer.json".into()),
        weights: Some(start.clone()),
        weights_dir: None,
        base_name: None,
        out,
        resume: None,
        steps: None,
        stop_after: None,
        eval_data: None,
        skip_finished: false,
        overwrite: false,
        restart_unfinished: false,
        backend: Default::default(),
        tensorboard: false,
    };
    vlmc_runtime::train_loop::train(&o, &mut |_| {}).unwrap_or_else(|e| panic!("{trainer}: {e}"))
}

/// The collated batch of every row of `data` as trainer `trainer` reads it.
fn whole_batch(
    model: &vlmc::elab::Elaborated,
    trainer: &str,
    data: &std::path::Path,
) -> BTreeMap<String, Tensor> {
    let cfg = TrainConfig::of(model, trainer).expect("trainer");
    let tok_path = std::path::Path::new("tests/fixtures/train/colours/tokenizer.json");
    let tok = vlmc_runtime::train_data::Tok::load(tok_path).expect("tokenizer");
    let text = std::fs::read_to_string(data).expect("data");
    let format = vlmc_runtime::train_data::RowFormat::plain(true, None);
    let rows =
        vlmc_runtime::train_pref::parse_rows(&cfg, data, &text, &tok, &format).expect("rows");
    let plan =
        vlmc_runtime::train_inputs::BatchPlan::of(model, &tok, tok_path.parent().expect("d"))
            .expect("plan");
    let idx: Vec<usize> = (0..rows.len()).collect();
    rows.batch(&plan, &idx, None).expect("batch")
}

/// A reward model (LlamaForSequenceClassification's layout, Bradley–Terry loss) learns to
/// score the completion naming the prompt's colour higher, on held-out combinations; so does
/// a process reward model label each step right (token classification at the separators).
#[test]
fn reward_and_process_reward_models_learn() {
    let dir = std::env::temp_dir().join(format!("vlmc-pref-rm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let (train_pairs, held_pairs) = colour_split();
    // the reward model sees every colour combination in three phrasings and is checked on a
    // fourth it never saw
    let all: Vec<(usize, usize)> = train_pairs.iter().chain(&held_pairs).copied().collect();
    let phrased = |templates: &[&str]| -> String {
        let mut out = String::new();
        for t in templates {
            for &(c, w) in &all {
                let v = serde_json::json!({"prompt": t.replace("{}", COLOURS[c]),
                                           "chosen": COLOURS[c], "rejected": COLOURS[w]});
                out.push_str(&format!("{v}\n"));
            }
        }
        out
    };
    let (data, held) = (dir.join("train.jsonl"), dir.join("held.jsonl"));
    std::fs::write(
        &data,
        phrased(&[
            "{} square what colour is the square ?",
            "what colour is the {} square ?",
            "the {} square what colour is the square ?",
        ]),
    )
    .expect("write");
    std::fs::write(
        &held,
        phrased(&["is the square {} ? what colour is the square ?"]),
    )
    .expect("write");
    let model = common::load("tests/fixtures/train/pref_rm.vlm");
    let start = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let accuracy = |params: &BTreeMap<String, Tensor>| {
        let b = whole_batch(&model, "reward", &held);
        let side = |s: &str| -> Vec<f64> {
            let inputs: BTreeMap<String, Tensor> = b
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&format!("{s}."))
                        .map(|n| (n.to_string(), v.clone()))
                })
                .collect();
            let out = vlmc_runtime::run(&model.graph, &inputs, params).expect("run");
            out.values().next().expect("scores").to_f64()
        };
        let (c, r) = (side("chosen"), side("rejected"));
        c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / c.len() as f64
    };
    let before = accuracy(&start);
    for trainer in ["reward", "reward_centered"] {
        let out = dir.join(trainer);
        let s = train_run(&model, trainer, &data, &start, &out);
        let after = accuracy(&final_weights(&out));
        let log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
        let last: serde_json::Value =
            serde_json::from_str(log.lines().last().expect("line")).expect("json");
        for k in [
            "accuracy",
            "margin",
            "mean_reward",
            "min_reward",
            "max_reward",
        ] {
            assert!(last.get(k).is_some(), "{trainer}: {k} missing in {last}");
        }
        eprintln!(
            "{trainer}: loss {:.4} -> {:.4}, held-out accuracy {before:.2} -> {after:.2}, mean reward {}",
            s.losses[0],
            s.losses[s.losses.len() - 1],
            last["mean_reward"]
        );
        assert!(after > 0.9, "{trainer}: held-out accuracy {after}");
    }
    // PRM: a prompt naming a colour, then steps "<colour>" each followed by the separator "?",
    // labelled right when the step names the prompt's colour
    let steps = |templates: &[&str]| -> String {
        let mut out = String::new();
        for t in templates {
            for (k, &(c, w)) in all.iter().enumerate() {
                let other = (w + 1 + k % 4) % 6;
                let (list, labels) = if k % 2 == 0 {
                    (vec![w, c, other], vec![false, true, other == c])
                } else {
                    (vec![c, other, w], vec![true, other == c, false])
                };
                let v = serde_json::json!({
                    "prompt": t.replace("{}", COLOURS[c]),
                    "completions": list.iter().map(|&i| COLOURS[i]).collect::<Vec<_>>(),
                    "labels": labels,
                });
                out.push_str(&format!("{v}\n"));
            }
        }
        out
    };
    let (sdata, sheld) = (dir.join("steps.jsonl"), dir.join("steps_held.jsonl"));
    std::fs::write(
        &sdata,
        steps(&[
            "{} square what colour is the square",
            "what colour is the {} square",
            "the {} square what colour is the square",
        ]),
    )
    .expect("write");
    std::fs::write(
        &sheld,
        steps(&["is the square {} what colour is the square"]),
    )
    .expect("write");
    let prm = common::load("tests/fixtures/train/pref_prm.vlm");
    let pstart = vlmc_runtime::init::init_params(&prm.graph, 0).expect("init");
    let step_accuracy = |params: &BTreeMap<String, Tensor>| {
        let b = whole_batch(&prm, "prm", &sheld);
        let out = vlmc_runtime::run(&prm.graph, &b, params).expect("run");
        let logits = out.values().next().expect("logits").to_f64();
        let (labels, mask) = (
            b["labels"].as_i32().expect("i32").to_vec(),
            b["loss_mask"].to_f64(),
        );
        let (mut right, mut all) = (0, 0);
        for (i, m) in mask.iter().enumerate() {
            if *m > 0.0 {
                let guess = usize::from(logits[2 * i + 1] > logits[2 * i]);
                right += usize::from(guess as i32 == labels[i]);
                all += 1;
            }
        }
        right as f64 / all as f64
    };
    let before = step_accuracy(&pstart);
    let out = dir.join("prm");
    let s = train_run(&prm, "prm", &sdata, &pstart, &out);
    let after = step_accuracy(&final_weights(&out));
    eprintln!(
        "prm: loss {:.4} -> {:.4}, held-out step accuracy {before:.2} -> {after:.2}",
        s.losses[0],
        s.losses[s.losses.len() - 1]
    );
    assert!(after > 0.9, "prm: held-out step accuracy {after}");
}
