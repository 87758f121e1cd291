//! Training steps: the step graph (forward, loss, backward, optimiser update in one graph)
//! against independent computations: the optimiser update against a direct implementation
//! of PyTorch's AdamW / SGD, gradient accumulation against one large batch (TRL's
//! normalisation by the target tokens of the whole accumulated batch), freezing and LoRA.

mod common;
use common::load;

use std::collections::BTreeMap;
use vlmc::train::{self, StepKind, TrainConfig};
use vlmc_runtime::rng::uniform01;
use vlmc_runtime::train::Session;
use vlmc_runtime::Tensor;

fn values(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f32> {
    (0..n)
        .map(|i| (lo + (hi - lo) * uniform01(seed, i as u64)) as f32)
        .collect()
}

/// A llava_tiny batch: random pixels, ids, and a mask with a 2-token prompt and padding.
fn llava_batch(b: usize, t: usize, seed: u64) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert(
        "pixels".into(),
        Tensor::f32(vec![b, 3, 32, 32], values(b * 3 * 1024, seed, -1.0, 1.0)),
    );
    let ids: Vec<i32> = (0..b * t)
        .map(|i| ((i as u64 * 131 + seed * 17) % 512) as i32)
        .collect();
    m.insert("ids".into(), Tensor::i32(vec![b, t], ids));
    let mask: Vec<f32> = (0..b * t)
        .map(|i| {
            let (r, c) = (i / t, i % t);
            // row r has t - r real tokens (right padding), the first 2 are the prompt
            f32::from(u8::from(c >= 2 && c < t - r % 2))
        })
        .collect();
    m.insert("loss_mask".into(), Tensor::f32(vec![b, t], mask));
    m
}

fn split_rows(batch: &BTreeMap<String, Tensor>, lo: usize, hi: usize) -> BTreeMap<String, Tensor> {
    batch
        .iter()
        .map(|(k, t)| {
            let row: usize = t.shape[1..].iter().product();
            let mut shape = t.shape.clone();
            shape[0] = hi - lo;
            let part = match &t.data {
                vlmc_runtime::Data::F32(v) => Tensor::f32(shape, v[lo * row..hi * row].to_vec()),
                vlmc_runtime::Data::I32(v) => Tensor::i32(shape, v[lo * row..hi * row].to_vec()),
                _ => panic!("unexpected dtype"),
            };
            (k.clone(), part)
        })
        .collect()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (x, y) = (a.to_f64(), b.to_f64());
    let scale = y.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    x.iter()
        .zip(&y)
        .fold(0f64, |m, (p, q)| m.max((p - q).abs()))
        / scale
}

#[test]
fn llava_stage1_trains_only_the_projector() {
    let model = load("models/llava_tiny.vlm");
    let mut cfg = TrainConfig::of(&model, "align").expect("trainer");
    cfg.schedule.warmup = 0;
    cfg.schedule.warmup_ratio = 0.0;
    let step = train::build(&model, &cfg, StepKind::Fused).expect("step graph");
    vlmc::ir::verify(&step.graph).expect("verifies");
    assert!(step
        .trainable
        .iter()
        .all(|p| p.starts_with("multi_modal_projector.")));
    assert_eq!(step.trainable.len(), 4);
    let params = vlmc_runtime::init::init_params(&model.graph, 1).expect("init");
    let mut s = Session::new(&model, cfg, params.clone(), 10).expect("session");
    let stats = s.step(&[llava_batch(2, 6, 1)]).expect("step");
    eprintln!("{stats:?}");
    assert!(stats.loss.is_finite() && stats.loss > 5.0, "{stats:?}");
    for (p, t) in &s.params {
        let changed = t != &params[p];
        assert_eq!(changed, p.starts_with("multi_modal_projector."), "{p}");
    }
}

