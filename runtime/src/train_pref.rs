//! What a preference step needs around its step graph: the reference policy's
//! log-probabilities (the base model with the adapter switched off, sharing the parameters,
//! or a frozen copy of the starting weights), KTO's KL estimate from mismatched completions,
//! and TRL's metrics from the step's statistics (`stat.*` outputs).

use crate::tensor::Tensor;
use crate::train::{Backend, GraphRunner, TrainRunError};
use std::collections::BTreeMap;
use vlmc::elab::Elaborated;
use vlmc::train::{self, PrefData, PrefFamily, Preference, TrainConfig};

fn err(message: impl Into<String>) -> TrainRunError {
    TrainRunError {
        message: message.into(),
    }
}

/// The prefix of a KTO micro-batch's KL rows (each prompt with the previous row's completion).
pub const KL_PREFIX: &str = "kl.";

/// The reference policy of a preference trainer.
pub struct Reference {
    runner: GraphRunner,
    /// The starting values of the trainable base parameters (full fine-tuning); `None` when
    /// only an adapter trains, so the base parameters are the reference's own.
    frozen: Option<BTreeMap<String, Tensor>>,
}

impl Reference {
    /// Bytes of parameters the reference holds beyond the policy's.
    pub fn extra_bytes(&self) -> usize {
        self.frozen
            .as_ref()
            .map_or(0, |f| f.values().map(|t| t.numel() * 4).sum())
    }
}

/// A preference trainer's reference, KL and metric machinery.
pub struct PrefState {
    pub p: Preference,
    pub reference: Option<Reference>,
    /// KTO: the policy's log-probabilities of the KL rows (no gradient).
    policy_logps: Option<GraphRunner>,
}

