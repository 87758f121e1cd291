//! The `.vlm` language front end: a pest grammar (`vlm.pest`), the AST with source spans,
//! and the parser that turns text into it.

pub mod ast;
mod limits;
mod parse;

pub use limits::{MAX_EXPR_DEPTH, MAX_NESTING};
pub use parse::{parse, ParseError};
