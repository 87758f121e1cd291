//! Binding call arguments to declared parameters, and matching tensors against written types
//! (`f32[*b, in]`): names seen for the first time bind to the actual size, other dimensions are
//! evaluated and checked.

use super::eval::ArgVal;
use super::value::{Func, Value};
use super::{Ctx, Elaborator};
use crate::diag::Diagnostic;
use crate::ir::{Dim, TensorType};
use vlmc_grammar::ast::{DimPat, ExprKind, ParamDecl, ScalarType, Span, TensorTypeExpr, TypeKind};

type R<T> = Result<T, Diagnostic>;

impl Elaborator<'_> {
    /// Matches call arguments to parameters and binds them in `callee`'s innermost scope.
    /// `call_cx` is the caller (for error locations); `what` names the callee in messages.
    pub fn bind_args(
        &mut self,
        call_cx: &Ctx,
        callee: &mut Ctx,
        what: &str,
        params: &[ParamDecl],
        args: Vec<ArgVal>,
        call_span: Span,
    ) -> R<()> {
        let mut slots: Vec<Option<ArgVal>> = vec![None; params.len()];
        let mut pos = 0;
        let mut named_seen = false;
        for a in args {
            if a.name.is_some() {
                named_seen = true;
            }
            match &a.name {
                None => {
                    if pos >= params.len() {
                        return Err(self
                            .err(
                                call_cx,
                                a.span,
                                format!(
                                    "too many arguments: `{what}` takes {} parameter{}",
                                    params.len(),
                                    if params.len() == 1 { "" } else { "s" }
                                ),
                            )
                            .label("extra argument"));
                    }
                    if named_seen {
                        return Err(self
                            .err(call_cx, a.span, "positional argument after a named one")
                            .label("give this one a name too"));
                    }
                    slots[pos] = Some(a);
                    pos += 1;
                }
                Some(n) => {
                    let Some(i) = params.iter().position(|p| p.name.name == n.name) else {
                        let names: Vec<&str> =
                            params.iter().map(|p| p.name.name.as_str()).collect();
                        return Err(self
                            .err(
                                call_cx,
                                n.span,
                                format!("`{what}` has no parameter `{}`", n.name),
                            )
                            .label("unknown parameter")
                            .note(format!("parameters: {}", names.join(", "))));
                    };
                    if slots[i].is_some() {
                        return Err(self
                            .err(
                                call_cx,
                                n.span,
                                format!("parameter `{}` is given twice", n.name),
                            )
                            .label("given again here"));
                    }
                    slots[i] = Some(a);
                }
            }
        }
        for (p, slot) in params.iter().zip(slots) {
            let (value, span, from_caller, raw) = match slot {
                Some(a) => (a.value, a.span, true, a.raw),
                None => match &p.default {
                    Some(d) => {
                        let v = if matches!(p.ty.kind, TypeKind::Enum(_)) {
                            self.eval_sym(callee, d)?
                        } else {
                            self.eval(callee, d)?
                        };
                        (v, d.span, false, bare_name(d))
                    }
                    None => {
                        return Err(self
                            .err(
                                call_cx,
                                call_span,
                                format!("missing argument `{}` for `{what}`", p.name.name),
                            )
                            .label(format!("`{}` is not given", p.name.name)));
                    }
                },
            };
            let err_mod = if from_caller {
                call_cx.module
            } else {
                callee.module
            };
            let v = self.check_param(err_mod, callee, what, p, value, raw.as_deref(), span)?;
            if let Some(scope) = callee.locals.last_mut() {
                scope.insert(p.name.name.clone(), v);
            }
        }
        Ok(())
    }

    /// Checks (and converts) one argument against its declared type.
    #[allow(clippy::too_many_arguments)]
    pub fn check_param(
        &mut self,
        err_mod: usize,
        callee: &mut Ctx,
        what: &str,
        p: &ParamDecl,
        value: Value,
        raw_name: Option<&str>,
        span: Span,
    ) -> R<Value> {
        let pname = &p.name.name;
        // For an enum parameter a bare name is a variant, even where it also names something
        // else (a builtin, a member).
        let value = match (&p.ty.kind, raw_name) {
            (TypeKind::Enum(vs), Some(n)) if vs.iter().any(|v| v.name == n) => {
                Value::Enum(n.to_string())
            }
            _ => value,
        };
        if matches!(value, Value::None) {
            if p.ty.optional {
                return Ok(Value::None);
            }
            return Err(self
                .err_in(
                    err_mod,
                    span,
                    format!("`{pname}` of `{what}` may not be `none`"),
                )
                .note("declare the parameter optional with `?` after its type"));
        }
        let mismatch = |s: &Self, expected: &str, v: &Value| {
            let mut d = s
                .err_in(
                    err_mod,
                    span,
                    format!("`{pname}` of `{what}` expects {expected}, got {}", v.kind()),
                )
                .label(format!("this is {}", v.kind()));
            if let Value::Enum(name) = v {
                d = s
                    .err_in(err_mod, span, format!("unknown name `{name}`"))
                    .label("not defined here");
            }
            d
        };
        match &p.ty.kind {
            TypeKind::Tensor(tt) => {
                let Value::Tensor(t) = value else {
                    return Err(mismatch(self, "a tensor", &value));
                };
                let ty = self.graph.node(t).ty.clone();
                self.match_tensor(
                    err_mod,
                    callee,
                    tt,
                    &ty,
                    span,
                    &format!("`{pname}` of `{what}`"),
                )?;
                Ok(value)
            }
            TypeKind::Scalar(s) => {
                let ok = match (s, &value) {
                    (ScalarType::Int, Value::Int(_)) => true,
                    (ScalarType::Float, Value::Float(_)) => true,
                    (ScalarType::Float, Value::Int(i)) => return Ok(Value::Float(*i as f64)),
                    (ScalarType::Bool, Value::Bool(_)) => true,
                    (ScalarType::Str, Value::Str(_)) => true,
                    (ScalarType::Fn, Value::Func(Func::Item(r))) => {
                        matches!(self.prog.item(*r), vlmc_grammar::ast::Item::Fn(_))
                    }
                    (ScalarType::Fn, Value::Func(_)) => true,
                    (ScalarType::Dim, Value::Int(_) | Value::Dim(_)) => true,
                    _ => false,
                };
                if ok {
                    Ok(value)
                } else {
                    Err(mismatch(self, article(s.name()), &value))
                }
            }
            TypeKind::Enum(variants) => {
                let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
                match &value {
                    Value::Enum(v) if names.contains(&v.as_str()) => Ok(value),
                    Value::Enum(v) => Err(self
                        .err_in(err_mod, span, format!("`{v}` is not a valid `{pname}`"))
                        .label("unknown choice")
                        .note(format!("choose one of: {}", names.join(", ")))),
                    _ => Err(mismatch(
                        self,
                        &format!("one of {}", names.join(" | ")),
                        &value,
                    )),
                }
            }
        }
    }

    /// Matches an actual tensor type against a written one, binding or declaring new names in
    /// `callee`'s innermost scope.
    #[allow(clippy::too_many_arguments)]
    pub fn match_tensor(
        &mut self,
        err_mod: usize,
        callee: &mut Ctx,
        pat: &TensorTypeExpr,
        actual: &TensorType,
        span: Span,
        what: &str,
    ) -> R<()> {
        let fail = |s: &mut Self, callee: &mut Ctx, why: String| -> Diagnostic {
            let expected = s.render_pattern(callee, pat);
            s.err_in(
                err_mod,
                span,
                format!("{what} expects {expected}, got {actual}"),
            )
            .label(format!("this is {actual}"))
            .note(why)
        };
        if let Some(dt) = &pat.dtype {
            if dt.name != actual.dtype.name() {
                return Err(fail(
                    self,
                    callee,
                    format!("dtype {} is not {}", actual.dtype, dt.name),
                ));
            }
        }
        let stars = pat
            .dims
            .iter()
            .filter(|d| matches!(d, DimPat::Star(_)))
            .count();
        if stars > 1 {
            return Err(self.err(
                callee,
                pat.span,
                "at most one `*name` is allowed in a shape",
            ));
        }
        let rank = actual.shape.0.len();
        let fixed = pat.dims.len() - stars;
        if (stars == 0 && rank != fixed) || (stars == 1 && rank < fixed) {
            return Err(fail(
                self,
                callee,
                format!(
                    "expected rank {}{}, got rank {rank}",
                    if stars == 1 { "at least " } else { "" },
                    fixed
                ),
            ));
        }
        let star_len = rank - fixed;
        let mut axis = 0;
        for d in &pat.dims {
            match d {
                DimPat::Star(name) => {
                    let dims: Vec<Value> = actual.shape.0[axis..axis + star_len]
                        .iter()
                        .cloned()
                        .map(Value::from_dim)
                        .collect();
                    axis += star_len;
                    match self.lookup(callee, &name.name) {
                        Some(Value::List(prev)) => {
                            let prev_d: Vec<Option<Dim>> = prev.iter().map(Value::as_dim).collect();
                            let now_d: Vec<Option<Dim>> = dims.iter().map(Value::as_dim).collect();
                            if prev_d != now_d {
                                return Err(fail(
                                    self,
                                    callee,
                                    format!("`*{}` was already bound to different dims", name.name),
                                ));
                            }
                        }
                        _ => bind(callee, &name.name, Value::List(dims.into())),
                    }
                }
                DimPat::Expr(e) => {
                    let actual_d = actual.shape.0[axis].clone();
                    axis += 1;
                    if let ExprKind::Name(n) = &e.kind {
                        if n == "_" {
                            continue;
                        }
                        // A name that is not a size yet (unbound, or naming a member or a
                        // builtin) binds to the actual size.
                        if self.lookup(callee, n).and_then(|v| v.as_dim()).is_none() {
                            bind(callee, n, Value::from_dim(actual_d));
                            continue;
                        }
                    }
                    let v = self.eval(callee, e)?;
                    let Some(want) = v.as_dim() else {
                        return Err(self
                            .err(
                                callee,
                                e.span,
                                format!("a dimension must be a size, got {}", v.kind()),
                            )
                            .label("not a size"));
                    };
                    if want != actual_d {
                        return Err(fail(
                            self,
                            callee,
                            format!("dimension {} is {actual_d}, expected {want}", axis - 1),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A written tensor type with known names replaced by their values: `f32[*b, 64]`.
    pub fn render_pattern(&mut self, cx: &mut Ctx, pat: &TensorTypeExpr) -> String {
        let mut parts = Vec::new();
        for d in &pat.dims {
            parts.push(match d {
                DimPat::Star(n) => format!("*{}", n.name),
                DimPat::Expr(e) => {
                    let known = match &e.kind {
                        ExprKind::Name(n) => self.lookup(cx, n).and_then(|v| v.as_dim()).is_some(),
                        _ => true,
                    };
                    let saved = self.stack.len();
                    let v = if known { self.eval(cx, e).ok() } else { None };
                    self.stack.truncate(saved);
                    match v.and_then(|v| v.as_dim()) {
                        Some(d) => d.to_string(),
                        None => self.source_text(cx.module, e.span),
                    }
                }
            });
        }
        let dt = pat.dtype.as_ref().map_or("f32", |d| d.name.as_str());
        format!("{dt}[{}]", parts.join(", "))
    }

    /// The source text of a span.
    pub fn source_text(&self, module: usize, span: Span) -> String {
        let text = self.prog.sources.text(self.prog.modules[module].file);
        text.get(span.start..span.end).unwrap_or("?").to_string()
    }
}

fn bind(cx: &mut Ctx, name: &str, v: Value) {
    if let Some(scope) = cx.locals.last_mut() {
        scope.insert(name.to_string(), v);
    }
}

impl Elaborator<'_> {
    /// The type of a model input: names not yet known become new symbolic dims (`B`, `T`).
    pub fn declare_tensor_type(&mut self, cx: &mut Ctx, pat: &TensorTypeExpr) -> R<TensorType> {
        let dtype = match &pat.dtype {
            Some(d) => crate::ir::DType::parse(&d.name).ok_or_else(|| {
                self.err(cx, d.span, format!("unknown dtype `{}`", d.name))
                    .note(super::DTYPES_NOTE)
            })?,
            None => crate::ir::DType::F32,
        };
        let mut dims = Vec::new();
        for d in &pat.dims {
            match d {
                DimPat::Star(name) => {
                    return Err(self
                        .err(
                            cx,
                            name.span,
                            "a model's inputs need a fixed rank: `*name` is not allowed here",
                        )
                        .label("variadic dims"))
                }
                DimPat::Expr(e) => {
                    if let ExprKind::Name(n) = &e.kind {
                        if n == "_" {
                            return Err(self
                                .err(cx, e.span, "a model's inputs need named or fixed dims: `_` is not allowed here"));
                        }
                        if self.lookup(cx, n).and_then(|v| v.as_dim()).is_none() {
                            if !self.graph.dims.contains(n) {
                                self.graph.dims.push(n.clone());
                            }
                            bind(cx, n, Value::Dim(Dim::sym(n)));
                        }
                    }
                    let v = self.eval(cx, e).map_err(|d| {
                        if d.message.starts_with("unknown name") {
                            d.note("a new dimension name must first appear on its own, e.g. `f32[B, T]`; then `T + 1` can be used")
                        } else {
                            d
                        }
                    })?;
                    match v.as_dim() {
                        Some(d) if d.as_const().is_none_or(|c| c >= 0) => dims.push(d),
                        Some(d) => {
                            return Err(self.err(cx, e.span, format!("negative dimension {d}")))
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
        Ok(TensorType::new(dtype, dims))
    }
}

/// "an int", "a float", ... for a scalar type name.
fn article(name: &str) -> &'static str {
    match name {
        "int" => "an int",
        "float" => "a float",
        "bool" => "a bool",
        "str" => "a string",
        "fn" => "a function",
        _ => "a size",
    }
}

/// The name, if the expression is just a name.
pub(crate) fn bare_name(e: &vlmc_grammar::ast::Expr) -> Option<String> {
    match &e.kind {
        ExprKind::Name(n) => Some(n.clone()),
        _ => None,
    }
}
