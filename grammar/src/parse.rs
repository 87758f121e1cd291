//! From text to [`File`]: the pest parser and the conversion of its pairs to AST nodes.

use crate::ast::*;
use crate::limits::MAX_EXPR_DEPTH;
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser as _;
use std::sync::OnceLock;

#[derive(pest_derive::Parser)]
#[grammar = "vlm.pest"]
struct VlmParser;

/// A syntax error: where, and what was expected.
#[derive(Clone, PartialEq, Debug)]
pub struct ParseError {
    pub span: Span,
    pub message: String,
}

/// Parses one `.vlm` source text.
pub fn parse(src: &str) -> Result<File, ParseError> {
    // Nesting is bounded (`crate::limits`), but pest's recursion at the bound needs more stack
    // than a test thread's 2 MiB: run on a stack of our own when the caller's is short.
    stacker::maybe_grow(16 << 20, 64 << 20, || parse_here(src))
}

fn parse_here(src: &str) -> Result<File, ParseError> {
    // Track the literal tokens tried at the failure point too, so errors can say "expected `}`".
    pest::set_error_detail(true);
    crate::limits::check_nesting(src)?;
    let mut pairs = VlmParser::parse(Rule::file, src).map_err(|e| convert_error(src, e))?;
    let file = pairs.next().ok_or_else(|| ParseError {
        span: Span::default(),
        message: "empty parse".into(),
    })?;
    let mut items = Vec::new();
    for p in file.into_inner() {
        let item = match p.as_rule() {
            Rule::use_decl => Item::Use(use_decl(p)),
            Rule::fn_decl => Item::Fn(fn_decl(p)?),
            Rule::block_decl => Item::Block(block_decl(p, BlockKind::Block)?),
            Rule::model_decl => Item::Block(block_decl(p, BlockKind::Model)?),
            Rule::model_alias => {
                let sp = span(&p);
                let mut it = p.into_inner();
                let _kw = next(&mut it, sp)?;
                let name = ident(next(&mut it, sp)?);
                let target = expr(next(&mut it, sp)?)?;
                Item::Alias(AliasDecl {
                    name,
                    target,
                    span: sp,
                })
            }
            Rule::adapter_decl => Item::Adapter(adapter_decl(p)?),
            Rule::trainer_decl => Item::Trainer(trainer_decl(p)?),
            _ => continue, // EOI
        };
        items.push(item);
    }
    Ok(File { items })
}

fn convert_error(src: &str, e: pest::error::Error<Rule>) -> ParseError {
    if let Some(err) = unterminated(src) {
        return err;
    }
    let span = match e.location {
        pest::error::InputLocation::Pos(p) => Span::new(p, p),
        pest::error::InputLocation::Span((a, b)) => Span::new(a, b),
    };
    let message = match &e.variant {
        pest::error::ErrorVariant::ParsingError {
            positives,
            negatives,
        } => {
            let mut names: Vec<String> = positives
                .iter()
                .filter_map(|r| rule_name(*r))
                .map(str::to_string)
                .collect();
            if let Some(attempts) = e.parse_attempts() {
                if attempts.max_position == span.start {
                    names.extend(
                        attempts
                            .expected_tokens()
                            .iter()
                            .filter_map(|t| literal_name(&t.to_string())),
                    );
                }
            }
            names.sort();
            names.dedup();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            if names.is_empty() && !negatives.is_empty() {
                "unexpected keyword here".to_string()
            } else if names.is_empty() {
                "syntax error".to_string()
            } else {
                format!("syntax error: expected {}", join_or(&names))
            }
        }
        pest::error::ErrorVariant::CustomError { message } => message.clone(),
    };
    ParseError { span, message }
}

fn join_or(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    }
}

/// A literal token worth listing in "expected ..." (punctuation and keywords; not comments).
fn literal_name(token: &str) -> Option<String> {
    match token {
        "}" | ")" | "]" | "," | "{" | "(" | "[" | ":" | "=" | "->" | "?" | "in" | "for"
        | "else" | "on" | "|" => Some(format!("`{token}`")),
        _ => None,
    }
}

