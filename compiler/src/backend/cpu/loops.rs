//! Statements and loops: stores, the vectorised innermost loop with its scalar tail, reductions
//! (four-lane accumulators, then a horizontal combine and a scalar tail), and the function
//! around one prepared nest: outer iterations `lo..hi` advanced as a branch-free odometer.

use super::codegen::{flags, is_float, Cg, Env, Memo, LANES, R};
use super::nest::{Nest, S, V};
use super::CpuError;
use crate::ir::{DType, ReduceOp};
use crate::kernel::simplify::{Affine, Atom};
use crate::kernel::Buffer;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Block, InstBuilder, Value};

impl Cg<'_, '_> {
    // ----- statements -----

    /// Converts a value to the dtype of the buffer it is stored in.
    pub(super) fn store_value(
        &mut self,
        buf: usize,
        v: &V,
        env: &Env,
        memo: &mut Memo,
    ) -> R<(Value, DType)> {
        let d = self.buffers.get(buf).map(|b| b.dtype).unwrap_or(DType::F32);
        let x = if v.dtype() == d {
            self.val(v, env, memo)?
        } else {
            let c = V::Cast(d, v.dtype(), Box::new(v.clone()));
            self.val(&c, env, memo)?
        };
        Ok((x, d))
    }

    pub(super) fn store_scalar(
        &mut self,
        buf: usize,
        a: &Affine,
        x: Value,
        d: DType,
        env: &Env,
    ) -> R<()> {
        let x = if d == DType::Bool {
            self.b.ins().uextend(types::I32, x)
        } else {
            x
        };
        let p = self.address(buf, a, env)?;
        self.b.ins().store(flags(), x, p, 0);
        Ok(())
    }

    pub(super) fn store(
        &mut self,
        buf: usize,
        a: &Affine,
        v: &V,
        env: &Env,
        memo: &mut Memo,
    ) -> R<()> {
        let (x, d) = self.store_value(buf, v, env, memo)?;
        if !env.vec {
            self.store_scalar(buf, a, x, d, env)?;
        } else {
            let var = env.inner.unwrap_or(usize::MAX);
            let len = self.buffers.get(buf).map_or(0, Buffer::len);
            if a.coef(var) == 1 && !a.nonlinear_in(var) && self.proven(a, len) {
                let x = if d == DType::Bool {
                    let one = self.b.ins().iconst(types::I32, 1);
                    let one = self.b.ins().splat(types::I32X4, one);
                    self.b.ins().band(x, one)
                } else {
                    x
                };
                let p = self.address(buf, a, env)?;
                self.b.ins().store(flags(), x, p, 0);
            } else {
                for k in 0..LANES {
                    let s = self.lane(x, d, k);
                    let e = self.lane_env(env, k);
                    self.store_scalar(buf, a, s, d, &e)?;
                }
            }
        }
        memo.forget(buf);
        Ok(())
    }

