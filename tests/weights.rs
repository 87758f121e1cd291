//! Weights: binding safetensors files to a model by name, every bad-file case with its error,
//! name rules, saving, and initialisation from the declared init rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc::elab::Elaborated;
use vlmc_runtime::weights::{bind, save, WeightFile};
use vlmc_runtime::Tensor;

const SMALL: &str = r#"
use std.nn.{Linear, LayerNorm}

model Small {
  proj = Linear(4, 3)
  norm = LayerNorm(3)
  checkpoint {
    "model." => ""
    ignore "extra."
  }
  fn forward(x: f32[B, 4]) -> f32[B, 3] {
    return norm(proj(x))
  }
}
"#;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmc-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    dir.join(name)
}

fn small() -> Elaborated {
    // One file per call: tests run in parallel threads, and a file rewritten while another
    // test reads it can be seen empty.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = tmp(&format!("small{n}.vlm"));
    std::fs::write(&path, SMALL).expect("write");
    let checked = vlmc::elab::check_file(&path);
    let text = checked.render();
    checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .remove(0)
}

fn f32s(n: usize, start: f32) -> Vec<f32> {
    (0..n).map(|i| start + i as f32 * 0.25).collect()
}

/// A complete, correct checkpoint for `Small`, with Hugging Face's `model.` prefix.
fn good_tensors() -> BTreeMap<String, Tensor> {
    BTreeMap::from([
        (
            "model.proj.weight".to_string(),
            Tensor::f32(vec![3, 4], f32s(12, -1.0)),
        ),
        (
            "model.proj.bias".to_string(),
            Tensor::f32(vec![3], f32s(3, 0.5)),
        ),
        (
            "model.norm.weight".to_string(),
            Tensor::f32(vec![3], f32s(3, 1.0)),
        ),
        (
            "model.norm.bias".to_string(),
            Tensor::f32(vec![3], f32s(3, -0.5)),
        ),
    ])
}

/// A safetensors file built by hand (for dtypes and layouts `save` never writes).
fn raw_file(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, (name, dtype, shape, bytes)) in entries.iter().enumerate() {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            dims.join(","),
            data.len(),
            data.len() + bytes.len()
        ));
        data.extend_from_slice(bytes);
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn bind_error(model: &Elaborated, path: &Path) -> String {
    match WeightFile::open(path) {
        Err(e) => e.message,
        Ok(f) => match bind(&model.graph, &f, &model.checkpoint) {
            Err(e) => e.message,
            Ok(_) => panic!("{} should not bind", path.display()),
        },
    }
}

#[test]
fn a_good_checkpoint_binds_through_the_name_rules() {
    let m = small();
    let path = tmp("good.safetensors");
    let mut t = good_tensors();
    t.insert(
        "extra.rotary.inv_freq".into(),
        Tensor::f32(vec![2], vec![1.0, 2.0]),
    );
    t.insert(
        "model.pooler.weight".into(),
        Tensor::f32(vec![2], vec![1.0, 2.0]),
    );
    save(&path, &t).expect("save");
    let f = WeightFile::open(&path).expect("open");
    let b = bind(&m.graph, &f, &m.checkpoint).expect("bind");
    assert_eq!(b.params["proj.weight"], t["model.proj.weight"]);
    assert_eq!(b.params["norm.bias"], t["model.norm.bias"]);
    // `extra.` is ignored by a rule; the pooler is reported as unused.
    assert_eq!(b.unused, vec!["model.pooler.weight".to_string()]);
}

#[test]
fn legacy_layernorm_gamma_and_beta_bind() {
    let m = small();
    let mut t = good_tensors();
    let w = t.remove("model.norm.weight").expect("w");
    let b = t.remove("model.norm.bias").expect("b");
    t.insert("model.norm.gamma".into(), w.clone());
    t.insert("model.norm.beta".into(), b.clone());
    let path = tmp("legacy.safetensors");
    save(&path, &t).expect("save");
    let bound = bind(
        &m.graph,
        &WeightFile::open(&path).expect("open"),
        &m.checkpoint,
    )
    .expect("bind");
    assert_eq!(bound.params["norm.weight"], w);
    assert_eq!(bound.params["norm.bias"], b);
}

