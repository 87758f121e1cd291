//! LoRA dropout in the training step, evaluation during training, `from` chains.
//!
//! Dropout: the step graph reads one mask per adapted matmul, multiplying the adapter branch's
//! input only; with dropout 0 the graph is the one without dropout (no mask, no random op); the
//! masks keep 1 - p of the elements, scaled by 1 / (1 - p), differ from step to step and are
//! the same in two runs, so runs repeat and resume exactly. Evaluation: the eval loss of the
//! training batch equals the training loss of the next step (same parameters, same data), and
//! it falls.

mod common;
use common::load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc::elab::Setting;
use vlmc::ir::Op;
use vlmc::train::{StepKind, TrainConfig};
use vlmc_runtime::train::Session;
use vlmc_runtime::train_data::{self, Position, Tok};
use vlmc_runtime::train_loop::{train, TrainOptions};
use vlmc_runtime::Tensor;

const COLOURS: &str = "tests/fixtures/train/colours";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-trainf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Trainer `instruct` of llava_tiny with its adapter's dropout set to `p` (`None`: no
/// `dropout` argument at all).
fn instruct(model: &vlmc::elab::Elaborated, p: Option<f64>) -> TrainConfig {
    let mut cfg = TrainConfig::of(model, "instruct").expect("trainer");
    let a = cfg.adapter.as_mut().expect("adapter");
    a.args.retain(|(k, _)| k != "dropout");
    if let Some(p) = p {
        a.args.push(("dropout".into(), Setting::Float(p)));
    }
    cfg
}

/// The first `n` batches of 8 colour rows, in the trainer's order.
fn batches(n: usize) -> Vec<BTreeMap<String, Tensor>> {
    let dir = PathBuf::from(COLOURS);
    let tok = Tok::load(&dir.join("tokenizer.json")).expect("tokenizer");
    let rows = train_data::read_jsonl(&dir.join("train.jsonl"), &tok, true, None).expect("data");
    let image = train_data::image_preprocess(&[], 32);
    let mut pos = Position { epoch: 0, index: 0 };
    (0..n)
        .map(|_| {
            let (idx, next) = train_data::next_batch(rows.len(), 8, 0, pos);
            pos = next;
            let r: Vec<&train_data::Example> = idx.iter().map(|&i| &rows[i]).collect();
            train_data::collate(&r, tok.pad_id, Some(&image)).expect("batch")
        })
        .collect()
}

fn mask_inputs(g: &vlmc::ir::Graph) -> Vec<String> {
    g.inputs()
        .into_iter()
        .filter(|(_, n, _)| n.starts_with(vlmc::passes::lora::DROPOUT_INPUT))
        .map(|(_, n, _)| n.to_string())
        .collect()
}

fn has_random(g: &vlmc::ir::Graph) -> bool {
    g.topo_order()
        .into_iter()
        .any(|id| matches!(g.node(id).op, Op::Random { .. }))
}

