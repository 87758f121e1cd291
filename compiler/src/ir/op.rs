//! The closed set of primitive operations.
//!
//! Composites (softmax, norms, attention) are written in `.vlm` and expanded into these during
//! elaboration. Broadcasting is never implicit: binary operands have identical shapes, and the
//! elaborator inserts `expand` where the source language broadcasts.

use std::fmt;

use super::dim::Dim;
use super::text::float_text;
use super::types::{DType, Shape};

/// A primitive operation: the payload of one graph node.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input, fed at run time; its type is given at insertion.
    Input {
        /// The input's name, unique among inputs.
        name: String,
    },
    /// A named trainable or frozen parameter, e.g. `vision.layers.3.attn.q_proj.weight`.
    Param {
        /// The checkpoint path, unique among parameters.
        path: String,
        /// How the parameter is initialised when no checkpoint provides it.
        init: Init,
    },
    /// A tensor whose every element is `value`.
    Const {
        /// The element value (converted to the node's dtype).
        value: f64,
    },
    /// A tensor whose value at each position is its index along `axis`.
    Iota {
        /// The axis whose index is produced.
        axis: usize,
    },
    /// Random numbers, e.g. dropout masks.
    Random {
        /// The distribution sampled from.
        dist: Dist,
        /// The seed, so that a graph is deterministic.
        seed: u64,
    },
    /// An elementwise function of one operand.
    Unary(UnaryOp),
    /// An elementwise function of two operands of identical type.
    Binary(BinaryOp),
    /// `select(cond, a, b)`: `a` where `cond` is true, else `b`.
    Select,
    /// A reduction along one axis; the axis is kept, with size 1.
    Reduce {
        /// The combining operation.
        op: ReduceOp,
        /// The reduced axis.
        axis: usize,
    },
    /// `[..., m, k] x [..., k, n] -> [..., m, n]` with identical batch dimensions.
    MatMul,
    /// `gather(table, idx)`: the shape is `table[:axis] ++ idx.shape ++ table[axis+1:]`.
    Gather {
        /// The axis of `table` that `idx` indexes.
        axis: usize,
    },
    /// `scatter_add(src, idx)`, the transpose of `gather`: `src` has the shape
    /// `out[:axis] ++ idx.shape ++ out[axis+1:]`, and each slice `src[.., k, ..]` is added into
    /// `out[.., idx[k], ..]` of a zero tensor whose `axis` has `size` elements.
    ScatterAdd {
        /// The axis of the result that `idx` indexes.
        axis: usize,
        /// The size of that axis.
        size: Dim,
    },
    /// The same elements in row-major order, in a new shape.
    Reshape {
        /// The new shape; its element count equals the operand's.
        shape: Shape,
    },
    /// Axes reordered: output axis `i` is operand axis `perm[i]`.
    Permute {
        /// A permutation of `0..rank`.
        perm: Vec<usize>,
    },
    /// Size-1 axes repeated to a larger size; the rank is unchanged.
    Expand {
        /// The target shape.
        shape: Shape,
    },
    /// Every `step`-th index in `start..end` along `axis`.
    Slice {
        /// The sliced axis.
        axis: usize,
        /// The first index taken.
        start: Dim,
        /// One past the last index considered.
        end: Dim,
        /// The stride, at least 1.
        step: i64,
    },
    /// Operands joined along `axis`.
    Concat {
        /// The joined axis.
        axis: usize,
    },
    /// `before` and `after` elements of `value` added along `axis`.
    Pad {
        /// The padded axis.
        axis: usize,
        /// Elements added before the start.
        before: Dim,
        /// Elements added after the end.
        after: Dim,
        /// The padding value.
        value: f64,
    },
    /// The operand itself; reverse-mode autodiff passes no gradient through it (PyTorch's
    /// `detach`). Removed by the simplifier, so kernels never see it.
    StopGradient,
    /// Element type conversion.
    Cast {
        /// The target element type.
        dtype: DType,
    },
}

/// Elementwise functions of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x`.
    Neg,
    /// `|x|`.
    Abs,
    /// `e^x`.
    Exp,
    /// Natural logarithm.
    Log,
    /// Square root.
    Sqrt,
    /// `1 / sqrt(x)`.
    Rsqrt,
    /// `1 / x`.
    Recip,
    /// Hyperbolic tangent.
    Tanh,
    /// The error function.
    Erf,
    /// Sine.
    Sin,
    /// Cosine.
    Cos,
    /// Logical not.
    Not,
    /// Round towards negative infinity.
    Floor,
}

