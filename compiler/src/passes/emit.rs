//! A small helper for passes that add many nodes (autodiff, the optimiser update): each method
//! inserts one primitive op through [`Graph::add`] (so every node is type-checked) and turns
//! a typing error into a [`PassError`] of the calling pass.

use super::PassError;
use crate::ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Shape, TensorType, UnaryOp};

/// Inserts ops into a graph under one scope.
pub struct Emit<'g> {
    pub g: &'g mut Graph,
    pub scope: String,
    pub pass: &'static str,
}

type R = Result<NodeId, PassError>;

impl<'g> Emit<'g> {
    /// An emitter for `pass`, inserting under `scope`.
    pub fn new(g: &'g mut Graph, pass: &'static str, scope: &str) -> Emit<'g> {
        Emit {
            g,
            scope: scope.to_string(),
            pass,
        }
    }

    /// A [`PassError`] of this pass.
    pub fn err(&self, message: impl Into<String>) -> PassError {
        PassError {
            pass: self.pass,
            message: message.into(),
        }
    }

    /// The type of `id`.
    pub fn ty(&self, id: NodeId) -> TensorType {
        self.g.node(id).ty.clone()
    }

    /// The shape of `id`.
    pub fn shape(&self, id: NodeId) -> Shape {
        self.g.node(id).ty.shape.clone()
    }

    /// `op(operands)`.
    pub fn op(&mut self, op: Op, operands: &[NodeId]) -> R {
        let pass = self.pass;
        self.g
            .add(op, operands, &self.scope)
            .map_err(|e| PassError {
                pass,
                message: e.to_string(),
            })
    }

    /// A source op with a given type.
    pub fn source(&mut self, op: Op, ty: TensorType) -> R {
        let pass = self.pass;
        self.g
            .add_source(op, ty, &self.scope)
            .map_err(|e| PassError {
                pass,
                message: e.to_string(),
            })
    }

    /// A constant of type `ty`.
    pub fn constant(&mut self, value: f64, ty: TensorType) -> R {
        self.source(Op::Const { value }, ty)
    }

    /// A constant with the type of `like`.
    pub fn const_like(&mut self, value: f64, like: NodeId) -> R {
        let ty = self.ty(like);
        self.constant(value, ty)
    }

    /// A constant with the shape of `like` and the given dtype.
    pub fn const_shaped(&mut self, value: f64, dtype: DType, like: NodeId) -> R {
        let shape = self.shape(like);
        self.constant(value, TensorType::new(dtype, shape))
    }

    /// An elementwise unary op.
    pub fn un(&mut self, op: UnaryOp, x: NodeId) -> R {
        self.op(Op::Unary(op), &[x])
    }

    /// An elementwise binary op.
    pub fn bin(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> R {
        self.op(Op::Binary(op), &[a, b])
    }

    /// `a + b`.
    pub fn add(&mut self, a: NodeId, b: NodeId) -> R {
        self.bin(BinaryOp::Add, a, b)
    }

    /// `a - b`.
    pub fn sub(&mut self, a: NodeId, b: NodeId) -> R {
        self.bin(BinaryOp::Sub, a, b)
    }

    /// `a * b`.
    pub fn mul(&mut self, a: NodeId, b: NodeId) -> R {
        self.bin(BinaryOp::Mul, a, b)
    }

    /// `a / b`.
    pub fn div(&mut self, a: NodeId, b: NodeId) -> R {
        self.bin(BinaryOp::Div, a, b)
    }

    /// `-x`.
    pub fn neg(&mut self, x: NodeId) -> R {
        self.un(UnaryOp::Neg, x)
    }

    /// `x * c` for a number `c`.
    pub fn scale(&mut self, x: NodeId, c: f64) -> R {
        let k = self.const_like(c, x)?;
        self.mul(x, k)
    }

    /// `select(cond, a, b)`.
    pub fn select(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> R {
        self.op(Op::Select, &[cond, a, b])
    }

    /// `cast(x, dtype)` (nothing when `x` already has that dtype).
    pub fn cast(&mut self, x: NodeId, dtype: DType) -> R {
        if self.ty(x).dtype == dtype {
            return Ok(x);
        }
        self.op(Op::Cast { dtype }, &[x])
    }

    /// `reduce_sum` along `axis` (kept with size 1).
    pub fn sum(&mut self, x: NodeId, axis: usize) -> R {
        self.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis,
            },
            &[x],
        )
    }

    /// The sum of every element, as a scalar (`[]`). A tensor of rank 2 or more is summed
    /// along its last axis first, then over the partial sums: the long first reduction runs
    /// over rows in parallel, and the sums are more accurate than one running total.
    pub fn sum_all(&mut self, x: NodeId) -> R {
        let rank = self.shape(x).0.len();
        let x = if rank >= 2 { self.sum(x, rank - 1)? } else { x };
        let n = self
            .shape(x)
            .numel()
            .ok_or_else(|| self.err("element count overflows"))?;
        let flat = self.reshape(x, vec![n])?;
        let s = self.sum(flat, 0)?;
        self.reshape(s, vec![])
    }

    /// `reshape` (nothing when the shape is already `shape`).
    pub fn reshape(&mut self, x: NodeId, shape: Vec<Dim>) -> R {
        if self.shape(x).0 == shape {
            return Ok(x);
        }
        self.op(
            Op::Reshape {
                shape: Shape(shape),
            },
            &[x],
        )
    }

    /// `expand` (nothing when the shape is already `shape`).
    pub fn expand(&mut self, x: NodeId, shape: Vec<Dim>) -> R {
        if self.shape(x).0 == shape {
            return Ok(x);
        }
        self.op(
            Op::Expand {
                shape: Shape(shape),
            },
            &[x],
        )
    }

    /// `permute` (nothing for the identity permutation).
    pub fn permute(&mut self, x: NodeId, perm: Vec<usize>) -> R {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.op(Op::Permute { perm }, &[x])
    }

    /// The last two axes swapped.
    pub fn transpose(&mut self, x: NodeId) -> R {
        let r = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permute(x, perm)
    }

    /// `matmul(a, b)`.
    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> R {
        self.op(Op::MatMul, &[a, b])
    }

    /// A scalar broadcast to the shape of `like` (reshape to all-ones, then expand).
    pub fn broadcast_scalar(&mut self, s: NodeId, like: NodeId) -> R {
        let shape = self.shape(like);
        let ones = vec![Dim::c(1); shape.rank()];
        let r = self.reshape(s, ones)?;
        self.expand(r, shape.0)
    }
}
