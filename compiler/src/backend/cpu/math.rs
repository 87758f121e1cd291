//! Transcendental functions: `exp`, `erf` and `tanh` as inline polynomials (scalar or f32x4,
//! within a few 1e-7 relative of libm), the rest as calls to registered Rust functions that
//! compute in f64 like the reference interpreter.

use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

/// The registered functions: (symbol, address, number of f32 arguments).
pub fn symbols() -> Vec<(&'static str, *const u8, usize)> {
    vec![
        ("vlmc_log", vlmc_log as *const u8, 1),
        ("vlmc_sin", vlmc_sin as *const u8, 1),
        ("vlmc_cos", vlmc_cos as *const u8, 1),
        ("vlmc_pow", vlmc_pow as *const u8, 2),
        ("vlmc_f16", vlmc_f16 as *const u8, 1),
        ("vlmc_bf16", vlmc_bf16 as *const u8, 1),
    ]
}

extern "C" fn vlmc_log(x: f32) -> f32 {
    f64::from(x).ln() as f32
}
extern "C" fn vlmc_sin(x: f32) -> f32 {
    f64::from(x).sin() as f32
}
extern "C" fn vlmc_cos(x: f32) -> f32 {
    f64::from(x).cos() as f32
}
extern "C" fn vlmc_pow(x: f32, y: f32) -> f32 {
    f64::from(x).powf(f64::from(y)) as f32
}
extern "C" fn vlmc_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}
extern "C" fn vlmc_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Emits polynomial math on `f32` or `f32x4` values.
pub struct Poly<'a, 'b> {
    pub b: &'a mut FunctionBuilder<'b>,
    /// F32 or F32X4.
    pub ty: Type,
    pub fma: bool,
}

impl Poly<'_, '_> {
    fn int_ty(&self) -> Type {
        if self.ty.is_vector() {
            types::I32X4
        } else {
            types::I32
        }
    }

    /// A float constant of the value type.
    pub fn c(&mut self, x: f32) -> Value {
        let s = self.b.ins().f32const(x);
        if self.ty.is_vector() {
            self.b.ins().splat(self.ty, s)
        } else {
            s
        }
    }

    fn ci(&mut self, x: i32) -> Value {
        let s = self.b.ins().iconst(types::I32, i64::from(x));
        if self.ty.is_vector() {
            self.b.ins().splat(types::I32X4, s)
        } else {
            s
        }
    }

