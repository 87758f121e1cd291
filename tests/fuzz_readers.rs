//! Robustness of the readers of user files and arguments: random and mutated bytes fed to the
//! safetensors reader (header checks, opening, reading every tensor), the `.npy` reader and the
//! JSONL training-data reader, and random strings to the `--dims`, `--set` and `--input`
//! parsers. None may panic; every refusal is a rendered English message (no raw enum names of
//! the libraries underneath). Cases are bounded so the whole file runs in seconds.

mod common;

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use vlmc_runtime::weights::{check_layout, save, WeightFile};
use vlmc_runtime::Tensor;

fn tmp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-fuzz-readers-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

/// A file of its own for one case (cases run on several threads).
fn tmp_file(ext: &str, bytes: &[u8]) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = tmp_dir().join(format!("case{n}.{ext}"));
    std::fs::write(&p, bytes).expect("write");
    p
}

/// A refusal must be a sentence, never a Debug dump of an error enum.
fn assert_rendered(message: &str) {
    assert!(!message.trim().is_empty(), "an empty error");
    common::assert_no_raw_error(message);
}

/// A valid safetensors file with tensors of every dtype vlmc reads (and one it does not).
fn valid_safetensors() -> Vec<u8> {
    let path = tmp_dir().join("valid.safetensors");
    let tensors = BTreeMap::from([
        ("a".to_string(), Tensor::f32(vec![2, 3], vec![0.5; 6])),
        ("b".to_string(), Tensor::i32(vec![4], vec![1, -2, 3, 70000])),
        (
            "c".to_string(),
            Tensor::bool(vec![3], vec![true, false, true]),
        ),
        ("d".to_string(), Tensor::f32(vec![0, 5], vec![])),
    ]);
    save(&path, &tensors).expect("save");
    std::fs::read(&path).expect("read")
}

/// The byte-level edits the mutation tests apply.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
    /// Replaces a run of ASCII digits (a size, a shape, an offset) with another number.
    Number(usize, u64),
    /// Replaces the 8-byte header length.
    HeaderLen(u64),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Edit::Flip(i, x)),
        any::<usize>().prop_map(Edit::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Edit::Append),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u64),
                Just(1),
                0u64..100,
                Just(u64::MAX),
                Just(1 << 32),
                any::<u64>()
            ]
        )
            .prop_map(|(i, n)| Edit::Number(i, n)),
        prop_oneof![Just(0u64), Just(u64::MAX), 0u64..400, Just(100_000_001)]
            .prop_map(Edit::HeaderLen),
    ]
}

