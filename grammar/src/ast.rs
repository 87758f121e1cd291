//! The abstract syntax tree of a `.vlm` file. Every node keeps the byte span it came from.

use std::fmt;

/// A half-open byte range `[start, end)` in one source file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    /// A span from `start` to `end` (bytes).
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }
    /// The smallest span that covers both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// A name with its location.
#[derive(Clone, PartialEq, Debug)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// One parsed `.vlm` file.
#[derive(Clone, PartialEq, Debug)]
pub struct File {
    pub items: Vec<Item>,
}

/// A top-level declaration.
#[derive(Clone, PartialEq, Debug)]
pub enum Item {
    Use(UseDecl),
    Fn(FnDecl),
    Block(BlockDecl),
    /// `model Small = Clip(dim: 40)`.
    Alias(AliasDecl),
    Adapter(AdapterDecl),
    Trainer(TrainerDecl),
}

/// `use std.nn.Linear`, `use std.nn.{Linear, LayerNorm}`, `use std.nn.*`.
#[derive(Clone, PartialEq, Debug)]
pub struct UseDecl {
    pub module: Vec<Ident>,
    pub names: UseNames,
    pub span: Span,
}

/// What a `use` brings into scope.
#[derive(Clone, PartialEq, Debug)]
pub enum UseNames {
    One(Ident),
    Many(Vec<Ident>),
    All(Span),
}

/// Whether a declaration is a reusable `block` or a `model` (a root that can be built).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BlockKind {
    Block,
    Model,
}

/// `block Name(params) { members }` or `model Name(params) { members }`.
#[derive(Clone, PartialEq, Debug)]
pub struct BlockDecl {
    pub kind: BlockKind,
    pub name: Ident,
    pub params: Vec<ParamDecl>,
    pub members: Vec<Member>,
    pub span: Span,
}

/// `model Name = Target(args)`: a model that is another model with other compile-time arguments.
#[derive(Clone, PartialEq, Debug)]
pub struct AliasDecl {
    pub name: Ident,
    pub target: Expr,
    pub span: Span,
}

/// A parameter of a block or function: `name: type = default`.
#[derive(Clone, PartialEq, Debug)]
pub struct ParamDecl {
    pub name: Ident,
    pub ty: TypeExpr,
    pub default: Option<Expr>,
    pub span: Span,
}

/// A written type.
#[derive(Clone, PartialEq, Debug)]
pub struct TypeExpr {
    pub kind: TypeKind,
    /// `?` after the type: the argument may be `none`.
    pub optional: bool,
    pub span: Span,
}

/// The kinds of written type.
#[derive(Clone, PartialEq, Debug)]
pub enum TypeKind {
    Tensor(TensorTypeExpr),
    Scalar(ScalarType),
    Enum(Vec<Ident>),
}

/// Compile-time value types.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScalarType {
    Int,
    Float,
    Bool,
    Str,
    Fn,
    Dim,
}

impl ScalarType {
    /// The keyword that writes this type.
    pub fn name(self) -> &'static str {
        match self {
            ScalarType::Int => "int",
            ScalarType::Float => "float",
            ScalarType::Bool => "bool",
            ScalarType::Str => "str",
            ScalarType::Fn => "fn",
            ScalarType::Dim => "dim",
        }
    }
}

/// `f32[B, *rest, dim / heads]`; the dtype may be left out in `param` declarations.
#[derive(Clone, PartialEq, Debug)]
pub struct TensorTypeExpr {
    pub dtype: Option<Ident>,
    pub dims: Vec<DimPat>,
    pub span: Span,
}

/// One dimension in a tensor type.
#[derive(Clone, PartialEq, Debug)]
pub enum DimPat {
    /// An expression: binds a new name on first use, otherwise is checked.
    Expr(Expr),
    /// `*name`: any number of dimensions.
    Star(Ident),
}

