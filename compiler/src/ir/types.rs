//! Tensor types: an element type and a shape of symbolic dimensions, printed `f32[B, 3, 32, 32]`.

use std::fmt;
use std::ops::{Deref, DerefMut};

use super::dim::Dim;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer (indices, token ids).
    I32,
    /// Boolean (masks, comparison results).
    Bool,
    /// 4-bit NormalFloat, a storage-only type for quantised weights; cast it before arithmetic.
    NF4,
    /// 64-bit IEEE float: an IR-only type for gradient checks ([`crate::passes::promote_f64`]);
    /// not writable in `.vlm` (not in [`DType::ALL`]), but printed and read back as `f64`.
    F64,
}

impl DType {
    /// Every element type, in declaration order.
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::Bool,
        DType::NF4,
    ];

    /// Whether arithmetic on this type is floating point (`f32`, `f16`, `bf16`, `f64`).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// Whether this type supports arithmetic and ordering (floats and `i32`).
    pub fn is_numeric(self) -> bool {
        self.is_float() || self == DType::I32
    }

    /// The size of one element in bits.
    pub fn bits(self) -> u32 {
        match self {
            DType::F64 => 64,
            DType::F32 | DType::I32 => 32,
            DType::F16 | DType::BF16 => 16,
            DType::Bool => 8,
            DType::NF4 => 4,
        }
    }

    /// The lowercase name used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::Bool => "bool",
            DType::NF4 => "nf4",
            DType::F64 => "f64",
        }
    }

    /// Parses a lowercase name of the language, such as `bf16` (not `f64`, which is IR-only).
    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Parses a name of the IR text form: the language's names and `f64`.
    pub fn parse_ir(name: &str) -> Option<DType> {
        DType::parse(name).or((name == "f64").then_some(DType::F64))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A list of dimensions, printed `[B, 16, T + 16]` (`[]` for a scalar).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// The shape of a scalar.
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The number of elements (the product of the dimensions), or `None` on overflow.
    pub fn numel(&self) -> Option<Dim> {
        self.0
            .iter()
            .try_fold(Dim::c(1), |acc, dim| acc.checked_mul(dim))
    }
}

impl Deref for Shape {
    type Target = Vec<Dim>;
    fn deref(&self) -> &Vec<Dim> {
        &self.0
    }
}

impl DerefMut for Shape {
    fn deref_mut(&mut self) -> &mut Vec<Dim> {
        &mut self.0
    }
}

impl From<Vec<Dim>> for Shape {
    fn from(dims: Vec<Dim>) -> Shape {
        Shape(dims)
    }
}

impl FromIterator<Dim> for Shape {
    fn from_iter<I: IntoIterator<Item = Dim>>(iter: I) -> Shape {
        Shape(iter.into_iter().collect())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, dim) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{dim}")?;
        }
        write!(f, "]")
    }
}

/// The type of a value in the graph: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorType {
    /// The element type.
    pub dtype: DType,
    /// The shape.
    pub shape: Shape,
}

impl TensorType {
    /// A tensor type from an element type and anything convertible to a shape.
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> TensorType {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    /// Parses the text form, e.g. `f32[B, T + 1]`.
    pub fn parse(text: &str) -> Result<TensorType, String> {
        let text = text.trim();
        let open = text
            .find('[')
            .ok_or_else(|| format!("expected `dtype[dims]`, found `{text}`"))?;
        let dtype = DType::parse_ir(&text[..open])
            .ok_or_else(|| format!("unknown element type `{}`", &text[..open]))?;
        let inner = text[open + 1..]
            .strip_suffix(']')
            .ok_or_else(|| "expected `]` at the end".to_string())?;
        let mut shape = Shape::scalar();
        if !inner.trim().is_empty() {
            for part in inner.split(',') {
                shape.push(Dim::parse(part)?);
            }
        }
        Ok(TensorType { dtype, shape })
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printing() {
        let shape = Shape(vec![Dim::sym("B"), Dim::c(16), Dim::sym("T") + Dim::c(16)]);
        assert_eq!(shape.to_string(), "[B, 16, T + 16]");
        assert_eq!(
            TensorType::new(DType::BF16, shape).to_string(),
            "bf16[B, 16, T + 16]"
        );
        assert_eq!(
            TensorType::new(DType::F32, Shape::scalar()).to_string(),
            "f32[]"
        );
    }

    #[test]
    fn parse_round_trips() {
        for text in [
            "f32[B, 3, 32, 32]",
            "i32[]",
            "nf4[2*B*T + T - 16, 1]",
            "f64[B]",
        ] {
            assert_eq!(
                TensorType::parse(text).map(|t| t.to_string()),
                Ok(text.to_string())
            );
        }
        assert!(TensorType::parse("f128[B]").is_err());
        assert!(TensorType::parse("f32[B").is_err());
        assert!(TensorType::parse("f32[B,]").is_err());
    }

    #[test]
    fn dtype_names_round_trip() {
        for dtype in DType::ALL {
            assert_eq!(DType::parse(dtype.name()), Some(dtype));
        }
        assert_eq!(DType::parse("f64"), None);
        assert_eq!(DType::parse_ir("f64"), Some(DType::F64));
        assert_eq!(DType::parse_ir("bf16"), Some(DType::BF16));
        assert!(DType::F64.is_float() && DType::F64.bits() == 64);
        assert!(DType::BF16.is_float() && !DType::NF4.is_float() && !DType::I32.is_float());
        assert!(DType::I32.is_numeric() && !DType::Bool.is_numeric());
    }

    #[test]
    fn numel_is_a_polynomial() {
        let shape = Shape(vec![Dim::sym("B"), Dim::c(3), Dim::sym("T")]);
        assert_eq!(
            shape.numel(),
            Some(Dim::c(3) * Dim::sym("B") * Dim::sym("T"))
        );
        assert_eq!(Shape::scalar().numel(), Some(Dim::c(1)));
        assert_eq!(Shape(vec![Dim::c(i64::MAX), Dim::c(2)]).numel(), None);
    }
}
