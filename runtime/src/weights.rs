//! Weights in safetensors files: reading by memory map, binding checkpoint tensors to a model's
//! parameters by path (with the model's `checkpoint` name rules), and writing atomically.

use crate::tensor::{Data, Tensor};
use memmap2::Mmap;
/// The `safetensors` crate's error, for [`describe_error`].
pub use safetensors::SafeTensorError;
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
    /// Opens and validates a safetensors file (header, offsets, sizes). Only a regular file is
    /// opened (a FIFO, directory or device node is refused, saying which it is).
    pub fn open(path: &Path) -> Result<WeightFile, WeightError> {
        let file = crate::files::open_regular(path).map_err(|e| WeightError {
            message: format!("cannot open {}: {e}", path.display()),
        })?;
        // SAFETY: the map is read-only; a file changed underneath us gives wrong numbers, not UB
        // in our code (the bytes are copied out when a tensor is read).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WeightError {
            message: format!("cannot map {}: {e}", path.display()),
        })?;
        check_layout(&mmap).map_err(|why| WeightError {
            message: format!("{} is not a valid safetensors file: {why}", path.display()),
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
        // Every dtype is read into 4-byte elements (bools into 1-byte ones).
        let elem = if view.dtype() == Dtype::BOOL { 1 } else { 4 };
        crate::alloc::ensure_shape(&shape, elem, || {
            format!("tensor `{name}` {shape:?} of {}", self.path.display())
        })?;
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

    /// A tensor as stored: dtype, shape and its bytes in the memory map (no conversion).
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8]), WeightError> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|_| WeightError {
            message: format!("{} has no tensor `{name}`", self.path.display()),
        })?;
        Ok((view.dtype(), view.shape().to_vec(), view.data()))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where [`bind`] reads tensors: one file ([`WeightFile`]) or several read as one
/// ([`crate::weight_set::WeightSet`]).
pub trait TensorSource {
    /// Every tensor name, sorted.
    fn tensor_names(&self) -> Vec<String>;
    /// Reads a tensor.
    fn tensor(&self, name: &str) -> Result<Tensor, WeightError>;
    /// The file or files, for messages.
    fn label(&self) -> String;
}

impl TensorSource for WeightFile {
    fn tensor_names(&self) -> Vec<String> {
        self.names()
    }
    fn tensor(&self, name: &str) -> Result<Tensor, WeightError> {
        self.get(name)
    }
    fn label(&self) -> String {
        self.path.display().to_string()
    }
}

