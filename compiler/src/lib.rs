//! vlmc: a compiler for vision-language models.
//!
//! Stages, each a folder: `elab` (AST → graph IR, with shape checking), `ir` (the typed graph IR,
//! its text form, verifier and DOT writer), `diag` (diagnostics rendered against the source).

pub mod backend;
pub mod diag;
pub mod elab;
pub mod files;
pub mod hash;
pub mod ir;
pub mod kernel;
pub mod passes;
pub mod report;
pub mod train;
