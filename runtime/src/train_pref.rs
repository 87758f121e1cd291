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
        let reference = match (&self.reference, kl_rows.get("ref_logps")) {
            (_, Some(cached)) => cached.to_f64(),
            (Some(r), None) => r
                .runner
                .run(&kl_rows, r.frozen.as_ref().unwrap_or(params))?["logps"]
                .to_f64(),
            (None, None) => vec![0.0; policy.len()],
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

/// A trainer's rows as its objective reads them.
pub enum Rows {
    /// One example per row (SFT, pretraining, contrastive, ...).
    Plain(Vec<crate::train_data::Example>),
    /// Preference pairs (chosen, rejected), with the reward model's margins when given.
    Pairs {
        pairs: Vec<(crate::train_data::Example, crate::train_data::Example)>,
        margins: Option<Vec<f64>>,
    },
    /// Rows labelled desirable or not (KTO), with their mismatched twins for the KL estimate.
    Labeled {
        rows: Vec<crate::train_data::Example>,
        labels: Vec<bool>,
        kl: Vec<crate::train_data::Example>,
    },
    /// Stepwise rows (PRM): a class label (or -100) at every token.
    Steps {
        rows: Vec<crate::train_data::Example>,
        labels: Vec<Vec<i32>>,
    },
}

/// Reference log-probabilities computed once for every row (`precompute_ref`): per pair
/// (chosen, rejected), or per labelled row (row, its KL twin).
pub type RefCache = Vec<(f64, f64)>;

impl Rows {
    /// The number of rows (pairs for pair data).
    pub fn len(&self) -> usize {
        match self {
            Rows::Plain(r) => r.len(),
            Rows::Pairs { pairs, .. } => pairs.len(),
            Rows::Labeled { rows, .. } | Rows::Steps { rows, .. } => rows.len(),
        }
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every sequence the model will read (both sides of pairs, the KL twins), for checks.
    pub fn examples(&self) -> Vec<&crate::train_data::Example> {
        match self {
            Rows::Plain(r) | Rows::Steps { rows: r, .. } => r.iter().collect(),
            Rows::Pairs { pairs, .. } => pairs.iter().flat_map(|(c, r)| [c, r]).collect(),
            Rows::Labeled { rows, kl, .. } => rows.iter().chain(kl).collect(),
        }
    }

    /// The batch of rows `idx`, with the cached reference log-probabilities when given.
    pub fn batch(
        &self,
        plan: &crate::train_inputs::BatchPlan,
        idx: &[usize],
        cache: Option<&RefCache>,
    ) -> Result<BTreeMap<String, Tensor>, TrainRunError> {
        let mut out = match self {
            Rows::Plain(r) => {
                let rows: Vec<&crate::train_data::Example> = idx.iter().map(|&i| &r[i]).collect();
                plan.collate(&rows).map_err(|e| err(e.message))?
            }
            Rows::Pairs { pairs, margins } => {
                let rows: Vec<_> = idx.iter().map(|&i| (&pairs[i].0, &pairs[i].1)).collect();
                let m = margins
                    .as_ref()
                    .map(|m| idx.iter().map(|&i| m[i]).collect());
                collate_pairs(plan, &rows, m)?
            }
            Rows::Labeled { rows, labels, kl } => {
                let r: Vec<_> = idx.iter().map(|&i| &rows[i]).collect();
                let l: Vec<bool> = idx.iter().map(|&i| labels[i]).collect();
                let k: Vec<_> = idx.iter().map(|&i| &kl[i]).collect();
                collate_labeled(plan, &r, &l, Some(&k))?
            }
            Rows::Steps { rows, labels } => {
                let r: Vec<_> = idx.iter().map(|&i| &rows[i]).collect();
                let l: Vec<&[i32]> = idx.iter().map(|&i| labels[i].as_slice()).collect();
                collate_steps(plan, &r, &l)?
            }
        };
        if let Some(c) = cache {
            let col = |k: usize| -> Tensor {
                let v: Vec<f32> = idx
                    .iter()
                    .map(|&i| if k == 0 { c[i].0 } else { c[i].1 } as f32)
                    .collect();
                Tensor::f32(vec![v.len()], v)
            };
            match self {
                Rows::Pairs { .. } => {
                    out.insert("ref_chosen_logps".into(), col(0));
                    out.insert("ref_rejected_logps".into(), col(1));
                }
                Rows::Labeled { .. } => {
                    out.insert("ref_logps".into(), col(0));
                    out.insert(format!("{KL_PREFIX}ref_logps"), col(1));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

impl PrefState {
    /// The reference log-probabilities of every row, in batches of `batch` in file order
    /// (`precompute_ref`), with a progress callback (rows done, rows).
    pub fn precompute(
        &self,
        rows: &Rows,
        plan: &crate::train_inputs::BatchPlan,
        batch: usize,
        params: &BTreeMap<String, Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<RefCache, TrainRunError> {
        let n = rows.len();
        let mut out = Vec::with_capacity(n);
        let all: Vec<usize> = (0..n).collect();
        for chunk in all.chunks(batch.max(1)) {
            let mut data = rows.batch(plan, chunk, None)?;
            let r = self.reference_logps(&data, params)?;
            match rows {
                Rows::Labeled { .. } => {
                    let kl: BTreeMap<String, Tensor> = data
                        .iter()
                        .filter_map(|(k, v)| {
                            k.strip_prefix(KL_PREFIX)
                                .map(|n| (n.to_string(), v.clone()))
                        })
                        .collect();
                    data.clear();
                    let rk = self.reference_logps(&kl, params)?;
                    let (a, b) = (r["ref_logps"].to_f64(), rk["ref_logps"].to_f64());
                    out.extend(a.into_iter().zip(b));
                }
                _ => {
                    let (a, b) = (
                        r["ref_chosen_logps"].to_f64(),
                        r["ref_rejected_logps"].to_f64(),
                    );
                    out.extend(a.into_iter().zip(b));
                }
            }
            progress(out.len(), n);
        }
        Ok(out)
    }
}

fn data_err(at: &str, message: impl std::fmt::Display) -> TrainRunError {
    err(format!("{at}: {message}"))
}

/// TRL's `extract_prompt` of an implicit-prompt pair: the longest common prefix of `chosen`
/// and `rejected` (characters of strings, or whole messages of conversations), one shorter
/// when the character before it is a space; the rest of each is its completion.
fn split_implicit<T: PartialEq + Clone>(
    chosen: &[T],
    rejected: &[T],
    is_space: impl Fn(&T) -> bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let n = chosen.len().min(rejected.len());
    // as Python's loop: without a difference the index stays at the last one compared
    let mut idx = n.saturating_sub(1);
    for i in 0..n {
        if chosen[i] != rejected[i] {
            idx = i;
            if i > 0 && is_space(&chosen[i - 1]) {
                idx = i - 1;
            }
            break;
        }
    }
    (
        chosen[..idx].to_vec(),
        chosen[idx..].to_vec(),
        rejected[idx..].to_vec(),
    )
}

/// The JSON row of one side of a preference row: `prompt` + `completion` (strings), or
/// `messages` = prompt messages + completion messages (conversations), with the row's images.
fn side_row(
    row: &serde_json::Value,
    prompt: &serde_json::Value,
    completion: &serde_json::Value,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    match (prompt, completion) {
        (serde_json::Value::Array(p), serde_json::Value::Array(c)) => {
            let mut m = p.clone();
            m.extend(c.iter().cloned());
            out.insert("messages".into(), serde_json::Value::Array(m));
        }
        _ => {
            out.insert("prompt".into(), prompt.clone());
            out.insert("completion".into(), completion.clone());
        }
    }
    for k in ["image", "images"] {
        if let Some(v) = row.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    serde_json::Value::Object(out)
}

/// The prompt and the completions of a preference row (explicit or implicit prompt, strings
/// or conversations).
fn pair_parts(
    row: &serde_json::Value,
    at: &str,
) -> Result<(serde_json::Value, serde_json::Value, serde_json::Value), TrainRunError> {
    use serde_json::Value;
    let field = |k: &str| -> Result<&Value, TrainRunError> {
        match row.get(k) {
            Some(v @ (Value::String(_) | Value::Array(_))) => Ok(v),
            Some(_) => Err(data_err(
                at,
                format!("field \"{k}\": expected a string or a list of messages"),
            )),
            None => Err(data_err(
                at,
                format!("a preference row needs \"{k}\" (and \"chosen\", \"rejected\"; \"prompt\" optional)"),
            )),
        }
    };
    let (c, r) = (field("chosen")?, field("rejected")?);
    if std::mem::discriminant(c) != std::mem::discriminant(r) {
        return Err(data_err(
            at,
            "\"chosen\" and \"rejected\" must both be strings or both be lists of messages",
        ));
    }
    if row.get("prompt").is_some() {
        return Ok((field("prompt")?.clone(), c.clone(), r.clone()));
    }
    Ok(match (c, r) {
        (Value::String(c), Value::String(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let (p, c, r) = split_implicit(&cc, &rc, |ch| *ch == ' ');
            let s = |v: Vec<char>| Value::String(v.into_iter().collect());
            (s(p), s(c), s(r))
        }
        (Value::Array(c), Value::Array(r)) => {
            let (p, c, r) = split_implicit(c, r, |_| false);
            (Value::Array(p), Value::Array(c), Value::Array(r))
        }
        _ => unreachable_pair(at)?,
    })
}

fn unreachable_pair<T>(at: &str) -> Result<T, TrainRunError> {
    Err(data_err(
        at,
        "\"chosen\" and \"rejected\" have different kinds",
    ))
}

/// The rows of a trainer's data as its objective reads them: plain rows, preference pairs
/// (`prompt`/`chosen`/`rejected`, the prompt implicit or conversational), labelled rows
/// (`prompt`/`completion`/`label`) or stepwise rows (`prompt`/`completions`/`labels`), each
/// with optional images. Bad rows are reported with file, line and field.
pub fn parse_rows(
    cfg: &TrainConfig,
    path: &std::path::Path,
    text: &str,
    tok: &crate::train_data::Tok,
    format: &crate::train_data::RowFormat,
) -> Result<Rows, TrainRunError> {
    use crate::train_data::parse_row;
    let train::Objective::Preference(p) = &cfg.objective else {
        return crate::train_data::parse_rows(path, text, tok, format)
            .map(Rows::Plain)
            .map_err(|e| err(e.message));
    };
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let mut pairs = Vec::new();
    let mut margins: Vec<f64> = Vec::new();
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    let mut steps: Vec<Vec<i32>> = Vec::new();
    let mut same = 0usize;
    let mut first_same = 0usize;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let row: serde_json::Value =
            serde_json::from_str(line).map_err(|e| data_err(&at, format!("not JSON: {e}")))?;
        let parse = |r: &serde_json::Value| {
            parse_row(r, &at, n + 1, base, tok, format).map_err(|e| err(e.message))
        };
        match p.data {
            PrefData::Pairs => {
                let (prompt, c, r) = pair_parts(&row, &at)?;
                for (k, v) in [("chosen", &c), ("rejected", &r)] {
                    let empty = match v {
                        serde_json::Value::String(s) => s.is_empty(),
                        serde_json::Value::Array(a) => a.is_empty(),
                        _ => true,
                    };
                    if empty {
                        return Err(data_err(
                            &at,
                            format!("field \"{k}\": the completion is empty"),
                        ));
                    }
                }
                let (ce, re) = (
                    parse(&side_row(&row, &prompt, &c))?,
                    parse(&side_row(&row, &prompt, &r))?,
                );
                for (k, e) in [("chosen", &ce), ("rejected", &re)] {
                    if !e.mask.iter().any(|&m| m > 0.0) {
                        return Err(data_err(
                            &at,
                            format!("field \"{k}\": no completion token is left after truncation to {} tokens", e.ids.len()),
                        ));
                    }
                }
                if ce.ids == re.ids {
                    if same == 0 {
                        first_same = n + 1;
                    }
                    same += 1;
                }
                match row.get("margin") {
                    Some(v) => margins.push(
                        v.as_f64()
                            .ok_or_else(|| data_err(&at, "field \"margin\": expected a number"))?,
                    ),
                    None if !margins.is_empty() => {
                        return Err(data_err(
                            &at,
                            "field \"margin\": missing (earlier rows have one)",
                        ));
                    }
                    None => {}
                }
                pairs.push((ce, re));
            }
            PrefData::Labeled => {
                let label = match row.get("label") {
                    Some(serde_json::Value::Bool(b)) => *b,
                    Some(_) => return Err(data_err(&at, "field \"label\": expected true or false")),
                    None => return Err(data_err(&at, "an unpaired row needs \"prompt\", \"completion\" and \"label\" (true: desirable)")),
                };
                let prompt = row
                    .get("prompt")
                    .cloned()
                    .unwrap_or(serde_json::Value::String(String::new()));
                let completion = row
                    .get("completion")
                    .ok_or_else(|| data_err(&at, "field \"completion\": missing"))?;
                let e = parse(&side_row(&row, &prompt, completion))?;
                if !e.mask.iter().any(|&m| m > 0.0) {
                    return Err(data_err(&at, "field \"completion\": no completion token"));
                }
                rows.push(e);
                labels.push(label);
            }
            PrefData::Steps => {
                let (e, l) = step_row(&row, &at, n + 1, base, tok, format, p)?;
                rows.push(e);
                steps.push(l);
            }
        }
    }
    let count = pairs.len() + rows.len();
    if count == 0 {
        return Err(err(format!("{} has no rows", path.display())));
    }
    if same > 0 {
        eprintln!(
            "warning: {same} of {} pairs have chosen == rejected (the first at {}:{first_same}); they carry no preference",
            pairs.len(),
            path.display()
        );
    }
    if !margins.is_empty() && margins.len() != pairs.len() {
        return Err(err(format!(
            "{}: some rows have a \"margin\" and some do not",
            path.display()
        )));
    }
    Ok(match p.data {
        PrefData::Pairs => Rows::Pairs {
            pairs,
            margins: if p.family == PrefFamily::Reward {
                Some(if margins.is_empty() {
                    vec![0.0; count]
                } else {
                    margins
                })
            } else {
                None
            },
        },
        PrefData::Labeled => {
            let kl = kl_examples(&rows, cfg.batch);
            Rows::Labeled { rows, labels, kl }
        }
        PrefData::Steps => Rows::Steps {
            rows,
            labels: steps,
        },
    })
}

/// A stepwise row as TRL's PRM `tokenize_row` builds it: the prompt's tokens (with the
/// tokenizer's special tokens), then each step's tokens followed by the separator's; the label
/// of a step (1 correct, 0 not) sits on its separator's last token, -100 elsewhere (only on
/// the last step with `train_on_last_step_only`).
#[allow(clippy::too_many_arguments)]
fn step_row(
    row: &serde_json::Value,
    at: &str,
    line: usize,
    base: &std::path::Path,
    tok: &crate::train_data::Tok,
    format: &crate::train_data::RowFormat,
    p: &Preference,
) -> Result<(crate::train_data::Example, Vec<i32>), TrainRunError> {
    use serde_json::Value;
    let prompt = match row.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(data_err(at, "field \"prompt\": expected a string")),
        None => {
            return Err(data_err(
                at,
                "a stepwise row needs \"prompt\", \"completions\" and \"labels\"",
            ))
        }
    };
    let steps: Vec<String> = match row.get("completions") {
        Some(Value::Array(v)) => v
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| data_err(at, "field \"completions\": expected a list of strings"))?,
        _ => {
            return Err(data_err(
                at,
                "field \"completions\": expected a list of strings",
            ))
        }
    };
    let labels: Vec<bool> = match row.get("labels") {
        Some(Value::Array(v)) => v
            .iter()
            .map(Value::as_bool)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| data_err(at, "field \"labels\": expected a list of true/false"))?,
        _ => {
            return Err(data_err(
                at,
                "field \"labels\": expected a list of true/false",
            ))
        }
    };
    if steps.len() != labels.len() || steps.is_empty() {
        return Err(data_err(
            at,
            format!(
                "\"completions\" has {} step(s) and \"labels\" {}: one label per step",
                steps.len(),
                labels.len()
            ),
        ));
    }
    // the prompt (and its images) through the common row reader, then the steps
    let mut prompt_row = serde_json::Map::new();
    prompt_row.insert("text".into(), Value::String(prompt));
    for k in ["image", "images"] {
        if let Some(v) = row.get(k) {
            prompt_row.insert(k.into(), v.clone());
        }
    }
    let no_cut = crate::train_data::RowFormat {
        max_len: None,
        ..format.clone()
    };
    let mut e =
        crate::train_data::parse_row(&Value::Object(prompt_row), at, line, base, tok, &no_cut)
            .map_err(|x| err(x.message))?;
    let sep = tok
        .encode(&p.step_separator, false)
        .map_err(|x| err(x.message))?;
    let mut lab = vec![-100i32; e.ids.len()];
    for (k, (s, l)) in steps.iter().zip(&labels).enumerate() {
        let ids = tok.encode(s, false).map_err(|x| err(x.message))?;
        e.ids.extend(&ids);
        lab.extend(std::iter::repeat_n(-100, ids.len()));
        e.ids.extend(&sep);
        lab.extend(std::iter::repeat_n(-100, sep.len()));
        let last = k + 1 == steps.len();
        if (!p.last_step_only || last) && !lab.is_empty() {
            let i = lab.len() - 1;
            lab[i] = i32::from(*l);
        }
    }
    if let Some(m) = format.max_len {
        e.ids.truncate(m.max(1));
        lab.truncate(m.max(1));
    }
    if lab.iter().all(|&l| l == -100) {
        return Err(data_err(
            at,
            format!(
                "no labelled step is left after truncation to {} tokens",
                e.ids.len()
            ),
        ));
    }
    e.mask = vec![0.0; e.ids.len()];
    Ok((e, lab))
}
