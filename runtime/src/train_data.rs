//! Training data: JSONL rows tokenised with a `tokenizer.json`, shuffled with the trainer's
//! seed, padded and batched.
//!
//! Rows (TRL's formats): `{"text": ...}` (language modelling: every token is a target),
//! `{"prompt": ..., "completion": ...}` (the completion is the target; the end-of-sequence
//! token is appended when the tokenizer has one), `{"messages": [{"role", "content"}, ...]}`
//! (the last message is the completion, the earlier ones, rendered `role: content\n`, the
//! prompt). Images: `"image": PATH` or `"images": [PATH, ...]` (the first), relative to the
//! data file. Contrastive objectives read `image` and `text` (or `caption`).

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
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Example {
    pub ids: Vec<i32>,
    /// 1 where the token is a target, 0 for prompt tokens (and image placeholders).
    pub mask: Vec<f32>,
    /// The row's images in order (`image`, or `images`), resolved beside the data file.
    pub images: Vec<PathBuf>,
    /// The prompt's text without image placeholders (InstructBLIP's Q-Former reads it).
    pub instruction: String,
    /// The row's other fields (a model input given per row: a file path, relative to the
    /// data file, or a number).
    pub fields: BTreeMap<String, serde_json::Value>,
    /// The line of the data file it came from (1-based; 0 when made otherwise).
    pub line: usize,
}

/// Token ids and each token's byte range in the text.
pub type Encoded = (Vec<i32>, Vec<(usize, usize)>);

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
        Ok(self.encode_offsets(text, special)?.0)
    }

    /// Token ids of `text` and each token's byte range in it (special tokens the tokenizer
    /// adds have an empty range).
    pub fn encode_offsets(&self, text: &str, special: bool) -> Result<Encoded, DataError> {
        let enc = self.tok.encode(text, special).map_err(|e| DataError {
            message: format!("cannot tokenize {text:?}: {e}"),
        })?;
        let ids = enc.get_ids().iter().map(|&x| x as i32).collect();
        Ok((ids, enc.get_offsets().to_vec()))
    }

    /// The id of a token written as one piece of text (`<image>`), if the vocabulary has it.
    pub fn token_id(&self, text: &str) -> Option<i32> {
        self.tok.token_to_id(text).map(|x| x as i32)
    }
}

/// Which tokens of a row are targets: the completion (`prompt`), every token (`none`), or
/// (`messages` rows) every assistant turn (`assistant`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossMask {
    #[default]
    Prompt,
    None,
    Assistant,
}

/// Where a row's images go in its tokens: each `placeholder` token of the text (or, when the
/// text has none, the start of the row) becomes `expand` (LLaVA: the placeholder repeated once
/// per patch; Fuyu: the patch grid with its newline tokens).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTokens {
    pub placeholder: String,
    pub id: i32,
    pub expand: Vec<i32>,
}

/// How rows become examples.
#[derive(Clone, Debug, Default)]
pub struct RowFormat {
    pub mask: LossMask,
    /// Truncate to this many tokens (keeping the start, as TRL does).
    pub max_len: Option<usize>,
    pub images: Option<ImageTokens>,
    /// The tokenizer's chat template (tokenizer_config.json) for `messages` rows; without
    /// one they are rendered `role: content\n`.
    pub chat: Option<(String, crate::chat::TokenizerConfig)>,
}

