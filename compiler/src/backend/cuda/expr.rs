//! Scalar expressions in CUDA C: values ([`Val`]) in f32 or i32 with the dtype rules of the plan
//! executor (`runtime/src/plan.rs`), indices ([`Idx`]) in the kernel's index type. A
//! subexpression that occurs more than once in a loop nest is bound to a `const` local, once per
//! scope; the rest is written inline.

use super::bounds::{has_load, range, Range};
use super::CudaError;
use crate::ir::{BinaryOp, DType, ReduceOp, UnaryOp};
use crate::kernel::{Idx, Plan, Stmt, Val};
use std::collections::HashMap;

/// How a dtype is held in a register and in a 4-byte slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    /// `float` (f32, and f16/bf16 values rounded to their precision).
    Float,
    /// `int` (i32, and bools as 0/1).
    Int,
}

/// The register class of a dtype.
pub fn class(d: DType) -> Class {
    match d {
        DType::I32 | DType::Bool => Class::Int,
        _ => Class::Float,
    }
}

/// The C type of a dtype's slot.
pub fn ctype(d: DType) -> &'static str {
    match class(d) {
        Class::Float => "float",
        Class::Int => "int",
    }
}

/// `e` rounded to the precision of `d` (f16 and bf16; f32 needs nothing).
fn round(d: DType, e: String) -> String {
    match d {
        DType::F16 => format!("vlmc_f16({e})"),
        DType::BF16 => format!("vlmc_bf16({e})"),
        _ => e,
    }
}

/// A float literal (the value rounded to f32).
pub fn float_lit(x: f64) -> String {
    let x = x as f32;
    if x.is_nan() {
        "vlmc_nan()".into()
    } else if x.is_infinite() {
        if x > 0.0 {
            "vlmc_inf()"
        } else {
            "(-vlmc_inf())"
        }
        .into()
    } else if x < 0.0 || (x == 0.0 && x.is_sign_negative()) {
        format!("({x:?}f)")
    } else {
        format!("{x:?}f")
    }
}

/// An i32 literal.
pub fn int_lit(x: i32) -> String {
    match x {
        i32::MIN => "(-2147483647 - 1)".into(),
        x if x < 0 => format!("({x})"),
        x => x.to_string(),
    }
}

/// A constant of dtype `d`, rounded as the plan executor rounds it.
fn const_lit(c: f64, d: DType) -> String {
    match d {
        DType::F16 => float_lit(half::f16::from_f64(c).to_f64()),
        DType::BF16 => float_lit(half::bf16::from_f64(c).to_f64()),
        DType::I32 => int_lit(c as i64 as i32),
        DType::Bool => u8::from(c != 0.0).to_string(),
        _ => float_lit(c),
    }
}

/// Conversion of an expression of dtype `from` to dtype `to` (the semantics of `cast`).
pub fn convert(e: String, from: DType, to: DType) -> String {
    if from == to {
        return e;
    }
    match (class(from), to) {
        (_, DType::Bool) => match class(from) {
            Class::Float => format!("({e} != 0.0f)"),
            Class::Int => format!("({e} != 0)"),
        },
        (Class::Float, DType::I32) => format!("vlmc_f2i({e})"),
        (Class::Int, DType::I32) => e,
        (Class::Int, _) => round(to, format!("(float){e}")),
        (Class::Float, _) => round(to, e),
    }
}

/// A precedence-tagged index expression: 3 atom, 2 multiplicative, 1 additive.
type Ix = (String, u8);

/// The code of one loop nest under construction: lines, scopes of bound subexpressions and
/// the ranges of the loop variables in scope.
pub struct Body<'p> {
    plan: &'p Plan,
    /// `int` or `long long`.
    pub idx_ty: &'static str,
    /// Ranges of the loop variables (for plain `/` and `%` when the dividend is non-negative).
    pub vars: Vec<Range>,
    counts: HashMap<String, usize>,
    /// Index expressions with a name of their own (the flat counter of a pointwise loop).
    aliases: HashMap<String, String>,
    scopes: Vec<HashMap<String, String>>,
    lines: Vec<String>,
    indent: usize,
    next: usize,
    accs: HashMap<usize, DType>,
}

impl<'p> Body<'p> {
    /// A body at indentation `indent`.
    pub fn new(plan: &'p Plan, idx_ty: &'static str, vars: Vec<Range>, indent: usize) -> Self {
        Body {
            plan,
            idx_ty,
            vars,
            counts: HashMap::new(),
            aliases: HashMap::new(),
            scopes: vec![HashMap::new()],
            lines: Vec::new(),
            indent,
            next: 0,
            accs: HashMap::new(),
        }
    }

