//! Interval arithmetic over index expressions: the range of every [`Idx`] given the ranges of
//! the loop variables. The CUDA code generator uses it to pick `int` or `long long` arithmetic and
//! plain `/` where the dividend cannot be negative; [`check`] uses it to prove that every load
//! and store of a plan stays inside its buffer (both backends refuse a plan it cannot prove).

use crate::kernel::{Idx, LoopNest, MatMul, Plan, Step, Stmt, Val};

/// An inclusive range of integers.
pub type Range = (i128, i128);

/// The range of `i` when variable `v` ranges over `vars[v]`; `None` when it depends on loaded
/// data (a gather index) or on a variable without a range.
pub fn range(i: &Idx, vars: &[Range]) -> Option<Range> {
    Some(match i {
        Idx::Var(v) => *vars.get(*v)?,
        Idx::Const(c) => (i128::from(*c), i128::from(*c)),
        Idx::Add(a, b) => {
            let (a, b) = (range(a, vars)?, range(b, vars)?);
            (a.0.saturating_add(b.0), a.1.saturating_add(b.1))
        }
        Idx::Mul(a, c) => {
            let a = range(a, vars)?;
            let c = i128::from(*c);
            let (x, y) = (a.0.saturating_mul(c), a.1.saturating_mul(c));
            (x.min(y), x.max(y))
        }
        Idx::Div(a, c) => {
            let a = range(a, vars)?;
            let c = i128::from(*c);
            if c <= 0 {
                return None;
            }
            (a.0.div_euclid(c), a.1.div_euclid(c))
        }
        Idx::Rem(a, c) => {
            let a = range(a, vars)?;
            let c = i128::from(*c);
            if c <= 0 {
                return None;
            }
            let (lo, hi) = (a.0.rem_euclid(c), a.1.rem_euclid(c));
            if a.1 - a.0 < c && lo <= hi {
                (lo, hi)
            } else {
                (0, c - 1)
            }
        }
        Idx::Clamp(a, lo, hi) => {
            let (lo, hi) = (i128::from(*lo), i128::from(*hi));
            match range(a, vars) {
                Some(a) => (a.0.clamp(lo, hi.max(lo)), a.1.clamp(lo, hi.max(lo))),
                None => (lo, hi.max(lo)),
            }
        }
        Idx::Load(..) => return None,
    })
}

/// Whether an index depends on loaded data.
pub fn has_load(i: &Idx) -> bool {
    match i {
        Idx::Load(..) => true,
        Idx::Var(_) | Idx::Const(_) => false,
        Idx::Add(a, b) => has_load(a) || has_load(b),
        Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) => has_load(a),
        Idx::Clamp(a, _, _) => has_load(a),
    }
}

/// The ranges of the variables of a loop nest: `i0..` over its shape, then the reduced axis
/// (the longest `Reduce` or `Inner` of the body).
pub fn nest_ranges(l: &LoopNest) -> Vec<Range> {
    let mut v: Vec<Range> = l.shape.iter().map(|&n| (0, n as i128 - 1)).collect();
    if l.inner_var.is_some() {
        v.push((0, inner_len(&l.body) as i128 - 1));
    }
    v
}

/// The longest reduced axis of a body.
pub fn inner_len(body: &[Stmt]) -> usize {
    body.iter()
        .map(|s| match s {
            Stmt::Reduce { len, .. } | Stmt::Inner { len, .. } => *len,
            Stmt::Store { .. } => 0,
        })
        .max()
        .unwrap_or(0)
}

/// What [`check`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BoundsReport {
    /// Loads and stores proved in bounds.
    pub proved: usize,
    /// Accesses at a data-dependent index (gathers): clamped to the buffer by the generated code.
    pub clamped: usize,
    /// Accesses that may leave their buffer, described.
    pub errors: Vec<String>,
}

