//! Scatter-add: one thread per output column `(p, s)`, which zeroes its column and then adds
//! the source rows in index order. No two threads touch one element, so there are no atomics
//! and the sums are deterministic (the same order as the CPU runtime and the plan executor).
//! Neighbouring threads hold neighbouring `s`, so loads and stores are coalesced.

use super::emit::Function;
use super::launch::KernelLaunch;
use super::CudaError;
use crate::ir::DType;
use crate::kernel::{Plan, ScatterAdd};

/// Threads per block.
const BLOCK: usize = 256;

/// The generated function for `sc`, named `name`; `None` when the output is empty.
pub fn kernel(plan: &Plan, sc: &ScatterAdd, name: &str) -> Result<Option<Function>, CudaError> {
    sc.check(&plan.buffers)
        .map_err(|e| CudaError::new(format!("{name}: {e}")))?;
    let columns = sc.outer * sc.inner;
    if columns == 0 || sc.n == 0 {
        return Ok(None);
    }
    let round = match plan.buffers[sc.out].dtype {
        DType::F16 => "vlmc_f16",
        DType::BF16 => "vlmc_bf16",
        _ => "",
    };
    let last = [
        sc.src.last(sc.outer, sc.k, sc.inner).unwrap_or(usize::MAX),
        sc.idx.last(1, 1, sc.k).unwrap_or(usize::MAX),
        sc.outer * sc.n * sc.inner,
    ];
    let ty = if last.iter().any(|&x| x >= (i32::MAX as usize) / 2) {
        "long long"
    } else {
        "int"
    };
    let (src, idx, out) = (sc.src.buf, sc.idx.buf, sc.out);
    if src == out || idx == out {
        return Err(CudaError::new(format!("{name}: scatter-add in place")));
    }
    let params = format!(
        "const float* __restrict__ b{src}, const int* __restrict__ b{idx}, float* __restrict__ b{out}"
    );
    let (n, k, inner) = (sc.n, sc.k, sc.inner);
    let source = format!(
        r#"extern "C" __global__ void __launch_bounds__({BLOCK}) {name}({params}) {{
  for ({ty} t = ({ty})blockIdx.x * {BLOCK} + threadIdx.x; t < {columns}; t += ({ty})gridDim.x * {BLOCK}) {{
    const {ty} p = t / {inner}, s = t % {inner};
    float* col = b{out} + p * {n} * {inner} + s;
    for ({ty} j = 0; j < {n}; ++j) col[j * {inner}] = 0.0f;
    for ({ty} q = 0; q < {k}; ++q) {{
      const int j = b{idx}[{io} + q * {ic}];
      if (j >= 0 && j < {n}) col[({ty})j * {inner}] += b{src}[{so} + p * {sb} + q * {sr} + s * {sc}];
    }}
{finish}  }}
}}
"#,
        io = sc.idx.offset,
        ic = sc.idx.col,
        so = sc.src.offset,
        sb = sc.src.batch,
        sr = sc.src.row,
        sc = sc.src.col,
        finish = if round.is_empty() {
            String::new()
        } else {
            format!("    for ({ty} j = 0; j < {n}; ++j) col[j * {inner}] = {round}(col[j * {inner}]);\n")
        },
    );
    let blocks = columns.div_ceil(BLOCK).min((1 << 31) - 1);
    Ok(Some(Function {
        source,
        launch: KernelLaunch {
            function: name.to_string(),
            grid: [blocks as u32, 1, 1],
            block: BLOCK as u32,
            args: vec![src, idx, out],
            work: format!("scatter-add: {} columns of {k} rows into {n}", columns),
        },
    }))
}
