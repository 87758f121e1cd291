//! Weights that hold a LoRA adapter, and `--adapter`: what `vlmc run`, `generate`, `train
//! --weights` and `merge` do with them.
//!
//! A training run's `model.safetensors` holds the adapter unmerged (`….lora_A.weight`,
//! `….lora_B.weight`), which the model's forward does not read. Dropping them would run the
//! base model as if it were the fine-tuned one, so such weights are refused, with the command
//! that runs them (`--adapter DIR/adapter`, which gives the adapter's scale) or merges them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc::elab::Elaborated;
use vlmc_runtime::train_ckpt::Peft;
use vlmc_runtime::weight_set::WeightSet;
use vlmc_runtime::weights::{Bound, TensorSource};
use vlmc_runtime::Tensor;

/// The adapter folder a training run wrote beside `weights` (`DIR/adapter/` for
/// `DIR/model.safetensors`), if there is one.
fn adapter_beside(weights: &[PathBuf]) -> Option<PathBuf> {
    let d = vlmc_runtime::weight_set::tokenizer_dir(weights).join("adapter");
    d.join("adapter_config.json").is_file().then_some(d)
}

/// `--weights` as given, for messages.
pub fn shown(weights: &[PathBuf]) -> String {
    let v: Vec<String> = weights.iter().map(|w| w.display().to_string()).collect();
    v.join(",")
}

/// The error for weights holding LoRA tensors that the model does not read; `todo` says what
/// to do instead, given the adapter folder to name.
fn unmerged(weights: &[PathBuf], lora: &[&str], todo: &dyn Fn(&str) -> String) -> String {
    let listed: Vec<String> = lora.iter().take(4).map(|n| format!("`{n}`")).collect();
    let adapter =
        adapter_beside(weights).map_or("DIR/adapter".to_string(), |d| d.display().to_string());
    format!(
        "{} holds {} LoRA tensor(s) ({}{}) that the model does not read: it is a training \
         output with its adapter unmerged, and running without them would silently drop the \
         fine-tuning. {}",
        shown(weights),
        lora.len(),
        listed.join(", "),
        if lora.len() > 4 { ", ..." } else { "" },
        todo(&adapter)
    )
}

/// The LoRA tensors of `weights` that `bound` left unused, checked against `peft`: with no
/// adapter they are an error saying what to do; with one, each must be the adapter's own
/// (same path, same values: a training output given with its adapter), and their names are
/// returned.
pub fn check_lora_tensors(
    file: &Path,
    weights: &[PathBuf],
    wf: &WeightSet,
    bound: &Bound,
    peft: Option<&Peft>,
    m: &Elaborated,
) -> Result<Vec<String>, String> {
    let lora = vlmc_runtime::adapter::lora_tensors(&bound.unused);
    if lora.is_empty() {
        return Ok(Vec::new());
    }
    let Some(peft) = peft else {
        return Err(unmerged(weights, &lora, &|a| {
            format!(
                "Give its adapter, `--adapter {a}` (run and generate then apply it unmerged), \
                 or merge it: `vlmc merge {f} --adapter {a} --weights {w} -o \
                 merged.safetensors`",
                f = file.display(),
                w = shown(weights)
            )
        }));
    };
    for n in &lora {
        // Named as the spec's paths (vlmc's output) or as the checkpoint's.
        let path = vlmc_runtime::weights::map_name(n, &m.checkpoint).unwrap_or(n.to_string());
        let t = wf.tensor(n).map_err(|e| e.message)?;
        match peft.params.get(*n).or_else(|| peft.params.get(&path)) {
            Some(a) if a.shape == t.shape && a.to_f64() == t.to_f64() => {}
            _ => {
                return Err(format!(
                    "{} holds the LoRA tensor `{n}`, which the adapter given (--adapter) does \
                     not hold with the same values: these weights carry another adapter; give \
                     the base weights, or the adapter they were trained with",
                    shown(weights)
                ))
            }
        }
    }
    Ok(lora.iter().map(|s| s.to_string()).collect())
}

