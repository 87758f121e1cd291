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

/// Reads a `.npy` array (f4, f8, f2, i4, i8, b1 in either byte order; C order). Only a
/// regular file is read; every problem (not a .npy file, a malformed header, an unsupported
/// dtype, missing or extra data) is an error saying what is wrong.
pub fn read_npy(path: &Path) -> Result<Tensor, InputError> {
    let bytes = crate::files::read(path).map_err(|e| InputError {
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    parse_npy(&bytes).map_err(|why| InputError {
        message: format!("{}: {why}", path.display()),
    })
}

/// A `.npy` array from its bytes (see [`read_npy`]); the error says what is wrong.
pub fn parse_npy(bytes: &[u8]) -> Result<Tensor, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a .npy file (it does not start with the \\x93NUMPY magic)".into());
    }
    let (major, minor) = match (bytes.get(6), bytes.get(7)) {
        (Some(&a), Some(&b)) => (a, b),
        _ => return Err("the .npy header is truncated (no version)".into()),
    };
    let (len_bytes, at) = match major {
        1 => (2usize, 8usize),
        2 | 3 => (4, 8),
        _ => {
            return Err(format!(
                ".npy format version {major}.{minor} is not supported (1.0, 2.0 and 3.0 are)"
            ))
        }
    };
    let Some(raw_len) = bytes.get(at..at + len_bytes) else {
        return Err("the .npy header is truncated (no header length)".into());
    };
    let header_len = raw_len
        .iter()
        .rev()
        .fold(0usize, |a, &b| (a << 8) | usize::from(b));
    let start = at + len_bytes;
    let Some(header) = bytes.get(start..start.saturating_add(header_len)) else {
        return Err(format!(
            "the .npy header is truncated: it should be {header_len} bytes, {} follow",
            bytes.len() - start
        ));
    };
    let header =
        std::str::from_utf8(header).map_err(|_| "the .npy header is not text".to_string())?;
    let dict = npy_header::parse(header)?;
    let descr = dict.descr;
    if dict.fortran_order {
        return Err("Fortran-order arrays are not supported (save it in C order)".into());
    }
    let shape = dict.shape;
    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'|' | b'=') => (Endian::Little, &descr[1..]),
        Some(b'>') => (Endian::Big, &descr[1..]),
        _ => (Endian::Little, descr.as_str()),
    };
    if cfg!(target_endian = "big") && descr.starts_with('=') {
        return Err("native-order data from a big-endian machine is not supported".into());
    }
    let size = match code {
        "f4" | "i4" => 4,
        "f8" | "i8" => 8,
        "f2" => 2,
        "b1" | "?" => 1,
        other => {
            return Err(format!(
                "dtype `{other}` is not supported (f4, f8, f2, i4, i8, b1)"
            ))
        }
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("the shape {shape:?} is too large"))?;
    let want = numel
        .checked_mul(size)
        .ok_or_else(|| format!("the shape {shape:?} is too large"))?;
    let data = &bytes[start + header_len..];
    if data.len() < want {
        return Err(format!(
            "the header says shape {shape:?} of {code}: {want} bytes of data, but only {} \
             follow the header ({} missing: truncated)",
            data.len(),
            want - data.len()
        ));
    }
    if data.len() > want {
        return Err(format!(
            "{} bytes of trailing data after the array (the header says shape {shape:?} of \
             {code}: {want} bytes)",
            data.len() - want
        ));
    }
    let word = |c: &[u8]| -> u64 {
        let it = c.iter().map(|&b| u64::from(b));
        match order {
            Endian::Little => it.rev().fold(0, |a, b| (a << 8) | b),
            Endian::Big => it.fold(0, |a, b| (a << 8) | b),
        }
    };
    let chunks = data.chunks_exact(size.max(1));
    let data = match code {
        "f4" => Data::F32(chunks.map(|c| f32::from_bits(word(c) as u32)).collect()),
        "f8" => Data::F32(chunks.map(|c| f64::from_bits(word(c)) as f32).collect()),
        "f2" => Data::F32(
            chunks
                .map(|c| half::f16::from_bits(word(c) as u16).to_f32())
                .collect(),
        ),
        "i4" => Data::I32(chunks.map(|c| word(c) as u32 as i32).collect()),
        "i8" => {
            let mut out = Vec::with_capacity(numel);
            for c in chunks {
                let x = word(c) as i64;
                out.push(i32::try_from(x).map_err(|_| format!("value {x} does not fit in i32"))?);
            }
            Data::I32(out)
        }
        _ => Data::Bool(data.iter().map(|&b| b != 0).collect()),
    };
    Ok(Tensor { shape, data })
}

