//! Cranelift code for one prepared loop nest: `fn(bufs, lo, hi, err)` runs outer iterations
//! `lo..hi` (the runtime splits them across threads). The innermost loop runs four lanes at a
//! time (f32x4 / i32x4, bools as lane masks) with a scalar tail: contiguous accesses are vector
//! loads and stores, lane-invariant ones are splats, anything else (strided or gathered
//! accesses, integer division, calls) is computed lane by lane. Values that do not depend on
//! the innermost variable are computed once before its loop. Accesses whose range is not proven
//! in bounds (gathers) are checked: an out-of-range index sets the error flag and reads 0.

use super::nest::V;
use super::CpuError;
use crate::ir::{BinaryOp, DType};
use crate::kernel::simplify::{Affine, Atom};
use crate::kernel::Buffer;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Endianness, FuncRef, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::{FunctionBuilder, Variable};
use std::collections::HashMap;

pub(super) type R<T> = Result<T, CpuError>;

/// Lanes of a vector.
pub const LANES: usize = 4;

/// Values already computed: `outer` holds scalars valid for the whole outer iteration (hoisted
/// invariants), `local` the values of the current loop body.
#[derive(Default)]
pub(super) struct Memo {
    pub(super) outer: HashMap<V, Value>,
    /// Keyed by (vector mode, value).
    pub(super) local: HashMap<(bool, V), Value>,
}

impl Memo {
    pub(super) fn forget(&mut self, buf: usize) {
        self.outer.retain(|v, _| !v.reads_any(&[buf]));
        self.local.retain(|(_, v), _| !v.reads_any(&[buf]));
    }
}

/// Where code is being emitted.
#[derive(Clone)]
pub(super) struct Env {
    /// Loop variables (i64).
    pub(super) vars: Vec<Value>,
    /// The variable of the innermost loop being emitted, if inside one.
    pub(super) inner: Option<usize>,
    /// Whether values are vectors (lane k has `vars[inner] + k`).
    pub(super) vec: bool,
    /// Reduction results so far (scalars).
    pub(super) accs: Vec<Option<Value>>,
}

/// The code generator of one function.
pub struct Cg<'a, 'b> {
    pub b: FunctionBuilder<'b>,
    pub buffers: &'a [Buffer],
    /// Base pointers of the buffers used, loaded in the entry block.
    pub base: HashMap<usize, Value>,
    pub err: Variable,
    /// Registered functions by symbol.
    pub fns: HashMap<&'static str, FuncRef>,
    pub fma: bool,
    pub vectorize: bool,
    /// Variable ranges (the innermost variable's set per loop).
    pub ranges: Vec<(i64, i64)>,
    /// Buffers the nest stores to (values reading them are never hoisted).
    pub stored: Vec<usize>,
}

pub(super) fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

pub(super) fn lanes_le() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

pub(super) fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

impl<'a, 'b> Cg<'a, 'b> {
    pub(super) fn ty(&self, d: DType, vec: bool) -> R<Type> {
        Ok(match (d, vec) {
            (DType::F32 | DType::F16 | DType::BF16, false) => types::F32,
            (DType::F32 | DType::F16 | DType::BF16, true) => types::F32X4,
            (DType::I32, false) => types::I32,
            (DType::I32, true) | (DType::Bool, true) => types::I32X4,
            (DType::Bool, false) => types::I8,
            (d, _) => {
                return Err(CpuError::new(format!(
                    "{d} is not supported by the CPU backend"
                )))
            }
        })
    }

    pub(super) fn call(&mut self, name: &'static str, args: &[Value]) -> R<Value> {
        let f = *self
            .fns
            .get(name)
            .ok_or_else(|| CpuError::new(format!("internal: `{name}` is not registered")))?;
        let inst = self.b.ins().call(f, args);
        Ok(self.b.inst_results(inst)[0])
    }

    /// Rounds an f32 value (scalar) to a narrower float dtype.
    pub(super) fn round_scalar(&mut self, d: DType, x: Value) -> R<Value> {
        match d {
            DType::F16 => self.call("vlmc_f16", &[x]),
            DType::BF16 => self.call("vlmc_bf16", &[x]),
            _ => Ok(x),
        }
    }

