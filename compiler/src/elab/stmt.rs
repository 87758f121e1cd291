//! Function calls and statements: `let`, assignment, compile-time `if` and `for` (unrolled),
//! `assert`, `return`; the model's entry point becomes the graph's inputs and outputs.

use super::eval::ArgVal;
use super::value::{Instance, Value};
use super::{Ctx, Elaborator, MAX_DEPTH};
use crate::diag::{Diagnostic, Loc};
use crate::ir::{Op, TensorType};
use std::collections::HashMap;
use std::rc::Rc;
use vlmc_grammar::ast::{FnDecl, RetType, ScalarType, Span, Stmt, Target, TypeExpr, TypeKind};

type R<T> = Result<T, Diagnostic>;

/// How a statement list ended.
enum Flow {
    Next,
    Return(Value, Span),
}

impl Elaborator<'_> {
    /// Calls a function or method with evaluated arguments.
    pub fn call_fn(
        &mut self,
        cx: &mut Ctx,
        decl: &Rc<FnDecl>,
        module: usize,
        inst: Option<Rc<Instance>>,
        args: Vec<ArgVal>,
        span: Span,
    ) -> R<Value> {
        let what = match &inst {
            Some(i) => format!("{}.{}", i.kind, decl.name.name),
            None => decl.name.name.clone(),
        };
        // A function's identity for recursion checks: its module and (block and) name.
        let id = match &inst {
            Some(i) => format!("{}:{}.{}", i.block.module, i.block.item, decl.name.name),
            None => format!("{}:{}", module, decl.name.name),
        };
        if self.stack.iter().any(|(i, _, _)| *i == id) {
            return Err(self
                .err(cx, span, format!("recursive call of `{what}`"))
                .label(format!("`{what}` is already being called"))
                .note("recursion is not allowed: the graph is unrolled at compile time; use a `for` loop"));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.err(cx, span, "calls are nested too deeply"));
        }
        let site = self.prog.loc(cx.module, span);
        let path = inst
            .as_ref()
            .map_or_else(|| cx.path.clone(), |i| i.path.clone());
        let mut callee = Ctx {
            module,
            inst,
            locals: vec![HashMap::new()],
            path,
        };
        self.bind_args(cx, &mut callee, &what, &decl.params, args, span)?;
        self.stack.push((id, format!("in {what}, called at"), site));
        let result = self.run_body(&mut callee, decl, &what);
        self.stack.pop();
        result
    }

    fn run_body(&mut self, cx: &mut Ctx, decl: &FnDecl, what: &str) -> R<Value> {
        let (value, ret_span) = match self.exec_block(cx, &decl.body)? {
            Flow::Return(v, s) => (v, s),
            Flow::Next => {
                return Err(self
                    .err(
                        cx,
                        decl.name.span,
                        format!("`{what}` ends without `return`"),
                    )
                    .label("no return value"))
            }
        };
        if let Some(ret) = &decl.ret {
            self.check_ret(cx, ret, &value, ret_span, what)?;
        }
        Ok(value)
    }

    fn check_ret(
        &mut self,
        cx: &mut Ctx,
        ret: &RetType,
        v: &Value,
        span: Span,
        what: &str,
    ) -> R<()> {
        match ret {
            RetType::Single(t) => self.check_ret_one(cx, t, v, span, what),
            RetType::Tuple(items) => {
                let Value::Tuple(vs) = v else {
                    return Err(self
                        .err(
                            cx,
                            span,
                            format!("`{what}` must return a tuple of {}", items.len()),
                        )
                        .label(format!("this is {}", v.kind())));
                };
                if vs.len() != items.len() {
                    return Err(self
                        .err(
                            cx,
                            span,
                            format!(
                                "`{what}` must return {} values, got {}",
                                items.len(),
                                vs.len()
                            ),
                        )
                        .label("wrong number of values"));
                }
                for ((_, t), v) in items.iter().zip(vs.iter()) {
                    self.check_ret_one(cx, t, v, span, what)?;
                }
                Ok(())
            }
        }
    }

    fn check_ret_one(
        &mut self,
        cx: &mut Ctx,
        t: &TypeExpr,
        v: &Value,
        span: Span,
        what: &str,
    ) -> R<()> {
        match (&t.kind, v) {
            (_, Value::None) if t.optional => Ok(()),
            (TypeKind::Tensor(tt), Value::Tensor(id)) => {
                let ty = self.graph.node(*id).ty.clone();
                cx.locals.push(HashMap::new());
                let m = cx.module;
                let r = self.match_tensor(m, cx, tt, &ty, span, &format!("the result of `{what}`"));
                cx.locals.pop();
                r
            }
            (TypeKind::Tensor(_), other) => Err(self
                .err(
                    cx,
                    span,
                    format!("`{what}` must return a tensor, got {}", other.kind()),
                )
                .label(format!("this is {}", other.kind()))),
            (TypeKind::Scalar(st), v) => {
                let ok = matches!(
                    (st, v),
                    (ScalarType::Int, Value::Int(_))
                        | (ScalarType::Float, Value::Int(_) | Value::Float(_))
                        | (ScalarType::Bool, Value::Bool(_))
                        | (ScalarType::Str, Value::Str(_))
                        | (ScalarType::Fn, Value::Func(_))
                        | (ScalarType::Dim, Value::Int(_) | Value::Dim(_))
                );
                if ok {
                    Ok(())
                } else {
                    Err(self
                        .err(
                            cx,
                            span,
                            format!("`{what}` must return {}, got {}", st.name(), v.kind()),
                        )
                        .label(format!("this is {}", v.kind())))
                }
            }
            (TypeKind::Enum(vs), v) => match v {
                Value::Enum(n) if vs.iter().any(|x| x.name == *n) => Ok(()),
                _ => Err(self
                    .err(
                        cx,
                        span,
                        format!("`{what}` must return one of its enum's variants"),
                    )
                    .label(format!("this is {}", v.kind()))),
            },
        }
    }

    fn exec_block(&mut self, cx: &mut Ctx, stmts: &[Stmt]) -> R<Flow> {
        cx.locals.push(HashMap::new());
        let r = self.exec_stmts(cx, stmts);
        cx.locals.pop();
        r
    }

    fn exec_stmts(&mut self, cx: &mut Ctx, stmts: &[Stmt]) -> R<Flow> {
        for s in stmts {
            match s {
                Stmt::Let { target, value, .. } => {
                    let v = self.eval(cx, value)?;
                    match target {
                        Target::Name(n) => self.define(cx, &n.name, v),
                        Target::Tuple(names) => {
                            let items = match v {
                                Value::Tuple(items) | Value::List(items) => {
                                    Rc::unwrap_or_clone(items)
                                }
                                other => {
                                    return Err(self
                                        .err(
                                            cx,
                                            value.span,
                                            format!(
                                                "cannot unpack {} into {} names",
                                                other.kind(),
                                                names.len()
                                            ),
                                        )
                                        .label("not a tuple"))
                                }
                            };
                            if items.len() != names.len() {
                                return Err(self
                                    .err(
                                        cx,
                                        value.span,
                                        format!(
                                            "cannot unpack {} values into {} names",
                                            items.len(),
                                            names.len()
                                        ),
                                    )
                                    .label("wrong number of values"));
                            }
                            for (n, v) in names.iter().zip(items) {
                                self.define(cx, &n.name, v);
                            }
                        }
                    }
                }
                Stmt::Assign { name, value, .. } => {
                    let v = self.eval(cx, value)?;
                    let slot = cx
                        .locals
                        .iter_mut()
                        .rev()
                        .find_map(|s| s.get_mut(&name.name));
                    match slot {
                        Some(slot) => *slot = v,
                        None => {
                            return Err(self
                                .err(
                                    cx,
                                    name.span,
                                    format!("cannot assign to `{}`: no such variable", name.name),
                                )
                                .label("declare it first with `let`"))
                        }
                    }
                }
                Stmt::Return { value, .. } => {
                    let v = self.eval(cx, value)?;
                    return Ok(Flow::Return(v, value.span));
                }
                Stmt::If {
                    cond, then, els, ..
                } => {
                    let c = self.eval_bool(cx, cond)?;
                    let flow = self.exec_block(cx, if c { then } else { els })?;
                    if let Flow::Return(..) = flow {
                        return Ok(flow);
                    }
                }
                Stmt::For {
                    var, iter, body, ..
                } => {
                    for v in self.iterate(cx, iter)? {
                        cx.locals
                            .push([(var.name.clone(), v)].into_iter().collect());
                        let flow = self.exec_block(cx, body);
                        cx.locals.pop();
                        let flow = flow?;
                        if let Flow::Return(..) = flow {
                            return Ok(flow);
                        }
                    }
                }
                Stmt::Assert {
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
        Ok(Flow::Next)
    }

    /// Binds a new variable in the innermost scope (shadowing is allowed).
    pub fn define(&mut self, cx: &mut Ctx, name: &str, v: Value) {
        if let Some(s) = cx.locals.last_mut() {
            s.insert(name.to_string(), v);
        }
    }

    /// Runs the model's `forward`: its tensor parameters become graph inputs with symbolic
    /// dims, its results become graph outputs.
    pub fn run_entry(&mut self, root: &Rc<Instance>, loc: Loc, entry: &str) -> R<()> {
        let module = root.block.module;
        let Some(decl) = root.methods.get(entry).cloned() else {
            let label = match entry {
                "forward" => "every model needs an entry point".to_string(),
                _ => format!("`{entry}` is the entry point asked for"),
            };
            return Err(self
                .err_in(
                    module,
                    loc.span,
                    format!("model `{}` has no `fn {entry}`", root.kind),
                )
                .label(label));
        };
        let mut cx = Ctx {
            module,
            inst: Some(root.clone()),
            locals: vec![HashMap::new()],
            path: String::new(),
        };
        for p in &decl.params {
            let v = match (&p.ty.kind, &p.default) {
                // When generating, optional tensor inputs (a padding mask) are left out: the
                // engine gives the attention layers their masks.
                (TypeKind::Tensor(_), Some(d)) if self.gen.is_some() && p.ty.optional => {
                    self.eval(&mut cx, d)?
                }
                (TypeKind::Tensor(tt), _) => {
                    let ty: TensorType = self.declare_tensor_type(&mut cx, tt)?;
                    let id = self
                        .graph
                        .add_source(
                            Op::Input {
                                name: p.name.name.clone(),
                            },
                            ty,
                            "",
                        )
                        .map_err(|e| self.err(&cx, p.span, e.to_string()))?;
                    Value::Tensor(id)
                }
                (_, Some(d)) => self.eval(&mut cx, d)?,
                (_, None) => {
                    return Err(self
                        .err(
                            &cx,
                            p.span,
                            format!(
                                "model input `{}` must be a tensor or have a default",
                                p.name.name
                            ),
                        )
                        .label("no value for this at build time"))
                }
            };
            self.define(&mut cx, &p.name.name, v);
        }
        let what = format!("{}.{entry}", root.kind);
        // The entry point is on the stack for recursion checks but not shown in traces.
        self.stack.push((
            format!("{}:{}.{entry}", root.block.module, root.block.item),
            String::new(),
            loc,
        ));
        let result = self.run_body(&mut cx, &decl, &what);
        self.stack.pop();
        let result = result?;
        let names: Vec<Option<String>> = match &decl.ret {
            Some(RetType::Tuple(items)) => items
                .iter()
                .map(|(n, _)| n.as_ref().map(|n| n.name.clone()))
                .collect(),
            _ => Vec::new(),
        };
        let outs = match result {
            Value::Tuple(items) => Rc::unwrap_or_clone(items),
            v => vec![v],
        };
        let single = outs.len() == 1;
        for (i, v) in outs.into_iter().enumerate() {
            let name = names.get(i).cloned().flatten().unwrap_or_else(|| {
                if single {
                    "output".to_string()
                } else {
                    format!("output{i}")
                }
            });
            match v {
                Value::Tensor(id) => self
                    .graph
                    .set_output(&name, id)
                    .map_err(|e| self.err_in(module, decl.name.span, e.to_string()))?,
                other => {
                    return Err(self
                        .err_in(
                            module,
                            decl.name.span,
                            format!(
                                "`{what}` must return tensors; result `{name}` is {}",
                                other.kind()
                            ),
                        )
                        .label("entry point"))
                }
            }
        }
        Ok(())
    }
}
