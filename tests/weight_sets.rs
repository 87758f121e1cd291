//! The forms `--weights` takes (several files, a sharded checkpoint's index, a Hugging Face
//! folder), the forms of `--input` (a tensor inside a safetensors file, transformers' input
//! names), and the guards of `vlmc export` (destination, shard sizes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc_runtime::inputs::gather_inputs;
use vlmc_runtime::weight_set::{tokenizer_dir, WeightSet};
use vlmc_runtime::weights::{bind, save, WeightFile};
use vlmc_runtime::Tensor;

const LLAVA: &str = "tests/fixtures/zoo/llava";

/// A fresh temporary folder for one test.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmc-wsets-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn llava() -> vlmc::elab::Elaborated {
    let checked = vlmc::elab::check_file(&Path::new(LLAVA).join("fixture.vlm"));
    let text = checked.render();
    checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .pop()
        .expect("a model")
}

/// The fixture's tensors split into `parts` files by name order, written under `dir`.
fn split(dir: &Path, parts: usize) -> (Vec<PathBuf>, Vec<Vec<String>>) {
    let wf = WeightFile::open(&Path::new(LLAVA).join("model.safetensors")).expect("fixture");
    let names = wf.names();
    let per = names.len().div_ceil(parts);
    let mut files = Vec::new();
    let mut groups = Vec::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let tensors: BTreeMap<String, Tensor> = chunk
            .iter()
            .map(|n| (n.clone(), wf.get(n).expect("tensor")))
            .collect();
        let path = dir.join(format!("part-{i}.safetensors"));
        save(&path, &tensors).expect("save part");
        files.push(path);
        groups.push(chunk.to_vec());
    }
    (files, groups)
}

/// The parameters bound from the fixture's own single file.
fn reference_params(m: &vlmc::elab::Elaborated) -> BTreeMap<String, Tensor> {
    let wf = WeightFile::open(&Path::new(LLAVA).join("model.safetensors")).expect("fixture");
    bind(&m.graph, &wf, &m.checkpoint).expect("bind").params
}

