//! The kernel IR shared by every backend: each fusion group becomes a [`Kernel`], a list of
//! loop nests over concrete sizes whose bodies load from and store to flat buffers, with
//! reductions over an inner axis, and matmuls. Index arithmetic is explicit ([`Idx`]), so a
//! backend only has to emit loops, loads, stores and scalar math.
//!
//! A [`Plan`] is the whole compiled model: its buffers (inputs, parameters, values computed at
//! load time, temporaries placed by the memory plan) and its kernels in launch order.

pub mod bounds;
mod lower;
pub mod simplify;

pub use lower::{lower, lower_with, LowerError, LowerOptions};

use crate::ir::{BinaryOp, DType, ReduceOp, UnaryOp};
use std::fmt;

/// An index expression over loop variables (non-negative integers).
#[derive(Clone, Debug, PartialEq)]
pub enum Idx {
    /// Loop variable `i{n}` (the reduced axis of a row kernel is `r`, numbered after the others).
    Var(usize),
    Const(i64),
    Add(Box<Idx>, Box<Idx>),
    Mul(Box<Idx>, i64),
    Div(Box<Idx>, i64),
    Rem(Box<Idx>, i64),
    /// `min(max(idx, lo), hi)`: keeps the loads of a `pad` or `concat` branch in bounds.
    Clamp(Box<Idx>, i64, i64),
    /// An i32 element of a buffer, used as an index (`gather`).
    Load(usize, Box<Idx>),
}

/// A scalar value computed per element.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    /// An element of a buffer, at a flat index.
    Load(usize, Idx),
    Const(f64, DType),
    /// An index as a value (`iota`), an i32.
    Index(Idx),
    /// `lo <= idx < hi` (for `pad` and `concat`).
    InRange(Idx, i64, i64),
    Unary(UnaryOp, Box<Val>),
    Binary(BinaryOp, Box<Val>, Box<Val>),
    Select(Box<Val>, Box<Val>, Box<Val>),
    /// Conversion; `from` is the operand's dtype.
    Cast {
        to: DType,
        from: DType,
        value: Box<Val>,
    },
    /// The result of reduction number n of the enclosing loop nest.
    Acc(usize),
}

/// One statement of a loop body.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// `buffer[index] = value` (value rounded to the buffer's dtype).
    Store { buf: usize, at: Idx, value: Val },
    /// `acc_n = reduce over r in 0..len of value` (value may use `Var(reduce_var)`).
    Reduce {
        acc: usize,
        op: ReduceOp,
        len: usize,
        value: Val,
        dtype: DType,
    },
    /// A loop over the reduced axis: `for r in 0..len { body }`.
    Inner { len: usize, body: Vec<Stmt> },
}

/// A loop nest: `for i0 in 0..shape[0] { for i1 ... { body } }`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopNest {
    pub shape: Vec<usize>,
    /// The variable number of the reduced axis, for row kernels (`Var(shape.len())`).
    pub inner_var: Option<usize>,
    pub body: Vec<Stmt>,
}

/// A batched matrix product `out[b] = a[b] · b[b]` over strided operands:
/// element (i, j) of batch `bi` of operand `x` is at `x.offset + bi·x.batch + i·x.row + j·x.col`.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMul {
    pub a: Strided,
    pub b: Strided,
    /// The output buffer, contiguous `[batch, m, n]`.
    pub out: usize,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// A strided view of a buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Strided {
    pub buf: usize,
    pub offset: usize,
    pub batch: usize,
    pub row: usize,
    pub col: usize,
}

/// A scatter-add into a contiguous `[outer, n, inner]` output: it is zeroed, then for every
/// `(p, k, s)` the source element is added at `out[p, idx[k], s]`, `k` in increasing order (so
/// the sums are deterministic). An index outside `0..n` adds nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct ScatterAdd {
    /// The source, viewed as `[outer, k, inner]` (`batch`, `row`, `col` strides).
    pub src: Strided,
    /// The i32 indices: element `k` at `idx.offset + k·idx.col`.
    pub idx: Strided,
    pub out: usize,
    pub outer: usize,
    pub k: usize,
    pub n: usize,
    pub inner: usize,
}