fn apply(bytes: &mut Vec<u8>, e: &Edit) {
    let len = bytes.len().max(1);
    match e {
        Edit::Flip(i, x) => {
            if !bytes.is_empty() {
                bytes[i % len] ^= x;
            }
        }
        Edit::Truncate(i) => bytes.truncate(i % len),
        Edit::Append(b) => bytes.extend_from_slice(b),
        Edit::Delete(i, n) => {
            let at = i % len;
            let end = (at + n).min(bytes.len());
            if at < end {
                bytes.drain(at..end);
            }
        }
        Edit::Insert(i, b) => {
            let at = (i % len).min(bytes.len());
            bytes.splice(at..at, b.iter().copied());
        }
        Edit::Number(i, n) => {
            let digits: Vec<usize> = (0..bytes.len())
                .filter(|&k| {
                    bytes[k].is_ascii_digit() && (k == 0 || !bytes[k - 1].is_ascii_digit())
                })
                .collect();
            if let Some(&start) = digits.get(i % digits.len().max(1)) {
                let mut end = start;
                while end < bytes.len() && bytes[end].is_ascii_digit() {
                    end += 1;
                }
                bytes.splice(start..end, n.to_string().bytes());
            }
        }
        Edit::HeaderLen(n) => {
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
    }
}

/// Opens `bytes` as a weights file: an error is rendered; a file that opens reads every
/// tensor (each read succeeds or is a rendered error).
fn exercise_safetensors(bytes: &[u8]) {
    let layout = check_layout(bytes);
    if let Err(e) = &layout {
        assert_rendered(e);
    }
    let path = tmp_file("safetensors", bytes);
    match WeightFile::open(&path) {
        Err(e) => {
            assert_rendered(&e.message);
            assert!(
                e.message.contains("is not a valid safetensors file")
                    || e.message.contains("cannot")
            );
        }
        Ok(f) => {
            assert!(layout.is_ok(), "opened a file the layout check refuses");
            for name in f.names() {
                let _ = f.info(&name);
                match f.get(&name) {
                    Ok(t) => assert_eq!(t.numel(), t.shape.iter().product::<usize>()),
                    Err(e) => assert_rendered(&e.message),
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The bytes of `values`, each written by `bytes` (e.g. `f32::to_le_bytes`).
fn bytes_of<T: Copy, const N: usize>(values: &[T], bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&x| bytes(x)).collect()
}

/// A valid .npy file of one of the dtypes vlmc reads.
fn valid_npy(kind: u8) -> Vec<u8> {
    let (descr, data): (&str, Vec<u8>) = match kind % 5 {
        0 => (
            "<f4",
            bytes_of(&[1.5f32, -2.0, 0.25, 8.0, 1e-3, 7.0], f32::to_le_bytes),
        ),
        1 => (
            "<f8",
            bytes_of(&[1.5f64, -2.0, 0.25, 8.0, 1e-3, 7.0], f64::to_le_bytes),
        ),
        2 => ("<i4", bytes_of(&[1i32, -2, 3, 4, 5, 6], i32::to_le_bytes)),
        3 => (">i8", bytes_of(&[1i64, -2, 3, 4, 5, 6], i64::to_be_bytes)),
        _ => ("|b1", vec![1, 0, 1, 1, 0, 0]),
    };
    common::npy_bytes(
        &format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2, 3), }}"),
        &data,
    )
}

fn exercise_npy(bytes: &[u8]) {
    match vlmc_runtime::inputs::parse_npy(bytes) {
        Err(e) => assert_rendered(&e),
        Ok(t) => {
            let n: usize = t.shape.iter().product();
            assert_eq!(t.numel(), n);
        }
    }
}

fn tokenizer() -> &'static vlmc_runtime::train_data::Tok {
    static TOK: std::sync::OnceLock<vlmc_runtime::train_data::Tok> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        vlmc_runtime::train_data::Tok::load(std::path::Path::new(
            "tests/fixtures/train/colours/tokenizer.json",
        ))
        .expect("the fixture tokenizer")
    })
}

const JSONL_ROWS: &[&str] = &[
    r#"{"text": "red green blue"}"#,
    r#"{"prompt": "what colour is the square ?", "completion": "cyan"}"#,
    r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}"#,
    r#"{"image": "img/train_064.png", "prompt": "what colour ?", "completion": "cyan"}"#,
    r#"{"images": ["a.png"], "text": "blue"}"#,
    r#"{"messages": []}"#,
    r#"{"text": ""}"#,
    r#"{"prompt": 3, "completion": null}"#,
];