    pub(super) fn round(&mut self, d: DType, x: Value, vec: bool) -> R<Value> {
        if !matches!(d, DType::F16 | DType::BF16) {
            return Ok(x);
        }
        if !vec {
            return self.round_scalar(d, x);
        }
        let mut lanes = [x; LANES];
        for (k, l) in lanes.iter_mut().enumerate() {
            let s = self.b.ins().extractlane(x, k as u8);
            *l = self.round_scalar(d, s)?;
        }
        self.pack(DType::F32, &lanes)
    }

    // ----- indices -----

    pub(super) fn iconst(&mut self, c: i64) -> Value {
        self.b.ins().iconst(types::I64, c)
    }

    /// Whether `a` is within `0..len` over the current ranges.
    pub(super) fn proven(&self, a: &Affine, len: usize) -> bool {
        let (lo, hi) = a.range(&self.ranges);
        lo >= 0 && hi < len as i128
    }

    /// An index value (i64) at the variables of `env` (lane 0 in vector mode).
    pub(super) fn index(&mut self, a: &Affine, env: &Env) -> R<Value> {
        let mut acc: Option<Value> = None;
        for (atom, k) in &a.terms {
            let x = self.atom(atom, env)?;
            let t = match *k {
                1 => x,
                k if k > 0 && (k as u64).is_power_of_two() => {
                    self.b.ins().ishl_imm_s(x, i64::from(k.trailing_zeros()))
                }
                k => self.b.ins().imul_imm_s(x, k),
            };
            acc = Some(match acc {
                None => t,
                Some(p) => self.b.ins().iadd(p, t),
            });
        }
        Ok(match acc {
            None => self.iconst(a.c),
            Some(p) if a.c == 0 => p,
            Some(p) => self.b.ins().iadd_imm_s(p, a.c),
        })
    }

