//! Matrix products: a `cublasSgemmStridedBatched` call where the operands' strides fit cuBLAS's
//! column-major form, otherwise a generated tiled kernel (16×16 tiles through shared memory).
//!
//! The plan's product is row-major: `C[b] (m×n) = A[b] (m×k) · B[b] (k×n)`, with element (i, j)
//! of an operand at `offset + b·batch + i·row + j·col`. Read column-major, a row-major C is Cᵀ,
//! so cuBLAS computes `Cᵀ = Bᵀ · Aᵀ`: its first operand is B, its second A.

use super::emit::{check_dtype, Function};
use super::expr::{class, ctype, Class};
use super::launch::{Gemm, GemmOperand, KernelLaunch};
use super::CudaError;
use crate::ir::DType;
use crate::kernel::{MatMul, Plan, Strided};

/// Tile edge of the generated kernel.
const TILE: usize = 16;

/// `Xᵀ` of a row-major `rows×cols` view as a cuBLAS operand: `Xᵀ` is column-major with
/// `ld = row` when the columns are contiguous (not transposed); when the rows are contiguous,
/// `X` itself is column-major with `ld = col` and cuBLAS transposes it.
fn transposed_view(x: &Strided, rows: usize, cols: usize) -> Option<(bool, usize)> {
    // A stride over an axis of length 1 is free: pick the one that suits.
    let col = if cols <= 1 { 1 } else { x.col };
    let row = if rows <= 1 { cols.max(1) } else { x.row };
    if col == 1 && row >= cols.max(1) {
        return Some((false, row));
    }
    let row = if rows <= 1 { 1 } else { x.row };
    let col = if cols <= 1 { rows.max(1) } else { x.col };
    if row == 1 && col >= rows.max(1) {
        return Some((true, col));
    }
    None
}

/// The cuBLAS call for `mm`, when its operands and sizes allow one.
pub fn cublas(plan: &Plan, mm: &MatMul, group: &str) -> Option<Gemm> {
    let f32_buf = |b: usize| plan.buffers.get(b).is_some_and(|b| b.dtype == DType::F32);
    if !(f32_buf(mm.a.buf) && f32_buf(mm.b.buf) && f32_buf(mm.out)) || mm.k == 0 {
        return None;
    }
    let (tb, ldb) = transposed_view(&mm.b, mm.k, mm.n)?;
    let (ta, lda) = transposed_view(&mm.a, mm.m, mm.k)?;
    let fits = |x: usize| x <= i32::MAX as usize;
    if ![mm.m, mm.n, mm.k, mm.batch, lda, ldb].into_iter().all(fits) {
        return None;
    }
    Some(Gemm {
        group: group.to_string(),
        m: mm.n,
        n: mm.m,
        k: mm.k,
        a: GemmOperand {
            buf: mm.b.buf,
            offset: mm.b.offset,
            ld: ldb,
            stride: if mm.batch > 1 { mm.b.batch } else { 0 },
            trans: tb,
        },
        b: GemmOperand {
            buf: mm.a.buf,
            offset: mm.a.offset,
            ld: lda,
            stride: if mm.batch > 1 { mm.a.batch } else { 0 },
            trans: ta,
        },
        c: GemmOperand {
            buf: mm.out,
            offset: 0,
            ld: mm.n.max(1),
            stride: mm.m * mm.n,
            trans: false,
        },
        batch: mm.batch,
    })
}

