//! Scalar and vector arithmetic: the IR's unary and binary ops, casts and dtype rounding on
//! Cranelift values (f32 / i32 / bool as i8 in scalar code; f32x4 / i32x4 / i32x4 lane masks
//! in vector code). Ops without a vector instruction run lane by lane.

use super::codegen::{is_float, Cg, R};
use super::math::Poly;
use super::CpuError;
use crate::ir::{BinaryOp, DType, UnaryOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, Value};

impl Cg<'_, '_> {
    pub(super) fn unary_scalar(&mut self, op: UnaryOp, d: DType, x: Value) -> R<Value> {
        if d == DType::I32 {
            return Ok(match op {
                UnaryOp::Neg => self.b.ins().ineg(x),
                UnaryOp::Abs => self.b.ins().iabs(x),
                _ => return Err(CpuError::new(format!("`{}` of i32", op.name()))),
            });
        }
        if d == DType::Bool {
            return match op {
                UnaryOp::Not => Ok(self.b.ins().bxor_imm_s(x, 1)),
                _ => Err(CpuError::new(format!("`{}` of bool", op.name()))),
            };
        }
        let r = match op {
            UnaryOp::Neg => self.b.ins().fneg(x),
            UnaryOp::Abs => self.b.ins().fabs(x),
            UnaryOp::Sqrt => self.b.ins().sqrt(x),
            UnaryOp::Rsqrt => {
                let s = self.b.ins().sqrt(x);
                let one = self.b.ins().f32const(1.0);
                self.b.ins().fdiv(one, s)
            }
            UnaryOp::Recip => {
                let one = self.b.ins().f32const(1.0);
                self.b.ins().fdiv(one, x)
            }
            UnaryOp::Floor => self.b.ins().floor(x),
            UnaryOp::Exp | UnaryOp::Erf | UnaryOp::Tanh => self.poly(op, x, false),
            UnaryOp::Log => self.call("vlmc_log", &[x])?,
            UnaryOp::Sin => self.call("vlmc_sin", &[x])?,
            UnaryOp::Cos => self.call("vlmc_cos", &[x])?,
            UnaryOp::Not => return Err(CpuError::new("`not` of a float")),
        };
        self.round_scalar(d, r)
    }

    pub(super) fn poly(&mut self, op: UnaryOp, x: Value, vec: bool) -> Value {
        let mut p = Poly {
            b: &mut self.b,
            ty: if vec { types::F32X4 } else { types::F32 },
            fma: self.fma,
        };
        match op {
            UnaryOp::Exp => p.exp(x),
            UnaryOp::Erf => p.erf(x),
            _ => p.tanh(x),
        }
    }

    pub(super) fn binary_scalar(
        &mut self,
        op: BinaryOp,
        rd: DType,
        od: DType,
        x: Value,
        y: Value,
    ) -> R<Value> {
        use BinaryOp::*;
        if op.is_comparison() {
            return Ok(if is_float(od) {
                let cc = match op {
                    Eq => FloatCC::Equal,
                    Ne => FloatCC::NotEqual,
                    Lt => FloatCC::LessThan,
                    Le => FloatCC::LessThanOrEqual,
                    Gt => FloatCC::GreaterThan,
                    _ => FloatCC::GreaterThanOrEqual,
                };
                self.b.ins().fcmp(cc, x, y)
            } else {
                let cc = match op {
                    Eq => IntCC::Equal,
                    Ne => IntCC::NotEqual,
                    Lt => IntCC::SignedLessThan,
                    Le => IntCC::SignedLessThanOrEqual,
                    Gt => IntCC::SignedGreaterThan,
                    _ => IntCC::SignedGreaterThanOrEqual,
                };
                self.b.ins().icmp(cc, x, y)
            });
        }
        match od {
            DType::Bool => Ok(match op {
                And => self.b.ins().band(x, y),
                Or => self.b.ins().bor(x, y),
                _ => return Err(CpuError::new(format!("`{}` of bools", op.name()))),
            }),
            DType::I32 => Ok(match op {
                Add => self.b.ins().iadd(x, y),
                Sub => self.b.ins().isub(x, y),
                Mul => self.b.ins().imul(x, y),
                Max => self.b.ins().smax(x, y),
                Min => self.b.ins().smin(x, y),
                Div | Mod => self.int_divmod(op == Div, x, y),
                _ => return Err(CpuError::new(format!("`{}` of i32", op.name()))),
            }),
            _ => {
                let r = match op {
                    Add => self.b.ins().fadd(x, y),
                    Sub => self.b.ins().fsub(x, y),
                    Mul => self.b.ins().fmul(x, y),
                    Div => self.b.ins().fdiv(x, y),
                    Max => self.b.ins().fmax(x, y),
                    Min => self.b.ins().fmin(x, y),
                    Pow => self.call("vlmc_pow", &[x, y])?,
                    Mod => {
                        let q = self.b.ins().fdiv(x, y);
                        let q = self.b.ins().floor(q);
                        let p = self.b.ins().fmul(y, q);
                        self.b.ins().fsub(x, p)
                    }
                    _ => return Err(CpuError::new(format!("`{}` of floats", op.name()))),
                };
                self.round_scalar(rd, r)
            }
        }
    }