/// An unterminated block comment or string makes every later error meaningless: find it first.
fn unterminated(src: &str) -> Option<ParseError> {
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => match src[i + 2..].find("*/") {
                Some(end) => i += end + 4,
                None => {
                    return Some(ParseError {
                        span: Span::new(i, i + 2),
                        message: "unterminated comment: `/*` has no closing `*/`".into(),
                    })
                }
            },
            b'"' => {
                let start = i;
                i += 1;
                loop {
                    match b.get(i) {
                        None | Some(b'\n') => {
                            return Some(ParseError {
                                span: Span::new(start, start + 1),
                                message: "unterminated string: no closing `\"` on this line".into(),
                            })
                        }
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

/// User-facing names of grammar rules (None: not worth mentioning).
fn rule_name(r: Rule) -> Option<&'static str> {
    Some(match r {
        Rule::EOI => "end of file",
        Rule::use_decl => "`use`",
        Rule::fn_decl => "`fn`",
        Rule::block_decl => "`block`",
        Rule::model_decl | Rule::kw_model | Rule::model_alias => "`model`",
        Rule::adapter_decl => "`adapter`",
        Rule::trainer_decl => "`trainer`",
        Rule::ident | Rule::word | Rule::pat_name => "a name",
        Rule::int | Rule::float => "a number",
        Rule::string => "a string",
        Rule::type_expr | Rule::scalar_type | Rule::enum_type => "a type",
        Rule::tensor_type | Rule::dtype => "a tensor type (f32[...])",
        Rule::param_type => "a shape ([...])",
        Rule::dim_list | Rule::dim_pat => "a dimension",
        Rule::params | Rule::param_decl => "a parameter",
        Rule::members => "`{`",
        Rule::body => "`{`",
        Rule::param_member => "`param`",
        Rule::checkpoint_member | Rule::kw_checkpoint => "`checkpoint`",
        Rule::preprocess_member | Rule::kw_preprocess => "`preprocess`",
        Rule::ckpt_map | Rule::ckpt_ignore | Rule::kw_ignore => "a checkpoint rule",
        Rule::let_member | Rule::let_stmt => "`let`",
        Rule::sub_member | Rule::assign_stmt => "an assignment",
        Rule::if_member | Rule::if_stmt => "`if`",
        Rule::for_stmt => "`for`",
        Rule::return_stmt => "`return`",
        Rule::assert_stmt => "`assert`",
        Rule::expr | Rule::list | Rule::paren | Rule::kw_true | Rule::kw_false | Rule::kw_none => {
            "an expression"
        }
        Rule::range
        | Rule::or
        | Rule::and
        | Rule::eq
        | Rule::ne
        | Rule::le
        | Rule::ge
        | Rule::lt
        | Rule::gt
        | Rule::add
        | Rule::sub
        | Rule::matmul
        | Rule::mul
        | Rule::div
        | Rule::rem => "an operator",
        Rule::call_args => "`(`",
        Rule::index => "`[`",
        Rule::field => "`.`",
        Rule::arg => "an argument",
        Rule::init_kw => "`init`",
        Rule::on_kw => "`on`",
        Rule::targets | Rule::pattern => "a path pattern",
        Rule::setting | Rule::target_setting | Rule::value_setting | Rule::target_key => {
            "a trainer setting"
        }
        Rule::ret_type | Rule::ret_tuple | Rule::ret_item => "a result type",
        Rule::use_group => "`{`",
        Rule::use_all => "`*`",
        Rule::optional => "`?`",
        Rule::comprehension => "`for`",
        _ => return None,
    })
}

fn span(p: &Pair<Rule>) -> Span {
    let s = p.as_span();
    Span::new(s.start(), s.end())
}

fn ident(p: Pair<Rule>) -> Ident {
    Ident {
        name: p.as_str().to_string(),
        span: span(&p),
    }
}

fn use_decl(p: Pair<Rule>) -> UseDecl {
    let sp = span(&p);
    let mut path = Vec::new();
    let mut names = None;
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::ident => path.push(ident(c)),
            Rule::use_group => names = Some(UseNames::Many(c.into_inner().map(ident).collect())),
            Rule::use_all => names = Some(UseNames::All(span(&c))),
            _ => {}
        }
    }
    let names = match names {
        Some(n) => n,
        None => match path.pop() {
            Some(last) => UseNames::One(last),
            None => UseNames::Many(Vec::new()),
        },
    };
    UseDecl {
        module: path,
        names,
        span: sp,
    }
}

fn params(p: Pair<Rule>) -> Result<Vec<ParamDecl>, ParseError> {
    p.into_inner().map(param_decl).collect()
}

fn param_decl(p: Pair<Rule>) -> Result<ParamDecl, ParseError> {
    let sp = span(&p);
    let mut it = p.into_inner();
    let name = ident(next(&mut it, sp)?);
    let ty = type_expr(next(&mut it, sp)?)?;
    let default = it.next().map(expr).transpose()?;
    Ok(ParamDecl {
        name,
        ty,
        default,
        span: sp,
    })
}

fn next<'a>(
    it: &mut pest::iterators::Pairs<'a, Rule>,
    sp: Span,
) -> Result<Pair<'a, Rule>, ParseError> {
    it.next().ok_or_else(|| ParseError {
        span: sp,
        message: "internal parser error: missing part".into(),
    })
}

