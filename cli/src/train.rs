//! `vlmc train` and `vlmc merge`.

use crate::progress::{Mode, Progress};
use std::path::{Path, PathBuf};
use vlmc::elab::Elaborated;

/// `vlmc train FILE --trainer NAME --data D.jsonl [--weights W] -o DIR`.
///
/// A trainer that starts `from` another runs as a chain of stages (each into `DIR/<stage>/`,
/// each from the weights the previous one finished with) unless `--weights` is given: then it
/// alone runs, from those weights.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The .vlm file.
    pub file: PathBuf,
    /// The trainer to run (a `trainer` declaration of the file).
    #[arg(long)]
    pub trainer: String,
    /// Training data: JSONL rows with `text`, `prompt`/`completion` or `messages`, and
    /// `image` paths for vision-language models. `FILE` for every stage, or `STAGE=FILE` for
    /// one stage of a `from` chain (repeatable); a trainer's own `data` setting is used when
    /// no `STAGE=FILE` names it.
    #[arg(long = "data", value_parser = parse_data)]
    pub data: Vec<(Option<String>, PathBuf)>,
    /// Starting weights (files, an index or a folder, as for `vlmc run`; default: the init
    /// rules with the trainer's seed). With them, a trainer that starts `from` another runs
    /// alone instead of as a chain of stages.
    #[arg(long, value_delimiter = ',')]
    pub weights: Vec<PathBuf>,
    /// Evaluation data (JSONL like --data): the mean loss over it every `eval_every` steps and
    /// at the end, logged as `eval_loss`.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// The tokenizer.json (default: beside the data, then beside the weights).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Continue from the latest checkpoint in this folder (for a chain of stages: the chain's
    /// folder; each unfinished stage continues from its latest checkpoint in DIR/<stage>/).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Override the trainer's number of steps (every stage's, for a chain).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Override the warm-up of every stage's schedule: N steps (0: none), e.g. for a short
    /// trial of a recipe whose warm-up is longer than the run.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Stop after this many steps in total (a checkpoint is written; resume with --resume).
    /// In a chain, the stage it stops stays unfinished and the later stages do not run.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Start again in an output folder that holds an earlier run: delete that run's
    /// checkpoints, log.jsonl, model.safetensors, adapter/ and runs/ event files first
    /// (nothing else). Without
    /// it, such a folder is refused unless --resume continues the run.
    #[arg(long)]
    pub overwrite: bool,
    /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
    #[arg(long = "set", value_parser = crate::parse_set)]
    pub sets: Vec<(String, String)>,
    /// Output folder: log.jsonl, checkpoint-N/, model.safetensors, adapter/ (LoRA), runs/
    /// (TensorBoard, with --report-to tensorboard).
    #[arg(short, long)]
    pub out: PathBuf,
    /// No progress bar (one line per step on stderr instead).
    #[arg(long)]
    pub quiet: bool,
    /// When stderr is not a terminal (a CI log, `2> file`): a progress line every N steps
    /// (and at least every 5 s while steps complete). Default: the trainer's `log_every`, 10
    /// when it sets none.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub log_every: Option<u64>,
    /// Also report the scalars of each step to: `tensorboard` (an event file in DIR/runs/:
    /// train/loss, train/learning_rate, train/grad_norm, eval/loss), or `none`.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "TO")]
    pub report_to: Vec<ReportTo>,
    /// Run the training steps on the reference interpreter instead of compiled CPU code.
    #[arg(long)]
    pub interp: bool,
    /// Do not use the disk cache of compiled CPU kernels (also: VLMC_NO_CACHE=1).
    #[arg(long)]
    pub no_cache: bool,
}

/// Where `--report-to` sends the scalars of each step.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportTo {
    /// A TensorBoard event file in `DIR/runs/` (each stage's folder for a chain).
    Tensorboard,
    /// Nowhere but log.jsonl.
    None,
}

impl TrainArgs {
    fn tensorboard(&self) -> bool {
        self.report_to.contains(&ReportTo::Tensorboard)
    }

    /// How progress shows for trainer `name`.
    fn mode(&self, m: &Elaborated, name: &str) -> Mode {
        let every = self.log_every.unwrap_or_else(|| {
            vlmc::train::TrainConfig::of(m, name)
                .map_or(vlmc::train::DEFAULT_LOG_EVERY, |c| c.log_every)
        });
        Mode::detect(self.quiet, every)
    }
}