    /// Counts the subexpressions of the statements written next: those occurring more than
    /// once (and not only inside a larger repeated one) are bound to locals.
    pub fn count(&mut self, stmts: &[Stmt]) {
        self.counts.clear();
        count_stmts(stmts, &mut self.counts);
    }

    /// Names an index expression (written as `name` wherever it occurs).
    pub fn alias(&mut self, i: &Idx, name: &str) {
        self.aliases.insert(format!("{i:?}"), name.to_string());
    }

    /// The code written so far.
    pub fn finish(self) -> Vec<String> {
        self.lines
    }

    /// Writes one line at the current indentation.
    pub fn line(&mut self, s: impl AsRef<str>) {
        self.lines
            .push(format!("{}{}", "  ".repeat(self.indent), s.as_ref()));
    }

    /// Opens a block (`header {`) with its own scope of bound subexpressions.
    pub fn open(&mut self, header: impl AsRef<str>) {
        match header.as_ref() {
            "" => self.line("{"),
            h => self.line(format!("{h} {{")),
        }
        self.indent += 1;
        self.scopes.push(HashMap::new());
    }

    /// Closes the innermost block.
    pub fn close(&mut self) {
        self.scopes.pop();
        self.indent = self.indent.saturating_sub(1);
        self.line("}");
    }

    /// The dtype of a buffer.
    pub fn buffer_dtype(&self, buf: usize) -> Option<DType> {
        self.plan.buffers.get(buf).map(|b| b.dtype)
    }

    /// Sets the range of the reduced axis `i{r}` to `0..len`; returns the previous one.
    pub fn set_inner(&mut self, r: usize, len: usize) -> Range {
        if self.vars.len() <= r {
            self.vars.resize(r + 1, (0, 0));
        }
        std::mem::replace(&mut self.vars[r], (0, len as i128 - 1))
    }

    /// Restores the range of the reduced axis.
    pub fn restore_inner(&mut self, r: usize, saved: Range) {
        if let Some(v) = self.vars.get_mut(r) {
            *v = saved;
        }
    }

    /// Declares the dtype of accumulator `n` (before the values that read it).
    pub fn set_acc(&mut self, n: usize, d: DType) {
        self.accs.insert(n, d);
    }

    /// `e` as a name: bound to a `const` local when `key` occurs more than once.
    fn bind(&mut self, key: &str, ty: &str, e: String) -> String {
        if is_atom(&e) || self.counts.get(key).copied().unwrap_or(0) < 2 {
            return e;
        }
        for scope in self.scopes.iter().rev() {
            if let Some(n) = scope.get(&e) {
                return n.clone();
            }
        }
        let name = format!("v{}", self.next);
        self.next += 1;
        self.line(format!("const {ty} {name} = {e};"));
        if let Some(s) = self.scopes.last_mut() {
            s.insert(e, name.clone());
        }
        name
    }

    /// An index expression in the kernel's index type.
    pub fn idx(&mut self, i: &Idx) -> Result<String, CudaError> {
        Ok(self.ix(i)?.0)
    }

    fn ix(&mut self, i: &Idx) -> Result<Ix, CudaError> {
        let key = format!("{i:?}");
        if let Some(name) = self.aliases.get(&key) {
            return Ok((name.clone(), 3));
        }
        let ty = self.idx_ty;
        let (e, prec) = match i {
            Idx::Var(v) => return Ok((format!("i{v}"), 3)),
            Idx::Const(c) => return Ok((self.idx_lit(*c), 3)),
            Idx::Add(a, b) => {
                let (a, b) = (self.ix(a)?, self.ix(b)?);
                match b.0.strip_prefix("(-") {
                    Some(neg) if b.1 == 3 && neg.ends_with(')') => {
                        (format!("{} - {}", a.0, &neg[..neg.len() - 1]), 1)
                    }
                    _ => (format!("{} + {}", a.0, b.0), 1),
                }
            }
            Idx::Mul(a, c) => {
                let a = self.ix(a)?;
                (format!("{} * {}", paren(a, 2), self.idx_lit(*c)), 2)
            }
            Idx::Div(a, c) | Idx::Rem(a, c) => {
                let nonneg = range(a, &self.vars).is_some_and(|r| r.0 >= 0);
                let x = self.ix(a)?;
                let div = matches!(i, Idx::Div(..));
                match (nonneg, div) {
                    (true, true) => (format!("{} / {}", paren(x, 2), self.idx_lit(*c)), 2),
                    (true, false) => (format!("{} % {}", paren(x, 2), self.idx_lit(*c)), 2),
                    (false, true) => (format!("vlmc_floordiv<{ty}>({}, {c})", x.0), 3),
                    (false, false) => (format!("vlmc_floormod<{ty}>({}, {c})", x.0), 3),
                }
            }
            Idx::Clamp(a, lo, hi) => {
                let inside = range(a, &self.vars)
                    .is_some_and(|r| r.0 >= i128::from(*lo) && r.1 <= i128::from(*hi));
                let x = self.ix(a)?;
                if inside {
                    return Ok(x);
                }
                (format!("vlmc_clamp<{ty}>({}, {lo}, {hi})", x.0), 3)
            }
            Idx::Load(b, at) => {
                let e = self.element(*b, at)?;
                if ty == "int" {
                    (e, 3)
                } else {
                    (format!("(long long){e}"), 3)
                }
            }
        };
        let bound = self.bind(&key, ty, e.clone());
        Ok(if bound == e { (e, prec) } else { (bound, 3) })
    }

