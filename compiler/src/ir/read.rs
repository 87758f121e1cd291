//! The reader of the IR text form (see [`super::text`]), by hand: a cursor over each line and
//! one small function per construct.
//!
//! The graph is rebuilt through [`Graph::add_source`] and [`Graph::add`], so every node is type
//! checked again and a wrong type annotation is an error naming the line and both types. Nodes
//! may be numbered freely as long as each value is defined before it is used.

use std::collections::HashMap;

use super::dim::{parse_prefix, Dim};
use super::graph::{Graph, NodeId};
use super::op::{BinaryOp, Dist, Init, Op, ReduceOp, UnaryOp};
use super::text::is_scope_char;
use super::types::{DType, Shape, TensorType};

/// An error in IR text, at a 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {message}")]
pub struct ReadError {
    /// The line, from 1.
    pub line: usize,
    /// The column in characters, from 1.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

type Result<T> = std::result::Result<T, ReadError>;

/// Reads a graph from its text form.
pub fn read(text: &str) -> Result<Graph> {
    let mut lines = text.lines().enumerate().filter(|(_, line)| {
        let line = line.trim_start();
        !line.is_empty() && !line.starts_with(';')
    });
    let Some((index, header)) = lines.next() else {
        return Err(ReadError {
            line: 1,
            col: 1,
            message: "expected `graph NAME`, found an empty text".to_string(),
        });
    };
    let mut c = Cursor::new(header, index + 1, &[]);
    c.keyword("graph")?;
    let name = c.name()?;
    c.end()?;
    let mut reader = Reader {
        graph: Graph::new(&name),
        values: HashMap::new(),
    };
    let mut dims: Vec<String> = Vec::new();
    for (index, line) in lines {
        let mut c = Cursor::new(line, index + 1, &dims);
        if let Some(declared) = reader.statement(&mut c)? {
            dims = declared;
        }
    }
    Ok(reader.graph)
}

/// The graph read so far.
struct Reader {
    graph: Graph,
    /// Value numbers as written (`%12`) to nodes.
    values: HashMap<u64, NodeId>,
}

impl Reader {
    /// Reads one line after the header; returns the dimensions when it declares them.
    fn statement(&mut self, c: &mut Cursor) -> Result<Option<Vec<String>>> {
        let start = c.peek_pos();
        if c.rest().starts_with('%') {
            self.node(c)?;
            return Ok(None);
        }
        let word = c
            .ident()
            .map_err(|_| c.expected("`%N = …`, `output` or `dims`"))?;
        match word {
            "dims" => {
                if !self.graph.is_empty() || !self.graph.dims.is_empty() {
                    return Err(c.error(start, "`dims` must come once, right after `graph`"));
                }
                let dims = read_dims(c)?;
                self.graph.dims = dims.clone();
                Ok(Some(dims))
            }
            "output" => {
                let name = c.string()?;
                c.expect("=")?;
                let at = c.peek_pos();
                let id = self.value(c)?;
                c.end()?;
                self.graph
                    .set_output(&name, id)
                    .map_err(|e| c.error(at, e.to_string()))?;
                Ok(None)
            }
            word => Err(c.error(
                start,
                format!("expected `%N = …`, `output` or `dims`, found `{word}`"),
            )),
        }
    }

    /// `%N = op(operands) attrs : type @scope`.
    fn node(&mut self, c: &mut Cursor) -> Result<()> {
        let label_at = c.peek_pos();
        c.expect("%")?;
        let label = c.uint::<u64>()?;
        if self.values.contains_key(&label) {
            return Err(c.error(label_at, format!("%{label} is defined twice")));
        }
        c.expect("=")?;
        let op_at = c.peek_pos();
        let name = c.ident()?.to_string();
        let (op, operands) = match source_op(c, &name)? {
            Some(op) => (op, None),
            None => {
                let operands = self.operands(c)?;
                let op = operand_op(c, &name, op_at)?;
                (op, Some(operands))
            }
        };
        c.expect(":")?;
        let ty_at = c.peek_pos();
        let ty = c.ty()?;
        let scope = if c.eat("@") {
            c.scope()?
        } else {
            String::new()
        };
        c.end()?;
        let graph = &mut self.graph;
        let id = match operands {
            None => graph.add_source(op, ty.clone(), &scope),
            Some(operands) => graph.add(op, &operands, &scope),
        }
        .map_err(|e| c.error(op_at, e.to_string()))?;
        let inferred = &graph.node(id).ty;
        if *inferred != ty {
            return Err(c.error(
                ty_at,
                format!("type annotation {ty} does not match the inferred type {inferred}"),
            ));
        }
        self.values.insert(label, id);
        Ok(())
    }

