//! Training runs end to end: resuming reproduces an uninterrupted run step for step; a LoRA
//! adapter saved in the PEFT layout loads back and merges into weights that give the same
//! outputs; llava_tiny learns the synthetic colour-naming task (held-out accuracy well above
//! chance); clip_tiny's contrastive loss falls on synthetic pairs.

mod common;
use common::load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc::train::TrainConfig;
use vlmc_runtime::train::Session;
use vlmc_runtime::train_data::{self, Position, Tok};
use vlmc_runtime::train_loop::{train, TrainOptions};
use vlmc_runtime::Tensor;

const COLOURS: &str = "tests/fixtures/train/colours";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn log_losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .expect("log")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["step"].as_u64().expect("step"),
                v["loss"].as_f64().expect("loss"),
            )
        })
        .collect()
}

#[test]
fn resuming_reproduces_the_uninterrupted_run() {
    let model = load("models/llava_tiny.vlm");
    let data = PathBuf::from(COLOURS).join("train.jsonl");
    let (a, b) = (tmp("straight"), tmp("resumed"));
    let opts = |out: &Path, stop: Option<u64>, resume: Option<PathBuf>| -> Vec<f64> {
        let o = TrainOptions {
            model: &model,
            trainer: "align",
            data: &data,
            tokenizer: None,
            weights: None,
            weights_dir: None,
            base_name: None,
            out,
            resume: resume.as_deref(),
            steps: Some(14),
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
    // 14 steps of 8 over 96 rows: the run crosses an epoch boundary (a new shuffle).
    let straight = opts(&a, None, None);
    let first = opts(&b, Some(6), None);
    let rest = opts(&b, None, Some(b.clone()));
    assert_eq!(first.len() + rest.len(), straight.len());
    let resumed: Vec<f64> = first.into_iter().chain(rest).collect();
    assert_eq!(resumed, straight, "losses differ after resuming");
    let logged = log_losses(&b);
    assert_eq!(logged.len(), 14);
    assert_eq!(logged.iter().map(|x| x.1).collect::<Vec<_>>(), straight);
    // Same final weights, bit for bit.
    let wa = vlmc_runtime::weights::WeightFile::open(&a.join("model.safetensors")).expect("a");
    let wb = vlmc_runtime::weights::WeightFile::open(&b.join("model.safetensors")).expect("b");
    for n in wa.names() {
        assert_eq!(wa.get(&n).expect("a"), wb.get(&n).expect("b"), "{n}");
    }
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn a_lora_adapter_round_trips_through_peft_and_merges() {
    let model = load("models/llava_tiny.vlm");
    let data = PathBuf::from(COLOURS).join("train.jsonl");
    let out = tmp("lora");
    let base = vlmc_runtime::init::init_params(&model.graph, 4).expect("init");
    let o = TrainOptions {
        model: &model,
        trainer: "instruct",
        data: &data,
        tokenizer: None,
        weights: Some(base.clone()),
        weights_dir: None,
        base_name: None,
        out: &out,
        resume: None,
        steps: Some(3),
        stop_after: None,
        eval_data: None,
        skip_finished: false,
        overwrite: false,
        restart_unfinished: false,
        backend: Default::default(),
        tensorboard: false,
    };
    train(&o, &mut |_| {}).expect("trains");
    let adir = out.join("adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adir.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let f = vlmc_runtime::weights::WeightFile::open(&adir.join("adapter_model.safetensors"))
        .expect("adapter");
    let names = f.names();
    assert_eq!(names.len(), 8);
    assert!(names.contains(
        &"base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"
            .to_string()
    ));
    // Loads back: the same tensors as the trained model's.
    let peft = vlmc_runtime::train_ckpt::load_peft(&adir).expect("loads");
    let trained =
        vlmc_runtime::weights::WeightFile::open(&out.join("model.safetensors")).expect("weights");
    for (p, t) in &peft.params {
        assert_eq!(&trained.get(p).expect("in model"), t, "{p}");
        if p.contains("lora_B") {
            assert!(t.to_f64().iter().any(|&x| x != 0.0), "{p} did not train");
        }
    }
    // Merged weights give the outputs of the adapted model.
    let merged = vlmc_runtime::train_ckpt::merge_lora(&model.graph, &base, &peft).expect("merge");
    assert_eq!(merged.len(), 4);
    let mut adapted = model.graph.clone();
    vlmc::passes::lora::apply(&mut adapted, &peft.targets, &peft.lora).expect("apply");
    let mut with_adapter = base.clone();
    with_adapter.extend(peft.params.clone());
    let mut merged_params = base.clone();
    merged_params.extend(merged);
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "pixels".to_string(),
        Tensor::f32(
            vec![2, 3, 32, 32],
            (0..6144).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect(),
        ),
    );
    inputs.insert(
        "ids".to_string(),
        Tensor::i32(vec![2, 4], vec![3, 4, 5, 6, 7, 8, 9, 10]),
    );
    let a = vlmc_runtime::run(&adapted, &inputs, &with_adapter).expect("adapted");
    let m = vlmc_runtime::run(&model.graph, &inputs, &merged_params).expect("merged");
    let b = vlmc_runtime::run(&model.graph, &inputs, &base).expect("base");
    let rel = |x: &Tensor, y: &Tensor| {
        let (p, q) = (x.to_f64(), y.to_f64());
        let s = q.iter().fold(1e-12f64, |a, v| a.max(v.abs()));
        p.iter()
            .zip(&q)
            .fold(0f64, |a, (u, v)| a.max((u - v).abs()))
            / s
    };
    let err = rel(&m["output"], &a["output"]);
    let moved = rel(&b["output"], &a["output"]);
    eprintln!("merged vs adapted: {err:.2e}; base vs adapted: {moved:.2e}");
    assert!(err <= 1e-5, "{err:e}");
    assert!(moved > 1e-4, "the adapter changed nothing ({moved:e})");
    let _ = std::fs::remove_dir_all(&out);
}

/// Held-out accuracy of naming the colour: the logits at the last prompt token, over the
/// six colour words.
fn colour_accuracy(
    model: &vlmc::elab::Elaborated,
    params: &BTreeMap<String, Tensor>,
    tok: &Tok,
    rows: &[train_data::Example],
    image: &vlmc::elab::Preprocess,
) -> f64 {
    let colours: Vec<i32> = ["red", "green", "blue", "yellow", "cyan", "magenta"]
        .iter()
        .map(|c| tok.encode(c, false).expect("word")[0])
        .collect();
    let mut right = 0;
    for chunk in rows.chunks(12) {
        // The prompt alone (every row's prompt is the same length here).
        let prompts: Vec<train_data::Example> = chunk
            .iter()
            .map(|e| {
                let p = e.mask.iter().take_while(|&&m| m == 0.0).count();
                train_data::Example {
                    ids: e.ids[..p].to_vec(),
                    mask: vec![0.0; p],
                    images: e.images.clone(),
                    line: e.line,
                    ..train_data::Example::default()
                }
            })
            .collect();
        let refs: Vec<&train_data::Example> = prompts.iter().collect();
        let batch = train_data::collate(&refs, tok.pad_id, Some(image)).expect("batch");
        let out = vlmc_runtime::run(&model.graph, &batch, params).expect("forward");
        let logits = &out["output"];
        let (l, v) = (logits.shape[1], logits.shape[2]);
        let x = logits.to_f64();
        for (r, e) in chunk.iter().enumerate() {
            let p = prompts[r].ids.len();
            let want = e.ids[p];
            let at = (r * l + l - 1) * v;
            let best = colours
                .iter()
                .copied()
                .max_by(|&a, &b| x[at + a as usize].total_cmp(&x[at + b as usize]))
                .expect("colours");
            right += usize::from(best == want);
        }
    }
    right as f64 / rows.len() as f64
}

#[test]
fn llava_tiny_learns_to_name_colours() {
    let model = load("models/llava_tiny.vlm");
    let mut cfg = TrainConfig::of(&model, "align").expect("trainer");
    // Full fine-tuning, constant learning rate.
    cfg.trainable = common::all_params(&model);
    cfg.optimizer.lr = 1e-3;
    cfg.optimizer.weight_decay = 0.0;
    cfg.schedule.warmup = 0;
    cfg.schedule.kind = vlmc::train::ScheduleKind::Constant;
    cfg.batch = 12;
    let dir = PathBuf::from(COLOURS);
    let tok = Tok::load(&dir.join("tokenizer.json")).expect("tokenizer");
    let train_rows =
        train_data::read_jsonl(&dir.join("train.jsonl"), &tok, true, None).expect("data");
    let held = train_data::read_jsonl(&dir.join("heldout.jsonl"), &tok, true, None).expect("data");
    let image = train_data::image_preprocess(&[], 32);
    let params = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let before = colour_accuracy(&model, &params, &tok, &held, &image);
    let steps = 60;
    let mut s = Session::new(&model, cfg, params, steps).expect("session");
    let mut pos = Position { epoch: 0, index: 0 };
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (idx, next) = train_data::next_batch(train_rows.len(), 12, 0, pos);
        pos = next;
        let rows: Vec<&train_data::Example> = idx.iter().map(|&i| &train_rows[i]).collect();
        let b = train_data::collate(&rows, tok.pad_id, Some(&image)).expect("batch");
        losses.push(s.step(&[b]).expect("step").loss);
    }
    let after = colour_accuracy(&model, &s.params, &tok, &held, &image);
    eprintln!(
        "loss {:.3} -> {:.3}; held-out accuracy {before:.3} -> {after:.3} (chance 0.167)",
        losses[0],
        losses[losses.len() - 1]
    );
    assert!(after >= 0.8, "held-out accuracy {after}");
}

#[test]
fn clip_tiny_contrastive_loss_falls() {
    let model = load("models/clip_tiny.vlm");
    let mut cfg = TrainConfig::of(&model, "contrastive").expect("trainer");
    cfg.schedule.warmup = 0;
    cfg.optimizer.lr = 1e-3;
    let params = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let steps = 40;
    let mut s = Session::new(&model, cfg, params, steps).expect("session");
    // Six colours: an image is a noisy square of the colour, its caption the colour's token
    // followed by end-of-text (the largest id, where CLIP pools).
    let rgb = [
        [0.9, -0.8, -0.8],
        [-0.8, 0.8, -0.7],
        [-0.8, -0.6, 0.9],
        [0.9, 0.8, -0.7],
        [-0.7, 0.8, 0.9],
        [0.8, -0.7, 0.8],
    ];
    let batch = |step: u64| {
        let n = 6;
        let mut px = Vec::with_capacity(n * 3 * 1024);
        let mut ids = Vec::new();
        for (k, c) in rgb.iter().enumerate() {
            let off = ((step as usize * 7 + k * 3) % 12) as i64;
            for ch in 0..3 {
                for y in 0..32i64 {
                    for x in 0..32i64 {
                        let inside = (off..off + 16).contains(&x) && (off..off + 16).contains(&y);
                        let noise = vlmc_runtime::rng::uniform01(
                            step * 31 + k as u64,
                            (ch * 1024 + y * 32 + x) as u64,
                        );
                        px.push(
                            if inside { c[ch as usize] as f32 } else { -0.7 } + 0.1 * noise as f32,
                        );
                    }
                }
            }
            ids.extend([10 + k as i32, 511]);
        }
        let mut m = BTreeMap::new();
        m.insert("pixels".to_string(), Tensor::f32(vec![n, 3, 32, 32], px));
        m.insert("ids".to_string(), Tensor::i32(vec![n, 2], ids));
        m
    };
    let mut losses = Vec::new();
    for step in 0..steps {
        losses.push(s.step(&[batch(step)]).expect("step").loss);
    }
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!(
        "clip_tiny contrastive loss: first 5 steps {first:.3}, last 5 {last:.3} (ln 6 = 1.792)"
    );
    assert!(last < 0.5 * first, "{first} -> {last}");
    let scale = s.params["logit_scale"].to_f64()[0];
    assert!((0.0..=100f64.ln()).contains(&scale));
}