fn type_expr(p: Pair<Rule>) -> Result<TypeExpr, ParseError> {
    let sp = span(&p);
    let mut kind = None;
    let mut optional = false;
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::tensor_type => kind = Some(TypeKind::Tensor(tensor_type(c)?)),
            Rule::scalar_type => {
                let s = match c.as_str() {
                    "int" => ScalarType::Int,
                    "float" => ScalarType::Float,
                    "bool" => ScalarType::Bool,
                    "str" => ScalarType::Str,
                    "fn" => ScalarType::Fn,
                    _ => ScalarType::Dim,
                };
                kind = Some(TypeKind::Scalar(s));
            }
            Rule::enum_type => kind = Some(TypeKind::Enum(c.into_inner().map(ident).collect())),
            Rule::optional => optional = true,
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| ParseError {
        span: sp,
        message: "expected a type".into(),
    })?;
    Ok(TypeExpr {
        kind,
        optional,
        span: sp,
    })
}

fn tensor_type(p: Pair<Rule>) -> Result<TensorTypeExpr, ParseError> {
    let sp = span(&p);
    let mut dtype = None;
    let mut dims = Vec::new();
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::dtype => dtype = Some(ident(c)),
            Rule::dim_list => {
                for d in c.into_inner() {
                    let inner = next(&mut d.into_inner(), sp)?;
                    dims.push(match inner.as_rule() {
                        Rule::star_dim => DimPat::Star(ident(next(&mut inner.into_inner(), sp)?)),
                        _ => DimPat::Expr(expr(inner)?),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(TensorTypeExpr {
        dtype,
        dims,
        span: sp,
    })
}

fn ret_type(p: Pair<Rule>) -> Result<RetType, ParseError> {
    let sp = span(&p);
    let inner = next(&mut p.into_inner(), sp)?;
    match inner.as_rule() {
        Rule::ret_tuple => {
            let mut items = Vec::new();
            for item in inner.into_inner() {
                let mut name = None;
                let mut ty = None;
                for c in item.into_inner() {
                    match c.as_rule() {
                        Rule::ident => name = Some(ident(c)),
                        _ => ty = Some(type_expr(c)?),
                    }
                }
                let ty = ty.ok_or_else(|| ParseError {
                    span: sp,
                    message: "expected a type".into(),
                })?;
                items.push((name, ty));
            }
            Ok(RetType::Tuple(items))
        }
        _ => Ok(RetType::Single(type_expr(inner)?)),
    }
}

fn fn_decl(p: Pair<Rule>) -> Result<FnDecl, ParseError> {
    let sp = span(&p);
    let mut name = None;
    let mut ps = Vec::new();
    let mut ret = None;
    let mut body = Vec::new();
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::ident => name = Some(ident(c)),
            Rule::params => ps = params(c)?,
            Rule::ret_type => ret = Some(ret_type(c)?),
            Rule::body => body = stmts(c)?,
            _ => {}
        }
    }
    Ok(FnDecl {
        name: name.ok_or_else(|| missing(sp))?,
        params: ps,
        ret,
        body,
        span: sp,
    })
}

fn missing(sp: Span) -> ParseError {
    ParseError {
        span: sp,
        message: "internal parser error: missing name".into(),
    }
}

fn block_decl(p: Pair<Rule>, kind: BlockKind) -> Result<BlockDecl, ParseError> {
    let sp = span(&p);
    let mut name = None;
    let mut ps = Vec::new();
    let mut ms = Vec::new();
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::ident => name = Some(ident(c)),
            Rule::params => ps = params(c)?,
            Rule::members => ms = members(c)?,
            _ => {}
        }
    }
    Ok(BlockDecl {
        kind,
        name: name.ok_or_else(|| missing(sp))?,
        params: ps,
        members: ms,
        span: sp,
    })
}

