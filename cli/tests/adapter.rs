//! LoRA adapters at run time: `vlmc run --adapter` on a PEFT adapter (tests/fixtures/peft,
//! written by PEFT 0.21 with `modules_to_save`) against PEFT's outputs and against `vlmc
//! merge` + `vlmc run`; training outputs that hold an unmerged adapter; the base record that
//! refuses another base; adapter-only checkpoints, `save_total_limit` and resuming them.

mod common;

use common::{s, stderr, text_data, tmp, vlmc, weights, TOKENIZER};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc_runtime::Tensor;

const FIXTURE: &str = "tests/fixtures/peft";

fn fixture(f: &str) -> String {
    format!("{FIXTURE}/{f}")
}

/// The largest |a − b| over the largest |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (a, b) = (a.to_f64(), b.to_f64());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    d / b.iter().map(|y| y.abs()).fold(0.0, f64::max)
}

/// `vlmc run fixture.vlm --weights W [extra] --input ids=io.safetensors`: the logits.
fn run(dir: &Path, name: &str, weights: &str, extra: &[&str]) -> Result<Tensor, String> {
    let out = dir.join(format!("out-{name}.safetensors"));
    let ids = fixture("io.safetensors");
    let mut args = vec![
        "run",
        "tests/fixtures/peft/fixture.vlm",
        "--weights",
        weights,
        "--input",
    ];
    let input = format!("ids={ids}");
    args.push(&input);
    args.extend_from_slice(extra);
    args.extend(["-o", s(&out)]);
    let o = vlmc(&args);
    if !o.status.success() {
        return Err(stderr(&o));
    }
    Ok(weights_of(&out).remove("output").expect("output"))
}

fn weights_of(p: &Path) -> BTreeMap<String, Tensor> {
    weights(p)
}