    pub(super) fn atom(&mut self, atom: &Atom, env: &Env) -> R<Value> {
        Ok(match atom {
            Atom::Var(v) => *env
                .vars
                .get(*v)
                .ok_or_else(|| CpuError::new(format!("internal: no loop variable i{v}")))?,
            Atom::Div(x, n) | Atom::Rem(x, n) => {
                let n = *n;
                if n <= 0 {
                    return Err(CpuError::new(format!("index divided by {n}")));
                }
                let nonneg = x.range(&self.ranges).0 >= 0;
                let xv = self.index(x, env)?;
                let is_div = matches!(atom, Atom::Div(..));
                if nonneg && (n as u64).is_power_of_two() {
                    if is_div {
                        self.b.ins().ushr_imm_s(xv, i64::from(n.trailing_zeros()))
                    } else {
                        self.b.ins().band_imm_s(xv, n - 1)
                    }
                } else if nonneg {
                    let nv = self.iconst(n);
                    if is_div {
                        self.b.ins().udiv(xv, nv)
                    } else {
                        self.b.ins().urem(xv, nv)
                    }
                } else {
                    let nv = self.iconst(n);
                    let q = self.b.ins().sdiv(xv, nv);
                    let r = self.b.ins().srem(xv, nv);
                    let neg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, r, 0);
                    let neg = self.b.ins().uextend(types::I64, neg);
                    if is_div {
                        self.b.ins().isub(q, neg)
                    } else {
                        let fix = self.b.ins().imul_imm_s(neg, n);
                        self.b.ins().iadd(r, fix)
                    }
                }
            }
            Atom::Clamp(x, lo, hi) => {
                let xv = self.index(x, env)?;
                let lo = self.iconst(*lo);
                let hi = self.iconst(*hi);
                let y = self.b.ins().smax(xv, lo);
                self.b.ins().smin(y, hi)
            }
            Atom::Load(buf, x) => {
                let p = self.address(*buf, x, env)?;
                let v = self.b.ins().load(types::I32, flags(), p, 0);
                self.b.ins().sextend(types::I64, v)
            }
        })
    }

    /// The address of element `a` of a buffer, checked when not proven in range.
    pub(super) fn address(&mut self, buf: usize, a: &Affine, env: &Env) -> R<Value> {
        let len = self.buffers.get(buf).map_or(0, Buffer::len);
        let mut i = self.index(a, env)?;
        if !self.proven(a, len) {
            let n = self.iconst(len as i64);
            let bad = self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, n);
            let zero = self.iconst(0);
            i = self.b.ins().select(bad, zero, i);
            let e = self.b.use_var(self.err);
            let bad32 = self.b.ins().uextend(types::I32, bad);
            let e = self.b.ins().bor(e, bad32);
            self.b.def_var(self.err, e);
        }
        let base = *self
            .base
            .get(&buf)
            .ok_or_else(|| CpuError::new(format!("internal: b{buf} has no base pointer")))?;
        let off = self.b.ins().ishl_imm_s(i, 2);
        Ok(self.b.ins().iadd(base, off))
    }

    /// The environment of lane `k` of a vector environment (scalar mode).
    pub(super) fn lane_env(&mut self, env: &Env, k: usize) -> Env {
        let mut e = env.clone();
        e.vec = false;
        if let Some(v) = env.inner {
            if k > 0 {
                e.vars[v] = self.b.ins().iadd_imm_s(env.vars[v], k as i64);
            }
        }
        e
    }

    // ----- lanes -----

    /// Lane `k` of a vector value as a scalar of dtype `d` (bool masks become i8 0/1).
    pub(super) fn lane(&mut self, v: Value, d: DType, k: usize) -> Value {
        let x = self.b.ins().extractlane(v, k as u8);
        if d == DType::Bool {
            self.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
        } else {
            x
        }
    }

    /// A vector of dtype `d` from four scalars.
    pub(super) fn pack(&mut self, d: DType, lanes: &[Value; LANES]) -> R<Value> {
        let ty = self.ty(d, true)?;
        let conv = |cg: &mut Self, x: Value| {
            if d == DType::Bool {
                cg.b.ins().bmask(types::I32, x)
            } else {
                x
            }
        };
        let first = conv(self, lanes[0]);
        let mut v = self.b.ins().splat(ty, first);
        for (k, &x) in lanes.iter().enumerate().skip(1) {
            let x = conv(self, x);
            v = self.b.ins().insertlane(v, x, k as u8);
        }
        Ok(v)
    }

    pub(super) fn splat(&mut self, d: DType, x: Value) -> R<Value> {
        let ty = self.ty(d, true)?;
        let x = if d == DType::Bool {
            self.b.ins().bmask(types::I32, x)
        } else {
            x
        };
        Ok(self.b.ins().splat(ty, x))
    }

    // ----- values -----

    /// Whether `v` does not depend on variable `var` (and reads no buffer the nest writes).
    pub(super) fn invariant(&self, v: &V, var: usize) -> bool {
        let mut dep = false;
        v.indices(&mut |a| dep |= a.mentions(var));
        !dep && !v.reads_any(&self.stored)
    }

    /// Computes every maximal subtree of `v` that does not depend on `var` into `memo.outer`.
    pub(super) fn hoist(&mut self, v: &V, var: usize, env: &Env, memo: &mut Memo) -> R<()> {
        if matches!(v, V::Const(..) | V::Acc(..)) {
            return Ok(());
        }
        if self.invariant(v, var) {
            let mut e = env.clone();
            e.inner = None;
            e.vec = false;
            self.val(v, &e, memo)?;
            return Ok(());
        }
        match v {
            V::Unary(_, x, _) | V::Cast(_, _, x) => self.hoist(x, var, env, memo),
            V::Binary(_, x, y, _, _) => {
                self.hoist(x, var, env, memo)?;
                self.hoist(y, var, env, memo)
            }
            V::Select(c, x, y, _) => {
                self.hoist(c, var, env, memo)?;
                self.hoist(x, var, env, memo)?;
                self.hoist(y, var, env, memo)
            }
            _ => Ok(()),
        }
    }

    /// The value of `v` in `env`'s mode. A kernel's tree is bounded (the fusion's
    /// `MAX_KERNEL_TREE`), but deep enough to need more than a test thread's stack.
    pub(super) fn val(&mut self, v: &V, env: &Env, memo: &mut Memo) -> R<Value> {
        stacker::maybe_grow(256 << 10, 16 << 20, || self.val_here(v, env, memo))
    }

    fn val_here(&mut self, v: &V, env: &Env, memo: &mut Memo) -> R<Value> {
        let invariant = match env.inner {
            Some(var) => self.invariant(v, var),
            None => true,
        };
        if invariant {
            if let Some(&s) = memo.outer.get(v) {
                return if env.vec {
                    self.splat(v.dtype(), s)
                } else {
                    Ok(s)
                };
            }
        }
        let key = (env.vec, v.clone());
        if env.inner.is_some() {
            if let Some(&x) = memo.local.get(&key) {
                return Ok(x);
            }
        }
        let x = if invariant && env.vec {
            // Computed as a scalar, then broadcast.
            let mut e = env.clone();
            e.vec = false;
            let s = self.val(v, &e, memo)?;
            self.splat(v.dtype(), s)?
        } else if env.vec {
            self.vector(v, env, memo)?
        } else {
            self.scalar(v, env, memo)?
        };
        if env.inner.is_none() {
            memo.outer.insert(v.clone(), x);
        } else {
            memo.local.insert(key, x);
        }
        Ok(x)
    }

    pub(super) fn constant(&mut self, bits: u64, d: DType) -> R<Value> {
        let c = f64::from_bits(bits);
        Ok(match d {
            DType::F32 => self.b.ins().f32const(c as f32),
            DType::F16 => self.b.ins().f32const(half::f16::from_f64(c).to_f32()),
            DType::BF16 => self.b.ins().f32const(half::bf16::from_f64(c).to_f32()),
            DType::I32 => self.b.ins().iconst(types::I32, i64::from(c as i64 as i32)),
            DType::Bool => self.b.ins().iconst(types::I8, i64::from(c != 0.0)),
            d => return Err(CpuError::new(format!("{d} constants are not supported"))),
        })
    }

    /// A leaf (load, index, range test) as a scalar.
    pub(super) fn leaf(&mut self, v: &V, env: &Env) -> R<Value> {
        Ok(match v {
            V::Load(buf, a, d) => {
                let p = self.address(*buf, a, env)?;
                match d {
                    DType::I32 => self.b.ins().load(types::I32, flags(), p, 0),
                    DType::Bool => {
                        let x = self.b.ins().load(types::I32, flags(), p, 0);
                        self.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
                    }
                    d if is_float(*d) => self.b.ins().load(types::F32, flags(), p, 0),
                    d => return Err(CpuError::new(format!("loads of {d}"))),
                }
            }
            V::Index(a) => {
                let i = self.index(a, env)?;
                self.b.ins().ireduce(types::I32, i)
            }
            V::InRange(a, lo, hi) => {
                let i = self.index(a, env)?;
                let l = self
                    .b
                    .ins()
                    .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, i, *lo);
                let h = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, i, *hi);
                self.b.ins().band(l, h)
            }
            _ => return Err(CpuError::new("internal: not a leaf")),
        })
    }

    pub(super) fn scalar(&mut self, v: &V, env: &Env, memo: &mut Memo) -> R<Value> {
        match v {
            V::Load(..) | V::Index(_) | V::InRange(..) => self.leaf(v, env),
            V::Const(bits, d) => self.constant(*bits, *d),
            V::Acc(k, _) => env
                .accs
                .get(*k)
                .copied()
                .flatten()
                .ok_or_else(|| CpuError::new(format!("acc{k} is used before it is computed"))),
            V::Unary(op, x, d) => {
                let x = self.val(x, env, memo)?;
                self.unary_scalar(*op, *d, x)
            }
            V::Binary(op, x, y, rd, od) => {
                if let Some(f) = self.fused(v, env, memo)? {
                    return Ok(f);
                }
                let x = self.val(x, env, memo)?;
                let y = self.val(y, env, memo)?;
                self.binary_scalar(*op, *rd, *od, x, y)
            }
            V::Select(c, x, y, _) => {
                let c = self.val(c, env, memo)?;
                let x = self.val(x, env, memo)?;
                let y = self.val(y, env, memo)?;
                Ok(self.b.ins().select(c, x, y))
            }
            V::Cast(to, from, x) => {
                let x = self.val(x, env, memo)?;
                self.cast_scalar(*to, *from, x)
            }
        }
    }

    /// `a·b + c` as one fused multiply-add, for f32 values.
    pub(super) fn fused(&mut self, v: &V, env: &Env, memo: &mut Memo) -> R<Option<Value>> {
        let V::Binary(BinaryOp::Add, x, y, DType::F32, _) = v else {
            return Ok(None);
        };
        if !self.fma {
            return Ok(None);
        }
        let (m, c) = match (&**x, &**y) {
            (V::Binary(BinaryOp::Mul, p, q, DType::F32, _), c) => ((p, q), c),
            (c, V::Binary(BinaryOp::Mul, p, q, DType::F32, _)) => ((p, q), c),
            _ => return Ok(None),
        };
        let p = self.val(m.0, env, memo)?;
        let q = self.val(m.1, env, memo)?;
        let c = self.val(c, env, memo)?;
        Ok(Some(self.b.ins().fma(p, q, c)))
    }

    // ----- vectors -----

    /// Applies a scalar operation lane by lane to vector operands.
    pub(super) fn lanewise(
        &mut self,
        d: DType,
        args: &[(Value, DType)],
        f: &mut dyn FnMut(&mut Self, &[Value]) -> R<Value>,
    ) -> R<Value> {
        let mut out = Vec::with_capacity(LANES);
        for k in 0..LANES {
            let xs: Vec<Value> = args.iter().map(|&(v, ad)| self.lane(v, ad, k)).collect();
            out.push(f(self, &xs)?);
        }
        self.pack(d, &[out[0], out[1], out[2], out[3]])
    }

    pub(super) fn vector(&mut self, v: &V, env: &Env, memo: &mut Memo) -> R<Value> {
        let var = env.inner.unwrap_or(usize::MAX);
        match v {
            V::Load(buf, a, d) => {
                let len = self.buffers.get(*buf).map_or(0, Buffer::len);
                if a.coef(var) == 1 && !a.nonlinear_in(var) && self.proven(a, len) {
                    let p = self.address(*buf, a, env)?;
                    return Ok(match d {
                        DType::Bool => {
                            let x = self.b.ins().load(types::I32X4, flags(), p, 0);
                            let z = self.b.ins().iconst(types::I32, 0);
                            let z = self.b.ins().splat(types::I32X4, z);
                            self.b.ins().icmp(IntCC::NotEqual, x, z)
                        }
                        d => {
                            let ty = self.ty(*d, true)?;
                            self.b.ins().load(ty, flags(), p, 0)
                        }
                    });
                }
                self.leaf_lanes(v, env)
            }
            V::Index(_) | V::InRange(..) => self.leaf_lanes(v, env),
            V::Const(..) | V::Acc(..) => {
                let mut e = env.clone();
                e.vec = false;
                let s = self.scalar(v, &e, memo)?;
                self.splat(v.dtype(), s)
            }
            V::Unary(op, x, d) => {
                let xv = self.val(x, env, memo)?;
                self.unary_vector(*op, *d, xv)
            }
            V::Binary(op, x, y, rd, od) => {
                if let Some(f) = self.fused(v, env, memo)? {
                    return Ok(f);
                }
                let xv = self.val(x, env, memo)?;
                let yv = self.val(y, env, memo)?;
                self.binary_vector(*op, *rd, *od, xv, yv)
            }
            V::Select(c, x, y, d) => {
                let c = self.val(c, env, memo)?;
                let x = self.val(x, env, memo)?;
                let y = self.val(y, env, memo)?;
                Ok(if is_float(*d) {
                    let m = self.b.ins().bitcast(types::F32X4, lanes_le(), c);
                    self.b.ins().bitselect(m, x, y)
                } else {
                    self.b.ins().bitselect(c, x, y)
                })
            }
            V::Cast(to, from, x) => {
                let xv = self.val(x, env, memo)?;
                self.cast_vector(*to, *from, xv)
            }
        }
    }

    /// A leaf computed lane by lane (each lane its own index).
    pub(super) fn leaf_lanes(&mut self, v: &V, env: &Env) -> R<Value> {
        let mut out = Vec::with_capacity(LANES);
        for k in 0..LANES {
            let e = self.lane_env(env, k);
            out.push(self.leaf(v, &e)?);
        }
        self.pack(v.dtype(), &[out[0], out[1], out[2], out[3]])
    }
}