impl PrefState {
    /// Builds the graphs of `cfg`'s preference objective (`None` for other objectives).
    /// `params` are the starting parameters; `trainable` / `adapter` what the step trains.
    pub fn new(
        model: &Elaborated,
        cfg: &TrainConfig,
        params: &BTreeMap<String, Tensor>,
        trainable: &[String],
        adapter: &[String],
        backend: &Backend,
    ) -> Result<Option<PrefState>, TrainRunError> {
        let train::Objective::Preference(p) = &cfg.objective else {
            return Ok(None);
        };
        let reference = if p.reference {
            let g = train::preference::build_logps(model, cfg, p, false)?;
            let base: Vec<&String> = trainable.iter().filter(|t| !adapter.contains(t)).collect();
            let frozen = if base.is_empty() {
                None
            } else {
                Some(
                    params
                        .iter()
                        .filter(|(k, _)| !adapter.contains(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
            };
            Some(Reference {
                runner: GraphRunner::new(g, backend),
                frozen,
            })
        } else {
            None
        };
        let policy_logps = if p.kl {
            Some(GraphRunner::new(
                train::preference::build_logps(model, cfg, p, true)?,
                backend,
            ))
        } else {
            None
        };
        Ok(Some(PrefState {
            p: p.clone(),
            reference,
            policy_logps,
        }))
    }

    /// The reference's log-probabilities of a micro-batch's rows (named as the step graph's
    /// inputs: `ref_chosen_logps` and `ref_rejected_logps`, or `ref_logps`).
    pub fn reference_logps(
        &self,
        data: &BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
        let Some(r) = &self.reference else {
            return Ok(BTreeMap::new());
        };
        let o = r.runner.run(data, r.frozen.as_ref().unwrap_or(params))?;
        Ok(o.into_iter()
            .map(|(k, v)| (format!("ref_{k}"), v))
            .collect())
    }

    /// Adds what the step graph reads beyond the data: the reference log-probabilities (unless
    /// precomputed ones are there) and KTO's KL estimate `kl` (from the `kl.*` rows, which are
    /// removed). Returns the KL estimate, if any.
    pub fn prepare(
        &self,
        data: &mut BTreeMap<String, Tensor>,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Option<f64>, TrainRunError> {
        let have = match self.p.data {
            PrefData::Pairs => data.contains_key("ref_chosen_logps"),
            _ => data.contains_key("ref_logps"),
        };
        if self.reference.is_some() && !have {
            let r = self.reference_logps(data, params)?;
            data.extend(r);
        }
        let kl_rows: BTreeMap<String, Tensor> = data
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(KL_PREFIX)
                    .map(|n| (n.to_string(), v.clone()))
            })
            .collect();
        data.retain(|k, _| !k.starts_with(KL_PREFIX));
        let Some(pol) = &self.policy_logps else {
            return Ok(None);
        };
        if kl_rows.is_empty() {
            return Err(err("KTO needs the KL rows of its batch (`kl.*` inputs)"));
        }
        let policy = pol.run(&kl_rows, params)?["logps"].to_f64();
        let reference = match &self.reference {
            Some(r) => r
                .runner
                .run(&kl_rows, r.frozen.as_ref().unwrap_or(params))?["logps"]
                .to_f64(),
            None => vec![0.0; policy.len()],
        };
        let n = policy.len().max(1) as f64;
        let z = (policy
            .iter()
            .zip(&reference)
            .map(|(a, b)| a - b)
            .sum::<f64>()
            / n)
            .max(0.0);
        data.insert("kl".into(), Tensor::f32(vec![], vec![z as f32]));
        Ok(Some(z))
    }

    /// TRL's metrics of one step from its micro-batches' inputs (with the reference
    /// log-probabilities added) and `stat.*` outputs.
    pub fn metrics(
        &self,
        inputs: &[BTreeMap<String, Tensor>],
        stats: &[BTreeMap<String, Tensor>],
        kl: Option<f64>,
    ) -> Vec<(String, f64)> {
        let cat = |maps: &[BTreeMap<String, Tensor>], k: &str| -> Vec<f64> {
            maps.iter()
                .flat_map(|m| m.get(k).map(|t| t.to_f64()).unwrap_or_default())
                .collect()
        };
        let s = |k: &str| cat(stats, &format!("stat.{k}"));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let beta = self.p.beta;
        let mut m: Vec<(String, f64)> = Vec::new();
        let rewards = |m: &mut Vec<(String, f64)>, c: &[f64], r: &[f64]| {
            let acc: Vec<f64> = c
                .iter()
                .zip(r)
                .map(|(a, b)| f64::from(u8::from(a > b)))
                .collect();
            let margin: Vec<f64> = c.iter().zip(r).map(|(a, b)| a - b).collect();
            m.push(("rewards/chosen".into(), mean(c)));
            m.push(("rewards/rejected".into(), mean(r)));
            m.push(("rewards/accuracies".into(), mean(&acc)));
            m.push(("rewards/margins".into(), mean(&margin)));
        };
        match self.p.family {
            PrefFamily::Dpo | PrefFamily::Custom | PrefFamily::Cpo | PrefFamily::Orpo => {
                let (lc, lr) = (s("chosen_logps"), s("rejected_logps"));
                let reward = |lp: &[f64], refs: &[f64]| -> Vec<f64> {
                    lp.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            if self.p.reference {
                                beta * (x - refs.get(i).copied().unwrap_or(0.0))
                            } else if self.p.alphapo != 0.0 {
                                let a = self.p.alphapo;
                                beta * (1.0 - (-a * x).exp()) / a
                            } else {
                                beta * x
                            }
                        })
                        .collect()
                };
                let rc = reward(&lc, &cat(inputs, "ref_chosen_logps"));
                let rr = reward(&lr, &cat(inputs, "ref_rejected_logps"));
                rewards(&mut m, &rc, &rr);
                m.push(("logps/chosen".into(), mean(&lc)));
                m.push(("logps/rejected".into(), mean(&lr)));
                for side in ["chosen", "rejected"] {
                    let logits = s(&format!("{side}_logits"));
                    let v = if matches!(self.p.family, PrefFamily::Cpo | PrefFamily::Orpo) {
                        mean(&logits)
                    } else {
                        let n: f64 = s(&format!("{side}_len")).iter().sum();
                        logits.iter().sum::<f64>() / n.max(1.0)
                    };
                    m.push((format!("logits/{side}"), v));
                }
            }
            PrefFamily::Kto => {
                let (lp, len, logits) = (s("logps"), s("len"), s("logits"));
                let label = cat(inputs, "label");
                let refs = cat(inputs, "ref_logps");
                let pick = |want: bool, v: &[f64]| -> Vec<f64> {
                    v.iter()
                        .zip(&label)
                        .filter(|(_, l)| (**l > 0.5) == want)
                        .map(|(x, _)| *x)
                        .collect()
                };
                let reward: Vec<f64> = lp
                    .iter()
                    .enumerate()
                    .map(|(i, x)| beta * (x - refs.get(i).copied().unwrap_or(0.0)))
                    .collect();
                let (rc, rr) = (pick(true, &reward), pick(false, &reward));
                if !rc.is_empty() {
                    m.push(("rewards/chosen".into(), mean(&rc)));
                    m.push(("logps/chosen".into(), mean(&pick(true, &lp))));
                    let n: f64 = pick(true, &len).iter().sum();
                    m.push((
                        "logits/chosen".into(),
                        pick(true, &logits).iter().sum::<f64>() / n.max(1.0),
                    ));
                }
                if !rr.is_empty() {
                    m.push(("rewards/rejected".into(), mean(&rr)));
                    m.push(("logps/rejected".into(), mean(&pick(false, &lp))));
                    let n: f64 = pick(false, &len).iter().sum();
                    m.push((
                        "logits/rejected".into(),
                        pick(false, &logits).iter().sum::<f64>() / n.max(1.0),
                    ));
                }
                if !rc.is_empty() && !rr.is_empty() {
                    m.push(("rewards/margins".into(), mean(&rc) - mean(&rr)));
                }
                m.push(("kl".into(), kl.unwrap_or(0.0)));
            }
            PrefFamily::Reward => {
                let (c, r) = (s("chosen_rewards"), s("rejected_rewards"));
                let all: Vec<f64> = c.iter().chain(&r).copied().collect();
                let acc: Vec<f64> = c
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| f64::from(u8::from(a > b)))
                    .collect();
                let margin: Vec<f64> = c.iter().zip(&r).map(|(a, b)| a - b).collect();
                m.push((
                    "min_reward".into(),
                    all.iter().copied().fold(f64::INFINITY, f64::min),
                ));
                m.push(("mean_reward".into(), mean(&all)));
                m.push((
                    "max_reward".into(),
                    all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ));
                m.push(("accuracy".into(), mean(&acc)));
                m.push(("margin".into(), mean(&margin)));
            }
            PrefFamily::Prm => {
                let correct: f64 = s("correct").iter().sum();
                let n: f64 = s("len").iter().sum();
                m.push(("accuracy".into(), correct / n.max(1.0)));
            }
        }
        m
    }
}

