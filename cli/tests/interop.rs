//! The `vlmc` binary with transformers' files: `--weights` on a Hugging Face folder and on an
//! exported sharded checkpoint, inputs named as transformers names them and taken from inside a
//! safetensors file, checked against the outputs transformers computed (tests/fixtures/zoo).

use std::path::{Path, PathBuf};
use std::process::Command;
use vlmc_runtime::weights::WeightFile;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn vlmc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vlmc"))
        .args(args)
        .current_dir(root())
        .env(
            "VLMC_CACHE_DIR",
            std::env::temp_dir().join(format!("vlmc-interop-cache-{}", std::process::id())),
        )
        .output()
        .expect("vlmc runs")
}

/// max |got - want| / max |want|.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
    got.iter()
        .zip(want)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0f64, f64::max)
        / scale.max(1e-30)
}

/// `vlmc run --interp` of the LLaVA fixture with `weights`, inputs named `input_ids`,
/// `attention_mask`, `pixel_values` read from io.safetensors by tensor name; returns the
/// relative error of its logits against transformers'.
fn run_llava(weights: &str, out: &Path) -> f64 {
    let io = "tests/fixtures/zoo/llava/io.safetensors";
    let args = [
        "run",
        "tests/fixtures/zoo/llava/fixture.vlm",
        "--weights",
        weights,
        "--input",
        &format!("input_ids={io}:ids"),
        "--input",
        &format!("attention_mask={io}:mask"),
        "--input",
        &format!("pixel_values={io}:pixels"),
        "--interp",
        "-o",
        out.to_str().expect("utf-8"),
    ];
    let done = vlmc(&args);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let got = WeightFile::open(out)
        .expect("outputs")
        .get("logits")
        .expect("logits");
    let want = WeightFile::open(&root().join(io))
        .expect("io")
        .get("expect.logits")
        .expect("expected logits");
    assert_eq!(got.shape, want.shape);
    relative_error(got.as_f32().expect("f32"), want.as_f32().expect("f32"))
}

#[test]
fn a_hugging_face_folder_and_its_export_run_like_transformers() {
    let dir = std::env::temp_dir().join(format!("vlmc-interop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    let err = run_llava("tests/fixtures/zoo/llava", &dir.join("a.safetensors"));
    assert!(err <= 1e-4, "from the folder: relative error {err:.2e}");

    let hf = dir.join("hf");
    let done = vlmc(&[
        "export",
        "tests/fixtures/zoo/llava/fixture.vlm",
        "--weights",
        "tests/fixtures/zoo/llava/model.safetensors",
        "--hf",
        hf.to_str().expect("utf-8"),
        "--max-shard-size",
        "100KB",
    ]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains("(LlavaForConditionalGeneration): config.json and 80 tensors"),
        "{stderr}"
    );
    let index = hf.join("model.safetensors.index.json");
    assert!(index.is_file());
    let err = run_llava(index.to_str().expect("utf-8"), &dir.join("b.safetensors"));
    assert!(err <= 1e-4, "from the export: relative error {err:.2e}");

    // a second export into the same folder is refused and leaves it as it was
    let before = std::fs::read(&index).expect("index");
    let again = vlmc(&[
        "export",
        "tests/fixtures/zoo/llava/fixture.vlm",
        "--weights",
        "tests/fixtures/zoo/llava",
        "--hf",
        hf.to_str().expect("utf-8"),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"));
    assert_eq!(std::fs::read(&index).expect("index"), before);

    // a model with no transformers class is refused with the reason
    let clipcap = vlmc(&[
        "export",
        "tests/fixtures/zoo/clipcap/fixture.vlm",
        "--weights",
        "tests/fixtures/zoo/clipcap",
        "--hf",
        dir.join("clipcap").to_str().expect("utf-8"),
    ]);
    assert_eq!(clipcap.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&clipcap.stderr).contains("has no transformers class"),
        "{}",
        String::from_utf8_lossy(&clipcap.stderr)
    );
    assert!(!dir.join("clipcap").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