#[test]
fn several_files_bind_like_the_single_file() {
    let dir = scratch("several");
    let m = llava();
    let (files, _) = split(&dir, 3);
    let set = WeightSet::open(&files).expect("three files");
    let bound = bind(&m.graph, &set, &m.checkpoint).expect("bind");
    assert!(bound.unused.is_empty(), "{:?}", bound.unused);
    let want = reference_params(&m);
    assert_eq!(bound.params.len(), want.len());
    assert_eq!(bound.params, want);

    // a tensor in two files is an error naming both
    let first = WeightFile::open(&files[0]).expect("part 0");
    let name = first.names()[0].clone();
    let dup = dir.join("dup.safetensors");
    save(
        &dup,
        &BTreeMap::from([(name.clone(), first.get(&name).expect("t"))]),
    )
    .expect("save");
    let e = WeightSet::open(&[files[0].clone(), dup.clone()])
        .err()
        .expect("a duplicate")
        .message;
    assert!(
        e.contains(&format!("tensor `{name}` is in both"))
            && e.contains(&files[0].display().to_string())
            && e.contains(&dup.display().to_string()),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes an index for `files` (tensor -> file name) beside them.
fn write_index(dir: &Path, files: &[PathBuf], groups: &[Vec<String>]) -> PathBuf {
    let mut map = serde_json::Map::new();
    for (f, names) in files.iter().zip(groups) {
        let file = f.file_name().expect("name").to_string_lossy().into_owned();
        for n in names {
            map.insert(n.clone(), serde_json::json!(file));
        }
    }
    let index = dir.join("model.safetensors.index.json");
    let text = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(&index, text.to_string()).expect("index");
    index
}

#[test]
fn a_sharded_index_and_its_folder_bind_like_the_single_file() {
    let dir = scratch("index");
    let m = llava();
    let (files, groups) = split(&dir, 2);
    let index = write_index(&dir, &files, &groups);
    let want = reference_params(&m);
    for given in [index.clone(), dir.clone()] {
        let set = WeightSet::open(std::slice::from_ref(&given)).expect("index");
        assert_eq!(set.files().len(), 2, "{}", given.display());
        let bound = bind(&m.graph, &set, &m.checkpoint).expect("bind");
        assert_eq!(bound.params, want, "{}", given.display());
    }

    // a tensor the index puts in a shard that lacks it
    let moved = groups[1][0].clone();
    let mut wrong = groups.clone();
    wrong[1].remove(0);
    wrong[0].push(moved.clone());
    write_index(&dir, &files, &wrong);
    let e = WeightSet::open(std::slice::from_ref(&index))
        .err()
        .expect("wrong shard")
        .message;
    assert!(
        e.contains(&format!("puts tensor `{moved}` in"))
            && e.contains("which has no such tensor")
            && e.contains(&format!("(it is in {})", files[1].display())),
        "{e}"
    );

    // a shard that is missing
    write_index(&dir, &files, &groups);
    std::fs::remove_file(&files[1]).expect("remove shard");
    let e = WeightSet::open(&[index]).err().expect("missing").message;
    assert!(
        e.contains(&format!(
            "names the shard {}, which does not exist",
            files[1].display()
        )),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_folder_is_where_the_tokenizer_is_looked_up() {
    let dir = scratch("folder");
    std::fs::copy(
        Path::new(LLAVA).join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .expect("copy");
    let set = WeightSet::open(std::slice::from_ref(&dir)).expect("folder");
    assert_eq!(set.tokenizer_dir(), dir.as_path());
    assert_eq!(set.names().len(), 80);
    let file = dir.join("model.safetensors");
    assert_eq!(tokenizer_dir(std::slice::from_ref(&file)), dir);

    // the folder is the default tokenizer's: text inputs are tokenized with its tokenizer.json
    let e = gather_inputs(
        &[("text".into(), "a cat".into())],
        &["ids", "mask"],
        &llava().preprocess,
        set.tokenizer_dir(),
        None,
    )
    .expect_err("no tokenizer.json there yet")
    .message;
    assert!(
        e.contains(&dir.join("tokenizer.json").display().to_string()),
        "{e}"
    );

    // a folder without weights says what it holds
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    std::fs::write(empty.join("pytorch_model.bin"), b"x").expect("write");
    let e = WeightSet::open(&[empty]).err().expect("no weights").message;
    assert!(
        e.contains("without model.safetensors or model.safetensors.index.json")
            && e.contains("pytorch_model.bin"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inputs_name_a_tensor_of_a_file_and_take_transformers_names() {
    let io = Path::new(LLAVA).join("io.safetensors");
    let io_file = WeightFile::open(&io).expect("io");
    let at = |t: &str| format!("{}:{t}", io.display());
    let pairs = vec![
        ("input_ids".to_string(), at("ids")),
        ("attention_mask".to_string(), at("mask")),
        ("pixel_values".to_string(), at("pixels")),
    ];
    let got = gather_inputs(
        &pairs,
        &["pixels", "ids", "mask"],
        &[],
        Path::new("."),
        None,
    )
    .expect("inputs");
    assert_eq!(got.len(), 3);
    for name in ["pixels", "ids", "mask"] {
        assert_eq!(got[name], io_file.get(name).expect("t"), "{name}");
    }

    // under transformers' name, a file's tensor of that name is read (a processor's output)
    let dir = scratch("hf-names");
    let saved = dir.join("processed.safetensors");
    let pixels = io_file.get("pixels").expect("pixels");
    let ids = io_file.get("ids").expect("ids");
    save(
        &saved,
        &BTreeMap::from([
            ("pixel_values".to_string(), pixels.clone()),
            ("input_ids".to_string(), ids.clone()),
        ]),
    )
    .expect("save");
    let file = saved.display().to_string();
    let got = gather_inputs(
        &[
            ("pixel_values".into(), file.clone()),
            ("input_ids".into(), file),
        ],
        &["pixels", "ids", "mask"],
        &[],
        Path::new("."),
        None,
    )
    .expect("by transformers' tensor names");
    assert_eq!((&got["pixels"], &got["ids"]), (&pixels, &ids));
    let _ = std::fs::remove_dir_all(&dir);

    // a model with an input of transformers' name keeps it
    let got = gather_inputs(
        &[("input_ids".into(), at("ids"))],
        &["input_ids", "ids"],
        &[],
        Path::new("."),
        None,
    )
    .expect("own name");
    assert_eq!(got.keys().collect::<Vec<_>>(), vec!["input_ids"]);

    // an alias to an input the model does not have stays an error listing its inputs
    let e = gather_inputs(
        &[("token_type_ids".into(), at("ids"))],
        &["pixels", "ids", "mask"],
        &[],
        Path::new("."),
        None,
    )
    .expect_err("no types")
    .message;
    assert!(
        e.contains(
            "the model has no input `token_type_ids`; its inputs are: `pixels`, `ids`, `mask`"
        ),
        "{e}"
    );

    // the same input under both names is given twice
    let e = gather_inputs(
        &[("ids".into(), at("ids")), ("input_ids".into(), at("ids"))],
        &["ids"],
        &[],
        Path::new("."),
        None,
    )
    .expect_err("twice")
    .message;
    assert!(e.contains("input `ids` is given twice"), "{e}");

    // a tensor the file lacks
    let e = gather_inputs(
        &[("ids".into(), at("input_ids"))],
        &["ids"],
        &[],
        Path::new("."),
        None,
    )
    .expect_err("no such tensor")
    .message;
    assert!(
        e.contains("has no tensor `input_ids` (it has: expect.logits, ids, mask, pixels)"),
        "{e}"
    );
}

#[test]
fn export_refuses_the_weights_folder_and_a_full_one_and_leaves_no_temporary() {
    let dir = scratch("guard");
    let m = llava();
    let weights_dir = dir.join("weights");
    std::fs::create_dir_all(&weights_dir).expect("dir");
    std::fs::copy(
        Path::new(LLAVA).join("model.safetensors"),
        weights_dir.join("model.safetensors"),
    )
    .expect("copy");
    let set = WeightSet::open(std::slice::from_ref(&weights_dir)).expect("open");
    let export = |to: &Path| vlmc_runtime::export::export(&m, &set, to, u64::MAX);

    let e = export(&weights_dir).expect_err("into the weights").message;
    assert!(
        e.contains("refusing to export into") && e.contains("holds the input weights"),
        "{e}"
    );
    let full = dir.join("full");
    std::fs::create_dir_all(&full).expect("dir");
    std::fs::write(full.join("keep.txt"), b"mine").expect("write");
    let e = export(&full).expect_err("not empty").message;
    assert!(e.contains("exists and is not empty"), "{e}");
    assert_eq!(std::fs::read(full.join("keep.txt")).expect("kept"), b"mine");

    // the default shard size: one model.safetensors, no index; an empty folder is replaced
    let out = dir.join("out");
    std::fs::create_dir_all(&out).expect("empty dir");
    let done = export(&out).expect("export");
    assert_eq!(done.files, vec!["model.safetensors".to_string()]);
    let mut listed: Vec<String> = std::fs::read_dir(&out)
        .expect("out")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, vec!["config.json", "model.safetensors"]);
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shard_sizes_read_as_transformers_writes_them() {
    use vlmc_cli::export::parse_size;
    assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
    assert_eq!(parse_size("500MB"), Ok(500_000_000));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("64KiB"), Ok(64 << 10));
    assert_eq!(parse_size("1.5kb"), Ok(1500));
    assert_eq!(parse_size("4096"), Ok(4096));
    for bad in ["", "0", "-1GB", "5XB", "GB", "nan"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
}
