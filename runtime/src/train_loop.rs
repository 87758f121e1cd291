//! The training loop behind `vlmc train`: data, steps, the loss log, evaluation, checkpoints,
//! resume. Chains of stages (`from`) are in [`crate::train_stages`].

use crate::tensor::Tensor;
use crate::train::{Session, StepStats, TrainRunError};
use crate::train_ckpt::{self, TrainerState};
use crate::train_data::{self, Position, Tok};
use crate::train_eval::Evaluator;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vlmc::elab::Elaborated;
use vlmc::train::TrainConfig;

/// What to train and where.
pub struct TrainOptions<'a> {
    pub model: &'a Elaborated,
    pub trainer: &'a str,
    pub data: &'a Path,
    /// The tokenizer (default: `tokenizer.json` beside the data, then beside the weights).
    pub tokenizer: Option<PathBuf>,
    /// Starting weights (default: the init rules with the trainer's seed).
    pub weights: Option<BTreeMap<String, Tensor>>,
    pub weights_dir: Option<PathBuf>,
    pub out: &'a Path,
    /// Continue from the latest checkpoint in this folder.
    pub resume: Option<&'a Path>,
    /// Override the trainer's step count.
    pub steps: Option<u64>,
    /// Stop (with a checkpoint) after this many steps in total, e.g. to test resuming.
    pub stop_after: Option<u64>,
    /// Evaluation data (JSONL like the training data): its mean loss is computed every
    /// `eval_every` steps and at the last step, and logged as `eval_loss`.
    pub eval_data: Option<&'a Path>,
    /// Do nothing when `out` already holds this trainer's finished run (its latest checkpoint
    /// is at the run's total steps, and `model.safetensors` is there): stages re-run this way.
    pub skip_finished: bool,
    /// What runs the step and evaluation graphs (default: compiled for the CPU).
    pub backend: crate::train::Backend,
}

/// One finished step, for progress reporting.
pub struct Event<'a> {
    pub step: u64,
    pub total: u64,
    pub stats: &'a StepStats,
    pub examples_per_s: f64,
    /// The evaluation loss after this step, when the step evaluated.
    pub eval_loss: Option<f64>,
}

/// What a run did.
pub struct Summary {
    /// Optimiser steps done (in all, resumed runs included).
    pub steps: u64,
    /// The steps of the whole run (the schedule's length).
    pub total_steps: u64,
    pub losses: Vec<f64>,
    pub out: PathBuf,
    pub last_checkpoint: Option<PathBuf>,
    /// The evaluations: (step, loss).
    pub eval_losses: Vec<(u64, f64)>,
    /// Whether the run was already finished in `out` and nothing ran (`skip_finished`).
    pub skipped: bool,
}

/// Why a run with these settings evaluates nothing, if it does not: the trainer asks for
/// `eval_every` but no evaluation data is given.
pub fn eval_warning(cfg: &TrainConfig, eval_data: Option<&Path>) -> Option<String> {
    match (cfg.eval_every, eval_data) {
        (Some(k), None) => Some(format!(
            "trainer `{}` sets `eval_every {k}` but no evaluation data was given (--eval-data): \
             it is not evaluated",
            cfg.name
        )),
        _ => None,
    }
}

/// The latest checkpoint in `out` when it finishes a run of `trainer` of `total` steps and
/// the final `model.safetensors` is beside it.
pub fn finished_run(out: &Path, trainer: &str, total: u64) -> Option<PathBuf> {
    let ck = train_ckpt::latest_checkpoint(out).ok()?;
    let st = train_ckpt::read_state(&ck).ok()?;
    (st.trainer == trainer
        && st.step == total
        && st.total_steps == total
        && out.join("model.safetensors").is_file())
    .then_some(ck)
}

fn err(message: impl Into<String>) -> TrainRunError {
    TrainRunError {
        message: message.into(),
    }
}

