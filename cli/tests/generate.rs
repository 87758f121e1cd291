//! `vlmc generate` through the binary, on SmolLM2's tokenizer and chat template (fetched by
//! tests/setup.sh) with a small random Llama in SmolLM2's shape (`--set`): streaming equals the
//! JSON text, batches equal single runs, seeds reproduce, stop strings cut, and bad input is a
//! clear error with exit code 1.

mod common;

use common::{s, tmp, vlmc};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SETS: &[&str] = &[
    "--set",
    "dim=32",
    "--set",
    "depth=2",
    "--set",
    "heads=4",
    "--set",
    "kv_heads=2",
    "--set",
    "ffn=48",
    "--set",
    "context=64",
];

/// A folder with random weights for the small model and SmolLM2's tokenizer files.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = Path::new(common::ROOT).join(".cache/smollm2");
        assert!(
            src.join("tokenizer.json").exists(),
            "run tests/setup.sh first"
        );
        let d = tmp("model");
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            std::fs::copy(src.join(f), d.join(f)).expect("copy");
        }
        let w = d.join("model.safetensors");
        let mut args = vec!["init", "models/smollm2.vlm", "--seed", "5", "-o", s(&w)];
        args.extend_from_slice(SETS);
        let o = vlmc(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        d
    })
}

fn generate(extra: &[&str]) -> std::process::Output {
    let w = model_dir().join("model.safetensors");
    let mut args = vec!["generate", "models/smollm2.vlm", "--weights", s(&w)];
    args.extend_from_slice(SETS);
    args.extend_from_slice(extra);
    vlmc(&args)
}

