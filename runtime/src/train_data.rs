//! Training data: JSONL rows tokenised with a `tokenizer.json`, shuffled with the trainer's
//! seed, padded and batched.
//!
//! Rows (TRL's formats): `{"text": ...}` (language modelling: every token is a target),
//! `{"prompt": ..., "completion": ...}` (the completion is the target; the end-of-sequence
//! token is appended when the tokenizer has one), `{"messages": [{"role", "content"}, ...]}`
//! (the last message is the completion, the earlier ones, rendered `role: content\n`, the
//! prompt). Images: `"image": PATH` or `"images": [PATH, ...]` (the first), relative to the
//! data file. Contrastive objectives read `image` and `text` (or `caption`).

use crate::inputs::load_images;
use crate::rng::uniform01;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc::elab::{Preprocess, Setting};

/// A failure reading or preparing data.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct DataError {
    pub message: String,
}

fn derr<T>(message: impl Into<String>) -> Result<T, DataError> {
    Err(DataError {
        message: message.into(),
    })
}

/// One tokenised example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<i32>,
    /// 1 where the token is a target, 0 for prompt tokens.
    pub mask: Vec<f32>,
    pub image: Option<PathBuf>,
    /// The line of the data file it came from (1-based; 0 when made otherwise).
    pub line: usize,
}

/// A tokenizer and what the data needs from it.
pub struct Tok {
    tok: tokenizers::Tokenizer,
    pub pad_id: i32,
    pub eos_id: Option<i32>,
}

impl Tok {
    /// Loads a `tokenizer.json` (its padding and truncation settings are ignored).
    pub fn load(path: &Path) -> Result<Tok, DataError> {
        let mut tok =
            crate::inputs::load_tokenizer(path).map_err(|e| DataError { message: e.message })?;
        let id = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| tok.token_to_id(n))
                .map(|x| x as i32)
        };
        let pad_id = tok
            .get_padding()
            .map(|p| p.pad_id as i32)
            .or_else(|| id(&["<pad>", "[PAD]", "<|pad|>"]))
            .unwrap_or(0);
        let eos_id = id(&["</s>", "<eos>", "<|endoftext|>", "<|eot_id|>", "[SEP]"]);
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| DataError {
            message: e.to_string(),
        })?;
        Ok(Tok {
            tok,
            pad_id,
            eos_id,
        })
    }

    /// Token ids of `text`, with the tokenizer's special tokens when `special`.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i32>, DataError> {
        let enc = self.tok.encode(text, special).map_err(|e| DataError {
            message: format!("cannot tokenize {text:?}: {e}"),
        })?;
        Ok(enc.get_ids().iter().map(|&x| x as i32).collect())
    }
}

fn str_field<'a>(row: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    row.get(key).and_then(|v| v.as_str())
}