    /// `a·b + c`.
    pub fn mul_add(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// Horner's rule, highest coefficient first.
    fn horner(&mut self, x: Value, coefs: &[f64]) -> Value {
        let mut p = self.c(coefs[0] as f32);
        for &k in &coefs[1..] {
            let kc = self.c(k as f32);
            p = self.mul_add(p, x, kc);
        }
        p
    }

    /// `cond ? a : b` for a comparison result of the value type.
    fn sel(&mut self, cond: Value, a: Value, b: Value) -> Value {
        if self.ty.is_vector() {
            let m = self.b.ins().bitcast(
                types::F32X4,
                MemFlagsData::new().with_endianness(Endianness::Little),
                cond,
            );
            self.b.ins().bitselect(m, a, b)
        } else {
            self.b.ins().select(cond, a, b)
        }
    }

    /// 2^n for integer n in [-126, 127] (an i32 value of the matching type).
    fn pow2(&mut self, n: Value) -> Value {
        let bias = self.ci(127);
        let e = self.b.ins().iadd(n, bias);
        let e = self.b.ins().ishl_imm_s(e, 23);
        if self.ty.is_vector() {
            self.b.ins().bitcast(
                types::F32X4,
                MemFlagsData::new().with_endianness(Endianness::Little),
                e,
            )
        } else {
            self.b.ins().bitcast(types::F32, MemFlagsData::new(), e)
        }
    }

    /// `x` clamped to `[lo, hi]` by comparisons (a NaN stays NaN): cheaper than IEEE
    /// `fmin`/`fmax`, whose signed-zero and NaN rules cost several instructions on x86.
    fn clamp(&mut self, x: Value, lo: Value, hi: Value) -> Value {
        use cranelift_codegen::ir::condcodes::FloatCC;
        let above = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let x = self.sel(above, hi, x);
        let below = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        self.sel(below, lo, x)
    }

    /// `exp(x)` (Cephes expf: range reduction by ln 2, degree-5 polynomial, two-step scaling
    /// so that results down to the subnormals and up to f32::MAX are right; inf above).
    /// `n = round(x·log2 e)` comes from adding and subtracting 1.5·2²³, whose sum also holds
    /// `n` as an integer in its low mantissa bits (no rounding or conversion instruction).
    pub fn exp(&mut self, x: Value) -> Value {
        use cranelift_codegen::ir::condcodes::FloatCC;
        let hi = self.c(88.722_84);
        let lo = self.c(-104.0);
        let xc = self.clamp(x, lo, hi);
        let log2e = self.c(std::f32::consts::LOG2_E);
        let t = self.b.ins().fmul(xc, log2e);
        let magic = self.c(12_582_912.0);
        let shifted = self.b.ins().fadd(t, magic);
        let n = self.b.ins().fsub(shifted, magic);
        let c1 = self.c(-0.693_359_375_f64 as f32);
        let c2 = self.c(2.121_944_4e-4_f64 as f32);
        let r = self.mul_add(n, c1, xc);
        let r = self.mul_add(n, c2, r);
        let z = self.b.ins().fmul(r, r);
        let p = self.horner(
            r,
            &[
                1.987_569_15e-4,
                1.398_199_950_7e-3,
                8.333_451_907_3e-3,
                4.166_579_589_4e-2,
                1.666_666_545_9e-1,
                5.000_000_120_1e-1,
            ],
        );
        let y = self.mul_add(p, z, r);
        let one = self.c(1.0);
        let y = self.b.ins().fadd(y, one);
        let ity = self.int_ty();
        let le = MemFlagsData::new().with_endianness(Endianness::Little);
        let bits = self.b.ins().bitcast(ity, le, shifted);
        let magic_bits = if self.ty.is_vector() {
            let s = self.b.ins().iconst(types::I32, 0x4B40_0000);
            self.b.ins().splat(types::I32X4, s)
        } else {
            self.b.ins().iconst(types::I32, 0x4B40_0000)
        };
        let ni = self.b.ins().isub(bits, magic_bits);
        let n1 = self.b.ins().sshr_imm_s(ni, 1);
        let n2 = self.b.ins().isub(ni, n1);
        let s1 = self.pow2(n1);
        let s2 = self.pow2(n2);
        let y = self.b.ins().fmul(y, s1);
        let y = self.b.ins().fmul(y, s2);
        let big = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let inf = self.c(f32::INFINITY);
        self.sel(big, inf, y)
    }

    /// `erf(x)`: the odd/even rational approximation of XLA and Eigen on [-4, 4], ±1 outside.
    pub fn erf(&mut self, x: Value) -> Value {
        let four = self.c(4.0);
        let mfour = self.c(-4.0);
        let xc = self.clamp(x, mfour, four);
        let x2 = self.b.ins().fmul(xc, xc);
        let p = self.horner(
            x2,
            &[
                -2.726_142_258_013_06e-10,
                2.770_681_424_959_02e-8,
                -2.101_024_020_825_08e-6,
                -5.692_506_394_623_46e-5,
                -7.349_906_303_268_55e-4,
                -2.954_599_808_540_25e-3,
                -1.609_603_332_624_15e-2,
            ],
        );
        let p = self.b.ins().fmul(xc, p);
        let q = self.horner(
            x2,
            &[
                -1.456_607_184_649_96e-5,
                -2.133_740_552_789_05e-4,
                -1.682_826_974_382_03e-3,
                -7.373_329_167_204_68e-3,
                -1.426_473_905_141_89e-2,
            ],
        );
        self.b.ins().fdiv(p, q)
    }

    /// `tanh(x)`: Cephes' odd polynomial for |x| < 0.625, `1 - 2/(exp(2|x|) + 1)` (signed)
    /// above.
    pub fn tanh(&mut self, x: Value) -> Value {
        use cranelift_codegen::ir::condcodes::FloatCC;
        let z = self.b.ins().fmul(x, x);
        let p = self.horner(
            z,
            &[
                -5.704_988_727_45e-3,
                2.063_908_879_54e-2,
                -5.373_971_555_31e-2,
                1.333_144_220_36e-1,
                -3.333_328_194_22e-1,
            ],
        );
        let pz = self.b.ins().fmul(p, z);
        let small = self.mul_add(pz, x, x);
        let ax = self.b.ins().fabs(x);
        let two = self.c(2.0);
        let ax2 = self.b.ins().fmul(ax, two);
        let e = self.exp(ax2);
        let one = self.c(1.0);
        let e1 = self.b.ins().fadd(e, one);
        let q = self.b.ins().fdiv(two, e1);
        let big = self.b.ins().fsub(one, q);
        let neg = self.b.ins().fneg(big);
        let zero = self.c(0.0);
        let is_neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let big = self.sel(is_neg, neg, big);
        let lim = self.c(0.625);
        let is_small = self.b.ins().fcmp(FloatCC::LessThan, ax, lim);
        let r = self.sel(is_small, small, big);
        // NaN stays NaN (the comparison is false and `big` would be ±1).
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        self.sel(nan, x, r)
    }
}