impl Strided {
    /// The last element index that a `[batch, rows, cols]` view reaches (`None` when it
    /// overflows; `Some(0)` for an empty view).
    pub fn last(&self, batch: usize, rows: usize, cols: usize) -> Option<usize> {
        if batch == 0 || rows == 0 || cols == 0 {
            return Some(0);
        }
        self.offset
            .checked_add((batch - 1).checked_mul(self.batch)?)?
            .checked_add((rows - 1).checked_mul(self.row)?)?
            .checked_add((cols - 1).checked_mul(self.col)?)
    }
}

impl ScatterAdd {
    /// Checks the step against the plan's buffers: every access in bounds, a float source and
    /// output of one dtype, i32 indices.
    pub fn check(&self, buffers: &[Buffer]) -> Result<(), String> {
        let len = |b: usize| buffers.get(b).map(Buffer::len);
        let fits = |s: &Strided, batch: usize, rows: usize, cols: usize| match (
            s.last(batch, rows, cols),
            len(s.buf),
        ) {
            (Some(l), Some(n)) => batch * rows * cols == 0 || l < n,
            _ => false,
        };
        if !fits(&self.src, self.outer, self.k, self.inner) || !fits(&self.idx, 1, 1, self.k) {
            return Err("a scatter-add operand reaches outside its buffer".into());
        }
        if len(self.out) != Some(self.outer * self.n * self.inner) {
            return Err("a scatter-add output has the wrong size".into());
        }
        let (src, out) = (buffers[self.src.buf].dtype, buffers[self.out].dtype);
        if !src.is_float() || src != out || buffers[self.idx.buf].dtype != DType::I32 {
            return Err("a scatter-add takes float values and i32 indices".into());
        }
        Ok(())
    }
}

/// One step of a kernel.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Loop(LoopNest),
    MatMul(MatMul),
    ScatterAdd(ScatterAdd),
}

/// One fused kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub steps: Vec<Step>,
}

/// Where a buffer's contents come from.
#[derive(Clone, Debug, PartialEq)]
pub enum BufferKind {
    /// A graph input, by name.
    Input(String),
    /// A parameter, by path.
    Param(String),
    /// Computed once when the weights are loaded (the graph node's index).
    LoadTime(usize),
    /// Written by a kernel; lives at `offset` in the activation arena.
    Temp { offset: usize },
    /// A scratch buffer private to one kernel.
    Scratch,
}

/// A flat, row-major buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub kind: BufferKind,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Buffer {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A compiled model at concrete sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<Kernel>,
    /// The graph's outputs: (name, buffer).
    pub outputs: Vec<(String, usize)>,
    /// Size of the activation arena in elements of 4 bytes.
    pub arena: usize,
    /// The gathers whose indices a kernel loads from a buffer: what each index must stay
    /// below, to name the value when the generated code reports one out of range.
    pub gathers: Vec<GatherBound>,
}

/// The indices in buffer `index` select along an axis of `len` elements of `what`.
#[derive(Clone, Debug, PartialEq)]
pub struct GatherBound {
    pub index: usize,
    pub len: i64,
    /// The gather as the interpreter names it: `gather (f32[B, T, 384] in `embeddings.word_embeddings`)`.
    pub what: String,
}

impl Plan {
    /// The first gather index out of range, described, given each buffer's i32 contents
    /// (`None` for a buffer that cannot be read).
    pub fn bad_gather_index<'a>(
        &self,
        contents: impl Fn(usize) -> Option<&'a [i32]>,
    ) -> Option<String> {
        self.gathers.iter().find_map(|g| {
            let bad = contents(g.index)?
                .iter()
                .find(|&&i| i < 0 || i64::from(i) >= g.len)?;
            Some(format!(
                "{}: index {bad} is out of range for an axis of size {}",
                g.what, g.len
            ))
        })
    }
}

