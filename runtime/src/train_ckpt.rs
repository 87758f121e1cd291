//! Training checkpoints and adapters on disk.
//!
//! A checkpoint is a folder `checkpoint-<step>/` holding `model.safetensors` (every parameter,
//! adapter included), `optimizer.safetensors` (the state `optim.<slot>.<path>`) and
//! `trainer_state.json` (step, data position, seed, trainer). It is written under a temporary
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

/// Where training stands, beside the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    pub trainer: String,
    pub step: u64,
    pub total_steps: u64,
    pub seed: u64,
    pub position: Position,
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
        })
        .to_string()
    }

    fn from_json(text: &str) -> Result<TrainerState, CkptError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| CkptError {
            message: format!("trainer_state.json: {e}"),
        })?;
        let n = |k: &str| {
            v.get(k).and_then(|x| x.as_u64()).ok_or_else(|| CkptError {
                message: format!("trainer_state.json: no `{k}`"),
            })
        };
        Ok(TrainerState {
            trainer: v
                .get("trainer")
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string(),
            step: n("step")?,
            total_steps: n("total_steps")?,
            seed: n("seed")?,
            position: Position {
                epoch: n("epoch")?,
                index: n("index")? as usize,
            },
        })
    }
}

fn io(what: &Path, e: std::io::Error) -> CkptError {
    CkptError {
        message: format!("{}: {e}", what.display()),
    }
}

/// Writes `dir/checkpoint-<step>/` atomically; returns its path.
pub fn save_checkpoint(
    dir: &Path,
    params: &BTreeMap<String, Tensor>,
    optim: &BTreeMap<String, Tensor>,
    state: &TrainerState,
) -> Result<PathBuf, CkptError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = format!("checkpoint-{}", state.step);
    let fin = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let werr = |e: crate::weights::WeightError| CkptError { message: e.message };
    save(&tmp.join("model.safetensors"), params).map_err(werr)?;
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
    pub params: BTreeMap<String, Tensor>,
    pub optim: BTreeMap<String, Tensor>,
    pub state: TrainerState,
}

/// Reads a checkpoint's `trainer_state.json` alone.
pub fn read_state(ckpt: &Path) -> Result<TrainerState, CkptError> {
    let path = ckpt.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    TrainerState::from_json(&text)
}

/// Reads a checkpoint folder.
pub fn load_checkpoint(ckpt: &Path) -> Result<Loaded, CkptError> {
    let text = std::fs::read_to_string(ckpt.join("trainer_state.json"))
        .map_err(|e| io(&ckpt.join("trainer_state.json"), e))?;
    Ok(Loaded {
        params: read_all(&ckpt.join("model.safetensors"))?,
        optim: read_all(&ckpt.join("optimizer.safetensors"))?,
        state: TrainerState::from_json(&text)?,
    })
}

/// PEFT's tensor name of a LoRA parameter path.
pub fn peft_name(path: &str) -> String {
    format!("base_model.model.{path}")
}

/// Saves LoRA parameters (`<module>.lora_A.weight`, `.lora_B.weight`) in the PEFT layout.
pub fn save_peft(
    dir: &Path,
    params: &BTreeMap<String, Tensor>,
    adapter_params: &[String],
    lora: &vlmc::passes::lora::LoraConfig,
    dropout: f64,
) -> Result<(), CkptError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut tensors = BTreeMap::new();
    let mut modules: Vec<String> = Vec::new();
    for p in adapter_params {
        let t = params
            .get(p)
            .ok_or_else(|| CkptError {
                message: format!("no adapter parameter `{p}`"),
            })?
            .to_f32_tensor();
        tensors.insert(peft_name(p), t);
        if let Some(m) = p
            .strip_suffix(".lora_A.weight")
            .or_else(|| p.strip_suffix(".lora_B.weight"))
        {
            let last = m.rsplit('.').next().unwrap_or(m).to_string();
            if !modules.contains(&last) {
                modules.push(last);
            }
        }
    }
    modules.sort();
    save(&dir.join("adapter_model.safetensors"), &tensors)
        .map_err(|e| CkptError { message: e.message })?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": dropout,
        "use_rslora": lora.rslora,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": serde_json::Value::Null,
        "base_model_name_or_path": serde_json::Value::Null,
    });
    crate::weights::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)
            .unwrap_or_default()
            .as_bytes(),
    )
    .map_err(|e| io(dir, e))
}

/// An adapter read back from the PEFT layout: its parameters by path, the adapted modules
/// and its LoRA settings.
pub struct Peft {
    pub params: BTreeMap<String, Tensor>,
    pub targets: Vec<String>,
    pub lora: vlmc::passes::lora::LoraConfig,
}

/// Reads an adapter saved in the PEFT layout.
pub fn load_peft(dir: &Path) -> Result<Peft, CkptError> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| CkptError {
        message: format!("{}: {e}", cfg_path.display()),
    })?;
    if cfg.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        return cerr(format!("{}: not a LoRA adapter", cfg_path.display()));
    }
    let r = cfg.get("r").and_then(|v| v.as_i64()).unwrap_or(8);
    let lora = vlmc::passes::lora::LoraConfig {
        rank: r,
        alpha: cfg
            .get("lora_alpha")
            .and_then(|v| v.as_f64())
            .unwrap_or(8.0),
        rslora: cfg
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
    };
    let mut params = BTreeMap::new();
    let mut targets = Vec::new();
    for (name, t) in read_all(&dir.join("adapter_model.safetensors"))? {
        let path = name
            .strip_prefix("base_model.model.")
            .unwrap_or(&name)
            .to_string();
        if let Some(m) = path.strip_suffix(".lora_A.weight") {
            targets.push(m.to_string());
        }
        params.insert(path, t);
    }
    targets.sort();
    Ok(Peft {
        params,
        targets,
        lora,
    })
}

/// Folds a LoRA adapter into base weights with the LoRA-merge pass: the adapter is applied
/// to `graph`, merged, and each merged weight `W + s·B·A` (a load-time value) is computed.
/// Returns the new values of the targets' `weight` parameters.
pub fn merge_lora(
    graph: &vlmc::ir::Graph,
    base: &BTreeMap<String, Tensor>,
    peft: &Peft,
) -> Result<BTreeMap<String, Tensor>, CkptError> {
    use vlmc::passes::Pass;
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
