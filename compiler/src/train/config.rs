//! A trainer declaration read into typed settings, with the defaults of the reference
//! implementations (PyTorch's AdamW and SGD, Hugging Face's schedules).

use crate::elab::{AdapterInfo, Elaborated, Setting, TrainerInfo};

/// What a trainer minimises.
#[derive(Clone, Debug, PartialEq)]
pub enum Objective {
    /// Next-token cross-entropy on completion tokens (prompt and padding masked), normalised
    /// by the number of target tokens (TRL `SFTTrainer`). `prompt_masked: false` trains on
    /// every real token; `assistant_only`: every assistant turn of `messages` rows (TRL's
    /// `assistant_only_loss`).
    Sft {
        prompt_masked: bool,
        assistant_only: bool,
    },
    /// Plain language modelling: every real token is a target.
    Pretrain,
    /// CLIP's symmetric InfoNCE over `logits_per_image`; `logit_scale` clamped to
    /// `[0, ln 100]` after each step (open_clip).
    Clip,
    /// SigLIP's pairwise sigmoid loss over `logits_per_image` (scale and bias learnable).
    Siglip,
    /// BLIP-2 image-text contrastive loss over `sim_i2t` (label smoothing 0.1, LAVIS).
    Itc,
    /// Image-text matching: cross-entropy of `itm_logits` against `itm_labels` (BLIP-2's
    /// positives and mined negatives, LXMERT's `matched_label`).
    Itm,
    /// BLIP-2 image-grounded text generation over `itg_logits` (label smoothing 0.1, the mean
    /// over the caption's target tokens).
    Itg,
    /// BLIP-2 stage 1: ITC + ITM + ITG (LAVIS `blip2_qformer`).
    Blip2Stage1,
    /// A preference, reward or process-reward objective (TRL's DPO family, CPO/SimPO, ORPO,
    /// KTO, reward modelling, PRM, or a user's `.vlm` function): see
    /// [`crate::train::preference`].
    Preference(Preference),
}

/// How the rows of a preference objective's batch are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefData {
    /// Pairs: the model runs on the chosen and on the rejected sequences.
    Pairs,
    /// Rows with a desirable/undesirable label (KTO).
    Labeled,
    /// Rows with a class label at some tokens (PRM).
    Steps,
}

/// Which trainer family (it decides the metrics TRL logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefFamily {
    Dpo,
    Cpo,
    Orpo,
    Kto,
    Reward,
    Prm,
    /// A user's `.vlm` function over the pair quantities.
    Custom,
}

/// A preference objective: a `.vlm` loss expression over per-pair quantities, and what its
/// trainer needs around it.
#[derive(Clone, Debug, PartialEq)]
pub struct Preference {
    pub family: PrefFamily,
    pub data: PrefData,
    /// The loss: a `.vlm` expression over the quantities of [`crate::train::preference`].
    pub expr: String,
    /// `use` lines the expression needs beyond `std.preference`.
    pub uses: Vec<String>,
    /// The folder user modules are imported from (the spec's), for a custom objective.
    pub dir: Option<std::path::PathBuf>,
    /// Whether it reads a frozen reference policy's log-probabilities.
    pub reference: bool,
    /// β (the rewards logged are β · logratio, or β · logp without a reference).
    pub beta: f64,
    /// LD-DPO: the weight of the longer completion's tail tokens.
    pub ld_alpha: Option<f64>,
    /// The policy log-probabilities are means over completion tokens (CPO's ipo/simpo, ORPO).
    pub average_logps: bool,
    /// AlphaPO's α (CPO): rewards are (1 − p^(−α)) / α of the (mean) log-probabilities.
    pub alphapo: f64,
    /// Reference log-probabilities computed once before training and cached on disk.
    pub precompute_ref: bool,
    /// KTO's loss type needs the KL estimate from mismatched completions.
    pub kl: bool,
    /// PRM: the step separator and whether only the last step is labelled.
    pub step_separator: String,
    pub last_step_only: bool,
    /// The f-divergence's score of a logratio, a `.vlm` expression with `{}` for it.
    pub fdiv: String,
}