/// Reads a JSONL file and tokenises every row. `prompt_masked`: prompt tokens are not
/// targets; `max_len` truncates (keeping the start, as TRL does).
pub fn read_jsonl(
    path: &Path,
    tok: &Tok,
    prompt_masked: bool,
    max_len: Option<usize>,
) -> Result<Vec<Example>, DataError> {
    let text = crate::files::read_to_string(path).map_err(|e| DataError {
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    parse_jsonl(path, &text, tok, prompt_masked, max_len)
}

/// [`read_jsonl`] of text already read from `path` (relative image paths resolve beside it).
pub fn parse_jsonl(
    path: &Path,
    text: &str,
    tok: &Tok,
    prompt_masked: bool,
    max_len: Option<usize>,
) -> Result<Vec<Example>, DataError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let row: serde_json::Value = serde_json::from_str(line).map_err(|e| DataError {
            message: format!("{at}: not JSON: {e}"),
        })?;
        let image = str_field(&row, "image")
            .or_else(|| {
                row.get("images")
                    .and_then(|v| v.as_array())
                    .and_then(|a| a.first())
                    .and_then(|v| v.as_str())
            })
            .map(|p| base.join(p));
        let (mut ids, mut mask) = if let (Some(p), Some(c)) =
            (str_field(&row, "prompt"), str_field(&row, "completion"))
        {
            let (p, mut c) = (tok.encode(p, true)?, tok.encode(c, false)?);
            if let Some(eos) = tok.eos_id {
                if c.last() != Some(&eos) {
                    c.push(eos);
                }
            }
            let pm = if prompt_masked { 0.0 } else { 1.0 };
            let mut mask = vec![pm; p.len()];
            mask.extend(vec![1.0; c.len()]);
            let mut ids = p;
            ids.extend(c);
            (ids, mask)
        } else if let Some(msgs) = row.get("messages").and_then(|v| v.as_array()) {
            let Some((last, rest)) = msgs.split_last() else {
                return derr(format!("{at}: `messages` is empty"));
            };
            let render = |m: &serde_json::Value| {
                format!(
                    "{}: {}\n",
                    str_field(m, "role").unwrap_or("user"),
                    str_field(m, "content").unwrap_or("")
                )
            };
            let prompt: String = rest.iter().map(render).collect();
            let p = tok.encode(&prompt, true)?;
            let mut c = tok.encode(str_field(last, "content").unwrap_or(""), false)?;
            if let Some(eos) = tok.eos_id {
                c.push(eos);
            }
            let pm = if prompt_masked { 0.0 } else { 1.0 };
            let mut mask = vec![pm; p.len()];
            mask.extend(vec![1.0; c.len()]);
            let mut ids = p;
            ids.extend(c);
            (ids, mask)
        } else if let Some(t) = str_field(&row, "text").or_else(|| str_field(&row, "caption")) {
            let ids = tok.encode(t, true)?;
            let mask = vec![1.0; ids.len()];
            (ids, mask)
        } else {
            return derr(format!(
                "{at}: a row needs `text`, `prompt` and `completion`, or `messages`"
            ));
        };
        if ids.is_empty() {
            return derr(format!("{at}: the text has no tokens"));
        }
        if let Some(m) = max_len {
            ids.truncate(m.max(1));
            mask.truncate(m.max(1));
        }
        out.push(Example {
            ids,
            mask,
            image,
            line: n + 1,
        });
    }
    if out.is_empty() {
        return derr(format!("{} has no rows", path.display()));
    }
    Ok(out)
}

/// The position in the data: which epoch, and how many examples of its order were used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub index: usize,
}

