//! Type inference: the typing rule of every primitive op, as pure functions.
//!
//! [`infer`] computes the result type of an op from its operand types; [`check_source`] checks
//! the given type of an op without operands. Both are used when a node is inserted and again by
//! the verifier. Shapes are compared as polynomials, so `T + 1` after `slice` equals `1 + T`.

use super::dim::Dim;
use super::error::IrError;
use super::op::{BinaryOp, Dist, Op, UnaryOp};
use super::text::{float_text, is_ident};
use super::types::{DType, Shape, TensorType};

/// The result type of `op` applied to operands of the given types.
pub fn infer(op: &Op, operands: &[&TensorType]) -> Result<TensorType, IrError> {
    let rule = Rule {
        op,
        name: op.name(),
    };
    rule.arity(operands)?;
    let ty = match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Const { .. }
        | Op::Iota { .. }
        | Op::Random { .. } => {
            Err(rule
                .fail("is a source: its type is given at insertion, not inferred from operands"))
        }
        Op::Unary(unary) => rule.unary(*unary, operands[0]),
        Op::Binary(binary) => rule.binary(*binary, operands[0], operands[1]),
        Op::Select => rule.select(operands[0], operands[1], operands[2]),
        Op::Reduce { axis, .. } => rule.reduce(*axis, operands[0]),
        Op::MatMul => rule.matmul(operands[0], operands[1]),
        Op::Gather { axis } => rule.gather(*axis, operands[0], operands[1]),
        Op::ScatterAdd { axis, size } => rule.scatter_add(*axis, size, operands[0], operands[1]),
        Op::Reshape { shape } => rule.reshape(shape, operands[0]),
        Op::Permute { perm } => rule.permute(perm, operands[0]),
        Op::Expand { shape } => rule.expand(shape, operands[0]),
        Op::Slice {
            axis,
            start,
            end,
            step,
        } => rule.slice(*axis, start, end, *step, operands[0]),
        Op::Concat { axis } => rule.concat(*axis, operands),
        Op::Pad {
            axis,
            before,
            after,
            value,
        } => rule.pad(*axis, before, after, *value, operands[0]),
        Op::Cast { dtype } => Ok(TensorType::new(*dtype, operands[0].shape.clone())),
        Op::StopGradient => Ok(operands[0].clone()),
    }?;
    rule.countable(&ty)?;
    Ok(ty)
}

/// Checks the given type of a source op (input, param, const, iota, random).
pub fn check_source(op: &Op, ty: &TensorType) -> Result<(), IrError> {
    let rule = Rule {
        op,
        name: op.name(),
    };
    rule.given_shape(&ty.shape)?;
    rule.countable(ty)?;
    match op {
        Op::Input { name } if name.is_empty() => Err(rule.fail("the name is empty")),
        Op::Param { path, .. } if path.is_empty() => Err(rule.fail("the path is empty")),
        Op::Param { init, .. }
            if !is_ident(&init.name) || init.args.iter().any(|(key, _)| !is_ident(key)) =>
        {
            Err(rule.fail(format!("initialiser `{init}` must use identifier names")))
        }
        Op::Input { .. } | Op::Param { .. } => Ok(()),
        Op::Const { value } => rule.value_fits(*value, ty.dtype),
        Op::Iota { axis } => {
            rule.axis(*axis, ty)?;
            if !ty.dtype.is_numeric() {
                return Err(rule.fail(format!("produces indices, so needs i32 or float, not {ty}")));
            }
            Ok(())
        }
        Op::Random { dist, .. } => rule.random(dist, ty),
        _ => Err(rule.fail("has operands: insert it with `Graph::add`, not `add_source`")),
    }
}

/// The typing rules, with the op's name at hand for error messages.
struct Rule<'a> {
    op: &'a Op,
    name: &'static str,
}

type Infer = Result<TensorType, IrError>;