/// Elementwise functions of two operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
    /// `a` raised to `b`.
    Pow,
    /// The larger of `a` and `b`.
    Max,
    /// The smaller of `a` and `b`.
    Min,
    /// The remainder of `a / b`, with the sign of `b`.
    Mod,
    /// `a == b`.
    Eq,
    /// `a != b`.
    Ne,
    /// `a < b`.
    Lt,
    /// `a <= b`.
    Le,
    /// `a > b`.
    Gt,
    /// `a >= b`.
    Ge,
    /// Logical and.
    And,
    /// Logical or.
    Or,
}

/// How a reduction combines elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// The sum.
    Sum,
    /// The maximum.
    Max,
}

/// The pattern kind of an op, which decides how fusion treats it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// No operands: inputs, parameters, constants, iota, random.
    Source,
    /// One output element from the same position of each operand.
    Elementwise,
    /// Combines elements along an axis.
    Reduction,
    /// Matrix product: takes an elementwise epilogue, never chains another contraction.
    Contraction,
    /// Moves or repeats elements without computing: reshape, permute, expand, slice, concat, pad.
    View,
    /// Data-dependent indexing (gather).
    Opaque,
    /// Data-dependent accumulation (scatter-add): a kernel of its own over materialised operands.
    Scatter,
}

/// A parameter initialiser, printed `normal(std=0.02)` or `zeros`.
#[derive(Clone, Debug, PartialEq)]
pub struct Init {
    /// The initialiser's name, e.g. `normal`, `zeros`, `ones`.
    pub name: String,
    /// Named numeric arguments, in order.
    pub args: Vec<(String, f64)>,
}

/// A distribution sampled by [`Op::Random`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dist {
    /// Uniform on `[lo, hi)`.
    Uniform {
        /// The lower bound.
        lo: f64,
        /// The upper bound.
        hi: f64,
    },
    /// Normal with the given mean and standard deviation.
    Normal {
        /// The mean.
        mean: f64,
        /// The standard deviation.
        std: f64,
    },
    /// True (or 1) with probability `p`.
    Bernoulli {
        /// The probability of true.
        p: f64,
    },
}

impl UnaryOp {
    /// Every unary op.
    pub const ALL: [UnaryOp; 13] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Not,
        UnaryOp::Floor,
    ];

    /// The lowercase name used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Erf => "erf",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Not => "not",
            UnaryOp::Floor => "floor",
        }
    }
}

impl BinaryOp {
    /// Every binary op.
    pub const ALL: [BinaryOp; 16] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Mod,
        BinaryOp::Eq,
        BinaryOp::Ne,
        BinaryOp::Lt,
        BinaryOp::Le,
        BinaryOp::Gt,
        BinaryOp::Ge,
        BinaryOp::And,
        BinaryOp::Or,
    ];

    /// The lowercase name used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Mod => "mod",
            BinaryOp::Eq => "eq",
            BinaryOp::Ne => "ne",
            BinaryOp::Lt => "lt",
            BinaryOp::Le => "le",
            BinaryOp::Gt => "gt",
            BinaryOp::Ge => "ge",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }

    /// Whether the result is a `bool` comparison of the operands.
    pub fn is_comparison(self) -> bool {
        use BinaryOp::*;
        matches!(self, Eq | Ne | Lt | Le | Gt | Ge)
    }
}

impl ReduceOp {
    /// The op name used in the text form: `reduce_sum` or `reduce_max`.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Max => "reduce_max",
        }
    }
}

