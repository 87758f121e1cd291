//! Training checkpoints and adapters on disk.
//!
//! A checkpoint is a folder `checkpoint-<step>/` holding `model.safetensors` (every parameter;
//! for an adapter trainer, the adapter in the PEFT layout instead: only what trains),
//! `optimizer.safetensors` (the state `optim.<slot>.<path>`) and `trainer_state.json` (step,
//! data position, seed, trainer). It is written under a temporary
//! name and renamed into place, so a crash leaves either the old or the new one, never half.
//!
//! LoRA adapters are also saved alone in the Hugging Face PEFT layout:
//! `adapter_model.safetensors` with tensors `base_model.model.<module>.lora_A.weight` /
//! `lora_B.weight` and `adapter_config.json`.

use crate::tensor::Tensor;
use crate::train_data::Position;
use crate::weights::{save, WeightFile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A failure reading or writing a checkpoint.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct CkptError {
    pub message: String,
}

fn cerr<T>(message: impl Into<String>) -> Result<T, CkptError> {
    Err(CkptError {
        message: message.into(),
    })
}

/// A 64-bit identity of some bytes (a file, a parameter list, the settings) in a
/// [`Fingerprint`]: the low half of their FNV-1a hash ([`vlmc::hash`]).
pub fn fnv64(bytes: &[u8]) -> u64 {
    vlmc::hash::fnv128(bytes) as u64
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// A 64-bit hash of named tensors (names, shapes, values), a word at a time.
pub fn hash_tensors(tensors: &BTreeMap<String, Tensor>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, t) in tensors {
        h = mix_tensor(mix(h, fnv64(name.as_bytes())), t);
    }
    h
}

/// A 64-bit hash of one tensor (shape and values), as [`hash_tensors`] mixes it.
pub fn hash_tensor(t: &Tensor) -> u64 {
    mix_tensor(0xcbf2_9ce4_8422_2325, t)
}

fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29)
}

fn mix_tensor(mut h: u64, t: &Tensor) -> u64 {
    for &d in &t.shape {
        h = mix(h, d as u64);
    }
    match &t.data {
        crate::tensor::Data::F32(v) => v.iter().fold(h, |h, x| mix(h, u64::from(x.to_bits()))),
        crate::tensor::Data::F64(v) => v.iter().fold(h, |h, x| mix(h, x.to_bits())),
        crate::tensor::Data::I32(v) => v.iter().fold(h, |h, &x| mix(h, x as u32 as u64)),
        crate::tensor::Data::Bool(v) => v.iter().fold(h, |h, &x| mix(h, u64::from(x))),
    }
}

/// A file as a fingerprint records it: where it was, its size and the hash of its bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct FileId {
    pub path: String,
    pub bytes: u64,
    pub hash: String,
}

impl FileId {
    /// The identity of `bytes`, read from `path`.
    pub fn of_bytes(path: &Path, bytes: &[u8]) -> FileId {
        FileId {
            path: path.display().to_string(),
            bytes: bytes.len() as u64,
            hash: hex(fnv64(bytes)),
        }
    }

    /// Reads `path` and returns its identity.
    pub fn read(path: &Path) -> Result<FileId, CkptError> {
        let b = crate::files::read(path).map_err(|e| io(path, e))?;
        Ok(FileId::of_bytes(path, &b))
    }

    /// The same bytes (wherever the file is now).
    pub fn same(&self, other: &FileId) -> bool {
        self.bytes == other.bytes && self.hash == other.hash
    }

    fn describe(&self) -> String {
        format!("{} ({} bytes, hash {})", self.path, self.bytes, self.hash)
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"path": self.path, "bytes": self.bytes, "hash": self.hash})
    }
}

/// What makes a run this run: a checkpoint records it, and resuming checks it. The model
/// (name, and its parameters' paths and types), the data and tokenizer files (by content), and
/// the trainer's settings that shape the run (objective, optimiser, schedule, batch,
/// accumulation, seed, clipping, `max_len`, adapter, `from`, what trains), and the starting
/// weights. `save_every` and `eval_every` are not in it; the step count is checked apart
/// (`total_steps`).
#[derive(Clone, Debug, PartialEq)]
pub struct Fingerprint {
    pub model: String,
    /// The hash of the model's parameter list (paths and types).
    pub params: String,
    /// The starting weights: `init rules` (with the seed of the settings) or the hash of the
    /// weights given.
    pub weights: String,
    pub data: FileId,
    /// Rows of the data.
    pub rows: u64,
    pub tokenizer: FileId,
    pub settings: BTreeMap<String, String>,
}

/// A setting's text: its debug form, or a hash of it when that is long.
fn setting_text(debug: String) -> String {
    if debug.len() <= 160 {
        debug
    } else {
        format!(
            "{} chars, hash {}",
            debug.len(),
            hex(fnv64(debug.as_bytes()))
        )
    }
}