/// Rows `[from, to)` of a tensor (along axis 0).
fn rows(t: &Tensor, from: usize, to: usize) -> Tensor {
    use crate::tensor::Data;
    let per: usize = t.shape.iter().skip(1).product();
    let mut shape = t.shape.clone();
    shape[0] = to - from;
    let (a, b) = (from * per, to * per);
    let data = match &t.data {
        Data::F32(v) => Data::F32(v[a..b].to_vec()),
        Data::F64(v) => Data::F64(v[a..b].to_vec()),
        Data::I32(v) => Data::I32(v[a..b].to_vec()),
        Data::Bool(v) => Data::Bool(v[a..b].to_vec()),
    };
    Tensor { shape, data }
}

/// A batch of pairs: the chosen and the rejected rows collated together (one padded length,
/// as TRL pads its concatenated batch), then split into `chosen.<input>` and
/// `rejected.<input>`; with `margins`, the reward model's `margin` input.
pub fn collate_pairs(
    plan: &crate::train_inputs::BatchPlan,
    pairs: &[(&crate::train_data::Example, &crate::train_data::Example)],
    margins: Option<Vec<f64>>,
) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
    let mut all: Vec<&crate::train_data::Example> = pairs.iter().map(|p| p.0).collect();
    all.extend(pairs.iter().map(|p| p.1));
    let joint = plan.collate(&all).map_err(|e| err(e.message))?;
    let mut out = BTreeMap::new();
    for (k, t) in joint {
        let n = t.shape.first().copied().unwrap_or(0);
        if n % 2 != 0 {
            return Err(err(format!(
                "input `{k}` has {n} rows for {} pairs: it cannot be split into chosen and rejected",
                pairs.len()
            )));
        }
        out.insert(format!("chosen.{k}"), rows(&t, 0, n / 2));
        out.insert(format!("rejected.{k}"), rows(&t, n / 2, n));
    }
    if let Some(m) = margins {
        let v: Vec<f32> = m.iter().map(|x| *x as f32).collect();
        out.insert("margin".into(), Tensor::f32(vec![v.len()], v));
    }
    Ok(out)
}

