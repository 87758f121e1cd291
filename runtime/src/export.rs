//! `vlmc export`: a model's weights as a transformers checkpoint folder: `config.json` (from the
//! spec's compile-time parameters, [`crate::hf_config`]) and the parameters as safetensors in
//! `save_pretrained`'s layout, sharded with `model.safetensors.index.json` above a size. Every
//! tensor is copied byte for byte from the input (same dtype); the folder is written under a
//! temporary name and renamed into place.

use crate::hf_config::{layout, HfLayout};
use crate::weight_set::{WeightSet, INDEX_NAME, SINGLE_NAME};
use crate::weights::{map_name, WeightError};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use vlmc::elab::Elaborated;
use vlmc::ir::DType;

/// transformers' default `max_shard_size` ("5GB", decimal).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

fn werr<T>(message: impl Into<String>) -> Result<T, WeightError> {
    Err(WeightError {
        message: message.into(),
    })
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    /// The transformers class (`architectures[0]` of the config).
    pub architecture: &'static str,
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// The safetensors files written (one, or the shards).
    pub files: Vec<String>,
    /// Input tensors the model's `checkpoint` rules ignore, left out (Chameleon's VQ-GAN).
    pub ignored: Vec<String>,
}

/// One tensor to write: its checkpoint name and its bytes as stored in the input.
struct Entry<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

/// Writes `weights`, bound to `m`'s parameters by its checkpoint rules, as a transformers
/// folder `dir` (see the module doc). `dir` must not exist or be an empty folder, and must not
/// be where the input weights are.
pub fn export(
    m: &Elaborated,
    weights: &WeightSet,
    dir: &Path,
    max_shard_size: u64,
) -> Result<Exported, WeightError> {
    let hf = layout(&m.params).map_err(|message| WeightError {
        message: format!("model `{}`: {message}", m.model),
    })?;
    check_destination(dir, weights)?;
    let entries = entries(m, weights, &hf)?;
    let mut config = hf.config.clone();
    config["dtype"] = serde_json::json!(dtype_name(&entries));
    let shards = plan_shards(&entries, max_shard_size.max(1));
    let tmp = temporary_name(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| WeightError {
            message: format!("cannot remove the stale {}: {e}", tmp.display()),
        })?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| WeightError {
        message: format!("cannot create {}: {e}", tmp.display()),
    })?;
    let written = write_folder(&tmp, &entries, &shards, &config).and_then(|files| {
        if dir.is_dir() {
            // an empty folder (check_destination made sure): replaced by the export
            std::fs::remove_dir(dir).map_err(|e| WeightError {
                message: format!("cannot replace the empty folder {}: {e}", dir.display()),
            })?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| WeightError {
            message: format!("cannot rename {} to {}: {e}", tmp.display(), dir.display()),
        })?;
        Ok(files)
    });
    match written {
        Ok(files) => Ok(Exported {
            architecture: hf.architecture,
            tensors: entries.len(),
            bytes: entries.iter().map(|e| e.data.len() as u64).sum(),
            files,
            ignored: weights
                .names()
                .into_iter()
                .filter(|n| map_name(n, &m.checkpoint).is_none())
                .collect(),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// `DIR.tmp<pid>` beside `dir`.
fn temporary_name(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    dir.with_file_name(format!("{name}.tmp{}", std::process::id()))
}

/// `dir` is free to write: absent or an empty folder, and not the folder of an input file.
fn check_destination(dir: &Path, weights: &WeightSet) -> Result<(), WeightError> {
    if dir.as_os_str().is_empty() || dir.file_name().is_none() {
        return werr(format!(
            "--hf {}: give the name of a new folder",
            dir.display()
        ));
    }
    let target = dir.canonicalize().ok();
    for f in weights.files() {
        let parent = f.path().parent().and_then(|p| {
            let p = if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            };
            p.canonicalize().ok()
        });
        if target.is_some() && parent == target {
            return werr(format!(
                "refusing to export into {}: it holds the input weights {}",
                dir.display(),
                f.path().display()
            ));
        }
    }
    match std::fs::symlink_metadata(dir) {
        Err(_) => Ok(()),
        Ok(md) if md.is_dir() => {
            let empty = std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            match empty {
                true => Ok(()),
                false => werr(format!(
                    "{} exists and is not empty: export writes a new folder (remove it or \
                     choose another name)",
                    dir.display()
                )),
            }
        }
        Ok(_) => werr(format!(
            "{} exists and is not a folder: export writes a new folder",
            dir.display()
        )),
    }
}

/// Whether a stored dtype can hold a parameter of `want` (floats for floats, integers for
/// integers, bools for bools), as binding checks.
fn fits(stored: Dtype, want: DType) -> bool {
    match want {
        DType::I32 => matches!(stored, Dtype::I32 | Dtype::I64),
        DType::Bool => stored == Dtype::BOOL,
        _ => matches!(stored, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16),
    }
}

/// Every parameter of `m` with the input tensor it binds to (the checkpoint rules, as
/// [`crate::weights::bind`] applies them) under its transformers name, sorted by name. A
/// parameter without a tensor, or with one of another shape or kind, is an error; so are
/// tensors of the input that no parameter uses (they would be lost).
fn entries<'w>(
    m: &Elaborated,
    weights: &'w WeightSet,
    hf: &HfLayout,
) -> Result<Vec<Entry<'w>>, WeightError> {
    let mut by_param: HashMap<String, String> = HashMap::new();
    for name in weights.names() {
        if let Some(p) = map_name(&name, &m.checkpoint) {
            if let Some(prev) = by_param.insert(p.clone(), name.clone()) {
                return werr(format!(
                    "tensors `{prev}` and `{name}` of {} both map to parameter `{p}`",
                    weights.label()
                ));
            }
        }
    }
    let params = m.graph.params();
    let mut problems = Vec::new();
    let mut out: BTreeMap<String, Entry<'w>> = BTreeMap::new();
    for (_, path, ty, _) in &params {
        let Some(name) = by_param.remove(*path) else {
            problems.push(format!(
                "parameter `{path}` ({ty}) has no tensor in {}",
                weights.label()
            ));
            continue;
        };
        let (dtype, shape, data) = weights.raw(&name)?;
        let want: Vec<i64> = ty
            .shape
            .0
            .iter()
            .map(|d| d.as_const().unwrap_or(-1))
            .collect();
        let got: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if got != want || !fits(dtype, ty.dtype) {
            problems.push(format!(
                "tensor `{name}` is {dtype:?}{shape:?} but parameter `{path}` is {ty}"
            ));
            continue;
        }
        let hf_name = hf.hf_name(path);
        if out.contains_key(&hf_name) {
            problems.push(format!(
                "parameter `{path}` becomes `{hf_name}`, the name of another parameter"
            ));
            continue;
        }
        out.insert(
            hf_name.clone(),
            Entry {
                name: hf_name,
                dtype,
                shape,
                data,
            },
        );
    }
    let mut unused: Vec<String> = by_param.into_values().collect();
    unused.sort();
    if !unused.is_empty() {
        let shown: Vec<String> = unused.iter().take(8).map(|n| format!("`{n}`")).collect();
        problems.push(format!(
            "{} tensor(s) of the input are not parameters of the model and would be lost: {}{}",
            unused.len(),
            shown.join(", "),
            if unused.len() > 8 { ", ..." } else { "" }
        ));
    }
    if !problems.is_empty() {
        return werr(format!(
            "cannot export {} as model `{}`:\n  {}",
            weights.label(),
            m.model,
            problems.join("\n  ")
        ));
    }
    Ok(out.into_values().collect())
}

