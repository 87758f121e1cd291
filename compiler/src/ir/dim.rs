//! Symbolic dimensions: integer polynomials over named sizes such as `B` and `T`.
//!
//! A [`Dim`] is kept in canonical form (a map from sorted monomials to nonzero coefficients), so
//! two dimensions are equal exactly when they are equal as polynomials, and printing is
//! deterministic: `2*B*T + T - 16`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Mul, Neg, Sub};

/// A product of symbols, sorted, with repeats for powers (`["T", "T"]` is `T*T`).
type Monomial = Vec<String>;

/// A symbolic dimension: a polynomial with `i64` coefficients over named symbols.
///
/// The operators `+ - *` panic on coefficient overflow; the `checked_*` methods return `None`.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    terms: BTreeMap<Monomial, i64>,
}

impl Dim {
    /// The constant dimension `value`.
    pub fn c(value: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if value != 0 {
            terms.insert(Vec::new(), value);
        }
        Dim { terms }
    }

    /// The dimension named `name`.
    pub fn sym(name: &str) -> Dim {
        Dim {
            terms: BTreeMap::from([(vec![name.to_string()], 1)]),
        }
    }

    /// The constant value, if this dimension has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    /// Whether this dimension has no symbols.
    pub fn is_const(&self) -> bool {
        self.as_const().is_some()
    }

