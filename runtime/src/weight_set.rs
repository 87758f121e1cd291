//! The weights a `--weights` flag names: one or several safetensors files, a sharded
//! checkpoint's `model.safetensors.index.json`, or a Hugging Face model folder, read together as
//! one set of tensors (every file memory-mapped; a tensor is read when it is asked for).

use crate::tensor::Tensor;
use crate::weights::{TensorSource, WeightError, WeightFile};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The index of a sharded checkpoint, as `save_pretrained` names it.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// The single-file checkpoint of a Hugging Face model folder.
pub const SINGLE_NAME: &str = "model.safetensors";

fn werr<T>(message: impl Into<String>) -> Result<T, WeightError> {
    Err(WeightError {
        message: message.into(),
    })
}

/// Several safetensors files read as one: every tensor name is in exactly one file.
pub struct WeightSet {
    files: Vec<WeightFile>,
    /// Which file holds each tensor.
    by_name: BTreeMap<String, usize>,
    /// What was given, for messages (`a.safetensors`, `a, b`, `DIR/`).
    label: String,
    /// Where a tokenizer is looked up: the folder given, or the first file's folder.
    tokenizer_dir: PathBuf,
}

/// One `--weights` path expanded to the files it stands for, with the index's weight map when
/// it is a sharded checkpoint.
struct Expanded {
    files: Vec<PathBuf>,
    /// (index file, tensor -> shard path) of a sharded checkpoint.
    index: Option<(PathBuf, BTreeMap<String, PathBuf>)>,
}

/// The folder a tokenizer (and other side files) is looked up in for `paths`: a folder given
/// as weights is itself that folder; otherwise the first file's folder.
pub fn tokenizer_dir(paths: &[PathBuf]) -> PathBuf {
    match paths.first() {
        Some(p) if p.is_dir() => p.clone(),
        Some(p) => p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        None => PathBuf::from("."),
    }
}

/// Every file `paths` stands for (folders and indexes expanded to their shards), for checks
/// that an output does not overwrite an input. Paths that cannot be expanded are kept as given.
pub fn files_of(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        match expand(p) {
            Ok(e) => {
                out.extend(e.index.as_ref().map(|(i, _)| i.clone()));
                out.extend(e.files);
            }
            Err(_) => out.push(p.clone()),
        }
    }
    out
}

/// Expands one path: a folder to its `model.safetensors` (or else its index), an index to its
/// shards.
fn expand(path: &Path) -> Result<Expanded, WeightError> {
    if path.is_dir() {
        // transformers' order: the single file first, then the index
        let (single, index) = (path.join(SINGLE_NAME), path.join(INDEX_NAME));
        if single.is_file() {
            return Ok(Expanded {
                files: vec![single],
                index: None,
            });
        }
        if index.is_file() {
            return expand_index(&index);
        }
        let mut present: Vec<String> = std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        present.sort();
        present.truncate(12);
        return werr(format!(
            "{} is a folder without {SINGLE_NAME} or {INDEX_NAME} (it holds: {}); vlmc reads \
             safetensors checkpoints only",
            path.display(),
            if present.is_empty() {
                "nothing".to_string()
            } else {
                present.join(", ")
            }
        ));
    }
    if path.to_string_lossy().ends_with(".index.json") {
        return expand_index(path);
    }
    Ok(Expanded {
        files: vec![path.to_path_buf()],
        index: None,
    })
}

