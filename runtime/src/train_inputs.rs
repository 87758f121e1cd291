//! What a trainer's forward reads from a batch of rows: every model input, filled from the
//! examples and the model's `preprocess` declarations.
//!
//! By input name and type: the token ids (`ids`, `input_ids`), the 0/1 attention mask (`mask`,
//! `attention_mask`), token types (`types`, `token_type_ids`: zeros), the images (the input of
//! the `image` preprocessing: `[B, 3, H, W]` one per row, `[N, 3, H, W]` every image of the
//! batch in order (LLaVA), `[B * N, 3, H, W]` up to N per row, missing ones zero (IDEFICS)),
//! IDEFICS' `image_mask: [B, T, N]` (each token sees the latest image placed at or before it),
//! Fuyu's `patches` (the `patches` preprocessing) and InstructBLIP's instruction for the
//! Q-Former (a second `text` preprocessing filling other inputs, with the prompt's text).

use crate::inputs::load_images;
use crate::tensor::Tensor;
use crate::train_data::{DataError, Example, ImageTokens, Tok};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc::elab::{Elaborated, Preprocess, Setting};
use vlmc::ir::TensorType;

fn derr<T>(message: impl Into<String>) -> Result<T, DataError> {
    Err(DataError {
        message: message.into(),
    })
}

/// How the images of a batch fill the image input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grouping {
    /// `[B, ...]`: exactly one image per row.
    OnePerRow,
    /// `[N, ...]`, N free: every image of the batch in order (rows may have none).
    Pooled,
    /// `[B * N, ...]`: N slots per row, N the most images of a row; empty slots are zeros.
    Slots,
}

/// The image input: its name, preprocessing and grouping.
#[derive(Clone, Debug)]
struct Images {
    input: String,
    pre: Preprocess,
    grouping: Grouping,
    /// `patches` preprocessing: the patch side (the input is `[B, N, patch² · 3]`).
    patch: Option<usize>,
}

/// InstructBLIP's Q-Former instruction: its inputs, tokenizer and length limit.
struct Instruction {
    ids: String,
    mask: Option<String>,
    tok: Tok,
    max_len: usize,
}

/// How a batch of [`Example`]s becomes the model's inputs.
pub struct BatchPlan {
    pub ids: String,
    attention: Option<String>,
    types: Option<String>,
    images: Option<Images>,
    image_mask: Option<String>,
    instruction: Option<Instruction>,
    /// The image placeholder id (IDEFICS' image mask follows it).
    placeholder: Option<i32>,
    /// Inputs nothing above fills: given per row by a field of their name (a file holding the
    /// row's tensor, or a number), stacked along a new first axis.
    per_row: Vec<(String, TensorType)>,
    pad_id: i32,
}

fn int_arg(p: &Preprocess, key: &str) -> Option<i64> {
    match p.arg(key) {
        Some(Setting::Int(i)) => Some(*i),
        _ => None,
    }
}

