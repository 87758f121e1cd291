//! Training: a trainer declaration compiled into a step graph.
//!
//! The step graph is one ordinary graph: the model's forward, the objective's loss (elaborated
//! from `std.losses`, `.vlm` code like every composite), the backward graph of the trainable
//! parameters only ([`crate::passes::autodiff`]) and the optimiser update
//! ([`optim::append_update`]). It then goes through the same passes as a forward (simplify,
//! CSE, DCE), so frozen branches keep no activations and the update fuses like anything else.
//!
//! With gradient accumulation the step is split in two graphs of the same construction: a
//! [`StepKind::Grad`] graph (forward, loss, backward; run once per micro-batch, the gradients
//! summed by the driver) and a [`StepKind::Update`] graph (gradients in, update out).
//!
//! Inputs of a step graph: the model's inputs; `loss_mask` (token objectives: 1 where a token
//! is a target); `loss_scale` (the loss is multiplied by it before differentiation: 1 / target
//! tokens of the whole accumulated batch for token objectives, 1 / micro-batches otherwise);
//! `lr`, `step` and the optimiser state `optim.<slot>.<path>`. Outputs: `loss` (scaled),
//! `grad.<path>` (Grad), `param.<path>`, `optim.<slot>.<path>` and `grad_norm` (Fused, Update).

pub mod config;
pub mod optim;
pub mod preference;
pub mod splice;

pub use config::{
    Objective, Optimizer, OptimizerKind, PrefData, PrefFamily, Preference, Schedule, ScheduleKind,
    TrainConfig, DEFAULT_LOG_EVERY,
};

use crate::elab::Elaborated;
use crate::ir::{DType, Graph, NodeId, Op, TensorType};
use crate::passes::{self, PassManager};
use std::collections::HashMap;

/// Which part of a training step a graph computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Forward, loss, backward and update in one graph.
    Fused,
    /// Forward, loss and backward: outputs `loss` and `grad.<path>`.
    Grad,
    /// The update alone: inputs `grad.<path>`.
    Update,
}

/// A compiled training step.
#[derive(Debug)]
pub struct StepGraph {
    pub graph: Graph,
    pub kind: StepKind,
    /// The parameters that train, in order.
    pub trainable: Vec<String>,
    /// The optimiser's state slots per parameter (`m`, `v`).
    pub slots: Vec<&'static str>,
    /// Parameters the adapter added (LoRA A and B), with their init rules in the graph.
    pub adapter_params: Vec<String>,
    /// The pass log (ops after each pass).
    pub log: passes::PassLog,
}

/// A failure while building a step graph.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct TrainError(pub String);

impl From<passes::PassError> for TrainError {
    fn from(e: passes::PassError) -> TrainError {
        TrainError(e.to_string())
    }
}

/// The model's forward with the trainer's adapter applied, as trained: with the adapter's
/// LoRA dropout (mask inputs `lora_dropout.<layer>`, see [`passes::lora::apply_with_dropout`])
/// when it has one. Returns the graph, the trainable parameter paths and the adapter's
/// parameter paths.
/// Preference objectives train without LoRA dropout, as TRL's `disable_dropout` (default
/// true) sets every dropout of the model, PEFT's included, to 0.
pub fn model_graph(
    model: &Elaborated,
    cfg: &TrainConfig,
) -> Result<(Graph, Vec<String>, Vec<String>), TrainError> {
    adapted_graph(model, cfg, step_dropout(cfg))
}

/// The LoRA dropout of the step graph: the adapter's, but none for preference objectives.
fn step_dropout(cfg: &TrainConfig) -> f64 {
    match cfg.objective {
        Objective::Preference(_) => 0.0,
        _ => cfg.lora_dropout(),
    }
}

pub(crate) fn adapted_graph(
    model: &Elaborated,
    cfg: &TrainConfig,
    dropout: f64,
) -> Result<(Graph, Vec<String>, Vec<String>), TrainError> {
    let mut g = model.graph.clone();
    let before: Vec<String> = g.params().iter().map(|p| p.1.to_string()).collect();
    let mut trainable = cfg.trainable.clone();
    let mut added = Vec::new();
    if let (Some(a), Some(lc)) = (&cfg.adapter, cfg.lora()) {
        passes::lora::apply_with_dropout(&mut g, &a.targets, &lc, dropout)?;
        for (_, p, _, _) in g.params() {
            if !before.iter().any(|b| b == p) {
                added.push(p.to_string());
            }
        }
        trainable.extend(added.iter().cloned());
    }
    trainable.sort();
    trainable.dedup();
    if trainable.is_empty() {
        return Err(TrainError(format!(
            "trainer `{}` trains no parameter",
            cfg.name
        )));
    }
    Ok((g, trainable, added))
}

