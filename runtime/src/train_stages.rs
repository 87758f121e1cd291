//! Stages: trainers chained by `from` run in order, each starting from the weights the one
//! before it finished with.
//!
//! `trainer instruct { from align ... }` makes `align` the stage before `instruct`. Running
//! `instruct` as a chain runs `align` into `OUT/align/`, then `instruct` into `OUT/instruct/`
//! from `OUT/align/model.safetensors`. A stage that trained a LoRA adapter hands on its base
//! weights with the adapter merged in (the LoRA-merge pass); the next stage's own adapter
//! starts afresh from its init rules. A stage whose folder already holds its finished run is
//! skipped, so running the chain again continues where it stopped. Each stage folder follows
//! the rules of a single run's folder (see [`crate::train_loop::train`]): locked while it
//! trains, an unfinished or different earlier run refused unless `--resume` (which continues
//! it, checked) or `--overwrite` (which starts it again).

use crate::tensor::Tensor;
use crate::train::TrainRunError;
use crate::train_loop::{train, Event, Summary, TrainOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc::elab::Elaborated;
use vlmc::train::TrainConfig;

fn err(message: impl Into<String>) -> TrainRunError {
    TrainRunError {
        message: message.into(),
    }
}

/// The stages that end with trainer `last`, first stage first: `last`, the trainer it starts
/// `from`, that one's `from`, and so on, reversed. Errors on an unknown trainer and on a
/// cycle.
pub fn chain(model: &Elaborated, last: &str) -> Result<Vec<String>, TrainRunError> {
    let names: Vec<&str> = model.trainers.iter().map(|t| t.name.as_str()).collect();
    let mut out: Vec<String> = Vec::new();
    let mut at = last.to_string();
    let mut asked_by: Option<String> = None;
    loop {
        if !names.contains(&at.as_str()) {
            let has = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            return Err(err(match &asked_by {
                Some(by) => format!(
                    "trainer `{by}` starts `from {at}`, but model `{}` has no trainer `{at}` (trainers: {has})",
                    model.model
                ),
                None => format!(
                    "model `{}` has no trainer `{at}` (trainers: {has})",
                    model.model
                ),
            }));
        }
        if let Some(i) = out.iter().position(|n| *n == at) {
            let mut cycle: Vec<&str> = out[i..].iter().map(String::as_str).collect();
            cycle.push(&at);
            return Err(err(format!(
                "the `from` chain of trainer `{last}` is a cycle: {}",
                cycle.join(" ← ")
            )));
        }
        out.push(at.clone());
        let cfg = TrainConfig::of(model, &at).map_err(err)?;
        match cfg.from {
            Some(f) => {
                asked_by = Some(at);
                at = f;
            }
            None => break,
        }
    }
    out.reverse();
    Ok(out)
}

/// The weights a stage hands on: its final `model.safetensors` restricted to the base model's
/// parameters, with its LoRA adapter (if it trained one) merged in.
pub fn stage_weights(
    model: &Elaborated,
    cfg: &TrainConfig,
    dir: &Path,
) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
    let path = dir.join("model.safetensors");
    let f = crate::weights::WeightFile::open(&path).map_err(|e| err(e.message))?;
    let mut params = BTreeMap::new();
    for (_, p, ty, _) in model.graph.params() {
        let t = f.get(p).map_err(|e| {
            err(format!(
                "{}: no parameter `{p}` ({ty}) of stage `{}`: {}",
                path.display(),
                cfg.name,
                e.message
            ))
        })?;
        params.insert(p.to_string(), t);
    }
    if cfg.lora().is_some() {
        let peft =
            crate::train_ckpt::load_peft(&dir.join("adapter")).map_err(|e| err(e.message))?;
        let merged = crate::train_ckpt::merge_lora(&model.graph, &params, &peft)
            .map_err(|e| err(e.message))?;
        params.extend(merged);
    }
    Ok(params)
}

