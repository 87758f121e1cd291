//! Weights: binding safetensors files to a model by name, every bad-file case with its error,
//! name rules, saving, and initialisation from the declared init rules.

mod common;

use common::npy_bytes;
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

/// `WeightFile::open`'s error on `bytes`, written to a file of its own.
fn open_error(name: &str, bytes: &[u8]) -> String {
    let path = tmp(name);
    std::fs::write(&path, bytes).expect("write");
    match WeightFile::open(&path) {
        Err(e) => e.message,
        Ok(_) => panic!("{name} should not open"),
    }
}

/// No message names a raw error enum of the safetensors crate.
fn assert_english(e: &str) {
    common::assert_no_raw_error(e);
}

#[test]
fn safetensors_errors_say_what_is_wrong_in_words() {
    let good = raw_file(&[
        ("a", "F32", vec![2], vec![0; 8]),
        ("b", "I32", vec![1], vec![0; 4]),
    ]);
    // Trailing bytes are not truncation.
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0; 5]);
    let e = open_error("trailing.safetensors", &trailing);
    assert!(
        e.contains("5 bytes of trailing data after the last tensor") && !e.contains("truncated"),
        "{e}"
    );
    let e = open_error("cut.safetensors", &good[..good.len() - 3]);
    assert!(e.contains("3 bytes missing (truncated)"), "{e}");
    // Header problems, each named.
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "too short"),
        (
            "huge-len",
            u64::MAX.to_le_bytes().to_vec(),
            "more than the 100 MB",
        ),
        (
            "len-past-end",
            64u64.to_le_bytes().to_vec(),
            "only 0 bytes follow",
        ),
    ];
    let header = |text: &str| {
        let mut b = (text.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(text.as_bytes());
        b
    };
    // Headers that are not a table of tensors: (case, header text, what the error says).
    let a = |dtype: &str, shape: &str, offsets: &str| {
        format!(r#"{{"a": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}}}}}"#)
    };
    let headers = [
        (
            "not-json",
            "{\"a\": not json }".to_string(),
            "not valid JSON",
        ),
        (
            "array",
            "[1, 2]".to_string(),
            "not an object of tensors (it is an array)",
        ),
        (
            "no-dtype",
            r#"{"a": {"shape": [1], "data_offsets": [0, 4]}}"#.to_string(),
            "tensor `a` is invalid: missing field `dtype`",
        ),
        (
            "bad-dtype",
            a("F128", "[1]", "[0, 4]"),
            "unknown variant `F128`",
        ),
        (
            "bad-size",
            a("F32", "[2]", "[0, 4]"),
            "tensor `a` is F32[2], 8 bytes, but its data_offsets [0, 4] span 4 bytes",
        ),
        ("gap", a("F32", "[1]", "[4, 8]"), "a gap"),
        (
            "backwards",
            a("F32", "[1]", "[8, 4]"),
            "the end is before the start",
        ),
        (
            "overflow",
            a("F32", "[4294967296, 4294967296]", "[0, 4]"),
            "its size overflows",
        ),
        (
            "metadata",
            r#"{"__metadata__": {"k": 3}}"#.to_string(),
            "`__metadata__` must map strings to strings",
        ),
    ];
    cases.extend(
        headers
            .into_iter()
            .map(|(name, text, want)| (name, header(&text), want)),
    );
    let mut latin1 = 4u64.to_le_bytes().to_vec();
    latin1.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    cases.push(("latin1", latin1, "not UTF-8 text"));
    for (name, bytes, want) in cases {
        let e = open_error(&format!("{name}.safetensors"), &bytes);
        assert!(
            e.contains("is not a valid safetensors file") && e.contains(want),
            "{name}: {e}"
        );
        assert_english(&e);
    }
    // Overlapping tensors.
    let overlap = {
        let text = r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
        let mut b = header(text);
        b.extend_from_slice(&[0; 8]);
        b
    };
    let e = open_error("overlap.safetensors", &overlap);
    assert!(e.contains("an overlap") && e.contains("tensor `b`"), "{e}");
    // The crate's own errors, should one get past the checks, are words too.
    use vlmc_runtime::weights::SafeTensorError as E;
    for err in [
        E::InvalidHeader,
        E::InvalidHeaderStart,
        E::InvalidHeaderDeserialization,
        E::HeaderTooLarge,
        E::HeaderTooSmall,
        E::InvalidHeaderLength,
        E::TensorNotFound("t".into()),
        E::TensorInvalidInfo,
        E::InvalidOffset("t".into()),
        E::MetadataIncompleteBuffer,
        E::ValidationOverflow,
    ] {
        let text = vlmc_runtime::weights::describe_error(&err);
        assert!(text.contains(' '), "{text}");
        assert_english(&text);
    }
}

/// Runs `f` on another thread and fails the test if it takes more than 20 s (a read that
/// blocks on a FIFO would otherwise hang the suite).
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("finished without blocking")
}