#[test]
fn accumulated_micro_batches_equal_one_batch() {
    // Two micro-batches normalised by the target tokens of both (TRL) give the same step as
    // the whole batch at once.
    let model = load("models/llava_tiny.vlm");
    let mut cfg = TrainConfig::of(&model, "align").expect("trainer");
    cfg.clip_grad = Some(0.5);
    let params = vlmc_runtime::init::init_params(&model.graph, 2).expect("init");
    let batch = llava_batch(4, 5, 3);
    let mut one = Session::new(&model, cfg.clone(), params.clone(), 10).expect("session");
    let a = one.step(std::slice::from_ref(&batch)).expect("step");
    cfg.grad_accum = 2;
    let mut two = Session::new(&model, cfg, params, 10).expect("session");
    assert!(two.fused.is_none() && two.grad.is_some());
    let b = two
        .step(&[split_rows(&batch, 0, 1), split_rows(&batch, 1, 4)])
        .expect("step");
    eprintln!("one batch {a:?}\ntwo micro-batches {b:?}");
    assert!((a.loss - b.loss).abs() <= 1e-5 * a.loss.abs());
    assert!((a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm);
    for p in &one.trainable {
        let err = max_rel(&one.params[p], &two.params[p]);
        assert!(err <= 1e-5, "{p}: {err:e}");
    }
}

/// PyTorch's AdamW (torch.optim.AdamW, single tensor, not capturable), written directly.
#[allow(clippy::too_many_arguments)]
fn adamw_ref(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    (b1, b2): (f64, f64),
    eps: f64,
    wd: f64,
    step: i32,
) {
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] += (g[i] - m[i]) * (1.0 - b1);
        v[i] = v[i] * b2 + (1.0 - b2) * g[i] * g[i];
        let bc1 = 1.0 - b1.powi(step);
        let bc2 = 1.0 - b2.powi(step);
        let denom = v[i].sqrt() / bc2.sqrt() + eps;
        p[i] -= lr / bc1 * m[i] / denom;
    }
}

#[test]
fn adamw_in_the_step_graph_matches_a_direct_implementation() {
    let model = load("models/clip_tiny.vlm");
    let mut cfg = TrainConfig::of(&model, "contrastive").expect("trainer");
    cfg.optimizer.lr = 1e-2;
    // An eps above the f32 rounding noise of gradients that are zero in exact arithmetic
    // (attention key biases), whose Adam update lr·g/(|g| + eps) would otherwise be decided
    // by that noise, which differs between two graphs computing the same gradient.
    cfg.optimizer.eps = 1e-4;
    cfg.schedule.warmup = 0;
    let params = vlmc_runtime::init::init_params(&model.graph, 5).expect("init");
    // Gradients from the Grad graph, then three AdamW steps by hand.
    let grad = train::build(&model, &cfg, StepKind::Grad).expect("grad graph");
    // The optimiser is what is checked here: the session computes its gradients as the
    // reference does, on the interpreter (compiled == interpreted is tested below).
    let mut s = Session::with_backend(
        &model,
        cfg.clone(),
        params.clone(),
        3,
        &vlmc_runtime::train::Backend::Interp,
    )
    .expect("session");
    let o = &cfg.optimizer;
    let mut p_ref: BTreeMap<String, Vec<f64>> = params
        .iter()
        .map(|(k, t)| (k.clone(), t.to_f64()))
        .collect();
    let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut v: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for step in 1..=3 {
        let b = 4;
        let mut batch = BTreeMap::new();
        batch.insert(
            "pixels".to_string(),
            Tensor::f32(vec![b, 3, 32, 32], values(b * 3 * 1024, step, -1.0, 1.0)),
        );
        let ids: Vec<i32> = (0..b * 5)
            .map(|i| ((i as u64 * 37 + step * 11) % 511) as i32)
            .collect();
        batch.insert("ids".to_string(), Tensor::i32(vec![b, 5], ids));
        // Gradients at the reference parameters (f32 values, as the session holds them).
        let cur: BTreeMap<String, Tensor> = p_ref
            .iter()
            .map(|(k, x)| {
                let shape = params[k].shape.clone();
                (
                    k.clone(),
                    Tensor::f32(shape, x.iter().map(|&y| y as f32).collect()),
                )
            })
            .collect();
        let mut inputs = batch.clone();
        inputs.insert("loss_scale".into(), Tensor::f32(vec![], vec![1.0]));
        let out = vlmc_runtime::run(&grad.graph, &inputs, &cur).expect("grad step");
        let lr = cfg.schedule.lr_at(o.lr, step - 1, 3);
        for p in &s.trainable {
            let g = out[&format!("grad.{p}")].to_f64();
            let n = g.len();
            let pm = m.entry(p.clone()).or_insert_with(|| vec![0.0; n]);
            let pv = v.entry(p.clone()).or_insert_with(|| vec![0.0; n]);
            let x = p_ref.get_mut(p).expect("param");
            adamw_ref(
                x,
                &g,
                pm,
                pv,
                lr,
                (o.beta1, o.beta2),
                o.eps,
                o.weight_decay,
                step as i32,
            );
            if p == "logit_scale" {
                x[0] = x[0].clamp(0.0, 100f64.ln());
            }
            // Round to f32 as the session stores parameters.
            x.iter_mut().for_each(|y| *y = f64::from(*y as f32));
        }
        let stats = s.step(&[batch]).expect("step");
        eprintln!("step {step}: {stats:?}");
    }
    let mut worst = 0f64;
    for p in &s.trainable {
        let want = Tensor::f64(params[p].shape.clone(), p_ref[p].clone());
        // Relative to the size of the change, the stricter measure.
        let delta: Vec<f64> = want
            .to_f64()
            .iter()
            .zip(params[p].to_f64())
            .map(|(a, b)| a - b)
            .collect();
        let scale = delta.iter().fold(1e-12f64, |a, x| a.max(x.abs()));
        let diff = s.params[p]
            .to_f64()
            .iter()
            .zip(want.to_f64())
            .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
        worst = worst.max(diff / scale);
    }
    eprintln!("AdamW in the graph vs direct: max error relative to the update {worst:.2e}");
    assert!(worst <= 1e-3, "{worst:e}");
}