    /// `(%a, %b, …)`.
    fn operands(&self, c: &mut Cursor) -> Result<Vec<NodeId>> {
        c.expect("(")?;
        let mut operands = Vec::new();
        if c.eat(")") {
            return Ok(operands);
        }
        loop {
            operands.push(self.value(c)?);
            if c.eat(")") {
                return Ok(operands);
            }
            c.expect(",")?;
        }
    }

    /// `%N`, a value defined on an earlier line.
    fn value(&self, c: &mut Cursor) -> Result<NodeId> {
        let at = c.peek_pos();
        c.expect("%")?;
        let label = c.uint::<u64>()?;
        self.values
            .get(&label)
            .copied()
            .ok_or_else(|| c.error(at, format!("%{label} is used before it is defined")))
    }
}

/// `dims B, T`, after the keyword.
fn read_dims(c: &mut Cursor) -> Result<Vec<String>> {
    let mut dims: Vec<String> = Vec::new();
    loop {
        let at = c.peek_pos();
        let name = c.ident()?.to_string();
        if dims.contains(&name) {
            return Err(c.error(at, format!("dimension `{name}` is declared twice")));
        }
        dims.push(name);
        if !c.eat(",") {
            break;
        }
    }
    c.end()?;
    Ok(dims)
}

/// The attributes of a source op named `name`, or `None` when `name` is not a source op.
fn source_op(c: &mut Cursor, name: &str) -> Result<Option<Op>> {
    let op = match name {
        "input" => Op::Input { name: c.string()? },
        "param" => {
            let path = c.string()?;
            c.key("init")?;
            let init = init(c)?;
            Op::Param { path, init }
        }
        "const" => {
            c.key("value")?;
            Op::Const { value: c.float()? }
        }
        "iota" => {
            c.key("axis")?;
            Op::Iota { axis: c.uint()? }
        }
        "random" => {
            c.key("dist")?;
            let dist = dist(c)?;
            c.key("seed")?;
            Op::Random {
                dist,
                seed: c.uint()?,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(op))
}

/// The attributes of the operand-taking op named `name` (at `at`), read after its operands.
fn operand_op(c: &mut Cursor, name: &str, at: usize) -> Result<Op> {
    if let Some(&op) = UnaryOp::ALL.iter().find(|op| op.name() == name) {
        return Ok(Op::Unary(op));
    }
    if let Some(&op) = BinaryOp::ALL.iter().find(|op| op.name() == name) {
        return Ok(Op::Binary(op));
    }
    let op = match name {
        "select" => Op::Select,
        "matmul" => Op::MatMul,
        "reduce_sum" | "reduce_max" => {
            let op = if name == "reduce_sum" {
                ReduceOp::Sum
            } else {
                ReduceOp::Max
            };
            c.key("axis")?;
            Op::Reduce {
                op,
                axis: c.uint()?,
            }
        }
        "gather" => {
            c.key("axis")?;
            Op::Gather { axis: c.uint()? }
        }
        "scatter_add" => {
            c.key("axis")?;
            let axis = c.uint()?;
            c.key("size")?;
            Op::ScatterAdd {
                axis,
                size: c.dim()?,
            }
        }
        "reshape" => {
            c.key("shape")?;
            Op::Reshape { shape: c.shape()? }
        }
        "expand" => {
            c.key("shape")?;
            Op::Expand { shape: c.shape()? }
        }
        "permute" => {
            c.key("perm")?;
            Op::Permute {
                perm: c.uint_list()?,
            }
        }
        "slice" => {
            c.key("axis")?;
            let axis = c.uint()?;
            c.key("start")?;
            let start = c.dim()?;
            c.key("end")?;
            let end = c.dim()?;
            c.key("step")?;
            Op::Slice {
                axis,
                start,
                end,
                step: c.int()?,
            }
        }
        "concat" => {
            c.key("axis")?;
            Op::Concat { axis: c.uint()? }
        }
        "pad" => {
            c.key("axis")?;
            let axis = c.uint()?;
            c.key("before")?;
            let before = c.dim()?;
            c.key("after")?;
            let after = c.dim()?;
            c.key("value")?;
            Op::Pad {
                axis,
                before,
                after,
                value: c.float()?,
            }
        }
        "stop_gradient" => Op::StopGradient,
        "cast" => {
            c.key("dtype")?;
            Op::Cast { dtype: c.dtype()? }
        }
        _ => return Err(c.error(at, format!("unknown op `{name}`"))),
    };
    Ok(op)
}

/// `normal(std=0.02)` or `zeros`.
fn init(c: &mut Cursor) -> Result<Init> {
    let name = c.ident()?.to_string();
    let args = if c.rest().starts_with('(') {
        call_args(c)?
    } else {
        Vec::new()
    };
    let args = args.into_iter().map(|(k, v, _)| (k, v)).collect();
    Ok(Init { name, args })
}

/// `uniform(lo=…, hi=…)`, `normal(mean=…, std=…)` or `bernoulli(p=…)`.
fn dist(c: &mut Cursor) -> Result<Dist> {
    let at = c.peek_pos();
    let name = c.ident()?.to_string();
    let args = call_args(c)?;
    let keys: Vec<&str> = args.iter().map(|(k, _, _)| k.as_str()).collect();
    let value = |i: usize| args[i].1;
    match (name.as_str(), keys.as_slice()) {
        ("uniform", ["lo", "hi"]) => Ok(Dist::Uniform {
            lo: value(0),
            hi: value(1),
        }),
        ("normal", ["mean", "std"]) => Ok(Dist::Normal {
            mean: value(0),
            std: value(1),
        }),
        ("bernoulli", ["p"]) => Ok(Dist::Bernoulli { p: value(0) }),
        _ => Err(c.error(
            at,
            "expected uniform(lo=…, hi=…), normal(mean=…, std=…) or bernoulli(p=…)",
        )),
    }
}

/// `(key=float, …)`, with the position of each key.
fn call_args(c: &mut Cursor) -> Result<Vec<(String, f64, usize)>> {
    c.expect("(")?;
    let mut args = Vec::new();
    if c.eat(")") {
        return Ok(args);
    }
    loop {
        let at = c.peek_pos();
        let key = c.ident()?.to_string();
        c.expect("=")?;
        args.push((key, c.float()?, at));
        if c.eat(")") {
            return Ok(args);
        }
        c.expect(",")?;
    }
}

/// A position in one line, with the declared dimensions for checking shapes.
struct Cursor<'a> {
    line: &'a str,
    /// Byte offset into `line`.
    pos: usize,
    line_no: usize,
    dims: &'a [String],
}

impl<'a> Cursor<'a> {
    fn new(line: &'a str, line_no: usize, dims: &'a [String]) -> Cursor<'a> {
        Cursor {
            line,
            pos: 0,
            line_no,
            dims,
        }
    }

    /// An error at byte offset `at` of this line.
    fn error(&self, at: usize, message: impl Into<String>) -> ReadError {
        let at = at.min(self.line.len());
        let col = self.line.get(..at).map_or(at, |s| s.chars().count()) + 1;
        ReadError {
            line: self.line_no,
            col,
            message: message.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.line[self.pos..]
    }

    fn skip_spaces(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start_matches([' ', '\t']).len();
    }

    /// The position of the next token.
    fn peek_pos(&mut self) -> usize {
        self.skip_spaces();
        self.pos
    }

    /// A description of the next token, for "expected X, found Y" messages.
    fn found(&mut self) -> String {
        self.skip_spaces();
        let token: Vec<char> = self
            .rest()
            .chars()
            .take_while(|c| !c.is_whitespace())
            .take(13)
            .collect();
        match token.len() {
            0 => "the end of the line".to_string(),
            13 => format!("`{}…`", token[..12].iter().collect::<String>()),
            _ => format!("`{}`", token.iter().collect::<String>()),
        }
    }

    fn expected(&mut self, what: &str) -> ReadError {
        let found = self.found();
        self.error(self.pos, format!("expected {what}, found {found}"))
    }

    /// Consumes `token` if it comes next.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_spaces();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<()> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{token}`")))
        }
    }

