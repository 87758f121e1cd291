//! Model inputs from files and raw data: `.npy` and `.safetensors` arrays, text through a
//! Hugging Face `tokenizer.json`, and images (PNG/JPEG) resized, center-cropped, rescaled and
//! normalised as a model's `preprocess image(...)` declares.

use crate::tensor::{Data, Tensor};
use crate::weights::WeightFile;
use std::collections::BTreeMap;
use std::path::Path;
use vlmc::elab::{Preprocess, Setting};

/// A problem reading an input.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct InputError {
    pub message: String,
}

fn ierr<T>(message: impl Into<String>) -> Result<T, InputError> {
    Err(InputError {
        message: message.into(),
    })
}

/// Reads a `.npy` array (f32, f64, f16, i32, i64, bool; C order).
pub fn read_npy(path: &Path) -> Result<Tensor, InputError> {
    let bytes = std::fs::read(path).map_err(|e| InputError {
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| InputError {
        message: format!("{} is not a .npy file: {e}", path.display()),
    })?;
    if npy.order() != npyz::Order::C {
        return ierr(format!(
            "{}: Fortran-order arrays are not supported",
            path.display()
        ));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = npy.dtype().descr();
    let bad = |e: std::io::Error| InputError {
        message: format!("{}: {e}", path.display()),
    };
    let data = match descr.trim_matches('\'').trim_start_matches(['<', '|', '=']) {
        "f4" => Data::F32(npy.into_vec::<f32>().map_err(bad)?),
        "f8" => Data::F32(
            npy.into_vec::<f64>()
                .map_err(bad)?
                .into_iter()
                .map(|x| x as f32)
                .collect(),
        ),
        "i4" => Data::I32(npy.into_vec::<i32>().map_err(bad)?),
        "i8" => {
            let v = npy.into_vec::<i64>().map_err(bad)?;
            let mut out = Vec::with_capacity(v.len());
            for x in v {
                out.push(i32::try_from(x).map_err(|_| InputError {
                    message: format!("{}: value {x} does not fit in i32", path.display()),
                })?);
            }
            Data::I32(out)
        }
        "b1" => Data::Bool(npy.into_vec::<bool>().map_err(bad)?),
        other => {
            return ierr(format!(
                "{}: dtype `{other}` is not supported (f4, f8, i4, i8, b1)",
                path.display()
            ))
        }
    };
    let t = Tensor { shape, data };
    if t.numel()
        != match &t.data {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    {
        return ierr(format!(
            "{}: the data does not match the shape",
            path.display()
        ));
    }
    Ok(t)
}

/// Reads an input file: `.npy` (one array) or `.safetensors` (the tensor named `name`, or the
/// only tensor in the file).
pub fn read_input_file(name: &str, path: &Path) -> Result<Tensor, InputError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => read_npy(path),
        Some("safetensors") => {
            let f = WeightFile::open(path).map_err(|e| InputError { message: e.message })?;
            let names = f.names();
            let pick = if names.iter().any(|n| n == name) {
                name.to_string()
            } else if names.len() == 1 {
                names[0].clone()
            } else {
                return ierr(format!(
                    "{} has no tensor `{name}` (it has: {})",
                    path.display(),
                    names.join(", ")
                ));
            };
            f.get(&pick).map_err(|e| InputError { message: e.message })
        }
        _ => ierr(format!(
            "{}: inputs are read from .npy or .safetensors files",
            path.display()
        )),
    }
}

fn int_arg(p: &Preprocess, key: &str) -> i64 {
    match p.arg(key) {
        Some(Setting::Int(i)) => *i,
        Some(Setting::Float(f)) => *f as i64,
        _ => 0,
    }
}

fn float_arg(p: &Preprocess, key: &str) -> f64 {
    match p.arg(key) {
        Some(Setting::Int(i)) => *i as f64,
        Some(Setting::Float(f)) => *f,
        _ => 0.0,
    }
}

fn list_arg(p: &Preprocess, key: &str) -> Vec<f64> {
    match p.arg(key) {
        Some(Setting::List(v)) => v
            .iter()
            .map(|x| match x {
                Setting::Int(i) => *i as f64,
                Setting::Float(f) => *f,
                _ => 0.0,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Tokenizes a batch of texts with a `tokenizer.json` (special tokens added, truncated to the
/// declared `max_len`, right-padded with the tokenizer's pad id to the longest text). Returns
/// the tensors for the preprocess's inputs in order: ids, attention mask, token types.
pub fn tokenize(
    p: &Preprocess,
    tokenizer: &Path,
    texts: &[String],
) -> Result<Vec<Tensor>, InputError> {
    let mut tok = tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| InputError {
        message: format!("cannot load the tokenizer {}: {e}", tokenizer.display()),
    })?;
    let pad_id = tok.get_padding().map_or(0, |pp| pp.pad_id) as i32;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| InputError {
        message: format!("{e}"),
    })?;
    let max_len = int_arg(p, "max_len").max(1) as usize;
    let mut rows = Vec::new();
    for t in texts {
        let enc = tok.encode(t.as_str(), true).map_err(|e| InputError {
            message: format!("cannot tokenize {t:?}: {e}"),
        })?;
        let mut ids: Vec<i32> = enc.get_ids().iter().map(|&x| x as i32).collect();
        let mut types: Vec<i32> = enc.get_type_ids().iter().map(|&x| x as i32).collect();
        if ids.len() > max_len {
            // Keep the final special token (e.g. [SEP]) as the Hugging Face tokenizers do.
            let last = ids[ids.len() - 1];
            ids.truncate(max_len);
            types.truncate(max_len);
            if enc.get_special_tokens_mask().last() == Some(&1) {
                ids[max_len - 1] = last;
            }
        }
        rows.push((ids, types));
    }
    let b = rows.len();
    let t = rows.iter().map(|(i, _)| i.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i32; b * t];
    let mut types = vec![0i32; b * t];
    for (r, (ri, rt)) in rows.iter().enumerate() {
        for (c, (&i, &ty)) in ri.iter().zip(rt).enumerate() {
            ids[r * t + c] = i;
            mask[r * t + c] = 1;
            types[r * t + c] = ty;
        }
    }
    let all = [
        Tensor::i32(vec![b, t], ids),
        Tensor::i32(vec![b, t], mask),
        Tensor::i32(vec![b, t], types),
    ];
    Ok(all.into_iter().take(p.inputs.len()).collect())
}

/// Loads images and preprocesses them as declared: resize the shorter side to `size`, center
/// crop `crop` x `crop` (`crop: 0` means `size`), multiply by `rescale`, normalise each channel
/// with `mean` and `std`. Returns f32[N, 3, crop, crop].
pub fn load_images(p: &Preprocess, paths: &[String]) -> Result<Tensor, InputError> {
    let size = int_arg(p, "size").max(1) as u32;
    let crop = match int_arg(p, "crop") {
        c if c > 0 => c as u32,
        _ => size,
    };
    let rescale = float_arg(p, "rescale");
    let (mean, std) = (list_arg(p, "mean"), list_arg(p, "std"));
    if mean.len() != 3 || std.len() != 3 || std.contains(&0.0) {
        return ierr("image preprocessing needs 3 means and 3 non-zero stds");
    }
    let filter = match p.arg("resample") {
        Some(Setting::Symbol(s)) if s == "bilinear" => image::imageops::FilterType::Triangle,
        Some(Setting::Symbol(s)) if s == "nearest" => image::imageops::FilterType::Nearest,
        _ => image::imageops::FilterType::CatmullRom,
    };
    let c = crop as usize;
    let mut out = Vec::with_capacity(paths.len() * 3 * c * c);
    for path in paths {
        let img = image::open(path)
            .map_err(|e| InputError {
                message: format!("cannot read the image {path}: {e}"),
            })?
            .to_rgb8();
        let (w, h) = img.dimensions();
        let scale = size as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(crop),
            ((h as f64 * scale).round() as u32).max(crop),
        );
        let resized = image::imageops::resize(&img, nw, nh, filter);
        let (x0, y0) = ((nw - crop) / 2, (nh - crop) / 2);
        for ch in 0..3 {
            for y in 0..crop {
                for x in 0..crop {
                    let v = f64::from(resized.get_pixel(x0 + x, y0 + y)[ch]);
                    out.push(((v * rescale - mean[ch]) / std[ch]) as f32);
                }
            }
        }
    }
    Ok(Tensor::f32(vec![paths.len(), 3, c, c], out))
}

/// Every input a model needs, from `--input NAME=VALUE` pairs: `text=...` and `image=PATH`
/// go through the model's preprocessing (several make a batch); other names are files.
pub fn gather_inputs(
    pairs: &[(String, String)],
    preprocess: &[Preprocess],
    tokenizer_dir: &Path,
    tokenizer_override: Option<&Path>,
) -> Result<BTreeMap<String, Tensor>, InputError> {
    let mut out = BTreeMap::new();
    let mut texts = Vec::new();
    let mut images = Vec::new();
    for (name, value) in pairs {
        match name.as_str() {
            "text" => texts.push(value.clone()),
            "image" => images.push(value.clone()),
            _ => {
                out.insert(name.clone(), read_input_file(name, Path::new(value))?);
            }
        }
    }
    for (kind, raw) in [("text", &texts), ("image", &images)] {
        if raw.is_empty() {
            continue;
        }
        let Some(p) = preprocess.iter().find(|p| p.kind == kind) else {
            return ierr(format!(
                "`--input {kind}=...` needs a `preprocess ... = {kind}(...)` in the model"
            ));
        };
        let tensors = if kind == "text" {
            let path = match tokenizer_override {
                Some(t) => t.to_path_buf(),
                None => match p.arg("tokenizer") {
                    Some(Setting::Str(s)) => tokenizer_dir.join(s),
                    _ => tokenizer_dir.join("tokenizer.json"),
                },
            };
            tokenize(p, &path, raw)?
        } else {
            vec![load_images(p, raw)?]
        };
        for (name, t) in p.inputs.iter().zip(tensors) {
            out.entry(name.clone()).or_insert(t);
        }
    }
    Ok(out)
}