impl RowFormat {
    /// Rows for a trainer: prompt tokens masked or not, truncated to `max_len`.
    pub fn plain(prompt_masked: bool, max_len: Option<usize>) -> RowFormat {
        RowFormat {
            mask: if prompt_masked {
                LossMask::Prompt
            } else {
                LossMask::None
            },
            max_len,
            ..RowFormat::default()
        }
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
    read_rows(path, tok, &RowFormat::plain(prompt_masked, max_len))
}

/// [`read_jsonl`] with every option of [`RowFormat`].
pub fn read_rows(path: &Path, tok: &Tok, format: &RowFormat) -> Result<Vec<Example>, DataError> {
    let text = crate::files::read_to_string(path).map_err(|e| DataError {
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    parse_rows(path, &text, tok, format)
}

/// [`read_jsonl`] of text already read from `path` (relative image paths resolve beside it).
pub fn parse_jsonl(
    path: &Path,
    text: &str,
    tok: &Tok,
    prompt_masked: bool,
    max_len: Option<usize>,
) -> Result<Vec<Example>, DataError> {
    parse_rows(path, text, tok, &RowFormat::plain(prompt_masked, max_len))
}

/// A message's text: its `content` string, or the text parts of a content list with the image
/// placeholder for each image part (the Hugging Face processors' format).
fn message_text(m: &serde_json::Value, placeholder: &str) -> String {
    match m.get("content") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(parts)) => parts
            .iter()
            .map(|p| match str_field(p, "type") {
                Some("image") => placeholder.to_string(),
                _ => str_field(p, "text").unwrap_or("").to_string(),
            })
            .collect(),
        _ => String::new(),
    }
}

/// Tokens of a text with the byte ranges in it that are targets: the tokens that start in one.
fn encode_targets(
    tok: &Tok,
    text: &str,
    special: bool,
    targets: &[(usize, usize)],
) -> Result<(Vec<i32>, Vec<f32>), DataError> {
    let (ids, offsets) = tok.encode_offsets(text, special)?;
    let mask = offsets
        .iter()
        .map(|&(a, b)| {
            let hit = b > a && targets.iter().any(|&(s, e)| a >= s && a < e);
            if hit {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Ok((ids, mask))
}

/// A `messages` row rendered with the chat template: its tokens and target mask. The targets
/// are the last message (`prompt`), every assistant turn (`assistant`) or everything (`none`);
/// a turn's text is what rendering the chat up to it adds to rendering the chat before it with
/// the generation prompt, as TRL's assistant masks.
fn chat_row(
    tok: &Tok,
    template: &str,
    cfg: &crate::chat::TokenizerConfig,
    msgs: &[serde_json::Value],
    mask: LossMask,
) -> Result<(Vec<i32>, Vec<f32>), String> {
    let list = |n: usize| serde_json::Value::Array(msgs[..n].to_vec());
    let full = crate::chat::render(template, &list(msgs.len()), false, cfg)?;
    let turn = |i: usize| -> Result<(usize, usize), String> {
        let before = crate::chat::render(template, &list(i), true, cfg)?;
        let upto = crate::chat::render(template, &list(i + 1), false, cfg)?;
        if !full.starts_with(&before) || !upto.starts_with(&before) {
            return Err(format!(
                "the chat template does not render message {i} after the earlier ones (its text \
                 before it is not a prefix of the whole chat): cannot tell which tokens are its"
            ));
        }
        Ok((before.len(), upto.len()))
    };
    let spans = match mask {
        LossMask::None => vec![(0, full.len())],
        LossMask::Prompt => vec![turn(msgs.len() - 1)?],
        LossMask::Assistant => {
            let mut v = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                if str_field(m, "role") == Some("assistant") {
                    v.push(turn(i)?);
                }
            }
            if v.is_empty() {
                return Err("`sft(mask: assistant)`: the row has no assistant message".into());
            }
            v
        }
    };
    encode_targets(tok, &full, false, &spans).map_err(|e| e.message)
}

/// Parses JSONL rows (relative image paths resolve beside `path`).
pub fn parse_rows(
    path: &Path,
    text: &str,
    tok: &Tok,
    format: &RowFormat,
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
        out.push(parse_row(&row, &at, n + 1, base, tok, format)?);
    }
    if out.is_empty() {
        return derr(format!("{} has no rows", path.display()));
    }
    Ok(out)
}

/// One JSONL row (at `at`, line `line`; relative image paths resolve in `base`) as an
/// example.
pub fn parse_row(
    row: &serde_json::Value,
    at: &str,
    line: usize,
    base: &Path,
    tok: &Tok,
    format: &RowFormat,
) -> Result<Example, DataError> {
    let placeholder = format
        .images
        .as_ref()
        .map_or("<image>", |i| i.placeholder.as_str());
    let mut images: Vec<PathBuf> = Vec::new();
    if let Some(p) = str_field(row, "image") {
        images.push(base.join(p));
    }
    if let Some(list) = row.get("images").and_then(|v| v.as_array()) {
        for (i, v) in list.iter().enumerate() {
            let Some(p) = v.as_str() else {
                return derr(format!("{at}: `images[{i}]` is not a path"));
            };
            images.push(base.join(p));
        }
    }
    let prompt_mask = if format.mask == LossMask::None {
        1.0
    } else {
        0.0
    };
    let mut instruction: String;
    let (mut ids, mut mask) =
        if let (Some(p), Some(c)) = (str_field(row, "prompt"), str_field(row, "completion")) {
            instruction = p.to_string();
            let (p, mut c) = (tok.encode(p, true)?, tok.encode(c, false)?);
            if let Some(eos) = tok.eos_id {
                if c.last() != Some(&eos) {
                    c.push(eos);
                }
            }
            let mut mask = vec![prompt_mask; p.len()];
            mask.extend(vec![1.0; c.len()]);
            let mut ids = p;
            ids.extend(c);
            (ids, mask)
        } else if let Some(msgs) = row.get("messages").and_then(|v| v.as_array()) {
            let Some((last, rest)) = msgs.split_last() else {
                return derr(format!("{at}: `messages` is empty"));
            };
            instruction = rest
                .iter()
                .filter(|m| str_field(m, "role") == Some("user"))
                .map(|m| message_text(m, ""))
                .collect::<Vec<_>>()
                .join("\n");
            if let Some((template, cfg)) = &format.chat {
                chat_row(tok, template, cfg, msgs, format.mask).map_err(|e| DataError {
                    message: format!("{at}: {e}"),
                })?
            } else {
                if format.mask == LossMask::Assistant {
                    return derr(format!(
                        "{at}: `sft(mask: assistant)` needs the tokenizer's chat template \
                     (tokenizer_config.json's \"chat_template\" beside tokenizer.json)"
                    ));
                }
                let render = |m: &serde_json::Value| {
                    format!(
                        "{}: {}\n",
                        str_field(m, "role").unwrap_or("user"),
                        message_text(m, placeholder)
                    )
                };
                let prompt: String = rest.iter().map(render).collect();
                let p = tok.encode(&prompt, true)?;
                let mut c = tok.encode(&message_text(last, placeholder), false)?;
                if let Some(eos) = tok.eos_id {
                    c.push(eos);
                }
                let mut mask = vec![prompt_mask; p.len()];
                mask.extend(vec![1.0; c.len()]);
                let mut ids = p;
                ids.extend(c);
                (ids, mask)
            }
        } else if let Some(t) = str_field(row, "text").or_else(|| str_field(row, "caption")) {
            instruction = t.to_string();
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
    if let Some(it) = &format.images {
        (ids, mask) = place_images(it, ids, mask, images.len()).map_err(|e| DataError {
            message: format!("{at}: {e}"),
        })?;
    }
    if let Some(m) = max_len_of(format) {
        if ids.len() > m {
            if let Some(it) = &format.images {
                let kept = ids[..m].iter().filter(|&&i| i == it.id).count();
                let all = ids.iter().filter(|&&i| i == it.id).count();
                if kept != all {
                    return derr(format!(
                        "{at}: the row is {} tokens with its images; truncated to `max_len` \
                         {m} it would lose image tokens: shorten the text or raise `max_len`",
                        ids.len()
                    ));
                }
            }
        }
        ids.truncate(m);
        mask.truncate(m);
    }
    instruction = instruction.replace(placeholder, "").trim().to_string();
    let mut fields = BTreeMap::new();
    for (k, v) in row.as_object().into_iter().flatten() {
        if ROW_KEYS.contains(&k.as_str()) {
            continue;
        }
        let v = match v.as_str() {
            // a file: relative to the data file (`FILE.safetensors:TENSOR` kept whole)
            Some(s) => serde_json::Value::String(base.join(s).display().to_string()),
            None => v.clone(),
        };
        fields.insert(k.clone(), v);
    }
    Ok(Example {
        ids,
        mask,
        images,
        instruction,
        fields,
        line,
    })
}

/// The row fields the text and images are read from.
const ROW_KEYS: &[&str] = &[
    "text",
    "caption",
    "prompt",
    "completion",
    "messages",
    "image",
    "images",
];

fn max_len_of(format: &RowFormat) -> Option<usize> {
    format.max_len.map(|m| m.max(1))
}

/// Each image placeholder of `ids` becomes the image's tokens (never targets); a row with
/// images and no placeholder gets them at its start (as BLIP-2's and Fuyu's processors put
/// them). The placeholders must be as many as the images.
fn place_images(
    it: &ImageTokens,
    ids: Vec<i32>,
    mask: Vec<f32>,
    images: usize,
) -> Result<(Vec<i32>, Vec<f32>), String> {
    let found = ids.iter().filter(|&&i| i == it.id).count();
    if found == 0 && images > 0 {
        let mut out: Vec<i32> = Vec::new();
        for _ in 0..images {
            out.extend(&it.expand);
        }
        let mut m = vec![0.0; out.len()];
        out.extend(ids);
        m.extend(mask);
        return Ok((out, m));
    }
    if found != images {
        return Err(format!(
            "the text has {found} image placeholder(s) `{}` but the row gives {images} image(s): \
             put one `{}` where each image goes",
            it.placeholder, it.placeholder
        ));
    }
    let mut out = Vec::with_capacity(ids.len() + found * it.expand.len());
    let mut m = Vec::with_capacity(out.capacity());
    for (i, w) in ids.into_iter().zip(mask) {
        if i == it.id {
            out.extend(&it.expand);
            m.extend(std::iter::repeat_n(0.0, it.expand.len()));
        } else {
            out.push(i);
            m.push(w);
        }
    }
    Ok((out, m))
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

/// A batch as step-graph inputs for a model that reads `ids`, the attention `mask` and, when
/// `images` gives the preprocessing, one image per row ([`crate::train_inputs::BatchPlan`]'s
/// collation): `ids`, `mask` and `loss_mask` [B, T] right-padded to the longest example.
pub fn collate(
    examples: &[&Example],
    pad_id: i32,
    images: Option<&Preprocess>,
) -> Result<BTreeMap<String, Tensor>, DataError> {
    crate::train_inputs::BatchPlan::simple(pad_id, images).collate(examples)
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
        // pair objectives read each side as `chosen.<input>` and `rejected.<input>`
        for prefix in ["", "chosen.", "rejected."] {
            shapes.insert(format!("{prefix}{name}"), vec![batch, len]);
        }
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
            line: 1,
            ..Example::default()
        };
        let e2 = Example {
            ids: vec![8],
            mask: vec![1.0],
            line: 2,
            ..Example::default()
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
}
