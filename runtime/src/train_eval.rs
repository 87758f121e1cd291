//! Evaluation during training (`eval_every`): the mean loss over an evaluation set, with the
//! trainer's forward and loss only (no gradient, no update, no dropout).
//!
//! The loss is normalised as in training: for token objectives the sum of the per-token
//! losses over the whole set divided by its target tokens (TRL's `num_items_in_batch` over the
//! set), otherwise the mean of the batch losses weighted by the rows of each batch. Batches are
//! the set's rows in file order, `batch` at a time (the last one may be shorter).

use crate::tensor::Tensor;
use crate::train::{Backend, GraphRunner, TrainRunError};
use crate::train_data::Example;
use crate::train_inputs::BatchPlan;
use std::collections::BTreeMap;
use vlmc::elab::Elaborated;
use vlmc::train::TrainConfig;

/// An evaluation set, batched, and the graph that scores it.
pub struct Evaluator {
    /// The forward and loss ([`vlmc::train::build_eval`]) and what runs it.
    pub runner: GraphRunner,
    token_loss: bool,
    batches: Vec<BTreeMap<String, Tensor>>,
    /// Rows per batch.
    rows: Vec<usize>,
    /// Target tokens (token objectives) or rows in the whole set.
    pub items: f64,
}

fn err(message: impl Into<String>) -> TrainRunError {
    TrainRunError {
        message: message.into(),
    }
}

/// Target tokens of a batch: the loss mask without each row's first position (it predicts
/// nothing), as the training step counts them.
pub fn target_tokens(batch: &BTreeMap<String, Tensor>) -> f64 {
    let Some(mask) = batch.get("loss_mask") else {
        return 0.0;
    };
    let t = mask.shape.get(1).copied().unwrap_or(1).max(1);
    mask.to_f64()
        .iter()
        .enumerate()
        .filter(|(i, _)| i % t != 0)
        .map(|(_, v)| v)
        .sum()
}

impl Evaluator {
    /// Builds the evaluation graph of `cfg` and batches `examples` (`batch` rows at a time).
    pub fn new(
        model: &Elaborated,
        cfg: &TrainConfig,
        examples: &[Example],
        plan: &BatchPlan,
        backend: &Backend,
    ) -> Result<Evaluator, TrainRunError> {
        if examples.is_empty() {
            return Err(err("the evaluation data has no rows"));
        }
        let graph = vlmc::train::build_eval(model, cfg)?;
        let token_loss = cfg.objective.is_token_loss();
        let uniform = crate::train_uniform::inputs_of(&graph);
        let mut batches = Vec::new();
        let mut rows = Vec::new();
        for (k, chunk) in examples.chunks(cfg.batch.max(1)).enumerate() {
            let refs: Vec<&Example> = chunk.iter().collect();
            let mut batch = plan
                .collate(&refs)
                .map_err(|e| err(format!("evaluation data: {}", e.message)))?;
            // Uniform inputs (BLIP-2's ITM negatives): fixed per batch (step 0).
            let drawn = crate::train_uniform::draws(&uniform, &batch, cfg.seed, 0, k)?;
            batch.extend(drawn);
            batches.push(batch);
            rows.push(chunk.len());
        }
        let items = if token_loss {
            batches.iter().map(target_tokens).sum()
        } else {
            examples.len() as f64
        };
        if items == 0.0 {
            return Err(err(
                "the evaluation data has no target token (every row is masked)",
            ));
        }
        Ok(Evaluator {
            runner: GraphRunner::new(graph, backend),
            token_loss,
            batches,
            rows,
            items,
        })
    }

    /// The mean loss of the set with `params` (the model's and the adapter's parameters).
    pub fn loss(&self, params: &BTreeMap<String, Tensor>) -> Result<f64, TrainRunError> {
        let mut sum = 0.0;
        for (b, &n) in self.batches.iter().zip(&self.rows) {
            let out = self
                .runner
                .run(b, params)
                .map_err(|e| err(format!("evaluation: {}", e.message)))?;
            let l = out["loss"].to_f64()[0];
            sum += if self.token_loss { l } else { l * n as f64 };
        }
        Ok(sum / self.items)
    }
}
