//! The launch plan: what the runtime does, in order, on one stream: launch a generated function
//! with a grid, a block and buffer arguments, or call cuBLAS for a matrix product. Written as
//! text by `vlmc build --target cuda --emit cuda` and checked by [`check`].

use crate::kernel::{BufferKind, Plan};
use std::fmt::Write;

/// A launch of a generated function.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelLaunch {
    /// The `extern "C"` name of the function.
    pub function: String,
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block (x only).
    pub block: u32,
    /// The buffers passed, in parameter order.
    pub args: Vec<usize>,
    /// What the launch covers, for people.
    pub work: String,
}

/// One operand of a cuBLAS call: a column-major matrix at `offset` elements into `buf`.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmOperand {
    pub buf: usize,
    pub offset: usize,
    /// Leading dimension.
    pub ld: usize,
    /// Elements between consecutive matrices of the batch.
    pub stride: usize,
    /// Whether cuBLAS reads it transposed (`CUBLAS_OP_T`).
    pub trans: bool,
}

/// A `cublasSgemmStridedBatched` call, in cuBLAS's column-major terms:
/// `C[i] = op(A[i]) · op(B[i])` with `op(A)` m×k, `op(B)` k×n, `C` m×n.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    /// The kernel (fusion group) it belongs to.
    pub group: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: GemmOperand,
    pub b: GemmOperand,
    pub c: GemmOperand,
    pub batch: usize,
}

/// One step of the launch plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Launch {
    Kernel(KernelLaunch),
    Gemm(Gemm),
}

/// Hardware limits the plan must respect (every architecture from sm_50 on).
const MAX_BLOCK: u32 = 1024;
const MAX_GRID: [u64; 3] = [(1 << 31) - 1, 65535, 65535];

/// The launch plan as text: buffers, then launches in order, then outputs.
pub fn text(plan: &Plan, launches: &[Launch], title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# vlmc CUDA launch plan: {title}");
    let _ = writeln!(s, "arena {} slots of 4 bytes", plan.arena);
    for (i, b) in plan.buffers.iter().enumerate() {
        let dims: Vec<String> = b.shape.iter().map(|d| d.to_string()).collect();
        let place = match &b.kind {
            BufferKind::Input(n) => format!("input {n:?}"),
            BufferKind::Param(p) => format!("param {p:?}"),
            BufferKind::LoadTime(n) => format!("load-time %{n}"),
            BufferKind::Temp { offset } => format!("arena +{offset}"),
            BufferKind::Scratch => "scratch".into(),
        };
        let _ = writeln!(
            s,
            "buffer b{i} {}[{}] {} elements, {place}",
            b.dtype,
            dims.join(", "),
            b.len()
        );
    }
    for l in launches {
        match l {
            Launch::Kernel(k) => {
                let args: Vec<String> = k.args.iter().map(|a| format!("b{a}")).collect();
                let _ = writeln!(
                    s,
                    "launch {} grid ({}, {}, {}) block {} args ({}) ; {}",
                    k.function,
                    k.grid[0],
                    k.grid[1],
                    k.grid[2],
                    k.block,
                    args.join(", "),
                    k.work
                );
            }
            Launch::Gemm(g) => {
                let op = |o: &GemmOperand| {
                    format!(
                        "{}b{}+{} ld {} stride {}",
                        if o.trans { "T " } else { "" },
                        o.buf,
                        o.offset,
                        o.ld,
                        o.stride
                    )
                };
                let _ = writeln!(
                    s,
                    "cublas_sgemm_strided_batched {} m {} n {} k {} batch {} a ({}) b ({}) c ({})",
                    g.group,
                    g.m,
                    g.n,
                    g.k,
                    g.batch,
                    op(&g.a),
                    op(&g.b),
                    op(&g.c)
                );
            }
        }
    }
    for (name, b) in &plan.outputs {
        let _ = writeln!(s, "output {name:?} b{b}");
    }
    s
}