/// Checks every access of every kernel of `plan` against its buffer's length.
pub fn check(plan: &Plan) -> BoundsReport {
    let mut r = BoundsReport::default();
    for k in &plan.kernels {
        for (si, step) in k.steps.iter().enumerate() {
            let at = format!("{} step {si}", k.name);
            match step {
                Step::Loop(l) => {
                    let vars = nest_ranges(l);
                    let mut c = Checker {
                        plan,
                        at: &at,
                        report: &mut r,
                    };
                    c.stmts(&l.body, &vars, l.inner_var);
                }
                Step::MatMul(m) => check_matmul(plan, m, &at, &mut r),
                // The generated code skips indices outside the output axis.
                Step::ScatterAdd(s) => match s.check(&plan.buffers) {
                    Ok(()) => {
                        r.proved += 2;
                        r.clamped += 1;
                    }
                    Err(e) => r.errors.push(format!("{at}: {e}")),
                },
            }
        }
    }
    r
}

/// `Ok` when [`check`] proves every access of `plan` in bounds (data-dependent indices are
/// clamped or checked by the generated code); otherwise the accesses it could not prove. Both
/// backends call it before generating code: generated code never reads or writes outside a
/// buffer, whatever the sizes.
pub fn prove(plan: &Plan) -> Result<BoundsReport, String> {
    let r = check(plan);
    if r.errors.is_empty() {
        return Ok(r);
    }
    let shown: Vec<&str> = r.errors.iter().take(3).map(String::as_str).collect();
    let more = match r.errors.len() - shown.len() {
        0 => String::new(),
        n => format!(" (and {n} more)"),
    };
    Err(format!(
        "the kernels would access memory outside their buffers at these sizes: {}{more}",
        shown.join("; ")
    ))
}

struct Checker<'a> {
    plan: &'a Plan,
    at: &'a str,
    report: &'a mut BoundsReport,
}

impl Checker<'_> {
    fn stmts(&mut self, body: &[Stmt], vars: &[Range], inner: Option<usize>) {
        for s in body {
            match s {
                Stmt::Store { buf, at, value } => {
                    self.access(*buf, at, vars, "store");
                    self.val(value, vars);
                }
                Stmt::Reduce { len, value, .. } => {
                    let v = with_inner(vars, inner, *len);
                    self.val(value, &v);
                }
                Stmt::Inner { len, body } => {
                    let v = with_inner(vars, inner, *len);
                    self.stmts(body, &v, inner);
                }
            }
        }
    }

    fn access(&mut self, buf: usize, at: &Idx, vars: &[Range], what: &str) {
        let Some(b) = self.plan.buffers.get(buf) else {
            self.report
                .errors
                .push(format!("{}: {what} to a missing buffer b{buf}", self.at));
            return;
        };
        if vars.iter().any(|(lo, hi)| lo > hi) {
            // An empty loop: never executed.
            self.report.proved += 1;
            return;
        }
        self.idx(at, vars);
        if has_load(at) {
            self.report.clamped += 1;
            return;
        }
        let len = b.len() as i128;
        match range(at, vars) {
            Some((lo, hi)) if lo >= 0 && hi < len => self.report.proved += 1,
            Some((lo, hi)) => self.report.errors.push(format!(
                "{}: {what} b{buf}[{at}] ranges over {lo}..={hi}, outside 0..{len}",
                self.at
            )),
            None => self
                .report
                .errors
                .push(format!("{}: {what} b{buf}[{at}] has no range", self.at)),
        }
    }

    /// The loads inside an index (gather indices).
    fn idx(&mut self, i: &Idx, vars: &[Range]) {
        match i {
            Idx::Load(b, at) => self.access(*b, at, vars, "index load"),
            Idx::Var(_) | Idx::Const(_) => {}
            Idx::Add(a, b) => {
                self.idx(a, vars);
                self.idx(b, vars);
            }
            Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) | Idx::Clamp(a, _, _) => {
                self.idx(a, vars)
            }
        }
    }

    fn val(&mut self, v: &Val, vars: &[Range]) {
        match v {
            Val::Load(b, at) => self.access(*b, at, vars, "load"),
            Val::Index(i) | Val::InRange(i, _, _) => self.idx(i, vars),
            Val::Const(..) | Val::Acc(_) => {}
            Val::Unary(_, a) | Val::Cast { value: a, .. } => self.val(a, vars),
            Val::Binary(_, a, b) => {
                self.val(a, vars);
                self.val(b, vars);
            }
            Val::Select(c, a, b) => {
                self.val(c, vars);
                self.val(a, vars);
                self.val(b, vars);
            }
        }
    }
}

