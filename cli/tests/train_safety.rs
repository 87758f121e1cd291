//! `vlmc train` and `vlmc merge` never lose or corrupt a user's work: two runs into one
//! folder (one is refused, naming the holder; the other's outputs are a lone run's), a folder
//! holding an earlier run (refused without --resume or --overwrite; --overwrite deletes that
//! run's files only), resume checks (--steps, data, a hand-edited trainer_state.json), the log
//! cut back to the checkpoint after a kill, merge's checks of the adapter, and data whose
//! sizes cannot fit (a huge row) or that gives nothing to learn (rows without targets).

mod common;

use common::{command, s, stderr, text_data, tmp, vlmc, weights, ROOT};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use vlmc_runtime::Tensor;

/// `vlmc train` of TinyLm's `evaluated` trainer (AdamW, batch 4) on `data` into `out`.
fn train_args<'a>(data: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    common::train_args("evaluated", data, out, extra)
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    vlmc(&train_args(data, out, extra))
}

/// Every file under `dir` (relative path → bytes).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("inside").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The log's lines without the timing (`examples_per_s`), which differs between runs.
fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .expect("log.jsonl")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            if let Some(o) = v.as_object_mut() {
                o.remove("examples_per_s");
            }
            v
        })
        .collect()
}

/// The steps of the log's training lines, in order.
fn log_steps(dir: &Path) -> Vec<u64> {
    log_lines(dir)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().expect("step"))
        .collect()
}