impl Objective {
    /// The `std.losses` function the step graph calls, and whether it is a sum over target
    /// tokens (normalised by the driver) rather than a mean.
    pub fn loss_fn(&self) -> (&'static str, bool) {
        match self {
            Objective::Sft { .. } | Objective::Pretrain => ("next_token_nll_sum", true),
            Objective::Clip => ("clip_loss", false),
            Objective::Siglip => ("siglip_loss", false),
            Objective::Itc => ("itc_loss", false),
            Objective::Itm => ("itm_loss", false),
            Objective::Itg => ("itg_loss", false),
            Objective::Blip2Stage1 => ("blip2_stage1_loss", false),
            Objective::Preference(_) => ("preference", false),
        }
    }

    /// The model outputs the loss function reads, in its argument order (before `ids` and
    /// `loss_mask` when [`Objective::reads_tokens`]); `None` for the objectives that find
    /// their output by type (token losses: `logits`; contrastive: `logits_per_image`).
    pub fn outputs(&self) -> Option<&'static [&'static str]> {
        match self {
            Objective::Itc => Some(&["sim_i2t"]),
            Objective::Itm => Some(&["itm_logits", "itm_labels"]),
            Objective::Itg => Some(&["itg_logits"]),
            Objective::Blip2Stage1 => Some(&["sim_i2t", "itm_logits", "itm_labels", "itg_logits"]),
            _ => None,
        }
    }

    /// Whether the loss function reads `ids` and `loss_mask` (as its last two arguments).
    pub fn reads_tokens(&self) -> bool {
        self.is_token_loss() || matches!(self, Objective::Itg | Objective::Blip2Stage1)
    }

    /// Parameters clamped after each update: (last path component, low, high).
    pub fn clamps(&self) -> Vec<(&'static str, f64, f64)> {
        match self {
            Objective::Clip | Objective::Siglip => vec![("logit_scale", 0.0, 100f64.ln())],
            Objective::Itc | Objective::Blip2Stage1 => vec![("temp", 0.001, 0.5)],
            _ => vec![],
        }
    }

    /// Whether the objective reads token ids and a loss mask.
    pub fn is_token_loss(&self) -> bool {
        matches!(self, Objective::Sft { .. } | Objective::Pretrain)
    }
}

/// The optimiser family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    AdamW,
    Adam,
    Sgd,
}

/// Optimiser hyperparameters (PyTorch's defaults where the trainer gives none).
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
}

impl Optimizer {
    /// The per-parameter state slots the optimiser keeps (`m`, `v` for Adam; `m` for SGD with
    /// momentum).
    pub fn slots(&self) -> Vec<&'static str> {
        match self.kind {
            OptimizerKind::AdamW | OptimizerKind::Adam => vec!["m", "v"],
            OptimizerKind::Sgd if self.momentum != 0.0 => vec!["m"],
            OptimizerKind::Sgd => vec![],
        }
    }
}

/// Learning-rate schedule shapes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// A learning-rate schedule: linear warm-up from 0, then the shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Warm-up steps (`warmup` or `warmup_steps`); when 0, `warmup_ratio` of the run.
    pub warmup: u64,
    /// The fraction of the run's steps that warm up (transformers' `warmup_ratio`).
    pub warmup_ratio: f64,
    pub min_lr: f64,
}

impl Schedule {
    /// The warm-up steps of a run of `total` steps: `warmup` when set, else
    /// ⌈total · warmup_ratio⌉ as transformers' `get_warmup_steps`.
    pub fn warmup_steps(&self, total: u64) -> u64 {
        if self.warmup > 0 {
            return self.warmup;
        }
        (total as f64 * self.warmup_ratio).ceil() as u64
    }

    /// A warm-up longer than the run never reaches the peak learning rate: an error.
    pub fn check(&self, trainer: &str, total: u64) -> Result<(), String> {
        let w = self.warmup_steps(total);
        if w > total {
            return Err(format!(
                "trainer `{trainer}`: the warm-up ({w} steps) is longer than the run ({total} \
                 steps): shorten the warm-up (`warmup_steps` or `warmup_ratio`) or train longer"
            ));
        }
        Ok(())
    }

