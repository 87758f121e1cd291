//! Index simplification: an [`Idx`] as an affine form `c + Σ kᵢ·atomᵢ` over loop variables and
//! non-linear atoms (floor division, remainder, clamp, a loaded index), simplified with the
//! ranges of the loop variables.
//!
//! The lowering writes views as `linearize(delinearize(x))` chains; with ranges these fold back:
//! `(i·384 + j) / 384 → i` when `0 ≤ j < 384`, `(x / n)·n + x % n → x`, divisible terms leave a
//! division, common factors cancel (`(4·i) % 8 → 4·(i % 2)`), and clamps whose argument is
//! already in range disappear. Every rule is exact for floor division and Euclidean remainder by
//! a positive divisor, the semantics of [`Idx`].

use super::Idx;

/// A non-linear part of an index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Atom {
    /// Loop variable `i{n}`.
    Var(usize),
    /// Floor division by a constant.
    Div(Box<Affine>, i64),
    /// Euclidean remainder by a constant.
    Rem(Box<Affine>, i64),
    /// `min(max(x, lo), hi)`.
    Clamp(Box<Affine>, i64, i64),
    /// An i32 element of a buffer.
    Load(usize, Box<Affine>),
}

/// `c + Σ k·atom`, terms sorted by atom with non-zero coefficients.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Affine {
    pub c: i64,
    pub terms: Vec<(Atom, i64)>,
}

/// Inclusive ranges of the loop variables; a variable past the end is unbounded.
pub type Ranges = [(i64, i64)];

const I32_RANGE: (i128, i128) = (i32::MIN as i128, i32::MAX as i128);