#[cfg(unix)]
#[test]
fn weights_and_inputs_must_be_regular_files() {
    let dir = tmp("nonregular");
    std::fs::create_dir_all(&dir).expect("dir");
    let fifo = dir.join("pipe.safetensors");
    let _ = std::fs::remove_file(&fifo);
    common::mkfifo(&fifo);
    let f = fifo.clone();
    let e = within_seconds(move || WeightFile::open(&f).err().expect("a FIFO").message);
    assert_eq!(
        e,
        format!(
            "cannot open {}: it is a FIFO (named pipe), not a regular file",
            fifo.display()
        )
    );
    let e = WeightFile::open(&dir).err().expect("a directory").message;
    assert!(e.ends_with("it is a directory, not a regular file"), "{e}");
    let e = WeightFile::open(Path::new("/dev/null"))
        .err()
        .expect("a device")
        .message;
    assert!(e.contains("character device"), "{e}");
    let npy = dir.join("pipe.npy");
    let _ = std::fs::remove_file(&npy);
    common::mkfifo(&npy);
    let n = npy.clone();
    let e = within_seconds(move || {
        vlmc_runtime::inputs::read_npy(&n)
            .expect_err("FIFO")
            .message
    });
    assert!(e.contains("FIFO") && e.contains("pipe.npy"), "{e}");
    let n = npy.clone();
    let e = within_seconds(move || {
        vlmc_runtime::inputs::read_image(&n)
            .expect_err("FIFO")
            .message
    });
    assert!(e.contains("FIFO"), "{e}");
    let n = npy.clone();
    let e = within_seconds(move || {
        vlmc_runtime::inputs::load_tokenizer(&n)
            .expect_err("FIFO")
            .message
    });
    assert!(e.contains("FIFO"), "{e}");
    let _ = std::fs::remove_file(&fifo);
    let _ = std::fs::remove_file(&npy);
}