    fn idx_lit(&self, c: i64) -> String {
        let s = if self.idx_ty == "int" {
            c.to_string()
        } else {
            format!("{c}LL")
        };
        if c < 0 {
            format!("({s})")
        } else {
            s
        }
    }

    /// `b{buf}[at]`, the index clamped to the buffer when it depends on loaded data.
    pub fn element(&mut self, buf: usize, at: &Idx) -> Result<String, CudaError> {
        let len = self
            .plan
            .buffers
            .get(buf)
            .map(|b| b.len())
            .ok_or_else(|| CudaError::new(format!("no buffer b{buf}")))?;
        let i = self.idx(at)?;
        if has_load(at) {
            let ty = self.idx_ty;
            Ok(format!(
                "b{buf}[vlmc_clamp<{ty}>({i}, 0, {})]",
                len.saturating_sub(1)
            ))
        } else {
            Ok(format!("b{buf}[{i}]"))
        }
    }

    /// The dtype of a value (as the plan executor types it).
    pub fn dtype(&self, v: &Val) -> DType {
        match v {
            Val::Load(b, _) => self
                .plan
                .buffers
                .get(*b)
                .map(|b| b.dtype)
                .unwrap_or(DType::F32),
            Val::Const(_, d) => *d,
            Val::Index(_) => DType::I32,
            Val::InRange(..) => DType::Bool,
            Val::Unary(_, a) => self.dtype(a),
            Val::Binary(op, a, _) => {
                if op.is_comparison() {
                    DType::Bool
                } else {
                    self.dtype(a)
                }
            }
            Val::Select(_, a, _) => self.dtype(a),
            Val::Cast { to, .. } => *to,
            Val::Acc(k) => self.accs.get(k).copied().unwrap_or(DType::F32),
        }
    }

    /// A value as a C expression of its dtype's class.
    pub fn val(&mut self, v: &Val) -> Result<String, CudaError> {
        let d = self.dtype(v);
        let e = match v {
            Val::Load(b, at) => self.element(*b, at)?,
            Val::Const(c, d) => return Ok(const_lit(*c, *d)),
            Val::Acc(n) => return Ok(format!("acc{n}")),
            Val::Index(i) => {
                let i = self.idx(i)?;
                if self.idx_ty == "int" {
                    i
                } else {
                    format!("(int)({i})")
                }
            }
            Val::InRange(i, lo, hi) => {
                let x = self.ix(i)?;
                // Bind the index: it is used twice.
                let x = if x.1 == 3 {
                    x.0
                } else {
                    let name = format!("v{}", self.next);
                    self.next += 1;
                    self.line(format!("const {} {name} = {};", self.idx_ty, x.0));
                    name
                };
                format!(
                    "({} <= {x} && {x} < {})",
                    self.idx_lit(*lo),
                    self.idx_lit(*hi)
                )
            }
            Val::Unary(op, a) => {
                let ad = self.dtype(a);
                let x = self.val(a)?;
                unary(*op, x, ad, d)
            }
            Val::Binary(op, a, b) => {
                let ad = self.dtype(a);
                let (x, y) = (self.val(a)?, self.val(b)?);
                binary(*op, x, y, ad, d)
            }
            Val::Select(c, a, b) => {
                let (c, x, y) = (self.val(c)?, self.val(a)?, self.val(b)?);
                format!("({c} ? {x} : {y})")
            }
            Val::Cast { to, value, .. } => {
                let from = self.dtype(value);
                let x = self.val(value)?;
                convert(x, from, *to)
            }
        };
        let key = format!("{v:?}");
        Ok(self.bind(&key, ctype(d), e))
    }
}