/// The largest header the safetensors crate reads (100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Checks the layout of a safetensors file before the `safetensors` crate reads it, saying
/// exactly what is wrong: the header length, its text, each entry (dtype, shape, offsets), the
/// tensors' byte ranges against each other, and the data against the file's length (missing
/// bytes: truncated; extra bytes: trailing data).
pub fn check_layout(bytes: &[u8]) -> Result<(), String> {
    use safetensors::tensor::TensorInfo;
    let len = bytes.len();
    let Some(first) = bytes.get(..8) else {
        return Err(format!(
            "the file is {len} bytes long, too short to hold the 8-byte header length \
             (empty or truncated)"
        ));
    };
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(first);
    let n = u64::from_le_bytes(n8);
    let rest = (len - 8) as u64;
    if n > MAX_HEADER {
        return Err(format!(
            "its first 8 bytes give a header length of {n} bytes, more than the 100 MB a \
             safetensors header may have (not a safetensors file?)"
        ));
    }
    if n > rest {
        return Err(format!(
            "its header length is {n} bytes but only {rest} bytes follow the length field \
             (truncated, or not a safetensors file)"
        ));
    }
    let stop = 8 + n as usize;
    let text = std::str::from_utf8(&bytes[8..stop]).map_err(|e| {
        format!(
            "the {n}-byte header is not UTF-8 text (invalid byte at header offset {}; not a \
             safetensors file?)",
            e.valid_up_to()
        )
    })?;
    let header: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the header is not valid JSON: {e}"))?;
    let serde_json::Value::Object(entries) = header else {
        return Err(format!(
            "the header is JSON but not an object of tensors (it is {})",
            json_kind(&header)
        ));
    };
    let mut tensors: Vec<(String, TensorInfo)> = Vec::with_capacity(entries.len());
    for (name, v) in entries {
        if name == "__metadata__" {
            serde_json::from_value::<Option<std::collections::HashMap<String, String>>>(v)
                .map_err(|e| {
                    format!("the header's `__metadata__` must map strings to strings: {e}")
                })?;
            continue;
        }
        let info: TensorInfo = serde_json::from_value(v).map_err(|e| {
            format!(
                "the header entry of tensor `{name}` is invalid: {e} (each entry needs \
                 `dtype`, `shape` and `data_offsets`)"
            )
        })?;
        let (start, end) = info.data_offsets;
        if end < start {
            return Err(format!(
                "tensor `{name}` has data_offsets [{start}, {end}]: the end is before the start"
            ));
        }
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(info.dtype.size()));
        let Some(want) = numel else {
            return Err(format!(
                "tensor `{name}` has shape {:?}: its size overflows",
                info.shape
            ));
        };
        if end - start != want {
            return Err(format!(
                "tensor `{name}` is {:?}{:?}, {want} bytes, but its data_offsets [{start}, {end}] \
                 span {} bytes",
                info.dtype,
                info.shape,
                end - start
            ));
        }
        tensors.push((name, info));
    }
    tensors.sort_by_key(|(_, i)| i.data_offsets);
    let mut at = 0usize;
    let mut prev: Option<&str> = None;
    for (name, info) in &tensors {
        let (start, end) = info.data_offsets;
        if start != at {
            let after = match prev {
                Some(p) => format!("tensor `{p}` ends at byte {at}"),
                None => "the data starts at byte 0".to_string(),
            };
            let what = if start > at { "a gap" } else { "an overlap" };
            return Err(format!(
                "tensor `{name}` starts at data byte {start}, but {after} ({what}: tensors must \
                 cover the data contiguously)"
            ));
        }
        at = end;
        prev = Some(name);
    }
    let data = rest - n;
    let at = at as u64;
    if at > data {
        return Err(format!(
            "the header describes {at} bytes of tensor data but the file holds only {data} \
             after the header: {} bytes missing (truncated)",
            at - data
        ));
    }
    if at < data {
        return Err(format!(
            "{} bytes of trailing data after the last tensor (the header describes {at} bytes \
             of tensor data, the file holds {data})",
            data - at
        ));
    }
    Ok(())
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Every error of the `safetensors` crate in words ([`check_layout`] says more about the ones
/// it catches first).
pub fn describe_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeader => "the header is not UTF-8 text (not a safetensors file?)".into(),
        E::InvalidHeaderStart => {
            "the header does not start with `{` (not a safetensors file?)".into()
        }
        E::InvalidHeaderDeserialization => {
            "the header is not a valid JSON description of tensors".into()
        }
        E::HeaderTooLarge => {
            "the header length is larger than the 100 MB limit (not a safetensors file?)".into()
        }
        E::HeaderTooSmall => {
            "the file is too short to hold the 8-byte header length (empty or truncated)".into()
        }
        E::InvalidHeaderLength => {
            "the header length runs past the end of the file (truncated?)".into()
        }
        E::TensorNotFound(n) => format!("there is no tensor `{n}`"),
        E::TensorInvalidInfo => "a tensor's byte range does not match its dtype and shape".into(),
        E::InvalidOffset(n) => {
            format!("tensor `{n}` has data_offsets that do not follow the previous tensor's")
        }
        E::IoError(e) => format!("read error: {e}"),
        E::JsonError(e) => format!("the header is not valid JSON: {e}"),
        E::InvalidTensorView(d, shape, n) => {
            format!("a {d:?}{shape:?} tensor cannot be made from {n} bytes")
        }
        E::MetadataIncompleteBuffer => {
            "the tensors described by the header do not cover the data exactly (truncated, or \
             trailing data after the last tensor)"
                .into()
        }
        E::ValidationOverflow => "a tensor's shape is so large that its size overflows".into(),
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

/// Binds every parameter of `graph` to a tensor of `file` (one file or a [`WeightSet`]),
/// checking shapes and dtypes. All problems are reported together.
///
/// [`WeightSet`]: crate::weight_set::WeightSet
pub fn bind(
    graph: &Graph,
    file: &impl TensorSource,
    rules: &[NameRule],
) -> Result<Bound, WeightError> {
    let mut by_param: BTreeMap<String, String> = BTreeMap::new();
    let mut unused = Vec::new();
    let mut problems = Vec::new();
    for name in file.tensor_names() {
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
                file.label(),
                closest(path, &by_param)
            ));
            continue;
        };
        match file.tensor(name) {
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
            file.label(),
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
    // The raw bytes of every tensor and the serialised file are both held in memory.
    let raw: Option<u128> = tensors.values().try_fold(0u128, |acc, t| {
        let elem = t.dtype().bits() as usize / 8;
        acc.checked_add(crate::alloc::shape_bytes(&t.shape, elem)?)
    });
    crate::alloc::ensure(raw.and_then(|r| r.checked_mul(2)), || {
        format!("writing {} ({} tensors)", path.display(), tensors.len())
    })?;
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
                    message: format!("tensor `{n}`: {}", describe_error(&e)),
                })
        })
        .collect::<Result<_, _>>()?;
    let data = safetensors::serialize(views, &None).map_err(|e| WeightError {
        message: format!("cannot serialise: {}", describe_error(&e)),
    })?;
    write_atomic(path, &data).map_err(|e| WeightError {
        message: format!("cannot write {}: {e}", path.display()),
    })
}

/// Writes bytes atomically: see [`crate::files::write_atomic`] (a temporary name unique to the
/// process, synced and renamed; symlinks written through; FIFOs, directories and device nodes
/// other than `/dev/null` refused).
pub use crate::files::write_atomic;
