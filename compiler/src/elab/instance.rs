//! Block instantiation: binding compile-time arguments, declaring parameters (graph inputs named
//! by their full path, with an init rule), and instantiating sub-blocks and repeated stacks
//! (`layers = [Layer(dim) for i in 0..depth]` gives `layers.0`, `layers.1`, ...).

use super::eval::ArgVal;
use super::value::{Func, Instance, Value};
use super::{Ctx, Elaborator};
use crate::diag::{Diagnostic, Loc};
use crate::ir::{DType, Init, Op, TensorType};
use std::collections::HashMap;
use std::rc::Rc;
use vlmc_grammar::ast::{Expr, ExprKind, Item, Member, ParamMember, Span, TypeKind};

type R<T> = Result<T, Diagnostic>;

/// Init rules: name, then (argument, default) in positional order.
const INITS: &[(&str, &[(&str, f64)])] = &[
    ("zeros", &[]),
    ("ones", &[]),
    ("constant", &[("value", f64::NAN)]),
    ("normal", &[("mean", 0.0), ("std", 1.0)]),
    ("uniform", &[("lo", 0.0), ("hi", 1.0)]),
    (
        "trunc_normal",
        &[("mean", 0.0), ("std", 1.0), ("lo", -2.0), ("hi", 2.0)],
    ),
    ("kaiming_uniform", &[("a", 2.23606797749979)]),
    ("kaiming_normal", &[("a", 0.0)]),
    ("xavier_uniform", &[("gain", 1.0)]),
    ("xavier_normal", &[("gain", 1.0)]),
];

