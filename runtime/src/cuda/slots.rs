//! Host tensors to and from the 4-byte slots the generated kernels read and write: f32 bits
//! (f16 and bf16 values rounded, held as f32), i32, and bools as i32 0/1.

use crate::tensor::{Data, Tensor};
use vlmc::ir::DType;

/// The slots of `t` stored as `dtype`.
pub fn to_slots(t: &Tensor, dtype: DType) -> Vec<u32> {
    let float = |v: f64| -> u32 {
        let x = match dtype {
            DType::F16 => half::f16::from_f64(v).to_f32(),
            DType::BF16 => half::bf16::from_f64(v).to_f32(),
            _ => v as f32,
        };
        x.to_bits()
    };
    match (&t.data, dtype) {
        (Data::F32(v), DType::F32) => v.iter().map(|x| x.to_bits()).collect(),
        (Data::I32(v), DType::I32) => v.iter().map(|&x| x as u32).collect(),
        (Data::Bool(v), _) => v.iter().map(|&x| u32::from(x)).collect(),
        (_, DType::I32) => t
            .to_f64()
            .into_iter()
            .map(|x| x as i64 as i32 as u32)
            .collect(),
        (_, DType::Bool) => t
            .to_f64()
            .into_iter()
            .map(|x| u32::from(x != 0.0))
            .collect(),
        _ => t.to_f64().into_iter().map(float).collect(),
    }
}

/// A tensor of `shape` and `dtype` from its slots.
pub fn from_slots(v: &[u32], dtype: DType, shape: Vec<usize>) -> Tensor {
    let data = match dtype {
        DType::I32 => Data::I32(v.iter().map(|&x| x as i32).collect()),
        DType::Bool => Data::Bool(v.iter().map(|&x| x != 0).collect()),
        _ => Data::F32(v.iter().map(|&x| f32::from_bits(x)).collect()),
    };
    Tensor { shape, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let f = Tensor::f32(vec![3], vec![1.5, -0.0, f32::INFINITY]);
        assert_eq!(
            from_slots(&to_slots(&f, DType::F32), DType::F32, vec![3]),
            f
        );
        let i = Tensor::i32(vec![2], vec![-7, i32::MAX]);
        assert_eq!(
            from_slots(&to_slots(&i, DType::I32), DType::I32, vec![2]),
            i
        );
        let b = Tensor::bool(vec![2], vec![true, false]);
        assert_eq!(to_slots(&b, DType::Bool), vec![1, 0]);
        assert_eq!(from_slots(&[1, 0], DType::Bool, vec![2]), b);
        // f16 storage rounds.
        let h = to_slots(&Tensor::f32(vec![1], vec![0.1]), DType::F16);
        assert_eq!(f32::from_bits(h[0]), half::f16::from_f32(0.1).to_f32());
    }
}