/// `vlmc merge FILE --adapter DIR --weights W -o OUT`.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The .vlm file of the base model.
    pub file: PathBuf,
    /// A LoRA adapter in the PEFT layout (adapter_model.safetensors, adapter_config.json).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base weights (files, an index or a folder, as for `vlmc run`).
    #[arg(long, required = true, value_delimiter = ',')]
    pub weights: Vec<PathBuf>,
    /// Merge even into weights other than the base the adapter records (vlmc_base.json).
    #[arg(long)]
    pub allow_other_base: bool,
    /// Which model of the file (default: the last one).
    #[arg(long)]
    pub model: Option<String>,
    /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
    #[arg(long = "set", value_parser = crate::parse_set)]
    pub sets: Vec<(String, String)>,
    /// The merged weights (safetensors, with the base file's tensor names).
    #[arg(short, long)]
    pub out: PathBuf,
}

/// `--data FILE` or `--data STAGE=FILE` (a stage name is an identifier; a path with `=` in
/// it is given as `./a=b.jsonl`).
fn parse_data(s: &str) -> Result<(Option<String>, PathBuf), String> {
    match s.split_once('=') {
        Some((stage, file))
            if !stage.is_empty()
                && stage.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            if file.is_empty() {
                return Err(format!("`--data {stage}=`: give the file after `=`"));
            }
            Ok((Some(stage.to_string()), PathBuf::from(file)))
        }
        _ => Ok((None, PathBuf::from(s))),
    }
}