fn exercise_jsonl(text: &[u8], masked: bool, max_len: Option<usize>) {
    let path = tmp_file("jsonl", text);
    match vlmc_runtime::train_data::read_jsonl(&path, tokenizer(), masked, max_len) {
        Err(e) => assert_rendered(&e.message),
        Ok(rows) => {
            for r in rows {
                assert_eq!(r.ids.len(), r.mask.len());
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Strings shaped like command-line values, and arbitrary ones.
fn arg_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[A-Za-z_ ]{0,6}=[-+]?[0-9]{0,30}",
        "[A-Za-z_]{1,6}=[-+0-9.eEinfatyNn\"]{0,24}",
        "[A-Za-z_]{1,4}=.{0,12}",
        Just("B=2147483647".to_string()),
        Just("B=2147483648".to_string()),
        Just("T=-0".to_string()),
        Just("x=\"".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_reader_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        exercise_safetensors(&bytes);
    }

    #[test]
    fn safetensors_reader_survives_random_headers(
        len in prop_oneof![Just(None), (0u64..300).prop_map(Some)],
        header in "\\PC{0,120}",
        data in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut bytes = len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        exercise_safetensors(&bytes);
    }

    #[test]
    fn safetensors_reader_survives_mutated_files(edits in prop::collection::vec(edit(), 1..5)) {
        let mut bytes = valid_safetensors();
        for e in &edits {
            apply(&mut bytes, e);
        }
        exercise_safetensors(&bytes);
    }

    #[test]
    fn npy_reader_survives_random_and_mutated_bytes(
        kind in any::<u8>(),
        random in any::<bool>(),
        noise in prop::collection::vec(any::<u8>(), 0..160),
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        let mut bytes = match random {
            true => {
                let mut b = b"\x93NUMPY".to_vec();
                b.extend_from_slice(&noise);
                b
            }
            false => valid_npy(kind),
        };
        for e in edits.iter().filter(|e| !matches!(e, Edit::HeaderLen(_))) {
            apply(&mut bytes, e);
        }
        exercise_npy(&bytes);
        exercise_npy(&noise);
    }

    #[test]
    fn jsonl_reader_survives_random_and_mutated_rows(
        rows in prop::collection::vec(0usize..JSONL_ROWS.len(), 1..4),
        edits in prop::collection::vec(edit(), 0..4),
        noise in "\\PC{0,60}",
        masked in any::<bool>(),
        max_len in prop_oneof![Just(None), (0usize..6).prop_map(Some)],
    ) {
        let mut bytes: Vec<u8> = rows.iter().flat_map(|&r| format!("{}\n", JSONL_ROWS[r]).into_bytes()).collect();
        for e in edits.iter().filter(|e| !matches!(e, Edit::HeaderLen(_))) {
            apply(&mut bytes, e);
        }
        exercise_jsonl(&bytes, masked, max_len);
        exercise_jsonl(noise.as_bytes(), masked, max_len);
    }

    #[test]
    fn argument_parsers_survive_random_strings(s in arg_string()) {
        match vlmc_cli::parse_dim(&s) {
            Ok((name, n)) => {
                prop_assert!((0..=vlmc_cli::MAX_DIM).contains(&n), "{s} -> {n}");
                prop_assert!(!name.is_empty() && !name.contains('='));
            }
            Err(e) => assert_rendered(&e),
        }
        match vlmc_cli::parse_set(&s) {
            Ok((name, value)) => {
                prop_assert!(!name.is_empty() && !value.is_empty());
                if let Ok(f) = value.parse::<f64>() {
                    prop_assert!(f.is_finite(), "{s}");
                }
            }
            Err(e) => assert_rendered(&e),
        }
        match vlmc_cli::parse_pair(&s) {
            Ok((name, _)) => prop_assert!(!name.is_empty()),
            Err(e) => assert_rendered(&e),
        }
    }
}

#[test]
fn the_unmutated_inputs_are_accepted() {
    let bytes = valid_safetensors();
    assert_eq!(check_layout(&bytes), Ok(()));
    let f = WeightFile::open(&tmp_file("safetensors", &bytes)).expect("valid");
    assert_eq!(
        f.get("b").expect("b"),
        Tensor::i32(vec![4], vec![1, -2, 3, 70000])
    );
    for k in 0..5 {
        let t = vlmc_runtime::inputs::parse_npy(&valid_npy(k)).expect("valid npy");
        assert_eq!(t.shape, vec![2, 3]);
    }
    let rows: Vec<u8> = JSONL_ROWS[..4]
        .iter()
        .flat_map(|r| format!("{r}\n").into_bytes())
        .collect();
    let path = tmp_file("jsonl", &rows);
    let got = vlmc_runtime::train_data::read_jsonl(&path, tokenizer(), true, None).expect("rows");
    assert_eq!(got.len(), 4);
    assert_eq!(vlmc_cli::parse_dim("B=8"), Ok(("B".to_string(), 8)));
    assert_eq!(vlmc_cli::parse_dim(" T = 0 "), Ok(("T".to_string(), 0)));
    assert_eq!(
        vlmc_cli::parse_set("dim=64"),
        Ok(("dim".to_string(), "64".to_string()))
    );
    assert_eq!(
        vlmc_cli::parse_set("act=gelu"),
        Ok(("act".to_string(), "gelu".to_string()))
    );
    assert_eq!(
        vlmc_cli::parse_set("eps=1e-5"),
        Ok(("eps".to_string(), "1e-5".to_string()))
    );
    assert_eq!(
        vlmc_cli::parse_pair("text="),
        Ok(("text".to_string(), String::new()))
    );
}