    /// Nothing but spaces remains.
    fn end(&mut self) -> Result<()> {
        self.skip_spaces();
        if self.rest().is_empty() {
            Ok(())
        } else {
            Err(self.expected("the end of the line"))
        }
    }

    fn ident(&mut self) -> Result<&'a str> {
        self.skip_spaces();
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if len == 0 || rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(self.expected("a name"));
        }
        self.pos += len;
        Ok(&rest[..len])
    }

    fn keyword(&mut self, word: &str) -> Result<()> {
        let at = self.peek_pos();
        match self.ident() {
            Ok(found) if found == word => Ok(()),
            _ => {
                self.pos = at;
                Err(self.expected(&format!("`{word}`")))
            }
        }
    }

    /// `key=`.
    fn key(&mut self, key: &str) -> Result<()> {
        let at = self.peek_pos();
        match self.ident() {
            Ok(found) if found == key => self.expect("="),
            _ => {
                self.pos = at;
                Err(self.expected(&format!("`{key}=`")))
            }
        }
    }

    /// A quoted string with `\"`, `\\`, `\n`, `\r`, `\t` escapes.
    fn string(&mut self) -> Result<String> {
        let start = self.peek_pos();
        if !self.rest().starts_with('"') {
            return Err(self.expected("a quoted string"));
        }
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, ch)) = chars.next() {
            match ch {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    _ => return Err(self.error(start + i, "unknown escape in string")),
                },
                ch => out.push(ch),
            }
        }
        Err(self.error(start, "unterminated string"))
    }

    /// The graph name: an identifier or a quoted string.
    fn name(&mut self) -> Result<String> {
        self.skip_spaces();
        if self.rest().starts_with('"') {
            self.string()
        } else {
            self.ident().map(str::to_string)
        }
    }

    /// A scope path after `@`: bare (`vision.layers.0`) or quoted.
    fn scope(&mut self) -> Result<String> {
        self.skip_spaces();
        if self.rest().starts_with('"') {
            return self.string();
        }
        let rest = self.rest();
        let len = rest.find(|c| !is_scope_char(c)).unwrap_or(rest.len());
        if len == 0 {
            return Err(self.expected("a scope path"));
        }
        self.pos += len;
        Ok(rest[..len].to_string())
    }

    /// An unsigned integer such as an axis or a seed.
    fn uint<T: std::str::FromStr>(&mut self) -> Result<T> {
        self.skip_spaces();
        let rest = self.rest();
        let len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let value = rest[..len]
            .parse()
            .map_err(|_| self.expected("an unsigned integer"))?;
        self.pos += len;
        Ok(value)
    }

    /// A signed integer.
    fn int(&mut self) -> Result<i64> {
        let at = self.peek_pos();
        let negative = self.eat("-");
        let magnitude = self.uint::<i64>().inspect_err(|_| self.pos = at)?;
        Ok(if negative { -magnitude } else { magnitude })
    }

    /// A float: digits with optional fraction and exponent, or `inf`, `-inf`, `nan`.
    fn float(&mut self) -> Result<f64> {
        let at = self.peek_pos();
        let bytes = self.rest().as_bytes();
        let mut len = 0;
        while len < bytes.len() {
            let b = bytes[len];
            let sign_ok = len == 0 || matches!(bytes[len - 1], b'e' | b'E');
            if b.is_ascii_alphanumeric() || b == b'.' || (matches!(b, b'-' | b'+') && sign_ok) {
                len += 1;
            } else {
                break;
            }
        }
        let text = &self.rest()[..len];
        let value = text
            .parse::<f64>()
            .map_err(|_| self.error(at, format!("expected a number, found `{text}`")))?;
        self.pos += len;
        Ok(value)
    }

    /// A list of unsigned integers: `[0, 2, 1]`.
    fn uint_list(&mut self) -> Result<Vec<usize>> {
        self.expect("[")?;
        let mut out = Vec::new();
        if self.eat("]") {
            return Ok(out);
        }
        loop {
            out.push(self.uint()?);
            if self.eat("]") {
                return Ok(out);
            }
            self.expect(",")?;
        }
    }

    /// A dimension expression whose symbols are all declared.
    fn dim(&mut self) -> Result<Dim> {
        let at = self.peek_pos();
        let (dim, len) =
            parse_prefix(self.rest()).map_err(|(offset, msg)| self.error(at + offset, msg))?;
        if let Some(sym) = dim
            .symbols()
            .into_iter()
            .find(|s| !self.dims.iter().any(|d| d == s))
        {
            let is_word_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
            let expr = &self.rest()[..len];
            let whole_word = expr.match_indices(sym).find(|&(i, _)| {
                !expr[..i].ends_with(is_word_char)
                    && !expr[i + sym.len()..].starts_with(is_word_char)
            });
            let sym_at = whole_word.map_or(at, |(offset, _)| at + offset);
            return Err(self.error(
                sym_at,
                format!("dimension `{sym}` is not declared on the `dims` line"),
            ));
        }
        self.pos += len;
        Ok(dim)
    }

    /// `[d, d, …]`.
    fn shape(&mut self) -> Result<Shape> {
        self.expect("[")?;
        let mut shape = Shape::scalar();
        if self.eat("]") {
            return Ok(shape);
        }
        loop {
            shape.push(self.dim()?);
            if self.eat("]") {
                return Ok(shape);
            }
            if !self.eat(",") {
                return Err(self.expected("`,` or `]`"));
            }
        }
    }

    fn dtype(&mut self) -> Result<DType> {
        let at = self.peek_pos();
        let name = self.ident()?;
        DType::parse_ir(name).ok_or_else(|| {
            self.error(
                at,
                format!("unknown element type `{name}` (f32, f16, bf16, i32, bool, nf4, f64)"),
            )
        })
    }

    /// `dtype[dims]`.
    fn ty(&mut self) -> Result<TensorType> {
        let dtype = self.dtype()?;
        if !self.rest().starts_with('[') {
            return Err(self.expected("`[` right after the element type"));
        }
        Ok(TensorType::new(dtype, self.shape()?))
    }
}

#[cfg(test)]
mod tests;