#[test]
fn npy_arrays_read_and_their_errors_say_what_is_wrong() {
    use vlmc_runtime::inputs::parse_npy;
    let f32s: Vec<u8> = [1.5f32, -2.0, 3.25]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let t = parse_npy(&npy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
        &f32s,
    ))
    .expect("f4");
    assert_eq!(t, Tensor::f32(vec![3], vec![1.5, -2.0, 3.25]));
    let big: Vec<u8> = [7i64, -9].iter().flat_map(|x| x.to_be_bytes()).collect();
    let t = parse_npy(&npy_bytes(
        "{'descr': '>i8', 'fortran_order': False, 'shape': (1, 2), }",
        &big,
    ))
    .expect("big-endian i8");
    assert_eq!(t, Tensor::i32(vec![1, 2], vec![7, -9]));
    let t = parse_npy(&npy_bytes(
        "{'descr': '|b1', 'fortran_order': False, 'shape': (), }",
        &[1],
    ))
    .expect("a scalar bool");
    assert_eq!(t, Tensor::bool(vec![], vec![true]));
    let header = |d: &str| npy_bytes(d, &f32s);
    for (bytes, want) in [
        (b"PK\x03\x04".to_vec(), "not a .npy file"),
        (b"\x93NUMPY\x09\x00".to_vec(), "version 9.0 is not supported"),
        (b"\x93NUMPY\x01\x00\xff\x00{".to_vec(), "the .npy header is truncated"),
        (
            header("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }"),
            "4 missing: truncated",
        ),
        (
            header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"),
            "4 bytes of trailing data after the array",
        ),
        (
            header("{'descr': '<U3', 'fortran_order': False, 'shape': (1,), }"),
            "dtype `U3` is not supported",
        ),
        (
            header("{'descr': '<f4', 'fortran_order': True, 'shape': (3,), }"),
            "Fortran-order",
        ),
        (
            header("{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }"),
            "`shape` holds `-3`, not a non-negative integer",
        ),
        (
            header("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, 99999999999), }"),
            "is too large",
        ),
        (
            header("{'descr': '<f4', 'fortran_order': False }"),
            "has no `shape`",
        ),
        (header("not a dict"), "the .npy header is malformed"),
    ] {
        let e = parse_npy(&bytes).expect_err(want);
        assert!(e.contains(want), "want {want:?}: {e}");
    }
}

#[test]
fn unknown_input_names_are_errors_that_list_the_inputs() {
    let dir = tmp("unknown-inputs");
    std::fs::create_dir_all(&dir).expect("dir");
    let x = dir.join("x.safetensors");
    save(
        &x,
        &BTreeMap::from([("x".to_string(), Tensor::f32(vec![1, 4], vec![0.0; 4]))]),
    )
    .expect("save");
    let pairs = |name: &str| vec![(name.to_string(), x.display().to_string())];
    let gather = |p: &[(String, String)]| {
        vlmc_runtime::inputs::gather_inputs(p, &["x", "mask"], &[], &dir, None)
    };
    let got = gather(&pairs("x")).expect("a known input");
    assert_eq!(got["x"].shape, vec![1, 4]);
    let e = gather(&pairs("y")).expect_err("unknown").message;
    assert!(
        e.contains("the model has no input `y`; its inputs are: `x`, `mask`"),
        "{e}"
    );
    let twice = [pairs("x"), pairs("x")].concat();
    let e = gather(&twice).expect_err("twice").message;
    assert!(e.contains("input `x` is given twice"), "{e}");
    let e = gather(&pairs("image"))
        .expect_err("no image preprocessing")
        .message;
    assert!(e.contains("preprocess") && e.contains("`x`, `mask`"), "{e}");
}

#[cfg(unix)]
#[test]
fn save_writes_through_symlinks_and_refuses_fifos_and_folders() {
    let dir = tmp("save-targets");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let real = dir.join("real.safetensors");
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink("real.safetensors", &link).expect("symlink");
    save(&link, &good_tensors()).expect("through the link");
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
    assert_eq!(WeightFile::open(&real).expect("target").names().len(), 4);
    let fifo = dir.join("pipe.safetensors");
    common::mkfifo(&fifo);
    let e = within_seconds({
        let fifo = fifo.clone();
        move || save(&fifo, &good_tensors()).expect_err("a FIFO").message
    });
    assert!(e.contains("FIFO"), "{e}");
    assert!(std::fs::symlink_metadata(&fifo)
        .map(|m| !m.is_file())
        .unwrap_or(false));
    let e = save(&dir, &good_tensors()).expect_err("a folder").message;
    assert!(e.contains("directory"), "{e}");
    save(Path::new("/dev/null"), &good_tensors()).expect("/dev/null takes anything");
    // Concurrent writers of one path each use their own temporary file.
    let target = dir.join("shared.safetensors");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let target = target.clone();
            std::thread::spawn(move || save(&target, &good_tensors()).expect("save"))
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    assert_eq!(WeightFile::open(&target).expect("whole").names().len(), 4);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