#[test]
fn half_precision_weights_convert_on_load() {
    let m = small();
    let mut entries = Vec::new();
    let tensors = good_tensors();
    let mut owned = Vec::new();
    for (name, t) in &tensors {
        let bytes: Vec<u8> = t
            .as_f32()
            .expect("f32")
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        owned.push((name.clone(), t.shape.clone(), bytes));
    }
    for (n, s, b) in &owned {
        entries.push((n.as_str(), "BF16", s.clone(), b.clone()));
    }
    let path = tmp("bf16.safetensors");
    std::fs::write(&path, raw_file(&entries)).expect("write");
    let bound = bind(
        &m.graph,
        &WeightFile::open(&path).expect("open"),
        &m.checkpoint,
    )
    .expect("bind");
    // Every value of good_tensors is a multiple of 0.25 in [-1, 2]: exact in bf16.
    assert_eq!(bound.params["proj.weight"], tensors["model.proj.weight"]);
}

#[test]
fn a_missing_tensor_is_named_with_its_shape() {
    let m = small();
    let mut t = good_tensors();
    t.remove("model.proj.bias");
    let path = tmp("missing.safetensors");
    save(&path, &t).expect("save");
    let e = bind_error(&m, &path);
    assert!(
        e.contains("parameter `proj.bias` (f32[3]) has no tensor in"),
        "{e}"
    );
}

#[test]
fn a_wrong_shape_names_the_tensor_and_both_shapes() {
    let m = small();
    let mut t = good_tensors();
    t.insert(
        "model.proj.weight".into(),
        Tensor::f32(vec![4, 3], f32s(12, 0.0)),
    );
    let path = tmp("shape.safetensors");
    save(&path, &t).expect("save");
    let e = bind_error(&m, &path);
    assert!(
        e.contains(
            "tensor `model.proj.weight` is f32[4, 3] but parameter `proj.weight` is f32[3, 4]"
        ),
        "{e}"
    );
}

#[test]
fn a_wrong_dtype_is_reported() {
    let m = small();
    let mut t = good_tensors();
    t.insert(
        "model.norm.bias".into(),
        Tensor::i32(vec![3], vec![1, 2, 3]),
    );
    let path = tmp("dtype.safetensors");
    save(&path, &t).expect("save");
    let e = bind_error(&m, &path);
    assert!(
        e.contains("tensor `model.norm.bias` holds i32 values but parameter `norm.bias` is f32[3]"),
        "{e}"
    );

    let path = tmp("u8.safetensors");
    std::fs::write(
        &path,
        raw_file(&[("model.proj.bias", "U8", vec![3], vec![1, 2, 3])]),
    )
    .expect("write");
    let f = WeightFile::open(&path).expect("a valid file");
    let e = f
        .get("model.proj.bias")
        .expect_err("u8 is not readable")
        .message;
    assert!(e.contains("has dtype U8, which vlmc cannot read"), "{e}");
}

#[test]
fn a_truncated_file_is_rejected() {
    let path = tmp("full.safetensors");
    save(&path, &good_tensors()).expect("save");
    let bytes = std::fs::read(&path).expect("read");
    let cut = tmp("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).expect("write");
    let e = WeightFile::open(&cut).err().expect("truncated").message;
    assert!(
        e.contains("is not a valid safetensors file") && e.contains("truncated"),
        "{e}"
    );
    let tiny = tmp("tiny.safetensors");
    std::fs::write(&tiny, [1u8, 2, 3]).expect("write");
    let e = WeightFile::open(&tiny).err().expect("too small").message;
    assert!(e.contains("too short"), "{e}");
}

#[test]
fn a_malformed_header_is_rejected() {
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\": not json }");
    let path = tmp("header.safetensors");
    std::fs::write(&path, bytes).expect("write");
    let e = WeightFile::open(&path).err().expect("malformed").message;
    assert!(e.contains("is not a valid safetensors file"), "{e}");
    assert!(WeightFile::open(&tmp("does-not-exist.safetensors")).is_err());
}

#[test]
fn two_names_for_one_parameter_are_an_error() {
    let m = small();
    let mut t = good_tensors();
    t.insert("proj.weight".into(), Tensor::f32(vec![3, 4], f32s(12, 0.0)));
    let path = tmp("twice.safetensors");
    save(&path, &t).expect("save");
    let e = bind_error(&m, &path);
    assert!(e.contains("both map to parameter `proj.weight`"), "{e}");
}

