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

/// `vlmc export --adapter`: a LoRA adapter goes out under transformers' module names beside the
/// exported model, whatever names it came in with. SmolLM2's spec holds the decoder as `lm.*`
/// (`checkpoint { "model." => "lm.model." }`): an adapter named as PEFT names it on
/// `LlamaForCausalLM` (`model.layers...`) and the same adapter under the spec's paths
/// (`lm.model.layers...`, as vlmc's trainers write it) both export as PEFT's tensors, byte for
/// byte, with `base_model_name_or_path` the export.
#[test]
fn export_writes_an_adapter_under_transformers_names() {
    let work = std::env::temp_dir().join(format!("vlmc-interop-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("mkdir");
    let s = |p: &Path| p.display().to_string();
    let sets = [
        "vocab=15",
        "dim=32",
        "depth=2",
        "heads=4",
        "kv_heads=2",
        "ffn=48",
        "context=64",
    ];
    let with_sets = |mut v: Vec<String>| {
        for kv in sets {
            v.push("--set".into());
            v.push(kv.into());
        }
        v
    };
    let base = work.join("base.safetensors");
    let args = with_sets(vec![
        "init".into(),
        "models/smollm2.vlm".into(),
        "--seed".into(),
        "3".into(),
        "-o".into(),
        s(&base),
    ]);
    let o = vlmc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the same adapter (rank 2 on q_proj, non-zero A and B) under two namings
    let write_adapter = |dir: &Path, prefix: &str| {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut t = std::collections::BTreeMap::new();
        for l in 0..2 {
            let a: Vec<f32> = (0..64)
                .map(|i| ((i * 7 + l) % 13) as f32 / 13.0 - 0.4)
                .collect();
            let b: Vec<f32> = (0..64)
                .map(|i| ((i * 5 + l) % 11) as f32 / 11.0 - 0.5)
                .collect();
            let m = format!("base_model.model.{prefix}layers.{l}.self_attn.q_proj");
            t.insert(
                format!("{m}.lora_A.weight"),
                vlmc_runtime::Tensor::f32(vec![2, 32], a),
            );
            t.insert(
                format!("{m}.lora_B.weight"),
                vlmc_runtime::Tensor::f32(vec![32, 2], b),
            );
        }
        vlmc_runtime::weights::save(&dir.join("adapter_model.safetensors"), &t).expect("save");
        let cfg = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
            "lora_alpha": 4, "lora_dropout": 0.1, "target_modules": ["q_proj"], "bias": "none",
            "fan_in_fan_out": false});
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).expect("config");
    };
    let (hf_named, spec_named) = (work.join("peft"), work.join("vlmc"));
    write_adapter(&hf_named, "model.");
    write_adapter(&spec_named, "lm.model.");
    let want = WeightFile::open(&hf_named.join("adapter_model.safetensors")).expect("peft");
    for (i, adapter) in [&hf_named, &spec_named].into_iter().enumerate() {
        let out = work.join(format!("export{i}"));
        let args = with_sets(vec![
            "export".into(),
            "models/smollm2.vlm".into(),
            "--weights".into(),
            s(&base),
            "--adapter".into(),
            s(adapter),
            "--hf".into(),
            s(&out),
        ]);
        let o = vlmc(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = WeightFile::open(&out.join("adapter/adapter_model.safetensors")).expect("out");
        assert_eq!(got.names(), want.names(), "{}", adapter.display());
        for n in want.names() {
            assert_eq!(
                got.get(&n).expect("got"),
                want.get(&n).expect("want"),
                "{n}"
            );
        }
        // every adapted module is a module of the exported model
        let model = WeightFile::open(&out.join("model.safetensors")).expect("model");
        for n in got.names() {
            let module = n
                .strip_prefix("base_model.model.")
                .and_then(|m| m.split(".lora_").next())
                .expect("PEFT key");
            assert!(model.names().contains(&format!("{module}.weight")), "{n}");
        }
        let cfg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("adapter/adapter_config.json")).expect("config"),
        )
        .expect("json");
        assert_eq!(cfg["base_model_name_or_path"], s(&out));
        assert_eq!(
            (cfg["r"].as_u64(), cfg["lora_dropout"].as_f64()),
            (Some(2), Some(0.1))
        );
        assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj"]));
    }
    let _ = std::fs::remove_dir_all(&work);
}