#[derive(Clone, Copy)]
enum Endian {
    Little,
    Big,
}

/// The header of a `.npy` file: a Python dict literal with `descr`, `fortran_order` and
/// `shape`, read by a small bounded parser (no recursion; any input gives a value or an error).
mod npy_header {
    pub struct Header {
        pub descr: String,
        pub fortran_order: bool,
        pub shape: Vec<usize>,
    }

    struct Lexer<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Lexer<'_> {
        fn skip_ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn peek(&mut self) -> Option<u8> {
            self.skip_ws();
            self.s.get(self.i).copied()
        }
        fn eat(&mut self, c: u8) -> bool {
            if self.peek() == Some(c) {
                self.i += 1;
                true
            } else {
                false
            }
        }
        fn expect(&mut self, c: u8, what: &str) -> Result<(), String> {
            if self.eat(c) {
                Ok(())
            } else {
                Err(self.error(&format!("expected `{}` {what}", c as char)))
            }
        }
        fn error(&self, what: &str) -> String {
            format!(
                "the .npy header is malformed: {what} at character {}",
                self.i
            )
        }
        fn string(&mut self) -> Result<String, String> {
            let Some(q @ (b'\'' | b'"')) = self.peek() else {
                return Err(self.error("expected a quoted string"));
            };
            self.i += 1;
            let begin = self.i;
            while self.i < self.s.len() && self.s[self.i] != q {
                if self.s[self.i] == b'\\' {
                    return Err(self.error("escapes in strings are not supported"));
                }
                self.i += 1;
            }
            if self.i >= self.s.len() {
                return Err(self.error("unterminated string"));
            }
            let text = String::from_utf8_lossy(&self.s[begin..self.i]).into_owned();
            self.i += 1;
            Ok(text)
        }
        fn word(&mut self) -> &str {
            self.skip_ws();
            let begin = self.i;
            while self.i < self.s.len()
                && (self.s[self.i].is_ascii_alphanumeric() || b"_-+".contains(&self.s[self.i]))
            {
                self.i += 1;
            }
            std::str::from_utf8(&self.s[begin..self.i]).unwrap_or("")
        }
        fn shape(&mut self) -> Result<Vec<usize>, String> {
            let close = match self.peek() {
                Some(b'(') => b')',
                Some(b'[') => b']',
                _ => return Err(self.error("`shape` must be a tuple of integers")),
            };
            self.i += 1;
            let mut dims = Vec::new();
            loop {
                if self.eat(close) {
                    return Ok(dims);
                }
                let w = self.word().to_string();
                let digits = w.strip_suffix('L').unwrap_or(&w);
                let d: usize = digits.parse().map_err(|_| {
                    self.error(&format!("`shape` holds `{w}`, not a non-negative integer"))
                })?;
                dims.push(d);
                if !self.eat(b',') {
                    self.expect(close, "to close `shape`")?;
                    return Ok(dims);
                }
            }
        }
    }

    pub fn parse(text: &str) -> Result<Header, String> {
        let mut lx = Lexer {
            s: text.as_bytes(),
            i: 0,
        };
        lx.expect(b'{', "at the start of the header dict")?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        loop {
            if lx.eat(b'}') {
                break;
            }
            let key = lx.string()?;
            lx.expect(b':', "after a key")?;
            match key.as_str() {
                "descr" => {
                    if lx.peek() == Some(b'[') {
                        return Err("structured (record) dtypes are not supported".into());
                    }
                    descr = Some(lx.string()?);
                }
                "fortran_order" => {
                    fortran = Some(match lx.word() {
                        "True" => true,
                        "False" => false,
                        other => {
                            let other = other.to_string();
                            return Err(lx.error(&format!(
                                "`fortran_order` is `{other}`, not True or False"
                            )));
                        }
                    })
                }
                "shape" => shape = Some(lx.shape()?),
                other => {
                    return Err(lx.error(&format!(
                        "unknown key `{other}` (expected descr, fortran_order, shape)"
                    )))
                }
            }
            if !lx.eat(b',') {
                lx.expect(b'}', "to close the header dict")?;
                break;
            }
        }
        let missing = |k: &str| format!("the .npy header has no `{k}`");
        Ok(Header {
            descr: descr.ok_or_else(|| missing("descr"))?,
            fortran_order: fortran.unwrap_or(false),
            shape: shape.ok_or_else(|| missing("shape"))?,
        })
    }
}