/// The config's `dtype`: the float dtype of the tensors (the first one's when they differ).
fn dtype_name(entries: &[Entry]) -> &'static str {
    entries
        .iter()
        .find_map(|e| match e.dtype {
            Dtype::F32 => Some("float32"),
            Dtype::F16 => Some("float16"),
            Dtype::BF16 => Some("bfloat16"),
            Dtype::F64 => Some("float64"),
            _ => None,
        })
        .unwrap_or("float32")
}

/// Splits the tensors (in order) into shards of at most `max` bytes as huggingface_hub does: a
/// tensor that would overflow the current shard starts a new one; a tensor larger than `max`
/// gets a shard of its own. Returns each shard's range of `entries`.
fn plan_shards(entries: &[Entry], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0usize, 0u64);
    for (i, e) in entries.iter().enumerate() {
        let n = e.data.len() as u64;
        if i > start && size + n > max {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += n;
    }
    shards.push(start..entries.len());
    shards
}

/// Writes the safetensors file(s), the index when sharded, and `config.json` into `tmp`;
/// returns the safetensors files' names.
fn write_folder(
    tmp: &Path,
    entries: &[Entry],
    shards: &[std::ops::Range<usize>],
    config: &serde_json::Value,
) -> Result<Vec<String>, WeightError> {
    let n = shards.len();
    let names: Vec<String> = match n {
        1 => vec![SINGLE_NAME.to_string()],
        _ => (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect(),
    };
    let metadata: Option<HashMap<String, String>> =
        Some([("format".to_string(), "pt".to_string())].into());
    let mut weight_map = serde_json::Map::new();
    for (file, range) in names.iter().zip(shards) {
        let mut views = Vec::with_capacity(range.len());
        for e in &entries[range.clone()] {
            let v =
                TensorView::new(e.dtype, e.shape.clone(), e.data).map_err(|err| WeightError {
                    message: format!(
                        "tensor `{}`: {}",
                        e.name,
                        crate::weights::describe_error(&err)
                    ),
                })?;
            views.push((e.name.clone(), v));
            weight_map.insert(e.name.clone(), serde_json::json!(file));
        }
        let path = tmp.join(file);
        safetensors::serialize_to_file(views, &metadata, &path).map_err(|err| WeightError {
            message: format!(
                "cannot write {}: {}",
                path.display(),
                crate::weights::describe_error(&err)
            ),
        })?;
    }
    let write_json = |name: &str, v: &serde_json::Value| {
        let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
        text.push('\n');
        std::fs::write(tmp.join(name), text).map_err(|e| WeightError {
            message: format!("cannot write {}: {e}", tmp.join(name).display()),
        })
    };
    if n > 1 {
        let total: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
        let params: u64 = entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>() as u64)
            .sum();
        write_json(
            INDEX_NAME,
            &serde_json::json!({
                "metadata": {"total_size": total, "total_parameters": params},
                "weight_map": weight_map,
            }),
        )?;
    }
    write_json("config.json", config)?;
    Ok(names)
}