/// The model output the objective reads.
fn objective_output(g: &Graph, cfg: &TrainConfig) -> Result<NodeId, TrainError> {
    let names: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    let pick = if cfg.objective.is_token_loss() {
        g.output("logits").or_else(|| {
            g.outputs
                .iter()
                .find(|(_, id)| {
                    let t = &g.node(*id).ty;
                    t.rank() == 3 && t.dtype.is_float()
                })
                .map(|(_, id)| *id)
        })
    } else {
        g.output("logits_per_image")
    };
    pick.ok_or_else(|| {
        TrainError(format!(
            "objective {:?} needs {} among the model's outputs ({})",
            cfg.objective,
            if cfg.objective.is_token_loss() {
                "logits f32[B, L, V]"
            } else {
                "`logits_per_image`"
            },
            names.join(", ")
        ))
    })
}

/// The model outputs the objective's loss function reads, bound to its parameter names
/// (`model_out`, or `out_<name>` for objectives that name their outputs).
fn objective_outputs(g: &Graph, cfg: &TrainConfig) -> Result<Vec<(String, NodeId)>, TrainError> {
    let Some(wanted) = cfg.objective.outputs() else {
        return Ok(vec![("model_out".into(), objective_output(g, cfg)?)]);
    };
    let names: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
    wanted
        .iter()
        .map(|w| {
            g.output(w)
                .map(|id| (format!("out_{w}"), id))
                .ok_or_else(|| {
                    TrainError(format!(
                        "objective {:?} needs the output `{w}`; the model's outputs are: {}",
                        cfg.objective,
                        names.join(", ")
                    ))
                })
        })
        .collect()
}

/// Elaborates the objective's loss against the model's input and output types and joins it
/// to `g`; returns the loss node (an f32 scalar) and the objective's statistics (preference
/// objectives, which also rewrite `g`, see [`preference::attach`]).
fn attach_loss(
    g: &mut Graph,
    cfg: &TrainConfig,
) -> Result<(NodeId, Vec<(String, NodeId)>), TrainError> {
    if let Objective::Preference(p) = &cfg.objective {
        return preference::attach(g, p);
    }
    let outs = objective_outputs(g, cfg)?;
    let (func, _) = cfg.objective.loss_fn();
    let mut params = Vec::new();
    for (_, name, ty) in g.inputs() {
        // The loss reads data inputs; LoRA dropout masks are the forward's business.
        if !name.starts_with(passes::lora::DROPOUT_INPUT) {
            params.push(format!("{name}: {ty}"));
        }
    }
    let mut args: Vec<String> = Vec::new();
    for (name, id) in &outs {
        params.push(format!("{name}: {}", g.node(*id).ty));
        args.push(name.clone());
    }
    if cfg.objective.reads_tokens() {
        let ids = g.input("ids").ok_or_else(|| {
            TrainError(format!(
                "objective {:?} needs a model input `ids` (i32[B, T])",
                cfg.objective
            ))
        })?;
        let ity = g.node(ids).ty.clone();
        if ity.dtype != DType::I32 || ity.rank() != 2 {
            return Err(TrainError(format!("`ids` must be i32[B, T], found {ity}")));
        }
        let mty = TensorType::new(DType::F32, ity.shape.clone());
        params.push(format!("loss_mask: {mty}"));
        args.push("ids".into());
        args.push("loss_mask".into());
    }
    let call = format!("{func}({})", args.join(", "));
    let text = format!(
        "use std.losses.{func}\nmodel Objective {{\n  fn forward({}) -> f32[] {{\n    return {call}\n  }}\n}}\n",
        params.join(", ")
    );
    let checked = crate::elab::check_text(std::path::Path::new("objective.vlm"), text.clone());
    let rendered = checked.render();
    let mut models = checked.result.map_err(|_| {
        TrainError(format!(
            "the objective does not elaborate:\n{rendered}\n{text}"
        ))
    })?;
    let lg = models.pop().expect("one model").graph;
    let mut bind: HashMap<String, NodeId> = HashMap::new();
    for (id, name, _) in g.inputs() {
        bind.insert(name.to_string(), id);
    }
    for (name, id) in outs {
        bind.insert(name, id);
    }
    let map = splice::splice(g, &lg, &bind, "loss").map_err(TrainError)?;
    let (_, lid) = lg.outputs[0];
    Ok((map[&lid], Vec::new()))
}

