//! Weights in safetensors files: reading by memory map, binding checkpoint tensors to a model's
//! parameters by path (with the model's `checkpoint` name rules), and writing atomically.

use crate::tensor::{Data, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use vlmc::elab::NameRule;
use vlmc::ir::Graph;

/// A problem with a weights file or with binding it to a model.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct WeightError {
    pub message: String,
}

fn werr<T>(message: impl Into<String>) -> Result<T, WeightError> {
    Err(WeightError {
        message: message.into(),
    })
}

/// An open safetensors file (memory-mapped; tensors are converted when read).
pub struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
}

impl WeightFile {
    /// Opens and validates a safetensors file (header, offsets, sizes).
    pub fn open(path: &Path) -> Result<WeightFile, WeightError> {
        let file = std::fs::File::open(path).map_err(|e| WeightError {
            message: format!("cannot open {}: {e}", path.display()),
        })?;
        // SAFETY: the map is read-only; a file changed underneath us gives wrong numbers, not UB
        // in our code (the bytes are copied out when a tensor is read).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WeightError {
            message: format!("cannot map {}: {e}", path.display()),
        })?;
        let wf = WeightFile {
            path: path.to_path_buf(),
            mmap,
        };
        wf.parsed()?;
        Ok(wf)
    }

    fn parsed(&self) -> Result<SafeTensors<'_>, WeightError> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| WeightError {
            message: format!(
                "{} is not a valid safetensors file: {}",
                self.path.display(),
                describe_error(&e)
            ),
        })
    }

    /// The tensor names in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .parsed()
            .map(|s| s.names().into_iter().cloned().collect())
            .unwrap_or_default();
        n.sort();
        n
    }

    /// The dtype name and shape of a tensor, as stored.
    pub fn info(&self, name: &str) -> Option<(String, Vec<usize>)> {
        let st = self.parsed().ok()?;
        let t = st.tensor(name).ok()?;
        Some((
            format!("{:?}", t.dtype()).to_lowercase(),
            t.shape().to_vec(),
        ))
    }

    /// Reads a tensor: float dtypes become f32, integer dtypes i32 (checked), bool stays bool.
    pub fn get(&self, name: &str) -> Result<Tensor, WeightError> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|_| WeightError {
            message: format!("{} has no tensor `{name}`", self.path.display()),
        })?;
        let shape = view.shape().to_vec();
        let b = view.data();
        let chunks = |w: usize| b.chunks_exact(w);
        let data = match view.dtype() {
            Dtype::F32 => Data::F32(chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Dtype::F64 => Data::F32(
                chunks(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                    .collect(),
            ),
            Dtype::F16 => Data::F32(chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            Dtype::BF16 => Data::F32(chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            Dtype::I32 => Data::I32(chunks(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Dtype::I64 => {
                let mut v = Vec::with_capacity(b.len() / 8);
                for c in chunks(8) {
                    let x = i64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                    v.push(i32::try_from(x).map_err(|_| WeightError {
                        message: format!("tensor `{name}`: value {x} does not fit in i32"),
                    })?);
                }
                Data::I32(v)
            }
            Dtype::BOOL => Data::Bool(b.iter().map(|&x| x != 0).collect()),
            other => {
                return werr(format!(
                    "tensor `{name}` in {} has dtype {other:?}, which vlmc cannot read (f32, f64, f16, bf16, i32, i64, bool)",
                    self.path.display()
                ))
            }
        };
        Ok(Tensor { shape, data })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn describe_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "the file is too short to hold a header (truncated?)".into(),
        E::HeaderTooLarge => {
            "the header length is implausibly large (not a safetensors file?)".into()
        }
        E::InvalidHeaderLength => "the header length exceeds the file (truncated?)".into(),
        E::InvalidOffset(n) => format!("tensor `{n}` lies outside the data (truncated?)"),
        E::MetadataIncompleteBuffer => {
            "the data is shorter than the header says (truncated)".into()
        }
        other => format!("{other:?}"),
    }
}

/// The result of binding a file to a model's parameters.
pub struct Bound {
    /// Every parameter, by path.
    pub params: BTreeMap<String, Tensor>,
    /// Tensors in the file that no parameter uses (and no `ignore` rule names).
    pub unused: Vec<String>,
}

/// The parameter path a checkpoint name stands for: Hugging Face's legacy `LayerNorm.gamma` /
/// `.beta` become `.weight` / `.bias`, then the first matching rule rewrites the prefix.
/// `None`: an `ignore` rule drops it.
pub fn map_name(name: &str, rules: &[NameRule]) -> Option<String> {
    let mut n = name.to_string();
    if let Some(stem) = n.strip_suffix(".gamma") {
        n = format!("{stem}.weight");
    } else if let Some(stem) = n.strip_suffix(".beta") {
        n = format!("{stem}.bias");
    }
    for r in rules {
        if let Some(rest) = n.strip_prefix(r.from.as_str()) {
            return r.to.as_ref().map(|to| format!("{to}{rest}"));
        }
    }
    Some(n)
}

/// Binds every parameter of `graph` to a tensor of `file`, checking shapes and dtypes.
/// All problems are reported together.
pub fn bind(graph: &Graph, file: &WeightFile, rules: &[NameRule]) -> Result<Bound, WeightError> {
    let mut by_param: BTreeMap<String, String> = BTreeMap::new();
    let mut unused = Vec::new();
    let mut problems = Vec::new();
    for name in file.names() {
        match map_name(&name, rules) {
            None => {}
            Some(p) => {
                if let Some(prev) = by_param.insert(p.clone(), name.clone()) {
                    problems.push(format!(
                        "tensors `{prev}` and `{name}` both map to parameter `{p}`"
                    ));
                }
            }
        }
    }
    let wanted: BTreeSet<&str> = graph.params().iter().map(|(_, p, _, _)| *p).collect();
    for (p, n) in &by_param {
        if !wanted.contains(p.as_str()) {
            unused.push(n.clone());
        }
    }
    let mut params = BTreeMap::new();
    for (_, path, ty, _) in graph.params() {
        let want: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| d.as_const().unwrap_or(-1) as usize)
            .collect();
        let Some(name) = by_param.get(path) else {
            problems.push(format!(
                "parameter `{path}` ({ty}) has no tensor in {}{}",
                file.path().display(),
                closest(path, &by_param)
            ));
            continue;
        };
        match file.get(name) {
            Err(e) => problems.push(e.message),
            Ok(t) => {
                if t.shape != want {
                    problems.push(format!(
                        "tensor `{name}` is {}{:?} but parameter `{path}` is {ty}",
                        t.dtype(),
                        t.shape
                    ));
                } else if !t.holds(ty.dtype) {
                    problems.push(format!(
                        "tensor `{name}` holds {} values but parameter `{path}` is {ty}",
                        t.dtype()
                    ));
                } else {
                    params.insert(path.to_string(), t);
                }
            }
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        let shown: Vec<String> = problems.into_iter().take(12).collect();
        return werr(format!(
            "cannot bind {} to the model ({n} problem{}):\n  {}{}",
            file.path().display(),
            if n == 1 { "" } else { "s" },
            shown.join("\n  "),
            if n > 12 {
                format!("\n  ... and {} more", n - 12)
            } else {
                String::new()
            }
        ));
    }
    Ok(Bound { params, unused })
}

/// "; closest: `a`" when a checkpoint name shares the parameter's last segments.
fn closest(path: &str, by_param: &BTreeMap<String, String>) -> String {
    let tail: Vec<&str> = path.rsplit('.').take(2).collect();
    let hits: Vec<&String> = by_param
        .iter()
        .filter(|(p, _)| {
            let t: Vec<&str> = p.rsplit('.').take(2).collect();
            t == tail
        })
        .map(|(_, n)| n)
        .take(3)
        .collect();
    if hits.is_empty() {
        String::new()
    } else {
        let h: Vec<String> = hits.iter().map(|s| format!("`{s}`")).collect();
        format!(
            " (similar names in the file: {}; a `checkpoint` rule may be missing)",
            h.join(", ")
        )
    }
}

/// Writes tensors as a safetensors file: to a temporary name first, then renamed into place.
pub fn save(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), WeightError> {
    let mut bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let (dtype, raw) = match &t.data {
            Data::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::Bool(v) => (Dtype::BOOL, v.iter().map(|&x| u8::from(x)).collect()),
        };
        bytes.push((name.clone(), dtype, t.shape.clone(), raw));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| WeightError {
                    message: format!("tensor `{n}`: {e:?}"),
                })
        })
        .collect::<Result<_, _>>()?;
    let data = safetensors::serialize(views, &None).map_err(|e| WeightError {
        message: format!("cannot serialise: {e:?}"),
    })?;
    write_atomic(path, &data).map_err(|e| WeightError {
        message: format!("cannot write {}: {e}", path.display()),
    })
}

/// Writes bytes to a temporary file beside `path`, syncs, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
