//! Preference and reward objectives: TRL's DPO family, CPO/SimPO, ORPO, KTO, reward
//! modelling and PRM, and a user's own `.vlm` preference function.
//!
//! A pair objective runs the model twice in one graph ([`pair_graph`]): on the chosen and on
//! the rejected sequences (inputs `chosen.<name>` and `rejected.<name>`, the parameters
//! shared), as TRL's concatenated forward does. The loss is `.vlm` code (`std.preference`):
//! a prelude computes the per-pair quantities (log-probabilities summed over completion
//! tokens, lengths, logratios against the reference, f-divergence scores) and the objective's
//! expression combines them. The reference policy's log-probabilities are inputs
//! (`ref_chosen_logps`, `ref_rejected_logps`, or `ref_logps` for labelled rows), computed by
//! [`build_logps`] on the base model (an adapter switched off) or a frozen copy, so the
//! step's gradient is exactly TRL's (the reference runs under `no_grad` there too).
//!
//! Step-graph outputs besides the loss: `stat.<name>` per-row statistics that the runtime
//! turns into TRL's metrics (`rewards/chosen`, `logps/rejected`, ...).

use super::config::{arg, num, PrefData, PrefFamily, Preference};
use super::{splice, TrainError};
use crate::elab::{Elaborated, Setting};
use crate::ir::{DType, Graph, NodeId, Op, TensorType};
use crate::passes::PassManager;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vlmc_grammar::ast::{Item, ScalarType, TypeKind};

/// A graph's outputs by name.
pub type Outputs = Vec<(String, NodeId)>;

/// The prefixes of the two copies of a pair graph's inputs.
pub const SIDES: [&str; 2] = ["chosen", "rejected"];

fn f(args: &[(String, Setting)], k: &str, d: f64) -> f64 {
    arg(args, k).and_then(num).unwrap_or(d)
}

fn b(args: &[(String, Setting)], k: &str) -> bool {
    matches!(arg(args, k), Some(Setting::Bool(true)))
}