    /// The learning rate at optimiser step `step` (0-based) of `total`, for peak `lr`, as
    /// Hugging Face's `get_{constant,linear,cosine}_schedule_with_warmup` (cosine with a floor
    /// at `min_lr`, as `cosine_with_min_lr`).
    pub fn lr_at(&self, lr: f64, step: u64, total: u64) -> f64 {
        let warmup = self.warmup_steps(total);
        if step < warmup {
            return lr * step as f64 / warmup.max(1) as f64;
        }
        let rest = total.saturating_sub(warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / rest;
        match self.kind {
            ScheduleKind::Constant => lr,
            ScheduleKind::Linear => lr * (1.0 - progress).max(0.0),
            ScheduleKind::Cosine => {
                let f = (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0);
                self.min_lr + (lr - self.min_lr) * f
            }
        }
    }
}

/// Steps between progress lines when the trainer sets no `log_every` (Hugging Face's
/// `logging_steps` is 500; training runs here are shorter).
pub const DEFAULT_LOG_EVERY: u64 = 10;

/// A trainer, read.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub name: String,
    pub objective: Objective,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub batch: usize,
    pub steps: Option<u64>,
    pub epochs: Option<u64>,
    pub seed: u64,
    pub grad_accum: usize,
    pub clip_grad: Option<f64>,
    pub eval_every: Option<u64>,
    pub save_every: Option<u64>,
    /// Steps between progress lines when stderr is not a terminal (`log_every`, default
    /// [`DEFAULT_LOG_EVERY`]); it changes nothing the run computes.
    pub log_every: u64,
    /// Keep only the newest this many checkpoints (transformers' `save_total_limit`).
    pub save_total_limit: Option<u64>,
    pub max_len: Option<usize>,
    /// The trainer's own data file (`data "..."`, resolved beside the spec).
    pub data: Option<std::path::PathBuf>,
    /// The adapter the trainer trains, if any.
    pub adapter: Option<AdapterInfo>,
    /// The trainer whose result this one starts from.
    pub from: Option<String>,
    /// Base-model parameters that train (the adapter's own parameters are added when it is
    /// applied).
    pub trainable: Vec<String>,
}

pub(crate) fn num(s: &Setting) -> Option<f64> {
    match s {
        Setting::Int(i) => Some(*i as f64),
        Setting::Float(f) => Some(*f),
        _ => None,
    }
}

pub(crate) fn call(s: &Setting) -> (&str, &[(String, Setting)]) {
    match s {
        Setting::Call(n, a) => (n.as_str(), a.as_slice()),
        Setting::Symbol(n) => (n.as_str(), &[]),
        _ => ("", &[]),
    }
}

pub(crate) fn arg<'a>(args: &'a [(String, Setting)], k: &str) -> Option<&'a Setting> {
    args.iter().find(|(n, _)| n == k).map(|(_, v)| v)
}