fn paren(x: Ix, min: u8) -> String {
    if x.1 >= min {
        x.0
    } else {
        format!("({})", x.0)
    }
}

/// Whether an expression is a name or a literal (never worth a local).
fn is_atom(e: &str) -> bool {
    e.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// A unary op on an operand of dtype `ad`, giving dtype `d`.
fn unary(op: UnaryOp, x: String, ad: DType, d: DType) -> String {
    if op == UnaryOp::Not {
        return match class(ad) {
            Class::Float if class(d) == Class::Float => format!("(float)({x} == 0.0f)"),
            Class::Float => format!("({x} == 0.0f)"),
            Class::Int => format!("({x} == 0)"),
        };
    }
    match class(ad) {
        Class::Float => {
            let e = match op {
                UnaryOp::Neg => format!("(-{x})"),
                UnaryOp::Recip => format!("(1.0f / {x})"),
                UnaryOp::Rsqrt => format!("(1.0f / sqrtf({x}))"),
                _ => format!("{}({x})", float_fn(op)),
            };
            round(d, e)
        }
        Class::Int => {
            let e = match op {
                UnaryOp::Neg => format!("(int)(0u - (unsigned int){x})"),
                UnaryOp::Abs => format!("({x} < 0 ? (int)(0u - (unsigned int){x}) : {x})"),
                UnaryOp::Floor => x,
                UnaryOp::Recip => format!("vlmc_f2i(1.0f / (float){x})"),
                UnaryOp::Rsqrt => format!("vlmc_f2i(1.0f / sqrtf((float){x}))"),
                _ => format!("vlmc_f2i({}((float){x}))", float_fn(op)),
            };
            if d == DType::Bool {
                format!("({e} != 0)")
            } else {
                e
            }
        }
    }
}

fn float_fn(op: UnaryOp) -> &'static str {
    match op {
        UnaryOp::Abs => "fabsf",
        UnaryOp::Exp => "expf",
        UnaryOp::Log => "logf",
        UnaryOp::Sqrt => "sqrtf",
        UnaryOp::Tanh => "tanhf",
        UnaryOp::Erf => "erff",
        UnaryOp::Sin => "sinf",
        UnaryOp::Cos => "cosf",
        UnaryOp::Floor => "floorf",
        UnaryOp::Neg | UnaryOp::Recip | UnaryOp::Rsqrt | UnaryOp::Not => "",
    }
}

/// A binary op on operands of dtype `ad`, giving dtype `d`.
fn binary(op: BinaryOp, x: String, y: String, ad: DType, d: DType) -> String {
    use BinaryOp::*;
    let zero = match class(ad) {
        Class::Float => "0.0f",
        Class::Int => "0",
    };
    match op {
        Eq => return format!("({x} == {y})"),
        Ne => return format!("({x} != {y})"),
        Lt => return format!("({x} < {y})"),
        Le => return format!("({x} <= {y})"),
        Gt => return format!("({x} > {y})"),
        Ge => return format!("({x} >= {y})"),
        And => return format!("({x} != {zero} && {y} != {zero})"),
        Or => return format!("({x} != {zero} || {y} != {zero})"),
        _ => {}
    }
    match class(ad) {
        Class::Float => {
            let e = match op {
                Add => format!("({x} + {y})"),
                Sub => format!("({x} - {y})"),
                Mul => format!("({x} * {y})"),
                Div => format!("({x} / {y})"),
                Pow => format!("powf({x}, {y})"),
                Max => format!("vlmc_max({x}, {y})"),
                Min => format!("vlmc_min({x}, {y})"),
                _ => format!("vlmc_fmod({x}, {y})"),
            };
            round(d, e)
        }
        Class::Int => {
            let e = match op {
                Add => format!("({x} + {y})"),
                Sub => format!("({x} - {y})"),
                Mul => format!("({x} * {y})"),
                Div => format!("vlmc_idiv({x}, {y})"),
                Pow => format!("vlmc_ipow({x}, {y})"),
                Max => format!("max({x}, {y})"),
                Min => format!("min({x}, {y})"),
                _ => format!("vlmc_imod({x}, {y})"),
            };
            if d == DType::Bool {
                format!("({e} != 0)")
            } else {
                e
            }
        }
    }
}

