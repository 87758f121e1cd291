//! The training loop behind `vlmc train`: data, steps, the loss log, evaluation, checkpoints,
//! resume. Chains of stages (`from`) are in [`crate::train_stages`].

use crate::adapter::BaseRecord;
use crate::tensor::Tensor;
use crate::train::{Session, StepStats, TrainRunError};
use crate::train_ckpt::{self, AdapterSave, FileId, Fingerprint, TrainerState};
use crate::train_data::{self, Position, Tok};
use crate::train_eval::Evaluator;
use crate::train_folder::{self, FolderLock};
use crate::train_inputs::BatchPlan;
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
    /// What a LoRA adapter names as its base (PEFT's `base_model_name_or_path`): the weights
    /// file the run started from, or the spec when it started from the init rules.
    pub base_name: Option<String>,
    pub out: &'a Path,
    /// Continue from the latest checkpoint in this folder (or this checkpoint folder). It must
    /// be a checkpoint of this run: same trainer, model, data, tokenizer, settings and steps.
    pub resume: Option<&'a Path>,
    /// Override the trainer's step count.
    pub steps: Option<u64>,
    /// Stop (with a checkpoint) after this many steps in total, e.g. to test resuming.
    pub stop_after: Option<u64>,
    /// Evaluation data (JSONL like the training data): its mean loss is computed every
    /// `eval_every` steps and at the last step, and logged as `eval_loss`.
    pub eval_data: Option<&'a Path>,
    /// Do nothing when `out` already holds this run, finished (its latest checkpoint is at the
    /// run's total steps, its fingerprint is this run's, and `model.safetensors` is there):
    /// stages re-run this way.
    pub skip_finished: bool,
    /// Start again when `out` holds an earlier run: delete that run's checkpoints, log, final
    /// weights and adapter first (nothing else in the folder). Without it (or `resume` of
    /// that run), a folder holding a run is refused.
    pub overwrite: bool,
    /// When `out` holds a run that wrote no checkpoint and no weights (only its log: it was
    /// stopped before its first checkpoint), start it again from step 0 (a chain of stages
    /// resumed with `--resume`).
    pub restart_unfinished: bool,
    /// What runs the step and evaluation graphs (default: compiled for the CPU).
    pub backend: crate::train::Backend,
    /// Also write the scalars of each step to a TensorBoard event file in `out/runs/`
    /// (`train/loss`, `train/learning_rate`, `train/grad_norm`, `eval/loss`).
    pub tensorboard: bool,
}

/// One finished step, for progress reporting.
pub struct Event<'a> {
    pub step: u64,
    pub total: u64,
    pub stats: &'a StepStats,
    pub examples_per_s: f64,
    /// The step's time in seconds (data, forward, backward, update; not the evaluation).
    pub seconds: f64,
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

/// The latest checkpoint in `out` when it finishes this run (trainer `trainer`, `total`
/// steps, fingerprint `fp`) and the final `model.safetensors` is beside it.
pub fn finished_run(out: &Path, trainer: &str, total: u64, fp: &Fingerprint) -> Option<PathBuf> {
    let ck = train_ckpt::latest_checkpoint(out).ok()?;
    let st = train_ckpt::read_state(&ck).ok()?;
    (st.trainer == trainer
        && st.step == total
        && st.total_steps == total
        && st.fingerprint.differences(fp).is_empty()
        && out.join("model.safetensors").is_file())
    .then_some(ck)
}

fn err(message: impl Into<String>) -> TrainRunError {
    TrainRunError {
        message: message.into(),
    }
}