    /// The symbols this dimension mentions, sorted and without repeats.
    pub fn symbols(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.terms.keys().flatten().map(String::as_str).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// `self + other`, or `None` on coefficient overflow.
    pub fn checked_add(&self, other: &Dim) -> Option<Dim> {
        let mut terms = self.terms.clone();
        for (mono, &coef) in &other.terms {
            let old: i64 = terms.get(mono).copied().unwrap_or(0);
            let sum = old.checked_add(coef)?;
            set_coef(&mut terms, mono.clone(), sum);
        }
        Some(Dim { terms })
    }

    /// `-self`, or `None` on coefficient overflow.
    pub fn checked_neg(&self) -> Option<Dim> {
        let mut terms = BTreeMap::new();
        for (mono, &coef) in &self.terms {
            terms.insert(mono.clone(), coef.checked_neg()?);
        }
        Some(Dim { terms })
    }

    /// `self - other`, or `None` on coefficient overflow.
    pub fn checked_sub(&self, other: &Dim) -> Option<Dim> {
        self.checked_add(&other.checked_neg()?)
    }

    /// `self * other`, or `None` on coefficient overflow.
    pub fn checked_mul(&self, other: &Dim) -> Option<Dim> {
        let mut terms = BTreeMap::new();
        for (m1, &c1) in &self.terms {
            for (m2, &c2) in &other.terms {
                let mono = merge_sorted(m1, m2);
                let old: i64 = terms.get(&mono).copied().unwrap_or(0);
                let sum = old.checked_add(c1.checked_mul(c2)?)?;
                set_coef(&mut terms, mono, sum);
            }
        }
        Some(Dim { terms })
    }

    /// `self / divisor` when the division is exact term by term.
    ///
    /// The divisor must be a single nonzero term (a constant, or a monomial with a coefficient)
    /// whose coefficient divides every coefficient and whose symbols divide every monomial.
    pub fn div_exact(&self, divisor: &Dim) -> Option<Dim> {
        let mut divisor_terms = divisor.terms.iter();
        let (dmono, &dcoef) = divisor_terms.next()?;
        if divisor_terms.next().is_some() {
            return None;
        }
        let mut terms = BTreeMap::new();
        for (mono, &coef) in &self.terms {
            if coef.checked_rem(dcoef)? != 0 {
                return None;
            }
            terms.insert(remove_factors(mono, dmono)?, coef.checked_div(dcoef)?);
        }
        Some(Dim { terms })
    }

    /// `self mod divisor` (Euclidean) for a positive constant divisor, when it is known.
    ///
    /// Known when every non-constant coefficient is a multiple of the divisor: `(2*B + 3) % 2`
    /// is `1`.
    pub fn rem(&self, divisor: &Dim) -> Option<Dim> {
        let d = divisor.as_const().filter(|&d| d > 0)?;
        let mut constant = 0;
        for (mono, &coef) in &self.terms {
            if mono.is_empty() {
                constant = coef;
            } else if coef % d != 0 {
                return None;
            }
        }
        Some(Dim::c(constant.rem_euclid(d)))
    }

    /// The value with every symbol given by `value_of`; `None` if one is unknown or on overflow.
    pub fn eval(&self, value_of: &dyn Fn(&str) -> Option<i64>) -> Option<i64> {
        let mut total: i64 = 0;
        for (mono, &coef) in &self.terms {
            let mut term = coef;
            for sym in mono {
                term = term.checked_mul(value_of(sym)?)?;
            }
            total = total.checked_add(term)?;
        }
        Some(total)
    }

    /// [`Dim::eval`] in 128-bit arithmetic, for figures (memory, FLOPs) at sizes where a
    /// product passes `i64`; `None` if a symbol is unknown or on overflow of `i128`.
    pub fn eval_i128(&self, value_of: &dyn Fn(&str) -> Option<i64>) -> Option<i128> {
        let mut total: i128 = 0;
        for (mono, &coef) in &self.terms {
            let mut term = i128::from(coef);
            for sym in mono {
                term = term.checked_mul(i128::from(value_of(sym)?))?;
            }
            total = total.checked_add(term)?;
        }
        Some(total)
    }

    /// The symbol, when this dimension is exactly one symbol (`T`, not `2*T` or `T + 1`).
    pub fn as_symbol(&self) -> Option<&str> {
        let mut it = self.terms.iter();
        match (it.next(), it.next()) {
            (Some((mono, 1)), None) if mono.len() == 1 => Some(&mono[0]),
            _ => None,
        }
    }

    /// The constant `self - other`, when the two differ by a constant.
    pub fn const_diff(&self, other: &Dim) -> Option<i64> {
        self.checked_sub(other)?.as_const()
    }

    /// Parses a dimension expression: integers, identifiers, `+ - *`, parentheses, unary minus.
    pub fn parse(text: &str) -> Result<Dim, String> {
        let (dim, used) =
            parse_prefix(text).map_err(|(at, msg)| format!("{msg} at offset {at}"))?;
        match text[used..].trim_start().chars().next() {
            None => Ok(dim),
            Some(c) => Err(format!(
                "unexpected `{c}` at offset {}",
                text.len() - text[used..].trim_start().len()
            )),
        }
    }

    /// Terms in display order: descending degree, then lexicographic monomial.
    fn display_terms(&self) -> Vec<(&Monomial, i64)> {
        let mut terms: Vec<(&Monomial, i64)> = self.terms.iter().map(|(m, &c)| (m, c)).collect();
        terms.sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        terms
    }
}

/// Stores `coef` for `mono`, removing the term when it is zero.
fn set_coef(terms: &mut BTreeMap<Monomial, i64>, mono: Monomial, coef: i64) {
    if coef == 0 {
        terms.remove(&mono);
    } else {
        terms.insert(mono, coef);
    }
}

/// The product of two monomials (a merge of two sorted lists).
fn merge_sorted(a: &[String], b: &[String]) -> Monomial {
    let mut out: Monomial = a.iter().chain(b).cloned().collect();
    out.sort();
    out
}

/// `mono / factors` when every factor (with multiplicity) occurs in `mono`.
fn remove_factors(mono: &[String], factors: &[String]) -> Option<Monomial> {
    let mut rest = mono.to_vec();
    for f in factors {
        let at = rest.iter().position(|s| s == f)?;
        rest.remove(at);
    }
    Some(rest)
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "0");
        }
        for (i, (mono, coef)) in self.display_terms().into_iter().enumerate() {
            match (i, coef < 0) {
                (0, true) => write!(f, "-")?,
                (0, false) => {}
                (_, true) => write!(f, " - ")?,
                (_, false) => write!(f, " + ")?,
            }
            let magnitude = coef.unsigned_abs();
            if mono.is_empty() {
                write!(f, "{magnitude}")?;
            } else {
                if magnitude != 1 {
                    write!(f, "{magnitude}*")?;
                }
                write!(f, "{}", mono.join("*"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dim({self})")
    }
}

impl From<i64> for Dim {
    fn from(value: i64) -> Dim {
        Dim::c(value)
    }
}

/// Implements an operator for all four combinations of `Dim` and `&Dim`, panicking on overflow.
macro_rules! dim_operator {
    ($trait:ident, $method:ident, $checked:ident) => {
        impl $trait<&Dim> for &Dim {
            type Output = Dim;
            fn $method(self, rhs: &Dim) -> Dim {
                self.$checked(rhs)
                    .expect(concat!("dimension overflow in ", stringify!($method)))
            }
        }
        impl $trait<Dim> for Dim {
            type Output = Dim;
            fn $method(self, rhs: Dim) -> Dim {
                (&self).$method(&rhs)
            }
        }
        impl $trait<&Dim> for Dim {
            type Output = Dim;
            fn $method(self, rhs: &Dim) -> Dim {
                (&self).$method(rhs)
            }
        }
        impl $trait<Dim> for &Dim {
            type Output = Dim;
            fn $method(self, rhs: Dim) -> Dim {
                self.$method(&rhs)
            }
        }
    };
}

dim_operator!(Add, add, checked_add);
dim_operator!(Sub, sub, checked_sub);
dim_operator!(Mul, mul, checked_mul);

impl Neg for &Dim {
    type Output = Dim;
    fn neg(self) -> Dim {
        self.checked_neg().expect("dimension overflow in neg")
    }
}

impl Neg for Dim {
    type Output = Dim;
    fn neg(self) -> Dim {
        -&self
    }
}

/// Parses the longest dimension expression at the start of `text`.
///
/// Returns the dimension and the byte length consumed (trailing spaces not included), or the
/// byte offset and message of the error. Used by the IR reader, where an expression is followed
/// by more text (`end=T + 1 step=1`).
pub(crate) fn parse_prefix(text: &str) -> Result<(Dim, usize), (usize, String)> {
    let mut parser = DimParser { text, pos: 0 };
    let dim = parser.expr()?;
    Ok((dim, parser.pos))
}

/// A recursive-descent parser over the bytes of a dimension expression.
struct DimParser<'a> {
    text: &'a str,
    pos: usize,
}

type ParseResult<T> = Result<T, (usize, String)>;

impl DimParser<'_> {
    /// The next non-space byte, without consuming it or the spaces.
    fn peek(&self) -> Option<(usize, u8)> {
        let bytes = self.text.as_bytes();
        let at = (self.pos..bytes.len()).find(|&i| bytes[i] != b' ' && bytes[i] != b'\t')?;
        Some((at, bytes[at]))
    }

    /// Consumes `byte` (after spaces) if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        match self.peek() {
            Some((at, b)) if b == byte => {
                self.pos = at + 1;
                true
            }
            _ => false,
        }
    }

    fn overflow(&self) -> (usize, String) {
        (self.pos, "dimension overflows i64".to_string())
    }

    /// expr := ['-'] term (('+' | '-') term)*
    fn expr(&mut self) -> ParseResult<Dim> {
        let negate = self.eat(b'-');
        let mut acc = self.term(negate)?;
        loop {
            let negate = if self.eat(b'+') {
                false
            } else if self.eat(b'-') {
                true
            } else {
                return Ok(acc);
            };
            let term = self.term(negate)?;
            acc = acc.checked_add(&term).ok_or_else(|| self.overflow())?;
        }
    }

    /// term := factor ('*' factor)*, with the sign folded into the first factor so that
    /// `-9223372036854775808` parses.
    fn term(&mut self, negate: bool) -> ParseResult<Dim> {
        let mut acc = self.factor(negate)?;
        while self.eat(b'*') {
            let factor = self.factor(false)?;
            acc = acc.checked_mul(&factor).ok_or_else(|| self.overflow())?;
        }
        Ok(acc)
    }

    /// factor := '-' factor | integer | identifier | '(' expr ')'
    fn factor(&mut self, negate: bool) -> ParseResult<Dim> {
        let Some((at, byte)) = self.peek() else {
            return Err((self.text.len(), "expected a dimension".to_string()));
        };
        let bytes = self.text.as_bytes();
        let end_of = |pred: fn(u8) -> bool| (at..bytes.len()).find(|&i| !pred(bytes[i]));
        let dim = if byte == b'-' {
            self.pos = at + 1;
            return self.factor(!negate);
        } else if byte.is_ascii_digit() {
            let end = end_of(|b| b.is_ascii_digit()).unwrap_or(bytes.len());
            let digits = &self.text[at..end];
            let literal = if negate {
                format!("-{digits}")
            } else {
                digits.to_string()
            };
            self.pos = end;
            let value: i64 = literal
                .parse()
                .map_err(|_| (at, format!("integer `{literal}` does not fit in i64")))?;
            return Ok(Dim::c(value));
        } else if byte.is_ascii_alphabetic() || byte == b'_' {
            let end = end_of(|b| b.is_ascii_alphanumeric() || b == b'_').unwrap_or(bytes.len());
            self.pos = end;
            Dim::sym(&self.text[at..end])
        } else if byte == b'(' {
            self.pos = at + 1;
            let inner = self.expr()?;
            if !self.eat(b')') {
                let at = self.peek().map_or(self.text.len(), |(at, _)| at);
                return Err((at, "expected `)`".to_string()));
            }
            inner
        } else {
            let found = self.text[at..].chars().next().unwrap_or(' ');
            return Err((at, format!("expected a dimension, found `{found}`")));
        };
        if negate {
            dim.checked_neg().ok_or_else(|| self.overflow())
        } else {
            Ok(dim)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(text: &str) -> Dim {
        Dim::parse(text).expect("test dimension parses")
    }

    #[test]
    fn canonical_printing() {
        let b = Dim::sym("B");
        let t = Dim::sym("T");
        assert_eq!(
            (&b * &t * Dim::c(2) + &t - Dim::c(16)).to_string(),
            "2*B*T + T - 16"
        );
        assert_eq!((&t * &t).to_string(), "T*T");
        assert_eq!((&t - &t).to_string(), "0");
        assert_eq!((Dim::c(0) - &b + Dim::c(3)).to_string(), "-B + 3");
        assert_eq!((Dim::c(-2) * &b).to_string(), "-2*B");
        assert_eq!(Dim::c(-7).to_string(), "-7");
        assert_eq!((&t + &b).to_string(), "B + T");
        assert_eq!((&t * &t + &b * &t + &b).to_string(), "B*T + T*T + B");
    }

    #[test]
    fn parse_round_trips() {
        for text in [
            "0",
            "B",
            "-B",
            "2*B*T + T - 16",
            "T*T*T - 3*B*T + 7",
            "-9223372036854775808",
            "T - 9223372036854775808",
            "9223372036854775807*B",
        ] {
            assert_eq!(d(text).to_string(), text, "{text}");
        }
    }

    #[test]
    fn parse_normalises() {
        assert_eq!(d("(B + 1) * (B - 1)"), d("B*B - 1"));
        assert_eq!(d("T*B*2"), d("2*B*T"));
        assert_eq!(d("--T"), d("T"));
        assert_eq!(d("-(T - 4)"), d("4 - T"));
        assert_eq!(d(" 3 * ( n_patches + 1 ) "), d("3*n_patches + 3"));
        assert_eq!(d("B - B"), Dim::c(0));
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            Dim::parse("").unwrap_err(),
            "expected a dimension at offset 0"
        );
        assert_eq!(
            Dim::parse("B +").unwrap_err(),
            "expected a dimension at offset 3"
        );
        assert_eq!(Dim::parse("(B").unwrap_err(), "expected `)` at offset 2");
        assert_eq!(Dim::parse("B T").unwrap_err(), "unexpected `T` at offset 2");
        assert_eq!(
            Dim::parse("B / 2").unwrap_err(),
            "unexpected `/` at offset 2"
        );
        assert!(Dim::parse("99999999999999999999").is_err());
        assert!(Dim::parse("9999999999 * 9999999999").is_err());
    }

    #[test]
    fn prefix_stops_before_following_text() {
        assert_eq!(parse_prefix("T + 1 step=1"), Ok((d("T + 1"), 5)));
        assert_eq!(parse_prefix("B, 16]"), Ok((d("B"), 1)));
    }

    #[test]
    fn division_and_remainder() {
        assert_eq!(d("4*B*T + 8*T").div_exact(&d("4")), Some(d("B*T + 2*T")));
        assert_eq!(d("4*B*T + 8*T").div_exact(&d("2*T")), Some(d("2*B + 4")));
        assert_eq!(d("B*T + 1").div_exact(&d("T")), None);
        assert_eq!(d("6").div_exact(&d("4")), None);
        assert_eq!(d("B").div_exact(&d("0")), None);
        assert_eq!(d("B").div_exact(&d("B + 1")), None);
        assert_eq!(d("0").div_exact(&d("T")), Some(d("0")));
        assert_eq!(d("17").rem(&d("5")), Some(d("2")));
        assert_eq!(d("-1").rem(&d("5")), Some(d("4")));
        assert_eq!(d("2*B + 3").rem(&d("2")), Some(d("1")));
        assert_eq!(d("B + 3").rem(&d("2")), None);
        assert_eq!(d("7").rem(&d("B")), None);
    }

    #[test]
    fn queries() {
        assert_eq!(d("12").as_const(), Some(12));
        assert_eq!(d("0").as_const(), Some(0));
        assert!(!d("T").is_const());
        assert_eq!(d("T*B + B*B + 1").symbols(), vec!["B", "T"]);
        assert_eq!(d("T + 16").const_diff(&d("T + 1")), Some(15));
        assert_eq!(d("T").const_diff(&d("B")), None);
    }

    #[test]
    fn evaluation_overflow_is_none_in_i64_and_exact_in_i128() {
        let big = |s: &str| (s == "T").then_some(10_000_000_000i64);
        assert_eq!(d("T*T").eval(&big), None);
        assert_eq!(d("T*T").eval_i128(&big), Some(10i128.pow(20)));
        assert_eq!(
            d("12*T*T - T").eval_i128(&big),
            Some(12 * 10i128.pow(20) - 10i128.pow(10))
        );
        assert_eq!(d("T*T*T*T").eval_i128(&big), None);
        assert_eq!(d("B").eval_i128(&big), None);
        // The division that overflows (i64::MIN / -1) is not exact-divisible: it is refused.
        assert_eq!(Dim::c(i64::MIN).div_exact(&d("-1")), None);
    }

    fn arb_dim() -> impl Strategy<Value = Dim> {
        let monomial = prop::collection::vec(prop::sample::select(vec!["B", "T", "n_x"]), 0..4);
        prop::collection::vec((monomial, any::<i64>()), 0..5).prop_map(|terms| {
            let mut dim = Dim::default();
            for (mono, coef) in terms {
                let term = mono.iter().fold(Dim::c(coef), |acc, s| {
                    acc.checked_mul(&Dim::sym(s)).unwrap_or(acc)
                });
                dim = dim.checked_add(&term).unwrap_or(dim);
            }
            dim
        })
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(dim in arb_dim()) {
            prop_assert_eq!(Dim::parse(&dim.to_string()), Ok(dim));
        }

        #[test]
        fn arithmetic_is_polynomial(a in -1000i64..1000, b in -1000i64..1000, c in -1000i64..1000) {
            let x = Dim::sym("x");
            let p = &x * Dim::c(a) + Dim::c(b);
            let q = &x * Dim::c(c) - Dim::c(b);
            prop_assert_eq!(&p + &q, &x * Dim::c(a + c));
            prop_assert_eq!((&p * &q).div_exact(&Dim::c(1)), Some(&p * &q));
            prop_assert_eq!(&p - &p, Dim::c(0));
        }
    }
}
