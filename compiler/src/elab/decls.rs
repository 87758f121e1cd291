//! `adapter` and `trainer` declarations: checked against the elaborated model (every path
//! pattern must match something, every method, objective, optimiser and setting must be known
//! with arguments of the right kind). They run in later stages; here they are validated and
//! summarised.

use super::modules::{ItemRef, Program};
use super::value::{Instance, Value};
use super::Elaborated;
use crate::diag::{Diagnostic, Loc};
use std::rc::Rc;
use vlmc_grammar::ast::{
    AdapterDecl, CheckpointRule, Expr, ExprKind, FnDecl, Item, PatSeg, Pattern, ScalarType,
    SettingValue, Span, TrainerDecl, TypeKind, UnaryOp,
};

type R<T> = Result<T, Diagnostic>;

/// A checked adapter: its method with arguments and the module paths it applies to.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub method: String,
    pub args: Vec<(String, Setting)>,
    pub targets: Vec<String>,
}

/// A checked trainer: its settings, and the parameter paths it trains.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerInfo {
    pub name: String,
    pub settings: Vec<(String, Setting)>,
    pub trainable: Vec<String>,
}

/// A compile-time value in an adapter or trainer declaration.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Symbol(String),
    List(Vec<Setting>),
    Call(String, Vec<(String, Setting)>),
    Paths(Vec<String>),
}

/// (method, [(argument, kind)]) for adapters. Kinds: i int, f number, b bool, s symbol.
const ADAPTERS: &[(&str, &[(&str, char)])] = &[
    (
        "lora",
        &[
            ("rank", 'i'),
            ("alpha", 'f'),
            ("dropout", 'f'),
            ("rslora", 'b'),
        ],
    ),
    (
        "qlora",
        &[
            ("rank", 'i'),
            ("alpha", 'f'),
            ("dropout", 'f'),
            ("rslora", 'b'),
            ("block_size", 'i'),
            ("double_quant", 'b'),
        ],
    ),
    ("ia3", &[]),
    ("houlsby", &[("bottleneck", 'i'), ("act", 's')]),
    ("pfeiffer", &[("bottleneck", 'i'), ("act", 's')]),
    ("prompt", &[("tokens", 'i')]),
    (
        "prefix",
        &[("tokens", 'i'), ("reparam", 'b'), ("hidden", 'i')],
    ),
];

/// Objectives and their arguments: (name, [(argument, kind)]). Kinds: i int, f number, b bool,
/// s name, t string, l list of numbers, or the allowed names separated by `|`.
const OBJECTIVES: &[(&str, &[(&str, &str)])] = &[
    ("pretrain", &[]),
    ("sft", &[("mask", "prompt|none|assistant")]),
    (
        "dpo",
        &[
            ("beta", "f"),
            ("loss_type", "y"),
            ("loss_weights", "l"),
            ("label_smoothing", "f"),
            ("ld_alpha", "f"),
            ("use_weighting", "b"),
            (
                "f_divergence_type",
                "reverse_kl|forward_kl|js_divergence|alpha_divergence",
            ),
            ("f_alpha_divergence_coef", "f"),
            ("discopop_tau", "f"),
            ("precompute_ref", "b"),
        ],
    ),
    (
        "ipo",
        &[("beta", "f"), ("precompute_ref", "b"), ("ld_alpha", "f")],
    ),
    (
        "mpo",
        &[
            ("beta", "f"),
            ("loss_weights", "l"),
            ("precompute_ref", "b"),
        ],
    ),
    ("online_dpo", &[("beta", "f"), ("loss_type", "sigmoid|ipo")]),
    (
        "cpo",
        &[
            ("beta", "f"),
            ("loss_type", "sigmoid|hinge|ipo|simpo|alphapo"),
            ("label_smoothing", "f"),
            ("cpo_alpha", "f"),
            ("simpo_gamma", "f"),
            ("alpha", "f"),
        ],
    ),
    (
        "simpo",
        &[
            ("beta", "f"),
            ("simpo_gamma", "f"),
            ("cpo_alpha", "f"),
            ("label_smoothing", "f"),
        ],
    ),
    (
        "kto",
        &[
            ("beta", "f"),
            ("desirable_weight", "f"),
            ("undesirable_weight", "f"),
            ("loss_type", "kto|apo_zero_unpaired"),
            ("precompute_ref", "b"),
        ],
    ),
    ("nash_md", &[("beta", "f"), ("mixture_coef", "f")]),
    ("orpo", &[("beta", "f")]),
    ("xpo", &[("beta", "f"), ("alpha", "f")]),
    ("reward", &[("center_rewards_coefficient", "f")]),
    (
        "ppo",
        &[
            ("gamma", "f"),
            ("lam", "f"),
            ("cliprange", "f"),
            ("cliprange_value", "f"),
            ("vf_coef", "f"),
            ("kl_coef", "f"),
            ("ppo_epochs", "i"),
        ],
    ),
    (
        "prm",
        &[("step_separator", "t"), ("train_on_last_step_only", "b")],
    ),
    (
        "grpo",
        &[
            ("beta", "f"),
            ("epsilon", "f"),
            ("epsilon_high", "f"),
            ("num_generations", "i"),
            ("num_iterations", "i"),
            ("loss_type", "grpo|bnpo|dr_grpo|dapo"),
            ("scale_rewards", "group|batch|none"),
        ],
    ),
    ("rloo", &[("beta", "f"), ("num_generations", "i")]),
    (
        "gkd",
        &[
            ("beta", "f"),
            ("lmbda", "f"),
            ("temperature", "f"),
            ("seq_kd", "b"),
        ],
    ),
    ("distill", &[("temperature", "f"), ("alpha", "f")]),
    ("clip", &[]),
    ("siglip", &[]),
    ("itc", &[("label_smoothing", "f")]),
    ("itm", &[]),
    ("itg", &[("label_smoothing", "f")]),
    ("blip2_stage1", &[]),
];

