//! `vlmc train` with preference objectives through the binary: TRL's preference rows (explicit
//! and implicit prompts, conversations) train, the progress shows the reward accuracy, the
//! log carries TRL's metric names, chosen == rejected is warned about once with a count, and
//! bad rows are errors naming the file, the line and the field.

mod common;

use common::{fresh, s, stderr, vlmc};
use std::path::Path;

const SPEC: &str = "tests/fixtures/train/pref_lm.vlm";
const TOKENIZER: &str = "tests/fixtures/train/colours/tokenizer.json";

fn write(dir: &Path, name: &str, rows: &[serde_json::Value]) -> String {
    std::fs::create_dir_all(dir).expect("dir");
    let p = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf-8").to_string()
}

#[test]
fn dpo_trains_from_trl_preference_rows() {
    let dir = fresh("pref-rows");
    let rows = vec![
        // explicit prompt
        serde_json::json!({"prompt": "red square what colour is the square ?", "chosen": "red", "rejected": "blue"}),
        // implicit prompt: the shared start of chosen and rejected
        serde_json::json!({"chosen": "blue square what colour is the square ? blue", "rejected": "blue square what colour is the square ? green"}),
        // the same twice: warned about
        serde_json::json!({"prompt": "green square what colour is the square ?", "chosen": "green", "rejected": "green"}),
        serde_json::json!({"prompt": "cyan square what colour is the square ?", "chosen": "cyan", "rejected": "red"}),
    ];
    let data = write(&dir, "pairs.jsonl", &rows);
    let out = dir.join("run");
    let o = vlmc(&[
        "train",
        SPEC,
        "--trainer",
        "dpo",
        "--data",
        &data,
        "--tokenizer",
        TOKENIZER,
        "--steps",
        "4",
        "-o",
        s(&out),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 of 4 pairs have chosen == rejected") && err.contains("pairs.jsonl:3"),
        "{err}"
    );
    assert!(err.contains("reference policy: a frozen copy"), "{err}");
    assert!(
        err.contains(" acc "),
        "the progress shows the reward accuracy: {err}"
    );
    let log = std::fs::read_to_string(out.join("log.jsonl")).expect("log");
    let first: serde_json::Value =
        serde_json::from_str(log.lines().next().expect("a line")).expect("json");
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ] {
        assert!(first.get(k).is_some(), "{k} missing: {first}");
    }
    // the first step: policy = reference, every reward 0, the loss ln 2
    assert!(
        first["rewards/margins"].as_f64().expect("f64").abs() < 1e-6,
        "{first}"
    );
    assert!((first["loss"].as_f64().expect("f64") - std::f64::consts::LN_2).abs() < 1e-5);
}

#[test]
fn bad_preference_rows_name_file_line_and_field() {
    let dir = fresh("pref-bad");
    let ok = serde_json::json!({"prompt": "red square", "chosen": "red", "rejected": "blue"});
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "dpo",
            serde_json::json!({"prompt": "red", "chosen": "red"}),
            "\"rejected\"",
        ),
        (
            "dpo",
            serde_json::json!({"prompt": "red", "chosen": 3, "rejected": "blue"}),
            "field \"chosen\": expected a string or a list of messages",
        ),
        (
            "dpo",
            serde_json::json!({"prompt": "red", "chosen": "", "rejected": "blue"}),
            "field \"chosen\": the completion is empty",
        ),
        (
            "dpo",
            serde_json::json!({"prompt": "red", "chosen": "red", "rejected": [{"role": "assistant", "content": "blue"}]}),
            "both be strings or both be lists",
        ),
        (
            "kto",
            serde_json::json!({"prompt": "red", "completion": "red", "label": "yes"}),
            "field \"label\": expected true or false",
        ),
        (
            "kto",
            serde_json::json!({"prompt": "red", "completion": "red"}),
            "\"label\"",
        ),
    ];
    for (k, (trainer, bad, want)) in cases.into_iter().enumerate() {
        let first = if trainer == "kto" {
            serde_json::json!({"prompt": "red square", "completion": "red", "label": true})
        } else {
            ok.clone()
        };
        let data = write(&dir, &format!("bad{k}.jsonl"), &[first, bad]);
        let o = vlmc(&[
            "train",
            SPEC,
            "--trainer",
            trainer,
            "--data",
            &data,
            "--tokenizer",
            TOKENIZER,
            "--steps",
            "1",
            "-o",
            s(&dir.join(format!("out{k}"))),
        ]);
        let err = stderr(&o);
        assert!(!o.status.success(), "case {k}: {err}");
        assert!(
            err.contains(&format!("bad{k}.jsonl:2")),
            "case {k}: no file:line in {err}"
        );
        assert!(err.contains(want), "case {k}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "case {k}: {err}");
    }
}