/// The identity of a reduction in the class of `d`.
pub fn identity(op: ReduceOp, d: DType) -> &'static str {
    match (op, class(d)) {
        (ReduceOp::Sum, Class::Float) => "0.0f",
        (ReduceOp::Sum, Class::Int) => "0",
        (ReduceOp::Max, Class::Float) => "(-vlmc_inf())",
        (ReduceOp::Max, Class::Int) => "(-2147483647 - 1)",
    }
}

/// `acc ⊕ x` for a reduction.
pub fn combine(op: ReduceOp, d: DType, acc: &str, x: &str) -> String {
    match (op, class(d)) {
        (ReduceOp::Sum, _) => format!("{acc} + {x}"),
        (ReduceOp::Max, Class::Float) => format!("vlmc_max({acc}, {x})"),
        (ReduceOp::Max, Class::Int) => format!("max({acc}, {x})"),
    }
}

/// The reducing functor of the prelude's `vlmc_block_reduce`.
pub fn functor(op: ReduceOp, d: DType) -> &'static str {
    match (op, class(d)) {
        (ReduceOp::Sum, _) => "VlmcSum",
        (ReduceOp::Max, Class::Float) => "VlmcMaxF",
        (ReduceOp::Max, Class::Int) => "VlmcMaxI",
    }
}

/// The rounding of an accumulated value to its dtype.
pub fn round_acc(d: DType, e: String) -> String {
    match d {
        DType::Bool => format!("({e} != 0)"),
        _ => round(d, e),
    }
}

fn count_stmts(stmts: &[Stmt], counts: &mut HashMap<String, usize>) {
    for s in stmts {
        match s {
            Stmt::Store { at, value, .. } => {
                count_idx(at, counts);
                count_val(value, counts);
            }
            Stmt::Reduce { value, .. } => count_val(value, counts),
            Stmt::Inner { body, .. } => count_stmts(body, counts),
        }
    }
}

/// Counts `key`; true the first time (only then are its parts counted, so that the parts of a
/// repeated expression are not bound on their own).
fn first(key: String, counts: &mut HashMap<String, usize>) -> bool {
    let c = counts.entry(key).or_default();
    *c += 1;
    *c == 1
}

fn count_val(v: &Val, counts: &mut HashMap<String, usize>) {
    if !first(format!("{v:?}"), counts) {
        return;
    }
    match v {
        Val::Load(_, i) | Val::Index(i) | Val::InRange(i, _, _) => count_idx(i, counts),
        Val::Const(..) | Val::Acc(_) => {}
        Val::Unary(_, a) | Val::Cast { value: a, .. } => count_val(a, counts),
        Val::Binary(_, a, b) => {
            count_val(a, counts);
            count_val(b, counts);
        }
        Val::Select(c, a, b) => {
            count_val(c, counts);
            count_val(a, counts);
            count_val(b, counts);
        }
    }
}

fn count_idx(i: &Idx, counts: &mut HashMap<String, usize>) {
    if !first(format!("{i:?}"), counts) {
        return;
    }
    match i {
        Idx::Var(_) | Idx::Const(_) => {}
        Idx::Add(a, b) => {
            count_idx(a, counts);
            count_idx(b, counts);
        }
        Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) | Idx::Clamp(a, _, _) => {
            count_idx(a, counts)
        }
        Idx::Load(_, a) => count_idx(a, counts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(float_lit(0.5), "0.5f");
        assert_eq!(float_lit(1.0), "1.0f");
        assert_eq!(float_lit(1e-5), "1e-5f");
        assert_eq!(float_lit(-2.0), "(-2.0f)");
        assert_eq!(float_lit(f64::NEG_INFINITY), "(-vlmc_inf())");
        assert_eq!(float_lit(f64::NAN), "vlmc_nan()");
        assert_eq!(int_lit(i32::MIN), "(-2147483647 - 1)");
        assert_eq!(const_lit(0.1, DType::F16), float_lit(0.0999755859375));
        assert_eq!(const_lit(3.7, DType::I32), "3");
        assert_eq!(const_lit(-0.5, DType::Bool), "1");
    }

    #[test]
    fn conversions() {
        assert_eq!(convert("x".into(), DType::F32, DType::I32), "vlmc_f2i(x)");
        assert_eq!(convert("x".into(), DType::I32, DType::F32), "(float)x");
        assert_eq!(convert("x".into(), DType::F32, DType::BF16), "vlmc_bf16(x)");
        assert_eq!(convert("x".into(), DType::F32, DType::Bool), "(x != 0.0f)");
        assert_eq!(convert("x".into(), DType::Bool, DType::I32), "x");
    }
}