    /// `for i in start..end step` with a body given the counter (i64).
    pub(super) fn counted(
        &mut self,
        start: i64,
        end: i64,
        step: i64,
        body: &mut dyn FnMut(&mut Self, Value) -> R<()>,
    ) -> R<()> {
        if start >= end {
            return Ok(());
        }
        let i = self.b.declare_var(types::I64);
        let s = self.iconst(start);
        self.b.def_var(i, s);
        let header = self.b.create_block();
        let body_b = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let iv = self.b.use_var(i);
        let more = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, iv, end);
        self.b.ins().brif(more, body_b, &[], exit, &[]);
        self.b.switch_to_block(body_b);
        body(self, iv)?;
        let next = self.b.ins().iadd_imm_s(iv, step);
        self.b.def_var(i, next);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
        Ok(())
    }

    /// The innermost loop over `var` in `0..n`: vector body, then scalar tail.
    pub(super) fn inner_loop(
        &mut self,
        var: usize,
        n: usize,
        body: &[S],
        env: &Env,
        memo: &mut Memo,
    ) -> R<()> {
        // An empty loop runs nothing: hoisting its invariant loads would read them anyway (from
        // buffers that may be empty).
        if n == 0 {
            return Ok(());
        }
        let saved = self.ranges[var];
        self.ranges[var] = (0, n as i64 - 1);
        for s in body {
            if let S::Store(_, _, v) = s {
                self.hoist(v, var, env, memo)?;
            }
        }
        let nv = if self.vectorize { n / LANES * LANES } else { 0 };
        for (vec, start, end, step) in [(true, 0, nv, LANES), (false, nv, n, 1)] {
            self.counted(start as i64, end as i64, step as i64, &mut |cg, i| {
                let mut e = env.clone();
                e.vars[var] = i;
                e.inner = Some(var);
                e.vec = vec;
                memo.local.clear();
                for s in body {
                    match s {
                        S::Store(buf, a, v) => cg.store(*buf, a, v, &e, memo)?,
                        _ => return Err(CpuError::new("nested loops inside an inner loop")),
                    }
                }
                memo.local.clear();
                Ok(())
            })?;
        }
        self.ranges[var] = saved;
        Ok(())
    }

    /// A reduction over `var` in `0..len`; returns the scalar result.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reduce(
        &mut self,
        var: usize,
        op: ReduceOp,
        len: usize,
        value: &V,
        dtype: DType,
        env: &Env,
        memo: &mut Memo,
    ) -> R<Value> {
        let float = is_float(dtype);
        if !float && dtype != DType::I32 {
            return Err(CpuError::new(format!("reductions of {dtype}")));
        }
        let vd = value.dtype();
        let sty = self.ty(dtype, false)?;
        let init_s = match (op, float) {
            (ReduceOp::Sum, true) => self.b.ins().f32const(0.0),
            (ReduceOp::Max, true) => self.b.ins().f32const(f32::NEG_INFINITY),
            (ReduceOp::Sum, false) => self.b.ins().iconst(types::I32, 0),
            (ReduceOp::Max, false) => self.b.ins().iconst(types::I32, i64::from(i32::MIN)),
        };
        // A reduction over nothing is its identity; nothing of its value is evaluated (its loads
        // would read empty buffers).
        if len == 0 {
            return Ok(init_s);
        }
        let saved = self.ranges[var];
        self.ranges[var] = (0, len as i64 - 1);
        self.hoist(value, var, env, memo)?;
        let combine = |cg: &mut Self, a: Value, x: Value| match (op, float) {
            (ReduceOp::Sum, true) => cg.b.ins().fadd(a, x),
            (ReduceOp::Max, true) => cg.b.ins().fmax(a, x),
            (ReduceOp::Sum, false) => cg.b.ins().iadd(a, x),
            (ReduceOp::Max, false) => cg.b.ins().smax(a, x),
        };
        let acc_s = self.b.declare_var(sty);
        self.b.def_var(acc_s, init_s);
        let nv = if self.vectorize {
            len / LANES * LANES
        } else {
            0
        };
        if nv > 0 {
            let vty = self.ty(dtype, true)?;
            let acc_v = self.b.declare_var(vty);
            let init_v = self.b.ins().splat(vty, init_s);
            self.b.def_var(acc_v, init_v);
            self.counted(0, nv as i64, LANES as i64, &mut |cg, i| {
                let mut e = env.clone();
                e.vars[var] = i;
                e.inner = Some(var);
                e.vec = true;
                memo.local.clear();
                let x = cg.val(value, &e, memo)?;
                let x = if vd == dtype {
                    x
                } else {
                    cg.cast_vector(dtype, vd, x)?
                };
                memo.local.clear();
                let a = cg.b.use_var(acc_v);
                let a = combine(cg, a, x);
                cg.b.def_var(acc_v, a);
                Ok(())
            })?;
            let a = self.b.use_var(acc_v);
            let l: Vec<Value> = (0..LANES)
                .map(|k| self.b.ins().extractlane(a, k as u8))
                .collect();
            let p = combine(self, l[0], l[1]);
            let q = combine(self, l[2], l[3]);
            let h = combine(self, p, q);
            self.b.def_var(acc_s, h);
        }
        self.counted(nv as i64, len as i64, 1, &mut |cg, i| {
            let mut e = env.clone();
            e.vars[var] = i;
            e.inner = Some(var);
            e.vec = false;
            memo.local.clear();
            let x = cg.val(value, &e, memo)?;
            let x = if vd == dtype {
                x
            } else {
                cg.cast_scalar(dtype, vd, x)?
            };
            memo.local.clear();
            let a = cg.b.use_var(acc_s);
            let a = combine(cg, a, x);
            cg.b.def_var(acc_s, a);
            Ok(())
        })?;
        self.ranges[var] = saved;
        let a = self.b.use_var(acc_s);
        if float {
            self.round_scalar(dtype, a)
        } else {
            Ok(a)
        }
    }

    /// The body of one outer iteration.
    pub(super) fn outer_body(&mut self, nest: &Nest, vars: Vec<Value>, memo: &mut Memo) -> R<()> {
        let var = nest.inner_var();
        let mut env = Env {
            vars,
            inner: None,
            vec: false,
            accs: Vec::new(),
        };
        env.vars.push(self.iconst(0));
        if !nest.rows {
            match nest.inner {
                Some(n) => self.inner_loop(var, n, &nest.body, &env, memo)?,
                None => {
                    for s in &nest.body {
                        if let S::Store(buf, a, v) = s {
                            self.store(*buf, a, v, &env, memo)?;
                        }
                    }
                }
            }
            return Ok(());
        }
        for s in &nest.body {
            match s {
                S::Store(buf, a, v) => self.store(*buf, a, v, &env, memo)?,
                S::Reduce {
                    acc,
                    op,
                    len,
                    value,
                    dtype,
                } => {
                    let x = self.reduce(var, *op, *len, value, *dtype, &env, memo)?;
                    if env.accs.len() <= *acc {
                        env.accs.resize(*acc + 1, None);
                    }
                    env.accs[*acc] = Some(x);
                }
                S::Inner(len, body) => self.inner_loop(var, *len, body, &env, memo)?,
            }
        }
        Ok(())
    }

    /// Emits the whole function body into `entry` (whose parameters are bufs, lo, hi, err).
    pub fn function(&mut self, nest: &Nest, entry: Block) -> R<()> {
        let params = self.b.block_params(entry).to_vec();
        let (bufs, lo, hi, err_ptr) = (params[0], params[1], params[2], params[3]);
        let mut used = Vec::new();
        for s in &nest.body {
            collect_buffers(s, &mut used);
        }
        used.sort_unstable();
        used.dedup();
        for b in used {
            if b >= self.buffers.len() {
                return Err(CpuError::new(format!("no buffer b{b}")));
            }
            let p = self.b.ins().load(types::I64, flags(), bufs, (b * 8) as i32);
            self.base.insert(b, p);
        }
        let zero32 = self.b.ins().iconst(types::I32, 0);
        self.b.def_var(self.err, zero32);
        // Outer variables from `lo` (an odometer, advanced branch-free).
        let mut vars_v = Vec::new();
        let mut rest = lo;
        let outer = nest.outer.clone();
        let mut init = vec![lo; outer.len()];
        for d in (0..outer.len()).rev() {
            let n = self.iconst(outer[d] as i64);
            init[d] = if d == 0 {
                rest
            } else {
                self.b.ins().urem(rest, n)
            };
            if d > 0 {
                rest = self.b.ins().udiv(rest, n);
            }
        }
        for &x in &init {
            let v = self.b.declare_var(types::I64);
            self.b.def_var(v, x);
            vars_v.push(v);
        }
        let flat = self.b.declare_var(types::I64);
        self.b.def_var(flat, lo);
        let header = self.b.create_block();
        let body = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let f = self.b.use_var(flat);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, f, hi);
        self.b.ins().brif(more, body, &[], exit, &[]);
        self.b.switch_to_block(body);
        let vals: Vec<Value> = vars_v.iter().map(|&v| self.b.use_var(v)).collect();
        let mut memo = Memo::default();
        self.outer_body(nest, vals.clone(), &mut memo)?;
        let f = self.b.use_var(flat);
        let f1 = self.b.ins().iadd_imm_s(f, 1);
        self.b.def_var(flat, f1);
        let mut carry: Option<Value> = None;
        for d in (0..outer.len()).rev() {
            let cur = self.b.use_var(vars_v[d]);
            let next = match carry {
                None => self.b.ins().iadd_imm_s(cur, 1),
                Some(c) => {
                    let c = self.b.ins().uextend(types::I64, c);
                    self.b.ins().iadd(cur, c)
                }
            };
            if d == 0 {
                self.b.def_var(vars_v[d], next);
                break;
            }
            let wrap = self.b.ins().icmp_imm_s(IntCC::Equal, next, outer[d] as i64);
            let z = self.iconst(0);
            let v = self.b.ins().select(wrap, z, next);
            self.b.def_var(vars_v[d], v);
            carry = Some(wrap);
        }
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
        let e = self.b.use_var(self.err);
        self.b.ins().store(flags(), e, err_ptr, 0);
        self.b.ins().return_(&[]);
        Ok(())
    }
}