impl fmt::Display for Idx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Idx::Var(v) => write!(f, "i{v}"),
            Idx::Const(c) => write!(f, "{c}"),
            Idx::Add(a, b) => write!(f, "({a} + {b})"),
            Idx::Mul(a, c) => write!(f, "{a}*{c}"),
            Idx::Div(a, c) => write!(f, "({a} / {c})"),
            Idx::Rem(a, c) => write!(f, "({a} % {c})"),
            Idx::Clamp(a, lo, hi) => write!(f, "clamp({a}, {lo}, {hi})"),
            Idx::Load(b, i) => write!(f, "b{b}[{i}]"),
        }
    }
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Load(b, i) => write!(f, "b{b}[{i}]"),
            Val::Const(c, d) => write!(f, "{d}({})", crate::ir::text::float_text(*c)),
            Val::Index(i) => write!(f, "index({i})"),
            Val::InRange(i, lo, hi) => write!(f, "({lo} <= {i} < {hi})"),
            Val::Unary(op, a) => write!(f, "{}({a})", op.name()),
            Val::Binary(op, a, b) => write!(f, "{}({a}, {b})", op.name()),
            Val::Select(c, a, b) => write!(f, "select({c}, {a}, {b})"),
            Val::Cast { to, value, .. } => write!(f, "{to}({value})"),
            Val::Acc(n) => write!(f, "acc{n}"),
        }
    }
}

fn write_stmts(f: &mut fmt::Formatter<'_>, body: &[Stmt], indent: usize) -> fmt::Result {
    let pad = "  ".repeat(indent);
    for s in body {
        match s {
            Stmt::Store { buf, at, value } => writeln!(f, "{pad}b{buf}[{at}] = {value}")?,
            Stmt::Reduce {
                acc,
                op,
                len,
                value,
                ..
            } => writeln!(f, "{pad}acc{acc} = {}(r in 0..{len}) {value}", op.name())?,
            Stmt::Inner { len, body } => {
                writeln!(f, "{pad}for r in 0..{len} {{")?;
                write_stmts(f, body, indent + 1)?;
                writeln!(f, "{pad}}}")?;
            }
        }
    }
    Ok(())
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {} {{", self.name)?;
        for step in &self.steps {
            match step {
                Step::Loop(l) => {
                    let vars: Vec<String> = l.shape.iter().enumerate().map(|(i, n)| format!("i{i} < {n}")).collect();
                    writeln!(f, "  for {} {{", vars.join(", "))?;
                    write_stmts(f, &l.body, 2)?;
                    writeln!(f, "  }}")?;
                }
                Step::MatMul(m) => writeln!(
                    f,
                    "  b{}[{}, {}, {}] = b{}(+{}, strides {} {} {}) @ b{}(+{}, strides {} {} {}) over k = {}",
                    m.out, m.batch, m.m, m.n, m.a.buf, m.a.offset, m.a.batch, m.a.row, m.a.col, m.b.buf, m.b.offset,
                    m.b.batch, m.b.row, m.b.col, m.k
                )?,
                Step::ScatterAdd(s) => writeln!(
                    f,
                    "  b{}[{}, {}, {}] = scatter_add b{}(+{}, strides {} {} {}) at b{}(+{}, stride {}) over k = {}",
                    s.out, s.outer, s.n, s.inner, s.src.buf, s.src.offset, s.src.batch, s.src.row, s.src.col,
                    s.idx.buf, s.idx.offset, s.idx.col, s.k
                )?,
            }
        }
        writeln!(f, "}}")
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.buffers.iter().enumerate() {
            let dims: Vec<String> = b.shape.iter().map(|d| d.to_string()).collect();
            writeln!(f, "b{i}: {}[{}] {:?}", b.dtype, dims.join(", "), b.kind)?;
        }
        for k in &self.kernels {
            write!(f, "{k}")?;
        }
        for (name, b) in &self.outputs {
            writeln!(f, "output {name} = b{b}")?;
        }
        Ok(())
    }
}