fn gcd(a: i64, b: i64) -> i64 {
    let (mut a, mut b) = (a.unsigned_abs(), b.unsigned_abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.min(i64::MAX as u64) as i64
}

/// Whether `x ≡ y (mod n)` term by term (so `x % n == y % n` and `(x/n)·n + y % n == x`).
fn congruent(x: &Affine, y: &Affine, n: i64) -> bool {
    if x == y {
        return true;
    }
    let mut terms = x.terms.clone();
    terms.extend(y.terms.iter().map(|(a, k)| (a.clone(), k.wrapping_neg())));
    let d = Affine {
        c: x.c.wrapping_sub(y.c),
        terms,
    }
    .merged();
    d.c % n == 0 && d.terms.iter().all(|(_, k)| k % n == 0)
}

impl Affine {
    /// A constant.
    pub fn constant(c: i64) -> Affine {
        Affine {
            c,
            terms: Vec::new(),
        }
    }

    /// One atom with coefficient 1.
    pub fn atom(a: Atom) -> Affine {
        Affine {
            c: 0,
            terms: vec![(a, 1)],
        }
    }

    /// A loop variable.
    pub fn var(v: usize) -> Affine {
        Affine::atom(Atom::Var(v))
    }

    /// The constant value, when there are no terms.
    pub fn as_const(&self) -> Option<i64> {
        self.terms.is_empty().then_some(self.c)
    }

    /// `self + other`.
    pub fn add(&self, other: &Affine) -> Affine {
        let mut terms = self.terms.clone();
        terms.extend(other.terms.iter().cloned());
        Affine {
            c: self.c.wrapping_add(other.c),
            terms,
        }
        .normalized()
    }

    /// `self · k`.
    pub fn scale(&self, k: i64) -> Affine {
        if k == 0 {
            return Affine::constant(0);
        }
        Affine {
            c: self.c.wrapping_mul(k),
            terms: self
                .terms
                .iter()
                .map(|(a, x)| (a.clone(), x.wrapping_mul(k)))
                .collect(),
        }
    }

    /// Sorts and merges terms, drops zero coefficients.
    fn merged(mut self) -> Affine {
        self.terms.sort_by(|a, b| a.0.cmp(&b.0));
        let mut merged: Vec<(Atom, i64)> = Vec::with_capacity(self.terms.len());
        for (a, k) in self.terms.drain(..) {
            match merged.last_mut() {
                Some((b, kb)) if *b == a => *kb = kb.wrapping_add(k),
                _ => merged.push((a, k)),
            }
        }
        merged.retain(|(_, k)| *k != 0);
        self.terms = merged;
        self
    }

    /// [`Affine::merged`], then folds `(x/n)·kn + (y%n)·k` into `k·x` where `x ≡ y (mod n)`.
    fn normalized(mut self) -> Affine {
        loop {
            self = self.merged();
            if !self.fold_div_rem() {
                return self;
            }
        }
    }

    /// One `(x/n)·kn + (x%n)·k → k·x` rewrite; whether one happened.
    fn fold_div_rem(&mut self) -> bool {
        for i in 0..self.terms.len() {
            let (Atom::Div(x, n), kd) = &self.terms[i] else {
                continue;
            };
            for j in 0..self.terms.len() {
                if let (Atom::Rem(y, m), kr) = &self.terms[j] {
                    if m == n && kr.checked_mul(*n) == Some(*kd) && congruent(x, y, *n) {
                        let k = *kr;
                        let x = (**x).clone();
                        let (hi, lo) = (i.max(j), i.min(j));
                        self.terms.remove(hi);
                        self.terms.remove(lo);
                        let add = x.scale(k);
                        self.c = self.c.wrapping_add(add.c);
                        self.terms.extend(add.terms);
                        return true;
                    }
                }
            }
        }
        false
    }

    /// The top-level coefficient of variable `v` (0 when absent).
    pub fn coef(&self, v: usize) -> i64 {
        self.terms
            .iter()
            .find(|(a, _)| *a == Atom::Var(v))
            .map_or(0, |(_, k)| *k)
    }

    /// Whether variable `v` occurs inside a non-linear atom.
    pub fn nonlinear_in(&self, v: usize) -> bool {
        self.terms.iter().any(|(a, _)| match a {
            Atom::Var(_) => false,
            Atom::Div(x, _) | Atom::Rem(x, _) | Atom::Clamp(x, _, _) | Atom::Load(_, x) => {
                x.mentions(v)
            }
        })
    }

    /// Whether variable `v` occurs anywhere.
    pub fn mentions(&self, v: usize) -> bool {
        self.coef(v) != 0 || self.nonlinear_in(v)
    }

    /// Whether an index is loaded from a buffer anywhere in it.
    pub fn has_load(&self) -> bool {
        self.terms.iter().any(|(a, _)| match a {
            Atom::Var(_) => false,
            Atom::Load(..) => true,
            Atom::Div(x, _) | Atom::Rem(x, _) | Atom::Clamp(x, _, _) => x.has_load(),
        })
    }

    /// The interval of values over the variable ranges (loaded indices are any i32).
    pub fn range(&self, r: &Ranges) -> (i128, i128) {
        let (mut lo, mut hi) = (self.c as i128, self.c as i128);
        for (a, k) in &self.terms {
            let (alo, ahi) = a.range(r);
            let k = *k as i128;
            let (p, q) = (alo.saturating_mul(k), ahi.saturating_mul(k));
            lo = lo.saturating_add(p.min(q));
            hi = hi.saturating_add(p.max(q));
        }
        (lo, hi)
    }

    /// Floor division by `n`.
    pub fn div(&self, n: i64, r: &Ranges) -> Affine {
        if n == 1 {
            return self.clone();
        }
        if n <= 0 {
            return Affine::atom(Atom::Div(Box::new(self.clone()), n));
        }
        if let Some(c) = self.as_const() {
            return Affine::constant(c.div_euclid(n));
        }
        let mut q = Affine::constant(self.c.div_euclid(n));
        let mut rest = Affine::constant(self.c.rem_euclid(n));
        for (a, k) in &self.terms {
            if k % n == 0 {
                q.terms.push((a.clone(), k / n));
            } else {
                rest.terms.push((a.clone(), *k));
            }
        }
        let q = q.normalized();
        let (lo, hi) = rest.range(r);
        if lo >= 0 && hi < n as i128 {
            return q;
        }
        let g = rest
            .terms
            .iter()
            .fold(gcd(n, rest.c), |g, (_, k)| gcd(g, *k));
        if g > 1 {
            return q.add(&rest.exact_div(g).div(n / g, r));
        }
        if let Some((big, d)) = rest.split_below(n, r) {
            // (d·X + s) / (d·m) = X / m when 0 ≤ s < d.
            return q.add(&big.div(n / d, r));
        }
        if rest.c == 0 && rest.terms.len() == 1 && rest.terms[0].1 == 1 {
            if let Atom::Div(x, m) = &rest.terms[0].0 {
                if let Some(mn) = m.checked_mul(n) {
                    if *m > 0 {
                        return q.add(&x.div(mn, r));
                    }
                }
            }
        }
        q.add(&Affine::atom(Atom::Div(Box::new(rest), n)))
    }

    /// Euclidean remainder by `n`.
    pub fn rem(&self, n: i64, r: &Ranges) -> Affine {
        if n == 1 {
            return Affine::constant(0);
        }
        if n <= 0 {
            return Affine::atom(Atom::Rem(Box::new(self.clone()), n));
        }
        let mut rest = Affine::constant(self.c.rem_euclid(n));
        for (a, k) in &self.terms {
            let k = k.rem_euclid(n);
            if k != 0 {
                rest.terms.push((a.clone(), k));
            }
        }
        let rest = rest.normalized();
        if let Some(c) = rest.as_const() {
            return Affine::constant(c);
        }
        let (lo, hi) = rest.range(r);
        let n128 = n as i128;
        if lo.div_euclid(n128) == hi.div_euclid(n128) {
            let block = lo.div_euclid(n128) * n128;
            return rest.add(&Affine::constant(-(block as i64)));
        }
        let g = rest
            .terms
            .iter()
            .fold(gcd(n, rest.c), |g, (_, k)| gcd(g, *k));
        if g > 1 {
            return rest.exact_div(g).rem(n / g, r).scale(g);
        }
        if let Some((big, d)) = rest.split_below(n, r) {
            // (d·X + s) % (d·m) = d·(X % m) + s when 0 ≤ s < d.
            let small = rest.add(&big.scale(d).scale(-1));
            return big.rem(n / d, r).scale(d).add(&small);
        }
        if rest.c == 0 && rest.terms.len() == 1 && rest.terms[0].1 == 1 {
            if let Atom::Rem(x, m) = &rest.terms[0].0 {
                if *m > 0 && m % n == 0 {
                    return x.rem(n, r);
                }
            }
        }
        Affine::atom(Atom::Rem(Box::new(rest), n))
    }

    /// `min(max(self, lo), hi)`.
    pub fn clamped(&self, lo: i64, hi: i64, r: &Ranges) -> Affine {
        let (a, b) = self.range(r);
        if lo <= hi {
            if a >= lo as i128 && b <= hi as i128 {
                return self.clone();
            }
            if a >= hi as i128 {
                return Affine::constant(hi);
            }
            if b <= lo as i128 {
                return Affine::constant(lo);
            }
        }
        Affine::atom(Atom::Clamp(Box::new(self.clone()), lo, hi))
    }

    /// Divides every coefficient by `g`, which divides them all.
    /// `self = d·X + s` with `d` a divisor of `n` (the largest that works, `1 < d < n`) and
    /// `0 ≤ s < d` over the ranges, where `X` gathers the terms whose coefficients `d` divides:
    /// `(X, d)` (a reshape's `(384·i + j) / 49152` is `i / 128` when `0 ≤ j < 384`).
    fn split_below(&self, n: i64, r: &Ranges) -> Option<(Affine, i64)> {
        let mut ds: Vec<i64> = self
            .terms
            .iter()
            .map(|(_, k)| gcd(n, *k))
            .filter(|&d| d > 1 && d < n)
            .collect();
        ds.sort_unstable_by(|a, b| b.cmp(a));
        ds.dedup();
        ds.into_iter().find_map(|d| {
            let mut big = Affine::constant(self.c.div_euclid(d));
            let mut small = Affine::constant(self.c.rem_euclid(d));
            for (a, k) in &self.terms {
                match k % d {
                    0 => big.terms.push((a.clone(), k / d)),
                    _ => small.terms.push((a.clone(), *k)),
                }
            }
            let (lo, hi) = small.range(r);
            (lo >= 0 && hi < d as i128).then(|| (big.normalized(), d))
        })
    }

    fn exact_div(&self, g: i64) -> Affine {
        Affine {
            c: self.c / g,
            terms: self.terms.iter().map(|(a, k)| (a.clone(), k / g)).collect(),
        }
    }

    /// Rebuilds with each variable replaced by an affine form, simplifying under new ranges.
    pub fn subst(&self, f: &dyn Fn(usize) -> Affine, r: &Ranges) -> Affine {
        let mut out = Affine::constant(self.c);
        for (a, k) in &self.terms {
            let x = match a {
                Atom::Var(v) => f(*v),
                Atom::Div(x, n) => x.subst(f, r).div(*n, r),
                Atom::Rem(x, n) => x.subst(f, r).rem(*n, r),
                Atom::Clamp(x, lo, hi) => x.subst(f, r).clamped(*lo, *hi, r),
                Atom::Load(b, x) => Affine::atom(Atom::Load(*b, Box::new(x.subst(f, r)))),
            };
            out = out.add(&x.scale(*k));
        }
        out
    }

    /// The simplified form of an index.
    pub fn from_idx(i: &Idx, r: &Ranges) -> Affine {
        Affine::from_idx_with(i, &Affine::var, r)
    }

    /// The simplified form of an index whose variables are replaced by `f`.
    pub fn from_idx_with(i: &Idx, f: &dyn Fn(usize) -> Affine, r: &Ranges) -> Affine {
        let go = |x: &Idx| Affine::from_idx_with(x, f, r);
        match i {
            Idx::Var(v) => f(*v),
            Idx::Const(c) => Affine::constant(*c),
            Idx::Add(a, b) => go(a).add(&go(b)),
            Idx::Mul(a, k) => go(a).scale(*k),
            Idx::Div(a, n) => go(a).div(*n, r),
            Idx::Rem(a, n) => go(a).rem(*n, r),
            Idx::Clamp(a, lo, hi) => go(a).clamped(*lo, *hi, r),
            Idx::Load(b, a) => Affine::atom(Atom::Load(*b, Box::new(go(a)))),
        }
    }

    /// Back to an [`Idx`].
    pub fn to_idx(&self) -> Idx {
        let mut acc: Option<Idx> = None;
        for (a, k) in &self.terms {
            let x = a.to_idx();
            let x = if *k == 1 {
                x
            } else {
                Idx::Mul(Box::new(x), *k)
            };
            acc = Some(match acc {
                None => x,
                Some(p) => Idx::Add(Box::new(p), Box::new(x)),
            });
        }
        match acc {
            None => Idx::Const(self.c),
            Some(p) if self.c == 0 => p,
            Some(p) => Idx::Add(Box::new(p), Box::new(Idx::Const(self.c))),
        }
    }
}

impl Atom {
    /// The interval of values of an atom.
    pub fn range(&self, r: &Ranges) -> (i128, i128) {
        match self {
            Atom::Var(v) => r
                .get(*v)
                .map_or((i64::MIN as i128, i64::MAX as i128), |&(a, b)| {
                    (a as i128, b as i128)
                }),
            Atom::Div(x, n) if *n > 0 => {
                let (a, b) = x.range(r);
                (a.div_euclid(*n as i128), b.div_euclid(*n as i128))
            }
            Atom::Rem(x, n) if *n > 0 => {
                let (a, b) = x.range(r);
                let n = *n as i128;
                if a.div_euclid(n) == b.div_euclid(n) {
                    (a.rem_euclid(n), b.rem_euclid(n))
                } else {
                    (0, n - 1)
                }
            }
            Atom::Clamp(x, lo, hi) if lo <= hi => {
                let (a, b) = x.range(r);
                (
                    a.clamp(*lo as i128, *hi as i128),
                    b.clamp(*lo as i128, *hi as i128),
                )
            }
            Atom::Load(..) => I32_RANGE,
            _ => (i64::MIN as i128, i64::MAX as i128),
        }
    }

    fn to_idx(&self) -> Idx {
        match self {
            Atom::Var(v) => Idx::Var(*v),
            Atom::Div(x, n) => Idx::Div(Box::new(x.to_idx()), *n),
            Atom::Rem(x, n) => Idx::Rem(Box::new(x.to_idx()), *n),
            Atom::Clamp(x, lo, hi) => Idx::Clamp(Box::new(x.to_idx()), *lo, *hi),
            Atom::Load(b, x) => Idx::Load(*b, Box::new(x.to_idx())),
        }
    }
}

/// Simplifies an index given the inclusive ranges of its variables.
pub fn simplify(i: &Idx, r: &Ranges) -> Idx {
    Affine::from_idx(i, r).to_idx()
}

#[cfg(test)]
mod tests;