const OPTIMIZERS: &[(&str, &[&str])] = &[
    ("adamw", &["lr", "beta1", "beta2", "eps", "weight_decay"]),
    ("adam", &["lr", "beta1", "beta2", "eps"]),
    ("sgd", &["lr", "momentum", "weight_decay", "nesterov"]),
];

const SCHEDULES: &[(&str, &[&str])] = &[
    ("constant", &["warmup", "warmup_steps", "warmup_ratio"]),
    ("linear", &["warmup", "warmup_steps", "warmup_ratio"]),
    (
        "cosine",
        &["warmup", "warmup_steps", "warmup_ratio", "min_lr"],
    ),
];

/// Trainer settings and the kind of value each takes: i int, f number, p patterns, c call,
/// n name of another declaration.
const SETTINGS: &[(&str, char)] = &[
    ("objective", 'c'),
    ("optimizer", 'c'),
    ("schedule", 'c'),
    ("train", 'p'),
    ("freeze", 'p'),
    ("adapter", 'n'),
    ("from", 'n'),
    ("batch", 'i'),
    ("steps", 'i'),
    ("epochs", 'i'),
    ("seed", 'i'),
    ("grad_accum", 'i'),
    ("clip_grad", 'f'),
    ("eval_every", 'i'),
    ("save_every", 'i'),
    ("log_every", 'i'),
    ("save_total_limit", 'i'),
    ("max_len", 'i'),
    ("lr", 'f'),
    ("data", 't'),
];

fn err(prog: &Program, module: usize, span: Span, msg: impl Into<String>) -> Diagnostic {
    Diagnostic::new(
        Loc {
            file: prog.modules[module].file,
            span,
        },
        msg,
    )
}

/// Evaluates a declaration's argument: literals, names (as symbols), calls, lists.
fn setting(prog: &Program, module: usize, e: &Expr) -> R<Setting> {
    Ok(match &e.kind {
        ExprKind::Int(i) => Setting::Int(*i),
        ExprKind::Float(f) => Setting::Float(*f),
        ExprKind::Bool(b) => Setting::Bool(*b),
        ExprKind::Str(s) => Setting::Str(s.clone()),
        ExprKind::Name(n) => Setting::Symbol(n.clone()),
        ExprKind::Unary {
            op: UnaryOp::Neg,
            operand,
        } => match setting(prog, module, operand)? {
            Setting::Int(i) => Setting::Int(-i),
            Setting::Float(f) => Setting::Float(-f),
            _ => return Err(err(prog, module, e.span, "`-` needs a number")),
        },
        ExprKind::List(items) => Setting::List(
            items
                .iter()
                .map(|i| setting(prog, module, i))
                .collect::<R<_>>()?,
        ),
        ExprKind::Call { callee, args } => {
            let ExprKind::Name(n) = &callee.kind else {
                return Err(err(
                    prog,
                    module,
                    callee.span,
                    "expected a name such as `adamw`",
                ));
            };
            let mut out = Vec::new();
            for a in args {
                let Some(k) = &a.name else {
                    return Err(err(
                        prog,
                        module,
                        a.value.span,
                        "arguments here must be named, e.g. `lr: 1e-4`",
                    )
                    .label("unnamed argument"));
                };
                out.push((k.name.clone(), setting(prog, module, &a.value)?));
            }
            Setting::Call(n.clone(), out)
        }
        _ => {
            return Err(err(
                prog,
                module,
                e.span,
                "expected a number, a name or a call such as `adamw(lr: 1e-4)`",
            )
            .label("not a constant"))
        }
    })
}

fn kind_ok(s: &Setting, kind: char) -> bool {
    match kind {
        'i' => matches!(s, Setting::Int(_)),
        'f' => matches!(s, Setting::Int(_) | Setting::Float(_)),
        'b' => matches!(s, Setting::Bool(_)),
        's' => matches!(s, Setting::Symbol(_)),
        _ => true,
    }
}

fn kind_name(kind: char) -> &'static str {
    match kind {
        'i' => "an integer",
        'f' => "a number",
        'b' => "true or false",
        's' => "a name",
        'c' => "a call such as `adamw(lr: 1e-4)`",
        't' => "a string",
        'n' => "the name of a declaration",
        _ => "path patterns",
    }
}

/// All module paths and parameter paths under `inst` (depth-first, declaration order).
fn paths(inst: &Rc<Instance>, graph: &crate::ir::Graph) -> (Vec<String>, Vec<String>) {
    fn walk(inst: &Rc<Instance>, out: &mut Vec<String>) {
        if !inst.path.is_empty() {
            out.push(inst.path.clone());
        }
        for n in &inst.order {
            collect(inst.env.get(n), out);
        }
    }
    fn collect(v: Option<&Value>, out: &mut Vec<String>) {
        match v {
            Some(Value::Module(m)) => walk(m, out),
            Some(Value::List(items)) => items.iter().for_each(|i| collect(Some(i), out)),
            _ => {}
        }
    }
    let mut modules = Vec::new();
    walk(inst, &mut modules);
    let params = graph
        .params()
        .into_iter()
        .map(|(_, p, _, _)| p.to_string())
        .collect();
    (modules, params)
}

/// Whether a pattern matches a whole dotted path.
pub fn pattern_matches(p: &Pattern, path: &str) -> bool {
    fn go(segs: &[PatSeg], parts: &[&str]) -> bool {
        match segs.split_first() {
            None => parts.is_empty(),
            Some((PatSeg::DoubleStar, rest)) => (0..=parts.len()).any(|k| go(rest, &parts[k..])),
            Some((s, rest)) => match parts.split_first() {
                None => false,
                Some((head, tail)) => {
                    let ok = match s {
                        PatSeg::Name(n) => n == head,
                        PatSeg::Star => true,
                        PatSeg::Alt(v) => v.iter().any(|n| n == head),
                        PatSeg::DoubleStar => false,
                    };
                    ok && go(rest, tail)
                }
            },
        }
    }
    let parts: Vec<&str> = path.split('.').collect();
    go(&p.segs, &parts)
}