impl Fingerprint {
    /// The fingerprint of a run of trainer `cfg` of `model` on the given data and tokenizer.
    pub fn of(
        model: &vlmc::elab::Elaborated,
        cfg: &vlmc::train::TrainConfig,
        weights: Option<&BTreeMap<String, Tensor>>,
        data: FileId,
        rows: u64,
        tokenizer: FileId,
    ) -> Fingerprint {
        let mut list = String::new();
        for (_, path, ty, _) in model.graph.params() {
            list.push_str(&format!("{path}: {ty}\n"));
        }
        let mut settings = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            settings.insert(k.to_string(), setting_text(v));
        };
        set("objective", format!("{:?}", cfg.objective));
        set("optimizer", format!("{:?}", cfg.optimizer));
        set("schedule", format!("{:?}", cfg.schedule));
        set("batch", cfg.batch.to_string());
        set("grad_accum", cfg.grad_accum.to_string());
        set("seed", cfg.seed.to_string());
        set("clip_grad", format!("{:?}", cfg.clip_grad));
        set("max_len", format!("{:?}", cfg.max_len));
        set("adapter", format!("{:?}", cfg.adapter));
        set("from", format!("{:?}", cfg.from));
        set("trainable", format!("{:?}", cfg.trainable));
        Fingerprint {
            model: model.model.clone(),
            params: hex(fnv64(list.as_bytes())),
            weights: weights.map_or("init rules".to_string(), |w| {
                format!("{} tensors, hash {}", w.len(), hex(hash_tensors(w)))
            }),
            data,
            rows,
            tokenizer,
            settings,
        }
    }

    /// What differs between the run that wrote `self` (a checkpoint's) and `now`, one
    /// sentence each; empty when the two are the same run.
    pub fn differences(&self, now: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        if self.model != now.model {
            out.push(format!(
                "the model: `{}` in the checkpoint, `{}` now",
                self.model, now.model
            ));
        } else if self.params != now.params {
            out.push(format!(
                "the parameters of model `{}` (their paths or types) changed",
                now.model
            ));
        }
        if self.weights != now.weights {
            out.push(format!(
                "the starting weights: {} in the checkpoint, {} now",
                self.weights, now.weights
            ));
        }
        if !self.data.same(&now.data) || self.rows != now.rows {
            out.push(format!(
                "the data: {}, {} rows, in the checkpoint; {}, {} rows, now",
                self.data.describe(),
                self.rows,
                now.data.describe(),
                now.rows
            ));
        }
        if !self.tokenizer.same(&now.tokenizer) {
            out.push(format!(
                "the tokenizer: {} in the checkpoint; {} now",
                self.tokenizer.describe(),
                now.tokenizer.describe()
            ));
        }
        let keys: std::collections::BTreeSet<&String> =
            self.settings.keys().chain(now.settings.keys()).collect();
        for k in keys {
            let (a, b) = (self.settings.get(k), now.settings.get(k));
            if a != b {
                let show = |v: Option<&String>| v.map_or("(none)".to_string(), |s| s.clone());
                out.push(format!(
                    "the trainer's `{k}`: {} in the checkpoint, {} now",
                    show(a),
                    show(b)
                ));
            }
        }
        out
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "params": self.params,
            "weights": self.weights,
            "data": self.data.to_json(),
            "rows": self.rows,
            "tokenizer": self.tokenizer.to_json(),
            "settings": self.settings,
        })
    }
}

/// Where training stands, beside the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    pub trainer: String,
    pub step: u64,
    pub total_steps: u64,
    pub seed: u64,
    pub position: Position,
    /// What run this is (checked on resume).
    pub fingerprint: Fingerprint,
}

/// Reads a `trainer_state.json` field by field: each must be there with its type.
struct Fields<'a> {
    v: &'a serde_json::Value,
    at: &'a str,
}

impl Fields<'_> {
    fn bad<T>(&self, k: &str, what: &str) -> Result<T, CkptError> {
        match self.v.get(k) {
            None | Some(serde_json::Value::Null) => cerr(format!("{}: no `{k}`", self.at)),
            Some(x) => cerr(format!("{}: `{k}` must be {what}, not {x}", self.at)),
        }
    }

    fn u64(&self, k: &str) -> Result<u64, CkptError> {
        match self.v.get(k).and_then(|x| x.as_u64()) {
            Some(n) => Ok(n),
            None => self.bad(k, "a non-negative integer"),
        }
    }

    fn str(&self, k: &str) -> Result<String, CkptError> {
        match self.v.get(k).and_then(|x| x.as_str()) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => self.bad(k, "a non-empty string"),
        }
    }

    fn object(&self, k: &str) -> Result<Fields<'_>, CkptError> {
        match self.v.get(k) {
            Some(x) if x.is_object() => Ok(Fields { v: x, at: self.at }),
            _ => self.bad(k, "an object"),
        }
    }

    fn file(&self, k: &str) -> Result<FileId, CkptError> {
        let f = self.object(k)?;
        let id = FileId {
            path: f
                .v
                .get("path")
                .and_then(|p| p.as_str())
                .unwrap_or("")
                .to_string(),
            bytes: f.u64("bytes")?,
            hash: f.str("hash")?,
        };
        Ok(id)
    }
}

impl TrainerState {
    fn to_json(&self) -> String {
        serde_json::json!({
            "trainer": self.trainer,
            "step": self.step,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "epoch": self.position.epoch,
            "index": self.position.index,
            "fingerprint": self.fingerprint.to_json(),
        })
        .to_string()
    }