fn members(p: Pair<Rule>) -> Result<Vec<Member>, ParseError> {
    p.into_inner().map(member).collect()
}

fn member(p: Pair<Rule>) -> Result<Member, ParseError> {
    let sp = span(&p);
    Ok(match p.as_rule() {
        Rule::param_member => {
            let mut it = p.into_inner();
            let name = ident(next(&mut it, sp)?);
            let tp = next(&mut it, sp)?;
            let ty = tensor_type(tp)?;
            let mut init = None;
            for c in it {
                if c.as_rule() == Rule::expr {
                    init = Some(expr(c)?);
                }
            }
            Member::Param(ParamMember {
                name,
                ty,
                init,
                span: sp,
            })
        }
        Rule::let_member | Rule::sub_member => {
            let is_let = p.as_rule() == Rule::let_member;
            let mut it = p.into_inner();
            let name = ident(next(&mut it, sp)?);
            let value = expr(next(&mut it, sp)?)?;
            if is_let {
                Member::Let {
                    name,
                    value,
                    span: sp,
                }
            } else {
                Member::Sub {
                    name,
                    value,
                    span: sp,
                }
            }
        }
        Rule::fn_decl => Member::Fn(fn_decl(p)?),
        Rule::if_member => {
            let mut it = p.into_inner();
            let cond = expr(next(&mut it, sp)?)?;
            let then = members(next(&mut it, sp)?)?;
            let els = match it.next() {
                Some(e) if e.as_rule() == Rule::if_member => vec![member(e)?],
                Some(e) => members(e)?,
                None => Vec::new(),
            };
            Member::If {
                cond,
                then,
                els,
                span: sp,
            }
        }
        Rule::assert_stmt => {
            let (cond, message) = assert_parts(p)?;
            Member::Assert {
                cond,
                message,
                span: sp,
            }
        }
        Rule::checkpoint_member => {
            let mut rules = Vec::new();
            for r in p.into_inner() {
                let rsp = span(&r);
                match r.as_rule() {
                    Rule::ckpt_map => {
                        let mut it = r.into_inner();
                        let from = string_value(next(&mut it, rsp)?);
                        let to = string_value(next(&mut it, rsp)?);
                        rules.push(CheckpointRule::Rename {
                            from,
                            to,
                            span: rsp,
                        });
                    }
                    Rule::ckpt_ignore => {
                        let prefix = r
                            .into_inner()
                            .find(|c| c.as_rule() == Rule::string)
                            .map(string_value)
                            .unwrap_or_default();
                        rules.push(CheckpointRule::Ignore { prefix, span: rsp });
                    }
                    _ => {}
                }
            }
            Member::Checkpoint { rules, span: sp }
        }
        Rule::preprocess_member => {
            let mut targets = Vec::new();
            let mut source = None;
            for c in p.into_inner() {
                match c.as_rule() {
                    Rule::tuple_target => targets = c.into_inner().map(ident).collect(),
                    Rule::ident => targets = vec![ident(c)],
                    Rule::expr => source = Some(expr(c)?),
                    _ => {}
                }
            }
            Member::Preprocess {
                targets,
                source: source.ok_or_else(|| missing(sp))?,
                span: sp,
            }
        }
        _ => {
            return Err(ParseError {
                span: sp,
                message: "unexpected member".into(),
            })
        }
    })
}

fn assert_parts(p: Pair<Rule>) -> Result<(Expr, Option<String>), ParseError> {
    let sp = span(&p);
    let mut it = p.into_inner();
    let cond = expr(next(&mut it, sp)?)?;
    let message = it.next().map(string_value);
    Ok((cond, message))
}

