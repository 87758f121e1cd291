//! Host tensors: a shape and a flat, row-major buffer. Floating dtypes (f32, f16, bf16) are held
//! as `f32` values (f16/bf16 values are exactly representable); f64 (the IR-only type of
//! gradient checks), i32 and bool have their own.

use crate::alloc::{self, AllocError};
use std::fmt;
use vlmc::ir::DType;

/// The elements of a tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

/// A tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    /// An f32 tensor; `values.len()` must be the product of `shape`.
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Tensor {
        debug_assert_eq!(alloc::numel(&shape), Some(values.len()));
        Tensor {
            shape,
            data: Data::F32(values),
        }
    }
    /// An f64 tensor.
    pub fn f64(shape: Vec<usize>, values: Vec<f64>) -> Tensor {
        debug_assert_eq!(alloc::numel(&shape), Some(values.len()));
        Tensor {
            shape,
            data: Data::F64(values),
        }
    }
    /// An i32 tensor.
    pub fn i32(shape: Vec<usize>, values: Vec<i32>) -> Tensor {
        debug_assert_eq!(alloc::numel(&shape), Some(values.len()));
        Tensor {
            shape,
            data: Data::I32(values),
        }
    }
    /// A bool tensor.
    pub fn bool(shape: Vec<usize>, values: Vec<bool>) -> Tensor {
        debug_assert_eq!(alloc::numel(&shape), Some(values.len()));
        Tensor {
            shape,
            data: Data::Bool(values),
        }
    }
    /// A tensor of `shape` with every element `value`, stored as `dtype` is (f16/bf16 values
    /// rounded to their precision, i32 truncated, bool `value != 0`); the memory is checked and
    /// allocated through [`crate::alloc`], and `what` names the tensor if it does not fit.
    pub fn full(
        dtype: DType,
        shape: Vec<usize>,
        value: f64,
        what: impl Fn() -> String,
    ) -> Result<Tensor, AllocError> {
        let n = alloc::numel(&shape).ok_or_else(|| AllocError {
            message: format!("{} has more elements than this machine can address", what()),
        })?;
        let what = || format!("{} {}", what(), alloc::describe(&shape, dtype));
        let data = match dtype {
            DType::F64 => Data::F64(alloc::checked_vec(n, value, what)?),
            DType::I32 => Data::I32(alloc::checked_vec(n, value as i32, what)?),
            DType::Bool => Data::Bool(alloc::checked_vec(n, value != 0.0, what)?),
            DType::F16 => Data::F32(alloc::checked_vec(
                n,
                half::f16::from_f64(value).to_f32(),
                what,
            )?),
            DType::BF16 => Data::F32(alloc::checked_vec(
                n,
                half::bf16::from_f64(value).to_f32(),
                what,
            )?),
            DType::F32 | DType::NF4 => Data::F32(alloc::checked_vec(n, value as f32, what)?),
        };
        Ok(Tensor { shape, data })
    }
    /// The number of elements.
    pub fn numel(&self) -> usize {
        // A tensor holds its elements, so the product fits (0 when any dimension is 0).
        alloc::numel(&self.shape).unwrap_or(usize::MAX)
    }
    /// The storage kind as an IR dtype (f32, f16 and bf16 report f32).
    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::I32(_) => DType::I32,
            Data::Bool(_) => DType::Bool,
        }
    }
    /// Whether an IR dtype is stored by this tensor's kind (any float kind for any float
    /// dtype: values are converted where they enter a graph).
    pub fn holds(&self, dtype: DType) -> bool {
        match self.data {
            Data::F32(_) | Data::F64(_) => dtype.is_float(),
            Data::I32(_) => dtype == DType::I32,
            Data::Bool(_) => dtype == DType::Bool,
        }
    }
    /// The values as f32, if this is a float tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }
    /// The values as f64, if this is an f64 tensor.
    pub fn as_f64(&self) -> Option<&[f64]> {
        match &self.data {
            Data::F64(v) => Some(v),
            _ => None,
        }
    }
    /// Whether this is a float tensor (f32 or f64 storage).
    pub fn is_float(&self) -> bool {
        matches!(self.data, Data::F32(_) | Data::F64(_))
    }
    /// The same values as an f32 tensor (f64 rounded; other kinds unchanged).
    pub fn to_f32_tensor(&self) -> Tensor {
        match &self.data {
            Data::F64(v) => Tensor::f32(self.shape.clone(), v.iter().map(|&x| x as f32).collect()),
            _ => self.clone(),
        }
    }
    /// The same values as an f64 tensor (f32 widened exactly; other kinds unchanged).
    pub fn to_f64_tensor(&self) -> Tensor {
        match &self.data {
            Data::F32(v) => Tensor::f64(
                self.shape.clone(),
                v.iter().map(|&x| f64::from(x)).collect(),
            ),
            _ => self.clone(),
        }
    }
    /// The values as i32, if this is an integer tensor.
    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I32(v) => Some(v),
            _ => None,
        }
    }
    /// The values as bool, if this is a bool tensor.
    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
    /// [`Tensor::to_f64`] into memory checked and allocated through [`crate::alloc`].
    pub fn try_to_f64(&self) -> Result<Vec<f64>, AllocError> {
        let n = self.numel();
        let what = || {
            format!(
                "an f64 copy of a {} tensor",
                alloc::describe(&self.shape, self.dtype())
            )
        };
        match &self.data {
            Data::F32(v) => alloc::collect(n, v.iter().map(|&x| f64::from(x)), what),
            Data::F64(v) => alloc::collect(n, v.iter().copied(), what),
            Data::I32(v) => alloc::collect(n, v.iter().map(|&x| f64::from(x)), what),
            Data::Bool(v) => alloc::collect(n, v.iter().map(|&x| f64::from(u8::from(x))), what),
        }
    }
    /// Every element converted to f64 (bool as 0/1).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::F64(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::Bool(v) => v.iter().map(|&x| f64::from(u8::from(x))).collect(),
        }
    }
    /// The shape as text: `[2, 7, 384]`.
    pub fn shape_text(&self) -> String {
        format!("{:?}", self.shape)
    }
}

/// Row-major strides of a shape. (Only a shape with no elements can have strides past
/// `usize`, `[0, 2^40, 2^40]`; they saturate there, and nothing is ever indexed with them.)
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(shape[i + 1]);
    }
    s
}

impl fmt::Display for Tensor {
    /// `f32[2, 3] [0.1, 0.2, ...]`: the dtype, shape and up to six leading values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "{}[{}]", self.dtype(), dims.join(", "))?;
        let vals: Vec<String> = match &self.data {
            Data::F32(v) => v.iter().take(6).map(|x| format!("{x:.6}")).collect(),
            Data::F64(v) => v.iter().take(6).map(|x| format!("{x:.6}")).collect(),
            Data::I32(v) => v.iter().take(6).map(|x| x.to_string()).collect(),
            Data::Bool(v) => v.iter().take(6).map(|x| x.to_string()).collect(),
        };
        let more = if self.numel() > 6 { ", ..." } else { "" };
        write!(f, " [{}{more}]", vals.join(", "))
    }
}