/// The order of the examples in `epoch`: a Fisher-Yates shuffle driven by the counter-based
/// generator, from `(seed, epoch)` alone, so a resumed run reproduces it.
pub fn order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let stream = seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch);
    for i in (1..n).rev() {
        let j = (uniform01(stream, i as u64) * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
    v
}

/// The next `batch` example indices from `pos` (crossing into the next epoch when the
/// current one runs out), and the position after them.
pub fn next_batch(n: usize, batch: usize, seed: u64, pos: Position) -> (Vec<usize>, Position) {
    let mut pos = pos;
    let mut out = Vec::with_capacity(batch);
    let mut ord = order(n, seed, pos.epoch);
    while out.len() < batch {
        if pos.index >= n {
            pos = Position {
                epoch: pos.epoch + 1,
                index: 0,
            };
            ord = order(n, seed, pos.epoch);
        }
        out.push(ord[pos.index]);
        pos.index += 1;
    }
    (out, pos)
}

/// The image preprocessing of the model, or a default (resize to the pixel input's size,
/// scale to [-1, 1]) for models that declare none.
pub fn image_preprocess(declared: &[Preprocess], size: usize) -> Preprocess {
    if let Some(p) = declared.iter().find(|p| p.kind == "image") {
        return p.clone();
    }
    let list = |v: f64| Setting::List(vec![Setting::Float(v); 3]);
    Preprocess {
        kind: "image".into(),
        inputs: vec!["pixels".into()],
        args: vec![
            ("size".into(), Setting::Int(size as i64)),
            ("crop".into(), Setting::Int(size as i64)),
            ("rescale".into(), Setting::Float(1.0 / 255.0)),
            ("mean".into(), list(0.5)),
            ("std".into(), list(0.5)),
            ("resample".into(), Setting::Symbol("bilinear".into())),
        ],
    }
}

/// A batch as step-graph inputs: `ids` and `loss_mask` [B, T] right-padded to the longest
/// example (padding is no target), `mask` [B, T] the 0/1 attention mask (1 on each row's
/// tokens, for models that read one), and `pixels` when `images` gives the preprocessing.
pub fn collate(
    examples: &[&Example],
    pad_id: i32,
    images: Option<&Preprocess>,
) -> Result<BTreeMap<String, Tensor>, DataError> {
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let mut attention = vec![0i32; b * t];
    for (r, e) in examples.iter().enumerate() {
        ids[r * t..r * t + e.ids.len()].copy_from_slice(&e.ids);
        mask[r * t..r * t + e.mask.len()].copy_from_slice(&e.mask);
        attention[r * t..r * t + e.ids.len()].fill(1);
    }
    let mut out = BTreeMap::new();
    out.insert("ids".to_string(), Tensor::i32(vec![b, t], ids));
    out.insert("mask".to_string(), Tensor::i32(vec![b, t], attention));
    out.insert("loss_mask".to_string(), Tensor::f32(vec![b, t], mask));
    if let Some(p) = images {
        let mut paths = Vec::new();
        for e in examples {
            let Some(img) = &e.image else {
                return derr("the model takes images, but a row has no `image`");
            };
            paths.push(img.display().to_string());
        }
        let px = load_images(p, &paths).map_err(|e| DataError { message: e.message })?;
        for name in &p.inputs {
            out.insert(name.clone(), px.clone());
        }
    }
    Ok(out)
}

/// The inputs of `graph` (a model's forward) that a batch of data rows cannot give: all but
/// what [`collate`] makes (`ids`, `mask`, `loss_mask`, the image inputs of `images`) and the
/// uniform numbers the session draws (`uniform_*`). Empty when the data can feed the model.
pub fn inputs_missing(graph: &vlmc::ir::Graph, images: Option<&Preprocess>) -> Vec<String> {
    let image_inputs: &[String] = images.map_or(&[], |p| p.inputs.as_slice());
    graph
        .inputs()
        .into_iter()
        .map(|(_, name, _)| name.to_string())
        .filter(|n| {
            !["ids", "mask", "loss_mask"].contains(&n.as_str())
                && !image_inputs.contains(n)
                && !n.starts_with(crate::train_uniform::UNIFORM_INPUT)
        })
        .collect()
}

/// The largest tensor a graph makes at some sizes of its inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Largest {
    /// The op and where it is, e.g. `matmul in language_model.layers.0.self_attn`.
    pub what: String,
    /// Its type with the sizes in, e.g. `f32[1, 2, 2000003, 2000003]`.
    pub ty: String,
    /// Its size in bytes (saturated at `u128::MAX`).
    pub bytes: u128,
}

