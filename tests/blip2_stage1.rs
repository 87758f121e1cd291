//! BLIP-2 stage 1 (models/blip2.vlm `Blip2Qformer`, objectives `itc`, `itm`, `itg` and their
//! sum `blip2_stage1`) against LAVIS's `blip2_qformer` losses written in PyTorch on a tiny
//! transformers `Blip2ForImageTextRetrieval` (tests/fixtures/blip2_stage1/make.py): the losses
//! and gradients of one step, on the interpreter and compiled for the CPU, with the ITM hard
//! negatives drawn from the same uniform numbers; then a short run whose loss falls.

mod common;
use common::{load, rel_err};

use std::collections::BTreeMap;
use vlmc::train::{self, Objective, StepKind, TrainConfig};
use vlmc_runtime::train::{Backend, GraphRunner, Session};
use vlmc_runtime::weights::WeightFile;
use vlmc_runtime::Tensor;

const DIR: &str = "tests/fixtures/blip2_stage1";

/// The tiny model and the zoo's `pretrain_qformer` trainer, every parameter but the ViT's
/// training (as the zoo trainer's `freeze [vision_model]`).
fn tiny() -> (vlmc::elab::Elaborated, TrainConfig) {
    let model = load(&format!("{DIR}/tiny.vlm"));
    let checked = vlmc::elab::check_file(std::path::Path::new("models/blip2_qformer.vlm"));
    let zoo = checked.result.expect("models/blip2_qformer.vlm checks");
    let stage1 = zoo
        .iter()
        .find(|m| m.model == "Blip2Qformer")
        .expect("Blip2Qformer");
    let mut cfg = TrainConfig::of(stage1, "pretrain_qformer").expect("trainer");
    assert_eq!(cfg.objective, Objective::Blip2Stage1);
    assert!(cfg
        .trainable
        .iter()
        .all(|p| !p.starts_with("vision_model.")));
    cfg.trainable = common::all_params(&model)
        .into_iter()
        .filter(|p| !p.starts_with("vision_model."))
        .collect();
    (model, cfg)
}

fn fixture() -> (BTreeMap<String, Tensor>, WeightFile) {
    let w = WeightFile::open(std::path::Path::new(&format!("{DIR}/model.safetensors")))
        .expect("weights");
    let params = w
        .names()
        .into_iter()
        .map(|n| {
            let t = w.get(&n).expect("tensor");
            (n, t)
        })
        .collect();
    let io = WeightFile::open(std::path::Path::new(&format!("{DIR}/io.safetensors"))).expect("io");
    (params, io)
}

fn inputs(io: &WeightFile) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for k in ["pixels", "ids", "mask", "uniform_itm"] {
        m.insert(k.to_string(), io.get(k).expect("input"));
    }
    let mask = m["mask"].to_f64().iter().map(|&v| v as f32).collect();
    m.insert(
        "loss_mask".into(),
        Tensor::f32(m["mask"].shape.clone(), mask),
    );
    m.insert("loss_scale".into(), Tensor::f32(vec![], vec![1.0]));
    m
}

