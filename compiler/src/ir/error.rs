//! Errors raised while building a graph; their messages are shown to users by the elaborator.

use super::graph::NodeId;

/// An error from type inference or graph construction.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IrError {
    /// An op's operands or attributes break its typing rule, e.g.
    /// `matmul: inner dimensions differ: f32[B, T, 64] @ f32[32, 96] (64 vs 32)`.
    #[error("{op}: {message}")]
    Op {
        /// The op's text-form name.
        op: &'static str,
        /// What is wrong, quoting the types involved.
        message: String,
    },
    /// An operand or output refers to a node that is not in the graph.
    #[error("node {} is not in the graph", .0.index())]
    UnknownNode(NodeId),
    /// Two parameters share a path.
    #[error("parameter \"{0}\" is declared twice")]
    DuplicateParam(String),
    /// Two inputs share a name.
    #[error("input \"{0}\" is declared twice")]
    DuplicateInput(String),
    /// Two outputs share a name.
    #[error("output \"{0}\" is declared twice")]
    DuplicateOutput(String),
}

impl IrError {
    /// An [`IrError::Op`] for the op named `op`.
    pub fn op(op: &'static str, message: impl Into<String>) -> IrError {
        IrError::Op {
            op,
            message: message.into(),
        }
    }
}