fn string_value(p: Pair<Rule>) -> String {
    let raw = p.into_inner().next().map(|b| b.as_str()).unwrap_or("");
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn stmts(p: Pair<Rule>) -> Result<Vec<Stmt>, ParseError> {
    p.into_inner().map(stmt).collect()
}

fn stmt(p: Pair<Rule>) -> Result<Stmt, ParseError> {
    let sp = span(&p);
    Ok(match p.as_rule() {
        Rule::let_stmt => {
            let mut it = p.into_inner();
            let t = next(&mut it, sp)?;
            let target = match t.as_rule() {
                Rule::tuple_target => Target::Tuple(t.into_inner().map(ident).collect()),
                _ => Target::Name(ident(t)),
            };
            let value = expr(next(&mut it, sp)?)?;
            Stmt::Let {
                target,
                value,
                span: sp,
            }
        }
        Rule::assign_stmt => {
            let mut it = p.into_inner();
            let name = ident(next(&mut it, sp)?);
            let value = expr(next(&mut it, sp)?)?;
            Stmt::Assign {
                name,
                value,
                span: sp,
            }
        }
        Rule::return_stmt => Stmt::Return {
            value: expr(next(&mut p.into_inner(), sp)?)?,
            span: sp,
        },
        Rule::if_stmt => {
            let mut it = p.into_inner();
            let cond = expr(next(&mut it, sp)?)?;
            let then = stmts(next(&mut it, sp)?)?;
            let els = match it.next() {
                Some(e) if e.as_rule() == Rule::if_stmt => vec![stmt(e)?],
                Some(e) => stmts(e)?,
                None => Vec::new(),
            };
            Stmt::If {
                cond,
                then,
                els,
                span: sp,
            }
        }
        Rule::for_stmt => {
            let mut it = p.into_inner();
            let var = ident(next(&mut it, sp)?);
            let iter = expr(next(&mut it, sp)?)?;
            let body = stmts(next(&mut it, sp)?)?;
            Stmt::For {
                var,
                iter,
                body,
                span: sp,
            }
        }
        Rule::assert_stmt => {
            let (cond, message) = assert_parts(p)?;
            Stmt::Assert {
                cond,
                message,
                span: sp,
            }
        }
        _ => {
            return Err(ParseError {
                span: sp,
                message: "unexpected statement".into(),
            })
        }
    })
}

fn pratt() -> &'static PrattParser<Rule> {
    static P: OnceLock<PrattParser<Rule>> = OnceLock::new();
    P.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::range, Assoc::Left))
            .op(Op::infix(Rule::or, Assoc::Left))
            .op(Op::infix(Rule::and, Assoc::Left))
            .op(Op::infix(Rule::eq, Assoc::Left)
                | Op::infix(Rule::ne, Assoc::Left)
                | Op::infix(Rule::lt, Assoc::Left)
                | Op::infix(Rule::le, Assoc::Left)
                | Op::infix(Rule::gt, Assoc::Left)
                | Op::infix(Rule::ge, Assoc::Left))
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left)
                | Op::infix(Rule::div, Assoc::Left)
                | Op::infix(Rule::rem, Assoc::Left)
                | Op::infix(Rule::matmul, Assoc::Left))
            .op(Op::prefix(Rule::neg) | Op::prefix(Rule::not))
            .op(Op::postfix(Rule::call_args) | Op::postfix(Rule::index) | Op::postfix(Rule::field))
    })
}

/// Converts an `expr` pair.
fn expr(p: Pair<Rule>) -> Result<Expr, ParseError> {
    expr_d(p).map(|(e, _)| e)
}

/// An expression with the depth of its tree (a leaf is 1).
type Deep = Result<(Expr, usize), ParseError>;

/// `depth` when it is within [`MAX_EXPR_DEPTH`]; an error at `sp` otherwise. Checked as the
/// tree is built, so that no consumer (nor the drop of a rejected tree) recurses deeper.
fn within(depth: usize, sp: Span) -> Result<usize, ParseError> {
    match depth > MAX_EXPR_DEPTH {
        true => Err(ParseError {
            span: sp,
            message: format!(
                "expression nested too deep: more than {MAX_EXPR_DEPTH} levels of operators, \
                 calls and brackets (split it with `let`)"
            ),
        }),
        false => Ok(depth),
    }
}