#[test]
fn stage1_losses_and_gradients_match_lavis() {
    let (model, cfg) = tiny();
    let (params, io) = fixture();
    assert_eq!(params.len(), model.graph.params().len());
    let batch = inputs(&io);
    let want = |k: &str| io.get(&format!("expect.{k}")).expect("expected").to_f64()[0];
    let mut report = Vec::new();
    for (objective, key) in [
        (Objective::Itc, "itc"),
        (Objective::Itm, "itm"),
        (Objective::Itg, "itg"),
        (Objective::Blip2Stage1, "loss"),
    ] {
        let cfg = TrainConfig {
            objective: objective.clone(),
            ..cfg.clone()
        };
        let step = train::build(&model, &cfg, StepKind::Grad).expect("step graph");
        let backends = [
            ("interpreter", Backend::Interp),
            ("cpu", Backend::default()),
        ];
        for (name, backend) in backends {
            let out = GraphRunner::new(step.graph.clone(), &backend)
                .run(&batch, &params)
                .expect("step");
            let loss = out["loss"].to_f64()[0];
            let e = (loss - want(key)).abs() / want(key).abs();
            report.push(format!(
                "{key} ({name}) {loss:.6} vs {:.6}: {e:.1e}",
                want(key)
            ));
            assert!(e <= 1e-4, "{key} on the {name}: {loss} vs {}", want(key));
            if objective != Objective::Blip2Stage1 {
                continue;
            }
            let mut grads = 0;
            for n in io.names() {
                let Some(p) = n.strip_prefix("grad.") else {
                    continue;
                };
                let got = &out[&format!("grad.{p}")];
                let e = rel_err(got, &io.get(&n).expect("gradient"));
                report.push(format!("grad {p} ({name}): {e:.1e}"));
                assert!(e <= 1e-4, "gradient of {p} on the {name}: {e}");
                grads += 1;
            }
            assert_eq!(grads, 9);
        }
    }
    eprintln!("BLIP-2 stage 1 vs LAVIS:\n  {}", report.join("\n  "));
}