impl TrainConfig {
    /// Reads the trainer `name` of `model`.
    pub fn of(model: &Elaborated, name: &str) -> Result<TrainConfig, String> {
        let t = model
            .trainers
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = model.trainers.iter().map(|t| t.name.as_str()).collect();
                format!(
                    "model `{}` has no trainer `{name}` (it has: {})",
                    model.model,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )
            })?;
        TrainConfig::from_info(t, &model.adapters)
    }

    /// Reads a checked trainer.
    pub fn from_info(t: &TrainerInfo, adapters: &[AdapterInfo]) -> Result<TrainConfig, String> {
        let get = |k: &str| t.settings.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let int = |k: &str| get(k).and_then(num).map(|v| v as u64);
        let none = Setting::Symbol(String::new());
        let (oname, oargs) = call(get("objective").unwrap_or(&none));
        let objective = match oname {
            "sft" => {
                let mask = match arg(oargs, "mask") {
                    Some(Setting::Symbol(s)) => s.as_str(),
                    _ => "prompt",
                };
                Objective::Sft {
                    prompt_masked: mask != "none",
                    assistant_only: mask == "assistant",
                }
            }
            "pretrain" => Objective::Pretrain,
            "clip" => Objective::Clip,
            "siglip" => Objective::Siglip,
            "itc" => Objective::Itc,
            "itm" => Objective::Itm,
            "itg" => Objective::Itg,
            "blip2_stage1" => Objective::Blip2Stage1,
            "dpo" | "ipo" | "mpo" | "cpo" | "simpo" | "orpo" | "kto" | "reward" | "prm" => {
                Objective::Preference(crate::train::preference::read(oname, oargs)?)
            }
            other if matches!(get("objective_module"), Some(Setting::Str(_))) => {
                let r = match get("objective_module") {
                    Some(Setting::Str(r)) => r.as_str(),
                    _ => "",
                };
                Objective::Preference(crate::train::preference::custom(other, oargs, r)?)
            }
            other => {
                return Err(format!(
                    "trainer `{}`: objective `{other}` is not implemented yet (implemented: sft, pretrain, clip, siglip, itc, itm, itg, blip2_stage1, dpo, ipo, mpo, cpo, simpo, orpo, kto, reward, prm)",
                    t.name
                ))
            }
        };
        let (pname, pargs) = call(get("optimizer").unwrap_or(&none));
        let kind = match pname {
            "adam" => OptimizerKind::Adam,
            "sgd" => OptimizerKind::Sgd,
            _ => OptimizerKind::AdamW,
        };
        let p = |k: &str, d: f64| arg(pargs, k).and_then(num).unwrap_or(d);
        let lr = arg(pargs, "lr")
            .and_then(num)
            .or_else(|| get("lr").and_then(num))
            .unwrap_or(1e-3);
        let optimizer = Optimizer {
            kind,
            lr,
            beta1: p("beta1", 0.9),
            beta2: p("beta2", 0.999),
            eps: p("eps", 1e-8),
            weight_decay: p(
                "weight_decay",
                if kind == OptimizerKind::AdamW {
                    0.01
                } else {
                    0.0
                },
            ),
            momentum: p("momentum", 0.0),
            nesterov: matches!(arg(pargs, "nesterov"), Some(Setting::Bool(true))),
        };
        let (sname, sargs) = call(get("schedule").unwrap_or(&none));
        let schedule = Schedule {
            kind: match sname {
                "linear" => ScheduleKind::Linear,
                "cosine" => ScheduleKind::Cosine,
                _ => ScheduleKind::Constant,
            },
            warmup: arg(sargs, "warmup")
                .or_else(|| arg(sargs, "warmup_steps"))
                .and_then(num)
                .unwrap_or(0.0) as u64,
            warmup_ratio: arg(sargs, "warmup_ratio").and_then(num).unwrap_or(0.0),
            min_lr: arg(sargs, "min_lr").and_then(num).unwrap_or(0.0),
        };
        let adapter = match get("adapter") {
            Some(Setting::Symbol(a)) => Some(
                adapters
                    .iter()
                    .find(|x| &x.name == a)
                    .cloned()
                    .ok_or_else(|| format!("no adapter `{a}`"))?,
            ),
            _ => None,
        };
        if let Some(a) = &adapter {
            if a.method != "lora" {
                return Err(format!(
                    "trainer `{}`: adapter `{}` is `{}`; only LoRA adapters train so far",
                    t.name, a.name, a.method
                ));
            }
            let p = adapter_dropout(a);
            if !(0.0..1.0).contains(&p) {
                return Err(format!(
                    "trainer `{}`: adapter `{}` has dropout {p}; it must be in [0, 1)",
                    t.name, a.name
                ));
            }
        }
        Ok(TrainConfig {
            name: t.name.clone(),
            objective,
            optimizer,
            schedule,
            batch: int("batch").unwrap_or(8).max(1) as usize,
            steps: int("steps"),
            epochs: int("epochs"),
            seed: int("seed").unwrap_or(0),
            grad_accum: int("grad_accum").unwrap_or(1).max(1) as usize,
            clip_grad: get("clip_grad").and_then(num),
            eval_every: int("eval_every"),
            save_every: int("save_every"),
            log_every: int("log_every").unwrap_or(DEFAULT_LOG_EVERY).max(1),
            save_total_limit: int("save_total_limit"),
            max_len: int("max_len").map(|v| v as usize),
            data: match get("data") {
                Some(Setting::Str(s)) => Some(s.into()),
                _ => None,
            },
            adapter,
            from: match get("from") {
                Some(Setting::Symbol(f)) => Some(f.clone()),
                _ => None,
            },
            trainable: t.trainable.clone(),
        })
    }

    /// The LoRA settings of the adapter (rank, alpha, rsLoRA), if the trainer trains one.
    pub fn lora(&self) -> Option<crate::passes::lora::LoraConfig> {
        let a = self.adapter.as_ref()?;
        Some(lora_config(a))
    }

    /// The adapter's LoRA dropout probability (0 without an adapter or a `dropout` argument).
    pub fn lora_dropout(&self) -> f64 {
        self.adapter.as_ref().map_or(0.0, adapter_dropout)
    }
}