/// Reads a `model.safetensors.index.json`: its `weight_map` (tensor -> shard file name, relative
/// to the index's folder) gives the shards, in the order they first appear.
fn expand_index(index: &Path) -> Result<Expanded, WeightError> {
    let fail = |why: String| WeightError {
        message: format!("{}: {why}", index.display()),
    };
    let bytes = crate::files::read(index).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(fail(
            "no `weight_map` object (a sharded checkpoint's index maps each tensor to its shard)"
                .into(),
        ));
    };
    let dir = index.parent().unwrap_or(Path::new(""));
    let mut files: Vec<PathBuf> = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(fail(format!(
                "`weight_map` entry `{tensor}` is not a file name"
            )));
        };
        let beside = Path::new(shard)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if shard.is_empty() || !beside {
            return Err(fail(format!(
                "`weight_map` puts tensor `{tensor}` in `{shard}`: a shard must be a file name \
                 beside the index"
            )));
        }
        let path = dir.join(shard);
        if !files.contains(&path) {
            files.push(path.clone());
        }
        weight_map.insert(tensor.clone(), path);
    }
    if files.is_empty() {
        return Err(fail("`weight_map` is empty".into()));
    }
    Ok(Expanded {
        files,
        index: Some((index.to_path_buf(), weight_map)),
    })
}

impl WeightSet {
    /// Opens the weights `paths` name (files, indexes, folders; see the module doc). A tensor
    /// in two files, a shard that is missing, and a tensor an index names but its shard lacks
    /// are errors naming the files.
    pub fn open(paths: &[PathBuf]) -> Result<WeightSet, WeightError> {
        if paths.is_empty() {
            return werr("no weights given");
        }
        let mut files: Vec<WeightFile> = Vec::new();
        let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
        for p in paths {
            let e = expand(p)?;
            for f in &e.files {
                if files.iter().any(|g| g.path() == f) {
                    return werr(format!("{} is given twice", f.display()));
                }
                let wf = WeightFile::open(f).map_err(|err| match (&e.index, f.exists()) {
                    (Some((index, _)), false) => WeightError {
                        message: format!(
                            "{} names the shard {}, which does not exist",
                            index.display(),
                            f.display()
                        ),
                    },
                    _ => err,
                })?;
                let at = files.len();
                for name in wf.names() {
                    if let Some(&prev) = by_name.get(&name) {
                        return werr(format!(
                            "tensor `{name}` is in both {} and {}",
                            files[prev].path().display(),
                            f.display()
                        ));
                    }
                    by_name.insert(name, at);
                }
                files.push(wf);
            }
            if let Some((index, map)) = &e.index {
                for (tensor, shard) in map {
                    let held = by_name.get(tensor).map(|&i| files[i].path());
                    if held != Some(shard.as_path()) {
                        return werr(format!(
                            "{} puts tensor `{tensor}` in {}, which has no such tensor{}",
                            index.display(),
                            shard.display(),
                            match held {
                                Some(other) => format!(" (it is in {})", other.display()),
                                None => String::new(),
                            }
                        ));
                    }
                }
            }
        }
        let label = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(WeightSet {
            files,
            by_name,
            label,
            tokenizer_dir: tokenizer_dir(paths),
        })
    }

    /// The files read, shards in order.
    pub fn files(&self) -> &[WeightFile] {
        &self.files
    }

    /// Where a tokenizer is looked up by default (see [`tokenizer_dir`]).
    pub fn tokenizer_dir(&self) -> &Path {
        &self.tokenizer_dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// The file holding `name`.
    fn file_of(&self, name: &str) -> Result<&WeightFile, WeightError> {
        match self.by_name.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => werr(format!("{} has no tensor `{name}`", self.label)),
        }
    }

    /// Reads a tensor (converted as [`WeightFile::get`] does).
    pub fn get(&self, name: &str) -> Result<Tensor, WeightError> {
        self.file_of(name)?.get(name)
    }

    /// A tensor as stored: dtype, shape and its bytes in the memory map (no conversion).
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8]), WeightError> {
        self.file_of(name)?.raw(name)
    }

    /// What was given, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl TensorSource for WeightSet {
    fn tensor_names(&self) -> Vec<String> {
        self.names()
    }
    fn tensor(&self, name: &str) -> Result<Tensor, WeightError> {
        self.get(name)
    }
    fn label(&self) -> String {
        self.label.clone()
    }
}
