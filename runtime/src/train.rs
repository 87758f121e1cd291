//! Running training steps: a [`Session`] holds a trainer's step graphs, the parameters, the
//! optimiser state and the step count, and runs one optimiser step per call, compiled for the
//! CPU (or on the reference interpreter); micro-batches accumulate gradients when the trainer
//! asks for it.
//! Data loading is in [`crate::train_data`]; checkpoints in [`crate::checkpoint`].

use crate::interp::RunError;
use crate::tensor::{Data, Tensor};
use std::collections::BTreeMap;
use vlmc::backend::cpu::CpuOptions;
use vlmc::elab::Elaborated;
use vlmc::ir::Graph;
use vlmc::train::{self, StepGraph, StepKind, TrainConfig};

/// A failure while training.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct TrainRunError {
    pub message: String,
}

fn terr<T>(message: impl Into<String>) -> Result<T, TrainRunError> {
    Err(TrainRunError {
        message: message.into(),
    })
}

impl From<RunError> for TrainRunError {
    fn from(e: RunError) -> TrainRunError {
        TrainRunError { message: e.message }
    }
}

impl From<train::TrainError> for TrainRunError {
    fn from(e: train::TrainError) -> TrainRunError {
        TrainRunError { message: e.0 }
    }
}

/// What one optimiser step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// The loss of the whole (accumulated) batch.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// Target tokens (token objectives) or examples in the batch.
    pub items: f64,
    /// The objective's own metrics under TRL's names (`rewards/accuracies`, ...; preference
    /// objectives), in a fixed order.
    pub metrics: Vec<(String, f64)>,
}

/// What runs training graphs (steps, evaluation).
#[derive(Clone, Debug)]
pub enum Backend {
    /// Machine code from the CPU backend (fusion, memory plan, Cranelift kernels, `gemm`).
    Cpu(CpuOptions),
    /// The reference interpreter.
    Interp,
}

impl Default for Backend {
    fn default() -> Backend {
        Backend::Cpu(CpuOptions::default())
    }
}

/// A training graph and what runs it. On the CPU its kernels are compiled on the first run
/// at each set of sizes (a new sequence length compiles once more) and kept; the parameters
/// change between runs, so nothing is computed from them at load time.
pub struct GraphRunner {
    cpu: Option<crate::cpu::CpuModel>,
    graph: Graph,
}

impl GraphRunner {
    /// A runner of `graph` on `backend`.
    pub fn new(graph: Graph, backend: &Backend) -> GraphRunner {
        let cpu = match backend {
            Backend::Cpu(opts) => Some(crate::cpu::CpuModel::new(
                vlmc::passes::Compiled::training(graph.clone()),
                BTreeMap::new(),
                opts.clone(),
            )),
            Backend::Interp => None,
        };
        GraphRunner { cpu, graph }
    }

    /// The graph run.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph on named inputs with the current parameters.
    pub fn run(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        let mut out = BTreeMap::new();
        self.run_into(inputs, params, &mut out)?;
        Ok(out)
    }

    /// [`GraphRunner::run`] into `out`, reusing the memory of the tensors there that have an
    /// output's name and shape (on the CPU).
    pub fn run_into(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
        out: &mut BTreeMap<String, Tensor>,
    ) -> Result<(), RunError> {
        match &self.cpu {
            Some(m) => m.plan_for(inputs)?.run_into(inputs, params, out),
            None => {
                out.extend(crate::interp::run(&self.graph, inputs, params)?);
                Ok(())
            }
        }
    }
}

/// A step graph and its runner.
pub struct StepRunner {
    pub step: StepGraph,
    runner: GraphRunner,
}

impl StepRunner {
    /// A runner of `step` on `backend`.
    pub fn new(step: StepGraph, backend: &Backend) -> StepRunner {
        let runner = GraphRunner::new(step.graph.clone(), backend);
        StepRunner { step, runner }
    }

    /// Runs the step on named inputs with the current parameters.
    pub fn run(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        self.runner.run(inputs, params)
    }

    /// [`StepRunner::run`] into `out` (see [`GraphRunner::run_into`]).
    pub fn run_into(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
        out: &mut BTreeMap<String, Tensor>,
    ) -> Result<(), RunError> {
        self.runner.run_into(inputs, params, out)
    }
}

/// A trainer being run.
pub struct Session {
    pub cfg: TrainConfig,
    /// The fused step (no accumulation), or the gradient and update graphs.
    pub fused: Option<StepRunner>,
    pub grad: Option<StepRunner>,
    pub update: Option<StepRunner>,
    /// Every parameter of the (adapted) model, by path.
    pub params: BTreeMap<String, Tensor>,
    /// The optimiser state `optim.<slot>.<path>`.
    pub state: BTreeMap<String, Tensor>,
    /// Optimiser steps done.
    pub step: u64,
    /// The step count the schedule spans.
    pub total_steps: u64,
    /// The parameters that train.
    pub trainable: Vec<String>,
    /// Tensors the last step replaced (parameters as `param.<path>`, optimiser state), whose
    /// memory the next step's outputs reuse.
    spare: BTreeMap<String, Tensor>,
    /// The parameters the adapter added (saved apart, in the PEFT layout).
    pub adapter_params: Vec<String>,
    /// The inputs of the step graph when it reads LoRA dropout masks (which the step draws,
    /// see [`crate::train_dropout`]); empty without dropout.
    pub dropout_inputs: Vec<(String, vlmc::ir::TensorType)>,
    /// The inputs of the step graph when it reads uniform numbers (`uniform_*`, drawn per
    /// step, see [`crate::train_uniform`]); empty without.
    pub uniform_inputs: Vec<(String, vlmc::ir::TensorType)>,
    /// A preference objective's reference policy, KL estimate and metrics.
    pub pref: Option<crate::train_pref::PrefState>,
}