fn ok_json(extra: &[&str]) -> Json {
    let mut a = extra.to_vec();
    a.push("--json");
    let o = generate(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

fn tokens(j: &Json) -> Vec<i64> {
    j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

fn err_text(extra: &[&str]) -> String {
    let o = generate(extra);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn streams_the_json_text_and_batches_equal_single_runs() {
    let o = generate(&["--prompt", "Once upon a time", "--max-new-tokens", "12"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let streamed = String::from_utf8(o.stdout).expect("utf-8");
    let j = ok_json(&["--prompt", "Once upon a time", "--max-new-tokens", "12"]);
    assert_eq!(streamed.trim_end_matches('\n'), j["text"].as_str().unwrap());
    assert_eq!(tokens(&j).len(), 12);
    assert_eq!(j["stop_reason"], "length");
    let lp = j["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 12);
    assert!(lp.iter().all(|v| v.as_f64().unwrap() <= 0.0));

    // a JSONL file in batches of 2 (one a chat): in input order, each as generated alone
    let d = tmp("data");
    let chat = r#"[{"role": "user", "content": "Hello there"}]"#;
    std::fs::write(
        d.join("p.jsonl"),
        format!(
            "{{\"prompt\": \"Once upon a time\"}}\n{{\"messages\": {chat}}}\n{{\"prompt\": \"A\"}}\n"
        ),
    )
    .unwrap();
    std::fs::write(d.join("chat.json"), chat).unwrap();
    let out = d.join("out.jsonl");
    let o = generate(&[
        "--data",
        s(&d.join("p.jsonl")),
        "-o",
        s(&out),
        "--batch",
        "2",
        "--max-new-tokens",
        "12",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Json> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let singles = [
        j.clone(),
        ok_json(&["--chat", s(&d.join("chat.json")), "--max-new-tokens", "12"]),
        ok_json(&["--prompt", "A", "--max-new-tokens", "12"]),
    ];
    for (i, (r, one)) in rows.iter().zip(&singles).enumerate() {
        assert_eq!(r["index"], i);
        assert_eq!(tokens(r), tokens(one), "row {i}");
        assert_eq!(r["text"], one["text"], "row {i}");
    }
}

#[test]
fn seeds_reproduce_and_stop_strings_cut() {
    let greedy = ok_json(&["--prompt", "The sky is", "--max-new-tokens", "10"]);
    let k1 = ok_json(&[
        "--prompt",
        "The sky is",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0.9",
        "--top-k",
        "1",
    ]);
    assert_eq!(tokens(&k1), tokens(&greedy));
    let hot = [
        "--prompt",
        "The sky is",
        "--max-new-tokens",
        "10",
        "--temperature",
        "1.2",
        "--seed",
        "7",
    ];
    let a = ok_json(&hot);
    assert_eq!(tokens(&a), tokens(&ok_json(&hot)), "same seed, same tokens");
    assert_ne!(tokens(&a), tokens(&greedy));
    // a stop string from the middle of the greedy text ends it there
    let text = greedy["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "{text:?}");
    let stop: String = chars[4..7].iter().collect();
    let cut = ok_json(&[
        "--prompt",
        "The sky is",
        "--max-new-tokens",
        "10",
        "--stop",
        &stop,
    ]);
    assert_eq!(cut["stop_reason"], "stop");
    let want = &text[..text.find(&stop).unwrap()];
    assert_eq!(cut["text"].as_str().unwrap(), want);
}

#[test]
fn bad_input_is_a_clear_error() {
    let e = err_text(&["--prompt", "x", "--top-p", "0"]);
    assert!(e.contains("--top-p must be in (0, 1], got 0"), "{e}");
    let e = err_text(&["--prompt", "x", "--top-p", "1.5"]);
    assert!(e.contains("--top-p must be in (0, 1]"), "{e}");
    let e = err_text(&["--prompt", "x", "--temperature", "-1"]);
    assert!(e.contains("--temperature must be a number >= 0"), "{e}");
    let long = "word ".repeat(80);
    let e = err_text(&["--prompt", &long, "--max-new-tokens", "4"]);
    assert!(e.contains("more than the model's context of 64"), "{e}");
    let d = tmp("bad");
    std::fs::write(
        d.join("chat.json"),
        r#"[{"role": "robot", "content": "hi"}]"#,
    )
    .unwrap();
    let e = err_text(&["--chat", s(&d.join("chat.json"))]);
    assert!(e.contains("unknown role \"robot\""), "{e}");
    let png = Path::new(common::ROOT).join("tests/fixtures/train/colours/img");
    let img = std::fs::read_dir(&png)
        .ok()
        .and_then(|mut r| r.next())
        .map(|e| e.unwrap().path())
        .unwrap_or_else(|| png.join("missing.png"));
    let e = err_text(&["--prompt", "x", "--image", s(&img)]);
    assert!(e.contains("this model takes no images"), "{e}");
    let e = err_text(&[]);
    assert!(e.contains("give a --prompt TEXT"), "{e}");
    // a --data line that is not a prompt: its file and line
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n",
    )
    .unwrap();
    let out = d.join("bad_out.jsonl");
    let e = err_text(&["--data", s(&d.join("bad.jsonl")), "-o", s(&out)]);
    assert!(e.contains("bad.jsonl:2: each line needs \"prompt\""), "{e}");
    assert!(!out.exists(), "nothing is written on an error");
    if !vlmc_runtime::cuda::driver_present() {
        let e = err_text(&["--prompt", "x", "--target", "cuda"]);
        assert!(e.contains("CUDA"), "{e}");
    }
    // a chat template that fails names its line
    let m = tmp("template");
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::copy(model_dir().join(f), m.join(f)).unwrap();
    }
    std::fs::write(
        m.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}\n{{ raise_exception('only system messages') }}{% endfor %}"}"#,
    )
    .unwrap();
    std::fs::write(d.join("ok.json"), r#"[{"role": "user", "content": "hi"}]"#).unwrap();
    let mut args = vec!["generate", "models/smollm2.vlm", "--weights"];
    let w = m.join("model.safetensors");
    args.push(s(&w));
    args.extend_from_slice(SETS);
    let chat = d.join("ok.json");
    args.extend_from_slice(&["--chat", s(&chat)]);
    let o = vlmc(&args);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("template line 2") && e.contains("only system messages"),
        "{e}"
    );
}

/// A word-level tokenizer for the LLaVA fixture: words w0..w89, `<image>` as id 90.
fn llava_tokenizer(dir: &Path) -> PathBuf {
    let mut vocab = serde_json::Map::new();
    for i in 0..90 {
        vocab.insert(format!("w{i}"), Json::from(i));
    }
    vocab.insert("<image>".into(), Json::from(90));
    vocab.insert("[UNK]".into(), Json::from(91));
    let t = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 90, "content": "<image>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, t.to_string()).unwrap();
    p
}

#[test]
fn image_placeholders_expand_to_the_image_tokens() {
    let d = tmp("llava");
    let tok = llava_tokenizer(&d);
    let img_dir = Path::new(common::ROOT).join("tests/fixtures/train/colours/img");
    let mut imgs: Vec<PathBuf> = std::fs::read_dir(&img_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    imgs.sort();
    let run = |prompt: &str, images: &[&PathBuf]| {
        let mut args = vec![
            "generate",
            "tests/fixtures/zoo/llava/fixture.vlm",
            "--weights",
            "tests/fixtures/zoo/llava/model.safetensors",
            "--tokenizer",
            s(&tok),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "4",
            "--json",
        ];
        for i in images {
            args.extend_from_slice(&["--image", s(i)]);
        }
        vlmc(&args)
    };
    // two images, each `<image>` expanded to the fixture's 9 patch tokens
    let o = run("w1 w5 <image> w7 <image> w9", &[&imgs[0], &imgs[1]]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Json = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["prompt_tokens"], 4 + 2 * 9);
    assert_eq!(tokens(&j).len(), 4);
    let o = run("w1 <image> <image> w2", &[&imgs[0]]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("2 image placeholder(s) `<image>` but 1 image(s)"),
        "{e}"
    );
    let o = run("w1 w2", &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("needs an image"), "{e}");
}

#[test]
fn ctrl_c_stops_cleanly() {
    let w = model_dir().join("model.safetensors");
    let mut args = vec!["generate", "models/smollm2.vlm", "--weights", s(&w)];
    // the small model with a context that allows 2000 new tokens
    args.extend_from_slice(&SETS[..SETS.len() - 2]);
    args.extend_from_slice(&[
        "--set",
        "context=4096",
        "--prompt",
        "x",
        "--max-new-tokens",
        "2000",
    ]);
    let mut child = common::command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    // wait until it is generating (the first bytes on stdout), then interrupt it
    let mut out = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    use std::io::Read;
    out.read_exact(&mut first).expect("generates something");
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let t = std::time::Instant::now();
    let status = child.wait().expect("ends");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .ok();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("stopped (Ctrl-C)"), "{err}");
    assert!(
        t.elapsed().as_secs() < 20,
        "it stopped after the current step"
    );
}