#[test]
fn lora_trainer_trains_only_the_adapter() {
    let model = load("models/llava_tiny.vlm");
    let cfg = TrainConfig::of(&model, "instruct").expect("trainer");
    let params = vlmc_runtime::init::init_params(&model.graph, 1).expect("init");
    let mut s = Session::new(&model, cfg, params.clone(), 10).expect("session");
    assert_eq!(s.trainable.len(), 8, "{:?}", s.trainable);
    assert!(s.trainable.iter().all(|p| p.contains(".lora_")));
    let b = llava_batch(2, 4, 9);
    let first = s.step(std::slice::from_ref(&b)).expect("step");
    let second = s.step(&[b]).expect("step");
    eprintln!("{first:?} {second:?}");
    for (p, t) in &params {
        assert_eq!(&s.params[p], t, "base parameter {p} changed");
    }
    // B starts at zero and moves; A moves after B is non-zero.
    let bw = "language_model.model.layers.0.self_attn.q_proj.lora_B.weight";
    assert!(s.params[bw].to_f64().iter().any(|&x| x != 0.0));
}

/// The PyTorch reference of tests/fixtures/train/sft (make.py: transformers' LlamaForCausalLM
/// in float64, TRL's SFT loss, torch.optim.AdamW, clip_grad_norm_).
#[test]
fn sft_step_matches_pytorch() {
    let dir = std::path::Path::new("tests/fixtures/train/sft");
    let model = load(dir.join("fixture.vlm").to_str().expect("path"));
    let cfg = TrainConfig::of(&model, "sft").expect("trainer");
    let r = vlmc_runtime::weights::WeightFile::open(&dir.join("reference.safetensors"))
        .expect("reference");
    let get = |n: &str| r.get(n).unwrap_or_else(|e| panic!("{e}"));
    let params: BTreeMap<String, Tensor> = r
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("params.").map(|p| (p.to_string(), get(&n))))
        .collect();
    assert_eq!(params.len(), model.graph.params().len());
    let batch = |k: usize| {
        let mut m = BTreeMap::new();
        m.insert("ids".to_string(), get(&format!("batch{k}.ids")));
        m.insert("loss_mask".to_string(), get(&format!("batch{k}.loss_mask")));
        m
    };
    // Gradients of the first step.
    let grad = train::build(&model, &cfg, StepKind::Grad).expect("grad graph");
    let mut inputs = batch(0);
    let mask = &inputs["loss_mask"];
    let t = mask.shape[1];
    let targets: f64 = mask
        .to_f64()
        .iter()
        .enumerate()
        .filter(|(i, _)| i % t != 0)
        .map(|(_, v)| v)
        .sum();
    inputs.insert(
        "loss_scale".into(),
        Tensor::f32(vec![], vec![(1.0 / targets) as f32]),
    );
    let out = vlmc_runtime::run(&grad.graph, &inputs, &params).expect("grad step");
    let loss0 = out["loss"].to_f64()[0];
    let want0 = get("loss0").to_f64()[0];
    assert!((loss0 - want0).abs() <= 1e-5 * want0, "{loss0} vs {want0}");
    let mut worst_grad = (0f64, String::new());
    for p in params.keys() {
        let e = max_rel(&out[&format!("grad.{p}")], &get(&format!("grad.{p}")));
        if e > worst_grad.0 {
            worst_grad = (e, p.clone());
        }
    }
    // Three AdamW steps (with clipping at 1.0) through the fused step graph.
    let mut s = Session::new(&model, cfg, params.clone(), 3).expect("session");
    let mut losses = Vec::new();
    for k in 0..3 {
        losses.push(s.step(&[batch(k)]).expect("step").loss);
    }
    let mut worst_w = (0f64, String::new());
    let mut worst_update = 0f64;
    for (p, before) in &params {
        let want = get(&format!("after.{p}"));
        let e = max_rel(&s.params[p], &want);
        if e > worst_w.0 {
            worst_w = (e, p.clone());
        }
        // The error relative to the size of the update itself.
        let upd: Vec<f64> = want
            .to_f64()
            .iter()
            .zip(before.to_f64())
            .map(|(a, b)| a - b)
            .collect();
        let scale = upd.iter().fold(1e-30f64, |a, x| a.max(x.abs()));
        let diff = s.params[p]
            .to_f64()
            .iter()
            .zip(want.to_f64())
            .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
        worst_update = worst_update.max(diff / scale);
    }
    let want_losses: Vec<f64> = (0..3)
        .map(|k| get(&format!("loss{k}")).to_f64()[0])
        .collect();
    eprintln!(
        "SFT vs PyTorch: loss {loss0:.7} vs {want0:.7}; gradients max rel err {:.2e} ({}); \
         weights after 3 AdamW steps max rel err {:.2e} ({}), {worst_update:.2e} of the update; \
         losses {losses:?} vs {want_losses:?}",
        worst_grad.0, worst_grad.1, worst_w.0, worst_w.1
    );
    assert!(worst_grad.0 <= 1e-4, "gradients: {worst_grad:?}");
    assert!(worst_w.0 <= 1e-4, "weights: {worst_w:?}");
    for (a, b) in losses.iter().zip(&want_losses) {
        assert!((a - b).abs() <= 1e-5 * b, "{a} vs {b}");
    }
}