/// Checks the adapters declared for `model` in its file.
pub fn check_adapters(
    prog: &Program,
    model: ItemRef,
    root: &Rc<Instance>,
    graph: &crate::ir::Graph,
) -> R<Vec<AdapterInfo>> {
    let (modules, _) = paths(root, graph);
    let mut out = Vec::new();
    for a in decls::<AdapterDecl>(prog, model) {
        out.push(check_adapter(prog, model.module, a, &modules, graph)?);
    }
    Ok(out)
}

fn check_adapter(
    prog: &Program,
    m: usize,
    a: &AdapterDecl,
    modules: &[String],
    graph: &crate::ir::Graph,
) -> R<AdapterInfo> {
    let method = setting(prog, m, &a.method)?;
    let (name, args) = match method {
        Setting::Call(n, args) => (n, args),
        Setting::Symbol(n) => (n, Vec::new()),
        _ => {
            return Err(err(
                prog,
                m,
                a.method.span,
                "expected an adapter method such as `lora(rank: 8)`",
            ))
        }
    };
    let Some((_, sig)) = ADAPTERS.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = ADAPTERS.iter().map(|(n, _)| *n).collect();
        return Err(err(
            prog,
            m,
            a.method.span,
            format!("unknown adapter method `{name}`"),
        )
        .label("not an adapter method")
        .note(format!("methods: {}", known.join(", "))));
    };
    for (k, v) in &args {
        match sig.iter().find(|(n, _)| n == k) {
            None => {
                let ks: Vec<&str> = sig.iter().map(|(n, _)| *n).collect();
                return Err(err(
                    prog,
                    m,
                    arg_span(&a.method, k, true),
                    format!("`{name}` has no argument `{k}`"),
                )
                .label("unknown argument")
                .note(format!(
                    "arguments: {}",
                    if ks.is_empty() {
                        "none".into()
                    } else {
                        ks.join(", ")
                    }
                )));
            }
            Some((_, kind)) if !kind_ok(v, *kind) => {
                return Err(err(
                    prog,
                    m,
                    arg_span(&a.method, k, false),
                    format!("`{name}`'s `{k}` must be {}", kind_name(*kind)),
                )
                .label("wrong kind of value"));
            }
            _ => {}
        }
    }
    if name == "lora" || name == "qlora" {
        if let Some((_, Setting::Int(r))) = args.iter().find(|(k, _)| k == "rank") {
            if *r <= 0 {
                return Err(err(
                    prog,
                    m,
                    arg_span(&a.method, "rank", false),
                    format!("LoRA rank must be positive, got {r}"),
                )
                .label("not a valid rank"));
            }
        }
    }
    let mut targets = Vec::new();
    for p in &a.targets {
        let hits: Vec<&String> = modules
            .iter()
            .filter(|path| pattern_matches(p, path))
            .collect();
        if !hits.is_empty() {
            if let Some(e) = dead_alternative_error(prog, m, p, modules) {
                return Err(e);
            }
        }
        if hits.is_empty() {
            return Err(err(
                prog,
                m,
                p.span,
                format!(
                    "adapter target `{p}` matches no module of `{}`",
                    a.model.name
                ),
            )
            .label("matches nothing")
            .note(suggest_paths(modules, p)));
        }
        for h in hits {
            if (name == "lora" || name == "qlora" || name == "ia3")
                && graph
                    .param(&format!("{h}.weight"))
                    .is_none_or(|w| graph.node(w).ty.rank() != 2)
            {
                return Err(err(
                    prog,
                    m,
                    p.span,
                    format!("`{name}` applies to linear layers, but `{h}` has no 2-D `weight`"),
                )
                .label("not a linear layer"));
            }
            if !targets.contains(h) {
                targets.push(h.clone());
            }
        }
    }
    Ok(AdapterInfo {
        name: a.name.name.clone(),
        method: name,
        args,
        targets,
    })
}

/// An alternative of `p` (`{q_proj, out_proj}`) that matches none of `paths` although the
/// pattern as a whole does, with the names that stand at its place in the paths `p` could
/// match with any name there.
fn dead_alternative(p: &Pattern, paths: &[String]) -> Option<(String, Vec<String>)> {
    for (i, seg) in p.segs.iter().enumerate() {
        let PatSeg::Alt(alts) = seg else { continue };
        let with = |seg: PatSeg| {
            let mut q = p.clone();
            q.segs[i] = seg;
            q
        };
        let matches_any = |q: &Pattern| paths.iter().any(|path| pattern_matches(q, path));
        let Some(dead) = alts
            .iter()
            .find(|a| !matches_any(&with(PatSeg::Name((*a).clone()))))
        else {
            continue;
        };
        let mut names: Vec<String> = paths
            .iter()
            .flat_map(|path| path.split('.'))
            .filter(|c| c.parse::<usize>().is_err())
            .map(str::to_string)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|c| matches_any(&with(PatSeg::Name(c.clone()))))
            .collect();
        names.truncate(24);
        return Some((dead.clone(), names));
    }
    None
}

/// The error for an alternative of `p` that matches nothing (see [`dead_alternative`]).
fn dead_alternative_error(
    prog: &Program,
    m: usize,
    p: &Pattern,
    paths: &[String],
) -> Option<Diagnostic> {
    let (dead, names) = dead_alternative(p, paths)?;
    Some(
        err(
            prog,
            m,
            p.span,
            format!("`{dead}` in `{p}` matches nothing"),
        )
        .label("an alternative that matches nothing")
        .note(format!("names there: {}", names.join(", "))),
    )
}

fn suggest_paths(modules: &[String], p: &Pattern) -> String {
    let first = match p.segs.first() {
        Some(PatSeg::Name(n)) => n.clone(),
        _ => String::new(),
    };
    let mut near: Vec<&String> = modules
        .iter()
        .filter(|m| m.starts_with(&first) && !first.is_empty())
        .take(6)
        .collect();
    if near.is_empty() {
        near = modules
            .iter()
            .filter(|m| !m.contains('.'))
            .take(8)
            .collect();
    }
    let near: Vec<&str> = near.iter().map(|s| s.as_str()).collect();
    format!("modules include: {}", near.join(", "))
}