impl Op {
    /// The stable lowercase name used in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Const { .. } => "const",
            Op::Iota { .. } => "iota",
            Op::Random { .. } => "random",
            Op::Unary(op) => op.name(),
            Op::Binary(op) => op.name(),
            Op::Select => "select",
            Op::Reduce { op, .. } => op.name(),
            Op::MatMul => "matmul",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Expand { .. } => "expand",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Pad { .. } => "pad",
            Op::Cast { .. } => "cast",
            Op::StopGradient => "stop_gradient",
        }
    }

    /// The pattern kind that fusion works with.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Const { .. }
            | Op::Iota { .. }
            | Op::Random { .. } => OpKind::Source,
            Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } => OpKind::Elementwise,
            Op::Reduce { .. } => OpKind::Reduction,
            Op::MatMul => OpKind::Contraction,
            Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Pad { .. }
            | Op::StopGradient => OpKind::View,
            Op::Gather { .. } => OpKind::Opaque,
            Op::ScatterAdd { .. } => OpKind::Scatter,
        }
    }

    /// Whether this op has no operands and is inserted with a given type.
    pub fn is_source(&self) -> bool {
        self.kind() == OpKind::Source
    }

    /// The number of operands, or `None` for `concat`, which takes one or more.
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Concat { .. } => None,
            Op::Binary(_) | Op::MatMul | Op::Gather { .. } | Op::ScatterAdd { .. } => Some(2),
            Op::Select => Some(3),
            _ if self.is_source() => Some(0),
            _ => Some(1),
        }
    }
}

impl Init {
    /// An initialiser with named arguments.
    pub fn new(name: &str, args: &[(&str, f64)]) -> Init {
        let args = args.iter().map(|&(k, v)| (k.to_string(), v)).collect();
        Init {
            name: name.to_string(),
            args,
        }
    }

    /// All zeros.
    pub fn zeros() -> Init {
        Init::new("zeros", &[])
    }

    /// All ones.
    pub fn ones() -> Init {
        Init::new("ones", &[])
    }

    /// Normal with mean 0 and the given standard deviation.
    pub fn normal(std: f64) -> Init {
        Init::new("normal", &[("std", std)])
    }

    /// The value of the argument `key`, if given.
    pub fn arg(&self, key: &str) -> Option<f64> {
        self.args.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
    }
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if self.args.is_empty() {
            return Ok(());
        }
        write!(f, "(")?;
        for (i, (key, value)) in self.args.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{key}={}", float_text(*value))?;
        }
        write!(f, ")")
    }
}

impl Dist {
    /// The lowercase name used in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Dist::Uniform { .. } => "uniform",
            Dist::Normal { .. } => "normal",
            Dist::Bernoulli { .. } => "bernoulli",
        }
    }

    /// The parameters as `(name, value)` pairs, in text-form order.
    pub fn args(&self) -> Vec<(&'static str, f64)> {
        match *self {
            Dist::Uniform { lo, hi } => vec![("lo", lo), ("hi", hi)],
            Dist::Normal { mean, std } => vec![("mean", mean), ("std", std)],
            Dist::Bernoulli { p } => vec![("p", p)],
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let args: Vec<String> = self
            .args()
            .into_iter()
            .map(|(k, v)| format!("{k}={}", float_text(v)))
            .collect();
        write!(f, "{}({})", self.name(), args.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = UnaryOp::ALL.iter().map(|op| op.name()).collect();
        names.extend(BinaryOp::ALL.iter().map(|op| op.name()));
        names.extend([
            "reduce_sum",
            "reduce_max",
            "matmul",
            "gather",
            "scatter_add",
            "select",
        ]);
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }

    #[test]
    fn kinds_and_arity() {
        assert_eq!(Op::MatMul.kind(), OpKind::Contraction);
        assert_eq!(Op::Cast { dtype: DType::F16 }.kind(), OpKind::Elementwise);
        assert_eq!(Op::Const { value: 1.0 }.arity(), Some(0));
        assert_eq!(Op::Select.arity(), Some(3));
        assert_eq!(Op::Concat { axis: 0 }.arity(), None);
        assert_eq!(
            Op::Reduce {
                op: ReduceOp::Max,
                axis: 0
            }
            .name(),
            "reduce_max"
        );
    }

    #[test]
    fn init_and_dist_printing() {
        assert_eq!(Init::normal(0.02).to_string(), "normal(std=0.02)");
        assert_eq!(Init::zeros().to_string(), "zeros");
        assert_eq!(
            Init::new("uniform", &[("lo", -1.0), ("hi", 1.0)]).to_string(),
            "uniform(lo=-1, hi=1)"
        );
        assert_eq!(Dist::Bernoulli { p: 0.9 }.to_string(), "bernoulli(p=0.9)");
        assert_eq!(
            Dist::Normal {
                mean: 0.0,
                std: 1e-5
            }
            .to_string(),
            "normal(mean=0, std=1e-5)"
        );
    }
}