/// The fused step graph lowered to kernels (fusion, memory plan, kernel IR) and run by the
/// plan executor computes what the interpreter computes: new weights, optimiser state, loss.
#[test]
fn the_lowered_training_step_equals_the_interpreted_one() {
    let dir = std::path::Path::new("tests/fixtures/train/sft");
    let model = load(dir.join("fixture.vlm").to_str().expect("path"));
    let cfg = TrainConfig::of(&model, "sft").expect("trainer");
    let step = train::build(&model, &cfg, StepKind::Fused).expect("step graph");
    let r = vlmc_runtime::weights::WeightFile::open(&dir.join("reference.safetensors"))
        .expect("reference");
    let get = |n: &str| r.get(n).unwrap_or_else(|e| panic!("{e}"));
    let params: BTreeMap<String, Tensor> = r
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("params.").map(|p| (p.to_string(), get(&n))))
        .collect();
    let mut inputs = BTreeMap::new();
    inputs.insert("ids".to_string(), get("batch1.ids"));
    inputs.insert("loss_mask".to_string(), get("batch1.loss_mask"));
    let scalar = |v: f32| Tensor::f32(vec![], vec![v]);
    inputs.insert("loss_scale".into(), scalar(0.125));
    inputs.insert("lr".into(), scalar(1e-3));
    inputs.insert("step".into(), scalar(2.0));
    for p in &step.trainable {
        let t = &params[p];
        let n = t.numel();
        inputs.insert(
            format!("optim.m.{p}"),
            Tensor::f32(t.shape.clone(), values(n, 1, -1e-3, 1e-3)),
        );
        inputs.insert(
            format!("optim.v.{p}"),
            Tensor::f32(t.shape.clone(), values(n, 2, 0.0, 1e-5)),
        );
    }
    let want = vlmc_runtime::run(&step.graph, &inputs, &params).expect("interpreter");
    let dims = vlmc_runtime::interp::bind_dims(&step.graph, &inputs).expect("dims");
    let fusion = vlmc::passes::fusion::plan(&step.graph);
    let mem = vlmc::passes::memory::plan(&step.graph, &fusion, &dims);
    let plan = vlmc::kernel::lower(&step.graph, &fusion, &mem, &dims).expect("lowers");
    let lt = vlmc_runtime::plan::load_time_values(&plan, &step.graph, &params).expect("load");
    let got = vlmc_runtime::plan::execute(&plan, &inputs, &params, &lt).expect("plan runs");
    let mut worst = 0f64;
    let mut bad = Vec::new();
    for (name, w) in &want {
        let e = max_rel(&got[name], w);
        if e > 1e-5 {
            bad.push(format!("{name}: {e:e} (got {} want {})", got[name], w));
        }
        worst = worst.max(e);
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    eprintln!(
        "training step: {} ops, {} kernels; lowered vs interpreted: {} outputs, max rel err {worst:.2e}",
        step.graph.len(),
        plan.kernels.len(),
        want.len()
    );
}