/// Converts an `expr` pair, with the depth of its tree.
fn expr_d(p: Pair<Rule>) -> Deep {
    pratt()
        .map_primary(primary)
        .map_prefix(|op, rhs| {
            let (rhs, d) = rhs?;
            let d = within(d + 1, span(&op))?;
            let sp = span(&op).to(rhs.span);
            let op = if op.as_rule() == Rule::neg {
                UnaryOp::Neg
            } else {
                UnaryOp::Not
            };
            Ok((
                Expr {
                    kind: ExprKind::Unary {
                        op,
                        operand: Box::new(rhs),
                    },
                    span: sp,
                },
                d,
            ))
        })
        .map_infix(|lhs, op, rhs| {
            let ((lhs, dl), (rhs, dr)) = (lhs?, rhs?);
            let d = within(dl.max(dr) + 1, span(&op))?;
            let op = match op.as_rule() {
                Rule::range => BinOp::Range,
                Rule::or => BinOp::Or,
                Rule::and => BinOp::And,
                Rule::eq => BinOp::Eq,
                Rule::ne => BinOp::Ne,
                Rule::lt => BinOp::Lt,
                Rule::le => BinOp::Le,
                Rule::gt => BinOp::Gt,
                Rule::ge => BinOp::Ge,
                Rule::add => BinOp::Add,
                Rule::sub => BinOp::Sub,
                Rule::matmul => BinOp::MatMul,
                Rule::mul => BinOp::Mul,
                Rule::div => BinOp::Div,
                _ => BinOp::Rem,
            };
            let sp = lhs.span.to(rhs.span);
            Ok((
                Expr {
                    kind: ExprKind::Binary {
                        op,
                        lhs: Box::new(lhs),
                        rhs: Box::new(rhs),
                    },
                    span: sp,
                },
                d,
            ))
        })
        .map_postfix(|lhs, op| {
            let (lhs, dl) = lhs?;
            let op_span = span(&op);
            let sp = lhs.span.to(op_span);
            let mut d = dl;
            let kind = match op.as_rule() {
                Rule::call_args => {
                    let mut args = Vec::new();
                    for a in op.into_inner() {
                        let mut name = None;
                        let mut value = None;
                        for c in a.into_inner() {
                            match c.as_rule() {
                                Rule::ident => name = Some(ident(c)),
                                _ => {
                                    let (v, dv) = expr_d(c)?;
                                    d = d.max(dv);
                                    value = Some(v);
                                }
                            }
                        }
                        let value = value.ok_or_else(|| missing(sp))?;
                        args.push(Arg { name, value });
                    }
                    ExprKind::Call {
                        callee: Box::new(lhs),
                        args,
                    }
                }
                Rule::index => {
                    let mut items = Vec::new();
                    for it in op.into_inner() {
                        let isp = span(&it);
                        items.push(match it.as_rule() {
                            Rule::ellipsis => IndexItem::Ellipsis(isp),
                            Rule::slice => {
                                let mut parts = Vec::new();
                                for part in it.into_inner() {
                                    let part = match part.into_inner().next() {
                                        Some(e) => {
                                            let (v, dv) = expr_d(e)?;
                                            d = d.max(dv);
                                            Some(v)
                                        }
                                        None => None,
                                    };
                                    parts.push(part);
                                }
                                let mut parts = parts.into_iter();
                                IndexItem::Slice {
                                    start: parts.next().flatten(),
                                    end: parts.next().flatten(),
                                    step: parts.next().flatten(),
                                    span: isp,
                                }
                            }
                            _ => {
                                let (v, dv) = expr_d(it)?;
                                d = d.max(dv);
                                IndexItem::At(v)
                            }
                        });
                    }
                    ExprKind::Index {
                        base: Box::new(lhs),
                        items,
                    }
                }
                _ => {
                    let name = ident(next(&mut op.into_inner(), sp)?);
                    ExprKind::Field {
                        base: Box::new(lhs),
                        name,
                    }
                }
            };
            let d = within(d + 1, op_span)?;
            Ok((Expr { kind, span: sp }, d))
        })
        .parse(p.into_inner())
}

/// The expressions of `pairs`, with the deepest one's depth.
fn exprs_d<'i>(
    pairs: impl Iterator<Item = Pair<'i, Rule>>,
) -> Result<(Vec<Expr>, usize), ParseError> {
    let mut out = Vec::new();
    let mut depth = 0;
    for p in pairs {
        let (e, d) = expr_d(p)?;
        depth = depth.max(d);
        out.push(e);
    }
    Ok((out, depth))
}