/// Checks the trainers declared for `model` in its file.
pub fn check_trainers(
    prog: &Program,
    model: ItemRef,
    root: &Rc<Instance>,
    graph: &crate::ir::Graph,
    adapters: &[AdapterInfo],
) -> R<Vec<TrainerInfo>> {
    let (modules, params) = paths(root, graph);
    let trainer_names: Vec<String> = decls::<TrainerDecl>(prog, model)
        .iter()
        .map(|t| t.name.name.clone())
        .collect();
    let mut out = Vec::new();
    for t in decls::<TrainerDecl>(prog, model) {
        out.push(check_trainer(
            prog,
            model.module,
            t,
            &modules,
            &params,
            adapters,
            &trainer_names,
        )?);
    }
    Ok(out)
}

fn check_trainer(
    prog: &Program,
    m: usize,
    t: &TrainerDecl,
    modules: &[String],
    params: &[String],
    adapters: &[AdapterInfo],
    trainers: &[String],
) -> R<TrainerInfo> {
    let mut settings: Vec<(String, Setting)> = Vec::new();
    let mut trainable: Vec<String> = Vec::new();
    let mut frozen: Vec<String> = Vec::new();
    let mut has_objective = false;
    for s in &t.settings {
        let key = s.key.name.as_str();
        let Some((_, kind)) = SETTINGS.iter().find(|(k, _)| *k == key) else {
            let known: Vec<&str> = SETTINGS.iter().map(|(k, _)| *k).collect();
            return Err(err(
                prog,
                m,
                s.key.span,
                format!("unknown trainer setting `{key}`"),
            )
            .label("not a setting")
            .note(format!("settings: {}", known.join(", "))));
        };
        if key != "train" && key != "freeze" && settings.iter().any(|(k, _)| k == key) {
            return Err(
                err(prog, m, s.key.span, format!("`{key}` is set twice")).label("set again here")
            );
        }
        let value = match &s.value {
            SettingValue::Targets(pats) => {
                let mut hit = Vec::new();
                for p in pats {
                    // A parameter matches itself or through a module it lies under.
                    let under: std::collections::HashSet<&str> = modules
                        .iter()
                        .filter(|mp| pattern_matches(p, mp))
                        .map(String::as_str)
                        .collect();
                    let matched: Vec<&String> = params
                        .iter()
                        .filter(|path| {
                            pattern_matches(p, path)
                                || path
                                    .match_indices('.')
                                    .any(|(i, _)| under.contains(&path[..i]))
                        })
                        .collect();
                    if !matched.is_empty() {
                        let mut all: Vec<String> = modules.to_vec();
                        all.extend(params.iter().cloned());
                        if let Some(e) = dead_alternative_error(prog, m, p, &all) {
                            return Err(e);
                        }
                    }
                    if matched.is_empty() {
                        return Err(err(
                            prog,
                            m,
                            p.span,
                            format!("`{p}` matches no parameter or module"),
                        )
                        .label("matches nothing")
                        .note(suggest_paths(modules, p)));
                    }
                    hit.extend(matched.into_iter().cloned());
                }
                if key == "train" {
                    trainable.extend(hit.iter().cloned());
                } else {
                    frozen.extend(hit.iter().cloned());
                }
                Setting::Paths(hit)
            }
            SettingValue::Expr(e) => {
                let v = setting(prog, m, e)?;
                check_setting(
                    prog,
                    m,
                    key,
                    *kind,
                    &v,
                    e.span,
                    e,
                    adapters,
                    trainers,
                    &t.name.name,
                )?;
                if key == "objective" {
                    has_objective = true;
                }
                if key == "objective" {
                    // a user's objective function: where `vlmc train` imports it from
                    if let Setting::Call(name, _) | Setting::Symbol(name) = &v {
                        if let Some(r) = custom_objective_ref(prog, m, name) {
                            settings.push(("objective_module".into(), Setting::Str(r)));
                        }
                    }
                }
                match v {
                    // a data file is relative to the spec
                    Setting::Str(path) if key == "data" => {
                        Setting::Str(spec_relative(prog, m, &path))
                    }
                    v => v,
                }
            }
        };
        settings.push((key.to_string(), value));
    }
    if !has_objective {
        return Err(err(
            prog,
            m,
            t.name.span,
            format!("trainer `{}` has no `objective`", t.name.name),
        )
        .label("add e.g. `objective sft(mask: prompt)`"));
    }
    let adapter_used = settings.iter().any(|(k, _)| k == "adapter");
    if trainable.is_empty() && !adapter_used {
        // Nothing named: everything trains (full fine-tuning).
        trainable = params.to_vec();
    }
    trainable.retain(|p| !frozen.contains(p));
    trainable.sort();
    trainable.dedup();
    Ok(TrainerInfo {
        name: t.name.name.clone(),
        settings,
        trainable,
    })
}