#[test]
fn dropout_masks_the_adapter_input_and_dropout_zero_is_no_dropout() {
    let model = load("models/llava_tiny.vlm");
    // The zoo's `lora(rank: 8, alpha: 16, dropout: 0.05)`.
    let cfg = TrainConfig::of(&model, "instruct").expect("trainer");
    assert_eq!(cfg.lora_dropout(), 0.05);
    let step = vlmc::train::build(&model, &cfg, StepKind::Fused).expect("step");
    let masks = mask_inputs(&step.graph);
    assert_eq!(
        masks,
        [
            "lora_dropout.language_model.model.layers.0.self_attn.q_proj",
            "lora_dropout.language_model.model.layers.0.self_attn.v_proj",
            "lora_dropout.language_model.model.layers.1.self_attn.q_proj",
            "lora_dropout.language_model.model.layers.1.self_attn.v_proj",
        ]
    );
    assert!(!has_random(&step.graph));
    // Each mask multiplies the input of the adapter's A only (not the base layer's).
    let (adapted, _, _) = vlmc::train::model_graph(&model, &cfg).expect("adapted");
    for m in &masks {
        let id = adapted.input(m).expect("mask input");
        let users = adapted.users(id);
        assert_eq!(users.len(), 1, "{m}");
        let mul = users[0];
        let mm = adapted.users(mul);
        assert_eq!(mm.len(), 1, "{m}");
        assert!(matches!(adapted.node(mm[0]).op, Op::MatMul));
        let rhs = adapted.operands(mm[0])[1];
        let a = adapted.operands(rhs)[0];
        let Op::Param { path, .. } = &adapted.node(a).op else {
            panic!("{m}: x·mask feeds {:?}", adapted.node(a).op)
        };
        let target = m.strip_prefix("lora_dropout.").expect("prefix");
        assert_eq!(path, &format!("{target}.lora_A.weight"));
    }
    // Dropout 0: no mask, no random op, the very graph of an adapter without dropout.
    for kind in [StepKind::Fused, StepKind::Grad] {
        let zero = vlmc::train::build(&model, &instruct(&model, Some(0.0)), kind).expect("p=0");
        let none = vlmc::train::build(&model, &instruct(&model, None), kind).expect("none");
        assert!(mask_inputs(&zero.graph).is_empty());
        assert!(!has_random(&zero.graph));
        assert_eq!(
            vlmc::ir::text::print(&zero.graph),
            vlmc::ir::text::print(&none.graph)
        );
    }
    // With masks of ones the dropout step computes exactly the step without dropout.
    let plain =
        vlmc::train::build(&model, &instruct(&model, Some(0.0)), StepKind::Fused).expect("plain");
    let mut params = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let s = Session::new(&model, cfg.clone(), params.clone(), 10).expect("session");
    params = s.params.clone();
    // B = 0 would hide the branch: give B values.
    for (p, t) in params.iter_mut() {
        if p.contains("lora_B") {
            let n = t.numel();
            *t = Tensor::f32(
                t.shape.clone(),
                (0..n).map(|i| ((i % 13) as f32 - 6.0) * 1e-2).collect(),
            );
        }
    }
    let b = batches(1).remove(0);
    let mut inputs = b.clone();
    let scalar = |v: f32| Tensor::f32(vec![], vec![v]);
    inputs.insert("loss_scale".into(), scalar(0.1));
    inputs.insert("lr".into(), scalar(1e-3));
    inputs.insert("step".into(), scalar(1.0));
    inputs.extend(s.state.clone());
    let want = vlmc_runtime::run(&plain.graph, &inputs, &params).expect("plain step");
    let mut ones = inputs.clone();
    let drawn = s.dropout_masks(&b, 0).expect("masks");
    for (n, t) in &drawn {
        ones.insert(
            n.clone(),
            Tensor::f32(t.shape.clone(), vec![1.0; t.numel()]),
        );
    }
    let got = vlmc_runtime::run(&step.graph, &ones, &params).expect("dropout step");
    assert_eq!(got.len(), want.len());
    for (k, v) in &want {
        assert_eq!(&got[k], v, "{k}");
    }
    // With the drawn masks the loss and the adapters' update change.
    let mut dropped = inputs.clone();
    dropped.extend(drawn);
    let got = vlmc_runtime::run(&step.graph, &dropped, &params).expect("dropout step");
    assert_ne!(got["loss"], want["loss"]);
    for (k, v) in &want {
        if k.contains("lora_") && k.starts_with("param.") {
            assert_ne!(&got[k], v, "{k}");
        }
    }
}

#[test]
fn dropout_masks_keep_one_minus_p_scaled_and_differ_per_step() {
    let model = load("models/llava_tiny.vlm");
    let p = 0.25;
    let params = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let mut a = Session::new(&model, instruct(&model, Some(p)), params.clone(), 10).expect("a");
    let b = batches(2);
    let m1 = a.dropout_masks(&b[0], 0).expect("masks");
    assert_eq!(m1.len(), 4);
    // [8, 16 + T] rows of 96 features, flattened to [B·(16 + T), 96].
    let t = b[0]["ids"].shape[1];
    let (mut kept, mut total) = (0usize, 0usize);
    for (n, m) in &m1 {
        assert_eq!(m.shape, vec![8 * (16 + t), 96], "{n}");
        for &x in m.as_f32().expect("f32") {
            assert!(x == 0.0 || x == (1.0 / (1.0 - p)) as f32, "{n}: {x}");
            kept += usize::from(x != 0.0);
            total += 1;
        }
    }
    let frac = kept as f64 / total as f64;
    let sd = (p * (1.0 - p) / total as f64).sqrt();
    eprintln!("keep fraction {frac:.4} of {total} (1 - p = 0.75, sd {sd:.4})");
    assert!((frac - (1.0 - p)).abs() < 5.0 * sd, "{frac}");
    // The same masks in another session (reproducible from the seed and the step) ...
    let mut c = Session::new(&model, instruct(&model, Some(p)), params.clone(), 10).expect("c");
    assert_eq!(c.dropout_masks(&b[0], 0).expect("masks"), m1);
    // ... and new ones for the next step and for another micro-batch.
    let other = a.dropout_masks(&b[0], 1).expect("micro 1");
    let sa = a.step(&b[..1]).expect("step 1");
    let sc = c.step(&b[..1]).expect("step 1");
    assert_eq!(sa, sc);
    let m2 = a.dropout_masks(&b[0], 0).expect("masks of step 2");
    for next in [&m2, &other] {
        for (n, m) in &m1 {
            let (x, y) = (m.as_f32().expect("f32"), next[n].as_f32().expect("f32"));
            let same = x.iter().zip(y).filter(|(u, v)| u == v).count() as f64 / x.len() as f64;
            // Independent masks agree with probability 0.75² + 0.25² = 0.625.
            assert!((same - 0.625).abs() < 0.02, "{n}: {same}");
        }
    }
    // The step draws them: with B = 0 the first loss is the loss without dropout, the update
    // of B is not.
    let mut z = Session::new(&model, instruct(&model, Some(0.0)), params, 10).expect("z");
    let sz = z.step(&b[..1]).expect("step 1");
    assert_eq!(sz.loss, sa.loss);
    for p in &a.adapter_params {
        if p.contains("lora_B") {
            assert_ne!(a.params[p], z.params[p], "{p}");
        } else {
            assert_eq!(
                a.params[p], z.params[p],
                "{p}: A has no gradient while B = 0"
            );
        }
    }
    let (la, lz) = (
        a.step(&b[1..]).expect("step 2").loss,
        z.step(&b[1..]).expect("step 2").loss,
    );
    eprintln!("step 2 loss with dropout {la:.6}, without {lz:.6}");
    assert_ne!(la, lz);
}