impl Session {
    /// Compiles the trainer's step graphs for the CPU backend. `params` holds the base model's
    /// parameters; the adapter's (LoRA A and B) are initialised from their rules with `seed`
    /// unless given.
    pub fn new(
        model: &Elaborated,
        cfg: TrainConfig,
        params: BTreeMap<String, Tensor>,
        total_steps: u64,
    ) -> Result<Session, TrainRunError> {
        Session::with_backend(model, cfg, params, total_steps, &Backend::default())
    }

    /// [`Session::new`] with the step graphs run by `backend`.
    pub fn with_backend(
        model: &Elaborated,
        cfg: TrainConfig,
        mut params: BTreeMap<String, Tensor>,
        total_steps: u64,
        backend: &Backend,
    ) -> Result<Session, TrainRunError> {
        let runner = |kind| -> Result<StepRunner, TrainRunError> {
            Ok(StepRunner::new(train::build(model, &cfg, kind)?, backend))
        };
        let (fused, grad, update) = if cfg.grad_accum > 1 {
            (
                None,
                Some(runner(StepKind::Grad)?),
                Some(runner(StepKind::Update)?),
            )
        } else {
            (Some(runner(StepKind::Fused)?), None, None)
        };
        let any = &fused
            .as_ref()
            .or(update.as_ref())
            .expect("a step graph")
            .step;
        let (trainable, adapter_params) = (any.trainable.clone(), any.adapter_params.clone());
        // Adapter parameters not given start from their init rules.
        let (adapted, _, _) = train::model_graph(model, &cfg)?;
        let dropout_inputs = crate::train_dropout::inputs_of(&adapted);
        let uniform_inputs = crate::train_uniform::inputs_of(&adapted);
        for (_, path, ty, init) in adapted.params() {
            if !params.contains_key(path) {
                if !adapter_params.iter().any(|a| a == path) {
                    return terr(format!("no value for parameter `{path}`"));
                }
                let t = crate::init::init_param(path, ty, init, cfg.seed)
                    .map_err(|e| TrainRunError { message: e.message })?;
                params.insert(path.to_string(), t);
            }
        }
        let pref = crate::train_pref::PrefState::new(
            model,
            &cfg,
            &params,
            &trainable,
            &adapter_params,
            backend,
        )?;
        let mut state = BTreeMap::new();
        for p in &trainable {
            let t = &params[p];
            for slot in cfg.optimizer.slots() {
                state.insert(
                    format!("optim.{slot}.{p}"),
                    Tensor::f32(t.shape.clone(), vec![0.0; t.numel()]),
                );
            }
        }
        Ok(Session {
            cfg,
            fused,
            grad,
            update,
            params,
            state,
            step: 0,
            total_steps,
            trainable,
            spare: BTreeMap::new(),
            adapter_params,
            dropout_inputs,
            uniform_inputs,
            pref,
        })
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.cfg
            .schedule
            .lr_at(self.cfg.optimizer.lr, self.step, self.total_steps)
    }