/// The `dropout` argument of an adapter declaration (PEFT's default: 0).
pub fn adapter_dropout(a: &AdapterInfo) -> f64 {
    arg(&a.args, "dropout").and_then(num).unwrap_or(0.0)
}

/// The LoRA settings of an adapter declaration (PEFT's defaults: rank 8, alpha 8).
pub fn lora_config(a: &AdapterInfo) -> crate::passes::lora::LoraConfig {
    let n = |k: &str| arg(&a.args, k).and_then(num);
    crate::passes::lora::LoraConfig {
        rank: n("rank").unwrap_or(8.0) as i64,
        alpha: n("alpha").unwrap_or(8.0),
        rslora: matches!(arg(&a.args, "rslora"), Some(Setting::Bool(true))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_ratio_rounds_up_as_transformers() {
        let s = Schedule {
            kind: ScheduleKind::Linear,
            warmup: 0,
            warmup_ratio: 0.1,
            min_lr: 0.0,
        };
        // transformers: math.ceil(num_training_steps * warmup_ratio)
        assert_eq!(s.warmup_steps(25), 3);
        assert_eq!(s.lr_at(1.0, 1, 25), 1.0 / 3.0);
        assert_eq!(s.lr_at(1.0, 3, 25), 1.0);
        assert!(s.check("t", 25).is_ok());
        let long = Schedule {
            warmup: 30,
            ..s.clone()
        };
        let e = long.check("t", 25).unwrap_err();
        assert!(e.contains("30 steps") && e.contains("25"), "{e}");
        assert_eq!(long.warmup_steps(25), 30);
    }

    #[test]
    fn schedules_follow_hugging_face() {
        let s = |kind, warmup| Schedule {
            kind,
            warmup,
            warmup_ratio: 0.0,
            min_lr: 0.0,
        };
        let lin = s(ScheduleKind::Linear, 2);
        assert_eq!(lin.lr_at(1.0, 0, 10), 0.0);
        assert_eq!(lin.lr_at(1.0, 1, 10), 0.5);
        assert_eq!(lin.lr_at(1.0, 2, 10), 1.0);
        assert_eq!(lin.lr_at(1.0, 6, 10), 0.5);
        assert_eq!(lin.lr_at(1.0, 10, 10), 0.0);
        let cos = s(ScheduleKind::Cosine, 0);
        assert_eq!(cos.lr_at(2.0, 0, 4), 2.0);
        assert!((cos.lr_at(2.0, 2, 4) - 1.0).abs() < 1e-12);
        let floor = Schedule {
            min_lr: 0.5,
            ..cos.clone()
        };
        assert!((floor.lr_at(2.0, 4, 4) - 0.5).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Constant, 4).lr_at(3.0, 1, 9), 0.75);
        assert_eq!(s(ScheduleKind::Constant, 4).lr_at(3.0, 7, 9), 3.0);
    }
}