/// A float as `.vlm` source.
fn lit(x: f64) -> String {
    let s = format!("{x:?}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// A function's parameters: (name, is a `float`, has a default).
type FnParams = Vec<(String, bool, bool)>;

/// The parameters of function `name` in the `.vlm` module `module` (dotted), found as an
/// import from `dir` would find it.
fn fn_params(dir: &Path, module: &str, name: &str) -> Result<FnParams, String> {
    let rel: PathBuf = module.split('.').collect::<PathBuf>().with_extension("vlm");
    let mut candidates = vec![dir.join(&rel)];
    candidates.extend(
        crate::elab::modules::search_roots()
            .into_iter()
            .map(|r| r.join(&rel)),
    );
    let path = candidates
        .iter()
        .find(|c| c.is_file())
        .ok_or_else(|| format!("cannot find module `{module}`"))?;
    let text = crate::files::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = vlmc_grammar::parse(&text).map_err(|e| format!("{}: {e:?}", path.display()))?;
    for item in &file.items {
        if let Item::Fn(fd) = item {
            if fd.name.name == name {
                return Ok(fd
                    .params
                    .iter()
                    .map(|p| {
                        (
                            p.name.name.clone(),
                            matches!(p.ty.kind, TypeKind::Scalar(ScalarType::Float)),
                            p.default.is_some(),
                        )
                    })
                    .collect());
            }
        }
    }
    Err(format!("module `{module}` has no function `{name}`"))
}

/// A call of `name` (of `module`) with every parameter bound by name: quantities to the
/// prelude's variables of the same name (or `given` expressions), floats to `hyper`.
fn bind_call(
    dir: &Path,
    module: &str,
    name: &str,
    given: &[(&str, String)],
    hyper: &[(&str, f64)],
) -> Result<String, String> {
    let mut args = Vec::new();
    for (p, is_float, has_default) in fn_params(dir, module, name)? {
        if let Some((_, e)) = given.iter().find(|(k, _)| *k == p) {
            args.push(format!("{p}: {e}"));
        } else if is_float {
            match hyper.iter().find(|(k, _)| *k == p) {
                Some((_, v)) => args.push(format!("{p}: {}", lit(*v))),
                None if has_default => {}
                None => return Err(format!("objective `{name}` needs a value for `{p}`")),
            }
        } else {
            args.push(format!("{p}: {p}"));
        }
    }
    Ok(format!("{name}({})", args.join(", ")))
}

/// Reads a built-in preference objective (`dpo`, `ipo`, `mpo`, `cpo`, `simpo`, `orpo`, `kto`,
/// `reward`, `prm`) with TRL 1.16's defaults.
pub fn read(name: &str, args: &[(String, Setting)]) -> Result<Preference, String> {
    let beta = f(args, "beta", 0.1);
    let dir = PathBuf::from(".");
    let sp = "std.preference";
    let mut p = Preference {
        family: PrefFamily::Dpo,
        data: PrefData::Pairs,
        expr: String::new(),
        uses: Vec::new(),
        dir: None,
        reference: true,
        beta,
        ld_alpha: arg(args, "ld_alpha").and_then(num),
        average_logps: false,
        alphapo: 0.0,
        precompute_ref: b(args, "precompute_ref"),
        kl: false,
        step_separator: "\n".into(),
        last_step_only: false,
        fdiv: "{}".into(),
    };
    match name {
        "dpo" | "ipo" | "mpo" => {
            let types: Vec<String> = match (name, arg(args, "loss_type")) {
                ("ipo", _) => vec!["ipo".into()],
                ("mpo", _) => vec!["sigmoid".into(), "bco_pair".into(), "sft".into()],
                (_, Some(Setting::Symbol(s))) => vec![s.clone()],
                (_, Some(Setting::List(v))) => v
                    .iter()
                    .filter_map(|x| match x {
                        Setting::Symbol(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
                _ => vec!["sigmoid".into()],
            };
            let weights: Vec<f64> = match arg(args, "loss_weights") {
                Some(Setting::List(v)) => v.iter().filter_map(num).collect(),
                _ if name == "mpo" => vec![0.8, 0.2, 1.0],
                _ => vec![1.0; types.len()],
            };
            if weights.len() != types.len() {
                return Err(format!(
                    "{} loss weights for {} loss types",
                    weights.len(),
                    types.len()
                ));
            }
            let hyper = [
                ("beta", beta),
                ("label_smoothing", f(args, "label_smoothing", 0.0)),
                ("discopop_tau", f(args, "discopop_tau", 0.05)),
            ];
            let weighted = if b(args, "use_weighting") {
                " * pair_weight"
            } else {
                ""
            };
            let mut terms = Vec::new();
            for (t, w) in types.iter().zip(&weights) {
                let c = bind_call(&dir, sp, &format!("dpo_{t}"), &[], &hyper)?;
                terms.push(format!("{} * mean_over_pairs({c}{weighted})", lit(*w)));
            }
            p.expr = terms.join(" + ");
            p.fdiv = fdiv_of(args);
        }
        "cpo" | "simpo" => {
            p.family = PrefFamily::Cpo;
            p.reference = false;
            let mut lt = match arg(args, "loss_type") {
                Some(Setting::Symbol(s)) => s.clone(),
                _ if name == "simpo" => "simpo".into(),
                _ => "sigmoid".into(),
            };
            let mut cpo_alpha = f(args, "cpo_alpha", if name == "simpo" { 0.0 } else { 1.0 });
            if lt == "alphapo" {
                lt = "simpo".into();
                cpo_alpha = 0.0;
            }
            p.average_logps = lt == "ipo" || lt == "simpo";
            p.alphapo = f(args, "alpha", 0.0);
            let lp = if p.average_logps {
                "avg_logps"
            } else {
                "logps"
            };
            let logits = if p.alphapo != 0.0 {
                format!(
                    "alphapo_reward(chosen_{lp}, {a}) - alphapo_reward(rejected_{lp}, {a})",
                    a = lit(p.alphapo)
                )
            } else {
                format!("chosen_{lp} - rejected_{lp}")
            };
            let hyper = [
                ("beta", beta),
                ("label_smoothing", f(args, "label_smoothing", 0.0)),
                ("simpo_gamma", f(args, "simpo_gamma", 0.5)),
            ];
            let c = bind_call(
                &dir,
                sp,
                &format!("cpo_{lt}"),
                &[("logits", logits)],
                &hyper,
            )?;
            p.expr = format!("mean_over_pairs({c})");
            if cpo_alpha != 0.0 {
                p.expr = format!("{} + {} * chosen_nll", p.expr, lit(cpo_alpha));
            }
        }
        "orpo" => {
            p.family = PrefFamily::Orpo;
            p.reference = false;
            p.average_logps = true;
            // TRL's ORPO: the NLL over the whole chosen sequence, prompt included
            p.expr = format!(
                "chosen_full_nll + mean_over_pairs(orpo_ratio(chosen_avg: chosen_avg_logps, \
                 rejected_avg: rejected_avg_logps, beta: {}))",
                lit(beta)
            );
        }
        "kto" => {
            p.family = PrefFamily::Kto;
            p.data = PrefData::Labeled;
            let lt = match arg(args, "loss_type") {
                Some(Setting::Symbol(s)) => s.clone(),
                _ => "kto".into(),
            };
            p.kl = lt == "kto";
            let hyper = [
                ("beta", beta),
                ("desirable_weight", f(args, "desirable_weight", 1.0)),
                ("undesirable_weight", f(args, "undesirable_weight", 1.0)),
            ];
            let func = if p.kl {
                "kto_loss".to_string()
            } else {
                format!("kto_{lt}")
            };
            p.expr = bind_call(&dir, sp, &func, &[], &hyper)?;
        }
        "reward" => {
            p.family = PrefFamily::Reward;
            p.reference = false;
            p.expr = bind_call(
                &dir,
                sp,
                "reward_loss",
                &[],
                &[(
                    "center_rewards_coefficient",
                    f(args, "center_rewards_coefficient", 0.0),
                )],
            )?;
        }
        "prm" => {
            p.family = PrefFamily::Prm;
            p.data = PrefData::Steps;
            p.reference = false;
            p.expr = "token_class_loss(logits: model_out, labels: labels, mask: loss_mask)".into();
            if let Some(Setting::Str(s)) = arg(args, "step_separator") {
                p.step_separator = s.clone();
            }
            p.last_step_only = b(args, "train_on_last_step_only");
        }
        other => return Err(format!("`{other}` is not a preference objective")),
    }
    Ok(p)
}

/// The f-divergence of a DPO objective as the prelude's score expression (`{}` is the
/// logratio).
fn fdiv_of(args: &[(String, Setting)]) -> String {
    match arg(args, "f_divergence_type") {
        Some(Setting::Symbol(s)) if s == "forward_kl" => "score_forward_kl({})".into(),
        Some(Setting::Symbol(s)) if s == "js_divergence" => "score_js({})".into(),
        Some(Setting::Symbol(s)) if s == "alpha_divergence" => {
            let a = f(args, "f_alpha_divergence_coef", 0.5);
            if (a - 1.0).abs() < 1e-6 {
                "{}".into()
            } else {
                format!("score_alpha({{}}, {})", lit(a))
            }
        }
        _ => "{}".into(),
    }
}

/// A user's pair objective: `name` of module `reference` (`"<spec folder>|<module>"`),
/// averaged over nothing: it returns the batch's loss.
pub fn custom(
    name: &str,
    args: &[(String, Setting)],
    reference: &str,
) -> Result<Preference, String> {
    let (dir, module) = reference
        .split_once('|')
        .ok_or_else(|| format!("objective `{name}`: no module recorded"))?;
    let dir = PathBuf::from(dir);
    let params = fn_params(&dir, module, name)?;
    let hyper: Vec<(&str, f64)> = args
        .iter()
        .filter_map(|(k, v)| num(v).map(|x| (k.as_str(), x)))
        .collect();
    let expr = bind_call(&dir, module, name, &[], &hyper)?;
    let reads = |q: &str| params.iter().any(|(p, _, _)| p.contains(q));
    Ok(Preference {
        family: PrefFamily::Custom,
        data: PrefData::Pairs,
        expr,
        uses: vec![format!("use {module}.{name}")],
        dir: Some(dir),
        reference: reads("ref_") || reads("logratios"),
        beta: f(args, "beta", 0.1),
        ld_alpha: None,
        average_logps: false,
        alphapo: 0.0,
        precompute_ref: false,
        kl: false,
        step_separator: "\n".into(),
        last_step_only: false,
        fdiv: "{}".into(),
    })
}

/// The forward run on the chosen and the rejected rows: two copies of `g` sharing its
/// parameters, each input `x` as `chosen.x` and `rejected.x` (uniform draws, `uniform_*`,
/// shared). Returns the graph and each copy's outputs by name.
pub fn pair_graph(g: &Graph) -> Result<(Graph, [Outputs; 2]), TrainError> {
    let mut pg = Graph::new(&g.name);
    pg.dims = g.dims.clone();
    let mut outs: [Outputs; 2] = [Vec::new(), Vec::new()];
    for (k, side) in SIDES.iter().enumerate() {
        let mut bind = HashMap::new();
        for (_, name, ty) in g.inputs() {
            let new = if name.starts_with("uniform_") {
                name.to_string()
            } else {
                format!("{side}.{name}")
            };
            let id = match pg.input(&new) {
                Some(id) => id,
                None => pg
                    .add_source(Op::Input { name: new }, ty.clone(), "data")
                    .map_err(|e| TrainError(e.to_string()))?,
            };
            bind.insert(name.to_string(), id);
        }
        let map = splice::splice(&mut pg, g, &bind, side).map_err(TrainError)?;
        outs[k] = g
            .outputs
            .iter()
            .map(|(n, id)| (n.clone(), map[id]))
            .collect();
    }
    Ok((pg, outs))
}

/// The model output a preference objective reads: `logits` (or the first float output of
/// rank 3) for language-model families; for reward models the first float output, the
/// scores [B, 1] or [B].
fn scored_output(
    outs: &[(String, NodeId)],
    g: &Graph,
    family: PrefFamily,
) -> Result<NodeId, TrainError> {
    let is = |id: &NodeId, rank: &[usize]| {
        let t = &g.node(*id).ty;
        t.dtype.is_float() && rank.contains(&t.rank())
    };
    let pick = match family {
        PrefFamily::Reward => outs.iter().find(|(_, id)| is(id, &[1, 2])),
        _ => outs
            .iter()
            .find(|(n, id)| n == "logits" && is(id, &[3]))
            .or_else(|| outs.iter().find(|(_, id)| is(id, &[3]))),
    };
    pick.map(|(_, id)| *id).ok_or_else(|| {
        let names: Vec<&str> = outs.iter().map(|(n, _)| n.as_str()).collect();
        TrainError(format!(
            "the objective needs {} among the model's outputs ({})",
            if family == PrefFamily::Reward {
                "scores f32[B, 1] (a sequence-classification head)"
            } else {
                "logits f32[B, L, V]"
            },
            names.join(", ")
        ))
    })
}

/// A text parameter list entry for graph node `id`.
fn param(g: &Graph, name: &str, id: NodeId) -> String {
    format!("{name}: {}", g.node(id).ty)
}

/// What a loss text reads and returns, and the graph nodes bound to its parameters.
struct LossText {
    params: Vec<String>,
    bind: HashMap<String, NodeId>,
    prelude: Vec<String>,
    /// (output name, expression, type)
    outputs: Vec<(String, String, String)>,
}

impl LossText {
    fn new() -> LossText {
        LossText {
            params: Vec::new(),
            bind: HashMap::new(),
            prelude: Vec::new(),
            outputs: Vec::new(),
        }
    }

    fn read(&mut self, g: &Graph, name: &str, id: NodeId) {
        self.params.push(param(g, name, id));
        self.bind.insert(name.to_string(), id);
    }

    fn input(&mut self, g: &mut Graph, name: &str, ty: TensorType) -> Result<(), TrainError> {
        let id = match g.input(name) {
            Some(id) => id,
            None => g
                .add_source(Op::Input { name: name.into() }, ty, "data")
                .map_err(|e| TrainError(e.to_string()))?,
        };
        self.read(g, name, id);
        Ok(())
    }

    fn out(&mut self, name: &str, expr: impl Into<String>, ty: &str) {
        self.outputs.push((name.into(), expr.into(), ty.into()));
    }

    /// Elaborates the text and splices it into `g`; returns its outputs' nodes by name.
    fn splice(self, g: &mut Graph, p: &Preference) -> Result<Vec<(String, NodeId)>, TrainError> {
        let mut text = String::from("use std.preference.*\n");
        for u in &p.uses {
            text.push_str(u);
            text.push('\n');
        }
        let ret: Vec<String> = self
            .outputs
            .iter()
            .map(|(n, _, t)| format!("{n}: {t}"))
            .collect();
        let vals: Vec<&str> = self.outputs.iter().map(|(_, e, _)| e.as_str()).collect();
        text.push_str(&format!(
            "model Objective {{\n  fn forward({}) -> ({}) {{\n",
            self.params.join(", "),
            ret.join(", ")
        ));
        for l in &self.prelude {
            text.push_str(&format!("    {l}\n"));
        }
        let tuple = match vals.len() {
            1 => format!("({},)", vals[0]),
            _ => format!("({})", vals.join(", ")),
        };
        text.push_str(&format!("    return {tuple}\n  }}\n}}\n"));
        let dir = p.dir.clone().unwrap_or_else(|| PathBuf::from("."));
        let checked = crate::elab::check_text(&dir.join("objective.vlm"), text.clone());
        let rendered = checked.render();
        let mut models = checked.result.map_err(|_| {
            TrainError(format!(
                "the objective does not elaborate:\n{rendered}\n{text}"
            ))
        })?;
        let lg = models.pop().expect("one model").graph;
        let map = splice::splice(g, &lg, &self.bind, "loss").map_err(TrainError)?;
        Ok(lg
            .outputs
            .iter()
            .map(|(n, id)| (n.clone(), map[id]))
            .collect())
    }
}

/// The batch dimension of a model's `ids` input, as an f32[B] type.
fn per_row(g: &Graph, ids: NodeId) -> TensorType {
    TensorType::new(DType::F32, vec![g.node(ids).ty.shape.0[0].clone()])
}

fn ids_and_mask(g: &mut Graph, prefix: &str) -> Result<(NodeId, NodeId), TrainError> {
    let name = format!("{prefix}ids");
    let ids = g.input(&name).ok_or_else(|| {
        TrainError("a preference objective needs a model input `ids` (i32[B, T])".into())
    })?;
    let ity = g.node(ids).ty.clone();
    if ity.dtype != DType::I32 || ity.rank() != 2 {
        return Err(TrainError(format!("`ids` must be i32[B, T], found {ity}")));
    }
    let mname = format!("{prefix}loss_mask");
    let mask = match g.input(&mname) {
        Some(m) => m,
        None => g
            .add_source(
                Op::Input { name: mname },
                TensorType::new(DType::F32, ity.shape.clone()),
                "data",
            )
            .map_err(|e| TrainError(e.to_string()))?,
    };
    Ok((ids, mask))
}

/// The per-pair quantities as `let` lines (the objective names what it needs; the rest is
/// removed as dead code).
fn pair_prelude(p: &Preference, with_ref: bool) -> Vec<String> {
    let mut l = vec![
        "let chosen_len = completion_len(chosen_mask)".to_string(),
        "let rejected_len = completion_len(rejected_mask)".to_string(),
    ];
    for s in SIDES {
        let w = match p.ld_alpha {
            Some(a) => format!(
                "ld_weights({s}_mask, minimum(chosen_len, rejected_len), {})",
                lit(a)
            ),
            None => format!("{s}_mask"),
        };
        l.push(format!(
            "let {s}_logps = sequence_logps({s}_logits, {s}_ids, {w})"
        ));
        l.push(format!(
            "let {s}_token_logps = sequence_logps({s}_logits, {s}_ids, {s}_mask)"
        ));
        l.push(format!(
            "let {s}_avg_logps = {s}_token_logps / maximum({s}_len, 1.0)"
        ));
    }
    l.push(
        "let chosen_nll = -sum(chosen_token_logps, axis: 0) / maximum(sum(chosen_len, axis: 0), 1.0)"
            .into(),
    );
    // every real token of the chosen rows (right padding: up to the completion's end)
    l.push("let chosen_real = real_tokens(chosen_mask)".into());
    l.push(
        "let chosen_full_nll = -sum(sequence_logps(chosen_logits, chosen_ids, chosen_real), axis: 0) \
         / maximum(sum(completion_len(chosen_real), axis: 0), 1.0)"
            .into(),
    );
    if with_ref {
        for s in SIDES {
            l.push(format!("let {s}_logratios = {s}_logps - ref_{s}_logps"));
            l.push(format!(
                "let {s}_scores = {}",
                p.fdiv.replace("{}", &format!("{s}_logratios"))
            ));
        }
        l.push(
            "let pair_weight = exp(wpo_log_weight(chosen_logits, chosen_ids, chosen_mask) + \
             wpo_log_weight(rejected_logits, rejected_ids, rejected_mask))"
                .into(),
        );
    }
    l
}

/// Joins the objective `p` to the model graph `g` (rewritten into the pair graph for pair
/// objectives). Returns the loss node and the statistics (`stat.<name>` outputs).
pub fn attach(
    g: &mut Graph,
    p: &Preference,
) -> Result<(NodeId, Vec<(String, NodeId)>), TrainError> {
    let mut t = LossText::new();
    match p.data {
        PrefData::Pairs => {
            let (mut pg, outs) = pair_graph(g)?;
            let mut ids0 = None;
            for (k, s) in SIDES.iter().enumerate() {
                let out = scored_output(&outs[k], &pg, p.family)?;
                if p.family == PrefFamily::Reward {
                    t.read(&pg, &format!("{s}_scores_raw"), out);
                    let r = if pg.node(out).ty.rank() == 2 {
                        format!("sum({s}_scores_raw, axis: -1)")
                    } else {
                        format!("{s}_scores_raw")
                    };
                    t.prelude.push(format!("let {s}_rewards = {r}"));
                    let ids = pg.input(&format!("{s}.ids")).ok_or_else(|| {
                        TrainError("a reward model needs a model input `ids` (i32[B, T])".into())
                    })?;
                    ids0 = Some(ids);
                    continue;
                }
                // sizes appear alone (ids: [B, T]) before expressions of them (logits)
                let (ids, mask) = ids_and_mask(&mut pg, &format!("{s}."))?;
                t.read(&pg, &format!("{s}_ids"), ids);
                t.read(&pg, &format!("{s}_mask"), mask);
                t.read(&pg, &format!("{s}_logits"), out);
                ids0 = Some(ids);
            }
            let row = per_row(&pg, ids0.expect("two sides"));
            if p.family == PrefFamily::Reward {
                t.input(&mut pg, "margin", row.clone())?;
                t.out("loss", p.expr.clone(), "f32[]");
                t.out("chosen_rewards", "chosen_rewards", &row.to_string());
                t.out("rejected_rewards", "rejected_rewards", &row.to_string());
            } else {
                if p.reference {
                    t.input(&mut pg, "ref_chosen_logps", row.clone())?;
                    t.input(&mut pg, "ref_rejected_logps", row.clone())?;
                }
                t.prelude.extend(pair_prelude(p, p.reference));
                t.out("loss", p.expr.clone(), "f32[]");
                let (lp, r) = (
                    if p.average_logps {
                        "avg_logps"
                    } else {
                        "logps"
                    },
                    row.to_string(),
                );
                for s in SIDES {
                    t.out(&format!("{s}_logps"), format!("{s}_{lp}"), &r);
                    t.out(&format!("{s}_len"), format!("{s}_len"), &r);
                    let logits = if p.family == PrefFamily::Cpo {
                        // CPO logs the mean of every logit of the sequence, ORPO of every
                        // position but the last
                        format!("mean_logits_all({s}_logits)")
                    } else if p.family == PrefFamily::Orpo {
                        format!("mean_logits_all({s}_logits[:, :-1, :])")
                    } else {
                        format!("sequence_mean_logits({s}_logits, {s}_mask)")
                    };
                    t.out(&format!("{s}_logits"), logits, &r);
                }
            }
            *g = pg;
        }
        PrefData::Labeled => {
            let outs: Vec<(String, NodeId)> = g.outputs.clone();
            let out = scored_output(&outs, g, p.family)?;
            let (ids, mask) = ids_and_mask(g, "")?;
            let row = per_row(g, ids);
            t.read(g, "ids", ids);
            t.read(g, "loss_mask", mask);
            t.read(g, "logits", out);
            t.input(g, "label", row.clone())?;
            if p.reference {
                t.input(g, "ref_logps", row.clone())?;
            }
            if p.kl {
                t.input(g, "kl", TensorType::new(DType::F32, vec![]))?;
            }
            t.prelude
                .push("let logps = sequence_logps(logits, ids, loss_mask)".into());
            if p.reference {
                t.prelude.push("let logratios = logps - ref_logps".into());
            }
            let r = row.to_string();
            t.out("loss", p.expr.clone(), "f32[]");
            t.out("logps", "logps", &r);
            t.out("len", "completion_len(loss_mask)", &r);
            t.out("logits", "sequence_mean_logits(logits, loss_mask)", &r);
        }
        PrefData::Steps => {
            let outs: Vec<(String, NodeId)> = g.outputs.clone();
            let out = scored_output(&outs, g, p.family)?;
            let ids = g.input("ids").ok_or_else(|| {
                TrainError("a PRM objective needs a model input `ids` (i32[B, T])".into())
            })?;
            let ity = g.node(ids).ty.clone();
            t.read(g, "model_out", out);
            t.input(g, "labels", TensorType::new(DType::I32, ity.shape.clone()))?;
            t.input(
                g,
                "loss_mask",
                TensorType::new(DType::F32, ity.shape.clone()),
            )?;
            let r = per_row(g, ids).to_string();
            t.out("loss", p.expr.clone(), "f32[]");
            t.out(
                "correct",
                "token_class_correct(model_out, labels, loss_mask)",
                &r,
            );
            t.out("len", "sum(loss_mask, axis: -1)", &r);
        }
    }
    let outs = t.splice(g, p)?;
    let mut loss = None;
    let mut stats = Vec::new();
    for (n, id) in outs {
        if n == "loss" {
            loss = Some(id);
        } else {
            stats.push((n, id));
        }
    }
    Ok((loss.expect("a loss output"), stats))
}

/// The graph of per-row log-probabilities of trainer `cfg`'s policy (`adapted`: with its
/// adapter, no dropout) or of its reference (the base model: an adapter switched off).
/// Pair objectives: inputs `chosen.*` and `rejected.*`, outputs `chosen_logps` and
/// `rejected_logps` (LD-DPO's weighting included); labelled rows: output `logps`.
pub fn build_logps(
    model: &Elaborated,
    cfg: &super::TrainConfig,
    p: &Preference,
    adapted: bool,
) -> Result<Graph, TrainError> {
    let mut g = if adapted {
        super::adapted_graph(model, cfg, 0.0)?.0
    } else {
        model.graph.clone()
    };
    let mut t = LossText::new();
    match p.data {
        PrefData::Pairs => {
            let (mut pg, outs) = pair_graph(&g)?;
            let mut ids0 = None;
            for (k, s) in SIDES.iter().enumerate() {
                let out = scored_output(&outs[k], &pg, p.family)?;
                // sizes appear alone (ids: [B, T]) before expressions of them (logits)
                let (ids, mask) = ids_and_mask(&mut pg, &format!("{s}."))?;
                t.read(&pg, &format!("{s}_ids"), ids);
                t.read(&pg, &format!("{s}_mask"), mask);
                t.read(&pg, &format!("{s}_logits"), out);
                ids0 = Some(ids);
            }
            let r = per_row(&pg, ids0.expect("two sides")).to_string();
            t.prelude.extend(pair_prelude(p, false));
            t.out("chosen_logps", "chosen_logps", &r);
            t.out("rejected_logps", "rejected_logps", &r);
            g = pg;
        }
        PrefData::Labeled => {
            let outs: Vec<(String, NodeId)> = g.outputs.clone();
            let out = scored_output(&outs, &g, p.family)?;
            let (ids, mask) = ids_and_mask(&mut g, "")?;
            let r = per_row(&g, ids).to_string();
            t.read(&g, "ids", ids);
            t.read(&g, "loss_mask", mask);
            t.read(&g, "logits", out);
            t.out("logps", "sequence_logps(logits, ids, loss_mask)", &r);
        }
        PrefData::Steps => {
            return Err(TrainError("a PRM objective has no reference model".into()));
        }
    }
    let outs = t.splice(&mut g, p)?;
    g.outputs.clear();
    for (n, id) in outs {
        g.set_output(&n, id)
            .map_err(|e| TrainError(e.to_string()))?;
    }
    g.name = format!(
        "{}.{}.{}",
        model.model,
        cfg.name,
        if adapted { "logps" } else { "ref_logps" }
    );
    PassManager::inference().run(&mut g)?;
    Ok(g)
}