    /// The normaliser of the loss over micro-batches: target tokens for token objectives
    /// (TRL's `num_items_in_batch`), micro-batches otherwise.
    fn items(&self, micro: &[BTreeMap<String, Tensor>]) -> f64 {
        if self.cfg.objective.is_token_loss() {
            micro
                .iter()
                .map(|m| {
                    let mask = &m["loss_mask"];
                    let t = mask.shape[1];
                    mask.to_f64()
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % t != 0)
                        .map(|(_, v)| v)
                        .sum::<f64>()
                })
                .sum()
        } else {
            micro.len() as f64
        }
    }

    /// The LoRA dropout masks of micro-batch `k` of the next step: a function of (seed, step,
    /// k) only, so a resumed run draws the same ones. Empty without dropout.
    pub fn dropout_masks(
        &self,
        data: &BTreeMap<String, Tensor>,
        k: usize,
    ) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
        crate::train_dropout::masks(
            &self.dropout_inputs,
            data,
            self.cfg.lora_dropout(),
            self.cfg.seed,
            self.step + 1,
            k,
        )
    }

    /// The uniform inputs of micro-batch `k` of the next step and its LoRA dropout masks.
    fn drawn(
        &self,
        data: &BTreeMap<String, Tensor>,
        k: usize,
    ) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
        let mut out = self.dropout_masks(data, k)?;
        out.extend(crate::train_uniform::draws(
            &self.uniform_inputs,
            data,
            self.cfg.seed,
            self.step + 1,
            k,
        )?);
        Ok(out)
    }

    /// Runs one optimiser step over the micro-batches (each a map of the step graph's data
    /// inputs: the model's inputs and `loss_mask`).
    pub fn step(&mut self, micro: &[BTreeMap<String, Tensor>]) -> Result<StepStats, TrainRunError> {
        if micro.is_empty() {
            return terr("a step needs at least one batch");
        }
        let items = self.items(micro);
        let scale = 1.0 / items.max(1.0);
        let lr = self.lr();
        let scalar = |v: f64| Tensor::f32(vec![], vec![v as f32]);
        let mut control = BTreeMap::new();
        control.insert("loss_scale".to_string(), scalar(scale));
        control.insert("lr".to_string(), scalar(lr));
        control.insert("step".to_string(), scalar((self.step + 1) as f64));
        let mut loss = 0.0;
        // Preference objectives: each micro-batch's reference log-probabilities and KL
        // estimate, and what the metrics read of it.
        let mut kl = None;
        let mut seen = Vec::new();
        let mut stats = Vec::new();
        let mut prepared =
            |m: &BTreeMap<String, Tensor>| -> Result<BTreeMap<String, Tensor>, TrainRunError> {
                let mut m = m.clone();
                if let Some(p) = &self.pref {
                    if let Some(z) = p.prepare(&mut m, &self.params)? {
                        kl = Some(kl.unwrap_or(0.0) + z / micro.len() as f64);
                    }
                    seen.push(
                        m.iter()
                            .filter(|(k, _)| k.starts_with("ref_") || *k == "label")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<BTreeMap<String, Tensor>>(),
                    );
                }
                Ok(m)
            };
        // The graph that updates (the fused step, or the update after accumulation) and its
        // inputs but the optimiser state.
        let (last, mut inputs) = if let Some(f) = &self.fused {
            let mut inputs = prepared(&micro[0])?;
            inputs.extend(self.drawn(&micro[0], 0)?);
            inputs.extend(control.clone());
            (f, inputs)
        } else {
            let (Some(gs), Some(us)) = (&self.grad, &self.update) else {
                return terr("no step graph");
            };
            let mut sum: BTreeMap<String, Vec<f32>> = BTreeMap::new();
            for (k, m) in micro.iter().enumerate() {
                let mut inputs = prepared(m)?;
                inputs.extend(self.drawn(m, k)?);
                inputs.extend(control.clone());
                let o = gs.run(&inputs, &self.params)?;
                loss += o["loss"].to_f64()[0];
                stats.push(stat_outputs(&o));
                for p in &self.trainable {
                    let g = o[&format!("grad.{p}")].to_f64();
                    let acc = sum.entry(p.clone()).or_insert_with(|| vec![0.0; g.len()]);
                    for (a, x) in acc.iter_mut().zip(g) {
                        *a += x as f32;
                    }
                }
            }
            let mut inputs = control.clone();
            for (p, v) in sum {
                let shape = self.params[&p].shape.clone();
                inputs.insert(format!("grad.{p}"), Tensor::f32(shape, v));
            }
            (us, inputs)
        };
        // The state goes in by move, and the outputs reuse the memory of the parameters and
        // state that the previous step replaced (`spare`): no copy or fresh allocation of
        // the model's size per step.
        inputs.extend(std::mem::take(&mut self.state));
        let mut outs = std::mem::take(&mut self.spare);
        let ran = last.run_into(&inputs, &self.params, &mut outs);
        let old_state: BTreeMap<String, Tensor> = inputs
            .into_iter()
            .filter(|(k, _)| k.starts_with("optim."))
            .collect();
        if let Err(e) = ran {
            self.state = old_state;
            self.spare = outs;
            return Err(e.into());
        }
        if self.fused.is_some() {
            loss += outs["loss"].to_f64()[0];
            stats.push(stat_outputs(&outs));
        }
        let metrics = match &self.pref {
            Some(p) => p.metrics(&seen, &stats, kl),
            None => Vec::new(),
        };
        if !loss.is_finite() {
            self.state = old_state;
            self.spare = outs;
            return terr(format!(
                "the loss is {loss} at step {}: stopping (the parameters are unchanged)",
                self.step + 1
            ));
        }
        let grad_norm = outs.get("grad_norm").map_or(f64::NAN, |t| t.to_f64()[0]);
        for (name, t) in outs {
            if let Some(p) = name.strip_prefix("param.") {
                let t = match t.data {
                    Data::F64(_) => t.to_f32_tensor(),
                    _ => t,
                };
                if let Some(old) = self.params.insert(p.to_string(), t) {
                    self.spare.insert(name, old);
                }
            } else if name.starts_with("optim.") {
                self.state.insert(name, t);
            }
        }
        self.spare.extend(old_state);
        self.step += 1;
        Ok(StepStats {
            loss,
            grad_norm,
            lr,
            items,
            metrics,
        })
    }
}

/// The `stat.*` outputs of a step graph's run.
fn stat_outputs(o: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    o.iter()
        .filter(|(k, _)| k.starts_with("stat."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