/// Three optimiser steps compiled for the CPU (fusion, memory plan, Cranelift kernels, `gemm`)
/// against the same steps on the interpreter: llava_tiny full fine-tuning and LoRA (fused step),
/// with gradient accumulation (gradient and update graphs), and clip_tiny's contrastive step.
#[test]
fn the_compiled_training_step_equals_the_interpreted_one_on_the_cpu() {
    use vlmc_runtime::train::Backend;
    let llava = load("models/llava_tiny.vlm");
    let clip = load("models/clip_tiny.vlm");
    let clip_batch = |seed: u64| {
        let mut m = BTreeMap::new();
        m.insert(
            "pixels".to_string(),
            Tensor::f32(vec![4, 3, 32, 32], values(4 * 3 * 1024, seed, -1.0, 1.0)),
        );
        let ids: Vec<i32> = (0..4 * 8)
            .map(|i| ((i as u64 * 37 + seed * 5) % 100 + 1) as i32)
            .collect();
        m.insert("ids".to_string(), Tensor::i32(vec![4, 8], ids));
        m
    };
    type Case<'a> = (&'a vlmc::elab::Elaborated, &'a str, usize, bool);
    let cases: [Case; 4] = [
        (&llava, "align", 1, false),
        (&llava, "instruct", 1, false),
        (&llava, "align", 2, true),
        (&clip, "contrastive", 1, false),
    ];
    for (model, trainer, accum, full) in cases {
        let mut cfg = TrainConfig::of(model, trainer).expect("trainer");
        // The declared warm-up at full length (10 / 20 steps): the first steps are small, so
        // Adam's update of a bias with no gradient in exact arithmetic (rounding noise on
        // both sides, normalised to about ±lr) stays below the bound.
        cfg.schedule.warmup =
            cfg.schedule
                .warmup_steps(if trainer == "contrastive" { 500 } else { 200 });
        cfg.grad_accum = accum;
        cfg.clip_grad = Some(1.0);
        if full {
            cfg.trainable = common::all_params(model);
        }
        let params = vlmc_runtime::init::init_params(&model.graph, 5).expect("init");
        let mut cpu =
            Session::with_backend(model, cfg.clone(), params.clone(), 10, &Backend::default())
                .expect("compiled session");
        let mut int = Session::with_backend(model, cfg, params, 10, &Backend::Interp)
            .expect("interpreted session");
        let mut worst = 0f64;
        for k in 0..3u64 {
            let micro: Vec<BTreeMap<String, Tensor>> = (0..accum as u64)
                .map(|j| {
                    if model.model.contains("Clip") {
                        clip_batch(10 * k + j)
                    } else {
                        llava_batch(2, 6, 10 * k + j)
                    }
                })
                .collect();
            let a = cpu.step(&micro).expect("compiled step");
            let b = int.step(&micro).expect("interpreted step");
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * b.loss.abs(),
                "{trainer}: loss {} vs {}",
                a.loss,
                b.loss
            );
            assert!((a.grad_norm - b.grad_norm).abs() <= 1e-4 * b.grad_norm);
        }
        for p in &int.trainable {
            let err = max_rel(&cpu.params[p], &int.params[p]);
            assert!(err <= 1e-4, "{trainer}: {p}: {err:e}");
            worst = worst.max(err);
        }
        // Optimiser state relative to the largest tensor of its slot: a key projection's bias
        // has a zero gradient in exact arithmetic (softmax ignores it), so its moments are
        // rounding noise of both sides.
        let slot_max = |slot: &str| {
            int.state
                .iter()
                .filter(|(k, _)| k.starts_with(slot))
                .flat_map(|(_, t)| t.to_f64())
                .fold(1e-30f64, |m, v| m.max(v.abs()))
        };
        for (k, t) in &int.state {
            let slot = &k[..k[7..].find('.').map_or(k.len(), |i| i + 7)];
            let diff = cpu.state[k]
                .to_f64()
                .iter()
                .zip(t.to_f64())
                .fold(0f64, |m, (p, q)| m.max((p - q).abs()));
            let err = diff / slot_max(slot);
            assert!(err <= 1e-4, "{trainer}: {k}: {err:e}");
        }
        eprintln!(
            "{} {trainer} (accumulation {accum}): {} trainable tensors after 3 steps, max rel err {worst:.2e}",
            model.model,
            int.trainable.len()
        );
    }
}