impl Elaborator<'_> {
    /// Instantiates `block` with arguments at parameter path `path`.
    pub fn instantiate(
        &mut self,
        block: super::modules::ItemRef,
        args: Vec<ArgVal>,
        path: String,
        site: Loc,
    ) -> R<Rc<Instance>> {
        let prog = self.prog;
        let Item::Block(decl) = prog.item(block) else {
            return Err(Diagnostic::new(site, "internal error: not a block"));
        };
        let name = decl.name.name.clone();
        if self.instantiating.contains(&block) {
            return Err(
                Diagnostic::new(site, format!("block `{name}` contains itself"))
                    .label("recursive instantiation")
                    .note(
                        "a block cannot have itself as a member, directly or through other blocks",
                    ),
            );
        }
        let mut cx = Ctx {
            module: block.module,
            inst: None,
            locals: vec![HashMap::new()],
            path: path.clone(),
        };
        for p in &decl.params {
            if let TypeKind::Tensor(_) = p.ty.kind {
                return Err(self
                    .err(&cx, p.ty.span, "block parameters are compile-time values")
                    .label("a tensor type here")
                    .note("pass tensors to `fn forward(...)` instead"));
            }
        }
        let call_cx = Ctx {
            module: site.file_module(self.prog),
            inst: None,
            locals: Vec::new(),
            path: String::new(),
        };
        self.instantiating.push(block);
        self.stack.push((
            format!("new {}:{}", block.module, block.item),
            instance_label(&name, &path),
            site,
        ));
        let bound = self.bind_args(&call_cx, &mut cx, &name, &decl.params, args, site.span);
        if let Err(d) = bound {
            self.stack.pop();
            self.instantiating.pop();
            return Err(d);
        }
        let mut methods = HashMap::new();
        let mut order = Vec::new();
        let mut defined: HashMap<String, Span> = decl
            .params
            .iter()
            .map(|p| (p.name.name.clone(), p.name.span))
            .collect();
        let r = self.members(
            &mut cx,
            &decl.members,
            &path,
            &mut methods,
            &mut order,
            &mut defined,
        );
        self.stack.pop();
        self.instantiating.pop();
        r?;
        let env = cx.locals.pop().unwrap_or_default();
        Ok(Rc::new(Instance {
            block,
            kind: name,
            path,
            env,
            methods,
            order,
        }))
    }

    fn members(
        &mut self,
        cx: &mut Ctx,
        members: &[Member],
        path: &str,
        methods: &mut HashMap<String, Rc<vlmc_grammar::ast::FnDecl>>,
        order: &mut Vec<String>,
        defined: &mut HashMap<String, Span>,
    ) -> R<()> {
        for m in members {
            match m {
                Member::Param(p) => {
                    self.check_fresh(cx, &p.name.name, p.name.span, defined)?;
                    let id = self.declare_param(cx, p, path)?;
                    self.define(cx, &p.name.name, Value::Tensor(id));
                    order.push(p.name.name.clone());
                }
                Member::Sub { name, value, .. } => {
                    self.check_fresh(cx, &name.name, name.span, defined)?;
                    let v = self.member_value(cx, value, &join(path, &name.name))?;
                    self.define(cx, &name.name, v);
                    order.push(name.name.clone());
                }
                Member::Let { name, value, .. } => {
                    self.check_fresh(cx, &name.name, name.span, defined)?;
                    let v = self.eval(cx, value)?;
                    self.define(cx, &name.name, v);
                }
                Member::Fn(f) => {
                    self.check_fresh(cx, &f.name.name, f.name.span, defined)?;
                    methods.insert(f.name.name.clone(), Rc::new(f.clone()));
                }
                Member::If {
                    cond, then, els, ..
                } => {
                    let c = self.eval_bool(cx, cond)?;
                    self.members(
                        cx,
                        if c { then } else { els },
                        path,
                        methods,
                        order,
                        defined,
                    )?;
                }
                Member::Checkpoint { rules, span } => {
                    self.model_only(cx, path, *span, "checkpoint")?;
                    self.model_decls
                        .push(super::decls::ModelDecl::Checkpoint(rules.clone()));
                }
                Member::Preprocess {
                    targets,
                    source,
                    span,
                } => {
                    self.model_only(cx, path, *span, "preprocess")?;
                    let (kind, args) = self.preprocess_call(cx, source)?;
                    self.model_decls.push(super::decls::ModelDecl::Preprocess {
                        targets: targets.clone(),
                        kind,
                        args,
                        source: source.clone(),
                    });
                }
                Member::Assert {
                    cond,
                    message,
                    span,
                } => {
                    if !self.eval_bool(cx, cond)? {
                        let msg = message.clone().unwrap_or_else(|| {
                            format!(
                                "assertion failed: {}",
                                self.source_text(cx.module, cond.span)
                            )
                        });
                        return Err(self.err(cx, *span, msg).label("assertion failed"));
                    }
                }
            }
        }
        Ok(())
    }

    /// `checkpoint` and `preprocess` describe a whole model: not allowed inside blocks.
    fn model_only(&self, cx: &Ctx, path: &str, span: Span, what: &str) -> R<()> {
        if path.is_empty() {
            return Ok(());
        }
        Err(self
            .err(
                cx,
                span,
                format!("`{what}` belongs in a model, not in a block"),
            )
            .label("inside a block")
            .note("checkpoint names and input preprocessing describe a whole model"))
    }

    /// `text(max_len: n)`: the kind and its arguments, evaluated in the model's scope.
    fn preprocess_call(
        &mut self,
        cx: &mut Ctx,
        e: &Expr,
    ) -> R<(String, Vec<(String, super::decls::Setting)>)> {
        let (kind, args) = match &e.kind {
            ExprKind::Call { callee, args } => match &callee.kind {
                ExprKind::Name(n) => (n.clone(), args.as_slice()),
                _ => return Err(self.err(cx, e.span, "expected `text(...)` or `image(...)`")),
            },
            ExprKind::Name(n) => (n.clone(), &[][..]),
            _ => return Err(self.err(cx, e.span, "expected `text(...)` or `image(...)`")),
        };
        let mut out = Vec::new();
        for a in args {
            let Some(name) = &a.name else {
                return Err(self
                    .err(
                        cx,
                        a.value.span,
                        "preprocessing arguments must be named, e.g. `max_len: 128`",
                    )
                    .label("unnamed argument"));
            };
            let v = self.eval_sym(cx, &a.value)?;
            let s = to_setting(&v).ok_or_else(|| {
                self.err(
                    cx,
                    a.value.span,
                    format!(
                        "a preprocessing argument must be a constant, got {}",
                        v.kind()
                    ),
                )
                .label("not a constant")
            })?;
            out.push((name.name.clone(), s));
        }
        Ok((kind, out))
    }

    /// A name may be defined once per block; the error shows both definitions.
    fn check_fresh(
        &self,
        cx: &Ctx,
        name: &str,
        span: Span,
        defined: &mut HashMap<String, Span>,
    ) -> R<()> {
        if let Some(first) = defined.get(name) {
            return Err(self
                .err(
                    cx,
                    span,
                    format!("`{name}` is already defined in this block"),
                )
                .label("defined again here")
                .also(self.prog.loc(cx.module, *first), "first defined here")
                .note("parameters, members, `let`s and methods of a block share one namespace"));
        }
        defined.insert(name.to_string(), span);
        Ok(())
    }

    /// The value of `name = expr` in a block: sub-block instances get the member's path.
    fn member_value(&mut self, cx: &mut Ctx, e: &Expr, path: &str) -> R<Value> {
        match &e.kind {
            ExprKind::Call { callee, args } => {
                if let Some(block) = self.block_ref(cx, callee) {
                    let vals = self.eval_args(cx, args)?;
                    let site = self.prog.loc(cx.module, e.span);
                    return Ok(Value::Module(self.instantiate(
                        block,
                        vals,
                        path.to_string(),
                        site,
                    )?));
                }
                self.eval(cx, e)
            }
            ExprKind::Comprehension {
                elem,
                var,
                iter,
                filter,
            } => self
                .comprehension(cx, var, iter, filter.as_deref(), |s, cx, k| {
                    s.member_value(cx, elem, &format!("{path}.{k}"))
                })
                .map(|v| Value::List(v.into())),
            ExprKind::List(items) => {
                let mut out = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    out.push(self.member_value(cx, it, &format!("{path}.{i}"))?);
                }
                Ok(Value::List(out.into()))
            }
            _ => self.eval(cx, e),
        }
    }

    /// If `callee` names a block, its reference.
    fn block_ref(&self, cx: &Ctx, callee: &Expr) -> Option<super::modules::ItemRef> {
        let ExprKind::Name(n) = &callee.kind else {
            return None;
        };
        match self.lookup(cx, n)? {
            Value::Func(Func::Item(r)) if matches!(self.prog.item(r), Item::Block(_)) => Some(r),
            _ => None,
        }
    }

    fn declare_param(&mut self, cx: &mut Ctx, p: &ParamMember, path: &str) -> R<crate::ir::NodeId> {
        let dtype = match &p.ty.dtype {
            Some(d) => DType::parse(&d.name).ok_or_else(|| {
                self.err(cx, d.span, format!("unknown dtype `{}`", d.name))
                    .note(super::DTYPES_NOTE)
            })?,
            None => DType::F32,
        };
        let mut dims = Vec::new();
        for d in &p.ty.dims {
            match d {
                vlmc_grammar::ast::DimPat::Star(n) => {
                    return Err(self
                        .err(
                            cx,
                            n.span,
                            "parameter shapes must be fixed: `*name` is not allowed",
                        )
                        .label("variadic dims"))
                }
                vlmc_grammar::ast::DimPat::Expr(e) => {
                    let v = self.eval(cx, e)?;
                    match v.as_dim() {
                        Some(d) if d.as_const().is_none_or(|c| c > 0) => dims.push(d),
                        Some(d) => {
                            return Err(self
                                .err(
                                    cx,
                                    e.span,
                                    format!("parameter dimension must be positive, got {d}"),
                                )
                                .label("not a valid size"))
                        }
                        None => {
                            return Err(self
                                .err(
                                    cx,
                                    e.span,
                                    format!("a dimension must be a size, got {}", v.kind()),
                                )
                                .label("not a size"))
                        }
                    }
                }
            }
        }
        if dims
            .iter()
            .try_fold(crate::ir::Dim::c(1), |acc, d| acc.checked_mul(d))
            .and_then(|n| {
                n.as_const()
                    .map_or(Some(()), |c| (c <= 1 << 40).then_some(()))
            })
            .is_none()
        {
            return Err(self
                .err(
                    cx,
                    p.ty.span,
                    "parameter is too large (more than 2^40 elements)",
                )
                .label("this shape"));
        }
        let init = match &p.init {
            Some(e) => self.init_rule(cx, e)?,
            None => Init::new("normal", &[("mean", 0.0), ("std", 0.02)]),
        };
        let full = join(path, &p.name.name);
        let scope = path.to_string();
        self.graph
            .add_source(
                Op::Param { path: full, init },
                TensorType::new(dtype, dims),
                &scope,
            )
            .map_err(|e| self.err(cx, p.span, e.to_string()))
    }

    /// `zeros`, `normal(std: 0.02)`, `kaiming_uniform(a: sqrt(5))`, ...
    fn init_rule(&mut self, cx: &mut Ctx, e: &Expr) -> R<Init> {
        let (name, name_span, args) = match &e.kind {
            ExprKind::Name(n) => (n.clone(), e.span, Vec::new()),
            ExprKind::Call { callee, args } => match &callee.kind {
                ExprKind::Name(n) => (n.clone(), callee.span, self.eval_args(cx, args)?),
                _ => {
                    return Err(self.err(
                        cx,
                        e.span,
                        "expected an init rule such as `normal(std: 0.02)`",
                    ))
                }
            },
            _ => {
                return Err(self.err(
                    cx,
                    e.span,
                    "expected an init rule such as `normal(std: 0.02)`",
                ))
            }
        };
        let Some((_, sig)) = INITS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = INITS.iter().map(|(n, _)| *n).collect();
            return Err(self
                .err(cx, name_span, format!("unknown init rule `{name}`"))
                .label("not an init rule")
                .note(format!("init rules: {}", known.join(", "))));
        };
        let mut values: Vec<Option<f64>> = vec![None; sig.len()];
        let mut pos = 0;
        for a in args {
            let i = match &a.name {
                Some(n) => sig.iter().position(|(k, _)| *k == n.name).ok_or_else(|| {
                    let ks: Vec<&str> = sig.iter().map(|(k, _)| *k).collect();
                    self.err(cx, n.span, format!("`{name}` has no argument `{}`", n.name))
                        .note(format!(
                            "arguments: {}",
                            if ks.is_empty() {
                                "none".to_string()
                            } else {
                                ks.join(", ")
                            }
                        ))
                })?,
                None => {
                    pos += 1;
                    pos - 1
                }
            };
            if i >= sig.len() {
                return Err(self.err(cx, a.span, format!("too many arguments for `{name}`")));
            }
            let Some(x) = a.value.as_f64() else {
                return Err(self
                    .err(
                        cx,
                        a.span,
                        format!("init arguments must be numbers, got {}", a.value.kind()),
                    )
                    .label("not a number"));
            };
            values[i] = Some(x);
        }
        let mut out = Vec::new();
        for ((k, default), v) in sig.iter().zip(values) {
            let v = v.unwrap_or(*default);
            if v.is_nan() {
                return Err(self
                    .err(cx, e.span, format!("`{name}` needs its argument `{k}`"))
                    .label("missing argument"));
            }
            out.push((*k, v));
        }
        Ok(Init::new(&name, &out))
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// The trace line of an instantiation (empty for the model itself: traces leave it out).
fn instance_label(block: &str, path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("in `{block}` (`{path}`), instantiated at")
    }
}

impl Loc {
    /// The index of the module whose file this location is in.
    fn file_module(&self, prog: &super::modules::Program) -> usize {
        prog.modules
            .iter()
            .position(|m| m.file == self.file)
            .unwrap_or(0)
    }
}

/// A compile-time value as a declaration setting.
fn to_setting(v: &Value) -> Option<super::decls::Setting> {
    use super::decls::Setting as S;
    Some(match v {
        Value::Int(i) => S::Int(*i),
        Value::Float(f) => S::Float(*f),
        Value::Bool(b) => S::Bool(*b),
        Value::Str(s) => S::Str(s.clone()),
        Value::Enum(n) => S::Symbol(n.clone()),
        Value::List(items) | Value::Tuple(items) => {
            S::List(items.iter().map(to_setting).collect::<Option<_>>()?)
        }
        _ => return None,
    })
}