/// The largest tensor of `graph` when its inputs have the shapes in `shapes` (by input name;
/// inputs not given bind no size), in exact integers (no overflow: sizes saturate). Tensors
/// with a size that no given input fixes are left out.
pub fn largest_tensor(
    graph: &vlmc::ir::Graph,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Option<Largest> {
    let mut dims: BTreeMap<String, i64> = BTreeMap::new();
    for (_, name, ty) in graph.inputs() {
        if let Some(sh) = shapes.get(name) {
            for (d, &n) in ty.shape.0.iter().zip(sh) {
                if let Some(sym) = d.as_symbol() {
                    dims.insert(sym.to_string(), i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
    }
    let mut best: Option<Largest> = None;
    for id in graph.node_ids() {
        let node = graph.node(id);
        let mut sizes: Vec<u128> = Vec::new();
        let mut known = true;
        for d in &node.ty.shape.0 {
            if d.symbols().iter().any(|s| !dims.contains_key(*s)) {
                known = false;
                break;
            }
            // `None` with every symbol known: the size overflowed an i64.
            sizes.push(
                d.eval(&|s| dims.get(s).copied())
                    .map_or(u128::MAX, |v| v.max(0) as u128),
            );
        }
        if !known {
            continue;
        }
        let numel = sizes.iter().fold(1u128, |a, &n| a.saturating_mul(n));
        let bits = u128::from(node.ty.dtype.bits().max(1));
        let bytes = numel.saturating_mul(bits).div_ceil(8);
        if best.as_ref().is_none_or(|b| bytes > b.bytes) {
            let shown: Vec<String> = sizes
                .iter()
                .map(|&n| {
                    if n == u128::MAX {
                        "(overflow)".to_string()
                    } else {
                        n.to_string()
                    }
                })
                .collect();
            best = Some(Largest {
                what: if node.scope.is_empty() {
                    node.op.name().to_string()
                } else {
                    format!("{} in {}", node.op.name(), node.scope)
                },
                ty: format!("{}[{}]", node.ty.dtype, shown.join(", ")),
                bytes,
            });
        }
    }
    best
}

/// Checks that a batch of `batch` rows padded to `len` tokens fits in memory when `graph`
/// (a training step, or an evaluation graph) runs on it: the largest tensor it makes must be
/// smaller than the memory available ([`crate::alloc::available`]). The error says which
/// tensor, of which size; the caller names the row.
pub fn check_fits(graph: &vlmc::ir::Graph, batch: usize, len: usize) -> Result<(), String> {
    let mut shapes = BTreeMap::new();
    for name in ["ids", "loss_mask"] {
        shapes.insert(name.to_string(), vec![batch, len]);
    }
    let Some(big) = largest_tensor(graph, &shapes) else {
        return Ok(());
    };
    let available = crate::alloc::available();
    if big.bytes > u128::from(available.bytes) {
        return Err(format!(
            "a batch of {batch} row(s) of {len} tokens needs a tensor of {} ({} {}); {available}",
            crate::alloc::human_bytes(big.bytes),
            big.what,
            big.ty,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_permutations_reproducible_from_the_seed() {
        let a = order(10, 3, 0);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_eq!(a, order(10, 3, 0));
        assert_ne!(a, order(10, 3, 1));
        assert_ne!(a, order(10, 4, 0));
        let start = Position { epoch: 0, index: 0 };
        let (b1, p1) = next_batch(10, 4, 3, start);
        let (b2, p2) = next_batch(10, 4, 3, p1);
        let (b3, p3) = next_batch(10, 4, 3, p2);
        assert_eq!(b1, a[0..4]);
        assert_eq!(b2, a[4..8]);
        assert_eq!(b3[..2], a[8..10]);
        assert_eq!(b3[2..], order(10, 3, 1)[..2]);
        assert_eq!(p3, Position { epoch: 1, index: 2 });
    }

    #[test]
    fn collate_pads_and_masks() {
        let e1 = Example {
            ids: vec![5, 6, 7],
            mask: vec![0.0, 1.0, 1.0],
            image: None,
            line: 1,
        };
        let e2 = Example {
            ids: vec![8],
            mask: vec![1.0],
            image: None,
            line: 2,
        };
        let b = collate(&[&e1, &e2], 0, None).expect("collates");
        assert_eq!(b["ids"], Tensor::i32(vec![2, 3], vec![5, 6, 7, 8, 0, 0]));
        assert_eq!(
            b["loss_mask"],
            Tensor::f32(vec![2, 3], vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
        );
        // the attention mask: 1 on each row's tokens, whatever their loss mask
        assert_eq!(b["mask"], Tensor::i32(vec![2, 3], vec![1, 1, 1, 1, 0, 0]));
    }

    #[test]
    fn inputs_the_rows_cannot_give_are_named() {
        let mut g = vlmc::ir::Graph::new("g");
        let ty = |s: &str| vlmc::ir::TensorType::parse(s).expect("type");
        g.dims.push("B".into());
        g.dims.push("T".into());
        for (name, t) in [
            ("pixels", "f32[B, 3, 8, 8]"),
            ("ids", "i32[B, T]"),
            ("mask", "i32[B, T]"),
            ("uniform_itm", "f32[2, B]"),
            ("visual_feats", "f32[B, 4, 6]"),
        ] {
            g.add_source(vlmc::ir::Op::Input { name: name.into() }, ty(t), "")
                .expect("input");
        }
        let images = image_preprocess(&[], 8);
        assert_eq!(inputs_missing(&g, Some(&images)), vec!["visual_feats"]);
        assert_eq!(inputs_missing(&g, None), vec!["pixels", "visual_feats"]);
    }
}