/// Synthetic image-caption pairs: a flat colour per image, its caption the colour's word
/// (ids of the tiny vocabulary) after [CLS], some captions padded.
fn colour_batch(step: u64, b: usize) -> BTreeMap<String, Tensor> {
    let colours: [[f32; 3]; 6] = [
        [1.0, -1.0, -1.0],
        [-1.0, 1.0, -1.0],
        [-1.0, -1.0, 1.0],
        [1.0, 1.0, -1.0],
        [-1.0, 1.0, 1.0],
        [1.0, -1.0, 1.0],
    ];
    let t = 4;
    let (mut px, mut ids, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..b {
        let c = ((step as usize) * b + r * 5) % 6;
        for v in colours[c] {
            px.extend(std::iter::repeat_n(v, 400));
        }
        // [CLS], the colour word, a shared word, and padding on odd colours
        let row = [
            1,
            10 + c as i32,
            30,
            if c.is_multiple_of(2) { 31 } else { 0 },
        ];
        ids.extend(row);
        mask.extend(row.iter().map(|&i| i32::from(i != 0)));
    }
    let mut m = BTreeMap::new();
    m.insert("pixels".into(), Tensor::f32(vec![b, 3, 20, 20], px));
    m.insert(
        "loss_mask".into(),
        Tensor::f32(vec![b, t], mask.iter().map(|&v| v as f32).collect()),
    );
    m.insert("ids".into(), Tensor::i32(vec![b, t], ids));
    m.insert("mask".into(), Tensor::i32(vec![b, t], mask));
    m
}

#[test]
fn stage1_training_loss_falls() {
    let (model, mut cfg) = tiny();
    cfg.optimizer.lr = 1e-3;
    cfg.schedule.warmup = 0;
    let params = vlmc_runtime::init::init_params(&model.graph, 3).expect("init");
    let steps = 30;
    let mut s = Session::new(&model, cfg, params, steps).expect("session");
    // pixels, ids, mask, uniform_itm: the step draws `uniform_itm`
    assert_eq!(s.uniform_inputs.len(), 4);
    let mut losses = Vec::new();
    for k in 0..steps {
        losses.push(s.step(&[colour_batch(k, 4)]).expect("step").loss);
    }
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[steps as usize - 3..].iter().sum::<f64>() / 3.0;
    eprintln!("BLIP-2 stage 1 on colour pairs: loss {first:.3} -> {last:.3} ({losses:?})");
    assert!(last < 0.8 * first, "{first} -> {last}");
    let temp = s.params["temp"].to_f64()[0];
    assert!((0.001..=0.5).contains(&temp), "temp {temp}");
}

/// Stage 2 (models/blip2.vlm `generative`, LAVIS `blip2_opt`): the caption's next-token
/// cross-entropy through OPT with the projected queries as prefix, image placeholders and
/// padding no targets. Its loss on the zoo fixture equals the mean cross-entropy computed
/// here from transformers' logits (tests/fixtures/zoo/blip2).
#[test]
fn stage2_generative_loss_is_the_caption_lm_loss_of_transformers_logits() {
    let dir = std::path::Path::new("tests/fixtures/zoo/blip2");
    let model = load(dir.join("fixture.vlm").to_str().expect("path"));
    let checked = vlmc::elab::check_file(std::path::Path::new("models/blip2.vlm"));
    let zoo = checked.result.expect("models/blip2.vlm checks");
    let mut cfg = TrainConfig::of(&zoo[0], "generative").expect("trainer");
    assert_eq!(
        cfg.objective,
        Objective::Sft {
            prompt_masked: true,
            assistant_only: false
        }
    );
    cfg.trainable = common::all_params(&model)
        .into_iter()
        .filter(|p| {
            ["query_tokens", "qformer.", "language_projection."]
                .iter()
                .any(|r| p.starts_with(r))
        })
        .collect();
    let wf = WeightFile::open(&dir.join("model.safetensors")).expect("weights");
    let params = vlmc_runtime::weights::bind(&model.graph, &wf, &model.checkpoint)
        .expect("bind")
        .params;
    let io = WeightFile::open(&dir.join("io.safetensors")).expect("io");
    let (ids, mask) = (io.get("ids").expect("ids"), io.get("mask").expect("mask"));
    let (b, t) = (ids.shape[0], ids.shape[1]);
    // targets: the text after the 6 image placeholders (LAVIS: -100 on the query positions
    // and on padding)
    let loss_mask: Vec<f32> = mask
        .to_f64()
        .iter()
        .enumerate()
        .map(|(i, &m)| if i % t >= 6 && m != 0.0 { 1.0 } else { 0.0 })
        .collect();
    let logits = io.get("expect.logits").expect("logits").to_f64();
    let v = logits.len() / (b * t);
    let (mut sum, mut n) = (0f64, 0f64);
    let idv = ids.to_f64();
    for r in 0..b {
        for p in 0..t - 1 {
            if loss_mask[r * t + p + 1] == 0.0 {
                continue;
            }
            let row = &logits[(r * t + p) * v..(r * t + p + 1) * v];
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            sum += lse - row[idv[r * t + p + 1] as usize];
            n += 1.0;
        }
    }
    let want = sum / n;
    let mut batch = BTreeMap::new();
    for k in ["pixels", "ids", "mask"] {
        batch.insert(k.to_string(), io.get(k).expect("input"));
    }
    batch.insert("loss_mask".into(), Tensor::f32(vec![b, t], loss_mask));
    batch.insert(
        "loss_scale".into(),
        Tensor::f32(vec![], vec![(1.0 / n) as f32]),
    );
    let step = train::build(&model, &cfg, StepKind::Grad).expect("step graph");
    let out = GraphRunner::new(step.graph.clone(), &Backend::Interp)
        .run(&batch, &params)
        .expect("step");
    let got = out["loss"].to_f64()[0];
    eprintln!("stage 2 caption loss {got:.6} vs {want:.6} from transformers' logits ({n} targets)");
    assert!((got - want).abs() <= 1e-4 * want, "{got} vs {want}");
    assert!(out
        .keys()
        .all(|k| !k.starts_with("grad.language_model.") && !k.starts_with("grad.vision_model.")));
    assert!(out.contains_key("grad.language_projection.weight"));
}

/// LXMERT's cross-modality matching (`objective itm` on models/lxmert_pretraining.vlm
/// `LxmertForPreTraining`) against transformers' LxmertForPreTraining called with
/// `matched_label` (tests/fixtures/lxmert_itm/make.py): the loss and gradients of one step, on
/// the interpreter and compiled for the CPU.
#[test]
fn lxmert_itm_matches_transformers() {
    let dir = std::path::Path::new("tests/fixtures/lxmert_itm");
    let model = load(dir.join("fixture.vlm").to_str().expect("path"));
    let checked = vlmc::elab::check_file(std::path::Path::new("models/lxmert_pretraining.vlm"));
    let zoo = checked
        .result
        .expect("models/lxmert_pretraining.vlm checks");
    let pre = zoo
        .iter()
        .find(|m| m.model == "LxmertForPreTraining")
        .expect("LxmertForPreTraining");
    let mut cfg = TrainConfig::of(pre, "pretrain").expect("trainer");
    assert_eq!(cfg.objective, Objective::Itm);
    cfg.trainable = common::all_params(&model);
    let wf = WeightFile::open(&dir.join("model.safetensors")).expect("weights");
    let params = vlmc_runtime::weights::bind(&model.graph, &wf, &model.checkpoint)
        .expect("bind")
        .params;
    let io = WeightFile::open(&dir.join("io.safetensors")).expect("io");
    let mut batch = BTreeMap::new();
    for k in [
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "visual_feats",
        "visual_pos",
        "matched_label",
    ] {
        batch.insert(k.to_string(), io.get(k).expect("input"));
    }
    batch.insert("loss_scale".into(), Tensor::f32(vec![], vec![1.0]));
    let want = io.get("expect.loss").expect("loss").to_f64()[0];
    let step = train::build(&model, &cfg, StepKind::Grad).expect("step graph");
    let mut report = Vec::new();
    for (name, backend) in [
        ("interpreter", Backend::Interp),
        ("cpu", Backend::default()),
    ] {
        let out = GraphRunner::new(step.graph.clone(), &backend)
            .run(&batch, &params)
            .expect("step");
        let loss = out["loss"].to_f64()[0];
        report.push(format!("loss ({name}) {loss:.7} vs {want:.7}"));
        assert!(
            (loss - want).abs() <= 1e-4 * want,
            "{name}: {loss} vs {want}"
        );
        let mut grads = 0;
        for n in io.names() {
            let Some(p) = n.strip_prefix("grad.") else {
                continue;
            };
            let e = rel_err(&out[&format!("grad.{p}")], &io.get(&n).expect("gradient"));
            report.push(format!("grad {p} ({name}): {e:.1e}"));
            assert!(e <= 1e-4, "gradient of {p} on the {name}: {e}");
            grads += 1;
        }
        assert_eq!(grads, 6);
    }
    eprintln!("LXMERT ITM vs transformers:\n  {}", report.join("\n  "));
}

/// The compiled backward of a symmetric loss over a square matrix (`clip` on `x * 2`): the
/// gradient `g + gᵀ` is read transposed, which must not happen inside the kernel that holds
/// the rows' reductions (it read other rows' values there: 7.0 relative error before the fix).
#[test]
fn the_compiled_gradient_of_a_square_symmetric_loss_equals_the_interpreted_one() {
    let model = load(&format!("{DIR}/square_logits.vlm"));
    let clip = load("models/clip_tiny.vlm");
    let cfg = TrainConfig {
        trainable: common::all_params(&model),
        ..TrainConfig::of(&clip, "contrastive").expect("trainer")
    };
    let params = vlmc_runtime::init::init_params(&model.graph, 3).expect("init");
    let mut batch = BTreeMap::new();
    batch.insert("ids".to_string(), Tensor::i32(vec![1, 1], vec![1]));
    batch.insert("loss_scale".to_string(), Tensor::f32(vec![], vec![1.0]));
    let step = train::build(&model, &cfg, StepKind::Grad).expect("step graph");
    let want = GraphRunner::new(step.graph.clone(), &Backend::Interp)
        .run(&batch, &params)
        .expect("interpreter");
    let got = GraphRunner::new(step.graph.clone(), &Backend::default())
        .run(&batch, &params)
        .expect("cpu");
    let e = rel_err(&got["grad.x"], &want["grad.x"]);
    assert!(e <= 1e-5, "compiled gradient: {e}");
    assert!(want["grad.x"].to_f64().iter().any(|v| v.abs() > 0.1));
}