    /// Parses and checks a `trainer_state.json` (`at` names it in errors): every field there
    /// with its type, the step within the run.
    fn from_json(text: &str, at: &str) -> Result<TrainerState, CkptError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| CkptError {
            message: format!("{at}: not valid JSON: {e}"),
        })?;
        if !v.is_object() {
            return cerr(format!("{at}: not a JSON object"));
        }
        let f = Fields { v: &v, at };
        let step = f.u64("step")?;
        let total_steps = f.u64("total_steps")?;
        if total_steps == 0 {
            return cerr(format!("{at}: `total_steps` is 0"));
        }
        if step > total_steps {
            return cerr(format!(
                "{at}: `step` {step} is beyond `total_steps` {total_steps}"
            ));
        }
        let index = f.u64("index")?;
        let fp = f.object("fingerprint")?;
        let mut settings = BTreeMap::new();
        for (k, x) in fp.object("settings")?.v.as_object().into_iter().flatten() {
            let Some(s) = x.as_str() else {
                return cerr(format!(
                    "{at}: the fingerprint's setting `{k}` must be a string, not {x}"
                ));
            };
            settings.insert(k.clone(), s.to_string());
        }
        Ok(TrainerState {
            trainer: f.str("trainer")?,
            step,
            total_steps,
            seed: f.u64("seed")?,
            position: Position {
                epoch: f.u64("epoch")?,
                index: usize::try_from(index).map_err(|_| CkptError {
                    message: format!("{at}: `index` {index} is out of range"),
                })?,
            },
            fingerprint: Fingerprint {
                model: fp.str("model")?,
                params: fp.str("params")?,
                weights: fp.str("weights")?,
                data: fp.file("data")?,
                rows: fp.u64("rows")?,
                tokenizer: fp.file("tokenizer")?,
                settings,
            },
        })
    }
}

fn io(what: &Path, e: std::io::Error) -> CkptError {
    CkptError {
        message: format!("{}: {e}", what.display()),
    }
}

/// Writes `dir/checkpoint-<step>/` atomically; returns its path. With `adapter` (an adapter
/// trainer) it holds the adapter in the PEFT layout instead of `model.safetensors`: only the
/// tensors that train (the base is the run's starting weights, which its fingerprint records).
pub fn save_checkpoint(
    dir: &Path,
    params: &BTreeMap<String, Tensor>,
    optim: &BTreeMap<String, Tensor>,
    state: &TrainerState,
    adapter: Option<&AdapterSave<'_>>,
) -> Result<PathBuf, CkptError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = format!("checkpoint-{}", state.step);
    let fin = dir.join(&name);
    // Unique per process: a writer that died leaves its own temporary folder, which the next
    // run into the folder removes (`train_folder::clear_temporary`).
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let werr = |e: crate::weights::WeightError| CkptError { message: e.message };
    match adapter {
        Some(a) => save_peft(&tmp, params, a)?,
        None => save(&tmp.join("model.safetensors"), params).map_err(werr)?,
    }
    save(&tmp.join("optimizer.safetensors"), optim).map_err(werr)?;
    crate::weights::write_atomic(&tmp.join("trainer_state.json"), state.to_json().as_bytes())
        .map_err(|e| io(&tmp, e))?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| io(&fin, e))?;
    Ok(fin)
}

/// The checkpoint with the highest step in `dir` (or `dir` itself if it is one).
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf, CkptError> {
    if dir.join("trainer_state.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    let mut best: Option<(u64, PathBuf)> = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("trainer_state.json").is_file()
                && best.as_ref().is_none_or(|(b, _)| n > *b)
            {
                best = Some((n, e.path()));
            }
        }
    }
    match best {
        Some((_, p)) => Ok(p),
        None => cerr(format!("{} holds no checkpoint", dir.display())),
    }
}

fn read_all(path: &Path) -> Result<BTreeMap<String, Tensor>, CkptError> {
    let f = WeightFile::open(path).map_err(|e| CkptError { message: e.message })?;
    let mut out = BTreeMap::new();
    for n in f.names() {
        out.insert(
            n.clone(),
            f.get(&n).map_err(|e| CkptError { message: e.message })?,
        );
    }
    Ok(out)
}

/// A checkpoint read back.
pub struct Loaded {
    /// Every parameter, or (`adapter_only`) the ones that train.
    pub params: BTreeMap<String, Tensor>,
    /// The checkpoint of an adapter trainer: `params` are the adapter's file's tensors (LoRA
    /// and `modules_to_save`, by path); the base is the run's starting weights.
    pub adapter_only: bool,
    pub optim: BTreeMap<String, Tensor>,
    pub state: TrainerState,
}

/// Reads a checkpoint's `trainer_state.json` alone, checked: every field there with its
/// type, the step within the run, and the step the folder's name says (`checkpoint-N`).
pub fn read_state(ckpt: &Path) -> Result<TrainerState, CkptError> {
    let path = ckpt.join("trainer_state.json");
    let text = crate::files::read_to_string(&path).map_err(|e| io(&path, e))?;
    let st = TrainerState::from_json(&text, &path.display().to_string())?;
    if let Some(n) = ckpt
        .file_name()
        .and_then(|n| crate::train_folder::checkpoint_step(&n.to_string_lossy()))
    {
        if n != st.step {
            return cerr(format!(
                "{}: `step` is {}, but the folder is the checkpoint of step {n}",
                path.display(),
                st.step
            ));
        }
    }
    Ok(st)
}

/// Reads a checkpoint folder.
pub fn load_checkpoint(ckpt: &Path) -> Result<Loaded, CkptError> {
    let state = read_state(ckpt)?;
    let adapter = ckpt.join("adapter_model.safetensors");
    let adapter_only = adapter.is_file() && !ckpt.join("model.safetensors").exists();
    let params = if adapter_only {
        read_all(&adapter)?
            .into_iter()
            .map(|(n, t)| {
                (
                    n.strip_prefix("base_model.model.")
                        .unwrap_or(&n)
                        .to_string(),
                    t,
                )
            })
            .collect()
    } else {
        read_all(&ckpt.join("model.safetensors"))?
    };
    Ok(Loaded {
        params,
        adapter_only,
        optim: read_all(&ckpt.join("optimizer.safetensors"))?,
        state,
    })
}

/// PEFT's tensor name of a LoRA parameter path.
pub fn peft_name(path: &str) -> String {
    format!("base_model.model.{path}")
}