/// Transformers' input names and the zoo's: `--input input_ids=...` fills `ids` for a model
/// whose forward takes `ids` and no `input_ids` (the one table of these aliases; docs/running.md
/// lists it).
pub const HF_INPUT_NAMES: &[(&str, &str)] = &[
    ("input_ids", "ids"),
    ("attention_mask", "mask"),
    ("pixel_values", "pixels"),
    ("token_type_ids", "types"),
];

/// The model input `name` stands for: itself when the model has it, else the zoo name of a
/// transformers name ([`HF_INPUT_NAMES`]) when the model has that; `None` when neither.
pub fn resolve_input_name<'a>(name: &'a str, model_inputs: &[&'a str]) -> Option<&'a str> {
    if model_inputs.contains(&name) {
        return Some(name);
    }
    HF_INPUT_NAMES
        .iter()
        .find(|(hf, _)| *hf == name)
        .map(|(_, ours)| *ours)
        .filter(|ours| model_inputs.contains(ours))
}

/// A file input's value: the file and, for `FILE.safetensors:TENSOR`, the tensor it names. A
/// file whose own name holds `.safetensors:` is read whole when it exists.
pub fn split_input_value(value: &str) -> (&Path, Option<&str>) {
    const EXT: &str = ".safetensors:";
    match value.rfind(EXT) {
        Some(at) if !Path::new(value).exists() => {
            let (file, tensor) = value.split_at(at + EXT.len());
            (Path::new(&file[..file.len() - 1]), Some(tensor))
        }
        _ => (Path::new(value), None),
    }
}

/// Reads an input from `--input NAME=VALUE`'s value: a `.npy` file, a `.safetensors` file (the
/// tensor named `name`, or its only tensor), or `FILE.safetensors:TENSOR` (that tensor).
pub fn read_input(name: &str, value: &str) -> Result<Tensor, InputError> {
    match split_input_value(value) {
        (path, Some(tensor)) => {
            let f = WeightFile::open(path).map_err(|e| InputError { message: e.message })?;
            if f.info(tensor).is_none() {
                return ierr(format!(
                    "{} has no tensor `{tensor}` (it has: {})",
                    path.display(),
                    f.names().join(", ")
                ));
            }
            f.get(tensor).map_err(|e| InputError { message: e.message })
        }
        (path, None) => read_input_file(name, path),
    }
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
                    "{} has no tensor `{name}` (it has: {}; name one with `{}:TENSOR`)",
                    path.display(),
                    names.join(", "),
                    path.display()
                ));
            };
            f.get(&pick).map_err(|e| InputError { message: e.message })
        }
        _ => ierr(format!(
            "{}: inputs are read from .npy or .safetensors files (or FILE.safetensors:TENSOR)",
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

/// Loads a Hugging Face `tokenizer.json` (only a regular file is read).
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, InputError> {
    let fail = |e: &dyn std::fmt::Display| InputError {
        message: format!("cannot load the tokenizer {}: {e}", path.display()),
    };
    let bytes = crate::files::read(path).map_err(|e| fail(&e))?;
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| fail(&e))
}

/// Tokenizes a batch of texts with a `tokenizer.json` (special tokens added, truncated to the
/// declared `max_len`, right-padded with the tokenizer's pad id to the longest text). Returns
/// the tensors for the preprocess's inputs in order: ids, attention mask, token types.
pub fn tokenize(
    p: &Preprocess,
    tokenizer: &Path,
    texts: &[String],
) -> Result<Vec<Tensor>, InputError> {
    let mut tok = load_tokenizer(tokenizer)?;
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
    // An element count past `usize` asks for more than any machine has: an error below.
    let n = crate::alloc::numel(&[b, t]).unwrap_or(usize::MAX);
    let what = || format!("the token ids [{b}, {t}] i32 of {b} texts");
    let mut ids = crate::alloc::checked_vec(n, pad_id, what)?;
    let mut mask = crate::alloc::checked_vec(n, 0i32, what)?;
    let mut types = crate::alloc::checked_vec(n, 0i32, what)?;
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

/// The most pixels an image may have once resized by its preprocessing.
const MAX_RESIZED_PIXELS: u64 = 1 << 28;

/// Decodes an image file (PNG or JPEG, recognised by its content); only a regular file is read.
/// The decoder's default limits apply (an image needing more than 512 MiB is an error).
pub fn read_image(path: &Path) -> Result<image::DynamicImage, InputError> {
    let fail = |e: &dyn std::fmt::Display| InputError {
        message: format!("cannot read the image {}: {e}", path.display()),
    };
    let f = crate::files::open_regular(path).map_err(|e| fail(&e))?;
    image::ImageReader::new(std::io::BufReader::new(f))
        .with_guessed_format()
        .map_err(|e| fail(&e))?
        .decode()
        .map_err(|e| fail(&e))
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
    let shape = [paths.len(), 3, c, c];
    let n = crate::alloc::numel(&shape).unwrap_or(usize::MAX);
    let mut out = crate::alloc::with_capacity(n, || format!("the images {shape:?} f32"))?;
    for path in paths {
        let img = read_image(Path::new(path))?.to_rgb8();
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return ierr(format!("the image {path} is empty ({w}x{h} pixels)"));
        }
        let scale = size as f64 / w.min(h) as f64;
        let (fw, fh) = (
            (w as f64 * scale).round().max(crop as f64),
            (h as f64 * scale).round().max(crop as f64),
        );
        // An extreme aspect ratio would make the resized image enormous.
        if fw * fh > MAX_RESIZED_PIXELS as f64 {
            return ierr(format!(
                "the image {path} is {w}x{h} pixels: with its shorter side resized to {size} it \
                 would be {fw}x{fh}, more than {MAX_RESIZED_PIXELS} pixels (aspect ratio too extreme)"
            ));
        }
        let (nw, nh) = (fw as u32, fh as u32);
        // Resizing holds the picture in f32 on the way (16 bytes a pixel is an upper bound).
        crate::alloc::ensure(Some(u128::from(nw) * u128::from(nh) * 16), || {
            format!("resizing the image {path} to {nw}x{nh}")
        })?;
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
/// go through the model's preprocessing (several make a batch); other names are files (see
/// [`read_input`]), and must be inputs of the model (`model_inputs`) or transformers' names of
/// them ([`HF_INPUT_NAMES`]; `pixel_values=FILE.safetensors` then also reads a tensor named
/// `pixel_values`). An unknown name, or a file input given twice, is an error listing
/// the model's inputs.
pub fn gather_inputs(
    pairs: &[(String, String)],
    model_inputs: &[&str],
    preprocess: &[Preprocess],
    tokenizer_dir: &Path,
    tokenizer_override: Option<&Path>,
) -> Result<BTreeMap<String, Tensor>, InputError> {
    let mut out = BTreeMap::new();
    let mut texts = Vec::new();
    let mut images = Vec::new();
    let has = |kind: &str| preprocess.iter().any(|p| p.kind == kind);
    let known = || {
        let mut known: Vec<String> = model_inputs.iter().map(|n| format!("`{n}`")).collect();
        for kind in ["text", "image"] {
            if has(kind) {
                known.push(format!("`{kind}` (through the model's preprocessing)"));
            }
        }
        match known.is_empty() {
            true => "none".to_string(),
            false => known.join(", "),
        }
    };
    for (given, value) in pairs {
        let resolved = resolve_input_name(given, model_inputs);
        let is_input = resolved.is_some();
        let name = resolved.unwrap_or(given);
        match name {
            "text" if has("text") => texts.push(value.clone()),
            "image" if has("image") => images.push(value.clone()),
            "text" | "image" if !is_input => {
                return ierr(format!(
                    "`--input {given}=...` needs a `preprocess ... = {name}(...)` in the model, \
                     and this model has none; it has no input `{name}` either; its inputs are: {}",
                    known()
                ));
            }
            _ if !is_input => {
                return ierr(format!(
                    "`--input {given}=...`: the model has no input `{given}`; its inputs are: {}",
                    known()
                ));
            }
            _ => {
                if out.contains_key(name) {
                    let also = match name == given.as_str() {
                        true => String::new(),
                        false => format!(" (`{given}` is transformers' name for it)"),
                    };
                    return ierr(format!("input `{name}` is given twice{also}"));
                }
                // under transformers' name, a file's tensor of that name is the input too
                let (path, tensor) = split_input_value(value);
                let hf_tensor = name != given.as_str()
                    && tensor.is_none()
                    && path.extension().is_some_and(|e| e == "safetensors")
                    && WeightFile::open(path).is_ok_and(|f| f.info(given).is_some());
                let key = if hf_tensor { given.as_str() } else { name };
                out.insert(name.to_string(), read_input(key, value)?);
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