#[test]
fn save_is_atomic_and_round_trips() {
    let dir = tmp("roundtrip");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("w.safetensors");
    let mut t = good_tensors();
    t.insert("mask".into(), Tensor::bool(vec![2], vec![true, false]));
    t.insert("ids".into(), Tensor::i32(vec![2, 1], vec![-7, 30521]));
    save(&path, &t).expect("save");
    let f = WeightFile::open(&path).expect("open");
    for (name, tensor) in &t {
        assert_eq!(&f.get(name).expect("read back"), tensor, "{name}");
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["w.safetensors".to_string()],
        "no temporary file is left behind"
    );
}

#[test]
fn init_follows_the_declared_rules_deterministically() {
    let path = Path::new("models/llava_tiny.vlm");
    let checked = vlmc::elab::check_file(path);
    let m = checked.result.expect("llava_tiny checks").remove(0);
    let a = vlmc_runtime::init::init_params(&m.graph, 7).expect("init");
    let b = vlmc_runtime::init::init_params(&m.graph, 7).expect("init");
    let c = vlmc_runtime::init::init_params(&m.graph, 8).expect("init");
    assert_eq!(a, b, "same seed, same weights");
    let q = "language_model.model.layers.0.self_attn.q_proj.weight";
    assert_ne!(a[q], c[q], "another seed, other weights");
    // LayerNorm / RMSNorm weights are ones, biases zeros.
    assert!(a["vision_tower.pre_layrnorm.weight"]
        .as_f32()
        .expect("f32")
        .iter()
        .all(|&x| x == 1.0));
    assert!(a["vision_tower.pre_layrnorm.bias"]
        .as_f32()
        .expect("f32")
        .iter()
        .all(|&x| x == 0.0));
    // Linear weights: kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in).
    let w = a[q].as_f32().expect("f32");
    let bound = 1.0 / (96f32).sqrt();
    assert!(w.iter().all(|x| x.abs() <= bound + 1e-7));
    let mean = w.iter().map(|&x| f64::from(x)).sum::<f64>() / w.len() as f64;
    let var = w
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / w.len() as f64;
    // Uniform(-b, b) has variance b^2 / 3.
    let want = f64::from(bound * bound) / 3.0;
    assert!(
        mean.abs() < 0.01 && (var - want).abs() / want < 0.05,
        "mean {mean}, var {var} vs {want}"
    );
    // Embeddings: normal(std 0.02).
    let e = a["language_model.model.embed_tokens.weight"]
        .as_f32()
        .expect("f32");
    let std = (e.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.001, "std {std}");
}

#[test]
fn init_then_run_works_for_the_example_models() {
    for (file, inputs) in [
        (
            "models/llava_tiny.vlm",
            vec![
                ("pixels", vec![2, 3, 32, 32], false),
                ("ids", vec![2, 5], true),
            ],
        ),
        (
            "models/clip_tiny.vlm",
            vec![
                ("pixels", vec![2, 3, 32, 32], false),
                ("ids", vec![3, 7], true),
            ],
        ),
    ] {
        let checked = vlmc::elab::check_file(Path::new(file));
        let m = checked.result.expect("checks").remove(0);
        let params = vlmc_runtime::init::init_params(&m.graph, 1).expect("init");
        let path = tmp(&format!("{}.safetensors", m.model));
        save(&path, &params).expect("save");
        let bound = bind(
            &m.graph,
            &WeightFile::open(&path).expect("open"),
            &m.checkpoint,
        )
        .expect("bind");
        let ins: BTreeMap<String, Tensor> = inputs
            .into_iter()
            .map(|(n, shape, int)| {
                let len: usize = shape.iter().product();
                let t = if int {
                    Tensor::i32(shape, (0..len).map(|i| (i * 37 % 500) as i32 + 1).collect())
                } else {
                    Tensor::f32(
                        shape,
                        (0..len)
                            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
                            .collect(),
                    )
                };
                (n.to_string(), t)
            })
            .collect();
        let out = vlmc_runtime::run(&m.graph, &ins, &bound.params).expect("run");
        for (name, t) in &out {
            let v = t.as_f32().expect("f32 outputs");
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{file}: {name} has non-finite values"
            );
        }
        if file.ends_with("clip_tiny.vlm") {
            assert_eq!(out["logits_per_image"].shape, vec![2, 3]);
            let e = out["image_embeds"].as_f32().expect("f32");
            let norm: f32 = e[..40].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-5,
                "image embeddings are unit vectors: {norm}"
            );
        } else {
            assert_eq!(out["output"].shape, vec![2, 16 + 5, 512]);
        }
    }
}