/// `fn name(params) -> ret { body }`.
#[derive(Clone, PartialEq, Debug)]
pub struct FnDecl {
    pub name: Ident,
    pub params: Vec<ParamDecl>,
    pub ret: Option<RetType>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// A function's result type: one type or a tuple of (optionally named) types.
#[derive(Clone, PartialEq, Debug)]
pub enum RetType {
    Single(TypeExpr),
    Tuple(Vec<(Option<Ident>, TypeExpr)>),
}

/// A member of a block body.
#[derive(Clone, PartialEq, Debug)]
pub enum Member {
    /// `param weight: [out, in] init normal(std: 0.02)`.
    Param(ParamMember),
    /// `attn = Attention(dim: dim)` or `layers = [Layer(dim) for i in 0..depth]`.
    Sub {
        name: Ident,
        value: Expr,
        span: Span,
    },
    /// `let head_dim = dim / heads`.
    Let {
        name: Ident,
        value: Expr,
        span: Span,
    },
    /// A method: `fn forward(...)`.
    Fn(FnDecl),
    /// Compile-time conditional members.
    If {
        cond: Expr,
        then: Vec<Member>,
        els: Vec<Member>,
        span: Span,
    },
    /// `assert dim % heads == 0, "message"`.
    Assert {
        cond: Expr,
        message: Option<String>,
        span: Span,
    },
    /// `checkpoint { "bert." => "", ignore "pooler." }`: checkpoint names to parameter paths.
    Checkpoint {
        rules: Vec<CheckpointRule>,
        span: Span,
    },
    /// `preprocess (ids, mask) = text(max_len: 128)`: raw inputs to input tensors.
    Preprocess {
        targets: Vec<Ident>,
        source: Expr,
        span: Span,
    },
}

/// One rule of a `checkpoint` block.
#[derive(Clone, PartialEq, Debug)]
pub enum CheckpointRule {
    /// Checkpoint names starting with `from` start with `to` in the model.
    Rename {
        from: String,
        to: String,
        span: Span,
    },
    /// Checkpoint names starting with this prefix are not used (and not reported as unused).
    Ignore { prefix: String, span: Span },
}

/// A trainable (or frozen) tensor declared in a block.
#[derive(Clone, PartialEq, Debug)]
pub struct ParamMember {
    pub name: Ident,
    pub ty: TensorTypeExpr,
    pub init: Option<Expr>,
    pub span: Span,
}

/// A statement in a function body.
#[derive(Clone, PartialEq, Debug)]
pub enum Stmt {
    Let {
        target: Target,
        value: Expr,
        span: Span,
    },
    Assign {
        name: Ident,
        value: Expr,
        span: Span,
    },
    Return {
        value: Expr,
        span: Span,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        els: Vec<Stmt>,
        span: Span,
    },
    For {
        var: Ident,
        iter: Expr,
        body: Vec<Stmt>,
        span: Span,
    },
    Assert {
        cond: Expr,
        message: Option<String>,
        span: Span,
    },
}

/// What a `let` binds: one name or a tuple of names.
#[derive(Clone, PartialEq, Debug)]
pub enum Target {
    Name(Ident),
    Tuple(Vec<Ident>),
}

/// An expression with its span.
#[derive(Clone, PartialEq, Debug)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

/// Expression forms.
#[derive(Clone, PartialEq, Debug)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    None,
    Name(String),
    List(Vec<Expr>),
    Tuple(Vec<Expr>),
    /// `[elem for var in iter if filter]`.
    Comprehension {
        elem: Box<Expr>,
        var: Ident,
        iter: Box<Expr>,
        filter: Option<Box<Expr>>,
    },
    Unary {
        op: UnaryOp,
        operand: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    Call {
        callee: Box<Expr>,
        args: Vec<Arg>,
    },
    /// `base.name` (also `base.0` for tuple fields).
    Field {
        base: Box<Expr>,
        name: Ident,
    },
    Index {
        base: Box<Expr>,
        items: Vec<IndexItem>,
    },
}

/// Prefix operators.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnaryOp {
    Neg,
    Not,
}

/// Infix operators.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BinOp {
    Range,
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    MatMul,
    Mul,
    Div,
    Rem,
}

impl BinOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Range => "..",
            BinOp::Or => "||",
            BinOp::And => "&&",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::MatMul => "@",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }
}

/// A call argument, positional or named.
#[derive(Clone, PartialEq, Debug)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

/// One item of `x[...]`.
#[derive(Clone, PartialEq, Debug)]
pub enum IndexItem {
    /// A single index: removes the axis.
    At(Expr),
    /// `start:end:step`, each part optional.
    Slice {
        start: Option<Expr>,
        end: Option<Expr>,
        step: Option<Expr>,
        span: Span,
    },
    /// `...`: as many full slices as needed.
    Ellipsis(Span),
}