#[allow(clippy::too_many_arguments)]
fn check_setting(
    prog: &Program,
    m: usize,
    key: &str,
    kind: char,
    v: &Setting,
    span: Span,
    expr: &Expr,
    adapters: &[AdapterInfo],
    trainers: &[String],
    this: &str,
) -> R<()> {
    let bad = || {
        err(prog, m, span, format!("`{key}` takes {}", kind_name(kind)))
            .label("wrong kind of value")
    };
    match kind {
        'i' => match v {
            Setting::Int(i) if *i > 0 || (*i == 0 && key == "seed") => Ok(()),
            Setting::Int(i) => Err(err(
                prog,
                m,
                span,
                format!("`{key}` must be positive, got {i}"),
            )),
            _ => Err(bad()),
        },
        // `lr` and `clip_grad`: positive and finite (a NaN step size trains on garbage).
        'f' => match v {
            Setting::Int(i) if *i > 0 => Ok(()),
            Setting::Float(f) if f.is_finite() && *f > 0.0 => Ok(()),
            Setting::Int(_) | Setting::Float(_) => Err(err(
                prog,
                m,
                span,
                format!("`{key}` must be a positive finite number"),
            )),
            _ => Err(bad()),
        },
        't' => match v {
            Setting::Str(_) => Ok(()),
            _ => Err(bad()),
        },
        'n' => {
            let Setting::Symbol(n) = v else {
                return Err(bad());
            };
            let ok = if key == "adapter" {
                adapters.iter().any(|a| &a.name == n)
            } else {
                trainers.iter().any(|t| t == n) && n != this
            };
            if ok {
                Ok(())
            } else {
                Err(err(
                    prog,
                    m,
                    span,
                    format!(
                        "no {} named `{n}` for this model",
                        if key == "adapter" {
                            "adapter"
                        } else {
                            "other trainer"
                        }
                    ),
                )
                .label("unknown name"))
            }
        }
        _ => {
            let (name, args) = match v {
                Setting::Call(n, a) => (n.as_str(), a.as_slice()),
                Setting::Symbol(n) => (n.as_str(), &[][..]),
                _ => return Err(bad()),
            };
            let allowed: Option<&[&str]> = match key {
                "objective" => {
                    let Some((_, sig)) = OBJECTIVES.iter().find(|(n, _)| *n == name) else {
                        if let Some((fm, f)) = objective_fn(prog, m, name) {
                            return check_custom_objective(prog, m, (fm, f), args, expr);
                        }
                        let known: Vec<&str> = OBJECTIVES.iter().map(|(n, _)| *n).collect();
                        return Err(err(prog, m, span, format!("unknown objective `{name}`"))
                            .label("not an objective")
                            .note(format!("objectives: {}", known.join(", "))));
                    };
                    return check_objective_args(prog, m, name, sig, args, expr);
                }
                "optimizer" | "schedule" => {
                    let table = if key == "optimizer" {
                        OPTIMIZERS
                    } else {
                        SCHEDULES
                    };
                    match table.iter().find(|(n, _)| *n == name) {
                        Some((_, a)) => Some(*a),
                        None => {
                            let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
                            return Err(err(prog, m, span, format!("unknown {key} `{name}`"))
                                .note(format!("choose one of: {}", known.join(", "))));
                        }
                    }
                }
                _ => None,
            };
            if let Some(allowed) = allowed {
                for (k, val) in args {
                    if !allowed.contains(&k.as_str()) {
                        return Err(err(
                            prog,
                            m,
                            arg_span(expr, k, true),
                            format!("`{name}` has no argument `{k}`"),
                        )
                        .label("unknown argument")
                        .note(format!("arguments: {}", allowed.join(", "))));
                    }
                    if !matches!(val, Setting::Int(_) | Setting::Float(_) | Setting::Bool(_)) {
                        return Err(err(
                            prog,
                            m,
                            arg_span(expr, k, false),
                            format!("`{name}`'s `{k}` must be a number"),
                        )
                        .label("not a number"));
                    }
                }
            }
            if key == "schedule" {
                check_warmup(prog, m, args, expr)?;
            }
            Ok(())
        }
    }
}

/// A schedule's warm-up: at most one of `warmup`, `warmup_steps` and `warmup_ratio`; a step
/// count that is a whole number ≥ 0; a ratio in [0, 1].
fn check_warmup(prog: &Program, m: usize, args: &[(String, Setting)], expr: &Expr) -> R<()> {
    let given: Vec<&str> = ["warmup", "warmup_steps", "warmup_ratio"]
        .into_iter()
        .filter(|k| args.iter().any(|(n, _)| n == k))
        .collect();
    if given.len() > 1 {
        return Err(err(
            prog,
            m,
            arg_span(expr, given[1], true),
            format!(
                "the warm-up is given twice (`{}`, `{}`)",
                given[0], given[1]
            ),
        )
        .label("give one of them"));
    }
    for (k, v) in args {
        let x = match v {
            Setting::Int(i) => *i as f64,
            Setting::Float(f) => *f,
            _ => continue,
        };
        let ok = match k.as_str() {
            "warmup" | "warmup_steps" => x >= 0.0 && x.fract() == 0.0,
            "warmup_ratio" => (0.0..=1.0).contains(&x),
            _ => true,
        };
        if !ok {
            return Err(err(
                prog,
                m,
                arg_span(expr, k, false),
                match k.as_str() {
                    "warmup_ratio" => format!("`warmup_ratio` must be in [0, 1], got {x}"),
                    _ => format!("`{k}` must be a whole number of steps ≥ 0, got {x}"),
                },
            )
            .label("not a valid warm-up"));
        }
    }
    Ok(())
}