fn losses(dir: &Path) -> Vec<f64> {
    log_lines(dir)
        .iter()
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

#[test]
fn two_runs_into_one_folder_one_is_refused_and_the_other_is_intact() {
    let t0 = std::time::Instant::now();
    let work = tmp("concurrent");
    let data = text_data(&work);
    let both = work.join("both");
    let steps = "60";
    // Started together, into one folder. On a loaded machine the second may start only after
    // the first has finished (then the folder holds a finished run, and that is why it is
    // refused): such a try did not overlap, and is made again.
    let mut tries = 0;
    let won = loop {
        tries += 1;
        let _ = std::fs::remove_dir_all(&both);
        let spawn = || {
            command(&train_args(&data, &both, &["--steps", steps]))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("vlmc starts")
        };
        let (a, b) = (spawn(), spawn());
        let (pa, pb) = (a.id(), b.id());
        let (oa, ob) = (
            a.wait_with_output().expect("a ends"),
            b.wait_with_output().expect("b ends"),
        );
        let (won, lost, winner) = match (oa.status.success(), ob.status.success()) {
            (true, false) => (oa, ob, pa),
            (false, true) => (ob, oa, pb),
            _ => panic!(
                "exactly one run must succeed:\n--- a ---\n{}\n--- b ---\n{}",
                stderr(&oa),
                stderr(&ob)
            ),
        };
        let err = stderr(&lost);
        assert_eq!(lost.status.code(), Some(1), "{err}");
        if err.contains("already holds a finished run") && tries < 5 {
            eprintln!("try {tries}: the two runs did not overlap");
            continue;
        }
        assert!(
            err.contains("is in use by another training run")
                && err.contains(&format!("pid {winner}")),
            "the refusal names the holder (pid {winner}): {err}"
        );
        break won;
    };
    assert!(
        stderr(&won).contains(&format!("trained `evaluated` for {steps} steps")),
        "{}",
        stderr(&won)
    );

    // The winner's outputs are a lone run's, byte for byte (the log but for its timings),
    // with nothing else left in the folder (no lock, no temporary file).
    let lone = work.join("lone");
    let o = train(&data, &lone, &["--steps", steps]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (tb, tl) = (tree(&both), tree(&lone));
    assert_eq!(
        tb.keys().collect::<Vec<_>>(),
        tl.keys().collect::<Vec<_>>(),
        "the same files"
    );
    for (k, v) in &tl {
        if k != "log.jsonl" {
            assert!(&tb[k] == v, "{k} differs from a lone run's");
        }
    }
    assert_eq!(log_lines(&both), log_lines(&lone));
    assert_eq!(log_steps(&both), (1..=60).collect::<Vec<u64>>());
    eprintln!(
        "concurrent runs ({tries} tries) and a lone run: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_folder_holding_a_run_is_refused_unless_resume_or_overwrite() {
    let work = tmp("earlier");
    let data = text_data(&work);
    let out = work.join("out");
    let first = train(&data, &out, &["--steps", "2"]);
    assert!(first.status.success(), "{}", stderr(&first));
    std::fs::write(out.join("notes.txt"), "mine").expect("an unrelated file");
    let before = tree(&out);

    // Again into the finished folder: refused, nothing touched (the log is not doubled).
    let again = train(&data, &out, &["--steps", "2"]);
    let err = stderr(&again);
    assert_eq!(again.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{} already holds a finished run", s(&out))),
        "{err}"
    );
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(tree(&out), before, "a refused run changed the folder");
    // Another run (other settings) is refused as well.
    let other = train(&data, &out, &["--steps", "3"]);
    let err = stderr(&other);
    assert_eq!(other.status.code(), Some(1), "{err}");
    assert!(err.contains("with other settings or data"), "{err}");
    assert_eq!(tree(&out), before);

    // --overwrite: the earlier run's files go, the unrelated file stays, and the new run is
    // a fresh one (one copy of each step).
    let over = train(&data, &out, &["--steps", "3", "--overwrite"]);
    assert!(over.status.success(), "{}", stderr(&over));
    assert_eq!(log_steps(&out), [1, 2, 3]);
    assert!(
        !out.join("checkpoint-2").exists(),
        "the old checkpoint stays"
    );
    assert!(out.join("checkpoint-3").is_dir());
    assert_eq!(std::fs::read(out.join("notes.txt")).expect("kept"), b"mine");
    // Its first two steps are the first run's (same seed, same data): nothing of the old run
    // leaked into it.
    let fresh = work.join("fresh");
    let o = train(&data, &fresh, &["--steps", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&out), losses(&fresh));

    // An unfinished run: a new run is refused and told about --resume.
    let part = work.join("part");
    let o = train(&data, &part, &["--steps", "4", "--stop-after", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&data, &part, &["--steps", "4"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("already holds an unfinished run"), "{err}");
    assert!(err.contains(&format!("--resume {}", s(&part))), "{err}");
    // --resume with --overwrite of the same run is a contradiction.
    let o = train(
        &data,
        &part,
        &["--steps", "4", "--resume", s(&part), "--overwrite"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("give one or the other"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// A change to a `trainer_state.json`.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn resume_refuses_other_steps_other_data_and_a_corrupt_state() {
    let work = tmp("resume-checks");
    let data = text_data(&work);
    let out = work.join("out");
    let o = train(&data, &out, &["--steps", "4", "--stop-after", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = tree(&out);
    let resume = |extra: &[&str], data: &Path| {
        let mut v = vec!["--resume", s(&out)];
        v.extend_from_slice(extra);
        train(data, &out, &v)
    };
    let refused = |o: &Output, want: &str| {
        let err = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
        assert_eq!(tree(&out), before, "a refused resume changed the folder");
    };
    // Other --steps.
    refused(
        &resume(&["--steps", "6"], &data),
        "--steps 6 disagrees with the checkpoint",
    );
    // Without --steps the trainer's own count (6) is not the checkpoint's either.
    refused(&resume(&[], &data), "resume with --steps 4");
    // Other data (one word changed).
    let other = work.join("other.jsonl");
    let text = std::fs::read_to_string(&data).expect("data");
    std::fs::write(&other, text.replace("red green", "red blue")).expect("write");
    refused(
        &resume(&["--steps", "4"], &other),
        "it is a checkpoint of another run; what differs: the data:",
    );

    // A hand-edited trainer_state.json.
    let state = out.join("checkpoint-2/trainer_state.json");
    let good = std::fs::read_to_string(&state).expect("state");
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&good).expect("json");
        f(&mut v);
        std::fs::write(&state, v.to_string()).expect("write state");
    };
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["total_steps"] = 1.into()),
            "`step` 2 is beyond `total_steps` 1",
        ),
        (
            Box::new(|v| v["step"] = (-3).into()),
            "`step` must be a non-negative integer, not -3",
        ),
        (
            Box::new(|v| {
                v.as_object_mut().expect("object").remove("seed");
            }),
            "no `seed`",
        ),
        (
            Box::new(|v| v["index"] = 3.into()),
            "trainer_state.json is inconsistent",
        ),
        (
            Box::new(|v| v["step"] = 1.into()),
            "but the folder is the checkpoint of step 2",
        ),
        (
            Box::new(|v| {
                v.as_object_mut().expect("object").remove("fingerprint");
            }),
            "no `fingerprint`",
        ),
        (
            Box::new(|v| v["fingerprint"]["settings"]["batch"] = "8".into()),
            "the trainer's `batch`: 8 in the checkpoint, 4 now",
        ),
    ];
    for (f, want) in &cases {
        edit(f.as_ref());
        let o = resume(&["--steps", "4"], &data);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{want}: {err}");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
    }
    std::fs::write(&state, &good).expect("restore");
    assert_eq!(tree(&out), before);

    // The right resume works and gives the uninterrupted run.
    let o = resume(&["--steps", "4"], &data);
    assert!(o.status.success(), "{}", stderr(&o));
    let straight = work.join("straight");
    let o = train(&data, &straight, &["--steps", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(log_lines(&out), log_lines(&straight));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn resuming_after_a_kill_cuts_the_log_back_to_the_checkpoint() {
    let work = tmp("cut");
    let data = text_data(&work);
    let out = work.join("out");
    let o = train(&data, &out, &["--steps", "5", "--stop-after", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // What `kill -9` during step 4 leaves: steps 3 logged after checkpoint-2, a torn line, a
    // half-written checkpoint under a dead process's temporary name, and the lock file.
    let mut log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    log.push_str(
        "{\"step\":3,\"loss\":9.0,\"lr\":0.01,\"grad_norm\":1.0,\"items\":12,\"epoch\":2}\n",
    );
    log.push_str("{\"step\":4,\"lo");
    std::fs::write(out.join("log.jsonl"), log).expect("write log");
    std::fs::create_dir_all(out.join(".checkpoint-4.tmp999999")).expect("mkdir");
    std::fs::write(
        out.join(".vlmc.lock"),
        "{\"pid\":999999,\"command\":\"vlmc train (killed)\",\"started\":0}\n",
    )
    .expect("stale lock");
    let o = train(&data, &out, &["--steps", "5", "--resume", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(log_steps(&out), [1, 2, 3, 4, 5], "each step once, in order");
    let straight = work.join("straight");
    let o = train(&data, &straight, &["--steps", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(log_lines(&out), log_lines(&straight));
    assert!(!out.join(".checkpoint-4.tmp999999").exists());
    assert!(!out.join(".vlmc.lock").exists());
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_huge_row_and_rows_without_targets_are_clear_errors() {
    let work = tmp("rows");
    let out = work.join("out");
    // 2 million words in one row: its attention scores alone are tens of terabytes.
    let huge = work.join("huge.jsonl");
    let mut text = String::from("{\"text\": \"the square is blue\"}\n{\"text\": \"");
    text.push_str(&"red ".repeat(2_000_000));
    text.push_str("\"}\n");
    std::fs::write(&huge, text).expect("write");
    let t0 = std::time::Instant::now();
    let o = train(&huge, &out, &["--steps", "1"]);
    let err = stderr(&o);
    eprintln!("huge row refused in {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}:2: the row is too long (2000000 tokens)",
            s(&huge)
        )),
        "{err}"
    );
    assert!(
        err.contains("needs a tensor of") && err.contains("TB"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run left {}", s(&out));

    // A row with one token predicts nothing; a row with none has no tokens.
    for (row, want) in [
        (
            "{\"text\": \"red\"}",
            ":3: the row gives no token to predict: it has 1 token(s)",
        ),
        ("{\"text\": \"\"}", ":3: the text has no tokens"),
    ] {
        let p = work.join("few.jsonl");
        std::fs::write(
            &p,
            format!("{{\"text\": \"red green\"}}\n{{\"text\": \"blue cyan\"}}\n{row}\n"),
        )
        .expect("write");
        let o = train(&p, &out, &["--steps", "1"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("{}{want}", s(&p))), "{err}");
        assert!(!out.exists());
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// llava_tiny's base weights from its init rules, and a LoRA adapter on q_proj of both
/// layers (and k_proj of layer 0 when `with_k`), rank 4, with nonzero A and B.
fn adapter_fixture(dir: &Path, with_k: bool) -> (PathBuf, PathBuf) {
    let checked = vlmc::elab::check_file(&Path::new(ROOT).join("models/llava_tiny.vlm"));
    let model = checked.result.expect("checks").pop().expect("model");
    let base = vlmc_runtime::init::init_params(&model.graph, 3).expect("init");
    let wpath = dir.join("base.safetensors");
    vlmc_runtime::weights::save(&wpath, &base).expect("save base");
    let mut lora = BTreeMap::new();
    let mut modules = vec![
        "language_model.model.layers.0.self_attn.q_proj",
        "language_model.model.layers.1.self_attn.q_proj",
    ];
    if with_k {
        modules.push("language_model.model.layers.0.self_attn.k_proj");
    }
    for (i, m) in modules.iter().enumerate() {
        let w = &base[&format!("{m}.weight")];
        let (out, inp) = (w.shape[0], w.shape[1]);
        let fill = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|j| (((j * 7 + k * 13 + i * 5) % 17) as f32 - 8.0) / 40.0)
                .collect()
        };
        lora.insert(
            format!("base_model.model.{m}.lora_A.weight"),
            Tensor::f32(vec![4, inp], fill(4 * inp, 1)),
        );
        lora.insert(
            format!("base_model.model.{m}.lora_B.weight"),
            Tensor::f32(vec![out, 4], fill(out * 4, 2)),
        );
    }
    let adir = dir.join("adapter");
    std::fs::create_dir_all(&adir).expect("mkdir");
    vlmc_runtime::weights::save(&adir.join("adapter_model.safetensors"), &lora).expect("save");
    (wpath, adir)
}

/// PEFT 0.21's `LoraConfig().to_dict()` as `save_pretrained` writes it, for our adapter.
fn peft_config(targets: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": "llava-tiny",
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": false,
        "lora_dropout": 0.05,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": 4,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "target_parameters": null,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": false,
        "velora_config": null
    })
}

/// merged − base of one weight.
fn delta(merged: &Path, base: &Path, name: &str) -> Vec<f64> {
    let (m, b) = (weights(merged), weights(base));
    m[name]
        .to_f64()
        .iter()
        .zip(b[name].to_f64())
        .map(|(x, y)| x - y)
        .collect()
}

#[test]
fn merge_checks_the_adapter_and_honours_what_peft_writes() {
    let work = tmp("merge");
    let (base, adir) = adapter_fixture(&work, false);
    let cfg_path = adir.join("adapter_config.json");
    let write_cfg = |v: &serde_json::Value| {
        std::fs::write(&cfg_path, serde_json::to_string_pretty(v).expect("json")).expect("write")
    };
    let merge = |out: &Path| {
        vlmc(&[
            "merge",
            "models/llava_tiny.vlm",
            "--adapter",
            s(&adir),
            "--weights",
            s(&base),
            "-o",
            s(out),
        ])
    };
    let q0 = "language_model.model.layers.0.self_attn.q_proj.weight";

    // What PEFT writes merges: W + (alpha / r)·B·A.
    let good = peft_config(&["q_proj"]);
    write_cfg(&good);
    let plain = work.join("plain.safetensors");
    let o = merge(&plain);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("merged 2 LoRA targets"),
        "{}",
        stderr(&o)
    );
    let d = delta(&plain, &base, q0);
    assert!(d.iter().any(|&x| x.abs() > 1e-6), "nothing merged");

    // use_rslora: alpha / sqrt(r) = 4 instead of alpha / r = 2.
    let mut v = good.clone();
    v["use_rslora"] = true.into();
    write_cfg(&v);
    let rs = work.join("rslora.safetensors");
    let o = merge(&rs);
    assert!(o.status.success(), "{}", stderr(&o));
    for (x, y) in delta(&rs, &base, q0).iter().zip(&d) {
        assert!(
            (x - 2.0 * y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{x} vs 2 × {y}"
        );
    }

    // Refused, with what is wrong, and nothing written.
    let refused = |v: serde_json::Value, want: &str| {
        write_cfg(&v);
        let out = work.join("refused.safetensors");
        let o = merge(&out);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{want}: {err}");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
        assert!(!out.exists(), "{want}: an output was written");
    };
    let with = |k: &str, x: serde_json::Value| {
        let mut v = good.clone();
        v[k] = x;
        v
    };
    refused(
        with("lora_alpha", "x".into()),
        "`lora_alpha` must be a number, not \"x\"",
    );
    refused(with("r", 2.5.into()), "`r` must be a positive integer");
    refused(with("r", 8.into()), "but the config's rank `r` is 8");
    refused(
        with("target_modules", serde_json::json!(["q_proj", "v_proj"])),
        "`target_modules` names `v_proj`, but the adapter has no weights",
    );
    refused(
        with("target_modules", serde_json::json!(["k_proj"])),
        "which `target_modules` ([\"k_proj\"]) does not name",
    );
    refused(
        with("target_modules", ".*\\.v_proj".into()),
        "does not name",
    );
    refused(
        with("fan_in_fan_out", "yes".into()),
        "`fan_in_fan_out` must be true or false",
    );
    refused(with("use_dora", true.into()), "DoRA");
    refused(with("bias", "all".into()), "biases");
    // `modules_to_save` is applied (tests/peft.rs): here it names a module with no tensors.
    refused(
        with("modules_to_save", serde_json::json!(["lm_head"])),
        "`modules_to_save` names `lm_head`, but",
    );
    refused(
        with("alpha_pattern", serde_json::json!({"q_proj": 32})),
        "per-module ranks or alphas",
    );
    refused(
        with("layers_to_transform", serde_json::json!([0])),
        "`layers_to_transform` is [0]",
    );
    refused(
        with("scaling_mode", "exotic".into()),
        "unknown field `scaling_mode`",
    );
    refused(with("peft_type", "IA3".into()), "not a LoRA adapter");
    // A regular expression that names them is fine, and so is an unknown field that says
    // nothing.
    let mut v = with("target_modules", ".*\\.q_proj".into());
    v["future_option"] = serde_json::Value::Null;
    write_cfg(&v);
    let o = merge(&work.join("regex.safetensors"));
    assert!(o.status.success(), "{}", stderr(&o));

    // The output may not be an input.
    write_cfg(&good);
    let before = std::fs::read(&base).expect("base");
    let o = merge(&base);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(std::fs::read(&base).expect("base"), before);

    // An adapter with no tensors is an error, not a copy of the base weights.
    vlmc_runtime::weights::save(&adir.join("adapter_model.safetensors"), &BTreeMap::new())
        .expect("save empty");
    let out = work.join("empty.safetensors");
    let o = merge(&out);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("holds no tensors"), "{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&work);
}

/// A model with a GPT-2 `Conv1D` (weight [in, out], used as x·W) and a `Linear` (weight
/// [out, in], used as x·Wᵀ) whose weights have the same shape, [8, 12].
const CONV_LIN: &str = "use std.gpt2.Conv1D
use std.nn.Linear

model ConvLin {
  proj = Conv1D(8, 12)
  out = Linear(12, 8)
  fn forward(x: f32[B, 8]) -> f32[B, 8] {
    return out(proj(x))
  }
}
";

#[test]
fn fan_in_fan_out_is_honoured_for_conv1d_and_must_match_the_layers() {
    let work = tmp("merge-ffo");
    let spec = work.join("conv.vlm");
    std::fs::write(&spec, CONV_LIN).expect("write spec");
    let base = work.join("base.safetensors");
    let o = vlmc(&["init", s(&spec), "-o", s(&base)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let w = weights(&base);
    // Rank 4, alpha 8: scale 2.
    let adapter = |module: &str, inp: usize, out: usize, ffo: bool| -> PathBuf {
        let dir = work.join(format!("{module}-{ffo}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let fill = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|j| (((j * 5 + k * 3) % 11) as f32 - 5.0) / 10.0)
                .collect()
        };
        let mut t = BTreeMap::new();
        t.insert(
            format!("base_model.model.{module}.lora_A.weight"),
            Tensor::f32(vec![4, inp], fill(4 * inp, 1)),
        );
        t.insert(
            format!("base_model.model.{module}.lora_B.weight"),
            Tensor::f32(vec![out, 4], fill(out * 4, 2)),
        );
        vlmc_runtime::weights::save(&dir.join("adapter_model.safetensors"), &t).expect("save");
        let mut cfg = peft_config(&[module]);
        cfg["fan_in_fan_out"] = ffo.into();
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).expect("config");
        dir
    };
    let merge = |adir: &Path, out: &Path| {
        vlmc(&[
            "merge",
            s(&spec),
            "--adapter",
            s(adir),
            "--weights",
            s(&base),
            "-o",
            s(out),
        ])
    };
    // W + 2·(B·A)ᵀ for the Conv1D [in 8, out 12]; W + 2·B·A for the Linear [out 8, in 12].
    let expect = |adir: &Path, module: &str, transposed: bool| -> Vec<f64> {
        let t = weights(&adir.join("adapter_model.safetensors"));
        let a = t[&format!("base_model.model.{module}.lora_A.weight")].to_f64();
        let b = t[&format!("base_model.model.{module}.lora_B.weight")].to_f64();
        let wv = w[&format!("{module}.weight")].to_f64();
        let (rows, cols) = (8, 12);
        let mut m = Vec::new();
        for i in 0..rows {
            for j in 0..cols {
                // (B·A)[o][n] = Σ_k B[o][k] A[k][n]
                let ba = |o: usize, n: usize, inp: usize| -> f64 {
                    (0..4).map(|k| b[o * 4 + k] * a[k * inp + n]).sum()
                };
                let d = if transposed {
                    ba(j, i, 8)
                } else {
                    ba(i, j, 12)
                };
                m.push(wv[i * cols + j] + 2.0 * d);
            }
        }
        m
    };
    let close = |got: &[f64], want: &[f64]| {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    };

    // The Conv1D with fan_in_fan_out (what PEFT writes for it): (B·A)ᵀ.
    let conv = adapter("proj", 8, 12, true);
    let out = work.join("conv.safetensors");
    let o = merge(&conv, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    close(
        &weights(&out)["proj.weight"].to_f64(),
        &expect(&conv, "proj", true),
    );
    assert_eq!(weights(&out)["out.weight"], w["out.weight"]);
    // The Linear without it: B·A.
    let lin = adapter("out", 12, 8, false);
    let out = work.join("lin.safetensors");
    let o = merge(&lin, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    close(
        &weights(&out)["out.weight"].to_f64(),
        &expect(&lin, "out", false),
    );

    // A config that contradicts the layer (the shapes would fit either way) is refused.
    for (adir, want) in [
        (
            adapter("proj", 8, 12, false),
            "`proj` stores its weight [in, out] (a Conv1D, used as x·W), but the adapter's \
             config does not set `fan_in_fan_out`",
        ),
        (
            adapter("out", 12, 8, true),
            "the adapter's config sets `fan_in_fan_out`, but `out` is a linear layer whose \
             weight is stored [out, in]",
        ),
    ] {
        let out = work.join("refused.safetensors");
        let o = merge(&adir, &out);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
        assert!(!out.exists());
    }
    let _ = std::fs::remove_dir_all(&work);
}