/// The generated tiled kernel for `mm`, named `name`; `None` when the product is empty.
pub fn tiled(plan: &Plan, mm: &MatMul, name: &str) -> Result<Option<Function>, CudaError> {
    if mm.batch == 0 || mm.m == 0 || mm.n == 0 {
        return Ok(None);
    }
    let dtype = |b: usize| {
        plan.buffers
            .get(b)
            .map(|x| x.dtype)
            .ok_or_else(|| CudaError::new(format!("{name}: no buffer b{b}")))
    };
    let (da, db, dc) = (dtype(mm.a.buf)?, dtype(mm.b.buf)?, dtype(mm.out)?);
    for (d, b) in [(da, mm.a.buf), (db, mm.b.buf), (dc, mm.out)] {
        check_dtype(d, b)?;
    }
    // Accumulate in the output's class; f16/bf16 outputs are rounded once at the end, as the
    // plan executor does.
    let acc = ctype(dc);
    let zero = if class(dc) == Class::Float {
        "0.0f"
    } else {
        "0"
    };
    let conv = |d: DType, e: &str| match (class(d), class(dc)) {
        (Class::Int, Class::Float) => format!("(float){e}"),
        (Class::Float, Class::Int) => format!("vlmc_f2i({e})"),
        _ => e.to_string(),
    };
    let round = match dc {
        DType::F16 => "vlmc_f16",
        DType::BF16 => "vlmc_bf16",
        _ => "",
    };
    let last = |x: &Strided, r: usize, c: usize| {
        x.offset
            + (mm.batch - 1) * x.batch
            + r.saturating_sub(1) * x.row
            + c.saturating_sub(1) * x.col
    };
    let big = [
        last(&mm.a, mm.m, mm.k),
        last(&mm.b, mm.k, mm.n),
        mm.batch * mm.m * mm.n,
    ]
    .into_iter()
    .any(|x| x >= (i32::MAX as usize) / 2);
    let ty = if big { "long long" } else { "int" };
    let (tm, tn) = (mm.m.div_ceil(TILE), mm.n.div_ceil(TILE));
    let grid = [tn, tm.min(65535), mm.batch.min(65535)];
    if tn > i32::MAX as usize {
        return Err(CudaError::new(format!(
            "{name}: {} columns is too wide",
            mm.n
        )));
    }
    let (a, b, c) = (mm.a.buf, mm.b.buf, mm.out);
    let (ta, tb) = (ctype(da), ctype(db));
    let params = if a == b {
        format!("const {ta}* __restrict__ b{a}, {acc}* __restrict__ b{c}")
    } else {
        format!(
            "const {ta}* __restrict__ b{a}, const {tb}* __restrict__ b{b}, {acc}* __restrict__ b{c}"
        )
    };
    let args = if a == b { vec![a, c] } else { vec![a, b, c] };
    let (m, n, k) = (mm.m, mm.n, mm.k);
    let a_at = format!(
        "b{a}[{} + z * {} + i * {} + (p0 + tx) * {}]",
        mm.a.offset, mm.a.batch, mm.a.row, mm.a.col
    );
    let b_at = format!(
        "b{b}[{} + z * {} + (p0 + ty) * {} + j * {}]",
        mm.b.offset, mm.b.batch, mm.b.row, mm.b.col
    );
    let a_val = conv(da, &a_at);
    let b_val = conv(db, &b_at);
    let source = format!(
        r#"extern "C" __global__ void __launch_bounds__({threads}) {name}({params}) {{
  __shared__ {acc} sa[{TILE}][{TILE} + 1];
  __shared__ {acc} sb[{TILE}][{TILE} + 1];
  const int tx = threadIdx.x % {TILE}, ty = threadIdx.x / {TILE};
  for ({ty} z = blockIdx.z; z < {batch}; z += gridDim.z) {{
    for ({ty} y = blockIdx.y; y < {tm}; y += gridDim.y) {{
      const {ty} i = y * {TILE} + ty, j = ({ty})blockIdx.x * {TILE} + tx;
      {acc} acc = {zero};
      for ({ty} p0 = 0; p0 < {k}; p0 += {TILE}) {{
        sa[ty][tx] = (i < {m} && p0 + tx < {k}) ? {a_val} : {zero};
        sb[ty][tx] = (p0 + ty < {k} && j < {n}) ? {b_val} : {zero};
        __syncthreads();
#pragma unroll
        for (int q = 0; q < {TILE}; ++q) acc += sa[ty][q] * sb[q][tx];
        __syncthreads();
      }}
      if (i < {m} && j < {n}) b{c}[(z * {m} + i) * {n} + j] = {round}(acc);
    }}
  }}
}}
"#,
        threads = TILE * TILE,
        batch = mm.batch,
    );
    Ok(Some(Function {
        source,
        launch: KernelLaunch {
            function: name.to_string(),
            grid: grid.map(|g| g as u32),
            block: (TILE * TILE) as u32,
            args,
            work: format!("tiled matmul: {} × ({m}×{k} · {k}×{n})", mm.batch),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(row: usize, col: usize) -> Strided {
        Strided {
            buf: 0,
            offset: 0,
            batch: 0,
            row,
            col,
        }
    }

    #[test]
    fn operand_forms() {
        // Row-major 4×6: Xᵀ column-major with ld 6.
        assert_eq!(transposed_view(&view(6, 1), 4, 6), Some((false, 6)));
        // A transposed weight: element (i, j) at j·4 + i.
        assert_eq!(transposed_view(&view(1, 4), 4, 6), Some((true, 4)));
        // A padded row: ld larger than the width.
        assert_eq!(transposed_view(&view(8, 1), 4, 6), Some((false, 8)));
        // One row: any row stride.
        assert_eq!(transposed_view(&view(0, 1), 1, 6), Some((false, 6)));
        // Every other column: no cuBLAS form.
        assert_eq!(transposed_view(&view(12, 2), 4, 6), None);
    }
}
