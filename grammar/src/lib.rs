//! The `.vlm` language front end: a pest grammar (`vlm.pest`), the AST with source spans,
//! and the parser that turns text into it.

pub mod ast;
mod parse;

pub use parse::{parse, ParseError};