/// Why `out`, holding the files `found` of an earlier run, is not written over.
fn refuse_earlier(
    out: &Path,
    found: &[String],
    trainer: &str,
    total: u64,
    fp: &Fingerprint,
) -> String {
    let d = out.display();
    let files = found.join(", ");
    let Some(st) = train_ckpt::latest_checkpoint(out)
        .ok()
        .and_then(|ck| train_ckpt::read_state(&ck).ok())
    else {
        return format!(
            "{d} already holds files of an earlier run ({files}): start again with --overwrite \
             (it deletes them, nothing else), or write to another folder"
        );
    };
    let same = st.trainer == trainer
        && st.total_steps == total
        && st.fingerprint.differences(fp).is_empty();
    let what = format!(
        "trainer `{}`, step {} of {}{}",
        st.trainer,
        st.step,
        st.total_steps,
        if same {
            ""
        } else {
            ", with other settings or data"
        }
    );
    if st.step == st.total_steps {
        format!(
            "{d} already holds a finished run ({what}: {files}): start again with --overwrite \
             (it deletes that run's checkpoints, log and weights), or write to another folder"
        )
    } else {
        format!(
            "{d} already holds an unfinished run ({what}: {files}): continue it with --resume \
             {d}, start again with --overwrite (it deletes that run's checkpoints, log and \
             weights), or write to another folder"
        )
    }
}