fn str_arg<'a>(p: &'a Preprocess, key: &str) -> Option<&'a str> {
    match p.arg(key) {
        Some(Setting::Str(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// The image preprocessing of a model that declares none, for its input `input`: resize to
/// the input's size, scale to [-1, 1] ([`crate::train_data::image_preprocess`]).
fn default_image(input: &str, size: usize) -> Preprocess {
    let mut p = crate::train_data::image_preprocess(&[], size);
    p.inputs = vec![input.into()];
    p
}

impl BatchPlan {
    /// The plan of a model that reads `ids`, the attention `mask` and (with `images`) one
    /// image per row into the preprocessing's input.
    pub fn simple(pad_id: i32, images: Option<&Preprocess>) -> BatchPlan {
        BatchPlan {
            ids: "ids".into(),
            attention: Some("mask".into()),
            types: None,
            images: images.map(|p| Images {
                input: p.inputs.first().cloned().unwrap_or_else(|| "pixels".into()),
                pre: p.clone(),
                grouping: Grouping::OnePerRow,
                patch: None,
            }),
            image_mask: None,
            instruction: None,
            placeholder: None,
            per_row: Vec::new(),
            pad_id,
        }
    }

    /// The plan for `model`'s inputs. `tok` is the training tokenizer (its pad id; the
    /// placeholder's id); `tok_dir` is where a second tokenizer (`qformer_tokenizer.json`) is
    /// looked for.
    pub fn of(model: &Elaborated, tok: &Tok, tok_dir: &Path) -> Result<BatchPlan, DataError> {
        let inputs: Vec<(String, TensorType)> = model
            .graph
            .inputs()
            .into_iter()
            .map(|(_, n, t)| (n.to_string(), t.clone()))
            .collect();
        let find = |names: &[&str]| {
            inputs
                .iter()
                .find(|(n, _)| names.contains(&n.as_str()))
                .map(|(n, t)| (n.clone(), t.clone()))
        };
        let Some((ids, ids_ty)) = find(&["ids", "input_ids"]) else {
            let names: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
            return derr(format!(
                "the model has no token input (`ids` or `input_ids`) to train on; its inputs: {}",
                names.join(", ")
            ));
        };
        let batch_sym = ids_ty.shape[0].as_symbol().map(str::to_string);
        let text_pre = model
            .preprocess
            .iter()
            .find(|p| p.kind == "text" && p.inputs.contains(&ids));
        // The text preprocessing names the mask and types inputs by position.
        let named = |i: usize| text_pre.and_then(|p| p.inputs.get(i).cloned());
        let attention = named(1).or_else(|| find(&["mask", "attention_mask"]).map(|(n, _)| n));
        let types = named(2).or_else(|| find(&["types", "token_type_ids"]).map(|(n, _)| n));
        let placeholder = text_pre
            .and_then(|p| str_arg(p, "image_token"))
            .unwrap_or("<image>");
        let placeholder_id = tok.token_id(placeholder);

        let declared = |kind: &str| model.preprocess.iter().find(|p| p.kind == kind).cloned();
        let images = if let Some(p) = declared("patches") {
            Some(Images {
                input: p.inputs[0].clone(),
                patch: int_arg(&p, "patch").map(|x| x.max(1) as usize),
                pre: p,
                grouping: Grouping::OnePerRow,
            })
        } else {
            let pixel = declared("image")
                .map(|p| p.inputs[0].clone())
                .or_else(|| find(&["pixels", "pixel_values"]).map(|(n, _)| n));
            match pixel.and_then(|n| inputs.iter().find(|(m, _)| *m == n).cloned()) {
                Some((name, ty)) if ty.rank() == 4 => {
                    let first = &ty.shape[0];
                    let syms = first.symbols();
                    let grouping = match (&batch_sym, first.as_symbol()) {
                        (Some(b), Some(s)) if s == b => Grouping::OnePerRow,
                        (Some(b), None) if syms.contains(&b.as_str()) => Grouping::Slots,
                        _ => Grouping::Pooled,
                    };
                    let size = ty.shape[3].as_const().unwrap_or(224).max(1) as usize;
                    let pre = declared("image").unwrap_or_else(|| default_image(&name, size));
                    Some(Images {
                        input: name,
                        pre,
                        grouping,
                        patch: None,
                    })
                }
                _ => None,
            }
        };
        let image_mask = find(&["image_mask", "image_attention_mask"])
            .filter(|(_, t)| t.rank() == 3)
            .map(|(n, _)| n);
        let instruction = match model
            .preprocess
            .iter()
            .find(|p| p.kind == "text" && !p.inputs.contains(&ids))
        {
            Some(p) => {
                let path = match str_arg(p, "tokenizer") {
                    Some(t) if Path::new(t).is_absolute() => PathBuf::from(t),
                    Some(t) => tok_dir.join(t),
                    None => tok_dir.join("tokenizer.json"),
                };
                let tok = Tok::load(&path).map_err(|e| DataError {
                    message: format!(
                        "the model's `preprocess ({}) = text(...)` needs its tokenizer: {}",
                        p.inputs.join(", "),
                        e.message
                    ),
                })?;
                Some(Instruction {
                    ids: p.inputs[0].clone(),
                    mask: p.inputs.get(1).cloned(),
                    tok,
                    max_len: int_arg(p, "max_len").unwrap_or(512).max(1) as usize,
                })
            }
            None => None,
        };
        let mut filled: Vec<&str> = vec![ids.as_str()];
        filled.extend(attention.as_deref());
        filled.extend(types.as_deref());
        filled.extend(images.as_ref().map(|i| i.input.as_str()));
        filled.extend(image_mask.as_deref());
        if let Some(i) = &instruction {
            filled.push(&i.ids);
            filled.extend(i.mask.as_deref());
        }
        // `uniform_*` inputs are drawn by the session (crate::train_uniform)
        let per_row = inputs
            .iter()
            .filter(|(n, _)| {
                !filled.contains(&n.as_str()) && !n.starts_with(crate::train_uniform::UNIFORM_INPUT)
            })
            .cloned()
            .collect();
        Ok(BatchPlan {
            ids,
            attention,
            types,
            images,
            image_mask,
            instruction,
            placeholder: placeholder_id,
            per_row,
            pad_id: tok.pad_id,
        })
    }

    /// The placeholder expansion for [`crate::train_data::RowFormat::images`]: the text
    /// preprocessing's `image_token` repeated `image_tokens` times, or (patches) the patch grid
    /// row by row, each row ended by the newline token. None when the model takes no images
    /// through placeholders (CLIP, ClipCap, IDEFICS' images need no expansion but are placed).
    pub fn image_tokens(
        &self,
        model: &Elaborated,
        tok: &Tok,
    ) -> Result<Option<ImageTokens>, DataError> {
        let Some(img) = &self.images else {
            return Ok(None);
        };
        let text_pre = model
            .preprocess
            .iter()
            .find(|p| p.kind == "text" && p.inputs.contains(&self.ids));
        if let Some(patch) = img.patch {
            let need = |key: &str| -> Result<i32, DataError> {
                let t = str_arg(&img.pre, key).unwrap_or("");
                tok.token_id(t).ok_or_else(|| DataError {
                    message: format!(
                        "the `patches` preprocessing's `{key}` {t:?} is not a token of the tokenizer"
                    ),
                })
            };
            let (image, newline) = (need("image_token")?, need("newline_token")?);
            let side = int_arg(&img.pre, "size").unwrap_or(0).max(0) as usize / patch;
            let mut expand = Vec::new();
            for _ in 0..side {
                expand.extend(std::iter::repeat_n(image, side));
                expand.push(newline);
            }
            let placeholder = text_pre
                .and_then(|p| str_arg(p, "image_token"))
                .unwrap_or("<image>")
                .to_string();
            let id = tok.token_id(&placeholder).unwrap_or(-1);
            return Ok(Some(ImageTokens {
                placeholder,
                id,
                expand,
            }));
        }
        let Some(p) = text_pre else {
            return Ok(None);
        };
        let Some(placeholder) = str_arg(p, "image_token") else {
            return Ok(None);
        };
        let Some(id) = tok.token_id(placeholder) else {
            return derr(format!(
                "the model's text preprocessing places images at `{placeholder}`, which is not a \
                 token of the tokenizer: add it as a special token"
            ));
        };
        let n = int_arg(p, "image_tokens").unwrap_or(1).max(1) as usize;
        Ok(Some(ImageTokens {
            placeholder: placeholder.to_string(),
            id,
            expand: vec![id; n],
        }))
    }

    /// The image input's name, when the model takes images.
    pub fn image_input(&self) -> Option<&str> {
        self.images.as_ref().map(|i| i.input.as_str())
    }

    /// Checks a row against the model before the run: a model with one image per row needs
    /// exactly one; a model without images takes none; every per-row input is given.
    pub fn check_row(&self, e: &Example, at: &str) -> Result<(), DataError> {
        let missing: Vec<String> = self
            .per_row
            .iter()
            .filter(|(n, _)| !e.fields.contains_key(n))
            .map(|(n, _)| format!("`{n}`"))
            .collect();
        if !missing.is_empty() {
            return derr(format!(
                "{at}: the row does not give the model's input(s) {}, which are not made from \
                 text or images: give each in every row, `\"NAME\": \"FILE.npy\"` (or \
                 FILE.safetensors, FILE.safetensors:TENSOR, relative to the data) or a number",
                missing.join(", ")
            ));
        }
        match &self.images {
            None if !e.images.is_empty() => derr(format!(
                "{at}: the row has {} image(s), but the model takes no images",
                e.images.len()
            )),
            Some(i) if i.grouping == Grouping::OnePerRow && e.images.len() != 1 => derr(format!(
                "{at}: the model takes one image per row (its input `{}`), the row has {}",
                i.input,
                e.images.len()
            )),
            _ => Ok(()),
        }
    }

    /// The batch as model inputs plus `loss_mask`: token rows right-padded to the longest.
    pub fn collate(&self, examples: &[&Example]) -> Result<BTreeMap<String, Tensor>, DataError> {
        let b = examples.len();
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let mut ids = vec![self.pad_id; b * t];
        let mut loss = vec![0f32; b * t];
        let mut att = vec![0i32; b * t];
        for (r, e) in examples.iter().enumerate() {
            ids[r * t..r * t + e.ids.len()].copy_from_slice(&e.ids);
            loss[r * t..r * t + e.mask.len()].copy_from_slice(&e.mask);
            att[r * t..r * t + e.ids.len()].fill(1);
        }
        let mut out = BTreeMap::new();
        out.insert(self.ids.clone(), Tensor::i32(vec![b, t], ids.clone()));
        out.insert("loss_mask".to_string(), Tensor::f32(vec![b, t], loss));
        if let Some(a) = &self.attention {
            out.insert(a.clone(), Tensor::i32(vec![b, t], att));
        }
        if let Some(ty) = &self.types {
            out.insert(ty.clone(), Tensor::i32(vec![b, t], vec![0; b * t]));
        }
        if let Some(img) = &self.images {
            let slots = examples.iter().map(|e| e.images.len()).max().unwrap_or(0);
            let tensor = self.images_tensor(img, examples, slots)?;
            out.insert(img.input.clone(), tensor);
            if let Some(m) = &self.image_mask {
                out.insert(m.clone(), self.image_mask_tensor(examples, t, slots));
            }
        }
        for (name, ty) in &self.per_row {
            out.insert(name.clone(), per_row_tensor(name, ty, examples)?);
        }
        if let Some(ins) = &self.instruction {
            let mut rows = Vec::new();
            for e in examples {
                let mut v = ins.tok.encode(&e.instruction, true)?;
                v.truncate(ins.max_len);
                rows.push(v);
            }
            let s = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let mut qi = vec![ins.tok.pad_id; b * s];
            let mut qm = vec![0i32; b * s];
            for (r, v) in rows.iter().enumerate() {
                qi[r * s..r * s + v.len()].copy_from_slice(v);
                qm[r * s..r * s + v.len()].fill(1);
            }
            out.insert(ins.ids.clone(), Tensor::i32(vec![b, s], qi));
            if let Some(m) = &ins.mask {
                out.insert(m.clone(), Tensor::i32(vec![b, s], qm));
            }
        }
        Ok(out)
    }

    fn images_tensor(
        &self,
        img: &Images,
        examples: &[&Example],
        slots: usize,
    ) -> Result<Tensor, DataError> {
        let load = |paths: &[String]| -> Result<Tensor, DataError> {
            let px = load_images(&img.pre, paths).map_err(|e| DataError { message: e.message })?;
            Ok(match img.patch {
                Some(p) => patchify(&px, p),
                None => px,
            })
        };
        let path = |p: &PathBuf| p.display().to_string();
        match img.grouping {
            Grouping::OnePerRow => {
                let mut paths = Vec::new();
                for e in examples {
                    if e.images.len() != 1 {
                        return derr(format!(
                            "the model takes one image per row (its input `{}`), a row has {}",
                            img.input,
                            e.images.len()
                        ));
                    }
                    paths.push(path(&e.images[0]));
                }
                load(&paths)
            }
            Grouping::Pooled => {
                let paths: Vec<String> = examples
                    .iter()
                    .flat_map(|e| e.images.iter().map(path))
                    .collect();
                if paths.is_empty() {
                    let size = int_arg(&img.pre, "crop")
                        .filter(|&c| c > 0)
                        .or_else(|| int_arg(&img.pre, "size"))
                        .unwrap_or(1) as usize;
                    return Ok(Tensor::f32(vec![0, 3, size, size], Vec::new()));
                }
                load(&paths)
            }
            Grouping::Slots => {
                let size = int_arg(&img.pre, "crop")
                    .filter(|&c| c > 0)
                    .or_else(|| int_arg(&img.pre, "size"))
                    .unwrap_or(1) as usize;
                let per = 3 * size * size;
                let mut data = vec![0f32; examples.len() * slots * per];
                for (r, e) in examples.iter().enumerate() {
                    if e.images.is_empty() {
                        continue;
                    }
                    let paths: Vec<String> = e.images.iter().map(path).collect();
                    let px = load(&paths)?;
                    let src = px.as_f32().unwrap_or(&[]);
                    let at = r * slots * per;
                    data[at..at + src.len()].copy_from_slice(src);
                }
                Ok(Tensor::f32(
                    vec![examples.len() * slots, 3, size, size],
                    data,
                ))
            }
        }
    }

    /// IDEFICS' image mask: token t of a row sees the row's image k when the latest
    /// placeholder at or before t is the k-th one (tokens before the first see none).
    fn image_mask_tensor(&self, examples: &[&Example], t: usize, slots: usize) -> Tensor {
        let b = examples.len();
        let mut m = vec![0i32; b * t * slots];
        for (r, e) in examples.iter().enumerate() {
            let mut current: Option<usize> = None;
            let mut seen = 0usize;
            for (c, &id) in e.ids.iter().enumerate() {
                if Some(id) == self.placeholder {
                    current = Some(seen);
                    seen += 1;
                }
                if let Some(k) = current.filter(|&k| k < slots) {
                    m[(r * t + c) * slots + k] = 1;
                }
            }
        }
        Tensor::i32(vec![b, t, slots], m)
    }
}

/// A per-row input: each row's tensor (a file) or number, stacked along a new first axis, in
/// the input's dtype.
fn per_row_tensor(name: &str, ty: &TensorType, examples: &[&Example]) -> Result<Tensor, DataError> {
    let mut parts = Vec::new();
    for e in examples {
        let at = || format!("line {}: `{name}`", e.line);
        let t = match e.fields.get(name) {
            Some(serde_json::Value::String(v)) => {
                crate::inputs::read_input(name, v).map_err(|x| DataError {
                    message: format!("{}: {}", at(), x.message),
                })?
            }
            Some(serde_json::Value::Number(x)) => {
                Tensor::f32(vec![], vec![x.as_f64().unwrap_or(0.0) as f32])
            }
            Some(serde_json::Value::Bool(b)) => Tensor::f32(vec![], vec![f32::from(u8::from(*b))]),
            _ => {
                return derr(format!(
                    "{}: give a file or a number (the model's input `{name}`)",
                    at()
                ))
            }
        };
        parts.push(t);
    }
    let shape = parts.first().map(|t| t.shape.clone()).unwrap_or_default();
    if let Some(p) = parts.iter().find(|p| p.shape != shape) {
        return derr(format!(
            "the rows of a batch give `{name}` of different shapes ({:?} and {:?})",
            shape, p.shape
        ));
    }
    let mut full = vec![examples.len()];
    full.extend(&shape);
    let values: Vec<f64> = parts.iter().flat_map(|p| p.to_f64()).collect();
    Ok(match ty.dtype {
        vlmc::ir::DType::I32 => Tensor::i32(full, values.iter().map(|&v| v as i32).collect()),
        vlmc::ir::DType::Bool => Tensor::bool(full, values.iter().map(|&v| v != 0.0).collect()),
        _ => Tensor::f32(full, values.iter().map(|&v| v as f32).collect()),
    })
}

/// `[N, 3, S, S]` pixels as `[N, (S/p)², p·p·3]` patches, row-major over the grid, each patch
/// flattened (row, column, channel) as FuyuImageProcessor's `patchify_image`.
pub fn patchify(px: &Tensor, p: usize) -> Tensor {
    let (n, s) = (px.shape[0], px.shape[2]);
    let src = px.as_f32().unwrap_or(&[]);
    let g = s / p;
    let dim = p * p * 3;
    let mut out = vec![0f32; n * g * g * dim];
    for i in 0..n {
        for gy in 0..g {
            for gx in 0..g {
                let base = ((i * g + gy) * g + gx) * dim;
                for y in 0..p {
                    for x in 0..p {
                        for c in 0..3 {
                            let v = src[((i * 3 + c) * s + gy * p + y) * s + gx * p + x];
                            out[base + (y * p + x) * 3 + c] = v;
                        }
                    }
                }
            }
        }
    }
    Tensor::f32(vec![n, g * g, dim], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_follow_fuyus_unfold_order() {
        // 1 image, 3 channels, 4x4, patch 2: value = c*100 + y*10 + x
        let mut data = Vec::new();
        for c in 0..3 {
            for y in 0..4 {
                for x in 0..4 {
                    data.push((c * 100 + y * 10 + x) as f32);
                }
            }
        }
        let p = patchify(&Tensor::f32(vec![1, 3, 4, 4], data), 2);
        assert_eq!(p.shape, vec![1, 4, 12]);
        let v = p.as_f32().unwrap();
        // patch (row 0, col 1): pixels (0,2),(0,3),(1,2),(1,3), channels innermost
        assert_eq!(
            &v[12..24],
            &[2., 102., 202., 3., 103., 203., 12., 112., 212., 13., 113., 213.]
        );
        // patch (row 1, col 0) starts at pixel (2, 0)
        assert_eq!(&v[24..27], &[20., 120., 220.]);
    }
}