/// The byte-free extent of a buffer in the device memory model: `(region, start, end)`, where
/// region 0 is the arena and every other buffer is a region of its own.
fn extent(plan: &Plan, b: usize) -> Option<(usize, usize, usize)> {
    let buf = plan.buffers.get(b)?;
    Some(match buf.kind {
        BufferKind::Temp { offset } => (0, offset, offset + buf.len()),
        _ => (b + 1, 0, buf.len()),
    })
}

/// Checks a launch plan against its kernel plan: sizes within the hardware limits, every
/// argument an existing buffer, temporaries inside the arena, no two buffers of one launch
/// overlapping in memory (unless both are only read), cuBLAS operands inside their buffers.
pub fn check(plan: &Plan, launches: &[Launch]) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, b) in plan.buffers.iter().enumerate() {
        if let BufferKind::Temp { offset } = b.kind {
            if offset + b.len() > plan.arena {
                errors.push(format!("b{i} ends past the arena ({})", plan.arena));
            }
        }
    }
    for l in launches {
        match l {
            Launch::Kernel(k) => {
                let f = &k.function;
                if k.block == 0 || k.block > MAX_BLOCK || k.block % 32 != 0 {
                    errors.push(format!("{f}: block of {} threads", k.block));
                }
                for (d, (&g, &max)) in k.grid.iter().zip(&MAX_GRID).enumerate() {
                    if g == 0 || u64::from(g) > max {
                        errors.push(format!("{f}: grid dimension {d} is {g}"));
                    }
                }
                let mut spans = Vec::new();
                for &a in &k.args {
                    match extent(plan, a) {
                        Some(e) => spans.push((a, e)),
                        None => errors.push(format!("{f}: argument b{a} is not a buffer")),
                    }
                }
                for (x, (a, ea)) in spans.iter().enumerate() {
                    for (b, eb) in &spans[x + 1..] {
                        if a == b {
                            errors.push(format!("{f}: b{a} is passed twice"));
                        } else if ea.0 == eb.0 && ea.1 < eb.2 && eb.1 < ea.2 {
                            errors.push(format!("{f}: b{a} and b{b} overlap in the arena"));
                        }
                    }
                }
            }
            Launch::Gemm(g) => check_gemm(plan, g, &mut errors),
        }
    }
    errors
}

fn check_gemm(plan: &Plan, g: &Gemm, errors: &mut Vec<String>) {
    let name = &g.group;
    let fits = |x: usize| x <= i32::MAX as usize;
    if ![g.m, g.n, g.k, g.batch].into_iter().all(fits) {
        errors.push(format!("{name}: gemm sizes past the i32 range"));
    }
    // (operand, rows and columns as stored: op(X) is rows×cols, X itself is its transpose
    // when trans is set)
    let ops = [
        ("a", &g.a, g.m, g.k),
        ("b", &g.b, g.k, g.n),
        ("c", &g.c, g.m, g.n),
    ];
    let mut spans = Vec::new();
    for (which, o, rows, cols) in ops {
        let (srows, scols) = if o.trans { (cols, rows) } else { (rows, cols) };
        if o.ld < srows.max(1) || !fits(o.ld) {
            errors.push(format!("{name}: {which} has ld {} for {srows} rows", o.ld));
        }
        let Some(buf) = plan.buffers.get(o.buf) else {
            errors.push(format!("{name}: {which} is not a buffer"));
            continue;
        };
        if g.batch > 0 && srows > 0 && scols > 0 {
            let last = o.offset + (g.batch - 1) * o.stride + (scols - 1) * o.ld + srows - 1;
            if last >= buf.len() {
                errors.push(format!(
                    "{name}: {which} reaches element {last} of b{} ({} elements)",
                    o.buf,
                    buf.len()
                ));
            }
        }
        if let Some(e) = extent(plan, o.buf) {
            spans.push((which, e));
        }
    }
    let c = spans.iter().find(|s| s.0 == "c").map(|s| s.1);
    for (which, e) in &spans {
        if let (Some(c), true) = (c, *which != "c") {
            if e.0 == c.0 && e.1 < c.2 && c.1 < e.2 {
                errors.push(format!("{name}: {which} overlaps the output"));
            }
        }
    }
}
