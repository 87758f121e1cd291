//! The `vlmc` binary: exit codes and where its output goes.

use std::process::Command;

fn vlmc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vlmc"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        // Compiled kernels are cached here, not in the user's home.
        .env(
            "VLMC_CACHE_DIR",
            std::env::temp_dir().join(format!("vlmc-cli-cache-{}", std::process::id())),
        )
        .output()
        .expect("vlmc runs")
}

#[test]
fn check_accepts_the_zoo_and_the_standard_library() {
    let mut args = vec!["check"];
    let files: Vec<String> = ["models", "models/std"]
        .iter()
        .flat_map(|d| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(d);
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .expect("dir")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "vlm"))
                .map(|p| {
                    format!(
                        "{d}/{}",
                        p.file_name().unwrap_or_default().to_string_lossy()
                    )
                })
                .collect();
            v.sort();
            v
        })
        .collect();
    assert!(files.len() >= 10, "{files:?}");
    args.extend(files.iter().map(String::as_str));
    let out = vlmc(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ok: models/llava_tiny.vlm: LlavaTiny ("),
        "{stderr}"
    );
}

#[test]
fn check_fails_with_a_rendered_diagnostic() {
    let dir = std::env::temp_dir().join(format!("vlmc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("bad.vlm");
    std::fs::write(
        &bad,
        "use std.nn.Linear\nmodel M {\n  l = Linear(4, 8)\n  fn forward(x: f32[B, 5]) -> f32[B, 8] {\n    return l(x)\n  }\n}\n",
    )
    .expect("write");
    let out = vlmc(&["check", bad.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "diagnostics go to stderr");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "error: `x` of `Linear.forward` expects f32[*b, 4], got f32[B, 5]\n --> {}:5:14\n  |\n5 |     return l(x)\n  |              ^ this is f32[B, 5]\n  |\n  = note: dimension 1 is 5, expected 4\n",
        bad.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn build_writes_the_ir_and_reports_unknown_models() {
    let out = vlmc(&["build", "models/clip_tiny.vlm", "--model", "Nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no model `Nope`"));
    let dir = std::env::temp_dir().join(format!("vlmc-cli-build-{}", std::process::id()));
    let out = vlmc(&[
        "build",
        "models/clip_tiny.vlm",
        "--emit",
        "ir",
        "-o",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ir = std::fs::read_to_string(dir.join("ClipTiny.ir")).expect("ir");
    assert!(
        ir.contains("output logits_per_image = ") || ir.contains("output \"logits_per_image\" = "),
        "{ir}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_minilm_on_a_sentence_prints_the_reference_embedding() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    assert!(
        root.join(".cache/minilm/model.safetensors").is_file(),
        "the MiniLM weights are missing: run tests/setup.sh first"
    );
    let out_file = std::env::temp_dir().join(format!(
        "vlmc-cli-minilm-{}.safetensors",
        std::process::id()
    ));
    let out = vlmc(&[
        "run",
        "models/minilm.vlm",
        "--weights",
        ".cache/minilm/model.safetensors",
        "--input",
        "text=A man is eating food.",
        "-o",
        out_file.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `embedding: f32[1, 384] [v0, v1, ...]`, six decimals.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("embedding: f32[1, 384] ["))
        .expect(&stdout);
    let values: Vec<f32> = line
        .split('[')
        .nth(2)
        .expect("values")
        .split(", ")
        .filter_map(|v| v.trim_end_matches(']').parse().ok())
        .collect();
    assert_eq!(values.len(), 6, "{line}");
    // Row 0 of the sentence-transformers reference (tests/fixtures/minilm).
    let reference = vlmc_runtime::weights::WeightFile::open(
        &root.join("tests/fixtures/minilm/reference.safetensors"),
    )
    .expect("reference")
    .get("embeddings")
    .expect("embeddings");
    let want = &reference.as_f32().expect("f32")[..6];
    for (g, w) in values.iter().zip(want) {
        assert!((g - w).abs() <= 1.5e-6, "printed {g}, reference {w}");
    }
    let saved = vlmc_runtime::weights::WeightFile::open(&out_file)
        .expect("outputs saved")
        .get("embedding")
        .expect("embedding");
    assert_eq!(saved.shape, vec![1, 384]);
    std::fs::remove_file(&out_file).ok();
}

#[test]
fn set_overrides_compile_time_parameters() {
    let dir = std::env::temp_dir().join(format!("vlmc-cli-set-{}", std::process::id()));
    let d = dir.to_str().expect("utf-8");
    let out = vlmc(&[
        "build",
        "models/clip_tiny.vlm",
        "--set",
        "embed=24",
        "--set",
        "image=16",
        "-o",
        d,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ir = std::fs::read_to_string(dir.join("ClipTiny.ir")).expect("ir");
    assert!(ir.contains("input \"pixels\" : f32[B, 3, 16, 16]"), "{ir}");
    assert!(ir.contains("param \"visual_projection.weight\" init=kaiming_uniform(a=2.23606797749979) : f32[24, 64]"), "{ir}");
    let out = vlmc(&[
        "build",
        "models/clip_tiny.vlm",
        "--set",
        "embedd=24",
        "-o",
        d,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("model `ClipTiny` has no parameter `embedd` to set"));
    std::fs::remove_dir_all(&dir).ok();
}