/// What an adapter folder in the PEFT layout holds, besides the parameters' values (see
/// [`save_peft`]).
pub struct AdapterSave<'a> {
    /// The LoRA parameters (`<module>.lora_A.weight`, `.lora_B.weight`).
    pub adapter_params: &'a [String],
    /// Base-model parameters that trained too: saved whole (PEFT's `modules_to_save`).
    pub modules: &'a [String],
    pub lora: &'a vlmc::passes::lora::LoraConfig,
    pub dropout: f64,
    /// PEFT's `task_type`: `CAUSAL_LM` for language-model objectives, else none.
    pub task_type: Option<&'a str>,
    /// PEFT's `base_model_name_or_path`: the weights the run started from (or the spec).
    pub base_model: Option<&'a str>,
    /// The base tensors the adapter was trained on (`vlmc_base.json`).
    pub base: Option<&'a crate::adapter::BaseRecord>,
}

/// Saves an adapter in the PEFT layout: `adapter_model.safetensors` (the LoRA pairs, and the
/// parameters of `modules_to_save` under `base_model.model.<path>`, PEFT's keys),
/// `adapter_config.json`, and vlmc's record of the base (`vlmc_base.json`, beside PEFT's files:
/// PEFT warns about fields of `adapter_config.json` it does not know).
pub fn save_peft(
    dir: &Path,
    params: &BTreeMap<String, Tensor>,
    a: &AdapterSave<'_>,
) -> Result<(), CkptError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut tensors = BTreeMap::new();
    let mut targets: Vec<String> = Vec::new();
    let get = |p: &String| {
        params.get(p).ok_or_else(|| CkptError {
            message: format!("no adapter parameter `{p}`"),
        })
    };
    for p in a.adapter_params {
        tensors.insert(peft_name(p), get(p)?.to_f32_tensor());
        if let Some(m) = p
            .strip_suffix(".lora_A.weight")
            .or_else(|| p.strip_suffix(".lora_B.weight"))
        {
            let last = m.rsplit('.').next().unwrap_or(m).to_string();
            if !targets.contains(&last) {
                targets.push(last);
            }
        }
    }
    targets.sort();
    // PEFT saves every parameter of a module of `modules_to_save`, named by its full path.
    let mut modules: Vec<String> = Vec::new();
    for p in a.modules {
        tensors.insert(peft_name(p), get(p)?.clone());
        let m = p
            .rsplit_once('.')
            .map_or(p.as_str(), |(m, _)| m)
            .to_string();
        if !modules.contains(&m) {
            modules.push(m);
        }
    }
    modules.sort();
    save(&dir.join("adapter_model.safetensors"), &tensors)
        .map_err(|e| CkptError { message: e.message })?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": a.task_type,
        "r": a.lora.rank,
        "lora_alpha": a.lora.alpha,
        "lora_dropout": a.dropout,
        "use_rslora": a.lora.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": if modules.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(modules)
        },
        "base_model_name_or_path": a.base_model,
    });
    crate::weights::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)
            .unwrap_or_default()
            .as_bytes(),
    )
    .map_err(|e| io(dir, e))?;
    match a.base {
        Some(b) => b.write(dir),
        None => Ok(()),
    }
}

/// An adapter read back from the PEFT layout: its parameters by path, the adapted modules
/// and its LoRA settings.
pub struct Peft {
    pub params: BTreeMap<String, Tensor>,
    pub targets: Vec<String>,
    pub lora: vlmc::passes::lora::LoraConfig,
    /// PEFT's `fan_in_fan_out`: the base weights are stored `[in, out]` (GPT-2's `Conv1D`),
    /// so the update added to them is `(B·A)ᵀ`.
    pub fan_in_fan_out: bool,
    /// PEFT's `modules_to_save`: whole trained copies of base parameters (by path) that
    /// replace the base's.
    pub modules: BTreeMap<String, Tensor>,
    /// The base weights the adapter was trained on, when vlmc trained it (`vlmc_base.json`).
    pub base: Option<crate::adapter::BaseRecord>,
    /// PEFT's `base_model_name_or_path`: what the adapter names as its base.
    pub base_model: Option<String>,
}

/// `target_modules` / `exclude_modules`: PEFT's module names (a module matches a name when it
/// is the name or ends with `.name`), or a regular expression the whole module path matches.
enum Modules {
    Any,
    Names(Vec<String>),
    Regex(String),
}

impl Modules {
    fn matches(&self, module: &str, regex: Option<&fancy_regex::Regex>) -> bool {
        match self {
            Modules::Any => true,
            Modules::Names(n) => n.iter().any(|k| name_matches(module, k)),
            Modules::Regex(_) => regex.is_some_and(|r| r.is_match(module).unwrap_or(false)),
        }
    }
}

/// Whether the parameter `path` lies in a module that the `modules_to_save` entry `key`
/// names (the module or one of its ancestors; a bare parameter outside any module, such as
/// BLIP-2's `query_tokens`, by its own name).
fn saved_by(path: &str, key: &str) -> bool {
    let mut m = path;
    loop {
        if name_matches(m, key) {
            return true;
        }
        match m.rsplit_once('.') {
            Some((up, _)) => m = up,
            None => return false,
        }
    }
}

