//! Expressions: compile-time arithmetic on numbers and sizes, and tensor expressions that add
//! ops to the graph.

use super::value::{Func, Value};
use super::{Ctx, Elaborator};
use crate::diag::Diagnostic;
use crate::ir::BinaryOp;
use std::rc::Rc;
use vlmc_grammar::ast::{Arg, BinOp, Expr, ExprKind, Ident, Span, UnaryOp};

type R<T> = Result<T, Diagnostic>;

/// An evaluated call argument.
#[derive(Clone, Debug)]
pub(crate) struct ArgVal {
    pub name: Option<Ident>,
    pub value: Value,
    pub span: Span,
    /// The argument as written, when it is a bare name (an enum variant, maybe).
    pub raw: Option<String>,
}

impl Elaborator<'_> {
    /// Looks a name up: locals (innermost first), the instance's members, the module's items.
    pub fn lookup(&self, cx: &Ctx, name: &str) -> Option<Value> {
        for scope in cx.locals.iter().rev() {
            if let Some(v) = scope.get(name) {
                return Some(v.clone());
            }
        }
        if let Some(inst) = &cx.inst {
            if let Some(v) = inst.env.get(name) {
                return Some(v.clone());
            }
            if inst.methods.contains_key(name) {
                return Some(Value::Func(Func::Method(inst.clone(), name.to_string())));
            }
        }
        if let Some(r) = self.prog.modules[cx.module].scope.get(name) {
            return Some(Value::Func(Func::Item(*r)));
        }
        if let Some(dt) = crate::ir::DType::parse(name) {
            return Some(Value::DType(dt));
        }
        super::builtins::lookup(name).map(|b| Value::Func(Func::Builtin(b)))
    }

    /// Evaluates an expression. The parser bounds how deep an expression nests, but calls of
    /// blocks and functions recurse through here too: on a short stack (a test thread) it moves
    /// to a new segment rather than overflow.
    pub fn eval(&mut self, cx: &mut Ctx, e: &Expr) -> R<Value> {
        stacker::maybe_grow(256 << 10, 16 << 20, || self.eval_here(cx, e))
    }

    fn eval_here(&mut self, cx: &mut Ctx, e: &Expr) -> R<Value> {
        self.budget = self.budget.saturating_sub(1);
        if self.budget == 0 {
            return Err(self.err(
                cx,
                e.span,
                "elaboration is too large (more than 2,000,000 steps): is a loop bound wrong?",
            ));
        }
        match &e.kind {
            ExprKind::Int(i) => Ok(Value::Int(*i)),
            ExprKind::Float(f) => Ok(Value::Float(*f)),
            ExprKind::Bool(b) => Ok(Value::Bool(*b)),
            ExprKind::Str(s) => Ok(Value::Str(s.clone())),
            ExprKind::None => Ok(Value::None),
            ExprKind::Name(n) => self
                .lookup(cx, n)
                .ok_or_else(|| self.unknown_name(cx, n, e.span)),
            ExprKind::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    out.push(self.eval(cx, it)?);
                }
                Ok(Value::List(out.into()))
            }
            ExprKind::Tuple(items) => {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    out.push(self.eval(cx, it)?);
                }
                Ok(Value::Tuple(out.into()))
            }
            ExprKind::Comprehension {
                elem,
                var,
                iter,
                filter,
            } => self
                .comprehension(cx, var, iter, filter.as_deref(), |s, cx, _| {
                    s.eval(cx, elem)
                })
                .map(|v| Value::List(v.into())),
            ExprKind::Unary { op, operand } => {
                let v = self.eval(cx, operand)?;
                self.unary(cx, *op, v, e.span)
            }
            ExprKind::Binary { op, lhs, rhs } => self.binary_expr(cx, *op, lhs, rhs, e.span),
            ExprKind::Call { callee, args } => self.call_expr(cx, callee, args, e.span),
            ExprKind::Field { base, name } => {
                let b = self.eval(cx, base)?;
                self.field(cx, b, name)
            }
            ExprKind::Index { base, items } => {
                let b = self.eval(cx, base)?;
                self.index(cx, b, items, e.span)
            }
        }
    }

    /// `[elem for var in iter if filter]`: `make(cx, k)` builds the k-th kept element with `var`
    /// bound.
    pub fn comprehension(
        &mut self,
        cx: &mut Ctx,
        var: &Ident,
        iter: &Expr,
        filter: Option<&Expr>,
        mut make: impl FnMut(&mut Self, &mut Ctx, usize) -> R<Value>,
    ) -> R<Vec<Value>> {
        let items = self.iterate(cx, iter)?;
        let mut out = Vec::new();
        for v in items {
            cx.locals
                .push([(var.name.clone(), v)].into_iter().collect());
            let keep = match filter {
                Some(f) => self.eval_bool(cx, f),
                None => Ok(true),
            };
            let r = match keep {
                Ok(true) => make(self, cx, out.len()).map(Some),
                Ok(false) => Ok(None),
                Err(d) => Err(d),
            };
            cx.locals.pop();
            if let Some(v) = r? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Evaluates, turning a bare unknown name into an enum symbol (for `pos: rope`, `x == rope`).
    pub fn eval_sym(&mut self, cx: &mut Ctx, e: &Expr) -> R<Value> {
        if let ExprKind::Name(n) = &e.kind {
            if self.lookup(cx, n).is_none() {
                return Ok(Value::Enum(n.clone()));
            }
        }
        self.eval(cx, e)
    }

    fn unknown_name(&self, cx: &Ctx, name: &str, span: Span) -> Diagnostic {
        let mut d = self
            .err(cx, span, format!("unknown name `{name}`"))
            .label("not defined here");
        if let Some(s) = self.suggest(cx, name) {
            d = d.note(format!("did you mean `{s}`?"));
        }
        d
    }

    /// The closest visible name, for "did you mean".
    fn suggest(&self, cx: &Ctx, name: &str) -> Option<String> {
        let mut names: Vec<String> = Vec::new();
        for s in &cx.locals {
            names.extend(s.keys().cloned());
        }
        if let Some(i) = &cx.inst {
            names.extend(i.env.keys().cloned());
            names.extend(i.methods.keys().cloned());
        }
        names.extend(self.prog.modules[cx.module].scope.keys().cloned());
        names.extend(super::builtins::NAMES.iter().map(|s| s.to_string()));
        names
            .into_iter()
            .map(|n| (edit_distance(&n, name), n))
            .filter(|(d, n)| *d <= 2.max(name.len() / 4) && *d < n.len())
            .min()
            .map(|(_, n)| n)
    }

    /// A compile-time boolean.
    pub fn eval_bool(&mut self, cx: &mut Ctx, e: &Expr) -> R<bool> {
        match self.eval(cx, e)? {
            Value::Bool(b) => Ok(b),
            Value::Tensor(_) => Err(self
                .err(cx, e.span, "expected a compile-time bool")
                .label("this is a tensor")
                .note(
                    "`if` decides at compile time; to choose per element use `where(cond, a, b)`",
                )),
            v => Err(self
                .err(cx, e.span, "expected a compile-time bool")
                .label(format!("this is {}", v.kind()))),
        }
    }

    /// A compile-time integer.
    pub fn eval_int(&mut self, cx: &mut Ctx, e: &Expr) -> R<i64> {
        match self.eval(cx, e)? {
            Value::Int(i) => Ok(i),
            v => Err(self
                .err(cx, e.span, "expected a compile-time integer")
                .label(format!("this is {}", v.kind()))),
        }
    }

    /// The values a `for` or comprehension iterates over.
    pub fn iterate(&mut self, cx: &mut Ctx, e: &Expr) -> R<Vec<Value>> {
        match self.eval(cx, e)? {
            Value::Range(lo, hi) => {
                if hi.saturating_sub(lo) > 1_000_000 {
                    return Err(self.err(
                        cx,
                        e.span,
                        "range is too long to unroll (over 1,000,000)",
                    ));
                }
                Ok((lo..hi).map(Value::Int).collect())
            }
            Value::List(v) | Value::Tuple(v) => Ok(Rc::unwrap_or_clone(v)),
            v => Err(self
                .err(
                    cx,
                    e.span,
                    "can only iterate over a range (`0..n`) or a list",
                )
                .label(format!("this is {}", v.kind()))),
        }
    }

    /// The diagnostic of compile-time integer arithmetic whose result does not fit in 64 bits
    /// (`what`: the operation with its operands, as code: `` `9223372036854775807 + 1` ``).
    pub fn overflow(&self, cx: &Ctx, span: Span, what: impl std::fmt::Display) -> Diagnostic {
        self.err(cx, span, format!("integer overflow in {what}"))
            .label("the result does not fit in a 64-bit integer")
            .note(format!(
                "compile-time integers are 64-bit: {} to {}",
                i64::MIN,
                i64::MAX
            ))
    }

    fn unary(&mut self, cx: &mut Ctx, op: UnaryOp, v: Value, span: Span) -> R<Value> {
        match (op, v) {
            (UnaryOp::Neg, Value::Int(i)) => i
                .checked_neg()
                .map(Value::Int)
                .ok_or_else(|| self.overflow(cx, span, format!("`-({i})`"))),
            (UnaryOp::Neg, Value::Float(f)) => Ok(Value::Float(-f)),
            (UnaryOp::Neg, Value::Dim(d)) => d
                .checked_neg()
                .map(Value::from_dim)
                .ok_or_else(|| self.overflow(cx, span, format!("`-({d})`"))),
            (UnaryOp::Neg, Value::Tensor(t)) => {
                let r = self.prim_unary(cx, crate::ir::UnaryOp::Neg, t, span)?;
                Ok(Value::Tensor(r))
            }
            (UnaryOp::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
            (UnaryOp::Not, Value::Tensor(t)) => {
                let r = self.prim_unary(cx, crate::ir::UnaryOp::Not, t, span)?;
                Ok(Value::Tensor(r))
            }
            (op, v) => Err(self
                .err(
                    cx,
                    span,
                    format!(
                        "cannot apply `{}` to {}",
                        if op == UnaryOp::Neg { "-" } else { "!" },
                        v.kind()
                    ),
                )
                .label(format!("this is {}", v.kind()))),
        }
    }

    fn binary_expr(
        &mut self,
        cx: &mut Ctx,
        op: BinOp,
        lhs: &Expr,
        rhs: &Expr,
        span: Span,
    ) -> R<Value> {
        // Short-circuit compile-time logic so that `x != none && x.rank == 2` works.
        if matches!(op, BinOp::And | BinOp::Or) {
            let l = self.eval(cx, lhs)?;
            if let Value::Bool(b) = l {
                if (op == BinOp::And && !b) || (op == BinOp::Or && b) {
                    return Ok(Value::Bool(b));
                }
                let r = self.eval(cx, rhs)?;
                return match r {
                    Value::Bool(rb) => Ok(Value::Bool(rb)),
                    r => Err(self
                        .err(
                            cx,
                            rhs.span,
                            format!("`{}` needs bools on both sides", op.symbol()),
                        )
                        .label(format!("this is {}", r.kind()))),
                };
            }
            let r = self.eval(cx, rhs)?;
            return self.binary(cx, op, l, r, lhs.span, rhs.span, span);
        }
        let (l, r) = if matches!(op, BinOp::Eq | BinOp::Ne) {
            // Next to an enum value a bare name is a variant, even if a member has that name
            // (`out_name == o_proj` inside a block with an `o_proj` member).
            let as_variant = |e: &Expr| match &e.kind {
                ExprKind::Name(n) => Some(Value::Enum(n.clone())),
                _ => None,
            };
            let l = self.eval_sym(cx, lhs)?;
            let r = match (&l, as_variant(rhs)) {
                (Value::Enum(_), Some(v)) => v,
                _ => self.eval_sym(cx, rhs)?,
            };
            let l = match (&r, as_variant(lhs)) {
                (Value::Enum(_), Some(v)) if !matches!(l, Value::Enum(_)) => v,
                _ => l,
            };
            (l, r)
        } else {
            (self.eval(cx, lhs)?, self.eval(cx, rhs)?)
        };
        self.binary(cx, op, l, r, lhs.span, rhs.span, span)
    }

    /// Applies a binary operator to two values.
    #[allow(clippy::too_many_arguments)]
    pub fn binary(
        &mut self,
        cx: &mut Ctx,
        op: BinOp,
        l: Value,
        r: Value,
        lspan: Span,
        rspan: Span,
        span: Span,
    ) -> R<Value> {
        use Value as V;
        let none_test =
            matches!(op, BinOp::Eq | BinOp::Ne) && (matches!(l, V::None) || matches!(r, V::None));
        if !none_test && (matches!(l, V::Tensor(_)) || matches!(r, V::Tensor(_))) {
            if op == BinOp::MatMul {
                let (V::Tensor(a), V::Tensor(b)) = (&l, &r) else {
                    return Err(self.err(cx, span, "`@` needs tensors on both sides"));
                };
                return Ok(V::Tensor(self.matmul(cx, *a, *b, span)?));
            }
            let Some(prim) = prim_binary(op) else {
                return Err(self.err(
                    cx,
                    span,
                    format!("`{}` is not defined on tensors", op.symbol()),
                ));
            };
            return Ok(V::Tensor(
                self.tensor_binary(cx, prim, l, r, lspan, rspan, span)?,
            ));
        }
        let bad = |s: &Self, l: &Value, r: &Value| {
            s.err(
                cx,
                span,
                format!(
                    "cannot apply `{}` to {} and {}",
                    op.symbol(),
                    l.kind(),
                    r.kind()
                ),
            )
        };
        match op {
            BinOp::Range => match (&l, &r) {
                (V::Int(a), V::Int(b)) => Ok(V::Range(*a, *b)),
                _ => Err(bad(self, &l, &r).note("range bounds must be compile-time integers")),
            },
            BinOp::Eq | BinOp::Ne => {
                let eq = match values_equal(&l, &r) {
                    Some(eq) => eq,
                    None => return Err(bad(self, &l, &r)),
                };
                Ok(V::Bool(if op == BinOp::Eq { eq } else { !eq }))
            }
            BinOp::And | BinOp::Or => Err(bad(self, &l, &r)),
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let ord = match (&l, &r) {
                    (V::Int(a), V::Int(b)) => a.partial_cmp(b),
                    _ => match (l.as_f64(), r.as_f64()) {
                        (Some(a), Some(b)) => a.partial_cmp(&b),
                        _ => None,
                    },
                };
                let Some(ord) = ord else {
                    return Err(bad(self, &l, &r));
                };
                use std::cmp::Ordering::*;
                Ok(V::Bool(match op {
                    BinOp::Lt => ord == Less,
                    BinOp::Le => ord != Greater,
                    BinOp::Gt => ord == Greater,
                    _ => ord != Less,
                }))
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => match (&l, &r) {
                (V::List(a), V::List(b)) if op == BinOp::Add => Ok(V::List(
                    a.iter().chain(b.iter()).cloned().collect::<Vec<_>>().into(),
                )),
                (V::Float(_), _) | (_, V::Float(_)) => {
                    let (Some(a), Some(b)) = (l.as_f64(), r.as_f64()) else {
                        return Err(bad(self, &l, &r));
                    };
                    Ok(V::Float(match op {
                        BinOp::Add => a + b,
                        BinOp::Sub => a - b,
                        BinOp::Mul => a * b,
                        BinOp::Div => a / b,
                        _ => a % b,
                    }))
                }
                _ => {
                    let (Some(a), Some(b)) = (l.as_dim(), r.as_dim()) else {
                        return Err(bad(self, &l, &r));
                    };
                    let res = match op {
                        BinOp::Add => a.checked_add(&b),
                        BinOp::Sub => a.checked_sub(&b),
                        BinOp::Mul => a.checked_mul(&b),
                        BinOp::Div => {
                            if b.as_const() == Some(0) {
                                return Err(self.err(cx, rspan, "division by zero"));
                            }
                            if let (Some(x), Some(y)) = (a.as_const(), b.as_const()) {
                                // `i64::MIN / -1` is exact, but its result does not fit.
                                if x.checked_div(y).is_none() {
                                    return Err(self.overflow(cx, span, format!("`{x} / {y}`")));
                                }
                            }
                            match a.div_exact(&b) {
                                Some(d) => Some(d),
                                None => {
                                    return Err(self
                                        .err(cx, span, format!("`{a}` is not divisible by `{b}`"))
                                        .label("integer division must be exact")
                                        .note("sizes divide exactly; for a fraction write a float, e.g. `1.0 / 8`"))
                                }
                            }
                        }
                        _ => {
                            if b.as_const() == Some(0) {
                                return Err(self.err(cx, rspan, "remainder by zero"));
                            }
                            if let (Some(x), Some(y @ ..=-1)) = (a.as_const(), b.as_const()) {
                                // A negative divisor: the result takes its sign, as in Python
                                // (`7 % -2` is `-1`); `i64::MIN % -1` is 0, without overflow.
                                let r = x.checked_rem(y).unwrap_or(0);
                                let r = if r > 0 { r + y } else { r };
                                return Ok(V::Int(r));
                            }
                            match a.rem(&b) {
                                Some(d) => Some(d),
                                None => {
                                    return Err(self.err(
                                        cx,
                                        span,
                                        format!("cannot compute `{a} % {b}` at compile time"),
                                    ))
                                }
                            }
                        }
                    };
                    res.map(V::from_dim).ok_or_else(|| {
                        self.overflow(cx, span, format!("`{a} {} {b}`", op.symbol()))
                    })
                }
            },
            BinOp::MatMul => Err(bad(self, &l, &r).note("`@` multiplies tensors")),
        }
    }

    fn call_expr(&mut self, cx: &mut Ctx, callee: &Expr, args: &[Arg], span: Span) -> R<Value> {
        // `x.sum(axis: -1)`: a builtin called as a method of a tensor or list.
        if let ExprKind::Field { base, name } = &callee.kind {
            let b = self.eval(cx, base)?;
            if matches!(b, Value::Tensor(_) | Value::List(_) | Value::Tuple(_)) {
                let Some(f) = super::builtins::lookup(&name.name) else {
                    return Err(self
                        .err(
                            cx,
                            name.span,
                            format!("no method `{}` on {}", name.name, b.kind()),
                        )
                        .label("unknown method"));
                };
                let mut vals = vec![ArgVal {
                    name: None,
                    value: b,
                    span: base.span,
                    raw: None,
                }];
                vals.extend(self.eval_args(cx, args)?);
                return self.call_builtin(cx, f, vals, span);
            }
            let f = self.field(cx, b, name)?;
            let vals = self.eval_args(cx, args)?;
            return self.call_value(cx, f, vals, callee.span, span);
        }
        let f = self.eval(cx, callee)?;
        let vals = self.eval_args(cx, args)?;
        self.call_value(cx, f, vals, callee.span, span)
    }

    /// Evaluates call arguments (bare unknown names become enum symbols).
    pub fn eval_args(&mut self, cx: &mut Ctx, args: &[Arg]) -> R<Vec<ArgVal>> {
        let mut out = Vec::with_capacity(args.len());
        for a in args {
            out.push(ArgVal {
                name: a.name.clone(),
                value: self.eval_sym(cx, &a.value)?,
                span: a.value.span,
                raw: super::signature::bare_name(&a.value),
            });
        }
        Ok(out)
    }

    /// Calls a function value.
    pub fn call_value(
        &mut self,
        cx: &mut Ctx,
        f: Value,
        args: Vec<ArgVal>,
        callee_span: Span,
        span: Span,
    ) -> R<Value> {
        match f {
            Value::Func(Func::Builtin(b)) => self.call_builtin(cx, b, args, span),
            Value::Func(Func::Item(r)) => match self.prog.item(r) {
                vlmc_grammar::ast::Item::Fn(decl) => {
                    let decl = std::rc::Rc::new(decl.clone());
                    self.call_fn(cx, &decl, r.module, None, args, span)
                }
                vlmc_grammar::ast::Item::Block(b) => Err(self
                    .err(
                        cx,
                        span,
                        format!(
                            "block `{}` can only be instantiated as a member",
                            b.name.name
                        ),
                    )
                    .label("not a member declaration")
                    .note(format!(
                        "declare it in a block body: `name = {}(...)`, then call `name(x)`",
                        b.name.name
                    ))),
                _ => Err(self.err(cx, callee_span, "this is not callable")),
            },
            Value::Func(Func::Method(inst, name)) => {
                let decl = inst.methods[&name].clone();
                let module = inst.block.module;
                self.call_fn(cx, &decl, module, Some(inst), args, span)
            }
            Value::Module(inst) => match inst.methods.get("forward").cloned() {
                Some(decl) => {
                    let module = inst.block.module;
                    self.call_fn(cx, &decl, module, Some(inst), args, span)
                }
                None => Err(self
                    .err(
                        cx,
                        callee_span,
                        format!("`{}` has no `forward` method", inst.kind),
                    )
                    .label("called here")),
            },
            v => Err(self
                .err(cx, callee_span, format!("{} is not callable", v.kind()))
                .label("not a function or module")),
        }
    }

    /// `base.name` on a value.
    pub fn field(&mut self, cx: &mut Ctx, base: Value, name: &Ident) -> R<Value> {
        match &base {
            Value::Module(inst) => {
                if let Some(v) = inst.env.get(&name.name) {
                    return Ok(v.clone());
                }
                if inst.methods.contains_key(&name.name) {
                    return Ok(Value::Func(Func::Method(inst.clone(), name.name.clone())));
                }
                let mut d = self
                    .err(
                        cx,
                        name.span,
                        format!("`{}` has no member `{}`", inst.kind, name.name),
                    )
                    .label("unknown member");
                let mut known: Vec<&String> = inst.order.iter().collect();
                known.extend(inst.methods.keys());
                known.sort();
                if !known.is_empty() {
                    let k: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
                    d = d.note(format!("members: {}", k.join(", ")));
                }
                Err(d)
            }
            Value::Tensor(t) => {
                let ty = self.graph.node(*t).ty.clone();
                match name.name.as_str() {
                    "T" => {
                        if ty.rank() < 2 {
                            return Err(self
                                .err(cx, name.span, format!("`.T` needs rank >= 2, got {ty}"))
                                .label("transposes the last two axes"));
                        }
                        let r = ty.rank();
                        let mut perm: Vec<usize> = (0..r).collect();
                        perm.swap(r - 1, r - 2);
                        Ok(Value::Tensor(self.permute(cx, *t, perm, name.span)?))
                    }
                    "shape" => Ok(Value::List(
                        ty.shape
                            .0
                            .iter()
                            .cloned()
                            .map(Value::from_dim)
                            .collect::<Vec<_>>()
                            .into(),
                    )),
                    "rank" => Ok(Value::Int(ty.rank() as i64)),
                    "dtype" => Ok(Value::DType(ty.dtype)),
                    other => Err(self
                        .err(cx, name.span, format!("tensors have no field `{other}`"))
                        .note("tensor fields: .T, .shape, .rank, .dtype; methods: any builtin, e.g. x.sum(axis: -1)")),
                }
            }
            Value::Tuple(items) | Value::List(items) => {
                if let Ok(i) = name.name.parse::<usize>() {
                    if let Some(v) = items.get(i) {
                        return Ok(v.clone());
                    }
                    return Err(self.err(
                        cx,
                        name.span,
                        format!(
                            "index {i} is out of range for {} of {}",
                            base.kind(),
                            items.len()
                        ),
                    ));
                }
                Err(self.err(
                    cx,
                    name.span,
                    format!("{} has no field `{}`", base.kind(), name.name),
                ))
            }
            v => Err(self.err(
                cx,
                name.span,
                format!("{} has no field `{}`", v.kind(), name.name),
            )),
        }
    }
}

/// The IR op for a tensor operator.
fn prim_binary(op: BinOp) -> Option<BinaryOp> {
    Some(match op {
        BinOp::Add => BinaryOp::Add,
        BinOp::Sub => BinaryOp::Sub,
        BinOp::Mul => BinaryOp::Mul,
        BinOp::Div => BinaryOp::Div,
        BinOp::Rem => BinaryOp::Mod,
        BinOp::Eq => BinaryOp::Eq,
        BinOp::Ne => BinaryOp::Ne,
        BinOp::Lt => BinaryOp::Lt,
        BinOp::Le => BinaryOp::Le,
        BinOp::Gt => BinaryOp::Gt,
        BinOp::Ge => BinaryOp::Ge,
        BinOp::And => BinaryOp::And,
        BinOp::Or => BinaryOp::Or,
        BinOp::Range | BinOp::MatMul => return None,
    })
}

/// Compile-time equality; `None` where the two kinds cannot be compared.
fn values_equal(l: &Value, r: &Value) -> Option<bool> {
    use Value as V;
    Some(match (l, r) {
        (V::None, V::None) => true,
        (V::None, _) | (_, V::None) => false,
        (V::Bool(a), V::Bool(b)) => a == b,
        (V::Str(a), V::Str(b)) => a == b,
        (V::Enum(a), V::Enum(b)) => a == b,
        (V::DType(a), V::DType(b)) => a == b,
        (V::Int(_) | V::Dim(_), V::Int(_) | V::Dim(_)) => l.as_dim()? == r.as_dim()?,
        (V::Float(_) | V::Int(_), V::Float(_) | V::Int(_)) => l.as_f64()? == r.as_f64()?,
        (V::List(a), V::List(b)) | (V::Tuple(a), V::Tuple(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| values_equal(x, y) == Some(true))
        }
        (V::Func(_), V::Func(_)) => func_id(l) == func_id(r),
        _ => return None,
    })
}

fn func_id(v: &Value) -> String {
    match v {
        Value::Func(Func::Builtin(b)) => format!("builtin {b}"),
        Value::Func(Func::Item(r)) => format!("item {}:{}", r.module, r.item),
        Value::Func(Func::Method(i, n)) => format!("method {}.{}", i.path, n),
        _ => String::new(),
    }
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
