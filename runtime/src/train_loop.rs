//! The training loop behind `vlmc train`: data, steps, the loss log, checkpoints, resume.

use crate::tensor::Tensor;
use crate::train::{Session, StepStats, TrainRunError};
use crate::train_ckpt::{self, TrainerState};
use crate::train_data::{self, Position, Tok};
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
}

/// One finished step, for progress reporting.
pub struct Event<'a> {
    pub step: u64,
    pub total: u64,
    pub stats: &'a StepStats,
    pub examples_per_s: f64,
}

/// What a run did.
pub struct Summary {
    pub steps: u64,
    pub losses: Vec<f64>,
    pub out: PathBuf,
    pub last_checkpoint: Option<PathBuf>,
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
    let params = match &o.weights {
        Some(w) => w.clone(),
        None => crate::init::init_params(&o.model.graph, cfg.seed).map_err(|e| err(e.message))?,
    };
    let seed = cfg.seed;
    let name = cfg.name.clone();
    let lora = cfg.lora();
    let dropout = cfg
        .adapter
        .as_ref()
        .and_then(|a| a.args.iter().find(|(k, _)| k == "dropout"))
        .and_then(|(_, v)| match v {
            vlmc::elab::Setting::Float(f) => Some(*f),
            vlmc::elab::Setting::Int(i) => Some(*i as f64),
            _ => None,
        })
        .unwrap_or(0.0);
    let mut session = Session::new(o.model, cfg, params, total)?;
    let mut pos = Position { epoch: 0, index: 0 };
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
    let mut last_ckpt: Option<PathBuf> = None;
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
        on_step(&Event {
            step: session.step,
            total: session.total_steps,
            stats: &stats,
            examples_per_s: eps,
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
        losses,
        out: o.out.to_path_buf(),
        last_checkpoint: last_ckpt,
    })
}
