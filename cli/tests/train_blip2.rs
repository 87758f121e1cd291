//! `vlmc train models/blip2_qformer.vlm --trainer pretrain_qformer` (BLIP-2 stage 1) at tiny
//! sizes on image-caption rows: the ITM negatives are drawn per step from the trainer's
//! uniform inputs, so a run stopped and resumed equals a straight one bit for bit, and only
//! the Q-Former side changes (the ViT is frozen).

mod common;

use common::{fresh, s, stderr, vlmc, weights};
use std::path::Path;

const SIZES: &[&str] = &[
    "image=32",
    "patch=8",
    "vision_dim=32",
    "vision_depth=2",
    "vision_heads=4",
    "vision_ffn=64",
    "qformer_vocab=11",
    "qformer_max_pos=16",
    "qformer_dim=32",
    "qformer_depth=2",
    "qformer_heads=4",
    "qformer_ffn=64",
    "queries=4",
    "embed=16",
    "dec_token=10",
    "max_len=8",
];

fn stage1(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut v = vec![
        "train",
        "models/blip2_qformer.vlm",
        "--trainer",
        "pretrain_qformer",
        "--data",
        "tests/fixtures/blip2_stage1/captions/train.jsonl",
        "--steps",
        "8",
        // the recipe warms up for 5000 steps: none in 8
        "--warmup-steps",
        "0",
        "--quiet",
        "-o",
        s(out),
    ];
    for kv in SIZES {
        v.extend_from_slice(&["--set", kv]);
    }
    v.extend_from_slice(extra);
    vlmc(&v)
}

fn losses(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("log.jsonl")).expect("log.jsonl");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v["loss"].as_f64().expect("loss")
        })
        .collect()
}

#[test]
fn blip2_stage1_resumes_exactly_and_trains_the_qformer_side_only() {
    let (a, b) = (fresh("blip2-stage1"), fresh("blip2-stage1-resumed"));
    let o = stage1(&a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = stage1(&b, &["--stop-after", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = stage1(&b, &["--resume", s(&b)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 8);
    assert!(la.iter().all(|l| l.is_finite() && *l > 0.0), "{la:?}");
    assert_eq!(la, lb, "resumed run's losses");
    let (wa, wb) = (
        weights(&a.join("model.safetensors")),
        weights(&b.join("model.safetensors")),
    );
    assert_eq!(wa, wb, "resumed run's weights");
    let start = weights(&a.join("checkpoint-8/model.safetensors"));
    assert_eq!(start, wa);
    // The ViT is frozen: its weights are the init rules' (those of a 0-step-trained copy).
    let init = fresh("blip2-stage1-init");
    let mut v = vec!["init", "models/blip2_qformer.vlm", "-o"];
    let file = init.join("init.safetensors");
    v.push(s(&file));
    for kv in SIZES {
        v.extend_from_slice(&["--set", kv]);
    }
    let o = vlmc(&v);
    assert!(o.status.success(), "{}", stderr(&o));
    let w0 = weights(&file);
    let (mut frozen, mut changed) = (0, 0);
    for (p, t) in &wa {
        if p.starts_with("vision_model.") {
            assert_eq!(t, &w0[p], "{p} changed");
            frozen += 1;
        } else if t != &w0[p] {
            changed += 1;
        }
    }
    eprintln!("stage 1: losses {la:?}; {frozen} ViT tensors unchanged, {changed} others changed");
    assert!(frozen > 10 && changed > 50, "{frozen} {changed}");
}

/// LXMERT's `pretrain` reads region features and `matched_label`, which caption rows do not
/// give: refused before anything is written, naming the inputs.
#[test]
fn a_model_whose_inputs_rows_cannot_give_is_refused() {
    let out = fresh("lxmert-pretrain");
    let mut v = vec![
        "train",
        "models/lxmert_pretraining.vlm",
        "--trainer",
        "pretrain",
        "--data",
        "tests/fixtures/blip2_stage1/captions/train.jsonl",
        "--steps",
        "2",
        "--quiet",
        "-o",
        s(&out),
    ];
    for kv in [
        "vocab=11",
        "dim=32",
        "heads=4",
        "ffn=64",
        "max_pos=16",
        "feat_dim=8",
    ] {
        v.extend_from_slice(&["--set", kv]);
    }
    let o = vlmc(&v);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "train.jsonl:1: the row does not give the model's input(s) `visual_feats`, \
             `visual_pos`, `matched_label`"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "nothing is written");
}