/// Each argument of an objective must be one it takes, with a value of its kind.
fn check_objective_args(
    prog: &Program,
    m: usize,
    name: &str,
    sig: &[(&str, &str)],
    args: &[(String, Setting)],
    expr: &Expr,
) -> R<()> {
    for (k, v) in args {
        let Some((_, kind)) = sig.iter().find(|(n, _)| n == k) else {
            let ks: Vec<&str> = sig.iter().map(|(n, _)| *n).collect();
            return Err(err(
                prog,
                m,
                arg_span(expr, k, true),
                format!("objective `{name}` has no argument `{k}`"),
            )
            .label("unknown argument")
            .note(format!(
                "arguments of `{name}`: {}",
                if ks.is_empty() {
                    "none".into()
                } else {
                    ks.join(", ")
                }
            )));
        };
        let ok = match *kind {
            "t" => matches!(v, Setting::Str(_)),
            "l" => matches!(v, Setting::List(items)
                if items.iter().all(|i| matches!(i, Setting::Int(_) | Setting::Float(_)))),
            "y" => match v {
                Setting::Symbol(s) => DPO_LOSS_TYPES.contains(&s.as_str()),
                Setting::List(items) => !items.is_empty()
                    && items.iter().all(
                        |i| matches!(i, Setting::Symbol(s) if DPO_LOSS_TYPES.contains(&s.as_str())),
                    ),
                _ => false,
            },
            k if k.len() == 1 => kind_ok(v, k.chars().next().unwrap_or('?')),
            names => matches!(v, Setting::Symbol(s) if names.split('|').any(|n| n == s)),
        };
        if !ok {
            let wants = match *kind {
                "t" => "a string".to_string(),
                "l" => "a list of numbers".to_string(),
                "y" => format!(
                    "a loss type or a list of them ({})",
                    DPO_LOSS_TYPES.join(", ")
                ),
                k if k.len() == 1 => kind_name(k.chars().next().unwrap_or('?')).to_string(),
                names => format!("one of {}", names.replace('|', ", ")),
            };
            return Err(err(
                prog,
                m,
                arg_span(expr, k, false),
                format!("objective `{name}`'s `{k}` must be {wants}"),
            )
            .label("not a valid value"));
        }
    }
    let types = match args.iter().find(|(k, _)| k == "loss_type") {
        Some((_, Setting::List(items))) => items.len(),
        _ if name == "mpo" => 3,
        _ => 1,
    };
    if let Some((_, Setting::List(w))) = args.iter().find(|(k, _)| k == "loss_weights") {
        if w.len() != types {
            return Err(err(
                prog,
                m,
                arg_span(expr, "loss_weights", false),
                format!(
                    "{} loss weights for {types} loss type{}",
                    w.len(),
                    if types == 1 { "" } else { "s" }
                ),
            )
            .label("one weight per loss type"));
        }
    }
    Ok(())
}

/// TRL's DPO loss types (`DPOConfig.loss_type`), each a function `dpo_<type>` of
/// `std.preference`.
pub const DPO_LOSS_TYPES: &[&str] = &[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
];

/// The declarations of one kind in `model`'s file that name `model`.
fn decls<T: DeclOf>(prog: &Program, model: ItemRef) -> Vec<&T> {
    let model_name = prog.item_name(model).unwrap_or("");
    prog.modules[model.module]
        .ast
        .items
        .iter()
        .filter_map(T::of)
        .filter(|d| d.model() == model_name)
        .collect()
}

trait DeclOf {
    fn of(item: &Item) -> Option<&Self>;
    fn model(&self) -> &str;
}

impl DeclOf for AdapterDecl {
    fn of(item: &Item) -> Option<&Self> {
        match item {
            Item::Adapter(a) => Some(a),
            _ => None,
        }
    }
    fn model(&self) -> &str {
        &self.model.name
    }
}

impl DeclOf for TrainerDecl {
    fn of(item: &Item) -> Option<&Self> {
        match item {
            Item::Trainer(t) => Some(t),
            _ => None,
        }
    }
    fn model(&self) -> &str {
        &self.model.name
    }
}

/// Adapters and trainers in the root file that name a model not declared there.
pub fn check_orphans(prog: &Program, root: usize, _models: &[Elaborated]) -> Vec<Diagnostic> {
    let m = &prog.modules[root];
    let mut out = Vec::new();
    for item in &m.ast.items {
        let (model, span) = match item {
            Item::Adapter(a) => (&a.model, a.model.span),
            Item::Trainer(t) => (&t.model, t.model.span),
            _ => continue,
        };
        let is_model = m.scope.get(&model.name).is_some_and(|r| {
            r.module == root && matches!(prog.item(*r), Item::Block(b) if b.kind == vlmc_grammar::ast::BlockKind::Model)
        });
        if !is_model {
            out.push(
                err(
                    prog,
                    root,
                    span,
                    format!("`{}` is not a model declared in this file", model.name),
                )
                .label("unknown model"),
            );
        }
    }
    out
}

/// The span of argument `key` in a call expression (its name or its value), else the whole call.
fn arg_span(call: &Expr, key: &str, name: bool) -> Span {
    if let ExprKind::Call { args, .. } = &call.kind {
        for a in args {
            if let Some(n) = &a.name {
                if n.name == key {
                    return if name { n.span } else { a.value.span };
                }
            }
        }
    }
    call.span
}

/// A checkpoint naming rule: names starting with `from` start with `to` in the model
/// (`to: None`: the tensor is not used).
#[derive(Clone, Debug, PartialEq)]
pub struct NameRule {
    pub from: String,
    pub to: Option<String>,
}

/// How raw inputs become input tensors: `text` (tokenizer) or `image` (resize, crop, normalise).
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub kind: String,
    /// The model inputs it fills, in the kind's order (text: ids, mask, types; image: pixels).
    pub inputs: Vec<String>,
    /// Every argument, defaults filled in.
    pub args: Vec<(String, Setting)>,
}

