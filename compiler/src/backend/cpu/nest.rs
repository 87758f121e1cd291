//! Preparing a loop nest for code generation: indices simplified to affine forms, every value
//! annotated with its dtype, size-1 loops dropped and adjacent loops merged when every access
//! stays affine in the merged variable (so short contiguous rows become one long vector loop).
//!
//! Variables of a prepared nest: `0..outer.len()` are the outer loops; `outer.len()` is the
//! innermost variable: the last loop of a pointwise nest, or the reduced axis of a row nest.

use super::CpuError;
use crate::ir::{BinaryOp, DType, ReduceOp, UnaryOp};
use crate::kernel::simplify::{Affine, Atom};
use crate::kernel::{Buffer, Idx, LoopNest, Stmt, Val};

/// A scalar value with simplified indices and dtypes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum V {
    Load(usize, Affine, DType),
    /// A constant (f64 bits) of a dtype.
    Const(u64, DType),
    Index(Affine),
    InRange(Affine, i64, i64),
    Unary(UnaryOp, Box<V>, DType),
    /// Op, operands, result dtype, operand dtype.
    Binary(BinaryOp, Box<V>, Box<V>, DType, DType),
    Select(Box<V>, Box<V>, Box<V>, DType),
    Cast(DType, DType, Box<V>),
    Acc(usize, DType),
}

impl V {
    /// The dtype of the value.
    pub fn dtype(&self) -> DType {
        match self {
            V::Load(_, _, d) | V::Const(_, d) | V::Unary(_, _, d) | V::Select(_, _, _, d) => *d,
            V::Binary(_, _, _, d, _) | V::Cast(d, _, _) | V::Acc(_, d) => *d,
            V::Index(_) => DType::I32,
            V::InRange(..) => DType::Bool,
        }
    }

    /// Calls `f` on every index form of the value.
    pub fn indices(&self, f: &mut dyn FnMut(&Affine)) {
        match self {
            V::Load(_, a, _) | V::Index(a) | V::InRange(a, _, _) => f(a),
            V::Const(..) | V::Acc(..) => {}
            V::Unary(_, x, _) | V::Cast(_, _, x) => x.indices(f),
            V::Binary(_, x, y, _, _) => {
                x.indices(f);
                y.indices(f);
            }
            V::Select(c, x, y, _) => {
                c.indices(f);
                x.indices(f);
                y.indices(f);
            }
        }
    }

    /// Whether the value reads a buffer in `bufs`.
    pub fn reads_any(&self, bufs: &[usize]) -> bool {
        match self {
            V::Load(b, a, _) => bufs.contains(b) || affine_reads(a, bufs),
            V::Index(a) | V::InRange(a, _, _) => affine_reads(a, bufs),
            V::Const(..) | V::Acc(..) => false,
            V::Unary(_, x, _) | V::Cast(_, _, x) => x.reads_any(bufs),
            V::Binary(_, x, y, _, _) => x.reads_any(bufs) || y.reads_any(bufs),
            V::Select(c, x, y, _) => c.reads_any(bufs) || x.reads_any(bufs) || y.reads_any(bufs),
        }
    }
}

fn affine_reads(a: &Affine, bufs: &[usize]) -> bool {
    a.terms.iter().any(|(t, _)| match t {
        Atom::Var(_) => false,
        Atom::Load(b, x) => bufs.contains(b) || affine_reads(x, bufs),
        Atom::Div(x, _) | Atom::Rem(x, _) | Atom::Clamp(x, _, _) => affine_reads(x, bufs),
    })
}

/// A statement of a prepared nest.
#[derive(Clone, Debug, PartialEq)]
pub enum S {
    Store(usize, Affine, V),
    Reduce {
        acc: usize,
        op: ReduceOp,
        len: usize,
        value: V,
        dtype: DType,
    },
    Inner(usize, Vec<S>),
}

impl S {
    fn indices(&self, f: &mut dyn FnMut(&Affine)) {
        match self {
            S::Store(_, a, v) => {
                f(a);
                v.indices(f);
            }
            S::Reduce { value, .. } => value.indices(f),
            S::Inner(_, body) => body.iter().for_each(|s| s.indices(f)),
        }
    }

    /// Buffers stored to.
    pub fn stored(&self, out: &mut Vec<usize>) {
        match self {
            S::Store(b, _, _) => out.push(*b),
            S::Reduce { .. } => {}
            S::Inner(_, body) => body.iter().for_each(|s| s.stored(out)),
        }
    }
}

/// A loop nest ready for code generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Nest {
    /// Extents of the outer loops (variables `0..outer.len()`).
    pub outer: Vec<usize>,
    /// The extent of the innermost loop of a pointwise nest (variable `outer.len()`).
    pub inner: Option<usize>,
    pub body: Vec<S>,
    /// Whether this is a row nest (its innermost variable is the reduced axis).
    pub rows: bool,
    /// Inclusive ranges of the variables, the innermost last (a row nest's from its longest loop).
    pub ranges: Vec<(i64, i64)>,
}