/// Runs a trainer; `on_step` is called after every optimiser step.
pub fn train(
    o: &TrainOptions<'_>,
    on_step: &mut dyn FnMut(&Event<'_>),
) -> Result<Summary, TrainRunError> {
    let cfg = TrainConfig::of(o.model, o.trainer).map_err(err)?;
    let tok_path = match &o.tokenizer {
        Some(t) => t.clone(),
        None => {
            let beside = o
                .data
                .parent()
                .unwrap_or(Path::new("."))
                .join("tokenizer.json");
            match &o.weights_dir {
                Some(w) if !beside.is_file() => w.join("tokenizer.json"),
                _ => beside,
            }
        }
    };
    let tok = Tok::load(&tok_path).map_err(|e| err(e.message))?;
    let prompt_masked = matches!(
        cfg.objective,
        vlmc::train::Objective::Sft {
            prompt_masked: true
        }
    );
    let examples = train_data::read_jsonl(o.data, &tok, prompt_masked, cfg.max_len)
        .map_err(|e| err(e.message))?;
    let n = examples.len();
    let per_step = cfg.batch * cfg.grad_accum;
    let total = o
        .steps
        .or(cfg.steps)
        .unwrap_or_else(|| cfg.epochs.unwrap_or(1) * n.div_ceil(per_step) as u64);
    if o.skip_finished {
        if let Some(ck) = finished_run(o.out, &cfg.name, total) {
            return Ok(Summary {
                steps: total,
                total_steps: total,
                losses: Vec::new(),
                out: o.out.to_path_buf(),
                last_checkpoint: Some(ck),
                eval_losses: Vec::new(),
                skipped: true,
            });
        }
    }
    let params = match &o.weights {
        Some(w) => w.clone(),
        None => crate::init::init_params(&o.model.graph, cfg.seed).map_err(|e| err(e.message))?,
    };
    let seed = cfg.seed;
    let name = cfg.name.clone();
    let lora = cfg.lora();
    let dropout = cfg.lora_dropout();
    let eval_every = cfg.eval_every;
    let mut session = Session::with_backend(o.model, cfg, params, total, &o.backend)?;
    let mut pos = Position { epoch: 0, index: 0 };
    // The last good checkpoint: the one resumed from, until a new one is written.
    let mut last_ckpt: Option<PathBuf> = None;
    if let Some(dir) = o.resume {
        let ck = train_ckpt::latest_checkpoint(dir).map_err(|e| err(e.message))?;
        let l = train_ckpt::load_checkpoint(&ck).map_err(|e| err(e.message))?;
        if l.state.trainer != name {
            return Err(err(format!(
                "{} is a checkpoint of trainer `{}`, not `{name}`",
                ck.display(),
                l.state.trainer
            )));
        }
        session.params = l.params;
        session.state = l.optim;
        session.step = l.state.step;
        session.total_steps = l.state.total_steps;
        pos = l.state.position;
        last_ckpt = Some(ck);
    }
    // Image inputs: the model's `pixels` (or declared image preprocessing).
    let images = o
        .model
        .graph
        .inputs()
        .into_iter()
        .find(|(_, nm, t)| *nm == "pixels" && t.rank() == 4)
        .map(|(_, _, t)| {
            let size = t.shape[3].as_const().unwrap_or(224) as usize;
            train_data::image_preprocess(&o.model.preprocess, size)
        });
    let eval = match o.eval_data {
        Some(path) => {
            let rows = train_data::read_jsonl(path, &tok, prompt_masked, session.cfg.max_len)
                .map_err(|e| err(e.message))?;
            Some(Evaluator::new(
                o.model,
                &session.cfg,
                &rows,
                tok.pad_id,
                images.as_ref(),
                &o.backend,
            )?)
        }
        None => None,
    };
    let mut eval_losses = Vec::new();
    std::fs::create_dir_all(o.out).map_err(|e| err(format!("{}: {e}", o.out.display())))?;
    let log_path = o.out.join("log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| err(format!("{}: {e}", log_path.display())))?;
    let save_every = session.cfg.save_every;
    let state_of = |s: &Session, pos: Position| TrainerState {
        trainer: name.clone(),
        step: s.step,
        total_steps: s.total_steps,
        seed,
        position: pos,
    };
    let mut losses = Vec::new();
    let stop = o.stop_after.unwrap_or(u64::MAX).min(session.total_steps);
    while session.step < stop {
        let t0 = Instant::now();
        let mut micro = Vec::new();
        for _ in 0..session.cfg.grad_accum {
            let (idx, next) = train_data::next_batch(n, session.cfg.batch, seed, pos);
            pos = next;
            let rows: Vec<&train_data::Example> = idx.iter().map(|&i| &examples[i]).collect();
            micro.push(
                train_data::collate(&rows, tok.pad_id, images.as_ref())
                    .map_err(|e| err(e.message))?,
            );
        }
        let stats = match session.step(&micro) {
            Ok(s) => s,
            Err(e) => {
                let kept = match &last_ckpt {
                    Some(p) => format!("; the last good checkpoint is {}", p.display()),
                    None => "; no checkpoint was written yet".to_string(),
                };
                return Err(err(format!("{}{kept}", e.message)));
            }
        };
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let eps = (session.cfg.batch * session.cfg.grad_accum) as f64 / secs;
        let line = serde_json::json!({
            "step": session.step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "items": stats.items,
            "epoch": pos.epoch,
            "examples_per_s": eps,
        });
        writeln!(log, "{line}").map_err(|e| err(format!("{}: {e}", log_path.display())))?;
        losses.push(stats.loss);
        let mut eval_loss = None;
        if let Some(ev) = &eval {
            if eval_every.is_some_and(|k| session.step % k == 0) || session.step == stop {
                let l = ev.loss(&session.params)?;
                let line = serde_json::json!({
                    "step": session.step,
                    "eval_loss": l,
                    "eval_items": ev.items,
                });
                writeln!(log, "{line}").map_err(|e| err(format!("{}: {e}", log_path.display())))?;
                eval_losses.push((session.step, l));
                eval_loss = Some(l);
            }
        }
        on_step(&Event {
            step: session.step,
            total: session.total_steps,
            stats: &stats,
            examples_per_s: eps,
            eval_loss,
        });
        if save_every.is_some_and(|k| session.step % k == 0) {
            last_ckpt = Some(
                train_ckpt::save_checkpoint(
                    o.out,
                    &session.params,
                    &session.state,
                    &state_of(&session, pos),
                )
                .map_err(|e| err(e.message))?,
            );
        }
    }
    // The final state: a checkpoint (to resume from), the weights, and the adapter alone.
    last_ckpt = Some(
        train_ckpt::save_checkpoint(
            o.out,
            &session.params,
            &session.state,
            &state_of(&session, pos),
        )
        .map_err(|e| err(e.message))?,
    );
    crate::weights::save(&o.out.join("model.safetensors"), &session.params)
        .map_err(|e| err(e.message))?;
    if let Some(l) = &lora {
        train_ckpt::save_peft(
            &o.out.join("adapter"),
            &session.params,
            &session.adapter_params,
            l,
            dropout,
        )
        .map_err(|e| err(e.message))?;
    }
    Ok(Summary {
        steps: session.step,
        total_steps: session.total_steps,
        losses,
        out: o.out.to_path_buf(),
        last_checkpoint: last_ckpt,
        eval_losses,
        skipped: false,
    })
}