#[test]
fn with_dropout_runs_repeat_and_resume_exactly() {
    let model = load("models/llava_tiny.vlm");
    assert_eq!(
        TrainConfig::of(&model, "instruct")
            .expect("trainer")
            .lora_dropout(),
        0.05
    );
    let data = PathBuf::from(COLOURS).join("train.jsonl");
    let base = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let run = |out: &Path, stop: Option<u64>, resume: bool| -> Vec<f64> {
        let o = TrainOptions {
            model: &model,
            trainer: "instruct",
            data: &data,
            tokenizer: None,
            weights: Some(base.clone()),
            weights_dir: None,
            base_name: None,
            out,
            resume: resume.then_some(out),
            steps: Some(8),
            stop_after: stop,
            eval_data: None,
            skip_finished: false,
            overwrite: false,
            restart_unfinished: false,
            backend: Default::default(),
            tensorboard: false,
        };
        train(&o, &mut |_| {}).expect("trains").losses
    };
    let (a, b, c) = (tmp("drop-a"), tmp("drop-b"), tmp("drop-c"));
    let straight = run(&a, None, false);
    assert_eq!(run(&b, None, false), straight, "two runs differ");
    let first = run(&c, Some(3), false);
    let rest = run(&c, None, true);
    let resumed: Vec<f64> = first.into_iter().chain(rest).collect();
    assert_eq!(resumed, straight, "the resumed run differs");
    let wa = vlmc_runtime::weights::WeightFile::open(&a.join("model.safetensors")).expect("a");
    let wc = vlmc_runtime::weights::WeightFile::open(&c.join("model.safetensors")).expect("c");
    for n in wa.names() {
        assert_eq!(wa.get(&n).expect("a"), wc.get(&n).expect("c"), "{n}");
    }
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn eval_loss_is_the_training_loss_of_the_same_batch_and_falls() {
    // TinyLm, `eval_every 1`, batch 4 over 4 rows: every step trains on the whole set (in a
    // shuffled order), and the evaluation after step k scores the same rows with the
    // parameters that step k + 1 starts from.
    let model = load("tests/fixtures/train/tiny_lm.vlm");
    let dir = tmp("eval");
    let data = common::text_data(&dir);
    let out = dir.join("out");
    let o = TrainOptions {
        model: &model,
        trainer: "evaluated",
        data: &data,
        tokenizer: Some(PathBuf::from(COLOURS).join("tokenizer.json")),
        weights: None,
        weights_dir: None,
        base_name: None,
        out: &out,
        resume: None,
        steps: Some(8),
        stop_after: None,
        eval_data: Some(&data),
        skip_finished: false,
        overwrite: false,
        restart_unfinished: false,
        backend: Default::default(),
        tensorboard: false,
    };
    let s = train(&o, &mut |_| {}).expect("trains");
    assert_eq!(s.eval_losses.len(), 8);
    let mut worst = 0f64;
    for (k, &(step, e)) in s.eval_losses.iter().enumerate() {
        assert_eq!(step, k as u64 + 1);
        if let Some(&l) = s.losses.get(k + 1) {
            worst = worst.max((e - l).abs() / l);
        }
    }
    let (first, last) = (s.eval_losses[0].1, s.eval_losses[7].1);
    eprintln!(
        "eval vs next training loss: {worst:.1e} relative; eval loss {first:.4} -> {last:.4}"
    );
    assert!(worst <= 1e-5, "{worst:e}");
    assert!(last < 0.5 * first, "{first} -> {last}");
    // Logged as `eval_loss` lines after their step's line.
    let text = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 16);
    assert_eq!(lines[1]["step"], 1);
    assert_eq!(lines[1]["eval_loss"].as_f64(), Some(first));
    assert_eq!(lines[1]["eval_items"].as_f64(), Some(14.0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_of_a_vision_language_batch_is_its_training_loss() {
    // llava_tiny `align` (image prefix, prompt masked): the evaluation at the end of a run
    // stopped after 3 steps, over exactly the rows of step 4, equals step 4's training loss.
    let model = load("models/llava_tiny.vlm");
    let dir = PathBuf::from(COLOURS);
    let rows = std::fs::read_to_string(dir.join("train.jsonl")).expect("rows");
    let rows: Vec<&str> = rows.lines().collect();
    // Step 4 of 8-row batches over 96 rows: positions 24..32 of epoch 0's order.
    let order = train_data::order(rows.len(), 0, 0);
    let work = tmp("eval-vl");
    std::fs::create_dir_all(&work).expect("mkdir");
    let mut eval = String::new();
    for &i in &order[24..32] {
        let mut v: serde_json::Value = serde_json::from_str(rows[i]).expect("row");
        let img = std::fs::canonicalize(dir.join(v["image"].as_str().expect("image")))
            .expect("image path");
        v["image"] = serde_json::Value::String(img.display().to_string());
        eval.push_str(&format!("{v}\n"));
    }
    let eval_path = work.join("eval.jsonl");
    std::fs::write(&eval_path, eval).expect("eval data");
    let data = dir.join("train.jsonl");
    let run = |out: &Path, stop: Option<u64>, e: Option<&Path>| {
        let o = TrainOptions {
            model: &model,
            trainer: "align",
            data: &data,
            tokenizer: Some(dir.join("tokenizer.json")),
            weights: None,
            weights_dir: None,
            base_name: None,
            out,
            resume: None,
            steps: Some(6),
            stop_after: stop,
            eval_data: e,
            skip_finished: false,
            overwrite: false,
            restart_unfinished: false,
            backend: Default::default(),
            tensorboard: false,
        };
        train(&o, &mut |_| {}).expect("trains")
    };
    let stopped = run(&work.join("a"), Some(3), Some(&eval_path));
    let straight = run(&work.join("b"), None, None);
    assert_eq!(stopped.eval_losses.len(), 1);
    let (step, e) = stopped.eval_losses[0];
    assert_eq!(step, 3);
    let l = straight.losses[3];
    eprintln!("eval after step 3 {e:.6}, training loss of step 4 {l:.6}");
    assert!((e - l).abs() <= 1e-5 * l, "{e} vs {l}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn from_chains_list_the_stages_in_order_and_name_what_is_wrong() {
    use vlmc_runtime::train_stages::chain;
    let llava = load("models/llava_tiny.vlm");
    assert_eq!(
        chain(&llava, "instruct").expect("chain"),
        ["align", "instruct"]
    );
    assert_eq!(chain(&llava, "align").expect("chain"), ["align"]);
    let mut tiny = load("tests/fixtures/train/tiny_lm.vlm");
    assert_eq!(
        chain(&tiny, "loop_b").unwrap_err().message,
        "the `from` chain of trainer `loop_b` is a cycle: loop_b ← loop_a ← loop_b"
    );
    // The checker rejects a `from` naming no trainer; a model built otherwise gets this.
    let t = tiny
        .trainers
        .iter_mut()
        .find(|t| t.name == "loop_a")
        .expect("loop_a");
    for (k, v) in t.settings.iter_mut() {
        if k == "from" {
            *v = Setting::Symbol("gone".into());
        }
    }
    assert_eq!(
        chain(&tiny, "loop_a").unwrap_err().message,
        "trainer `loop_a` starts `from gone`, but model `TinyLm` has no trainer `gone` \
         (trainers: evaluated, diverge, loop_a, loop_b, logged, own_first, own_second, long_warmup)"
    );
    assert_eq!(
        chain(&tiny, "nope").unwrap_err().message,
        "model `TinyLm` has no trainer `nope` (trainers: evaluated, diverge, loop_a, loop_b, logged, own_first, own_second, long_warmup)"
    );
}