impl Preprocess {
    /// An argument's value.
    pub fn arg(&self, key: &str) -> Option<&Setting> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// (kind, [(argument, kind letter, default)]): i int, f number, s string, l list of numbers,
/// n name.
type PreprocessSig = (&'static str, &'static [(&'static str, char, &'static str)]);

const PREPROCESS: &[PreprocessSig] = &[
    (
        "text",
        &[
            ("tokenizer", 's', "tokenizer.json"),
            ("max_len", 'i', "512"),
            // a placeholder that stands for one image in a prompt, expanded by `vlmc generate`
            // to `image_tokens` copies (LLaVA's processor: "<image>" x patches)
            ("image_token", 's', ""),
            ("image_tokens", 'i', "0"),
        ],
    ),
    // Fuyu's processor: the image resized to size x size, cut into patch x patch squares, each
    // flattened (row, column, channel); in the tokens each row of patches is `image_token`
    // once per patch, then `newline_token`
    (
        "patches",
        &[
            ("size", 'i', "1080"),
            ("patch", 'i', "30"),
            ("rescale", 'f', "0.00392156862745098"),
            ("mean", 'l', "0.5 0.5 0.5"),
            ("std", 'l', "0.5 0.5 0.5"),
            ("resample", 'n', "bilinear"),
            ("image_token", 's', "|SPEAKER|"),
            ("newline_token", 's', "|NEWLINE|"),
        ],
    ),
    (
        "image",
        &[
            ("size", 'i', "224"),
            ("crop", 'i', "0"),
            ("rescale", 'f', "0.00392156862745098"),
            ("mean", 'l', "0.5 0.5 0.5"),
            ("std", 'l', "0.5 0.5 0.5"),
            ("resample", 'n', "bicubic"),
        ],
    ),
];

fn default_setting(kind: char, text: &str) -> Setting {
    match kind {
        'i' => Setting::Int(text.parse().unwrap_or(0)),
        'f' => Setting::Float(text.parse().unwrap_or(0.0)),
        'l' => Setting::List(
            text.split(' ')
                .map(|x| Setting::Float(x.parse().unwrap_or(0.0)))
                .collect(),
        ),
        'n' => Setting::Symbol(text.to_string()),
        _ => Setting::Str(text.to_string()),
    }
}

/// A file named in a spec (`tokenizer: "tok/tokenizer.json"`) is looked for beside the spec
/// first: when it is there, its path; else the name as written (the runtime resolves it
/// beside the weights).
fn beside_spec(prog: &Program, m: usize, name: &str) -> String {
    let here = spec_relative(prog, m, name);
    match std::path::Path::new(&here).is_file() {
        true => here,
        false => name.to_string(),
    }
}

/// `name` relative to the folder of module `m`'s file, made absolute.
fn spec_relative(prog: &Program, m: usize, name: &str) -> String {
    let spec = prog.sources.path(prog.modules[m].file);
    let p = spec
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(name);
    std::path::absolute(&p)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

fn setting_kind_ok(s: &Setting, kind: char) -> bool {
    match kind {
        'l' => {
            matches!(s, Setting::List(v) if v.iter().all(|x| matches!(x, Setting::Int(_) | Setting::Float(_))))
        }
        's' => matches!(s, Setting::Str(_)),
        'n' => matches!(s, Setting::Symbol(_)),
        k => kind_ok(s, k),
    }
}

/// A model's `checkpoint` or `preprocess` member, its arguments evaluated.
#[derive(Clone, Debug)]
pub(crate) enum ModelDecl {
    Checkpoint(Vec<CheckpointRule>),
    Preprocess {
        targets: Vec<vlmc_grammar::ast::Ident>,
        kind: String,
        args: Vec<(String, Setting)>,
        source: Expr,
    },
}

/// Checks the model's `checkpoint` and `preprocess` members against its graph.
pub(crate) fn check_model_decls(
    prog: &Program,
    m: usize,
    members: &[ModelDecl],
    graph: &crate::ir::Graph,
) -> R<(Vec<NameRule>, Vec<Preprocess>)> {
    let mut rules = Vec::new();
    let mut pre: Vec<Preprocess> = Vec::new();
    for member in members {
        match member {
            ModelDecl::Checkpoint(rs) => {
                for r in rs {
                    rules.push(match r {
                        CheckpointRule::Rename { from, to, .. } => NameRule {
                            from: from.clone(),
                            to: Some(to.clone()),
                        },
                        CheckpointRule::Ignore { prefix, .. } => NameRule {
                            from: prefix.clone(),
                            to: None,
                        },
                    });
                }
            }
            ModelDecl::Preprocess {
                targets,
                kind,
                args,
                source,
            } => {
                pre.push(check_preprocess(
                    prog, m, targets, kind, args, source, graph, &pre,
                )?);
            }
        }
    }
    Ok((rules, pre))
}

#[allow(clippy::too_many_arguments)]
fn check_preprocess(
    prog: &Program,
    m: usize,
    targets: &[vlmc_grammar::ast::Ident],
    kind: &str,
    given: &[(String, Setting)],
    source: &Expr,
    graph: &crate::ir::Graph,
    earlier: &[Preprocess],
) -> R<Preprocess> {
    let kind = kind.to_string();
    let Some((_, sig)) = PREPROCESS.iter().find(|(k, _)| *k == kind) else {
        return Err(err(prog, m, source.span, format!("unknown preprocessing `{kind}`"))
            .label("not a preprocessing")
            .note("preprocessing: text(tokenizer, max_len, image_token, image_tokens), image(size, crop, rescale, mean, std, resample), patches(size, patch, rescale, mean, std, resample, image_token, newline_token)"));
    };
    let mut args = Vec::new();
    for (k, v) in given {
        let Some((_, kc, _)) = sig.iter().find(|(n, _, _)| n == k) else {
            let ks: Vec<&str> = sig.iter().map(|(n, _, _)| *n).collect();
            return Err(err(
                prog,
                m,
                arg_span(source, k, true),
                format!("`{kind}` has no argument `{k}`"),
            )
            .label("unknown argument")
            .note(format!("arguments: {}", ks.join(", "))));
        };
        if !setting_kind_ok(v, *kc) {
            return Err(err(
                prog,
                m,
                arg_span(source, k, false),
                format!("`{kind}`'s `{k}` has the wrong kind of value"),
            )
            .label("wrong kind of value"));
        }
    }
    for (k, kc, d) in sig.iter() {
        let v = given
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| default_setting(*kc, d));
        let v = match v {
            Setting::Str(path) if *k == "tokenizer" && given.iter().any(|(n, _)| n == k) => {
                Setting::Str(beside_spec(prog, m, &path))
            }
            v => v,
        };
        args.push((k.to_string(), v));
    }
    let expect_rank_dtype =
        |name: &vlmc_grammar::ast::Ident, dtype: crate::ir::DType, rank: usize| -> R<()> {
            let Some(id) = graph.input(&name.name) else {
                let names: Vec<&str> = graph.inputs().iter().map(|(_, n, _)| *n).collect();
                return Err(err(
                    prog,
                    m,
                    name.span,
                    format!("`{}` is not an input of the model", name.name),
                )
                .label("not an input")
                .note(format!("inputs: {}", names.join(", "))));
            };
            let ty = &graph.node(id).ty;
            if ty.dtype != dtype || ty.rank() != rank {
                return Err(err(
                    prog,
                    m,
                    name.span,
                    format!(
                        "`{kind}` fills `{}` with {dtype} of rank {rank}, but the input is {ty}",
                        name.name
                    ),
                )
                .label("wrong input type"));
            }
            if earlier.iter().any(|p| p.inputs.contains(&name.name)) {
                return Err(err(
                    prog,
                    m,
                    name.span,
                    format!("`{}` is already filled by another `preprocess`", name.name),
                ));
            }
            Ok(())
        };
    match kind.as_str() {
        "text" => {
            if targets.is_empty() || targets.len() > 3 {
                return Err(err(
                    prog,
                    m,
                    source.span,
                    "`text` fills 1 to 3 inputs: (ids, mask, types)",
                ));
            }
            for t in targets {
                expect_rank_dtype(t, crate::ir::DType::I32, 2)?;
            }
        }
        _ => {
            if targets.len() != 1 {
                return Err(err(
                    prog,
                    m,
                    source.span,
                    format!("`{kind}` fills one input: the pixels"),
                ));
            }
            let rank = if kind == "patches" { 3 } else { 4 };
            expect_rank_dtype(&targets[0], crate::ir::DType::F32, rank)?;
            if kind == "patches" {
                let int = |k: &str| match args.iter().find(|(n, _)| n == k).map(|(_, v)| v) {
                    Some(Setting::Int(i)) => *i,
                    _ => 0,
                };
                let (size, patch) = (int("size"), int("patch"));
                if patch <= 0 || size <= 0 || size % patch != 0 {
                    return Err(err(
                        prog,
                        m,
                        source.span,
                        format!("`patches` needs a positive `size` that is a multiple of `patch` (got size {size}, patch {patch})"),
                    ));
                }
            }
            if let Some(Setting::Symbol(r)) =
                args.iter().find(|(k, _)| k == "resample").map(|(_, v)| v)
            {
                if r != "bicubic" && r != "bilinear" && r != "nearest" {
                    return Err(err(
                        prog,
                        m,
                        arg_span(source, "resample", false),
                        format!("unknown resampling `{r}`"),
                    )
                    .note("resample: bicubic, bilinear, nearest"));
                }
            }
        }
    }
    Ok(Preprocess {
        kind,
        inputs: targets.iter().map(|t| t.name.clone()).collect(),
        args,
    })
}

/// The quantities a user's preference objective may name (each per pair, f32[b], but
/// `chosen_nll`, a scalar); its other parameters are `float` hyperparameters given as the
/// objective's arguments or left at their defaults.
pub const PAIR_VOCABULARY: &[&str] = &[
    "chosen_logps",
    "rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_logratios",
    "rejected_logratios",
    "chosen_len",
    "rejected_len",
    "chosen_avg_logps",
    "rejected_avg_logps",
    "chosen_nll",
];

/// The function `name` visible in module `m` that is not a built-in objective.
fn objective_fn<'a>(prog: &'a Program, m: usize, name: &str) -> Option<(usize, &'a FnDecl)> {
    let r = prog.modules[m].scope.get(name)?;
    match prog.item(*r) {
        Item::Fn(f) => Some((r.module, f)),
        _ => None,
    }
}