/// The evaluation graph of trainer `cfg`: the model's forward (adapter applied, no dropout)
/// and the objective's loss, nothing else (no gradient, no update). Inputs: the model's inputs
/// and, for token objectives, `loss_mask`; parameters: the model's and the adapter's. Output
/// `loss`, unnormalised as in the step graph: the sum over target tokens for token objectives
/// (divide by the target count), the batch's mean loss otherwise.
pub fn build_eval(model: &Elaborated, cfg: &TrainConfig) -> Result<Graph, TrainError> {
    let (mut g, _, _) = adapted_graph(model, cfg, 0.0)?;
    let (loss, _) = attach_loss(&mut g, cfg)?;
    g.outputs.clear();
    g.set_output("loss", loss)
        .map_err(|e| TrainError(e.to_string()))?;
    g.name = format!("{}.{}.eval", model.model, cfg.name);
    PassManager::inference().run(&mut g)?;
    Ok(g)
}

/// Builds the step graph of trainer `cfg` for `model`.
pub fn build(
    model: &Elaborated,
    cfg: &TrainConfig,
    kind: StepKind,
) -> Result<StepGraph, TrainError> {
    let (mut g, trainable, added) = model_graph(model, cfg)?;
    let slots = cfg.optimizer.slots();
    let clamp = cfg.objective.clamps();
    let mut items = Vec::new();
    if kind == StepKind::Update {
        // Parameters and gradients only.
        let mut u = Graph::new(&format!("{}.update", g.name));
        u.dims = g.dims.clone();
        for p in &trainable {
            let id = g.param(p).expect("trainable parameter");
            let node = g.node(id).clone();
            let pid = u
                .add_source(node.op.clone(), node.ty.clone(), &node.scope)
                .map_err(|e| TrainError(e.to_string()))?;
            let gid = u
                .add_source(
                    Op::Input {
                        name: format!("grad.{p}"),
                    },
                    node.ty.clone(),
                    "optimizer",
                )
                .map_err(|e| TrainError(e.to_string()))?;
            items.push(optim::Updated {
                path: p.clone(),
                param: pid,
                grad: gid,
            });
        }
        g = u;
    } else {
        let (loss, stats) = attach_loss(&mut g, cfg)?;
        let scalar = TensorType::new(DType::F32, vec![]);
        let mut e = passes::emit::Emit::new(&mut g, "train", "loss");
        let scale = e.source(
            Op::Input {
                name: "loss_scale".into(),
            },
            scalar,
        )?;
        let loss = e.mul(loss, scale)?;
        // Only the loss and the gradients are wanted from the forward.
        g.outputs.clear();
        g.set_output("loss", loss)
            .map_err(|e| TrainError(e.to_string()))?;
        for (name, id) in stats {
            g.set_output(&format!("stat.{name}"), id)
                .map_err(|e| TrainError(e.to_string()))?;
        }
        let wrt: Vec<NodeId> = trainable
            .iter()
            .map(|p| g.param(p).expect("trainable parameter"))
            .collect();
        let grads = passes::autodiff::backward(&mut g, loss, &wrt, None)?;
        for ((p, &pid), &gid) in trainable.iter().zip(&wrt).zip(&grads) {
            if kind == StepKind::Grad {
                g.set_output(&format!("grad.{p}"), gid)
                    .map_err(|e| TrainError(e.to_string()))?;
            }
            items.push(optim::Updated {
                path: p.clone(),
                param: pid,
                grad: gid,
            });
        }
    }
    if kind != StepKind::Grad {
        optim::append_update(&mut g, &items, &cfg.optimizer, cfg.clip_grad, &clamp)?;
    }
    g.name = format!("{}.{}", model.model, cfg.name);
    let log = PassManager::inference().run(&mut g)?;
    Ok(StepGraph {
        graph: g,
        kind,
        trainable,
        slots,
        adapter_params: added,
        log,
    })
}