/// Rows a token objective cannot learn from: no target token after the first position.
fn check_targets(
    cfg: &TrainConfig,
    path: &Path,
    rows: &[&train_data::Example],
) -> Result<(), TrainRunError> {
    if !cfg.objective.is_token_loss() {
        return Ok(());
    }
    for e in rows {
        if e.mask.iter().skip(1).all(|&m| m == 0.0) {
            return Err(err(format!(
                "{}:{}: the row gives no token to predict: it has {} token(s) and none is a \
                 target after the first (the first predicts nothing{}); give it more text or \
                 remove it",
                path.display(),
                e.line,
                e.ids.len(),
                if cfg.max_len.is_some() {
                    ", and rows are cut to the trainer's `max_len`"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

/// Checks that the longest row of `rows` fits in memory in a batch run by `graph`.
/// How the trainer's rows become examples: its loss mask, `max_len`, where the model's images
/// go in the tokens, and the tokenizer's chat template (tokenizer_config.json beside it).
fn row_format(
    cfg: &TrainConfig,
    plan: &BatchPlan,
    model: &vlmc::elab::Elaborated,
    tok: &Tok,
    tok_dir: &Path,
) -> Result<train_data::RowFormat, TrainRunError> {
    use vlmc::train::Objective;
    let mask = match cfg.objective {
        Objective::Sft {
            assistant_only: true,
            ..
        } => train_data::LossMask::Assistant,
        Objective::Sft {
            prompt_masked: true,
            ..
        } => train_data::LossMask::Prompt,
        // preference rows: the completion (chosen, rejected, or the labelled one) is the target
        Objective::Preference(_) => train_data::LossMask::Prompt,
        _ => train_data::LossMask::None,
    };
    let tc = crate::chat::TokenizerConfig::read(tok_dir).map_err(err)?;
    Ok(train_data::RowFormat {
        mask,
        max_len: cfg.max_len,
        images: plan.image_tokens(model, tok).map_err(|e| err(e.message))?,
        chat: tc.chat_template.clone().map(|t| (t, tc)),
    })
}

/// Every row fits the model's inputs: its images (one per row where the model takes one;
/// none for a model without images; exactly one image and text per row for contrastive
/// objectives).
fn check_rows(
    cfg: &TrainConfig,
    plan: &BatchPlan,
    data: &Path,
    rows: &[&train_data::Example],
) -> Result<(), TrainRunError> {
    use vlmc::train::Objective;
    for e in rows {
        let at = format!("{}:{}", data.display(), e.line);
        plan.check_row(e, &at).map_err(|e| err(e.message))?;
        if matches!(cfg.objective, Objective::Clip | Objective::Siglip) && e.images.len() != 1 {
            return Err(err(format!(
                "{at}: a contrastive objective pairs one image with one text per row; the row \
                 has {} image(s)",
                e.images.len()
            )));
        }
    }
    Ok(())
}

fn check_longest(
    graph: &vlmc::ir::Graph,
    cfg: &TrainConfig,
    path: &Path,
    rows: &[&train_data::Example],
) -> Result<(), TrainRunError> {
    let Some(longest) = rows.iter().copied().max_by_key(|e| e.ids.len()) else {
        return Ok(());
    };
    // A training batch always has `batch` rows (drawn across epochs when the data has fewer).
    let batch = cfg.batch.max(1);
    train_data::check_fits(graph, batch, longest.ids.len()).map_err(|m| {
        err(format!(
            "{}:{}: the row is too long ({} tokens): {m}; shorten it or set `max_len` in \
             trainer `{}`",
            path.display(),
            longest.line,
            longest.ids.len(),
            cfg.name
        ))
    })
}

/// The data position after `rows` examples were drawn (an epoch rolls over only when the
/// next batch needs a row).
fn position_after(rows: u128, n: u128) -> Option<(u128, u128)> {
    if n == 0 {
        return None;
    }
    if rows == 0 {
        return Some((0, 0));
    }
    Some(((rows - 1) / n, (rows - 1) % n + 1))
}

/// Checks that the checkpoint `ck` (read as `l`) continues this run: trainer, fingerprint,
/// step count, data position, and every parameter and optimiser tensor by name and shape.
#[allow(clippy::too_many_arguments)]
fn check_resume(
    ck: &Path,
    l: &train_ckpt::Loaded,
    session: &Session,
    fp: &Fingerprint,
    total: u64,
    steps_flag: Option<u64>,
    rows: usize,
    per_step: usize,
) -> Result<(), TrainRunError> {
    let c = ck.display();
    let name = &session.cfg.name;
    if l.state.trainer != *name {
        return Err(err(format!(
            "{c} is a checkpoint of trainer `{}`, not `{name}`",
            l.state.trainer
        )));
    }
    let diff = l.state.fingerprint.differences(fp);
    if !diff.is_empty() {
        return Err(err(format!(
            "cannot resume from {c}: it is a checkpoint of another run; what differs: {}. \
             Resume with what that run had, or start a new run (--overwrite, or another folder)",
            diff.join("; ")
        )));
    }
    if l.state.total_steps != total {
        return Err(err(match steps_flag {
            Some(s) => format!(
                "--steps {s} disagrees with the checkpoint {c}, whose run is {} steps: resume \
                 with --steps {} (or without --steps)",
                l.state.total_steps, l.state.total_steps
            ),
            None => format!(
                "the checkpoint {c} is of a run of {} steps, but this run is {total} steps: \
                 resume with --steps {}",
                l.state.total_steps, l.state.total_steps
            ),
        }));
    }
    if l.state.seed != session.cfg.seed {
        return Err(err(format!(
            "{c}: the checkpoint's seed is {}, the trainer's {}",
            l.state.seed, session.cfg.seed
        )));
    }
    let p = l.state.position;
    let want = (u128::from(l.state.step))
        .checked_mul(per_step as u128)
        .and_then(|k| position_after(k, rows as u128));
    if want != Some((u128::from(p.epoch), p.index as u128)) {
        return Err(err(format!(
            "{c}/trainer_state.json is inconsistent: after {} steps of {per_step} rows over {rows} \
             rows the data position is {}, but it says epoch {}, index {}",
            l.state.step,
            want.map_or("out of range".to_string(), |(e, i)| format!("epoch {e}, index {i}")),
            p.epoch,
            p.index
        )));
    }
    let same = |file: &str,
                theirs: &BTreeMap<String, Tensor>,
                ours: &BTreeMap<String, Tensor>|
     -> Result<(), TrainRunError> {
        for (k, t) in ours {
            match theirs.get(k) {
                None => {
                    return Err(err(format!("{c}/{file} has no `{k}`")));
                }
                Some(x) if x.shape != t.shape => {
                    return Err(err(format!(
                        "{c}/{file}: `{k}` is {:?}, but the run's is {:?}",
                        x.shape, t.shape
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(k) = theirs.keys().find(|k| !ours.contains_key(*k)) {
            return Err(err(format!(
                "{c}/{file} holds `{k}`, which is not in this run"
            )));
        }
        Ok(())
    };
    if l.adapter_only {
        // The trainable tensors alone; the base is the starting weights (the fingerprint).
        let ours: BTreeMap<String, Tensor> = session
            .trainable
            .iter()
            .map(|p| (p.clone(), session.params[p].clone()))
            .collect();
        same("adapter_model.safetensors", &l.params, &ours)?;
    } else {
        same("model.safetensors", &l.params, &session.params)?;
    }
    same("optimizer.safetensors", &l.optim, &session.state)?;
    Ok(())
}

/// Runs a trainer; `on_step` is called after every optimiser step.
///
/// The output folder is locked for the whole run (a second run into it fails at once, naming
/// the holder). A folder holding an earlier run is refused unless the run resumes it
/// (`resume`) or starts again (`overwrite`); resuming checks that the checkpoint is this
/// run's and cuts `log.jsonl` back to the checkpoint's step.
pub fn train(
    o: &TrainOptions<'_>,
    on_step: &mut dyn FnMut(&Event<'_>),
) -> Result<Summary, TrainRunError> {
    let cfg = TrainConfig::of(o.model, o.trainer).map_err(err)?;
    // The spec's own tokenizer, when the elaborator found it beside the spec.
    let declared = o
        .model
        .preprocess
        .iter()
        .filter(|p| p.kind == "text")
        .find_map(|p| match p.arg("tokenizer") {
            Some(vlmc::elab::Setting::Str(s)) if Path::new(s).is_absolute() => {
                Some(PathBuf::from(s))
            }
            _ => None,
        });
    let tok_path = match o.tokenizer.as_ref().or(declared.as_ref()) {
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
    let tok_dir = tok_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let plan = BatchPlan::of(o.model, &tok, &tok_dir).map_err(|e| err(e.message))?;
    let format = row_format(&cfg, &plan, o.model, &tok, &tok_dir)?;
    let data_bytes = crate::files::read(o.data)
        .map_err(|e| err(format!("cannot read {}: {e}", o.data.display())))?;
    // Read once: parsed here, hashed into the run's fingerprint below.
    let data_text = std::str::from_utf8(&data_bytes)
        .map_err(|e| err(format!("cannot read {}: {e}", o.data.display())))?;
    let rows = crate::train_pref::parse_rows(&cfg, o.data, data_text, &tok, &format)?;
    let examples = rows.examples();
    check_rows(&cfg, &plan, o.data, &examples)?;
    check_targets(&cfg, o.data, &examples)?;
    let n = rows.len();
    let per_step = cfg.batch * cfg.grad_accum;
    let total = o
        .steps
        .or(cfg.steps)
        .unwrap_or_else(|| cfg.epochs.unwrap_or(1) * n.div_ceil(per_step) as u64);
    if total == 0 {
        return Err(err(format!("trainer `{}`: the run has no step", cfg.name)));
    }
    cfg.schedule.check(&cfg.name, total).map_err(err)?;
    let fp = Fingerprint::of(
        o.model,
        &cfg,
        o.weights.as_ref(),
        FileId::of_bytes(o.data, &data_bytes),
        n as u64,
        FileId::read(&tok_path).map_err(|e| err(e.message))?,
    );
    drop(data_bytes);

    // The folder, locked until the run returns; then what is in it.
    let _lock = FolderLock::acquire(o.out).map_err(err)?;
    train_folder::clear_temporary(o.out).map_err(|e| {
        err(format!(
            "{}: cannot remove temporary files: {e}",
            o.out.display()
        ))
    })?;
    if o.skip_finished && !o.overwrite {
        if let Some(ck) = finished_run(o.out, &cfg.name, total, &fp) {
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
    let resume_ck = match o.resume {
        Some(dir) => Some(train_ckpt::latest_checkpoint(dir).map_err(|e| err(e.message))?),
        None => None,
    };
    // Whether the checkpoint resumed is one of `out`'s own.
    let here = resume_ck
        .as_ref()
        .and_then(|ck| ck.parent())
        .is_some_and(|p| train_folder::same_path(p, o.out));
    if let (true, Some(ck)) = (o.overwrite && here, &resume_ck) {
        return Err(err(format!(
            "--overwrite would delete the checkpoint that --resume continues ({}): give one or \
             the other",
            ck.display()
        )));
    }
    let earlier = train_folder::run_files(o.out);
    let clear = if earlier.is_empty() || here {
        false
    } else if o.overwrite
        || (o.restart_unfinished
            && earlier
                .iter()
                .all(|f| f == "log.jsonl" || f == train_folder::RUNS_DIR))
    {
        true
    } else {
        return Err(err(refuse_earlier(o.out, &earlier, &cfg.name, total, &fp)));
    };

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
    {
        let step = session
            .fused
            .as_ref()
            .or(session.grad.as_ref())
            .ok_or_else(|| err("no step graph"))?;
        check_longest(&step.step.graph, &session.cfg, o.data, &examples)?;
    }
    let mut pos = Position { epoch: 0, index: 0 };
    // The last good checkpoint: the one resumed from, until a new one is written.
    let mut last_ckpt: Option<PathBuf> = None;
    if let Some(ck) = &resume_ck {
        let l = train_ckpt::load_checkpoint(ck).map_err(|e| err(e.message))?;
        check_resume(ck, &l, &session, &fp, total, o.steps, n, per_step)?;
        if l.adapter_only {
            session.params.extend(l.params);
        } else {
            session.params = l.params;
        }
        session.state = l.optim;
        session.step = l.state.step;
        session.total_steps = l.state.total_steps;
        pos = l.state.position;
        last_ckpt = Some(ck.clone());
    }
    let eval = match o.eval_data {
        Some(_) if session.pref.is_some() => {
            return Err(err(format!(
                "trainer `{}`: --eval-data is not supported for preference objectives yet                  (the step log has the training batch's reward accuracy)",
                session.cfg.name
            )));
        }
        Some(path) => {
            let rows = train_data::read_rows(path, &tok, &format).map_err(|e| err(e.message))?;
            let refs: Vec<&train_data::Example> = rows.iter().collect();
            check_rows(&session.cfg, &plan, path, &refs)?;
            check_targets(&session.cfg, path, &refs)?;
            let ev = Evaluator::new(o.model, &session.cfg, &rows, &plan, &o.backend)?;
            check_longest(ev.runner.graph(), &session.cfg, path, &refs)?;
            Some(ev)
        }
        None => None,
    };
    if let Some(r) = session.pref.as_ref().and_then(|p| p.reference.as_ref()) {
        let mib = r.extra_bytes() as f64 / (1 << 20) as f64;
        eprintln!(
            "reference policy: {}",
            if r.extra_bytes() == 0 {
                "the base model with the adapter switched off (no extra parameter memory)"
                    .to_string()
            } else {
                format!("a frozen copy of the starting weights ({mib:.1} MiB)")
            }
        );
    }
    // `precompute_ref`: the reference log-probabilities of every row, once, cached beside
    // the run (reused while the run's fingerprint is the same).
    let ref_cache = match &session.pref {
        Some(p) if p.p.precompute_ref => {
            Some(precomputed_ref(o.out, &fp, p, &rows, &plan, &session)?)
        }
        _ => None,
    };

    // Everything is checked: now the folder changes.
    if clear {
        train_folder::clear_run(o.out).map_err(err)?;
    }
    let log_path = o.out.join("log.jsonl");
    match &resume_ck {
        Some(ck) => {
            if here {
                // Checkpoints after the one resumed belong to the history being redone.
                for f in train_folder::run_files(o.out) {
                    let later = train_folder::checkpoint_step(f.trim_end_matches('/'))
                        .is_some_and(|s| s > session.step);
                    if later {
                        let p = o.out.join(f.trim_end_matches('/'));
                        std::fs::remove_dir_all(&p)
                            .map_err(|e| err(format!("cannot delete {}: {e}", p.display())))?;
                    }
                }
            }
            // The log up to the checkpoint (the steps after it run again).
            let src = if log_path.is_file() {
                log_path.clone()
            } else {
                ck.parent().unwrap_or(Path::new(".")).join("log.jsonl")
            };
            train_folder::cut_log(&src, &log_path, session.step).map_err(err)?;
            // The event files likewise (a new file continues them, below).
            let from = ck.parent().unwrap_or(Path::new(".")).join("runs");
            crate::tensorboard::cut_events(&from, &o.out.join("runs"), session.step)
                .map_err(err)?;
        }
        None => {
            crate::weights::write_atomic(&log_path, b"")
                .map_err(|e| err(format!("{}: {e}", log_path.display())))?;
        }
    }
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(|e| err(format!("{}: {e}", log_path.display())))?;
    // One write per line.
    let mut write_line = |v: serde_json::Value| -> Result<(), TrainRunError> {
        log.write_all(format!("{v}\n").as_bytes())
            .map_err(|e| err(format!("{}: {e}", log_path.display())))
    };
    let mut events = match o.tensorboard {
        true => {
            let dir = o.out.join("runs");
            Some(crate::tensorboard::EventWriter::create(&dir).map_err(|e| {
                err(format!(
                    "cannot write an event file in {}: {e}",
                    dir.display()
                ))
            })?)
        }
        false => None,
    };
    let mut event = |step: u64, values: &[(&str, f64)]| -> Result<(), TrainRunError> {
        match &mut events {
            Some(w) => w
                .scalars(step, values)
                .map_err(|e| err(format!("{}: {e}", w.path().display()))),
            None => Ok(()),
        }
    };
    let mut eval_losses = Vec::new();
    let save_every = session.cfg.save_every;
    let state_of = |s: &Session, pos: Position| TrainerState {
        trainer: name.clone(),
        step: s.step,
        total_steps: s.total_steps,
        seed,
        position: pos,
        fingerprint: fp.clone(),
    };
    // An adapter trainer's checkpoints and `adapter/` hold what trains, in the PEFT layout.
    let modules: Vec<String> = session
        .trainable
        .iter()
        .filter(|p| !session.adapter_params.contains(p))
        .cloned()
        .collect();
    let base_paths: Vec<&str> = o
        .model
        .graph
        .params()
        .iter()
        .map(|(_, p, _, _)| *p)
        .collect();
    let base = lora
        .as_ref()
        .map(|_| BaseRecord::of(&session.params, &base_paths, &session.trainable));
    let adapter_params = session.adapter_params.clone();
    let adapter = lora.as_ref().map(|l| AdapterSave {
        adapter_params: &adapter_params,
        modules: &modules,
        lora: l,
        dropout,
        task_type: session.cfg.objective.is_token_loss().then_some("CAUSAL_LM"),
        base_model: o.base_name.as_deref(),
        base: base.as_ref(),
    });
    let save_ckpt = |s: &Session, pos: Position| -> Result<PathBuf, TrainRunError> {
        let ck = train_ckpt::save_checkpoint(
            o.out,
            &s.params,
            &s.state,
            &state_of(s, pos),
            adapter.as_ref(),
        )
        .map_err(|e| err(e.message))?;
        if let Some(k) = s.cfg.save_total_limit {
            train_folder::prune_checkpoints(o.out, k).map_err(err)?;
        }
        Ok(ck)
    };
    let mut losses = Vec::new();
    let stop = o.stop_after.unwrap_or(u64::MAX).min(session.total_steps);
    while session.step < stop {
        let t0 = Instant::now();
        let mut micro = Vec::new();
        for _ in 0..session.cfg.grad_accum {
            let (idx, next) = train_data::next_batch(n, session.cfg.batch, seed, pos);
            pos = next;
            micro.push(rows.batch(&plan, &idx, ref_cache.as_ref())?);
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
        let mut line = serde_json::json!({
            "step": session.step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "items": stats.items,
            "epoch": pos.epoch,
            "examples_per_s": eps,
        });
        // the objective's metrics under TRL's names (`rewards/accuracies`, ...)
        for (k, v) in &stats.metrics {
            line[k.as_str()] = serde_json::json!(v);
        }
        write_line(line)?;
        let tags: Vec<String> = stats
            .metrics
            .iter()
            .map(|(k, _)| format!("train/{k}"))
            .collect();
        let mut scalars = vec![
            ("train/loss", stats.loss),
            ("train/learning_rate", stats.lr),
            ("train/grad_norm", stats.grad_norm),
        ];
        scalars.extend(
            tags.iter()
                .map(String::as_str)
                .zip(stats.metrics.iter().map(|m| m.1)),
        );
        event(session.step, &scalars)?;
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
                write_line(line)?;
                event(session.step, &[("eval/loss", l)])?;
                eval_losses.push((session.step, l));
                eval_loss = Some(l);
            }
        }
        on_step(&Event {
            step: session.step,
            total: session.total_steps,
            stats: &stats,
            examples_per_s: eps,
            seconds: secs,
            eval_loss,
        });
        if save_every.is_some_and(|k| session.step % k == 0) {
            last_ckpt = Some(save_ckpt(&session, pos)?);
        }
    }
    // The final state: a checkpoint (to resume from), the weights, and the adapter alone.
    last_ckpt = Some(save_ckpt(&session, pos)?);
    crate::weights::save(&o.out.join("model.safetensors"), &session.params)
        .map_err(|e| err(e.message))?;
    save_tokenizer(&tok_path, o.out)?;
    if let Some(a) = &adapter {
        train_ckpt::save_peft(&o.out.join("adapter"), &session.params, a)
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

/// The files of the tokenizer a run used, copied beside its weights (as `save_pretrained`
/// does), so the output folder runs and generates on its own: `tokenizer.json`, and the
/// `tokenizer_config.json` / `special_tokens_map.json` beside it when there are such.
pub fn save_tokenizer(tokenizer: &Path, out: &Path) -> Result<(), TrainRunError> {
    let dir = tokenizer.parent().unwrap_or(Path::new("."));
    let files = [
        (tokenizer.to_path_buf(), "tokenizer.json"),
        (dir.join("tokenizer_config.json"), "tokenizer_config.json"),
        (
            dir.join("special_tokens_map.json"),
            "special_tokens_map.json",
        ),
    ];
    for (src, name) in files {
        if name != "tokenizer.json" && !src.is_file() {
            continue;
        }
        let dst = out.join(name);
        if train_folder::same_path(&src, &dst) {
            continue;
        }
        let bytes = crate::files::read(&src)
            .map_err(|e| err(format!("cannot read {}: {e}", src.display())))?;
        crate::weights::write_atomic(&dst, &bytes)
            .map_err(|e| err(format!("{}: {e}", dst.display())))?;
    }
    Ok(())
}

/// The reference log-probabilities of every row (`precompute_ref`): read from
/// `OUT/ref_logps.json` when it was written for this run's fingerprint, else computed in one
/// pass over the data and written there.
fn precomputed_ref(
    out: &Path,
    fp: &Fingerprint,
    p: &crate::train_pref::PrefState,
    rows: &crate::train_pref::Rows,
    plan: &BatchPlan,
    session: &Session,
) -> Result<crate::train_pref::RefCache, TrainRunError> {
    let path = out.join("ref_logps.json");
    let key = serde_json::json!(format!("{fp:?}"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v["fingerprint"] == key {
                if let Ok(c) = serde_json::from_value::<Vec<(f64, f64)>>(v["rows"].clone()) {
                    if c.len() == rows.len() {
                        return Ok(c);
                    }
                }
            }
        }
    }
    let t0 = Instant::now();
    let cache = p.precompute(
        rows,
        plan,
        session.cfg.batch,
        &session.params,
        &mut |_, _| {},
    )?;
    let v = serde_json::json!({ "fingerprint": key, "rows": cache });
    crate::weights::write_atomic(&path, v.to_string().as_bytes())
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    eprintln!(
        "reference log-probabilities of {} rows computed in {:.1} s ({})",
        cache.len(),
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(cache)
}