/// The prompt (tokens before the first target) and the completion (the target tokens) of a
/// row.
fn prompt_and_completion(e: &crate::train_data::Example) -> (usize, usize) {
    let start = e.mask.iter().position(|&m| m > 0.0).unwrap_or(e.ids.len());
    let end = e
        .mask
        .iter()
        .rposition(|&m| m > 0.0)
        .map_or(start, |i| i + 1);
    (start, end)
}

/// KTO's mismatched rows: within each chunk of `batch` rows in file order, row i's prompt
/// with the previous row's completion (the first row takes the chunk's last), as TRL's
/// `add_kl_completion_ids` builds them.
pub fn kl_examples(
    rows: &[crate::train_data::Example],
    batch: usize,
) -> Vec<crate::train_data::Example> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        for i in 0..chunk.len() {
            let me = &chunk[i];
            let other = &chunk[(i + chunk.len() - 1) % chunk.len()];
            let (ps, _) = prompt_and_completion(me);
            let (cs, ce) = prompt_and_completion(other);
            let mut e = me.clone();
            e.ids = me.ids[..ps].to_vec();
            e.ids.extend_from_slice(&other.ids[cs..ce]);
            e.mask = vec![0.0; ps];
            e.mask.extend(std::iter::repeat_n(1.0, ce - cs));
            out.push(e);
        }
    }
    out
}

/// A batch of labelled rows (KTO): the rows, their `label` (1 desirable, 0 not) and, with
/// `kl`, the rows' mismatched twins as `kl.<input>`.
pub fn collate_labeled(
    plan: &crate::train_inputs::BatchPlan,
    examples: &[&crate::train_data::Example],
    labels: &[bool],
    kl: Option<&[&crate::train_data::Example]>,
) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
    let mut out = plan.collate(examples).map_err(|e| err(e.message))?;
    let l: Vec<f32> = labels.iter().map(|&x| f32::from(u8::from(x))).collect();
    out.insert("label".into(), Tensor::f32(vec![l.len()], l));
    if let Some(k) = kl {
        for (name, t) in plan.collate(k).map_err(|e| err(e.message))? {
            out.insert(format!("{KL_PREFIX}{name}"), t);
        }
    }
    Ok(out)
}

/// A batch of stepwise rows (PRM): ids and attention padded as any batch, `labels` (-100 →
/// 0 with `loss_mask` 0) at every token.
pub fn collate_steps(
    plan: &crate::train_inputs::BatchPlan,
    examples: &[&crate::train_data::Example],
    labels: &[&[i32]],
) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
    let mut out = plan.collate(examples).map_err(|e| err(e.message))?;
    let t = out.get(&plan.ids).map_or(0, |x| x.shape[1]);
    let mut lab = vec![0i32; examples.len() * t];
    let mut mask = vec![0f32; examples.len() * t];
    for (r, row) in labels.iter().enumerate() {
        for (c, &l) in row.iter().enumerate().take(t) {
            if l != -100 {
                lab[r * t + c] = l;
                mask[r * t + c] = 1.0;
            }
        }
    }
    out.insert("labels".into(), Tensor::i32(vec![examples.len(), t], lab));
    out.insert(
        "loss_mask".into(),
        Tensor::f32(vec![examples.len(), t], mask),
    );
    Ok(out)
}