/// The data file of each stage: `--data STAGE=FILE`, else the trainer's `data` setting, else
/// `--data FILE`. A stage without data, or a `STAGE=` naming no stage of the run, is an error.
pub fn stage_data(
    a: &TrainArgs,
    m: &Elaborated,
    stages: &[String],
) -> Result<std::collections::BTreeMap<String, PathBuf>, String> {
    let mut all: Option<&PathBuf> = None;
    for (stage, file) in &a.data {
        match stage {
            Some(s) if !stages.contains(s) => {
                return Err(format!(
                    "`--data {s}=...`: `{s}` is not a stage of this run (stages: {})",
                    stages.join(", ")
                ))
            }
            Some(_) => {}
            None if all.is_some() => {
                return Err(
                    "--data FILE is given twice: give one file for every stage, or STAGE=FILE \
                     per stage"
                        .into(),
                )
            }
            None => all = Some(file),
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for name in stages {
        let named = a
            .data
            .iter()
            .rev()
            .find(|(s, _)| s.as_deref() == Some(name.as_str()))
            .map(|(_, f)| f.clone());
        let own = vlmc::train::TrainConfig::of(m, name)?.data;
        let Some(file) = named.or(own).or_else(|| all.cloned()) else {
            return Err(format!(
                "stage `{name}` has no training data: give --data FILE, --data {name}=FILE, or \
                 a `data \"FILE\"` setting in the trainer"
            ));
        };
        out.insert(name.clone(), file);
    }
    Ok(out)
}

/// `--warmup-steps N`: the trainer's schedule warms up for `n` steps (its own `warmup`,
/// `warmup_steps` or `warmup_ratio` replaced); a trainer without a schedule gets a constant one.
fn set_warmup(t: &mut vlmc::elab::TrainerInfo, n: u64) {
    use vlmc::elab::Setting;
    let warm = ("warmup".to_string(), Setting::Int(n as i64));
    match t.settings.iter_mut().find(|(k, _)| k == "schedule") {
        Some((_, Setting::Call(_, args))) => {
            args.retain(|(k, _)| !k.starts_with("warmup"));
            args.push(warm);
        }
        Some((_, s @ Setting::Symbol(_))) => {
            let Setting::Symbol(name) = s.clone() else {
                return;
            };
            *s = Setting::Call(name, vec![warm]);
        }
        _ => t.settings.push((
            "schedule".into(),
            Setting::Call("constant".into(), vec![warm]),
        )),
    }
}

fn fail(e: impl std::fmt::Display) -> u8 {
    eprintln!("error: {e}");
    1
}

fn models(file: &Path, sets: &[(String, String)]) -> Result<Vec<Elaborated>, u8> {
    let checked = vlmc::elab::check_file_with(file, sets);
    if checked.result.is_err() {
        eprint!("{}", checked.render());
        return Err(1);
    }
    Ok(checked.result.unwrap_or_default())
}

fn bind(m: &Elaborated, weights: &[PathBuf]) -> Result<vlmc_runtime::weights::Bound, u8> {
    let wf = vlmc_runtime::weight_set::WeightSet::open(weights).map_err(fail)?;
    vlmc_runtime::weights::bind(&m.graph, &wf, &m.checkpoint).map_err(fail)
}

fn report(name: &str, s: &vlmc_runtime::train_loop::Summary, secs: f64) {
    if s.skipped {
        eprintln!(
            "`{name}` already finished in {} ({}): skipped",
            s.out.display(),
            s.last_checkpoint
                .as_ref()
                .map_or("no checkpoint".into(), |p| p.display().to_string())
        );
        return;
    }
    eprintln!(
        "trained `{}` for {} steps in {:.1} s; wrote {} (log.jsonl, model.safetensors{}; last checkpoint {}){}",
        name,
        s.steps,
        secs,
        s.out.display(),
        if s.out.join("adapter").is_dir() {
            ", adapter/"
        } else {
            ""
        },
        s.last_checkpoint
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
        s.eval_losses
            .last()
            .map_or(String::new(), |(k, l)| format!("; eval loss {l:.4} at step {k}"))
    );
}

/// What runs the graphs: compiled CPU code (with the disk cache of kernels), or the
/// interpreter with `--interp`.
fn backend(a: &TrainArgs) -> vlmc_runtime::train::Backend {
    match a.interp {
        true => vlmc_runtime::train::Backend::Interp,
        false => vlmc_runtime::train::Backend::Cpu(crate::cpu_options(a.no_cache)),
    }
}

/// Runs `vlmc train`.
pub fn train(a: &TrainArgs) -> Result<(), u8> {
    let mut all = models(&a.file, &a.sets)?;
    if let Some(n) = a.warmup_steps {
        for m in &mut all {
            for t in &mut m.trainers {
                set_warmup(t, n);
            }
        }
    }
    let Some(m) = all
        .iter()
        .find(|m| m.trainers.iter().any(|t| t.name == a.trainer))
    else {
        let names: Vec<String> = all
            .iter()
            .flat_map(|m| m.trainers.iter().map(|t| t.name.clone()))
            .collect();
        return Err(fail(format!(
            "{} has no trainer `{}` (trainers: {})",
            a.file.display(),
            a.trainer,
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        )));
    };
    let stages = if a.weights.is_empty() {
        vlmc_runtime::train_stages::chain(m, &a.trainer).map_err(fail)?
    } else {
        vec![a.trainer.clone()]
    };
    let data = stage_data(a, m, &stages).map_err(fail)?;
    crate::check_train_paths(a, &stages, &data)?;
    for name in &stages {
        let cfg = vlmc::train::TrainConfig::of(m, name).map_err(fail)?;
        if let Some(w) = vlmc_runtime::train_loop::eval_warning(&cfg, a.eval_data.as_deref()) {
            eprintln!("warning: {w}");
        }
    }
    if stages.len() > 1 {
        return train_chain(a, m, &stages, &data);
    }
    let weights = match a.weights.is_empty() {
        false => {
            let b = bind(m, &a.weights)?;
            crate::adapter::refuse_for_training(&a.file, &a.weights, &b).map_err(fail)?;
            Some(b.params)
        }
        true => None,
    };
    let opts = vlmc_runtime::train_loop::TrainOptions {
        model: m,
        trainer: &a.trainer,
        data: &data[&a.trainer],
        tokenizer: a.tokenizer.clone(),
        weights,
        weights_dir: (!a.weights.is_empty())
            .then(|| vlmc_runtime::weight_set::tokenizer_dir(&a.weights)),
        base_name: Some(match a.weights.is_empty() {
            false => crate::adapter::shown(&a.weights),
            true => a.file.display().to_string(),
        }),
        out: &a.out,
        resume: a.resume.as_deref(),
        steps: a.steps,
        stop_after: a.stop_after,
        eval_data: a.eval_data.as_deref(),
        skip_finished: false,
        overwrite: a.overwrite,
        restart_unfinished: false,
        backend: backend(a),
        tensorboard: a.tensorboard(),
    };
    let mut progress = Progress::new(a.mode(m, &a.trainer));
    let t0 = std::time::Instant::now();
    let result = vlmc_runtime::train_loop::train(&opts, &mut |ev| progress.step(ev));
    progress.finish(false);
    let s = result.map_err(fail)?;
    report(&a.trainer, &s, t0.elapsed().as_secs_f64());
    if a.tensorboard() {
        eprintln!(
            "TensorBoard event file in {}: tensorboard --logdir {}",
            a.out.join("runs").display(),
            a.out.display()
        );
    }
    Ok(())
}

/// Runs the stages of a `from` chain in order, each into `OUT/<stage>/`.
fn train_chain(
    a: &TrainArgs,
    m: &Elaborated,
    stages: &[String],
    data: &std::collections::BTreeMap<String, PathBuf>,
) -> Result<(), u8> {
    use vlmc_runtime::train_stages::{train_stages, StageEvent, StagesOptions};
    eprintln!(
        "`{}` starts from earlier stages: running {} stages ({}) into {}/<stage>/",
        a.trainer,
        stages.len(),
        stages.join(" → "),
        a.out.display()
    );
    let opts = StagesOptions {
        model: m,
        spec: Some(&a.file),
        trainer: &a.trainer,
        data,
        tokenizer: a.tokenizer.clone(),
        eval_data: a.eval_data.as_deref(),
        out: &a.out,
        resume: a.resume.as_deref(),
        steps: a.steps,
        stop_after: a.stop_after,
        overwrite: a.overwrite,
        backend: backend(a),
        tensorboard: a.tensorboard(),
    };
    let mut progress: Option<Progress> = None;
    let mut t0 = std::time::Instant::now();
    let result = train_stages(&opts, &mut |ev| match ev {
        StageEvent::Start {
            index,
            count,
            name,
            out,
            from,
            resume,
        } => {
            eprintln!(
                "stage {}/{count}: `{name}` into {}, {}",
                index + 1,
                out.display(),
                match (resume, from) {
                    (Some(r), _) =>
                        format!("continuing from the latest checkpoint in {}", r.display()),
                    (None, Some(f)) => format!("from {}", f.join("model.safetensors").display()),
                    (None, None) => "from the init rules".to_string(),
                }
            );
            progress = Some(Progress::new(a.mode(m, name)));
            t0 = std::time::Instant::now();
        }
        StageEvent::Step(e) => {
            if let Some(p) = &mut progress {
                p.step(e);
            }
        }
        StageEvent::Done { name, summary, .. } => {
            if let Some(mut p) = progress.take() {
                p.finish(true);
            }
            report(name, summary, t0.elapsed().as_secs_f64());
        }
    });
    if let Some(mut p) = progress.take() {
        p.finish(false);
    }
    let done = result.map_err(fail)?;
    if a.tensorboard() {
        eprintln!(
            "TensorBoard event files in {}/<stage>/runs/: tensorboard --logdir {} (a run per stage)",
            a.out.display(),
            a.out.display()
        );
    }
    if done.len() < stages.len() {
        let (name, s) = done.last().expect("a stage ran");
        eprintln!(
            "stopped in stage `{name}` at step {} of {}; continue with --resume {}",
            s.steps,
            s.total_steps,
            a.out.display()
        );
    }
    Ok(())
}

/// Runs `vlmc merge`: folds a PEFT LoRA adapter into the base weights with the LoRA-merge pass.
pub fn merge(a: &MergeArgs) -> Result<(), u8> {
    crate::check_merge_paths(a)?;
    let all = models(&a.file, &a.sets)?;
    let m = match &a.model {
        Some(n) => all.iter().find(|m| &m.model == n),
        None => all.last(),
    }
    .ok_or_else(|| fail("no such model"))?;
    let bound = bind(m, &a.weights)?;
    let peft = crate::adapter::load(m, &a.adapter, &bound.params, &a.weights, a.allow_other_base)
        .map_err(fail)?;
    let wf = vlmc_runtime::weight_set::WeightSet::open(&a.weights).map_err(fail)?;
    // A training output's own LoRA tensors (the adapter's) are left out of the merged file.
    let lora = crate::adapter::check_lora_tensors(&a.file, &a.weights, &wf, &bound, Some(&peft), m)
        .map_err(fail)?;
    let merged =
        vlmc_runtime::train_ckpt::merge_lora(&m.graph, &bound.params, &peft).map_err(fail)?;
    // Keep the base file's names: every tensor is copied, the merged ones replaced.
    let mut out = std::collections::BTreeMap::new();
    let mut replaced = 0;
    for name in wf.names().into_iter().filter(|n| !lora.contains(n)) {
        let t = wf.get(&name).map_err(fail)?;
        let path = vlmc_runtime::weights::map_name(&name, &m.checkpoint);
        match path.as_ref().and_then(|p| merged.get(p)) {
            Some(new) => {
                out.insert(name, new.clone());
                replaced += 1;
            }
            None => {
                out.insert(name, t);
            }
        }
    }
    if replaced != merged.len() {
        let placed: Vec<String> = wf
            .names()
            .iter()
            .filter_map(|n| vlmc_runtime::weights::map_name(n, &m.checkpoint))
            .collect();
        let missing: Vec<&String> = merged.keys().filter(|p| !placed.contains(p)).collect();
        return Err(fail(format!(
            "{} has no tensor for the merged {}: nothing written",
            wf.label(),
            missing
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    vlmc_runtime::weights::save(&a.out, &out).map_err(fail)?;
    eprintln!(
        "merged {} LoRA targets (rank {}, scale {}){} into {} of {} tensors: wrote {}",
        peft.targets.len(),
        peft.lora.rank,
        peft.lora.scale(),
        if peft.modules.is_empty() {
            String::new()
        } else {
            format!(" and {} saved module tensor(s)", peft.modules.len())
        },
        replaced,
        out.len(),
        a.out.display()
    );
    Ok(())
}