#[test]
fn a_peft_adapter_runs_unmerged_as_peft_computes_it_and_as_merged() {
    let work = tmp("peft");
    let io = weights_of(Path::new(&format!(
        "{}/{}",
        common::ROOT,
        fixture("io.safetensors")
    )));
    let (expect, base_expect) = (&io["expect.logits"], &io["base.logits"]);
    let base = fixture("base.safetensors");
    let adapter = fixture("adapter");
    let plain = run(&work, "base", &base, &[]).expect("base runs");
    let adapted = run(&work, "adapted", &base, &["--adapter", &adapter]).expect("adapter runs");
    // The base alone is transformers' base model; with the adapter, PEFT's adapted model
    // (LoRA on q and v, and the head from `modules_to_save`).
    let e_base = rel(&plain, base_expect);
    let e = rel(&adapted, expect);
    assert!(e_base <= 1e-4, "base vs transformers: {e_base:e}");
    assert!(e <= 1e-4, "--adapter vs PEFT: {e:e}");
    let moved = rel(&adapted, &plain);
    assert!(moved > 0.1, "the adapter changes little: {moved}");

    // Merged, then run: the same outputs.
    let merged = work.join("merged.safetensors");
    let o = vlmc(&[
        "merge",
        "tests/fixtures/peft/fixture.vlm",
        "--adapter",
        &adapter,
        "--weights",
        &base,
        "-o",
        s(&merged),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("merged 4 LoRA targets (rank 4, scale 2) and 1 saved module tensor(s)"),
        "{err}"
    );
    // The head is the adapter's copy, bit for bit.
    let saved = weights_of(Path::new(&format!(
        "{}/{}",
        common::ROOT,
        fixture("adapter/adapter_model.safetensors")
    )));
    let head = "language_model.lm_head.weight";
    assert_eq!(
        weights_of(&merged)[head].to_f64(),
        saved[&format!("base_model.model.{head}")].to_f64()
    );
    let after = run(&work, "merged", s(&merged), &[]).expect("merged runs");
    let em = rel(&after, &adapted);
    assert!(em <= 1e-5, "merged vs unmerged: {em:e}");
    assert!(rel(&after, expect) <= 1e-4);
    eprintln!("--adapter vs PEFT {e:.2e}, merged vs --adapter {em:.2e}, base {e_base:.2e}");

    // `vlmc generate --adapter` (prefill and decoding step both adapted): the greedy text of
    // the merged weights, not the base's.
    let generate = |w: &[&str]| {
        let mut args = vec!["generate", "tests/fixtures/peft/fixture.vlm"];
        args.extend_from_slice(w);
        args.extend([
            "--tokenizer",
            TOKENIZER,
            "--prompt",
            "red green",
            "--max-new-tokens",
            "12",
        ]);
        let o = vlmc(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let g_adapter = generate(&["--weights", &base, "--adapter", &adapter]);
    let g_merged = generate(&["--weights", s(&merged)]);
    let g_base = generate(&["--weights", &base]);
    assert_eq!(g_adapter, g_merged);
    assert_ne!(g_adapter, g_base);

    // The same adapter as PEFT names it on a bare LlamaForCausalLM (`base_model.model.model.
    // layers...`, `modules_to_save: ["lm_head"]`), for a spec whose `checkpoint` rules map
    // transformers' names: the adapter's modules are mapped by those rules too.
    let hf = work.join("hf");
    std::fs::create_dir_all(hf.join("adapter")).expect("mkdir");
    let bare = |m: BTreeMap<String, Tensor>, prefix: &str| -> BTreeMap<String, Tensor> {
        m.into_iter()
            .map(|(k, v)| {
                (
                    k.replacen(&format!("{prefix}language_model."), prefix, 1),
                    v,
                )
            })
            .collect()
    };
    let root = |f: &str| PathBuf::from(common::ROOT).join(f);
    vlmc_runtime::weights::save(
        &hf.join("base.safetensors"),
        &bare(weights_of(&root(&base)), ""),
    )
    .expect("save");
    vlmc_runtime::weights::save(
        &hf.join("adapter/adapter_model.safetensors"),
        &bare(saved, "base_model.model."),
    )
    .expect("save");
    let cfg = std::fs::read_to_string(root(&fixture("adapter/adapter_config.json")))
        .expect("config")
        .replace("\"language_model.lm_head\"", "\"lm_head\"");
    std::fs::write(hf.join("adapter/adapter_config.json"), cfg).expect("write");
    let spec = std::fs::read_to_string(root(&fixture("fixture.vlm")))
        .expect("spec")
        .replace(
            "  fn forward",
            "  checkpoint {\n    \"\" => \"language_model.\",\n  }\n  fn forward",
        );
    let spec_path = hf.join("hf.vlm");
    std::fs::write(&spec_path, spec).expect("write");
    let out = hf.join("out.safetensors");
    let o = vlmc(&[
        "run",
        s(&spec_path),
        "--weights",
        s(&hf.join("base.safetensors")),
        "--adapter",
        s(&hf.join("adapter")),
        "--input",
        &format!("ids={}", fixture("io.safetensors")),
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eh = rel(&weights_of(&out)["output"], expect);
    assert!(eh <= 1e-4, "transformers' names: {eh:e}");
    // The adapter under the spec's own paths (as vlmc writes it) is not renamed by the rule
    // (`language_model.model...` is a parameter path, not `language_model.language_model...`).
    let out2 = hf.join("out2.safetensors");
    let o = vlmc(&[
        "run",
        s(&spec_path),
        "--weights",
        s(&hf.join("base.safetensors")),
        "--adapter",
        &adapter,
        "--input",
        &format!("ids={}", fixture("io.safetensors")),
        "-o",
        s(&out2),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        weights_of(&out2)["output"].to_f64(),
        weights_of(&out)["output"].to_f64()
    );

    // Bad adapters: a tensor that `modules_to_save` does not name, a saved module of the
    // wrong shape; and an output that is the adapter's own file.
    let bad = work.join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    let cfg_text =
        std::fs::read_to_string(root(&fixture("adapter/adapter_config.json"))).expect("config");
    let mut held = weights_of(&root(&fixture("adapter/adapter_model.safetensors")));
    let refused = |cfg: &str, tensors: &BTreeMap<String, Tensor>, want: &str| {
        std::fs::write(bad.join("adapter_config.json"), cfg).expect("write");
        vlmc_runtime::weights::save(&bad.join("adapter_model.safetensors"), tensors).expect("save");
        let err = run(&work, "bad", &base, &["--adapter", s(&bad)]).expect_err("refused");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
    };
    let unsaved = cfg_text.replace("\"language_model.lm_head\"", "\"language_model.norm\"");
    refused(
        &unsaved,
        &held,
        "tensor `base_model.model.language_model.lm_head.weight` is neither a LoRA weight",
    );
    let key = format!("base_model.model.{head}");
    held.insert(key, Tensor::f32(vec![32, 15], vec![0.5; 480]));
    refused(
        &cfg_text,
        &held,
        "the adapter saves `language_model.lm_head.weight` as [32, 15], but the model's \
         parameter is f32[15, 32]",
    );
    let o = vlmc(&[
        "run",
        "tests/fixtures/peft/fixture.vlm",
        "--weights",
        &base,
        "--adapter",
        &adapter,
        "--input",
        &format!("ids={}", fixture("io.safetensors")),
        "-o",
        &fixture("adapter/adapter_model.safetensors"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("the adapter's weights"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// `vlmc train fixture.vlm --trainer lora --weights base.safetensors` into `out`, then `extra`.
fn train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let base = fixture("base.safetensors");
    let mut args = vec![
        "train",
        "tests/fixtures/peft/fixture.vlm",
        "--trainer",
        "lora",
        "--weights",
        &base,
        "--data",
        s(data),
        "--tokenizer",
        TOKENIZER,
        "--quiet",
        "-o",
        s(out),
    ];
    args.extend_from_slice(extra);
    vlmc(&args)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn bytes(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn an_adapter_trainer_writes_adapter_checkpoints_and_its_output_runs_only_with_the_adapter() {
    let work = tmp("train");
    let data = text_data(&work);
    // Straight through (6 steps, `save_every 2`, `save_total_limit 2`).
    let a = work.join("a");
    let o = train(&data, &a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        listing(&a),
        [
            "adapter",
            "checkpoint-4",
            "checkpoint-6",
            "log.jsonl",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    // A checkpoint holds the adapter (PEFT layout: LoRA pairs and the head) and its optimiser
    // state, not the base.
    let ck = a.join("checkpoint-6");
    assert_eq!(
        listing(&ck),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
            "vlmc_base.json"
        ]
    );
    let held = weights_of(&ck.join("adapter_model.safetensors"));
    let mut want: Vec<String> = (0..2)
        .flat_map(|l| {
            ["q_proj", "v_proj"].into_iter().flat_map(move |m| {
                ["A", "B"].into_iter().map(move |x| {
                    format!(
                        "base_model.model.language_model.model.layers.{l}.self_attn.{m}.lora_{x}.weight"
                    )
                })
            })
        })
        .collect();
    want.push("base_model.model.language_model.lm_head.weight".into());
    want.sort();
    assert_eq!(held.keys().cloned().collect::<Vec<_>>(), want);
    assert_eq!(weights_of(&ck.join("optimizer.safetensors")).len(), 18);
    let cfg: serde_json::Value =
        serde_json::from_slice(&bytes(a.join("adapter/adapter_config.json"))).expect("json");
    assert_eq!(cfg["task_type"], serde_json::json!("CAUSAL_LM"));
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["language_model.lm_head"])
    );
    assert_eq!(
        cfg["base_model_name_or_path"],
        serde_json::json!(fixture("base.safetensors"))
    );
    // The final adapter is the last checkpoint's.
    assert_eq!(
        bytes(a.join("adapter/adapter_model.safetensors")),
        bytes(ck.join("adapter_model.safetensors"))
    );

    // Stopped after 3 steps, then resumed: the same run bit for bit.
    let b = work.join("b");
    let o = train(&data, &b, &["--stop-after", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        listing(&b),
        [
            "adapter",
            "checkpoint-2",
            "checkpoint-3",
            "log.jsonl",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    let o = train(&data, &b, &["--resume", s(&b)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(listing(&b), listing(&a));
    for f in [
        "model.safetensors",
        "adapter/adapter_model.safetensors",
        "checkpoint-6/adapter_model.safetensors",
        "checkpoint-6/optimizer.safetensors",
        "checkpoint-4/adapter_model.safetensors",
    ] {
        assert_eq!(
            bytes(a.join(f)),
            bytes(b.join(f)),
            "{f} differs after resuming"
        );
    }

    // PEFT computes with this adapter what vlmc does: make.py --check-vlmc loaded the adapter
    // of this same training run into transformers' model with PEFT 0.21 and saved its logits.
    let base = fixture("base.safetensors");
    let peft_logits =
        weights_of(&PathBuf::from(common::ROOT).join(fixture("vlmc_trained.safetensors")))
            .remove("peft.logits")
            .expect("peft.logits");
    let ours = run(
        &work,
        "trained",
        &base,
        &["--adapter", s(&a.join("adapter"))],
    )
    .expect("runs");
    let ep = rel(&ours, &peft_logits);
    assert!(ep <= 1e-4, "vlmc-trained adapter: vlmc vs PEFT {ep:e}");
    eprintln!("vlmc-trained adapter: vlmc run --adapter vs PEFT {ep:.2e}");

    // The output's model.safetensors holds the adapter unmerged: refused alone, naming what
    // to do; with its adapter it runs, as the base with the adapter does.
    let model = a.join("model.safetensors");
    let adapter = a.join("adapter");
    let err = run(&work, "alone", s(&model), &[]).expect_err("refused");
    assert!(err.contains("holds 8 LoRA tensor(s)"), "{err}");
    assert!(
        err.contains(&format!("--adapter {}", adapter.display())),
        "{err}"
    );
    let with = run(&work, "with", s(&model), &["--adapter", s(&adapter)]).expect("runs");
    let on_base = run(&work, "on_base", &base, &["--adapter", s(&adapter)]).expect("runs");
    assert_eq!(with.to_f64(), on_base.to_f64());
    let plain = run(&work, "plain", &base, &[]).expect("runs");
    assert!(rel(&with, &plain) > 1e-3, "training changed nothing");
    // A checkpoint is an adapter too.
    let at4 = run(
        &work,
        "at4",
        &base,
        &["--adapter", s(&a.join("checkpoint-4"))],
    )
    .expect("runs");
    assert!(rel(&at4, &with) > 0.0);
    // Training from it is refused too (merge first).
    let mut args = vec![
        "train",
        "tests/fixtures/peft/fixture.vlm",
        "--trainer",
        "lora",
        "--weights",
        s(&model),
        "--data",
        s(&data),
        "--tokenizer",
        TOKENIZER,
        "-o",
    ];
    let d = work.join("d");
    args.push(s(&d));
    let o = vlmc(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("merge the adapter first: `vlmc merge"),
        "{err}"
    );
    assert!(!d.exists());

    // Another base: refused, naming the tensors that differ; --allow-other-base applies it.
    let other = work.join("other.safetensors");
    let o = vlmc(&[
        "init",
        "tests/fixtures/peft/fixture.vlm",
        "--seed",
        "5",
        "-o",
        s(&other),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = work.join("m.safetensors");
    let merge = |w: &Path, extra: &[&str]| {
        let mut args = vec![
            "merge",
            "tests/fixtures/peft/fixture.vlm",
            "--adapter",
            s(&adapter),
            "--weights",
            s(w),
            "-o",
            s(&merged),
        ];
        args.extend_from_slice(extra);
        vlmc(&args)
    };
    let o = merge(&other, &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("was trained on other base weights than")
            && err.contains("20 of the 20 base tensors it records")
            && err.contains("`language_model.model.embed_tokens.weight`")
            && err.contains("--allow-other-base"),
        "{err}"
    );
    assert!(!merged.exists());
    let err = run(&work, "other", s(&other), &["--adapter", s(&adapter)]).expect_err("refused");
    assert!(err.contains("was trained on other base weights"), "{err}");
    let o = merge(&other, &["--allow-other-base"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One changed tensor is named alone.
    let mut w = weights_of(Path::new(&format!("{}/{base}", common::ROOT)));
    let norm = "language_model.model.norm.weight";
    let t = w[norm].to_f64();
    w.insert(
        norm.into(),
        Tensor::f32(
            w[norm].shape.clone(),
            t.iter().map(|x| (x * 1.5) as f32).collect(),
        ),
    );
    let edited = work.join("edited.safetensors");
    vlmc_runtime::weights::save(&edited, &w).expect("save");
    let o = merge(&edited, &[]);
    let err = stderr(&o);
    assert!(err.contains("1 of the 20 base tensors it records"), "{err}");
    assert!(err.contains(&format!("differ: `{norm}`;")), "{err}");
    // The training output itself is a right base (its frozen tensors are the base's): the
    // merge leaves its LoRA tensors out.
    let o = merge(&model, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names = weights_of(&merged);
    assert!(
        names.keys().all(|n| !n.contains("lora_")),
        "{:?}",
        names.keys()
    );
    let m = run(&work, "m", s(&merged), &[]).expect("runs");
    let em = rel(&m, &with);
    assert!(em <= 1e-5, "merged training output vs --adapter: {em:e}");
    let _ = std::fs::remove_dir_all(&work);
}