impl Nest {
    /// The innermost variable.
    pub fn inner_var(&self) -> usize {
        self.outer.len()
    }
    /// Iterations of the outer loops.
    pub fn outer_count(&self) -> usize {
        self.outer.iter().product()
    }
    /// Buffers stored to by the nest.
    pub fn stored(&self) -> Vec<usize> {
        let mut v = Vec::new();
        self.body.iter().for_each(|s| s.stored(&mut v));
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Converts kernel-IR values, mapping each original variable to an affine form.
struct Conv<'a> {
    buffers: &'a [Buffer],
    map: &'a [Affine],
    ranges: Vec<(i64, i64)>,
    accs: Vec<DType>,
    /// The reduced variable after renumbering.
    r_new: usize,
}

impl Conv<'_> {
    fn idx(&self, i: &Idx) -> Affine {
        let map = self.map;
        let f = move |v: usize| {
            map.get(v)
                .cloned()
                .unwrap_or_else(|| Affine::var(usize::MAX))
        };
        Affine::from_idx_with(i, &f, &self.ranges)
    }

    fn val(&self, v: &Val) -> Result<V, CpuError> {
        Ok(match v {
            Val::Load(b, i) => {
                let buf = self
                    .buffers
                    .get(*b)
                    .ok_or_else(|| CpuError::new(format!("no buffer b{b}")))?;
                V::Load(*b, self.idx(i), buf.dtype)
            }
            Val::Const(c, d) => V::Const(c.to_bits(), *d),
            Val::Index(i) => V::Index(self.idx(i)),
            Val::InRange(i, lo, hi) => V::InRange(self.idx(i), *lo, *hi),
            Val::Unary(op, x) => {
                let x = self.val(x)?;
                let d = x.dtype();
                V::Unary(*op, Box::new(x), d)
            }
            Val::Binary(op, x, y) => {
                let (x, y) = (self.val(x)?, self.val(y)?);
                let d = x.dtype();
                let r = if op.is_comparison() { DType::Bool } else { d };
                V::Binary(*op, Box::new(x), Box::new(y), r, d)
            }
            Val::Select(c, x, y) => {
                let x = self.val(x)?;
                let d = x.dtype();
                V::Select(
                    Box::new(self.val(c)?),
                    Box::new(x),
                    Box::new(self.val(y)?),
                    d,
                )
            }
            Val::Cast { to, value, .. } => {
                let x = self.val(value)?;
                let from = x.dtype();
                V::Cast(*to, from, Box::new(x))
            }
            Val::Acc(k) => V::Acc(
                *k,
                *self.accs.get(*k).ok_or_else(|| {
                    CpuError::new(format!("acc{k} is used before it is computed"))
                })?,
            ),
        })
    }

    fn stmts(&mut self, body: &[Stmt], r_var: usize, in_loop: bool) -> Result<Vec<S>, CpuError> {
        let mut out = Vec::new();
        for s in body {
            out.push(match s {
                Stmt::Store { buf, at, value } => {
                    if !in_loop && (mentions_var(at, r_var) || val_mentions(value, r_var)) {
                        return Err(CpuError::new(
                            "the reduced variable is used outside a reduction",
                        ));
                    }
                    S::Store(*buf, self.idx(at), self.val(value)?)
                }
                Stmt::Reduce {
                    acc,
                    op,
                    len,
                    value,
                    dtype,
                } => {
                    let saved = self.set_r(*len);
                    let value = self.val(value)?;
                    self.ranges[self.r_new] = saved;
                    if self.accs.len() <= *acc {
                        self.accs.resize(*acc + 1, *dtype);
                    }
                    self.accs[*acc] = *dtype;
                    S::Reduce {
                        acc: *acc,
                        op: *op,
                        len: *len,
                        value,
                        dtype: *dtype,
                    }
                }
                Stmt::Inner { len, body } => {
                    let saved = self.set_r(*len);
                    let b = self.stmts(body, r_var, true)?;
                    self.ranges[self.r_new] = saved;
                    S::Inner(*len, b)
                }
            });
        }
        Ok(out)
    }

    fn set_r(&mut self, len: usize) -> (i64, i64) {
        let r = self.r_new;
        let saved = self.ranges[r];
        self.ranges[r] = (0, len.max(1) as i64 - 1);
        saved
    }
}