fn collect_buffers(s: &S, out: &mut Vec<usize>) {
    let add_affine = |a: &Affine, out: &mut Vec<usize>| affine_buffers(a, out);
    match s {
        S::Store(b, a, v) => {
            out.push(*b);
            add_affine(a, out);
            value_buffers(v, out);
        }
        S::Reduce { value, .. } => value_buffers(value, out),
        S::Inner(_, body) => body.iter().for_each(|s| collect_buffers(s, out)),
    }
}

fn value_buffers(v: &V, out: &mut Vec<usize>) {
    match v {
        V::Load(b, a, _) => {
            out.push(*b);
            affine_buffers(a, out);
        }
        V::Index(a) | V::InRange(a, _, _) => affine_buffers(a, out),
        V::Const(..) | V::Acc(..) => {}
        V::Unary(_, x, _) | V::Cast(_, _, x) => value_buffers(x, out),
        V::Binary(_, x, y, _, _) => {
            value_buffers(x, out);
            value_buffers(y, out);
        }
        V::Select(c, x, y, _) => {
            value_buffers(c, out);
            value_buffers(x, out);
            value_buffers(y, out);
        }
    }
}

fn affine_buffers(a: &Affine, out: &mut Vec<usize>) {
    for (t, _) in &a.terms {
        match t {
            Atom::Var(_) => {}
            Atom::Load(b, x) => {
                out.push(*b);
                affine_buffers(x, out);
            }
            Atom::Div(x, _) | Atom::Rem(x, _) | Atom::Clamp(x, _, _) => affine_buffers(x, out),
        }
    }
}