/// `"<spec folder>|<module>"` for a user's objective function `name`: the folder its import
/// resolves from and the dotted module that defines it.
fn custom_objective_ref(prog: &Program, m: usize, name: &str) -> Option<String> {
    if OBJECTIVES.iter().any(|(n, _)| *n == name) {
        return None;
    }
    let r = prog.modules[m].scope.get(name)?;
    let dir = spec_relative(prog, m, ".");
    Some(format!("{dir}|{}", prog.modules[r.module].name))
}

/// A user's preference objective: every parameter is a quantity of [`PAIR_VOCABULARY`] or a
/// `float` given by an argument (or defaulted); every argument names such a `float`.
fn check_custom_objective(
    prog: &Program,
    m: usize,
    (fm, f): (usize, &FnDecl),
    args: &[(String, Setting)],
    expr: &Expr,
) -> R<()> {
    let name = &f.name.name;
    let mut floats = Vec::new();
    for p in &f.params {
        let pn = p.name.name.as_str();
        if PAIR_VOCABULARY.contains(&pn) {
            continue;
        }
        if !matches!(p.ty.kind, TypeKind::Scalar(ScalarType::Float)) {
            return Err(err(
                prog,
                m,
                expr.span,
                format!("objective `{name}`: parameter `{pn}` is not a preference quantity nor a float"),
            )
            .label("used as an objective here")
            .also(prog.loc(fm, p.span), "this parameter")
            .note(format!(
                "an objective function's parameters are named from: {}; or are `float` hyperparameters",
                PAIR_VOCABULARY.join(", ")
            )));
        }
        if p.default.is_none() && !args.iter().any(|(k, _)| k == pn) {
            return Err(err(
                prog,
                m,
                expr.span,
                format!("objective `{name}` needs a value for `{pn}`"),
            )
            .label(format!("give `{pn}: ...` here")));
        }
        floats.push(pn);
    }
    if !f.params.iter().any(|p| p.name.name.starts_with("chosen_")) {
        return Err(err(
            prog,
            m,
            expr.span,
            format!("function `{name}` reads no chosen-sequence quantity: it is not a preference objective"),
        )
        .note(format!("name its parameters from: {}", PAIR_VOCABULARY.join(", "))));
    }
    for (k, v) in args {
        if !floats.contains(&k.as_str()) {
            return Err(err(
                prog,
                m,
                arg_span(expr, k, true),
                format!("objective `{name}` has no float parameter `{k}`"),
            )
            .label("unknown argument")
            .note(format!(
                "its hyperparameters: {}",
                if floats.is_empty() {
                    "none".to_string()
                } else {
                    floats.join(", ")
                }
            )));
        }
        if !matches!(v, Setting::Int(_) | Setting::Float(_)) {
            return Err(err(
                prog,
                m,
                arg_span(expr, k, false),
                format!("objective `{name}`'s `{k}` must be a number"),
            )
            .label("not a number"));
        }
    }
    Ok(())
}
