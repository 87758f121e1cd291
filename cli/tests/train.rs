//! `vlmc train` through the binary: the two LLaVA stages (`align`, then `instruct` from it)
//! run as one chain; a diverging run stops with the step named and its last good checkpoint
//! untouched; cycles in `from` and unknown trainers are clear errors; `eval_every` without
//! evaluation data warns.

mod common;

use common::{fresh, s, stderr, text_data, tmp, train_args, vlmc, weights, ROOT, TINY_LM};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

const COLOURS: &str = "tests/fixtures/train/colours";

/// The `loss` of each step and the `eval_loss` lines of a log.
fn log(dir: &Path) -> (Vec<f64>, Vec<(u64, f64)>) {
    let text = std::fs::read_to_string(dir.join("log.jsonl")).expect("log.jsonl");
    let (mut losses, mut evals) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("json line");
        let step = v["step"].as_u64().expect("step");
        if let Some(e) = v.get("eval_loss") {
            evals.push((step, e.as_f64().expect("eval_loss")));
        } else {
            assert_eq!(step as usize, losses.len() + 1, "steps in order");
            losses.push(v["loss"].as_f64().expect("loss"));
        }
    }
    (losses, evals)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn the_two_llava_stages_run_in_order_each_from_the_last() {
    let t0 = std::time::Instant::now();
    let (a, b) = (fresh("stages"), fresh("stages-resumed"));
    let data = format!("{COLOURS}/train.jsonl");
    let held = format!("{COLOURS}/heldout.jsonl");
    // `vlmc train` of the LLaVA chain on the colours: `settings` after `--data`, `extra` last.
    let llava = |out: &Path, settings: &[&str], extra: &[&str]| -> Output {
        let mut v = vec![
            "train",
            "models/llava_tiny.vlm",
            "--trainer",
            "instruct",
            "--data",
            &data,
        ];
        v.extend_from_slice(settings);
        v.extend_from_slice(&["--quiet", "-o", s(out)]);
        v.extend_from_slice(extra);
        vlmc(&v)
    };
    let args =
        |out: &Path, extra: &[&str]| llava(out, &["--eval-data", &held, "--steps", "30"], extra);
    let out = args(&a, &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let first = err.find("stage 1/2: `align`").expect("stage 1 announced");
    let second = err
        .find("stage 2/2: `instruct`")
        .expect("stage 2 announced");
    assert!(first < second, "{err}");
    assert!(
        err.contains(&format!("from {}", s(&a.join("align/model.safetensors")))),
        "{err}"
    );

    // Stage 1 (`align`, from the init rules with its seed 0) changed the projector only.
    let checked = vlmc::elab::check_file(&Path::new(ROOT).join("models/llava_tiny.vlm"));
    let model = checked
        .result
        .expect("llava_tiny checks")
        .pop()
        .expect("model");
    let init = vlmc_runtime::init::init_params(&model.graph, 0).expect("init");
    let w1 = weights(&a.join("align/model.safetensors"));
    assert_eq!(w1.len(), init.len());
    let mut moved = 0;
    for (p, t) in &init {
        if p.starts_with("multi_modal_projector.") {
            assert_ne!(&w1[p], t, "{p} did not train in stage 1");
            moved += 1;
        } else {
            assert_eq!(&w1[p], t, "{p} changed in stage 1");
        }
    }
    assert_eq!(moved, 4, "the projector's two linear layers");

    // Stage 2 (`instruct`, LoRA) started from stage 1's weights: its base weights are stage
    // 1's, bit for bit, and only the adapter's A and B changed.
    let w2 = weights(&a.join("instruct/model.safetensors"));
    let lora: Vec<&String> = w2.keys().filter(|p| p.contains(".lora_")).collect();
    assert_eq!(lora.len(), 8, "{lora:?}");
    assert_eq!(w2.len(), w1.len() + 8);
    for (p, t) in &w1 {
        assert_eq!(&w2[p], t, "{p}: stage 2 does not hold stage 1's weight");
    }
    let cfg = vlmc::train::TrainConfig::of(&model, "instruct").expect("trainer");
    let (adapted, _, _) = vlmc::train::model_graph(&model, &cfg).expect("adapted");
    for (_, p, ty, rule) in adapted.params() {
        if !p.contains(".lora_") {
            continue;
        }
        let start = vlmc_runtime::init::init_param(p, ty, rule, cfg.seed).expect("init");
        assert_ne!(w2[p], start, "{p} did not train in stage 2");
    }
    assert!(a
        .join("instruct/adapter/adapter_model.safetensors")
        .is_file());

    // The losses fall in stage 2: on the held-out set (stage 2 starts where stage 1 ended,
    // its B being zero) and on the training batches.
    let (l1, e1) = log(&a.join("align"));
    let (l2, e2) = log(&a.join("instruct"));
    assert_eq!((l1.len(), l2.len()), (30, 30));
    assert_eq!(e1.len(), 1, "no eval_every: evaluated at the end only");
    assert_eq!(e1[0].0, 30);
    let (start, end) = (e1[0].1, e2[e2.len() - 1].1);
    let (head, tail) = (mean(&l2[..5]), mean(&l2[25..]));
    eprintln!(
        "stage 1 training loss {:.4} -> {:.4}; stage 2 held-out loss {start:.4} -> {end:.4}, \
         training loss (mean of 5) {head:.4} -> {tail:.4}",
        mean(&l1[..5]),
        mean(&l1[25..])
    );
    assert!(end < start - 0.08, "held-out loss {start} -> {end}");
    assert!(tail < head - 0.08, "training loss {head} -> {tail}");

    // Running it again skips both finished stages and changes nothing.
    let again = args(&a, &[]);
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert_eq!(err.matches("already finished").count(), 2, "{err}");
    assert!(!err.contains("step 1/"), "{err}");
    assert_eq!(weights(&a.join("instruct/model.safetensors")), w2);
    // Other settings into the finished chain: stage 1's folder holds a run of 30 steps, so
    // it is refused (not skipped, not trained over), and nothing changes.
    let other = llava(&a, &["--steps", "29"], &[]);
    let err = stderr(&other);
    assert_eq!(other.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stage 1/2 (`align`): ")
            && err.contains("already holds a finished run")
            && err.contains("with other settings or data")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(log(&a.join("align")).0, l1);
    assert_eq!(weights(&a.join("instruct/model.safetensors")), w2);

    // Stopped in stage 1 and resumed: the same chain, bit for bit.
    let stopped = args(&b, &["--stop-after", "12"]);
    let err = stderr(&stopped);
    assert!(stopped.status.success(), "{err}");
    assert!(
        err.contains("stopped in stage `align` at step 12 of 30"),
        "{err}"
    );
    assert!(
        !b.join("instruct").exists(),
        "stage 2 ran after an unfinished stage 1"
    );
    let resumed = args(&b, &["--resume", s(&b)]);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains("continuing from the latest checkpoint in"),
        "{err}"
    );
    assert_eq!(weights(&b.join("instruct/model.safetensors")), w2);
    assert_eq!(log(&b.join("instruct")).0, l2);
    assert_eq!(log(&b.join("align")).0, l1);
    eprintln!("whole test {:.1} s", t0.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        out.insert(
            e.file_name().to_string_lossy().to_string(),
            std::fs::read(e.path()).expect("read"),
        );
    }
    out
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let work = tmp("nan");
    let data = text_data(&work);
    let run = |out: &Path, extra: &[&str]| vlmc(&train_args("diverge", &data, out, extra));
    // One good step, checkpointed; then the second step, resumed, diverges.
    let out = work.join("run");
    let first = run(&out, &["--stop-after", "1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let ck = out.join("checkpoint-1");
    let before = files(&ck);
    assert_eq!(before.len(), 3, "{:?}", before.keys());
    let second = run(&out, &["--resume", s(&out)]);
    let err = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    let want = format!(
        "error: the loss is NaN at step 2: stopping (the parameters are unchanged); the last good checkpoint is {}",
        s(&ck)
    );
    assert!(err.contains(&want), "{err}");
    assert_eq!(files(&ck), before, "the last good checkpoint changed");
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    // No partial checkpoint (`.checkpoint-2.tmp`), no step 2, no final weights.
    assert_eq!(
        left,
        [
            "checkpoint-1",
            "log.jsonl",
            "model.safetensors",
            "tokenizer.json"
        ]
    );

    // Straight through: `save_every 1` writes checkpoint-1, step 2 stops the run; the
    // checkpoint is the one above, byte for byte.
    let straight = work.join("straight");
    let run2 = run(&straight, &[]);
    let err = stderr(&run2);
    assert_eq!(run2.status.code(), Some(1), "{err}");
    assert!(err.contains("the loss is NaN at step 2"), "{err}");
    assert!(
        err.contains(&format!(
            "the last good checkpoint is {}",
            s(&straight.join("checkpoint-1"))
        )),
        "{err}"
    );
    assert_eq!(files(&straight.join("checkpoint-1")), before);
    let mut left: Vec<String> = std::fs::read_dir(&straight)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["checkpoint-1", "log.jsonl"]);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn cycles_and_unknown_trainers_are_clear_errors() {
    let work = tmp("chains");
    let data = text_data(&work);
    let run = |trainer: &str| {
        vlmc(&[
            "train",
            TINY_LM,
            "--trainer",
            trainer,
            "--data",
            s(&data),
            "-o",
            s(&work.join("out")),
        ])
    };
    let out = run("loop_a");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: the `from` chain of trainer `loop_a` is a cycle: loop_a ← loop_b ← loop_a\n"
    );
    let out = run("nope");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "error: {TINY_LM} has no trainer `nope` (trainers: evaluated, diverge, loop_a, loop_b, logged, own_first, own_second, long_warmup)\n"
        )
    );
    assert!(!work.join("out").exists());
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn eval_every_without_eval_data_warns_once() {
    let work = tmp("eval-warn");
    let data = text_data(&work);
    let run = |extra: &[&str]| {
        let out = work.join("out");
        let _ = std::fs::remove_dir_all(&out);
        let o = vlmc(&train_args(
            "evaluated",
            &data,
            &out,
            &[&["--steps", "2"], extra].concat(),
        ));
        assert!(o.status.success(), "{}", stderr(&o));
        (stderr(&o), log(&out).1)
    };
    let (err, evals) = run(&[]);
    let warning = "warning: trainer `evaluated` sets `eval_every 1` but no evaluation data was \
                   given (--eval-data): it is not evaluated";
    assert_eq!(err.matches(warning).count(), 1, "{err}");
    assert!(evals.is_empty());
    let (err, evals) = run(&["--eval-data", s(&data)]);
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(evals.len(), 2);
    assert!(err.contains("eval loss"), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn each_stage_reads_its_own_data() {
    use common::TOKENIZER;
    // (also: the spec's tokenizer path is relative to the spec; the outputs keep it)
    let work = tmp("stage-data");
    std::fs::create_dir_all(&work).expect("mkdir");
    let second = work.join("second.jsonl");
    std::fs::write(
        &second,
        "{\"text\": \"red red red\"}\n{\"text\": \"blue blue\"}\n",
    )
    .expect("data");
    let run = |out: &Path, data: &[&str]| {
        let mut v = vec!["train", TINY_LM, "--trainer", "own_second"];
        for d in data {
            v.extend_from_slice(&["--data", d]);
        }
        // no --tokenizer: the spec's `tokenizer:` resolves beside the spec
        v.extend_from_slice(&["--quiet", "-o", s(out)]);
        vlmc(&v)
    };
    // the data a stage's checkpoint records (its fingerprint's data file)
    let data_of = |dir: &Path| -> (String, u64) {
        let text = std::fs::read_to_string(dir.join("checkpoint-2/trainer_state.json"))
            .expect("trainer_state.json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let d = &v["fingerprint"]["data"];
        (
            d["path"].as_str().expect("path").to_string(),
            d["bytes"].as_u64().expect("bytes"),
        )
    };
    let out = work.join("run");
    let o = run(&out, &[&format!("own_second={}", s(&second))]);
    assert!(o.status.success(), "{}", stderr(&o));
    let own = std::fs::metadata(format!("{ROOT}/tests/fixtures/train/colours/text.jsonl"))
        .expect("fixture")
        .len();
    let (p1, b1) = data_of(&out.join("own_first"));
    assert!(p1.ends_with("colours/text.jsonl") && b1 == own, "{p1} {b1}");
    let (p2, b2) = data_of(&out.join("own_second"));
    assert!(
        p2.ends_with("second.jsonl") && b2 == std::fs::metadata(&second).expect("m").len(),
        "{p2}"
    );
    // each stage's output holds the tokenizer it trained with
    for stage in ["own_first", "own_second"] {
        assert_eq!(
            std::fs::read(out.join(stage).join("tokenizer.json")).expect("saved tokenizer"),
            std::fs::read(format!("{ROOT}/{TOKENIZER}")).expect("tokenizer"),
            "{stage}"
        );
    }
    // no data for the second stage, a stage that is not in the run, two plain files
    let o = run(&work.join("none"), &[]);
    assert!(
        stderr(&o).contains("stage `own_second` has no training data"),
        "{}",
        stderr(&o)
    );
    let o = run(&work.join("bad"), &[&format!("nope={}", s(&second))]);
    assert!(
        stderr(&o).contains("`nope` is not a stage of this run (stages: own_first, own_second)"),
        "{}",
        stderr(&o)
    );
    let o = run(&work.join("two"), &[s(&second), s(&second)]);
    assert!(
        stderr(&o).contains("--data FILE is given twice"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_warm_up_longer_than_the_run_is_refused() {
    let work = tmp("warmup");
    let data = text_data(&work);
    let o = vlmc(&train_args("long_warmup", &data, &work.join("out"), &[]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(
            "trainer `long_warmup`: the warm-up (10 steps) is longer than the run (4 steps)"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!work.join("out").join("log.jsonl").exists());
    // --warmup-steps overrides the recipe's for a short trial: step 1 at lr 0, then the peak
    let o = vlmc(&train_args(
        "long_warmup",
        &data,
        &work.join("out"),
        &["--warmup-steps", "1"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(work.join("out/log.jsonl")).expect("log");
    let lrs: Vec<f64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["lr"]
                .as_f64()
                .expect("lr")
        })
        .collect();
    assert_eq!(lrs.len(), 4);
    assert_eq!(lrs[0], 0.0);
    assert!(lrs[1] > 0.0 && lrs[1] > lrs[2], "{lrs:?}");
}