    /// Floor division or remainder of i32 scalars (division by zero sets the error flag).
    pub(super) fn int_divmod(&mut self, div: bool, x: Value, y: Value) -> Value {
        let zero = self.b.ins().icmp_imm_s(IntCC::Equal, y, 0);
        let e = self.b.use_var(self.err);
        let z32 = self.b.ins().uextend(types::I32, zero);
        let z32 = self.b.ins().ishl_imm_s(z32, 1);
        let e = self.b.ins().bor(e, z32);
        self.b.def_var(self.err, e);
        // Divisors 0 and -1 become 1 (no trap); -1 is fixed up after.
        let minus1 = self.b.ins().icmp_imm_s(IntCC::Equal, y, -1);
        let unsafe_ = self.b.ins().bor(zero, minus1);
        let one = self.b.ins().iconst(types::I32, 1);
        let ys = self.b.ins().select(unsafe_, one, y);
        let q = self.b.ins().sdiv(x, ys);
        let r = self.b.ins().srem(x, ys);
        // Floor: subtract one when the remainder's sign differs from the divisor's.
        let rnz = self.b.ins().icmp_imm_s(IntCC::NotEqual, r, 0);
        let rneg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, r, 0);
        let yneg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, ys, 0);
        let diff = self.b.ins().bxor(rneg, yneg);
        let adj = self.b.ins().band(rnz, diff);
        let adj = self.b.ins().uextend(types::I32, adj);
        let qf = self.b.ins().isub(q, adj);
        let negx = self.b.ins().ineg(x);
        let zero32 = self.b.ins().iconst(types::I32, 0);
        if div {
            self.b.ins().select(minus1, negx, qf)
        } else {
            let p = self.b.ins().imul(qf, ys);
            let m = self.b.ins().isub(x, p);
            self.b.ins().select(minus1, zero32, m)
        }
    }

    pub(super) fn cast_scalar(&mut self, to: DType, from: DType, x: Value) -> R<Value> {
        Ok(match (from, to) {
            (f, t) if f == t => x,
            (f, t) if is_float(f) && is_float(t) => self.round_scalar(t, x)?,
            (f, DType::I32) if is_float(f) => self.b.ins().fcvt_to_sint_sat(types::I32, x),
            (f, DType::Bool) if is_float(f) => {
                let z = self.b.ins().f32const(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, x, z)
            }
            (DType::I32, t) if is_float(t) => {
                let f = self.b.ins().fcvt_from_sint(types::F32, x);
                self.round_scalar(t, f)?
            }
            (DType::I32, DType::Bool) => self.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0),
            (DType::Bool, DType::I32) => self.b.ins().uextend(types::I32, x),
            (DType::Bool, t) if is_float(t) => {
                let one = self.b.ins().f32const(1.0);
                let zero = self.b.ins().f32const(0.0);
                self.b.ins().select(x, one, zero)
            }
            (f, t) => return Err(CpuError::new(format!("casts from {f} to {t}"))),
        })
    }

    pub(super) fn unary_vector(&mut self, op: UnaryOp, d: DType, x: Value) -> R<Value> {
        let native = match (op, d) {
            (UnaryOp::Neg, DType::I32) => Some(self.b.ins().ineg(x)),
            (UnaryOp::Abs, DType::I32) => Some(self.b.ins().iabs(x)),
            (UnaryOp::Not, DType::Bool) => Some(self.b.ins().bnot(x)),
            (_, d) if !is_float(d) => None,
            (UnaryOp::Neg, _) => Some(self.b.ins().fneg(x)),
            (UnaryOp::Abs, _) => Some(self.b.ins().fabs(x)),
            (UnaryOp::Sqrt, _) => Some(self.b.ins().sqrt(x)),
            (UnaryOp::Rsqrt, _) => {
                let s = self.b.ins().sqrt(x);
                let one = self.b.ins().f32const(1.0);
                let one = self.b.ins().splat(types::F32X4, one);
                Some(self.b.ins().fdiv(one, s))
            }
            (UnaryOp::Recip, _) => {
                let one = self.b.ins().f32const(1.0);
                let one = self.b.ins().splat(types::F32X4, one);
                Some(self.b.ins().fdiv(one, x))
            }
            (UnaryOp::Floor, _) => Some(self.b.ins().floor(x)),
            (UnaryOp::Exp | UnaryOp::Erf | UnaryOp::Tanh, _) => Some(self.poly(op, x, true)),
            _ => None,
        };
        match native {
            Some(r) => self.round(d, r, true),
            None => self.lanewise(d, &[(x, d)], &mut |cg, xs| cg.unary_scalar(op, d, xs[0])),
        }
    }

    pub(super) fn binary_vector(
        &mut self,
        op: BinaryOp,
        rd: DType,
        od: DType,
        x: Value,
        y: Value,
    ) -> R<Value> {
        use BinaryOp::*;
        let native = if op.is_comparison() {
            if is_float(od) {
                let cc = match op {
                    Eq => FloatCC::Equal,
                    Ne => FloatCC::NotEqual,
                    Lt => FloatCC::LessThan,
                    Le => FloatCC::LessThanOrEqual,
                    Gt => FloatCC::GreaterThan,
                    _ => FloatCC::GreaterThanOrEqual,
                };
                Some(self.b.ins().fcmp(cc, x, y))
            } else if od == DType::I32 || matches!(op, Eq | Ne) {
                let cc = match op {
                    Eq => IntCC::Equal,
                    Ne => IntCC::NotEqual,
                    Lt => IntCC::SignedLessThan,
                    Le => IntCC::SignedLessThanOrEqual,
                    Gt => IntCC::SignedGreaterThan,
                    _ => IntCC::SignedGreaterThanOrEqual,
                };
                Some(self.b.ins().icmp(cc, x, y))
            } else {
                None
            }
        } else {
            match od {
                DType::Bool => match op {
                    And => Some(self.b.ins().band(x, y)),
                    Or => Some(self.b.ins().bor(x, y)),
                    _ => None,
                },
                DType::I32 => match op {
                    Add => Some(self.b.ins().iadd(x, y)),
                    Sub => Some(self.b.ins().isub(x, y)),
                    Mul => Some(self.b.ins().imul(x, y)),
                    Max => Some(self.b.ins().smax(x, y)),
                    Min => Some(self.b.ins().smin(x, y)),
                    _ => None,
                },
                _ => match op {
                    Add => Some(self.b.ins().fadd(x, y)),
                    Sub => Some(self.b.ins().fsub(x, y)),
                    Mul => Some(self.b.ins().fmul(x, y)),
                    Div => Some(self.b.ins().fdiv(x, y)),
                    Max => Some(self.b.ins().fmax(x, y)),
                    Min => Some(self.b.ins().fmin(x, y)),
                    Mod => {
                        let q = self.b.ins().fdiv(x, y);
                        let q = self.b.ins().floor(q);
                        let p = self.b.ins().fmul(y, q);
                        Some(self.b.ins().fsub(x, p))
                    }
                    _ => None,
                },
            }
        };
        match native {
            Some(r) if op.is_comparison() => Ok(r),
            Some(r) => self.round(rd, r, true),
            None => self.lanewise(rd, &[(x, od), (y, od)], &mut |cg, xs| {
                cg.binary_scalar(op, rd, od, xs[0], xs[1])
            }),
        }
    }

    pub(super) fn cast_vector(&mut self, to: DType, from: DType, x: Value) -> R<Value> {
        let native = match (from, to) {
            (f, t) if f == t => Some(x),
            (f, t) if is_float(f) && is_float(t) => return self.round(t, x, true),
            (f, DType::I32) if is_float(f) => Some(self.b.ins().fcvt_to_sint_sat(types::I32X4, x)),
            (f, DType::Bool) if is_float(f) => {
                let z = self.b.ins().f32const(0.0);
                let z = self.b.ins().splat(types::F32X4, z);
                Some(self.b.ins().fcmp(FloatCC::NotEqual, x, z))
            }
            (DType::I32, t) if is_float(t) => {
                let f = self.b.ins().fcvt_from_sint(types::F32X4, x);
                return self.round(t, f, true);
            }
            (DType::I32, DType::Bool) => {
                let z = self.b.ins().iconst(types::I32, 0);
                let z = self.b.ins().splat(types::I32X4, z);
                Some(self.b.ins().icmp(IntCC::NotEqual, x, z))
            }
            (DType::Bool, DType::I32) => {
                let one = self.b.ins().iconst(types::I32, 1);
                let one = self.b.ins().splat(types::I32X4, one);
                Some(self.b.ins().band(x, one))
            }
            (DType::Bool, t) if is_float(t) => {
                let one = self.b.ins().iconst(types::I32, 1);
                let one = self.b.ins().splat(types::I32X4, one);
                let i = self.b.ins().band(x, one);
                Some(self.b.ins().fcvt_from_sint(types::F32X4, i))
            }
            _ => None,
        };
        match native {
            Some(r) => Ok(r),
            None => self.lanewise(to, &[(x, from)], &mut |cg, xs| {
                cg.cast_scalar(to, from, xs[0])
            }),
        }
    }
}
