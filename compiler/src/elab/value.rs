//! Values seen during elaboration: compile-time numbers, dims, lists, module instances, functions,
//! and tensors (graph nodes).

use super::modules::ItemRef;
use crate::ir::{DType, Dim, NodeId};
use std::collections::HashMap;
use std::rc::Rc;
use vlmc_grammar::ast::FnDecl;

/// A value during elaboration.
#[derive(Clone, Debug)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    None,
    /// A symbolic size such as `B` or `16 + T` (constant sizes are `Int`).
    Dim(Dim),
    /// Shared: naming a list (`layers[i]` in a loop) must not copy it.
    List(Rc<Vec<Value>>),
    Tuple(Rc<Vec<Value>>),
    /// `lo..hi`.
    Range(i64, i64),
    /// A variant of an enum parameter (`rope`, `learned`).
    Enum(String),
    DType(DType),
    Tensor(NodeId),
    Module(Rc<Instance>),
    Func(Func),
}

/// Something callable.
#[derive(Clone, Debug)]
pub enum Func {
    /// A top-level `fn` or a `block` (whose call instantiates it).
    Item(ItemRef),
    /// A primitive or built-in helper.
    Builtin(&'static str),
    /// A method of a module instance.
    Method(Rc<Instance>, String),
}

/// An instantiated block: its compile-time environment, members and methods.
#[derive(Debug)]
pub struct Instance {
    pub block: ItemRef,
    /// Block name (`Linear`).
    pub kind: String,
    /// Parameter path prefix (`vision.layers.3.attn`); empty for the root.
    pub path: String,
    pub env: HashMap<String, Value>,
    pub methods: HashMap<String, Rc<FnDecl>>,
    /// Member names in declaration order (for listings).
    pub order: Vec<String>,
}

impl Value {
    /// The value's kind with an article, for error messages: "an int", "a tensor".
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a bool",
            Value::Str(_) => "a string",
            Value::None => "none",
            Value::Dim(_) => "a symbolic size",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Range(_, _) => "a range",
            Value::Enum(_) => "a name",
            Value::DType(_) => "a dtype",
            Value::Tensor(_) => "a tensor",
            Value::Module(_) => "a module",
            Value::Func(Func::Item(_)) => "a block or function",
            Value::Func(_) => "a function",
        }
    }

    /// The value as a size (`Int` or `Dim`).
    pub fn as_dim(&self) -> Option<Dim> {
        match self {
            Value::Int(i) => Some(Dim::c(*i)),
            Value::Dim(d) => Some(d.clone()),
            _ => None,
        }
    }

    /// A size as a value: constant sizes become `Int`.
    pub fn from_dim(d: Dim) -> Value {
        match d.as_const() {
            Some(i) => Value::Int(i),
            None => Value::Dim(d),
        }
    }

    /// The value as a float, if numeric and constant.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }
}