fn mentions_var(i: &Idx, v: usize) -> bool {
    match i {
        Idx::Var(x) => *x == v,
        Idx::Const(_) => false,
        Idx::Add(a, b) => mentions_var(a, v) || mentions_var(b, v),
        Idx::Mul(a, _) | Idx::Div(a, _) | Idx::Rem(a, _) | Idx::Clamp(a, _, _) => {
            mentions_var(a, v)
        }
        Idx::Load(_, a) => mentions_var(a, v),
    }
}

fn val_mentions(x: &Val, v: usize) -> bool {
    match x {
        Val::Load(_, i) | Val::Index(i) | Val::InRange(i, _, _) => mentions_var(i, v),
        Val::Const(..) | Val::Acc(_) => false,
        Val::Unary(_, a) | Val::Cast { value: a, .. } => val_mentions(a, v),
        Val::Binary(_, a, b) => val_mentions(a, v) || val_mentions(b, v),
        Val::Select(c, a, b) => val_mentions(c, v) || val_mentions(a, v) || val_mentions(b, v),
    }
}

/// How many index forms use `v` non-linearly (such accesses cannot be vector loads).
fn nonlinear_uses(body: &[S], v: usize) -> usize {
    let mut n = 0;
    body.iter()
        .for_each(|s| s.indices(&mut |a| n += usize::from(a.nonlinear_in(v))));
    n
}

/// Stop merging loops once the innermost one is this long (outer iterations are what the
/// runtime splits across threads).
const MERGE_UNTIL: usize = 256;

/// Prepares a loop nest: `Ok(None)` when it has no iterations.
pub fn prepare(l: &LoopNest, buffers: &[Buffer], merge: bool) -> Result<Option<Nest>, CpuError> {
    if l.shape.contains(&0) {
        return Ok(None);
    }
    let rank = l.shape.len();
    let rows = l.inner_var.is_some();
    if let Some(r) = l.inner_var {
        if r != rank {
            return Err(CpuError::new(format!(
                "the reduced variable is i{r}, expected i{rank}"
            )));
        }
    }
    // Groups of original loops, each becoming one loop; size-1 loops disappear.
    let mut groups: Vec<Vec<usize>> = (0..rank)
        .filter(|&d| l.shape[d] != 1)
        .map(|d| vec![d])
        .collect();
    let build = |groups: &[Vec<usize>]| -> Result<Nest, CpuError> {
        let extents: Vec<usize> = groups
            .iter()
            .map(|g| g.iter().map(|&d| l.shape[d]).product())
            .collect();
        let mut ranges: Vec<(i64, i64)> = extents.iter().map(|&n| (0, n as i64 - 1)).collect();
        let nvars = groups.len();
        // The reduced variable comes after the loops.
        let r_new = nvars;
        ranges.push((0, 0));
        let mut map = vec![Affine::constant(0); rank + 1];
        for (gi, g) in groups.iter().enumerate() {
            let mut stride = 1usize;
            for &d in g.iter().rev() {
                let v = Affine::var(gi);
                let x = v.div(stride as i64, &ranges);
                map[d] = if stride * l.shape[d] == extents[gi] {
                    x
                } else {
                    x.rem(l.shape[d] as i64, &ranges)
                };
                stride *= l.shape[d];
            }
        }
        map[rank] = Affine::var(r_new);
        let mut conv = Conv {
            buffers,
            map: &map,
            ranges,
            accs: Vec::new(),
            r_new,
        };
        let body = conv.stmts(&l.body, rank, false)?;
        let mut ranges = conv.ranges;
        let (outer, inner) = if rows {
            let longest = longest_loop(&body);
            ranges[r_new] = (0, longest.max(1) as i64 - 1);
            (extents, None)
        } else {
            ranges.pop();
            match extents.split_last() {
                Some((last, rest)) => (rest.to_vec(), Some(*last)),
                None => (Vec::new(), None),
            }
        };
        Ok(Nest {
            outer,
            inner,
            body,
            rows,
            ranges,
        })
    };
    let mut nest = build(&groups)?;
    if merge && !rows {
        while groups.len() >= 2 {
            let n = nest.inner.unwrap_or(1);
            if n >= MERGE_UNTIL {
                break;
            }
            let before = nonlinear_uses(&nest.body, nest.inner_var());
            let mut g = groups.clone();
            let last = g.pop().unwrap_or_default();
            if let Some(prev) = g.last_mut() {
                prev.extend(last);
            }
            let cand = build(&g)?;
            if nonlinear_uses(&cand.body, cand.inner_var()) > before {
                break;
            }
            groups = g;
            nest = cand;
        }
    }
    Ok(Some(nest))
}

fn longest_loop(body: &[S]) -> usize {
    body.iter()
        .map(|s| match s {
            S::Store(..) => 0,
            S::Reduce { len, .. } => *len,
            S::Inner(len, b) => (*len).max(longest_loop(b)),
        })
        .max()
        .unwrap_or(0)
}