fn primary(p: Pair<Rule>) -> Deep {
    let sp = span(&p);
    let (kind, depth) = match p.as_rule() {
        Rule::int => (
            ExprKind::Int(p.as_str().parse().map_err(|_| ParseError {
                span: sp,
                message: format!("integer literal `{}` is too large", p.as_str()),
            })?),
            0,
        ),
        Rule::float => (
            ExprKind::Float(p.as_str().parse().map_err(|_| ParseError {
                span: sp,
                message: format!("bad number `{}`", p.as_str()),
            })?),
            0,
        ),
        Rule::string => (ExprKind::Str(string_value(p)), 0),
        Rule::kw_true => (ExprKind::Bool(true), 0),
        Rule::kw_false => (ExprKind::Bool(false), 0),
        Rule::kw_none => (ExprKind::None, 0),
        Rule::ident => (ExprKind::Name(p.as_str().to_string()), 0),
        Rule::paren => {
            // `(a,)` is a one-element tuple; `(a)` is just `a`.
            let trailing_comma = p.as_str()[..p.as_str().len() - 1].trim_end().ends_with(',');
            let (mut es, d) = exprs_d(p.into_inner())?;
            if es.len() == 1 && !trailing_comma {
                let mut e = es.remove(0);
                e.span = sp;
                return Ok((e, d));
            }
            (ExprKind::Tuple(es), d)
        }
        Rule::list => {
            let mut inner: Vec<Pair<Rule>> = p.into_inner().collect();
            if inner.len() == 2 && inner[1].as_rule() == Rule::comprehension {
                let comp = inner.remove(1);
                let (elem, de) = expr_d(inner.remove(0))?;
                let mut it = comp.into_inner();
                let var = ident(next(&mut it, sp)?);
                let (iter, di) = expr_d(next(&mut it, sp)?)?;
                let filter = it.next().map(expr_d).transpose()?;
                let df = filter.as_ref().map_or(0, |f| f.1);
                (
                    ExprKind::Comprehension {
                        elem: Box::new(elem),
                        var,
                        iter: Box::new(iter),
                        filter: filter.map(|f| Box::new(f.0)),
                    },
                    de.max(di).max(df),
                )
            } else {
                let (es, d) = exprs_d(inner.into_iter())?;
                (ExprKind::List(es), d)
            }
        }
        Rule::expr => return expr_d(p),
        _ => {
            return Err(ParseError {
                span: sp,
                message: "unexpected expression".into(),
            })
        }
    };
    let depth = within(depth + 1, sp)?;
    Ok((Expr { kind, span: sp }, depth))
}

fn pattern(p: Pair<Rule>) -> Pattern {
    let sp = span(&p);
    let segs = p
        .into_inner()
        .map(|s| match s.as_rule() {
            Rule::pat_star => PatSeg::Star,
            Rule::pat_dstar => PatSeg::DoubleStar,
            Rule::pat_alt => PatSeg::Alt(s.into_inner().map(|n| n.as_str().to_string()).collect()),
            _ => PatSeg::Name(s.as_str().to_string()),
        })
        .collect();
    Pattern { segs, span: sp }
}

fn targets(p: Pair<Rule>) -> Vec<Pattern> {
    p.into_inner().map(pattern).collect()
}

fn adapter_decl(p: Pair<Rule>) -> Result<AdapterDecl, ParseError> {
    let sp = span(&p);
    let mut it = p.into_inner();
    let name = ident(next(&mut it, sp)?);
    let model = ident(next(&mut it, sp)?);
    let method = expr(next(&mut it, sp)?)?;
    let mut ts = Vec::new();
    for c in it {
        if c.as_rule() == Rule::targets {
            ts = targets(c);
        }
    }
    Ok(AdapterDecl {
        name,
        model,
        method,
        targets: ts,
        span: sp,
    })
}

fn trainer_decl(p: Pair<Rule>) -> Result<TrainerDecl, ParseError> {
    let sp = span(&p);
    let mut it = p.into_inner();
    let name = ident(next(&mut it, sp)?);
    let model = ident(next(&mut it, sp)?);
    let mut settings = Vec::new();
    for s in it {
        let ssp = span(&s);
        let inner = next(&mut s.into_inner(), ssp)?;
        let mut parts = inner.into_inner();
        let key = ident(next(&mut parts, ssp)?);
        let v = next(&mut parts, ssp)?;
        let value = match v.as_rule() {
            Rule::targets => SettingValue::Targets(targets(v)),
            _ => SettingValue::Expr(expr(v)?),
        };
        settings.push(Setting {
            key,
            value,
            span: ssp,
        });
    }
    Ok(TrainerDecl {
        name,
        model,
        settings,
        span: sp,
    })
}