/// `adapter lora_qv for Llava = lora(rank: 8) on lm.layers.*.self_attn.{q_proj, v_proj}`.
#[derive(Clone, PartialEq, Debug)]
pub struct AdapterDecl {
    pub name: Ident,
    pub model: Ident,
    pub method: Expr,
    pub targets: Vec<Pattern>,
    pub span: Span,
}

/// A path pattern over parameter and module names.
#[derive(Clone, PartialEq, Debug)]
pub struct Pattern {
    pub segs: Vec<PatSeg>,
    pub span: Span,
}

/// One segment of a path pattern.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum PatSeg {
    /// An exact name (or layer number).
    Name(String),
    /// `*`: any one segment.
    Star,
    /// `**`: any number of segments (including none).
    DoubleStar,
    /// `{q_proj, v_proj}`: one of these names.
    Alt(Vec<String>),
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.segs.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match s {
                PatSeg::Name(n) => f.write_str(n)?,
                PatSeg::Star => f.write_str("*")?,
                PatSeg::DoubleStar => f.write_str("**")?,
                PatSeg::Alt(v) => write!(f, "{{{}}}", v.join(", "))?,
            }
        }
        Ok(())
    }
}

/// `trainer align for Llava { objective sft(...) train projector ... }`.
#[derive(Clone, PartialEq, Debug)]
pub struct TrainerDecl {
    pub name: Ident,
    pub model: Ident,
    pub settings: Vec<Setting>,
    pub span: Span,
}

/// One `key value` line of a trainer.
#[derive(Clone, PartialEq, Debug)]
pub struct Setting {
    pub key: Ident,
    pub value: SettingValue,
    pub span: Span,
}

/// A trainer setting's value: path patterns (`train`, `freeze`) or an expression.
#[derive(Clone, PartialEq, Debug)]
pub enum SettingValue {
    Targets(Vec<Pattern>),
    Expr(Expr),
}

/// The tree of `value` in the layout of `{:#?}` (one field per line, indented), made from the
/// one-line `{:?}` text in a single pass: `{:#?}` costs time cubic in the depth of a tree
/// (every nested level re-indents through an adapter). Indentation stops growing at
/// [`TREE_INDENT_LEVELS`] levels, so the text stays linear in the size of the tree.
pub fn tree_text(value: &impl fmt::Debug) -> String {
    let flat = format!("{value:?}");
    let mut out = String::with_capacity(flat.len() * 2);
    let mut level = 0usize;
    let newline = |out: &mut String, level: usize| {
        out.push('\n');
        for _ in 0..level.min(TREE_INDENT_LEVELS) {
            out.push_str("    ");
        }
    };
    let mut chars = flat.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                // A quoted string or char: copied as it is, escapes included.
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c {
                        break;
                    }
                }
            }
            '{' | '[' | '(' => {
                let close = match c {
                    '{' => '}',
                    '[' => ']',
                    _ => ')',
                };
                out.push(c);
                if chars.peek() == Some(&close) {
                    out.push(close);
                    chars.next();
                    continue;
                }
                level += 1;
                // `{ a: 1 }`: the space after the brace goes.
                if chars.peek() == Some(&' ') {
                    chars.next();
                }
                newline(&mut out, level);
            }
            '}' | ']' | ')' => {
                if out.ends_with(' ') {
                    out.pop();
                }
                out.push(',');
                level = level.saturating_sub(1);
                newline(&mut out, level);
                out.push(c);
            }
            ',' if chars.peek() == Some(&' ') => {
                chars.next();
                out.push(',');
                newline(&mut out, level);
            }
            _ => out.push(c),
        }
    }
    out.push('\n');
    out
}

/// Levels of indentation [`tree_text`] shows (deeper levels are not indented further).
pub const TREE_INDENT_LEVELS: usize = 64;

#[cfg(test)]
mod tree_text_tests {
    use super::*;

    #[test]
    fn matches_the_pretty_debug_layout() {
        let file = crate::parse(
            "model M { fn forward(x: f32[B, 4]) -> f32[B, 4] { return -x + f(x, \"a, {b}\")[0] } }",
        )
        .unwrap();
        assert_eq!(tree_text(&file), format!("{file:#?}\n"));
    }
}