/// `vars` with the reduced axis ranging over `0..len`.
fn with_inner(vars: &[Range], inner: Option<usize>, len: usize) -> Vec<Range> {
    let mut v = vars.to_vec();
    if let Some(r) = inner {
        if v.len() <= r {
            v.resize(r + 1, (0, 0));
        }
        v[r] = (0, len as i128 - 1);
    }
    v
}

fn check_matmul(plan: &Plan, m: &MatMul, at: &str, r: &mut BoundsReport) {
    let operands = [("a", &m.a, m.m, m.k), ("b", &m.b, m.k, m.n)];
    for (name, x, rows, cols) in operands {
        if m.batch == 0 || rows == 0 || cols == 0 {
            r.proved += 1;
            continue;
        }
        let last = x.offset as i128
            + (m.batch as i128 - 1) * x.batch as i128
            + (rows as i128 - 1) * x.row as i128
            + (cols as i128 - 1) * x.col as i128;
        match plan.buffers.get(x.buf) {
            Some(b) if last < b.len() as i128 => r.proved += 1,
            Some(b) => r.errors.push(format!(
                "{at}: matmul operand {name} reads b{} up to {last}, past its {} elements",
                x.buf,
                b.len()
            )),
            None => r
                .errors
                .push(format!("{at}: matmul operand {name}: no buffer b{}", x.buf)),
        }
    }
    match plan.buffers.get(m.out) {
        Some(b) if b.len() >= m.batch * m.m * m.n => r.proved += 1,
        _ => r
            .errors
            .push(format!("{at}: matmul output b{} is too small", m.out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(i: Idx) -> Box<Idx> {
        Box::new(i)
    }

    #[test]
    fn ranges_of_views() {
        let vars = [(0, 1), (0, 4), (0, 5)];
        // (i0*5 + i1)*6 + i2 over [2, 5, 6]
        let flat = Idx::Add(
            b(Idx::Mul(
                b(Idx::Add(b(Idx::Mul(b(Idx::Var(0)), 5)), b(Idx::Var(1)))),
                6,
            )),
            b(Idx::Var(2)),
        );
        assert_eq!(range(&flat, &vars), Some((0, 59)));
        assert_eq!(range(&Idx::Rem(b(flat.clone()), 6), &vars), Some((0, 5)));
        assert_eq!(range(&Idx::Div(b(flat.clone()), 6), &vars), Some((0, 9)));
        let shifted = Idx::Add(b(Idx::Var(1)), b(Idx::Const(-3)));
        assert_eq!(range(&shifted, &vars), Some((-3, 1)));
        assert_eq!(
            range(&Idx::Div(b(shifted.clone()), 2), &vars),
            Some((-2, 0))
        );
        assert_eq!(range(&Idx::Clamp(b(shifted), 0, 1), &vars), Some((0, 1)));
        assert_eq!(range(&Idx::Load(0, b(Idx::Var(0))), &vars), None);
        // A remainder of a narrow range that does not wrap keeps it.
        let narrow = Idx::Add(b(Idx::Var(0)), b(Idx::Const(7)));
        assert_eq!(range(&Idx::Rem(b(narrow), 6), &vars), Some((1, 2)));
    }
}