/// What to run: the chain ending with `trainer`, each stage into `out/<stage>/`.
pub struct StagesOptions<'a> {
    pub model: &'a Elaborated,
    /// The model's `.vlm` file: what the first stage's adapter names as its base (PEFT's
    /// `base_model_name_or_path`) when it starts from the init rules.
    pub spec: Option<&'a Path>,
    /// The last stage.
    pub trainer: &'a str,
    /// Each stage's training data.
    pub data: &'a std::collections::BTreeMap<String, PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub eval_data: Option<&'a Path>,
    pub out: &'a Path,
    /// Continue an unfinished stage from its latest checkpoint in `resume/<stage>/`.
    pub resume: Option<&'a Path>,
    /// Override every stage's step count.
    pub steps: Option<u64>,
    /// Stop each stage after this many steps (the chain stops at a stage left unfinished).
    pub stop_after: Option<u64>,
    /// Start every stage again, deleting what earlier runs wrote into the stage folders
    /// (instead of skipping finished stages and refusing unfinished ones).
    pub overwrite: bool,
    /// What runs the graphs.
    pub backend: crate::train::Backend,
    /// Write TensorBoard event files (each stage into `out/<stage>/runs/`).
    pub tensorboard: bool,
}

/// Progress of a chain.
pub enum StageEvent<'a> {
    /// Stage `index` (0-based) of `count` starts; `from` is the folder whose weights it starts
    /// from, `resume` the checkpoint folder it continues.
    Start {
        index: usize,
        count: usize,
        name: &'a str,
        out: &'a Path,
        from: Option<&'a Path>,
        resume: Option<&'a Path>,
    },
    /// A step of the running stage.
    Step(&'a Event<'a>),
    /// The stage finished (or was found finished and skipped: `summary.skipped`).
    Done {
        index: usize,
        count: usize,
        name: &'a str,
        summary: &'a Summary,
    },
}

/// Runs the stages in order; returns each stage's summary. When a stage stops before its
/// total steps (`stop_after`), the later stages do not run and the list is shorter than the
/// chain.
pub fn train_stages(
    o: &StagesOptions<'_>,
    on_event: &mut dyn FnMut(&StageEvent<'_>),
) -> Result<Vec<(String, Summary)>, TrainRunError> {
    let names = chain(o.model, o.trainer)?;
    let count = names.len();
    // One chain at a time in the folder (each stage also locks its own).
    let _lock = crate::train_folder::FolderLock::acquire(o.out).map_err(err)?;
    let mut done: Vec<(String, Summary)> = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let dir = o.out.join(name);
        let prev = done.last().map(|(n, s)| (n.clone(), s.out.clone()));
        let weights = match &prev {
            Some((pn, pdir)) => {
                let pcfg = TrainConfig::of(o.model, pn).map_err(err)?;
                Some(stage_weights(o.model, &pcfg, pdir)?)
            }
            None => None,
        };
        let resume = o
            .resume
            .map(|r| r.join(name))
            .filter(|r| crate::train_ckpt::latest_checkpoint(r).is_ok());
        on_event(&StageEvent::Start {
            index,
            count,
            name,
            out: &dir,
            from: prev.as_ref().map(|(_, d)| d.as_path()),
            resume: resume.as_deref(),
        });
        let opts = TrainOptions {
            model: o.model,
            trainer: name,
            data: o
                .data
                .get(name)
                .ok_or_else(|| err(format!("stage `{name}` has no training data")))?,
            tokenizer: o.tokenizer.clone(),
            weights,
            weights_dir: None,
            // The previous stage's folder (its weights, its adapter merged), or the spec.
            base_name: match &prev {
                Some((_, d)) => Some(d.display().to_string()),
                None => o.spec.map(|p| p.display().to_string()),
            },
            out: &dir,
            resume: resume.as_deref(),
            steps: o.steps,
            stop_after: o.stop_after,
            eval_data: o.eval_data,
            skip_finished: true,
            overwrite: o.overwrite,
            restart_unfinished: o.resume.is_some(),
            backend: o.backend.clone(),
            tensorboard: o.tensorboard,
        };
        let summary = train(&opts, &mut |ev| on_event(&StageEvent::Step(ev))).map_err(|e| {
            err(format!(
                "stage {}/{count} (`{name}`): {}",
                index + 1,
                e.message
            ))
        })?;
        on_event(&StageEvent::Done {
            index,
            count,
            name,
            summary: &summary,
        });
        let unfinished = summary.steps < summary.total_steps;
        done.push((name.clone(), summary));
        if unfinished {
            break;
        }
    }
    Ok(done)
}