/// The refusal of `vlmc train --weights W` when `W` holds an unmerged adapter.
pub fn refuse_for_training(file: &Path, weights: &[PathBuf], bound: &Bound) -> Result<(), String> {
    let lora = vlmc_runtime::adapter::lora_tensors(&bound.unused);
    if lora.is_empty() {
        return Ok(());
    }
    Err(unmerged(weights, &lora, &|a| {
        format!(
            "To start from the fine-tuned model, merge the adapter first: `vlmc merge {f} \
             --adapter {a} --weights {w} -o merged.safetensors`, then --weights \
             merged.safetensors (or run the trainer's `from` chain without --weights, which \
             merges each stage's adapter into the next stage's start)",
            f = file.display(),
            w = shown(weights)
        )
    }))
}

/// Loads the PEFT adapter `dir` for model `m` (its module names mapped by the model's
/// `checkpoint` rules) and the base weights `base` (bound from `weights`): checks it was
/// trained on them (unless `allow_other_base`).
pub fn load(
    m: &Elaborated,
    dir: &Path,
    base: &BTreeMap<String, Tensor>,
    weights: &[PathBuf],
    allow_other_base: bool,
) -> Result<Peft, String> {
    let mut peft = vlmc_runtime::train_ckpt::load_peft(dir).map_err(|e| e.message)?;
    vlmc_runtime::adapter::map_names(&mut peft, &m.graph, &m.checkpoint)
        .map_err(|e| format!("{}: {}", dir.display(), e.message))?;
    if !allow_other_base {
        vlmc_runtime::adapter::check_base(&peft, dir, base, Path::new(&shown(weights)))
            .map_err(|e| e.message)?;
    }
    Ok(peft)
}

/// Fails unless `out` (an output of `vlmc run`) is none of the adapter's files.
pub fn check_output(out: &Path, adapter: Option<&Path>) -> Result<(), String> {
    let Some(d) = adapter else {
        return Ok(());
    };
    let files = [
        ("the adapter's weights", d.join("adapter_model.safetensors")),
        ("the adapter's configuration", d.join("adapter_config.json")),
    ];
    let inputs: Vec<(&str, &Path)> = files.iter().map(|(w, p)| (*w, p.as_path())).collect();
    vlmc::files::refuse_overwriting(out, &inputs)
}

/// What `vlmc run` runs: the model's graph and the bound parameters, with `--adapter` (if
/// given) added unmerged. LoRA tensors in the weights are refused unless they are the
/// adapter's own.
pub fn bind_for_run(
    file: &Path,
    m: &mut Elaborated,
    weights: &[PathBuf],
    adapter: Option<&Path>,
    allow_other_base: bool,
) -> Result<Bound, String> {
    let wf = WeightSet::open(weights).map_err(|e| e.message)?;
    let mut bound =
        vlmc_runtime::weights::bind(&m.graph, &wf, &m.checkpoint).map_err(|e| e.message)?;
    let peft = match adapter {
        Some(d) => Some(load(m, d, &bound.params, weights, allow_other_base)?),
        None => None,
    };
    let theirs = check_lora_tensors(file, weights, &wf, &bound, peft.as_ref(), m)?;
    bound.unused.retain(|n| !theirs.contains(n));
    if let (Some(p), Some(d)) = (&peft, adapter) {
        vlmc_runtime::adapter::attach(&mut m.graph, &mut bound.params, p)
            .map_err(|e| format!("{}: {}", d.display(), e.message))?;
        eprintln!(
            "added the adapter {} unmerged: {} LoRA targets (rank {}, scale {}){}",
            d.display(),
            p.targets.len(),
            p.lora.rank,
            p.lora.scale(),
            if p.modules.is_empty() {
                String::new()
            } else {
                format!(", {} saved module tensor(s)", p.modules.len())
            }
        );
    }
    Ok(bound)
}
