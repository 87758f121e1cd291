//! The typed graph IR: a small closed set of primitive ops over tensors with symbolic shapes.
//!
//! - [`dim`]: symbolic dimensions (`2*B*T + 16`), canonical polynomials.
//! - [`types`]: element types, shapes and tensor types (`f32[B, T, 64]`).
//! - [`op`]: the primitive ops and their pattern kinds.
//! - [`infer`]: the typing rule of every op.
//! - [`graph`]: the graph, type-checked on insertion.
//! - [`text`] and [`read`]: the text form, the contract of the IR (print → read → print is the
//!   identity).
//! - [`dot`]: Graphviz output with one cluster per scope.
//! - [`verify`]: the checks run between passes.

pub mod dim;
pub mod dot;
pub mod error;
pub mod graph;
pub mod infer;
pub mod op;
pub mod read;
pub mod text;
pub mod types;
pub mod verify;

pub use dim::Dim;
pub use dot::{to_block_dot, to_dot};
pub use error::IrError;
pub use graph::{Graph, Node, NodeId};
pub use infer::{check_source, infer};
pub use op::{BinaryOp, Dist, Init, Op, OpKind, ReduceOp, UnaryOp};
pub use read::{read, ReadError};
pub use text::print;
pub use types::{DType, Shape, TensorType};
pub use verify::{verify, VerifyError};