fn name_matches(module: &str, key: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

/// A JSON value that says nothing: null, false, "", [] or {}.
fn neutral(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn strings(v: &serde_json::Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// The LoRA settings of an `adapter_config.json`, checked.
struct AdapterSettings {
    lora: vlmc::passes::lora::LoraConfig,
    fan_in_fan_out: bool,
    targets: Modules,
    exclude: Modules,
    layers: Option<Vec<i64>>,
    layers_pattern: Vec<String>,
    modules_to_save: Vec<String>,
}

/// Reads an `adapter_config.json` strictly: the fields PEFT (0.21) writes are checked for their
/// type, those that change what merging computes are honoured (`r`, `lora_alpha`,
/// `use_rslora`, `fan_in_fan_out`, `target_modules`, `exclude_modules`,
/// `layers_to_transform`, `layers_pattern`, `modules_to_save`) or refused when vlmc cannot
/// honour them (DoRA, trained biases, rank or alpha patterns, LoRA variants); an unknown
/// field with a value that says something is an error rather than ignored.
fn adapter_settings(cfg: &serde_json::Value, at: &str) -> Result<AdapterSettings, CkptError> {
    let Some(obj) = cfg.as_object() else {
        return cerr(format!("{at}: not a JSON object"));
    };
    match obj.get("peft_type").and_then(|v| v.as_str()) {
        Some("LORA") => {}
        Some(t) => return cerr(format!("{at}: not a LoRA adapter (`peft_type` is {t:?})")),
        None => {
            return cerr(format!(
                "{at}: not a LoRA adapter (no `peft_type` \"LORA\")"
            ))
        }
    }
    let mut s = AdapterSettings {
        // PEFT's defaults.
        lora: vlmc::passes::lora::LoraConfig {
            rank: 8,
            alpha: 8.0,
            rslora: false,
        },
        fan_in_fan_out: false,
        targets: Modules::Any,
        exclude: Modules::Names(Vec::new()),
        layers: None,
        layers_pattern: Vec::new(),
        modules_to_save: Vec::new(),
    };
    for (k, v) in obj {
        let bad = |what: &str| cerr(format!("{at}: `{k}` must be {what}, not {v}"));
        let refuse = |why: &str| {
            cerr(format!(
                "{at}: `{k}` is {v}: {why}, which vlmc merge does not do (it refuses the \
                 adapter rather than ignore the setting)"
            ))
        };
        let is_bool = |v: &serde_json::Value| v.as_bool();
        let opt_str = v.is_null() || v.is_string();
        let opt_obj = v.is_null() || v.is_object();
        match k.as_str() {
            "peft_type" => {}
            "r" => match v.as_i64() {
                Some(n) if n > 0 => s.lora.rank = n,
                _ => return bad("a positive integer"),
            },
            "lora_alpha" => match v.as_f64() {
                Some(x) if x.is_finite() => s.lora.alpha = x,
                _ => return bad("a number"),
            },
            "use_rslora" => match is_bool(v) {
                Some(b) => s.lora.rslora = b,
                None => return bad("true or false"),
            },
            "fan_in_fan_out" => match is_bool(v) {
                Some(b) => s.fan_in_fan_out = b,
                None => return bad("true or false"),
            },
            "lora_dropout" => match v.as_f64() {
                Some(x) if (0.0..=1.0).contains(&x) => {}
                _ => return bad("a number in [0, 1]"),
            },
            "bias" => match v.as_str() {
                Some("none") => {}
                Some("all") | Some("lora_only") => {
                    return refuse("the adapter trained the base model's biases (to be replaced)")
                }
                _ => return bad("\"none\", \"all\" or \"lora_only\""),
            },
            "use_dora" | "use_qalora" | "lora_bias" => match is_bool(v) {
                Some(false) => {}
                Some(true) => {
                    return refuse(match k.as_str() {
                        "use_dora" => "DoRA rescales each merged weight by a learned magnitude",
                        "use_qalora" => "QALoRA pools the input in groups before A",
                        _ => "lora_B has a bias to add to the layer's bias",
                    })
                }
                None => return bad("true or false"),
            },
            "target_modules" | "exclude_modules" => {
                let m = if v.is_null() {
                    Modules::Any
                } else if let Some(r) = v.as_str() {
                    Modules::Regex(r.to_string())
                } else if let Some(n) = strings(v) {
                    Modules::Names(n)
                } else {
                    return bad("a list of module names, a regular expression or null");
                };
                if k == "target_modules" {
                    s.targets = m;
                } else if !v.is_null() {
                    s.exclude = m;
                }
            }
            "layers_to_transform" => {
                s.layers = if v.is_null() {
                    None
                } else if let Some(n) = v.as_i64() {
                    Some(vec![n])
                } else if let Some(a) = v.as_array() {
                    match a.iter().map(|x| x.as_i64()).collect::<Option<Vec<i64>>>() {
                        Some(l) => Some(l),
                        None => return bad("a layer index, a list of them or null"),
                    }
                } else {
                    return bad("a layer index, a list of them or null");
                }
            }
            "layers_pattern" => {
                s.layers_pattern = if v.is_null() {
                    Vec::new()
                } else if let Some(p) = v.as_str() {
                    vec![p.to_string()]
                } else if let Some(l) = strings(v) {
                    l
                } else {
                    return bad("a name, a list of names or null");
                }
            }
            "modules_to_save" => {
                if v.is_null() {
                } else if let Some(l) = strings(v) {
                    s.modules_to_save = l;
                } else {
                    return bad("a list of module names or null");
                }
            }
            "target_parameters" => {
                if v.is_null() {
                } else if let Some(l) = strings(v) {
                    if !l.is_empty() {
                        return refuse("LoRA on bare parameters (not linear layers)");
                    }
                } else {
                    return bad("a list of names or null");
                }
            }
            "rank_pattern" | "alpha_pattern" => match v.as_object() {
                Some(o) if o.is_empty() => {}
                Some(_) => return refuse("per-module ranks or alphas"),
                None if v.is_null() => {}
                None => return bad("an object"),
            },
            "trainable_token_indices"
            | "layer_replication"
            | "alora_invocation_tokens"
            | "use_bdlora"
            | "arrow_config"
            | "kasa_config"
            | "velora_config"
            | "monteclora_config"
            | "megatron_config" => {
                if !v.is_null() {
                    return refuse("a LoRA variant or model change beyond W + s·B·A");
                }
            }
            "task_type"
            | "base_model_name_or_path"
            | "revision"
            | "peft_version"
            | "megatron_core" => {
                if !opt_str {
                    return bad("a string or null");
                }
            }
            "inference_mode" | "ensure_weight_tying" => {
                if !v.is_boolean() {
                    return bad("true or false");
                }
            }
            "init_lora_weights" => {
                if !(v.is_boolean() || v.is_string()) {
                    return bad("true, false or the name of an initialisation");
                }
            }
            "qalora_group_size" => {
                if !v.is_u64() {
                    return bad("a non-negative integer");
                }
            }
            "auto_mapping" | "loftq_config" | "eva_config" | "corda_config" | "lora_ga_config"
            | "runtime_config" => {
                if !opt_obj {
                    return bad("an object or null");
                }
            }
            _ if neutral(v) => {}
            _ => {
                return cerr(format!(
                    "{at}: unknown field `{k}` = {v}: vlmc does not know what it means for the \
                     merge, so it refuses the adapter rather than ignore it"
                ))
            }
        }
    }
    Ok(s)
}

fn compile_regex(pattern: &str, at: &str, what: &str) -> Result<fancy_regex::Regex, CkptError> {
    // Python's `re.fullmatch` / `re.match`: anchored.
    fancy_regex::Regex::new(pattern).map_err(|e| CkptError {
        message: format!(
            "{at}: `{what}` is not a regular expression vlmc reads ({pattern:?}): {e}"
        ),
    })
}

/// The layer index of a module path as PEFT finds it for `layers_to_transform`: the number
/// after the last `.<layers_pattern>.` (any segment without a pattern) that is followed by
/// more of the path.
fn layer_index(module: &str, patterns: &[String]) -> Option<i64> {
    let parts: Vec<&str> = module.split('.').collect();
    (2..parts.len().saturating_sub(1)).rev().find_map(|i| {
        let named = patterns.is_empty() || patterns.iter().any(|p| p == parts[i - 1]);
        let digits = !parts[i].is_empty() && parts[i].bytes().all(|b| b.is_ascii_digit());
        (named && digits).then(|| parts[i].parse().ok()).flatten()
    })
}

/// Reads an adapter saved in the PEFT layout, checked: its `adapter_config.json` (see
/// [`adapter_settings`]) and its tensors: at least one LoRA pair, nothing but
/// `<module>.lora_A.weight` `[r, in]` / `<module>.lora_B.weight` `[out, r]` pairs of the
/// configured rank, on exactly the modules the config's `target_modules` (less
/// `exclude_modules`, within `layers_to_transform`) names.
pub fn load_peft(dir: &Path) -> Result<Peft, CkptError> {
    let cfg_path = dir.join("adapter_config.json");
    let at = cfg_path.display().to_string();
    let text = crate::files::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| CkptError {
        message: format!("{at}: {e}"),
    })?;
    let s = adapter_settings(&cfg, &at)?;
    let file = dir.join("adapter_model.safetensors");
    let fat = file.display().to_string();
    let tensors = read_all(&file)?;
    if tensors.is_empty() {
        return cerr(format!(
            "{fat} holds no tensors: the adapter has nothing to merge"
        ));
    }
    let mut params = BTreeMap::new();
    let mut modules = BTreeMap::new();
    let (mut a_of, mut b_of) = (BTreeMap::new(), BTreeMap::new());
    for (name, t) in tensors {
        let path = name
            .strip_prefix("base_model.model.")
            .unwrap_or(&name)
            .to_string();
        if let Some(m) = path.strip_suffix(".lora_A.weight") {
            a_of.insert(m.to_string(), t.shape.clone());
        } else if let Some(m) = path.strip_suffix(".lora_B.weight") {
            b_of.insert(m.to_string(), t.shape.clone());
        } else {
            // A parameter of a module the config saves whole (PEFT's key for it:
            // `base_model.model.<module>.<parameter>`, below the module named).
            if !s.modules_to_save.iter().any(|k| saved_by(&path, k)) {
                return cerr(format!(
                    "{fat}: tensor `{name}` is neither a LoRA weight (`<module>.lora_A.weight` \
                     or `<module>.lora_B.weight`) nor a parameter of a module that the config's \
                     `modules_to_save` ({}) names",
                    cfg["modules_to_save"]
                ));
            }
            modules.insert(path, t);
            continue;
        }
        params.insert(path, t);
    }
    if let Some(k) = s
        .modules_to_save
        .iter()
        .find(|k| !modules.keys().any(|p| saved_by(p, k)))
    {
        return cerr(format!(
            "{at}: `modules_to_save` names `{k}`, but {fat} holds no parameter of a module `{k}`"
        ));
    }
    let r = s.lora.rank as usize;
    for (m, a) in &a_of {
        let Some(b) = b_of.get(m) else {
            return cerr(format!("{fat}: `{m}` has lora_A but no lora_B"));
        };
        if a.len() != 2 || b.len() != 2 || a[0] != r || b[1] != r {
            return cerr(format!(
                "{fat}: `{m}`: lora_A is {a:?} and lora_B {b:?}, but the config's rank `r` is \
                 {r} (lora_A [r, in], lora_B [out, r])"
            ));
        }
    }
    if let Some(m) = b_of.keys().find(|m| !a_of.contains_key(*m)) {
        return cerr(format!("{fat}: `{m}` has lora_B but no lora_A"));
    }
    let targets: Vec<String> = a_of.keys().cloned().collect();
    // The modules must be the ones the config names.
    let regex = |m: &Modules, what: &str| -> Result<Option<fancy_regex::Regex>, CkptError> {
        match m {
            Modules::Regex(p) => compile_regex(&format!("^(?:{p})$"), &at, what).map(Some),
            _ => Ok(None),
        }
    };
    let (tre, xre) = (
        regex(&s.targets, "target_modules")?,
        regex(&s.exclude, "exclude_modules")?,
    );
    for m in &targets {
        if !s.targets.matches(m, tre.as_ref()) {
            return cerr(format!(
                "{at}: the adapter has weights for `{m}`, which `target_modules` ({}) does not \
                 name",
                cfg["target_modules"]
            ));
        }
        if s.exclude.matches(m, xre.as_ref()) {
            return cerr(format!(
                "{at}: the adapter has weights for `{m}`, which `exclude_modules` ({}) excludes",
                cfg["exclude_modules"]
            ));
        }
        if let Some(layers) = &s.layers {
            match layer_index(m, &s.layers_pattern) {
                Some(i) if layers.contains(&i) => {}
                found => {
                    return cerr(format!(
                        "{at}: the adapter has weights for `{m}` ({}), but \
                         `layers_to_transform` is {}",
                        found.map_or("no layer index".to_string(), |i| format!("layer {i}")),
                        cfg["layers_to_transform"]
                    ))
                }
            }
        }
    }
    if let Modules::Names(names) = &s.targets {
        if let Some(k) = names
            .iter()
            .find(|k| !targets.iter().any(|m| name_matches(m, k)))
        {
            return cerr(format!(
                "{at}: `target_modules` names `{k}`, but the adapter has no weights for any \
                 module `{k}` (it has: {})",
                targets.join(", ")
            ));
        }
    }
    Ok(Peft {
        params,
        targets,
        lora: s.lora,
        fan_in_fan_out: s.fan_in_fan_out,
        modules,
        base: crate::adapter::BaseRecord::read(dir)?,
        base_model: cfg["base_model_name_or_path"].as_str().map(str::to_string),
    })
}

/// The merged weight `W + s·(B·A)ᵀ` of a layer stored `[in, out]` (PEFT's `fan_in_fan_out`).
fn merge_transposed(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Tensor {
    let (r, inp, out) = (a.shape[0], a.shape[1], b.shape[0]);
    let (wv, av, bv) = (w.to_f64(), a.to_f64(), b.to_f64());
    let mut m = Vec::with_capacity(inp * out);
    for i in 0..inp {
        for o in 0..out {
            let d: f64 = (0..r).map(|k| bv[o * r + k] * av[k * inp + i]).sum();
            m.push((wv[i * out + o] + scale * d) as f32);
        }
    }
    Tensor::f32(vec![inp, out], m)
}

/// How a layer stores its weight, from how the graph uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `[out, in]`, used as `x·Wᵀ` (`nn.Linear`).
    OutIn,
    /// `[in, out]`, used as `x·W` (transformers' `Conv1D`: PEFT's `fan_in_fan_out`).
    InOut,
}

/// The layout of the weight `w`: how its matmuls use it (`None` when it is not a matmul's
/// right operand, or is used both ways).
fn layout(g: &vlmc::ir::Graph, w: vlmc::ir::NodeId) -> Option<Layout> {
    use vlmc::ir::Op;
    let right_of_matmul = |id| {
        g.users(id)
            .into_iter()
            .any(|u| matches!(g.node(u).op, Op::MatMul) && g.operands(u).get(1) == Some(&id))
    };
    let transposed = g.users(w).into_iter().any(|u| {
        matches!(&g.node(u).op, Op::Permute { perm } if perm == &[1, 0]) && right_of_matmul(u)
    });
    match (transposed, right_of_matmul(w)) {
        (true, false) => Some(Layout::OutIn),
        (false, true) => Some(Layout::InOut),
        _ => None,
    }
}

/// Folds a LoRA adapter into base weights with the LoRA-merge pass: the adapter is applied
/// to `graph`, merged, and each merged weight `W + s·B·A` (a load-time value) is computed.
/// Layers that store their weight `[in, out]` (`Conv1D`, used as `x·W`) take PEFT's
/// `fan_in_fan_out` layout: the update is `(B·A)ᵀ`, computed directly. The config's
/// `fan_in_fan_out` must match the layers (as PEFT writes it: true exactly for `Conv1D`).
/// Returns the new values of the targets' `weight` parameters and of the parameters of the
/// modules the adapter saves whole (`modules_to_save`).
pub fn merge_lora(
    graph: &vlmc::ir::Graph,
    base: &BTreeMap<String, Tensor>,
    peft: &Peft,
) -> Result<BTreeMap<String, Tensor>, CkptError> {
    let mut out = merge_targets(graph, base, peft)?;
    out.extend(saved_modules(graph, peft)?);
    Ok(out)
}

/// The parameters of the modules the adapter saves whole, checked against the model: each
/// must be a parameter of it, of its type's shape.
pub fn saved_modules(
    graph: &vlmc::ir::Graph,
    peft: &Peft,
) -> Result<BTreeMap<String, Tensor>, CkptError> {
    let mut out = BTreeMap::new();
    for (path, t) in &peft.modules {
        let Some(id) = graph.param(path) else {
            return cerr(format!(
                "the adapter saves `{path}` (`modules_to_save`), but the model has no such \
                 parameter"
            ));
        };
        let ty = &graph.node(id).ty;
        let want: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| d.as_const().unwrap_or(-1) as usize)
            .collect();
        if t.shape != want {
            return cerr(format!(
                "the adapter saves `{path}` as {:?}, but the model's parameter is {ty}",
                t.shape
            ));
        }
        out.insert(path.clone(), t.clone());
    }
    Ok(out)
}

/// [`merge_lora`] for the LoRA targets alone.
fn merge_targets(
    graph: &vlmc::ir::Graph,
    base: &BTreeMap<String, Tensor>,
    peft: &Peft,
) -> Result<BTreeMap<String, Tensor>, CkptError> {
    use vlmc::passes::Pass;
    if peft.targets.is_empty() {
        return cerr("the adapter has no LoRA weights: nothing to merge");
    }
    // The layouts and shapes first, for errors that name the layer.
    for t in &peft.targets {
        let path = format!("{t}.weight");
        let Some(id) = graph.param(&path) else {
            return cerr(format!(
                "the adapter adapts `{t}`, but the model has no parameter `{path}`"
            ));
        };
        let lay = match (layout(graph, id), peft.fan_in_fan_out) {
            (None, _) => {
                return cerr(format!(
                    "`{t}` is not a linear layer (its weight is not used as x·Wᵀ, nor as x·W \
                     as a Conv1D's): vlmc merge cannot fold a LoRA update into it"
                ))
            }
            (Some(Layout::OutIn), true) => {
                return cerr(format!(
                    "the adapter's config sets `fan_in_fan_out`, but `{t}` is a linear layer \
                     whose weight is stored [out, in] (used as x·Wᵀ), for which PEFT merges \
                     without it (and writes `fan_in_fan_out: false`): refusing to guess"
                ))
            }
            (Some(Layout::InOut), false) => {
                return cerr(format!(
                    "`{t}` stores its weight [in, out] (a Conv1D, used as x·W), but the \
                     adapter's config does not set `fan_in_fan_out`, which PEFT writes for \
                     such layers: refusing to guess"
                ))
            }
            (Some(l), _) => l,
        };
        let w = match base.get(&path) {
            Some(w) => w.shape.clone(),
            None => {
                return cerr(format!(
                    "the base weights have no `{path}`, which the adapter adapts"
                ))
            }
        };
        let (a, b) = (
            &peft.params[&format!("{t}.lora_A.weight")].shape,
            &peft.params[&format!("{t}.lora_B.weight")].shape,
        );
        let (want, named) = match lay {
            Layout::InOut => (vec![a[1], b[0]], "[in, out]"),
            Layout::OutIn => (vec![b[0], a[1]], "[out, in]"),
        };
        if w != want {
            return cerr(format!(
                "`{path}` is {w:?}, but the adapter's lora_A {a:?} and lora_B {b:?} fit a weight \
                 {want:?} ({named})"
            ));
        }
    }
    if peft.fan_in_fan_out {
        let scale = peft.lora.scale();
        let mut out = BTreeMap::new();
        for t in &peft.targets {
            let path = format!("{t}.weight");
            let m = merge_transposed(
                &base[&path],
                &peft.params[&format!("{t}.lora_A.weight")],
                &peft.params[&format!("{t}.lora_B.weight")],
                scale,
            );
            out.insert(path, m);
        }
        return Ok(out);
    }
    let mut g = graph.clone();
    let e = |e: vlmc::passes::PassError| CkptError {
        message: e.to_string(),
    };
    vlmc::passes::lora::apply(&mut g, &peft.targets, &peft.lora).map_err(e)?;
    vlmc::passes::lora::LoraMerge.run(&mut g).map_err(e)?;
    let mut wanted = Vec::new();
    for t in &peft.targets {
        let path = format!("{t}.weight");
        let w = g.param(&path).ok_or_else(|| CkptError {
            message: format!("the model has no `{path}`"),
        })?;
        // The merged weight is the `add(W, s·B·A)` that uses W.
        let merged = g
            .users(w)
            .into_iter()
            .find(|&u| matches!(g.node(u).op, vlmc::ir::Op::Binary(vlmc::ir::BinaryOp::Add)))
            .ok_or_else(|| CkptError {
                message: format!("`{t}` was not merged"),
            })?;
        wanted.push((path, merged));
    }
    let mut params = base.clone();
    params.extend(peft.params.clone());
    let ids: Vec<vlmc::ir::NodeId> = wanted.iter().map(|(_, id)| *id).collect();
    let values = crate::interp::run_nodes(&g, &BTreeMap::new(), &params, &ids)
        .map_err(|e| CkptError { message: e.message })?;
    Ok(wanted
        .into_iter()
        .map(|(p, id)| (p, values[&id].clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::saved_by;

    #[test]
    fn modules_to_save_names_a_module_or_an_ancestor_by_its_last_segments() {
        // PEFT's keys: `<module>.<parameter>`, below the module named.
        assert!(saved_by("language_model.lm_head.weight", "lm_head"));
        assert!(saved_by(
            "language_model.lm_head.weight",
            "language_model.lm_head"
        ));
        assert!(saved_by("qformer.layer.0.attention.query.bias", "qformer"));
        assert!(saved_by("query_tokens", "query_tokens"));
        assert!(!saved_by("language_model.lm_head.weight", "head"));
        assert!(!saved_by(
            "language_model.lm_head.weight",
            "language_model.norm"
        ));
        assert!(!saved_by("vision.lm_head_extra.weight", "lm_head"));
    }
}