impl Rule<'_> {
    fn fail(&self, message: impl Into<String>) -> IrError {
        IrError::op(self.name, message)
    }

    fn arity(&self, operands: &[&TensorType]) -> Result<(), IrError> {
        let found = operands.len();
        match self.op.arity() {
            Some(n) if n != found => Err(self.fail(format!(
                "expected {n} operand{}, found {found}",
                if n == 1 { "" } else { "s" }
            ))),
            None if found == 0 => Err(self.fail("expected at least 1 operand, found 0")),
            _ => Ok(()),
        }
    }

    fn axis(&self, axis: usize, ty: &TensorType) -> Result<(), IrError> {
        if axis >= ty.rank() {
            return Err(self.fail(format!(
                "axis {axis} is out of range for {ty} (rank {})",
                ty.rank()
            )));
        }
        Ok(())
    }

    fn overflow(&self) -> IrError {
        self.fail("dimension arithmetic overflows i64")
    }

    /// The element count of a type fits in `i64` (sizes and memory are computed from it).
    fn countable(&self, ty: &TensorType) -> Result<(), IrError> {
        match ty.shape.numel() {
            Some(_) => Ok(()),
            None => Err(self.fail(format!(
                "{ty} has too many elements: the product of its dimensions overflows a 64-bit \
                 integer"
            ))),
        }
    }

    /// A shape written in the program (a source type or a reshape target) has no negative sizes.
    fn given_shape(&self, shape: &Shape) -> Result<(), IrError> {
        match shape.iter().find(|d| d.as_const().is_some_and(|c| c < 0)) {
            Some(dim) => Err(self.fail(format!("negative dimension {dim} in {shape}"))),
            None => Ok(()),
        }
    }

    /// A non-negative amount (pad widths).
    fn non_negative(&self, what: &str, dim: &Dim) -> Result<(), IrError> {
        match dim.as_const() {
            Some(c) if c < 0 => Err(self.fail(format!("{what} is negative ({dim})"))),
            _ => Ok(()),
        }
    }

    /// `value` is representable in `dtype` (constants and padding).
    fn value_fits(&self, value: f64, dtype: DType) -> Result<(), IrError> {
        let fits = match dtype {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => true,
            DType::I32 => {
                value.fract() == 0.0 && (i32::MIN as f64..=i32::MAX as f64).contains(&value)
            }
            DType::Bool => value == 0.0 || value == 1.0,
            DType::NF4 => false,
        };
        if !fits {
            let value = float_text(value);
            return Err(self.fail(format!("value {value} is not representable in {dtype}")));
        }
        Ok(())
    }

    fn random(&self, dist: &Dist, ty: &TensorType) -> Result<(), IrError> {
        let dtype_ok = match dist {
            Dist::Bernoulli { .. } => ty.dtype.is_float() || ty.dtype == DType::Bool,
            _ => ty.dtype.is_float(),
        };
        if !dtype_ok {
            return Err(self.fail(format!("{} cannot produce {ty}", dist.name())));
        }
        let params_ok = match *dist {
            Dist::Bernoulli { p } => (0.0..=1.0).contains(&p),
            Dist::Uniform { lo, hi } => lo.is_finite() && hi.is_finite() && lo <= hi,
            Dist::Normal { mean, std } => mean.is_finite() && std.is_finite() && std >= 0.0,
        };
        if !params_ok {
            return Err(self.fail(format!("invalid distribution {dist}")));
        }
        Ok(())
    }

    fn unary(&self, op: UnaryOp, x: &TensorType) -> Infer {
        let (ok, wanted) = match op {
            UnaryOp::Neg | UnaryOp::Abs => (x.dtype.is_numeric(), "a float or i32"),
            UnaryOp::Not => (x.dtype == DType::Bool, "a bool"),
            _ => (x.dtype.is_float(), "a float"),
        };
        if !ok {
            return Err(self.fail(format!("expected {wanted} operand, found {x}")));
        }
        Ok(x.clone())
    }

    fn binary(&self, op: BinaryOp, a: &TensorType, b: &TensorType) -> Infer {
        if a.dtype != b.dtype {
            return Err(self.fail(format!("element types differ: {a} vs {b}")));
        }
        if a.shape != b.shape {
            return Err(self.fail(format!(
                "shapes differ: {a} vs {b} (binary ops do not broadcast; expand first)"
            )));
        }
        let (ok, wanted) = match op {
            BinaryOp::And | BinaryOp::Or => (a.dtype == DType::Bool, "bool"),
            BinaryOp::Eq | BinaryOp::Ne => (a.dtype != DType::NF4, "comparable"),
            BinaryOp::Pow => (a.dtype.is_float(), "float"),
            _ => (a.dtype.is_numeric(), "float or i32"),
        };
        if !ok {
            return Err(self.fail(format!("expected {wanted} operands, found {a}")));
        }
        let dtype = if op.is_comparison() {
            DType::Bool
        } else {
            a.dtype
        };
        Ok(TensorType::new(dtype, a.shape.clone()))
    }

    fn select(&self, cond: &TensorType, a: &TensorType, b: &TensorType) -> Infer {
        if cond.dtype != DType::Bool {
            return Err(self.fail(format!("the condition must be bool, found {cond}")));
        }
        if a != b {
            return Err(self.fail(format!("branch types differ: {a} vs {b}")));
        }
        if cond.shape != a.shape {
            return Err(self.fail(format!(
                "condition {cond} and branches {a} differ in shape (expand first)"
            )));
        }
        Ok(a.clone())
    }

    fn reduce(&self, axis: usize, x: &TensorType) -> Infer {
        if !x.dtype.is_numeric() {
            return Err(self.fail(format!("expected a float or i32 operand, found {x}")));
        }
        self.axis(axis, x)?;
        let mut out = x.clone();
        out.shape[axis] = Dim::c(1);
        Ok(out)
    }

    fn matmul(&self, a: &TensorType, b: &TensorType) -> Infer {
        if !a.dtype.is_float() || !b.dtype.is_float() {
            return Err(self.fail(format!("expected float operands, found {a} @ {b}")));
        }
        if a.dtype != b.dtype {
            return Err(self.fail(format!("element types differ: {a} @ {b}")));
        }
        let (ra, rb) = (a.rank(), b.rank());
        if ra < 2 || rb < 2 {
            return Err(self.fail(format!("operands need rank >= 2: {a} @ {b}")));
        }
        let (k1, k2) = (&a.shape[ra - 1], &b.shape[rb - 2]);
        if k1 != k2 {
            return Err(self.fail(format!("inner dimensions differ: {a} @ {b} ({k1} vs {k2})")));
        }
        if ra != rb {
            return Err(self.fail(format!(
                "ranks differ: {a} @ {b} (batch dimensions must be identical; reshape or expand first)"
            )));
        }
        let (batch_a, batch_b) = (&a.shape[..ra - 2], &b.shape[..rb - 2]);
        if batch_a != batch_b {
            let (batch_a, batch_b) = (Shape(batch_a.to_vec()), Shape(batch_b.to_vec()));
            return Err(self.fail(format!(
                "batch dimensions differ: {a} @ {b} ({batch_a} vs {batch_b})"
            )));
        }
        let mut shape = a.shape.clone();
        shape[ra - 1] = b.shape[rb - 1].clone();
        Ok(TensorType::new(a.dtype, shape))
    }

    fn gather(&self, axis: usize, table: &TensorType, idx: &TensorType) -> Infer {
        if idx.dtype != DType::I32 {
            return Err(self.fail(format!("indices must be i32, found {idx}")));
        }
        self.axis(axis, table)?;
        let shape = table.shape[..axis]
            .iter()
            .chain(idx.shape.iter())
            .chain(&table.shape[axis + 1..])
            .cloned()
            .collect::<Shape>();
        Ok(TensorType::new(table.dtype, shape))
    }

    fn scatter_add(&self, axis: usize, size: &Dim, src: &TensorType, idx: &TensorType) -> Infer {
        if idx.dtype != DType::I32 {
            return Err(self.fail(format!("indices must be i32, found {idx}")));
        }
        let ir = idx.rank();
        if axis + ir > src.rank() || src.shape[axis..axis + ir] != idx.shape[..] {
            return Err(self.fail(format!(
                "{src} does not hold the indices {idx} at axis {axis}"
            )));
        }
        self.given_shape(&Shape(vec![size.clone()]))?;
        let shape = src.shape[..axis]
            .iter()
            .chain(std::iter::once(size))
            .chain(&src.shape[axis + ir..])
            .cloned()
            .collect::<Shape>();
        Ok(TensorType::new(src.dtype, shape))
    }

    fn reshape(&self, shape: &Shape, x: &TensorType) -> Infer {
        self.given_shape(shape)?;
        let from = x.shape.numel().ok_or_else(|| self.overflow())?;
        let to = shape.numel().ok_or_else(|| self.overflow())?;
        if from != to {
            return Err(self.fail(format!(
                "element counts differ: {x} has {from}, {shape} has {to}"
            )));
        }
        Ok(TensorType::new(x.dtype, shape.clone()))
    }

    fn permute(&self, perm: &[usize], x: &TensorType) -> Infer {
        let mut seen = vec![false; x.rank()];
        let is_permutation = perm.len() == x.rank()
            && perm
                .iter()
                .all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
        if !is_permutation {
            return Err(self.fail(format!(
                "{perm:?} is not a permutation of 0..{} for {x}",
                x.rank()
            )));
        }
        let shape = perm.iter().map(|&p| x.shape[p].clone()).collect::<Shape>();
        Ok(TensorType::new(x.dtype, shape))
    }

    fn expand(&self, shape: &Shape, x: &TensorType) -> Infer {
        self.given_shape(shape)?;
        if shape.rank() != x.rank() {
            return Err(self.fail(format!(
                "target {shape} has rank {}, but {x} has rank {} (reshape first)",
                shape.rank(),
                x.rank()
            )));
        }
        for (axis, (from, to)) in x.shape.iter().zip(shape.iter()).enumerate() {
            if from != to && from.as_const() != Some(1) {
                return Err(self.fail(format!(
                    "cannot expand {x} to {shape}: axis {axis} is {from}, neither 1 nor {to}"
                )));
            }
        }
        Ok(TensorType::new(x.dtype, shape.clone()))
    }

    fn slice(&self, axis: usize, start: &Dim, end: &Dim, step: i64, x: &TensorType) -> Infer {
        self.axis(axis, x)?;
        if step < 1 {
            return Err(self.fail(format!("step must be at least 1, found {step}")));
        }
        let size = &x.shape[axis];
        if start.as_const().is_some_and(|s| s < 0) {
            return Err(self.fail(format!("start {start} is negative")));
        }
        if end.const_diff(start).is_some_and(|len| len < 0) {
            return Err(self.fail(format!("start {start} is past end {end}")));
        }
        if size.const_diff(end).is_some_and(|room| room < 0) {
            return Err(self.fail(format!(
                "end {end} is past the size {size} of axis {axis} of {x}"
            )));
        }
        let len = end.checked_sub(start).ok_or_else(|| self.overflow())?;
        let out_len = match len.as_const() {
            _ if step == 1 => len,
            // ceil(len / step) for len >= 0, which the check above established.
            Some(n) => Dim::c(n / step + i64::from(n % step != 0)),
            None => len.div_exact(&Dim::c(step)).ok_or_else(|| {
                self.fail(format!(
                    "the length {len} of {start}..{end} is not a known multiple of step {step}"
                ))
            })?,
        };
        let mut out = x.clone();
        out.shape[axis] = out_len;
        Ok(out)
    }

    fn concat(&self, axis: usize, operands: &[&TensorType]) -> Infer {
        let first = operands[0];
        self.axis(axis, first)?;
        let mut total = Dim::c(0);
        for (i, x) in operands.iter().enumerate() {
            let same_elsewhere = x.dtype == first.dtype
                && x.rank() == first.rank()
                && (0..x.rank()).all(|a| a == axis || x.shape[a] == first.shape[a]);
            if !same_elsewhere {
                return Err(self.fail(format!(
                    "operand {i} is {x}, which does not match operand 0 {first} outside axis {axis}"
                )));
            }
            total = total
                .checked_add(&x.shape[axis])
                .ok_or_else(|| self.overflow())?;
        }
        let mut out = first.clone();
        out.shape[axis] = total;
        Ok(out)
    }

    fn pad(&self, axis: usize, before: &Dim, after: &Dim, value: f64, x: &TensorType) -> Infer {
        self.axis(axis, x)?;
        self.non_negative("before", before)?;
        self.non_negative("after", after)?;
        self.value_fits(value, x.dtype)?;
        let size = x.shape[axis]
            .checked_add(before)
            .and_then(|d| d.checked_add(after))
            .ok_or_else(|| self.overflow())?;
        let mut out = x.clone();
        out.shape[axis] = size;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
